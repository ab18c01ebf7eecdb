"""Image shards, the download stage's outputs (rows and samples; the bytes are written by pipeline.shardio): a deterministic WebDataset tar and a per-row parquet manifest.

    images/00042.tar       <key>.<jpg|png|webp>, <key>.txt (caption, when configured), <key>.json per ok row
    images/00042.parquet   one row per INPUT row: key, index, url, status ok/error, error reason, sizes,
                           sha256 of the downloaded bytes, caption, extra columns, provenance

The tar (written by pipeline.shardio) is a pure function of its samples: members in key order, JSON
with sorted keys. A rerun that fetches the same bytes writes the same tar, and a
retry that keeps a sample copies its members byte for byte.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.shards import sample_key

RESERVED = (
    "key", "index", "url", "status", "error", "error_message", "width", "height", "original_width",
    "original_height", "sha256", "bytes", "format", "caption", "exif", "pipeline_version", "downloaded_at",
)
"""Manifest columns the stage writes itself; extra input columns may not use these names."""

Members = tuple[str, list[tuple[str, bytes]]]
"""One sample as (key, [(extension, bytes), ...]) in member order."""

IMAGE_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("index", pa.int32(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("sha256", pa.string()),
    pa.field("bytes", pa.int64()),
    pa.field("format", pa.string()),
    pa.field("exif", pa.string()),
    pa.field("pipeline_version", pa.string()),
    pa.field("downloaded_at", pa.string()),
])
"""ROOT/images/<shard>.parquet: one row per input row. The caption column and the carried-through input
columns (download.save_additional_columns) follow these."""


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
) -> tuple[pa.Table, Iterator[Members]]:
    """Manifest rows and (lazily built, key-ordered) tar samples for `inputs` and their fetch results.

    `inputs` has index, url, [caption] and extra columns; `results` (stages.download.fetch.RESULT_SCHEMA) holds one
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

    def samples() -> Iterator[Members]:
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


def merge_samples(*streams: Iterable[Members]) -> Iterator[Members]:
    """Key-ordered samples from key-ordered streams (kept samples and redone ones)."""
    return heapq.merge(*streams, key=lambda sample: sample[0])


def merge(old: pa.Table, new: pa.Table) -> pa.Table:
    """Old manifest rows whose index is not in `new`, plus `new` (cast to the old schema), sorted by index."""
    redone = set(new.column("index").to_pylist())
    keep = old.filter(pa.array([i not in redone for i in old.column("index").to_pylist()]))
    return pa.concat_tables([keep, new.select(old.column_names).cast(old.schema)]).sort_by("index")
