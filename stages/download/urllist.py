"""URL lists: read parquet / csv / tsv / jsonl / txt lists (local or any fsspec URL) into one arrow table.

The table has a `url` column, a `caption` column when a caption column is configured, and the extra
columns under their own names, rows in input order (a folder of lists is read file by file, sorted by
name). The fingerprint is the sha256 of the list's bytes, so any edit to the list changes it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.shardio import url_fs

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")
_SUFFIXES = {
    ".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".txt": "txt", ".lst": "txt",
}


class InputError(PipelineError):
    """A URL list that is missing, unreadable or lacks the configured columns."""


@dataclass
class UrlList:
    """The rows of a URL list and where they came from."""

    table: pa.Table
    fingerprint: str
    files: list[str]
    format: str
    unused: list[str] = field(default_factory=list)
    """Columns of the list that are not read (neither url, caption nor a saved extra column), in list order."""

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


def detect_format(path: str, fmt: str = "auto") -> str:
    """The list format: the configured one, or guessed from the file suffix (.gz allowed)."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise InputError(f"unknown URL list format {fmt!r}; use one of {', '.join(FORMATS)}")
        return fmt
    name = path.lower().removesuffix(".gz")
    for suffix, found in _SUFFIXES.items():
        if name.endswith(suffix):
            return found
    raise InputError(
        f"cannot tell the format of URL list {path!r} from its name; set download.input_format "
        f"to one of {', '.join(FORMATS)}"
    )


def list_files(url: str, fmt: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, list[str], str]:
    """(filesystem, sorted file paths, format) of a URL list given as one file or a folder of files."""
    try:
        fs, path = url_fs(url, storage_options)
    except (ImportError, ValueError) as exc:
        raise InputError(f"cannot open URL list {url!r}: {exc}") from None
    try:
        if fs.isdir(path):
            names = sorted(p for p in fs.find(path) if not p.rsplit("/", 1)[-1].startswith(("_", ".")))
            if fmt == "auto":
                names = [p for p in names if _guess(p)]
                kinds = {_guess(p) for p in names}
                if len(kinds) > 1:
                    raise InputError(f"URL list folder {url!r} mixes formats {sorted(kinds)}; set download.input_format")
                fmt = kinds.pop() if kinds else "auto"
            else:
                names = [p for p in names if _guess(p) == fmt]
            if not names:
                raise InputError(f"URL list folder {url!r} holds no {fmt if fmt != 'auto' else 'URL list'} files")
            return fs, names, fmt
        if not fs.exists(path):
            raise InputError(f"URL list not found: {url}")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any backend error is a clear one-line input error
        raise InputError(f"cannot read URL list {url!r}: {type(exc).__name__}: {exc}") from None
    return fs, [path], detect_format(path, fmt)


def _guess(path: str) -> str | None:
    try:
        return detect_format(path)
    except InputError:
        return None


def identity(url: str, fmt: str = "auto", storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A cheap description of the list's files (path, size, mtime/etag) to tell if it changed without reading it."""
    fs, files, _ = list_files(url, fmt, storage_options)
    out = []
    for path in files:
        info = fs.info(path)
        stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
        out.append({"path": path, "size": int(info.get("size") or 0), "stamp": str(stamp)})
    return out


def read_url_list(
    url: str,
    fmt: str = "auto",
    url_col: str = "url",
    caption_col: str | None = None,
    extra_cols: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> UrlList:
    """Read and fingerprint a URL list once; columns renamed to url / caption, extras kept under their names."""
    fs, files, fmt = list_files(url, fmt, storage_options)
    digest = hashlib.sha256()
    tables = []
    unused: list[str] = []
    for path in files:
        try:
            blob = fs.cat_file(path)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot read URL list {path!r}: {type(exc).__name__}: {exc}") from None
        digest.update(hashlib.sha256(blob).digest())
        if path.lower().endswith(".gz"):
            try:
                blob = gzip.decompress(blob)
            except OSError as exc:
                raise InputError(f"URL list {path!r} is not valid gzip: {exc}") from None
        parsed = _parse(blob, fmt, path)
        read = {url_col, caption_col, *(extra_cols or [])}
        unused += [c for c in parsed.column_names if c not in read and c not in unused]
        tables.append(_select(parsed, path, fmt, url_col, caption_col, extra_cols or []))
    try:
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"the files of URL list {url!r} have incompatible columns: {exc}") from None
    return UrlList(table=table.combine_chunks(), fingerprint=digest.hexdigest(), files=files, format=fmt,
                   unused=unused)


def _parse(blob: bytes, fmt: str, path: str) -> pa.Table:
    try:
        if fmt == "parquet":
            return pq.read_table(io.BytesIO(blob))
        if fmt in ("csv", "tsv"):
            parse = pa_csv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
            return pa_csv.read_csv(io.BytesIO(blob), parse_options=parse)
        if fmt == "jsonl":
            return _read_jsonl(blob)
        if fmt == "txt":
            lines = [ln.strip() for ln in blob.decode("utf-8").splitlines()]
            return pa.table({"url": pa.array([ln for ln in lines if ln], pa.string())})
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - parser errors become one clear line
        raise InputError(f"cannot parse URL list {path!r} as {fmt}: {type(exc).__name__}: {exc}") from None
    raise InputError(f"unknown URL list format {fmt!r}")


def _read_jsonl(blob: bytes) -> pa.Table:
    """jsonl through pyarrow; nested values (lists, objects) stay as JSON text so any schema round-trips."""
    rows = []
    for n, line in enumerate(blob.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"line {n} is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise InputError(f"line {n} is not a JSON object")
        rows.append({k: json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v for k, v in obj.items()})
    if not rows:
        return pa_json.read_json(io.BytesIO(b'{"url": ""}\n')).slice(0, 0)
    return pa.Table.from_pylist(rows)


def _select(table: pa.Table, path: str, fmt: str, url_col: str, caption_col: str | None, extra: list[str]) -> pa.Table:
    """Keep url, caption and extras in that order; clear errors for missing columns."""
    if fmt == "txt":
        if caption_col or extra:
            raise InputError(f"URL list {path!r} is plain text: it has no caption or extra columns to read")
        return table
    have = table.column_names
    wanted = [(url_col, "url")] + ([(caption_col, "caption")] if caption_col else []) + [(c, c) for c in extra]
    missing = [src for src, _ in wanted if src not in have]
    if missing:
        raise InputError(
            f"URL list {path!r} has no column(s) {', '.join(map(repr, missing))}; its columns are: {', '.join(have)}"
        )
    columns, names = [], []
    for src, dst in wanted:
        col = table.column(src)
        if dst in ("url", "caption") and not pa.types.is_string(col.type):
            col = col.cast(pa.string())
        columns.append(col)
        names.append(dst)
    return pa.table(columns, names=names)


def num_shards(num_rows: int, shard_size: int) -> int:
    """How many shards `num_rows` rows make at `shard_size` rows each."""
    return -(-num_rows // shard_size)


def shard_slice(table: pa.Table, shard: int, shard_size: int) -> pa.Table:
    """Rows [shard*shard_size, (shard+1)*shard_size) of the list."""
    return table.slice(shard * shard_size, shard_size)
