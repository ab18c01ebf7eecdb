"""A local HTTP server on 127.0.0.1 with one route per download outcome, for tests (and the bench).

Routes (all deterministic):
    /img/<name>.jpg|png|webp   a small image, colour derived from <name>
    /404  /500                 error statuses
    /slow.jpg                  sleeps `slow_s` seconds before answering (longer than the test timeout)
    /redirect.jpg              302 -> /img/redirected.jpg
    /html.jpg                  an HTML page served as image/jpeg
    /truncated.jpg             the first half of a JPEG
    /empty.jpg                 200 with a 0-byte body
    /bomb.png                  a ~100-byte PNG declaring 50,000 x 50,000 pixels
    /optout.jpg                a good JPEG with `X-Robots-Tag: noai`
    /flaky.jpg                 503 until `server.flaky_ok = True`, then a good JPEG (the switch)
    /hold/<name>.jpg           waits until `server.release` is set (or `hold_max_s`), then a good JPEG
Every request is counted per path in `server.hits`.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import struct
import threading
import time
import zlib
from collections import Counter
from functools import cache

from PIL import Image


@cache
def image_bytes(name: str, fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    """A deterministic small image whose colour comes from `name`."""
    digest = hashlib.sha256(name.encode()).digest()
    img = Image.new("RGB", size, tuple(digest[:3]))
    for x in range(0, size[0], 8):  # some structure so encoders do real work
        for y in range(size[1]):
            img.putpixel((x, y), tuple(digest[3:6]))
    buf = io.BytesIO()
    img.save(buf, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])
    return buf.getvalue()


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header declares width x height pixels (1-bit gray, a few rows of data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


class ImageServer(http.server.ThreadingHTTPServer):
    """The server; state the tests flip lives here."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 256  # the default 5 drops SYNs under concurrent fetches (1 s retransmits)

    def __init__(self, slow_s: float = 4.0, hold_max_s: float = 30.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.slow_s = slow_s
        self.hold_max_s = hold_max_s
        self.flaky_ok = False
        self.release = threading.Event()
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base_url + "/" + path.lstrip("/")

    def start(self) -> ImageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()

    def handle_error(self, request, client_address) -> None:
        """Clients that gave up (timeouts) close their end: not worth a traceback."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def hit(self, path: str) -> None:
        with self._lock:
            self.hits[path] += 1


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ImageServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # silence
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "image/jpeg", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        srv = self.server
        srv.hit(path)
        good = image_bytes("good", "jpg")
        if path.startswith("/img/"):
            name, _, ext = path[len("/img/"):].rpartition(".")
            if ext not in MIME or not name:
                return self._send(404, b"not found", "text/plain")
            return self._send(200, image_bytes(name, ext), MIME[ext])
        if path.startswith("/hold/"):
            srv.release.wait(srv.hold_max_s)
            return self._send(200, image_bytes(path, "jpg"))
        if path == "/404":
            return self._send(404, b"not found", "text/plain")
        if path == "/500":
            return self._send(500, b"oops", "text/plain")
        if path == "/slow.jpg":
            time.sleep(srv.slow_s)
            return self._send(200, good)
        if path == "/redirect.jpg":
            return self._send(302, b"", "text/plain", {"Location": "/img/redirected.jpg"})
        if path == "/html.jpg":
            return self._send(200, b"<!DOCTYPE html><html><body>Not an image</body></html>")
        if path == "/truncated.jpg":
            return self._send(200, good[: len(good) // 2])
        if path == "/empty.jpg":
            return self._send(200, b"")
        if path == "/bomb.png":
            return self._send(200, bomb_png(), "image/png")
        if path == "/optout.jpg":
            return self._send(200, good, headers={"X-Robots-Tag": "noai"})
        if path == "/flaky.jpg":
            if srv.flaky_ok:
                return self._send(200, image_bytes("flaky", "jpg"))
            return self._send(503, b"busy", "text/plain")
        return self._send(404, b"not found", "text/plain")


EXPECTED = {
    "img/a.jpg": None, "img/b.png": None, "img/c.webp": None, "redirect.jpg": None,
    "404": "http_404", "500": "http_5xx", "slow.jpg": "timeout", "html.jpg": "not_an_image",
    "truncated.jpg": "decode_error", "empty.jpg": "empty_body", "bomb.png": "too_large",
    "optout.jpg": "opted_out", "flaky.jpg": "http_5xx",
}
"""Route -> the reason the download stage must record (None: ok)."""
