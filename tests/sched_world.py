"""The demo world set up for the scheduling tests: 18 scenes served on 127.0.0.1 (with held URLs on demand),
shard_size 3 -> 6 shards, and a manifest with the demo's download settings plus the plugin stages of
tests/plugin_stages.py."""

from __future__ import annotations

import functools
import http.server
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.demo import DEMO_MANIFEST, make_demo_data, write_url_list
from tests.plugin_stages import STAGES

N_IMAGES = 18
SHARD_SIZE = 3
NUM_SHARDS = N_IMAGES // SHARD_SIZE


def make_world(data_dir: Path) -> Path:
    """Render the demo scenes once (deterministic)."""
    if not (data_dir / "world.parquet").exists():
        make_demo_data(data_dir, n_images=N_IMAGES, size=48)
    return data_dir


def write_manifest(path: Path, root: Path | str, urls: Path, hold: dict | None = None,
                   slurm: dict | None = None, storage_options: dict | None = None) -> Path:
    """A manifest for `root`: the demo manifest's download settings over `urls` (6 shards of 3 rows) and the
    plugin stages `fetch` and `digest`. Held URLs may wait for a minute: the fetch timeout allows it."""
    download = yaml.safe_load(DEMO_MANIFEST.read_text())["download"]
    data = {
        "name": "schedtest",
        "root": str(root),
        "shard_size": SHARD_SIZE,
        "stages": STAGES,
        "download": {**download, "urls": str(urls), "timeout_s": 90, "threads": 4},
        "extra": {"fetch": {"urls": str(urls)}, **({"hold": hold} if hold else {})},
        "slurm": slurm or {},
        "storage_options": storage_options or {},
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def url_list(data_dir: Path, base_url: str, out: Path, broken: frozenset[int] = frozenset()) -> Path:
    """A URL list at `out` for the served world; rows in `broken` point at a missing file (a per-row error)."""
    rows = pq.read_table(write_url_list(data_dir, base_url)).to_pylist()
    for i in broken:
        rows[i]["url"] = f"{base_url}/images/missing_{i}.png"
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out


class HoldServer(http.server.ThreadingHTTPServer):
    """Serves a directory on 127.0.0.1; `/hold/<token>/<path>` answers with <path> only once `release(token)`
    is called (or after `hold_max_s`): a deterministic slow URL that keeps a shard busy mid-way."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, directory: Path, hold_max_s: float = 90.0):
        super().__init__(("127.0.0.1", 0), functools.partial(_HoldHandler, directory=str(directory)))
        self.hold_max_s = hold_max_s
        self.events: dict[str, threading.Event] = {}
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def event(self, token: str) -> threading.Event:
        with self._lock:
            return self.events.setdefault(token, threading.Event())

    def release(self, token: str) -> None:
        self.event(token).set()


class _HoldHandler(http.server.SimpleHTTPRequestHandler):
    server: HoldServer

    def log_message(self, *args) -> None:  # silence
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        parts = self.path.split("/", 3)
        with self.server._lock:
            self.server.hits[self.path] += 1
        if len(parts) == 4 and parts[1] == "hold":
            self.server.event(parts[2]).wait(self.server.hold_max_s)
            self.path = "/" + parts[3]
        super().do_GET()


@dataclass
class World:
    data: Path
    server: HoldServer

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def urls(self, out: Path, broken: frozenset[int] = frozenset(), held: dict[int, str] | None = None) -> Path:
        """A URL list: rows in `broken` 404, rows in `held` wait for `server.release(token)`."""
        path = url_list(self.data, self.base_url, out, broken)
        if held:
            rows = pq.read_table(path).to_pylist()
            for i, token in held.items():
                rows[i]["url"] = rows[i]["url"].replace(self.base_url, f"{self.base_url}/hold/{token}")
            pq.write_table(pa.Table.from_pylist(rows), path)
        return path


@pytest.fixture(scope="session")
def served_world(tmp_path_factory) -> World:
    """The demo scenes rendered once and served over HTTP on 127.0.0.1 for the whole session."""
    data = make_world(tmp_path_factory.mktemp("world"))
    server = HoldServer(data)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield World(data, server)
    finally:
        for event in list(server.events.values()):
            event.set()
        server.shutdown()
        server.server_close()
