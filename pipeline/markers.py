"""The one reader of a root's unit records: commit markers (`_done`), failure records (`_failed`) and claims
(`_running`), by name for a task and concurrently for whole-root views.

Cost model (what keeps a task's control requests flat as a root grows):
- `get(stage, unit)` is one read by name; `get_many` reads a set of names concurrently (a batched `cat` on
  asynchronous file systems such as s3fs, a bounded thread pool elsewhere); `intact(markers)` checks the
  outputs a few markers list by name (one `info` per file, concurrently) and switches to one listing per output
  folder only when asked about many units. A task therefore reads its own units and the inputs they consume,
  never a whole stage.
- `all(stage)` (status, verify, retry, browse) lists the folder once and reads the markers it finds. With an
  index (`ROOT/_index/<folder>/<stage>.json.gz`) it reads only the markers that changed since: the index is a
  cache validated against that listing, entry by entry, never trusted over the markers: a marker missing from
  the listing is gone whatever the index says, a marker whose validator (ETag and size on object stores;
  size, mtime and inode locally) differs or that the index lacks is read afresh. The index is rewritten whole
  by one atomic write (PUT or rename) when it was out of date; two writers race to the last complete, valid
  copy and a stale copy only costs reads, so it cannot corrupt anything.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fsspec.asyn import AsyncFileSystem

log = logging.getLogger("pipeline.markers")

INDEX_DIR = "_index"
WORKERS = int(os.environ.get("PIPELINE_MARKER_WORKERS", "32") or 32)
"""Concurrent reads of a whole-root view (thread pool size; s3fs batches up to its own batch_size)."""
BY_NAME_LIMIT = 64
"""Up to this many output files are checked one by one (by name); beyond it, one listing per output folder."""

T = TypeVar("T")
R = TypeVar("R")


def as_unit(name: str) -> int | str:
    """A unit name as the runner and status key it: shard ids as ints, whole-run units by name."""
    return int(name) if name.isdigit() else name


def concurrently(fn: Callable[[T], R], items: Iterable[T], workers: int = WORKERS) -> list[R]:
    """fn over items in a bounded thread pool, results in order (sequential for one item)."""
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as pool:
        return list(pool.map(fn, items))


def one_request(fs: Any) -> dict[str, Any]:
    """`cat_file` options that make a whole-object read one GET: s3fs otherwise sends a HEAD first (to split
    large objects into concurrent ranges), two requests plus a listing for a missing key."""
    return {"max_concurrency": 1} if hasattr(fs, "max_concurrency") else {}


def cat_one(fs: Any, path: str) -> bytes:
    """One whole small object in one request (FileNotFoundError when absent)."""
    return fs.cat_file(path, **one_request(fs))


def read_blobs(fs: Any, paths: list[str], workers: int = WORKERS) -> dict[str, bytes | None]:
    """path -> bytes (None when missing or unreadable) for many paths, concurrently: one batched `cat` on an
    asynchronous file system (s3fs gathers the GETs), a thread pool otherwise."""
    if not paths:
        return {}
    if isinstance(fs, AsyncFileSystem) and len(paths) > 1:
        got = fs.cat(paths, on_error="return", **one_request(fs))
        return {p: (v if isinstance(v, bytes) else None) for p, v in ((p, got.get(p)) for p in paths)}

    def one(p: str) -> bytes | None:
        try:
            return cat_one(fs, p)
        except (FileNotFoundError, IsADirectoryError):
            return None
        except OSError as exc:  # a vanished or unreadable record counts as absent, loudly in debug
            log.debug("could not read %s: %s", p, exc)
            return None

    return dict(zip(paths, concurrently(one, paths, workers), strict=True))


def _parse(blob: bytes | None) -> dict[str, Any] | None:
    if blob is None:
        return None
    try:
        value = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a torn or foreign file is no record
    return value if isinstance(value, dict) else None


def validator(info: Mapping[str, Any]) -> str | None:
    """What changes whenever a file is rewritten, from a listing entry: ETag + size on object stores,
    size + mtime + inode locally; None when the backend gives neither (then nothing is cached)."""
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if etag:
        return f"{str(etag).strip(chr(34))}:{info.get('size')}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if mtime is not None:
        return f"{info.get('size')}:{mtime}:{info.get('ino', '')}"
    return None


def local_listing(folder: str) -> dict[str, str | None]:
    """name (without .json) -> validator for the *.json files of a local folder: one scandir (fsspec's local
    `ls` costs an `info` per entry, seconds at 10,000 markers)."""
    out: dict[str, str | None] = {}
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(".json") and not entry.name.startswith(".") and entry.is_file():
                    st = entry.stat()
                    out[entry.name[: -len(".json")]] = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return out


def output_sizes(fs: Any, root: str, is_local: bool, rel_dirs: Iterable[str]) -> dict[str, int]:
    """rel path -> size for every file under the given folders of a root (one listing per folder: a walk
    locally, a paginated listing on object stores, never a cached one)."""
    sizes: dict[str, int] = {}
    for rel_dir in rel_dirs:
        top = f"{root}/{rel_dir.strip('/')}"
        if is_local:
            for dirpath, _dirs, files in os.walk(top):
                rel_base = os.path.relpath(dirpath, root).replace(os.sep, "/")
                for name in files:
                    try:
                        sizes[f"{rel_base}/{name}"] = os.stat(os.path.join(dirpath, name)).st_size
                    except FileNotFoundError:
                        continue
            continue
        fs.invalidate_cache(top)
        try:
            entries = fs.find(top, detail=True)
        except FileNotFoundError:
            continue
        for path, info in entries.items():
            rel = path[len(root):].lstrip("/") if path.startswith(root) else path
            sizes[rel] = int(info.get("size") or 0)
    return sizes


class MarkerStore:
    """Unit records of one folder (`_done`, `_failed` or `_running`) of a root, keyed by stage and unit name.
    `write_bytes(rel, blob)` is the root's atomic write (used for the index only: markers are written by the
    commit protocol)."""

    def __init__(self, fs: Any, root: str, folder: str, is_local: bool,
                 write_bytes: Callable[[str, bytes], None], use_index: bool = False):
        self.fs = fs
        self.root = root
        self.folder = folder
        self.is_local = is_local
        self.write_bytes = write_bytes
        self.use_index = use_index

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    # -- names and paths ---------------------------------------------------------------------
    def rel(self, stage: str, name: str) -> str:
        return f"{self.folder}/{stage}/{name}.json"

    def _path(self, stage: str, name: str) -> str:
        return self.path(self.rel(stage, name))

    def listing(self, stage: str) -> dict[str, str | None]:
        """unit name -> validator for every record of a stage: one listing (no reads), never from a cache."""
        d = self.path(self.folder, stage)
        if self.is_local:
            return local_listing(d)
        self.fs.invalidate_cache(d)
        try:
            entries = self.fs.ls(d, detail=True)
        except FileNotFoundError:
            return {}
        out: dict[str, str | None] = {}
        for info in entries:
            base = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            if info.get("type") == "file" and base.endswith(".json") and not base.startswith("."):
                out[base[: -len(".json")]] = validator(info)
        return out

    # -- reads -------------------------------------------------------------------------------
    def get(self, stage: str, name: str) -> dict[str, Any] | None:
        """One record by name (one read), None when absent or unreadable."""
        try:
            return _parse(cat_one(self.fs, self._path(stage, name)))
        except FileNotFoundError:
            return None

    def get_many(self, stage: str, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """name -> record for those of `names` that exist, read concurrently."""
        names = list(dict.fromkeys(names))
        paths = {self._path(stage, n): n for n in names}
        blobs = read_blobs(self.fs, list(paths))
        return {paths[p]: rec for p, b in blobs.items() if (rec := _parse(b)) is not None}

    def all(self, stage: str) -> dict[str, dict[str, Any]]:
        """name -> record for every record of a stage: one listing, then reads of what the index does not
        hold current (everything when there is no index)."""
        listed = self.listing(stage)
        index = self._read_index(stage) if self.use_index else {}
        fresh = {n: e["m"] for n, v in listed.items()
                 if v is not None and (e := index.get(n)) is not None and e.get("v") == v}
        read = self.get_many(stage, [n for n in listed if n not in fresh])
        records = {**fresh, **read}
        if self.use_index and read and all(listed[n] is not None for n in read):
            self._write_index(stage, {n: {"v": listed[n], "m": records[n]} for n in records})
        elif self.use_index and set(index) - set(listed):  # only deletions: drop them from the index
            self._write_index(stage, {n: {"v": listed[n], "m": records[n]} for n in records if listed[n]})
        return dict(sorted(records.items()))

    # -- the index ---------------------------------------------------------------------------
    def index_rel(self, stage: str) -> str:
        return f"{INDEX_DIR}/{self.folder}/{stage}.json.gz"

    def _read_index(self, stage: str) -> dict[str, dict[str, Any]]:
        try:
            blob = cat_one(self.fs, self.path(self.index_rel(stage)))
            data = json.loads(gzip.decompress(blob))
        except FileNotFoundError:
            return {}
        except (OSError, EOFError, ValueError) as exc:  # torn or foreign: ignore it, it is only a cache
            log.debug("ignoring the marker index of %s: %s", stage, exc)
            return {}
        entries = data.get("entries") if isinstance(data, dict) else None
        return entries if isinstance(entries, dict) else {}

    def _write_index(self, stage: str, entries: dict[str, dict[str, Any]]) -> None:
        blob = gzip.compress(json.dumps({"version": 1, "entries": entries}, separators=(",", ":"),
                                        default=str).encode(), compresslevel=3)
        try:
            self.write_bytes(self.index_rel(stage), blob)
        except OSError as exc:  # a read-only root still gets its status
            log.debug("could not write the marker index of %s: %s", stage, exc)

    # -- outputs -----------------------------------------------------------------------------
    def intact(self, markers: Mapping[str, Mapping[str, Any]], whole_stage: bool = False) -> set[str]:
        """The names of the markers whose every listed output exists with its recorded size: by name (one
        `info` per file, concurrently) for a few files, one listing per output folder for many or when the
        markers are a whole stage (`whole_stage`: a listing is then the cheaper way)."""
        files = [(rel, info.get("size")) for m in markers.values() for rel, info in m.get("outputs", {}).items()]
        if len(files) <= BY_NAME_LIMIT and not (whole_stage and len(markers) > 1):
            sizes = dict(zip([f for f, _ in files], concurrently(self._size, [f for f, _ in files]), strict=True))
        else:
            sizes = output_sizes(self.fs, self.root, self.is_local, {rel.rsplit("/", 1)[0] for rel, _ in files if "/" in rel})
        return {name for name, m in markers.items()
                if all(sizes.get(rel) == info.get("size") for rel, info in m.get("outputs", {}).items())}

    def _size(self, rel: str) -> int | None:
        path = self.path(rel)
        if not self.is_local:
            self.fs.invalidate_cache(path)  # a listing cached earlier in this process must not answer
        try:
            return int(self.fs.size(path))
        except (FileNotFoundError, OSError):
            return None
