"""Roots of many committed shards made from one real shard, and counters of storage requests.

Used by tests/test_scale.py (20 vs 200 shards) and tools/bench_scale.py (100 to 100,000 shards).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

from pipeline.markers import concurrently
from pipeline.shards import shard_name
from pipeline.stage import marker_digest
from pipeline.storage import Storage

LOCAL_CALLS = ("ls", "info", "cat_file", "_open", "find", "exists", "size", "pipe_file", "rm", "rm_file",
               "put_file", "get_file", "glob", "mv", "cp_file", "makedirs", "mkdir")
"""LocalFileSystem methods counted as one storage request each (outermost calls only)."""


@contextlib.contextmanager
def count_local_calls() -> Iterator[Counter]:
    """Count the fsspec LocalFileSystem calls made inside the block (nested calls count once)."""
    from fsspec.implementations.local import LocalFileSystem

    counts: Counter = Counter()
    depth = threading.local()
    originals = {name: getattr(LocalFileSystem, name) for name in LOCAL_CALLS}

    def wrap(name: str, fn: Any) -> Any:
        def counted(self: Any, *a: Any, **kw: Any) -> Any:
            level = getattr(depth, "n", 0)
            if level == 0:
                counts[name] += 1
            depth.n = level + 1
            try:
                return fn(self, *a, **kw)
            finally:
                depth.n = level

        return counted

    for name, fn in originals.items():
        setattr(LocalFileSystem, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(LocalFileSystem, name, fn)


@contextlib.contextmanager
def count_s3_requests() -> Iterator[Counter]:
    """Count the S3 API requests s3fs sends inside the block, by operation (GetObject, ListObjectsV2, ...)."""
    from s3fs import S3FileSystem

    counts: Counter = Counter()
    original = S3FileSystem._call_s3

    async def counted(self: Any, method: str, *a: Any, **kw: Any) -> Any:
        counts[method] += 1
        return await original(self, method, *a, **kw)

    S3FileSystem._call_s3 = counted
    try:
        yield counts
    finally:
        S3FileSystem._call_s3 = original


def _rename(rel: str, old: str, new: str) -> str:
    folder, _, base = rel.rpartition("/")
    return f"{folder}/{base.replace(old, new, 1)}" if base.startswith(old) else rel


def clone_shards(storage: Storage, stages: list[str], count: int, source: int = 0, real_below: int | None = None,
                 workers: int = 32) -> None:
    """Make shards 0..count-1 of `stages` (in dependency order) committed copies of shard `source`: outputs
    copied under the new shard's names, markers rewritten (shard id, outputs, inputs and their digests) so
    that every clone is committed and current. Shard ids inside the files are not rewritten. With
    `real_below`, shards from that id on get small placeholder outputs instead of copies (their markers record
    the placeholders' sizes and sha256: the control plane sees the same files, at a fraction of the upload)."""
    src = shard_name(source)
    for stage in stages:
        marker = storage.marker(stage, source)
        if marker is None:
            raise ValueError(f"{stage} shard {source} is not committed under {storage.root_url}")
        blobs = {rel: storage.fs.cat_file(storage.path(rel)) for rel in marker["outputs"]}

        def one(k: int, stage: str = stage, marker: dict = marker, blobs: dict = blobs) -> None:
            name = shard_name(k)
            outputs = {}
            for rel, info in marker["outputs"].items():
                new_rel = _rename(rel, src, name)
                blob = blobs[rel] if real_below is None or k < real_below else f"placeholder {new_rel}\n".encode()
                storage.write_bytes(new_rel, blob)
                outputs[new_rel] = {**info, "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
            inputs = {}
            for key in marker.get("inputs", {}) or {}:
                up_stage, _, up_unit = key.partition("/")
                if up_unit == src:
                    up = storage.marker(up_stage, k)
                    inputs[f"{up_stage}/{name}"] = None if up is None else marker_digest(up)
                else:
                    inputs[key] = marker["inputs"][key]
            storage.write_json(storage.marker_rel(stage, k),
                               {**marker, "shard": k, "outputs": outputs, "inputs": inputs})

        concurrently(one, [k for k in range(count) if k != source], workers)
    meta = storage.run_meta() or {}
    storage.write_json("run.json", {**meta, "num_shards": max(count, int(meta.get("num_shards") or 0))})
