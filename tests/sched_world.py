"""The demo world set up for the scheduling tests: 18 scenes served on 127.0.0.1, shard_size 3 -> 6 shards,
and a manifest registering the plugin stages of tests/plugin_stages.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.demo import make_demo_data, serve_directory, write_url_list
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
    """A manifest for `root` with the fetch/digest plugin stages over `urls`."""
    data = {
        "name": "schedtest",
        "root": str(root),
        "shard_size": SHARD_SIZE,
        "stages": STAGES,
        "extra": {"fetch": {"urls": str(urls)}, **({"hold": hold} if hold else {})},
        "slurm": slurm or {},
        "storage_options": storage_options or {},
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def url_list(data_dir: Path, base_url: str, out: Path, broken: frozenset[int] = frozenset()) -> Path:
    """A URL list at `out` for the served world; rows in `broken` point at a missing file (a per-row error)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(write_url_list(data_dir, base_url)).to_pylist()
    for i in broken:
        rows[i]["url"] = f"{base_url}/images/missing_{i}.png"
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out


@dataclass
class World:
    data: Path
    base_url: str
    urls: Path


@pytest.fixture(scope="session")
def served_world(tmp_path_factory) -> World:
    """The demo scenes rendered once and served over HTTP on 127.0.0.1 for the whole session."""
    data = make_world(tmp_path_factory.mktemp("world"))
    with serve_directory(data) as base_url:
        yield World(data, base_url, url_list(data, base_url, data / "urls_ok.parquet"))
