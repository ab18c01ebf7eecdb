"""Fetch a list of (row, url) with img2dataset's downloader, resizer and writer; one result row per input row.

img2dataset does the HTTP fetching (urllib, X-Robots-Tag opt-outs, user agent token), resizing and
encoding. We drive its `Downloader` directly on sub-shards of our shard (one feather file each, in a
local work folder), in this process (processes=1) or in a spawned worker pool kept across shards,
so the per-call start-up of `img2dataset.download` (a logger process and a fresh pool importing
cv2/albumentations: seconds) is paid once per run, not once per shard. Its `ParquetSampleWriter`
output (image bytes + metadata per sample) is read back and returned as one arrow table.

Before img2dataset decodes a body, `GuardedResizer` rejects what it should never decode: empty
bodies, HTML/text served as images, truncated files, and decompression bombs (dimensions read from
the header, so a tiny file declaring 50,000 x 50,000 pixels is refused before any allocation).
"""

from __future__ import annotations

import atexit
import hashlib
import io
import math
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.pool import Pool
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would call PyPI on import

import img2dataset.downloader as _i2d_downloader  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from img2dataset.downloader import Downloader  # noqa: E402
from img2dataset.resizer import Resizer  # noqa: E402
from img2dataset.writer import ParquetSampleWriter  # noqa: E402
from PIL import Image  # noqa: E402

warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

TRANSIENT = frozenset({"timeout", "http_5xx", "http_429", "connection_error", "connection_refused"})
"""Failure reasons worth another attempt within the same run."""

REASONS = (
    "http_404", "http_5xx", "http_429", "http_4xx", "http_other", "timeout", "connection_refused",
    "connection_error", "dns_error", "ssl_error", "invalid_url", "opted_out", "empty_body", "not_an_image",
    "decode_error", "too_small", "too_large", "bad_aspect_ratio", "other",
)
_CODE_RE = re.compile(r"^([a-z0-9_]+): ")


@dataclass(frozen=True)
class FetchOptions:
    """Everything img2dataset needs to fetch and encode one batch of URLs."""

    image_size: int = 512
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_image_area: float = float("inf")
    max_aspect_ratio: float = float("inf")
    max_decode_pixels: int = 89_478_485
    extract_exif: bool = False
    timeout_s: float = 10.0
    threads: int = 32
    processes: int = 1
    user_agent_token: str | None = "caprl-pipeline"
    disallowed_header_directives: tuple[str, ...] = field(default=("noai", "noimageai", "noindex", "noimageindex"))


# -- guarding the decoder ---------------------------------------------------------------------

def sniff(data: bytes) -> str | None:
    """The image container from its magic bytes (jpeg/png/gif/webp/bmp/tiff), or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def precheck(data: bytes, max_pixels: float) -> str | None:
    """Why a body must not be decoded ('reason: detail'), or None if it may go to the resizer."""
    if not data:
        return "empty_body: the server sent 0 bytes"
    kind = sniff(data)
    if kind is None:
        head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
        if head.startswith(b"<"):
            what = "HTML" if b"html" in head else "XML/markup"
            return f"not_an_image: the body is {what} ({len(data)} bytes)"
        if _is_text(data[:512]):
            return f"not_an_image: the body is text ({len(data)} bytes)"
        return None  # unknown binary: let the decoder try (it reports decode errors itself)
    truncated = _truncated(kind, data)
    if truncated:
        return f"decode_error: truncated {kind.upper()} ({truncated})"
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError as exc:
        return f"too_large: {exc}"
    except Exception as exc:  # noqa: BLE001 - an unreadable header is a decode error
        return f"decode_error: unreadable {kind.upper()} header: {exc}"
    if width * height > max_pixels:
        return f"too_large: {width}x{height} = {width * height} pixels exceeds the limit of {int(max_pixels)}"
    return None


def _is_text(chunk: bytes) -> bool:
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(b >= 9 for b in chunk)


def _truncated(kind: str, data: bytes) -> str | None:
    """A short description of a missing file end, or None when the container looks complete."""
    if kind == "jpeg" and b"\xff\xd9" not in data[-1024:]:
        return "no end-of-image marker"
    if kind == "png" and b"IEND" not in data[-64:]:
        return "no IEND chunk"
    if kind == "gif" and b";" not in data[-16:]:
        return "no trailer"
    if kind == "webp" and len(data) < int.from_bytes(data[4:8], "little") + 8:
        return f"{len(data)} of {int.from_bytes(data[4:8], 'little') + 8} bytes"
    return None


class GuardedResizer(Resizer):
    """img2dataset's Resizer behind `precheck`: bad bodies fail with a reason instead of being decoded."""

    def __init__(self, *args: Any, max_decode_pixels: float = 89_478_485, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_decode_pixels = min(float(max_decode_pixels), float(self.max_image_area))

    def __call__(self, img_stream, blurring_bbox_list=None):  # noqa: D102 - img2dataset's signature
        img_stream.seek(0)
        reason = precheck(img_stream.getvalue(), self.max_decode_pixels)
        if reason is not None:
            return None, None, None, None, None, reason
        img_stream.seek(0)
        return super().__call__(img_stream, blurring_bbox_list)


# -- classifying failures -------------------------------------------------------------------

def classify(message: str | None) -> str | None:
    """A short reason code for an img2dataset error message (None for success)."""
    if message is None:
        return None
    m = _CODE_RE.match(message)
    if m and m.group(1) in REASONS:
        return m.group(1)
    text = message.lower()
    http = re.search(r"http error (\d{3})", text)
    if http:
        code = int(http.group(1))
        if code == 404:
            return "http_404"
        if code == 429:
            return "http_429"
        if 500 <= code < 600:
            return "http_5xx"
        return "http_4xx" if 400 <= code < 500 else "http_other"
    if "x-robots-tag" in text:
        return "opted_out"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if "connection refused" in text:
        return "connection_refused"
    if "name or service not known" in text or "getaddrinfo" in text or "nodename nor servname" in text:
        return "dns_error"
    if "ssl" in text or "certificate" in text:
        return "ssl_error"
    if any(s in text for s in ("unknown url type", "no host given", "invalid url", "control characters")):
        return "invalid_url"
    if any(s in text for s in ("remote end closed", "incompleteread", "connection reset", "urlopen error",
                               "broken pipe", "connection aborted")):
        return "connection_error"
    if "image too small" in text:
        return "too_small"
    if "area too large" in text:
        return "too_large"
    if "aspect ratio too large" in text:
        return "bad_aspect_ratio"
    if "!buf.empty()" in text:
        return "empty_body"
    if "decod" in text or "imdecode" in text or "cv2" in text or "opencv" in text:
        return "decode_error"
    return "other"


# -- running img2dataset ----------------------------------------------------------------------

_POOLS: dict[int, Pool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(processes: int) -> Pool:
    """A spawned worker pool of `processes` workers, started once per process and reused by every shard and run.

    Spawn, as img2dataset does (fork is unsafe with threads). Workers import cv2/albumentations, which
    takes seconds, so the pool outlives a shard; it is terminated at exit, and each worker exits on its
    own if this process dies (SIGKILL included).
    """
    with _POOLS_LOCK:
        pool = _POOLS.get(processes)
        if pool is None:
            pool = get_context("spawn").Pool(processes, initializer=_watch_parent, initargs=(os.getpid(),))
            _POOLS[processes] = pool
        return pool


@atexit.register
def close_pools() -> None:
    """Terminate the shared pools (also runs at interpreter exit)."""
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.terminate()
            pool.join()
        _POOLS.clear()


def _watch_parent(parent: int) -> None:
    """Pool initializer: exit the worker when the process that started it is gone."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def make_downloader(opts: FetchOptions, out_dir: str, sub_size: int) -> Downloader:
    """img2dataset's Downloader writing per-sub-shard parquet files (image bytes + metadata) into out_dir."""
    resizer = GuardedResizer(
        image_size=opts.image_size,
        resize_mode=opts.resize_mode,
        resize_only_if_bigger=opts.resize_only_if_bigger,
        encode_quality=opts.encode_quality,
        encode_format=opts.encode_format,
        min_image_size=opts.min_image_size,
        max_image_area=opts.max_image_area,
        max_aspect_ratio=opts.max_aspect_ratio,
        max_decode_pixels=opts.max_decode_pixels,
    )
    directives = list(opts.disallowed_header_directives) or None
    return Downloader(
        sample_writer_class=ParquetSampleWriter,
        resizer=resizer,
        thread_count=opts.threads,
        save_caption=False,
        extract_exif=opts.extract_exif,
        output_folder=out_dir,
        column_list=["row", "url"],
        timeout=opts.timeout_s,
        number_sample_per_shard=max(sub_size, 2),
        oom_shard_count=5,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format=opts.encode_format,
        retries=0,
        user_agent_token=opts.user_agent_token,
        disallowed_header_directives=directives,
    )


class FetchError(RuntimeError):
    """img2dataset failed on a whole sub-shard (not a per-URL failure)."""


class FetchAborted(Exception):
    """Raised inside img2dataset's URL feeder when the shard it feeds was abandoned (SIGTERM, Ctrl-C)."""


class _AbortableSemaphore(threading.Semaphore):
    """img2dataset's per-shard admission semaphore, able to give up.

    img2dataset feeds its thread pool from a generator that blocks on this semaphore (at most 2 x threads
    samples in flight). If the consumer stops (a signal interrupts the shard), the feeder blocks forever
    and the thread pool's shutdown joins it forever. When the semaphore is created in a thread that carries
    an `abort_fetch` event (see `_call_abortable`), a set event makes the blocked feeder raise instead, so
    the pool shuts down. Elsewhere (spawned workers, which die with their pool) it is a plain semaphore.
    """

    def __init__(self, value: int = 1):
        super().__init__(value)
        self._abort: threading.Event | None = getattr(threading.current_thread(), "abort_fetch", None)

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        if self._abort is None or not blocking or timeout is not None:
            return super().acquire(blocking, timeout)
        while not super().acquire(timeout=0.2):
            if self._abort.is_set():
                raise FetchAborted("the shard was abandoned")
        return True

    __enter__ = acquire


_i2d_downloader.Semaphore = _AbortableSemaphore  # the name img2dataset 1.47's download_shard uses


def _call_abortable(downloader: Downloader, task: tuple[int, str]) -> tuple[bool, Any]:
    """Run downloader(task) in a helper thread; a signal in this (main) thread abandons it cleanly."""
    abort = threading.Event()
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", downloader(task)), daemon=True,
                              name=f"img2dataset-{task[0]}")
    thread.abort_fetch = abort  # type: ignore[attr-defined] - read by _AbortableSemaphore
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except BaseException:
        abort.set()
        raise
    return result.get("value", (False, task))


RESULT_SCHEMA = pa.schema([
    ("row", pa.int64()), ("status", pa.string()), ("error", pa.string()), ("error_message", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32()),
    ("sha256", pa.string()), ("exif", pa.string()), ("image", pa.binary()),
])


def fetch(rows: list[int], urls: list[str | None], opts: FetchOptions, work_dir: str, pool: Pool | None = None) -> pa.Table:
    """Fetch urls[i] for row rows[i]; returns RESULT_SCHEMA with exactly one row per input, sorted by row."""
    invalid = [(r, u) for r, u in zip(rows, urls, strict=True) if not _plausible(u)]
    todo = [(r, u) for r, u in zip(rows, urls, strict=True) if _plausible(u)]
    tables = [_error_rows(invalid, "invalid_url", "invalid_url: not an absolute URL: {!r}")] if invalid else []
    if todo:
        fetched = _run_img2dataset(todo, opts, work_dir, pool)
        seen = set(fetched.column("row").to_pylist())
        lost = [(r, u) for r, u in todo if r not in seen]  # a sample img2dataset failed to record
        tables += [fetched, _error_rows(lost, "other", "other: img2dataset recorded no result for {}")]
    if not tables:
        return RESULT_SCHEMA.empty_table()
    out = pa.concat_tables(tables).sort_by("row")
    if out.column("row").to_pylist() != sorted(rows):
        raise FetchError(f"img2dataset returned {out.num_rows} results for {len(rows)} URLs")
    return out


def _plausible(url: str | None) -> bool:
    return isinstance(url, str) and "://" in url


def _error_rows(pairs: list[tuple[int, str | None]], reason: str, template: str) -> pa.Table:
    """Failure records for rows that never reached (or never came back from) img2dataset."""
    n = len(pairs)
    return pa.table({
        "row": pa.array([r for r, _ in pairs], pa.int64()),
        "status": pa.array(["error"] * n, pa.string()),
        "error": pa.array([reason] * n, pa.string()),
        "error_message": pa.array([template.format(u) for _, u in pairs], pa.string()),
        **{name: pa.nulls(n, RESULT_SCHEMA.field(name).type) for name in RESULT_SCHEMA.names[4:]},
    }, schema=RESULT_SCHEMA)


def _run_img2dataset(todo: list[tuple[int, str]], opts: FetchOptions, work_dir: str, pool: Pool | None) -> pa.Table:
    parts = max(1, min(opts.processes if pool is not None else 1, len(todo)))
    sub_size = math.ceil(len(todo) / parts)
    in_dir, out_dir = os.path.join(work_dir, "in"), os.path.join(work_dir, "out")
    os.makedirs(in_dir, exist_ok=True)
    os.makedirs(out_dir, exist_ok=True)
    tasks = []
    for j in range(parts):
        chunk = todo[j * sub_size : (j + 1) * sub_size]
        table = pa.table({"row": pa.array([r for r, _ in chunk], pa.int64()),
                          "url": pa.array([u for _, u in chunk], pa.string())})
        path = os.path.join(in_dir, f"{j}.feather")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        tasks.append((j, path))
    downloader = make_downloader(opts, out_dir, sub_size)
    if pool is not None:
        results = pool.map(downloader, tasks, chunksize=1)
    else:
        results = [_call_abortable(downloader, t) for t in tasks]
    failed = [row[0] for ok, row in results if not ok]
    if failed:
        raise FetchError(f"img2dataset failed on sub-shard(s) {failed} (see its traceback above)")
    return pa.concat_tables([_normalize(pq.read_table(os.path.join(out_dir, f"{j:05d}.parquet")), opts)
                             for j, _ in tasks])


def image_sha256(data: bytes | None) -> str | None:
    """The one definition of an image's sha256 in every manifest (images, qa, captions): of its bytes as stored
    in the shard's tar (after resizing and encoding), not of the bytes the server sent."""
    return None if data is None else hashlib.sha256(data).hexdigest()


def _normalize(t: pa.Table, opts: FetchOptions) -> pa.Table:
    """img2dataset's per-sample table -> RESULT_SCHEMA (status ok/error, classified reason)."""
    n = t.num_rows
    messages = t.column("error_message").to_pylist()
    ok = [s == "success" for s in t.column("status").to_pylist()]
    reasons = [None if good else (classify(m) or "other") for good, m in zip(ok, messages, strict=True)]
    images = t.column(opts.encode_format)
    return pa.table({
        "row": t.column("row").cast(pa.int64()),
        "status": pa.array(["ok" if good else "error" for good in ok], pa.string()),
        "error": pa.array(reasons, pa.string()),
        "error_message": pa.array([None if good else (m or "unknown") for good, m in zip(ok, messages, strict=True)],
                                  pa.string()),
        **{c: t.column(c).cast(pa.int32()) for c in ("width", "height", "original_width", "original_height")},
        "sha256": pa.array([image_sha256(b) if good else None for good, b in zip(ok, images.to_pylist(), strict=True)],
                           pa.string()),
        "exif": t.column("exif").cast(pa.string()) if "exif" in t.column_names else pa.nulls(n, pa.string()),
        "image": images.cast(pa.binary()),
    }, schema=RESULT_SCHEMA)
