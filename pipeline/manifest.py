"""Parquet manifests: the schemas of per-shard manifests and deterministic writing/reading through fsspec."""

from __future__ import annotations

from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

CAPTION_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("image_ext", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("captions", pa.list_(pa.string())),
    pa.field("caption_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),
    pa.field("model", pa.string()),
    pa.field("model_id", pa.string()),
    pa.field("prompt_hash", pa.string()),
    pa.field("sampling", pa.string()),
    pa.field("pipeline_version", pa.string()),
    pa.field("timestamp", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_reason", pa.string()),
    pa.field("error", pa.string()),
    pa.field("attempts", pa.int32()),
    pa.field("quality", pa.float64()),
    pa.field("quality_questions", pa.int32()),
])
"""ROOT/captions/<shard>.parquet: one row per sample of the input shard, ok or error."""


def write_table(rows: list[dict[str, Any]], schema: pa.Schema, path: str) -> None:
    """Write rows (dicts with the schema's fields) as parquet; same rows -> same bytes."""
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
    pq.write_table(table, path, compression="zstd", write_statistics=True)


def read_rows(url: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """All rows of a parquet file at a local path or fsspec URL."""
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        return pq.read_table(f).to_pylist()


def read_optional_rows(url: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]] | None:
    """Like read_rows, but None if the file does not exist."""
    try:
        return read_rows(url, storage_options)
    except FileNotFoundError:
        return None
