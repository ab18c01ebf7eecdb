"""Image shards, the download stage's outputs: a deterministic WebDataset tar and a per-row parquet manifest.

    images/00042.tar       <key>.<jpg|png|webp>, <key>.txt (caption, when configured), <key>.json per ok row
    images/00042.parquet   one row per INPUT row: key, index, url, status ok/error, error reason, sizes,
                           sha256 of the downloaded bytes, caption, extra columns, provenance

The tar is a pure function of its samples: members in key order, fixed mtime/owner/mode, USTAR
headers, JSON with sorted keys. A rerun that fetches the same bytes writes the same tar, and a
retry that keeps a sample copies its members byte for byte.
"""

from __future__ import annotations

import heapq
import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.shards import sample_key

TAR_MTIME = 946_684_800
"""Every member's mtime: 2000-01-01T00:00:00Z, so tars do not depend on when they were written."""

RESERVED = (
    "key", "index", "url", "status", "error", "error_message", "width", "height", "original_width",
    "original_height", "sha256", "bytes", "format", "caption", "exif", "pipeline_version", "downloaded_at",
)
"""Manifest columns the stage writes itself; extra input columns may not use these names."""

Sample = tuple[str, list[tuple[str, bytes]]]
"""(key, [(extension, bytes), ...]) in member order."""


def write_tar(path: str, samples: Iterable[Sample]) -> int:
    """Write samples (sorted by key by the caller) into a reproducible tar; returns the number of samples."""
    n = 0
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = TAR_MTIME
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
            n += 1
    return n


def read_tar(fileobj: IO[bytes]) -> Iterator[Sample]:
    """Samples of a WebDataset tar, grouped by key (the part of a member name before its first dot)."""
    key: str | None = None
    members: list[tuple[str, bytes]] = []
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            k, _, ext = info.name.rsplit("/", 1)[-1].partition(".")
            f = tar.extractfile(info)
            data = f.read() if f is not None else b""
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, []
            members.append((ext, data))
    if key is not None:
        yield key, members


def sample_json(meta: dict[str, Any]) -> bytes:
    """The <key>.json member: sorted keys, so equal metadata gives equal bytes."""
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str).encode()


def extra_columns(table: pa.Table) -> list[str]:
    """The carried-through input columns of a manifest or input slice (everything not reserved)."""
    return [c for c in table.column_names if c not in RESERVED]


def build(
    shard: int,
    inputs: pa.Table,
    results: pa.Table,
    encode_format: str,
    provenance: dict[str, str],
) -> tuple[pa.Table, Iterator[Sample]]:
    """Manifest rows and (lazily built, key-ordered) tar samples for `inputs` and their fetch results.

    `inputs` has index, url, [caption] and extra columns; `results` (pipeline.fetch.RESULT_SCHEMA) holds one
    row per input row with the same `row` values as the inputs' `index`, both sorted.
    """
    index = inputs.column("index").to_pylist()
    if results.column("row").to_pylist() != index:
        raise ValueError("fetch results do not line up with the input rows")
    n = inputs.num_rows
    has_caption = "caption" in inputs.column_names
    extras = extra_columns(inputs)
    keys = [sample_key(shard, i) for i in index]
    ok = [s == "ok" for s in results.column("status").to_pylist()]
    sizes = pc.binary_length(results.column("image"))
    columns: dict[str, pa.Array | pa.ChunkedArray] = {
        "key": pa.array(keys, pa.string()),
        "index": pa.array(index, pa.int32()),
        "url": inputs.column("url"),
        "status": results.column("status"),
        "error": results.column("error"),
        "error_message": results.column("error_message"),
        **{c: results.column(c) for c in ("width", "height", "original_width", "original_height", "sha256")},
        "bytes": sizes.cast(pa.int64()),
        "format": pa.array([encode_format if good else None for good in ok], pa.string()),
    }
    if has_caption:
        columns["caption"] = inputs.column("caption")
    for c in extras:
        columns[c] = inputs.column(c)
    columns["exif"] = results.column("exif")
    for name, value in provenance.items():
        columns[name] = pa.array([value] * n, pa.string())

    def samples() -> Iterator[Sample]:
        meta_cols = ("width", "height", "original_width", "original_height", "sha256")
        res = {c: results.column(c).to_pylist() for c in meta_cols}
        urls = inputs.column("url").to_pylist()
        extra_values = {c: inputs.column(c).to_pylist() for c in extras}
        captions = inputs.column("caption").to_pylist() if has_caption else []
        images = results.column("image")
        for i in (i for i in range(n) if ok[i]):
            meta = {"key": keys[i], "url": urls[i], "status": "ok", **{c: res[c][i] for c in meta_cols},
                    **{c: extra_values[c][i] for c in extras}}
            members = [(encode_format, images[i].as_py())]
            if has_caption:
                meta["caption"] = captions[i]
                members.append(("txt", ("" if captions[i] is None else str(captions[i])).encode()))
            members.append(("json", sample_json(meta)))
            yield keys[i], members

    return pa.table(columns), samples()


def merge_samples(*streams: Iterable[Sample]) -> Iterator[Sample]:
    """Key-ordered samples from key-ordered streams (kept samples and redone ones)."""
    return heapq.merge(*streams, key=lambda sample: sample[0])


def merge(old: pa.Table, new: pa.Table) -> pa.Table:
    """Old manifest rows whose index is not in `new`, plus `new` (cast to the old schema), sorted by index."""
    redone = set(new.column("index").to_pylist())
    keep = old.filter(pa.array([i not in redone for i in old.column("index").to_pylist()]))
    return pa.concat_tables([keep, new.select(old.column_names).cast(old.schema)]).sort_by("index")
