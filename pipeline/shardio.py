"""The one reader and writer of shard files: WebDataset tars and parquet manifests, on any fsspec URL.

Tars. A sample is the members sharing a key up to the first dot of the file name (`000420017.jpg`,
`000420017.txt`, `000420017.json`), stored next to each other, as img2dataset and webdataset write them.
- Reading never trusts a member name: an absolute name, a `..` or `.` component, a backslash or control
  character, a symlink, hard link, device or FIFO never becomes a key or a file name; the reader yields an
  error sample (`error_reason="unsafe_member"`, a neutral key `unsafe-<position>`) in its place, so the
  stage records a row and writes nothing under that name. A truncated or corrupt tar yields the samples
  read so far, then one `truncated_input` error sample. A key seen again after another key is
  `duplicate_key`. Members whose key starts with `_` (webdataset's metadata) and directories are skipped.
- Writing is deterministic: members in the order given, fixed mtime/owner/mode, POSIX headers (a PAX
  header only where a name needs one), so the same samples give the same bytes on every rerun.

Parquet. `write_manifest` writes rows through a stage's declared pyarrow schema (an unknown column or a
missing required one is a bug, raised at once); `read_manifest` reads any local or remote parquet.
`open_url` is the one way to open a URL (local path, file://, s3://, ...).
"""

from __future__ import annotations

import datetime
import functools
import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from pipeline.errors import PipelineError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
READ_BUFFER = 1 << 20
TAR_MTIME = 946_684_800
"""Every written member's mtime: 2000-01-01T00:00:00Z (an int: a float would cost a PAX header)."""
TAR_MODE = 0o644

ERR_UNSAFE = "unsafe_member"
ERR_TRUNCATED = "truncated_input"
ERR_DUPLICATE = "duplicate_key"

_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")
MAX_KEY_LEN = 512


class InputShardError(PipelineError):
    """An input shard that cannot be opened at all."""


# -- opening ------------------------------------------------------------------------------------

def is_local_url(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def url_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path) of a local path or URL: the one way the pipeline reaches a filesystem."""
    if url.startswith(("s3://", "s3a://")):
        fast_s3_timestamps()
    return url_to_fs(url, **(storage_options or {}))


@functools.cache
def fast_s3_timestamps() -> None:
    """Parse S3's ISO-8601 timestamps with the standard library instead of dateutil in the botocore clients made
    from now on: a listing carries one per object, and dateutil's general parser was ~10% of the CPU of a
    10,000-shard `status` on S3. Anything it does not recognise goes to botocore's own parser."""
    try:
        import botocore.parsers as parsers
    except ImportError:
        return
    general = parsers.DEFAULT_TIMESTAMP_PARSER

    def parse(value: Any) -> Any:
        if isinstance(value, str) and len(value) >= 20 and value.endswith("Z") and value[10] == "T":
            try:
                return datetime.datetime.fromisoformat(value[:-1]).replace(tzinfo=datetime.timezone.utc)
            except ValueError:
                pass
        return general(value)

    parsers.DEFAULT_TIMESTAMP_PARSER = parse


def open_url(url: str, mode: str = "rb", storage_options: dict[str, Any] | None = None) -> IO:
    """Open a local path or fsspec URL (buffered for streaming reads)."""
    if is_local_url(url):
        return open(url.removeprefix("file://"), mode, buffering=READ_BUFFER if "b" in mode else -1)
    fs, path = url_fs(url, storage_options)
    return fs.open(path, mode, block_size=READ_BUFFER)


# -- samples --------------------------------------------------------------------------------------

@dataclass
class Sample:
    """One WebDataset sample: its key and files by extension (no dot); or an error in place of a sample."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)
    error_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_reason is None

    @property
    def image_ext(self) -> str | None:
        return next((e for e in IMAGE_EXTS if e in self.files), None)

    @property
    def image(self) -> bytes | None:
        ext = self.image_ext
        return self.files[ext] if ext else None

    @property
    def meta(self) -> dict[str, Any]:
        """The sample's .json (img2dataset metadata), or {} if absent or unreadable."""
        raw = self.files.get("json")
        if not raw:
            return {}
        try:
            value = json.loads(raw)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, or None when the name is unsafe to use as a key or file name."""
    if not name or name.startswith("/") or _BAD_CHARS.search(name) or len(name) > MAX_KEY_LEN:
        return None
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    base = parts[-1]
    key, _, ext = base.partition(".")
    if not key:
        return None
    return "/".join([*parts[:-1], key]), ext


def safe_key(key: str) -> bool:
    """Whether a key may become a member name of a tar we write."""
    split = split_member_name(f"{key}.x")
    return split is not None and split[0] == key


class _Counting:
    """A read-only stream wrapper that counts the bytes read (to tell a tar cut at a member boundary from a
    complete one: tarfile reads both to their end without complaint)."""

    def __init__(self, raw: IO[bytes]):
        self.raw, self.count = raw, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        return data


def iter_tar(fileobj: IO[bytes], where: str = "") -> Iterator[Sample]:
    """Samples of a tar stream, in order, with error samples for unsafe members, repeated keys and truncation."""
    current: Sample | None = None
    seen: set[str] = set()
    position = 0
    counting = _Counting(fileobj)
    try:
        with tarfile.open(fileobj=counting, mode="r|*", bufsize=READ_BUFFER) as tar:  # type: ignore[call-overload]
            for member in tar:
                position += 1
                if member.isdir():
                    continue
                split = split_member_name(member.name)
                if not member.isfile() or split is None:
                    if current is not None:
                        yield current
                        current = None
                    kind = "a link" if member.issym() or member.islnk() else (
                        "not a regular file" if not member.isfile() else "an unsafe name")
                    yield Sample(key=f"unsafe-{position:06d}", error_reason=ERR_UNSAFE,
                                 error=f"member {member.name!r} is {kind}; skipped")
                    continue
                key, ext = split
                if not ext or key.rsplit("/", 1)[-1].startswith("_"):
                    continue
                if current is None or current.key != key:
                    if current is not None:
                        yield current
                    if key in seen:
                        current = None
                        yield Sample(key=f"duplicate-{position:06d}", error_reason=ERR_DUPLICATE,
                                     error=f"key {key!r} appears again after other keys; member {member.name!r} skipped")
                        continue
                    seen.add(key)
                    current = Sample(key=key)
                extracted = tar.extractfile(member)
                current.files[ext] = extracted.read() if extracted is not None else b""
            uncompressed = getattr(tar.fileobj, "comptype", "tar") == "tar"
            if uncompressed and position and counting.count < tar.offset + tarfile.BLOCKSIZE:
                raise tarfile.ReadError("the archive ends without its end-of-archive blocks")
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if current is not None:
            current = None  # its files may be incomplete: report it with the truncation, not as a sample
        yield Sample(key=f"truncated-{position:06d}", error_reason=ERR_TRUNCATED,
                     error=f"input shard {where} is truncated or corrupt after {position} member(s): "
                           f"{type(exc).__name__}: {exc}")
        return
    if current is not None:
        yield current


def read_samples(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[Sample]:
    """Samples of the tar at `url` (local path or fsspec URL), streamed."""
    try:
        f = open_url(url, "rb", storage_options)
    except FileNotFoundError:
        raise InputShardError(f"input shard {url} does not exist") from None
    with f:
        yield from iter_tar(f, url)


class TarWriter:
    """A deterministic WebDataset tar writer: `write(key, {ext: bytes})` in the order samples should appear."""

    def __init__(self, path: str):
        self._file = open(path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.count = 0

    def write(self, key: str, files: dict[str, bytes] | Iterable[tuple[str, bytes]]) -> None:
        if not safe_key(key):
            raise ValueError(f"refusing to write a tar member under the unsafe key {key!r}")
        items = files.items() if isinstance(files, dict) else files
        for ext, data in items:
            if not ext or "/" in ext or _BAD_CHARS.search(ext):
                raise ValueError(f"refusing to write a tar member with extension {ext!r}")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = TAR_MTIME
            info.mode = TAR_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_tar(path: str, samples: Iterable[tuple[str, Iterable[tuple[str, bytes]]]]) -> int:
    """Write (key, [(ext, bytes), ...]) samples in order; returns the number written."""
    with TarWriter(path) as w:
        for key, members in samples:
            w.write(key, members)
        return w.count


# -- parquet manifests ----------------------------------------------------------------------------

class SchemaError(PipelineError):
    """Rows or a table that do not match a stage's declared manifest schema."""


def rows_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows as a table of exactly `schema`; a column the schema does not declare is an error."""
    names = set(schema.names)
    for r in rows:
        unknown = set(r) - names
        if unknown:
            raise SchemaError(f"row has column(s) {', '.join(sorted(unknown))} that the manifest schema does not declare")
    try:
        table = pa.Table.from_pylist([{n: r.get(n) for n in schema.names} for r in rows], schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SchemaError(f"rows do not fit the manifest schema: {exc}") from None
    for f in schema:
        if not f.nullable and table.column(f.name).null_count:
            raise SchemaError(f"column {f.name} is declared non-null but {table.column(f.name).null_count} row(s) lack it")
    return table


def check_table(table: pa.Table, schema: pa.Schema, allow_extra: bool = False) -> pa.Table:
    """`table` with every declared column present with its declared type (cast where safe), in schema order
    (extra columns after them when allowed)."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise SchemaError(f"manifest lacks declared column(s) {', '.join(missing)}")
    extra = [c for c in table.column_names if c not in schema.names]
    if extra and not allow_extra:
        raise SchemaError(f"manifest has undeclared column(s) {', '.join(extra)}")
    cols, fields = [], []
    for f in schema:
        col = table.column(f.name)
        if not col.type.equals(f.type):
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaError(f"column {f.name} is {col.type}, declared {f.type}: {exc}") from None
        if not f.nullable and col.null_count:
            raise SchemaError(f"column {f.name} is declared non-null but has {col.null_count} null(s)")
        cols.append(col)
        fields.append(f)
    for c in extra:
        cols.append(table.column(c))
        fields.append(table.schema.field(c))
    return pa.Table.from_arrays(cols, schema=pa.schema(fields, metadata=schema.metadata))


def write_manifest(rows: list[dict[str, Any]] | pa.Table, schema: pa.Schema, path: str,
                   allow_extra: bool = False) -> pa.Table:
    """Write rows (dicts) or a table as parquet through the declared schema; same rows -> same bytes."""
    table = rows_table(rows, schema) if isinstance(rows, list) else check_table(rows, schema, allow_extra)
    pq.write_table(table, path, compression="zstd", write_statistics=True)
    return table


def read_table(url: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """A parquet file at a local path or fsspec URL."""
    with open_url(url, "rb", storage_options) as f:
        return pq.read_table(f)


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """All rows of a parquet file at a local path or fsspec URL."""
    return read_table(url, storage_options).to_pylist()


def read_optional_manifest(url: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]] | None:
    """Like read_manifest, but None if the file does not exist."""
    try:
        return read_manifest(url, storage_options)
    except FileNotFoundError:
        return None


def json_fields(schema: pa.Schema) -> tuple[str, ...]:
    """The schema fields marked for a sample's .json (field metadata {"json": "1"})."""
    return tuple(f.name for f in schema if (f.metadata or {}).get(b"json") == b"1")
