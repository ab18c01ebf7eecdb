"""The dataset layout on any fsspec URL and the shard commit protocol.

Layout (ROOT is a local path or a URL such as s3://bucket/prefix)::

    ROOT/run.json                       shard numbering guard
    ROOT/<stage dir>/00042.*            committed outputs (images/, qa/, captions/, eval/...)
    ROOT/_done/<stage>/00042.json       commit markers, written last
    ROOT/_failed/<stage>/00042.json     the last failure of an uncommitted shard
    ROOT/_running/<stage>/00042.json    claims of shards in progress
    ROOT/_index/_done/<stage>.json.gz   marker index: a cache for whole-root views (pipeline/markers.py)
    ROOT/_tmp/                          staging for local roots (same filesystem: renames are atomic)
    ROOT/logs/                          task logs, sbatch scripts

Commit protocol: a stage writes every output into a private staging folder; commit moves each
file to its final name (an atomic rename locally; on object stores an upload whose size is
verified), then writes the marker. A shard is committed iff its marker exists, its config
fingerprint matches, and every output it lists exists with the recorded size. A killed task
leaves at worst final-named files without a marker, which nothing trusts and the rerun replaces.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import fsspec

import pipeline
from pipeline.claims import (
    DEFAULT_STALE_AFTER,
    ClaimHeld,
    jobs_for,
    judge,
    now_epoch,
    pid_alive,
    process_start,
)
from pipeline.errors import MissingInputError, RunDriftError, StorageError
from pipeline.markers import MarkerStore, cat_one, output_sizes
from pipeline.shardio import url_fs
from pipeline.shards import shard_name

DONE_DIR = "_done"
FAILED_DIR = "_failed"
RUNNING_DIR = "_running"
TMP_DIR = "_tmp"
WRITES_DIR = f"{TMP_DIR}/_writes"
"""Temporaries of local atomic writes, one folder per writing process (see Storage.write_bytes)."""
LOGS_DIR = "logs"
RUN_META = "run.json"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def output_timestamp() -> str:
    """The time stamped into output rows: SOURCE_DATE_EPOCH's when set (reproducible outputs), else now."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    t = float(epoch) if epoch.isdigit() else _dt.datetime.now(_dt.timezone.utc).timestamp()
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@cache
def code_version() -> str:
    """pipeline version plus the git commit of the checkout it runs from, when there is one."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{pipeline.__version__}+{sha}" if sha else pipeline.__version__


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Storage:
    """A pipeline ROOT on any fsspec filesystem."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None, work_dir: str | None = None):
        proto, sep, rest = root.partition("://")
        if sep and not rest.strip("/"):
            raise StorageError(f"storage root {root!r} names no bucket or path: expected e.g. {proto}://bucket/prefix")
        self.root_url = root.rstrip("/") or "/"
        try:
            self.fs, path = url_fs(self.root_url, storage_options)
        except (ImportError, ValueError) as exc:
            raise StorageError(f"cannot open storage root {root!r}: {exc}") from None
        self.root = path.rstrip("/") or "/"
        self.is_local = "file" in _protocols(self.fs)
        if self.is_local:
            self.root = os.path.abspath(self.root)
        self.work_dir = work_dir
        self.storage_options = storage_options or {}
        self.done = MarkerStore(self.fs, self.root, DONE_DIR, self.is_local, self.write_bytes, use_index=True)
        self.failure_records = MarkerStore(self.fs, self.root, FAILED_DIR, self.is_local, self.write_bytes)
        self.claim_records = MarkerStore(self.fs, self.root, RUNNING_DIR, self.is_local, self.write_bytes)

    # -- paths -------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Filesystem path (no protocol) of a location under ROOT."""
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def url(self, *parts: str) -> str:
        """Full URL (with protocol) of a location under ROOT, for users and other libraries."""
        p = self.path(*parts)
        return p if self.is_local else self.fs.unstrip_protocol(p)

    # -- basic I/O ---------------------------------------------------------------------------
    def check_reachable(self, create: bool = True) -> None:
        """Fail with one clear line if ROOT cannot be listed (or created)."""
        try:
            if self.is_local:
                if create:
                    os.makedirs(self.root, exist_ok=True)
                self.fs.ls(self.root, detail=False)
            else:
                # Object stores have no directories: an empty prefix is fine if its bucket exists.
                bucket = self.root.split("/", 1)[0]
                self.fs.invalidate_cache(bucket)  # a cached listing would hide an unreachable store
                self.fs.ls(bucket, detail=False)
        except FileNotFoundError:
            raise StorageError(f"storage root {self.root_url} does not exist") from None
        except Exception as exc:  # noqa: BLE001 - any backend error means unreachable
            raise StorageError(f"storage root {self.root_url} is unreachable: {type(exc).__name__}: {exc}") from None

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_json(self, *parts: str) -> Any | None:
        try:
            return json.loads(cat_one(self.fs, self.path(*parts)))  # one GET (open would HEAD first)
        except FileNotFoundError:
            return None

    def write_json(self, rel: str, data: Any) -> None:
        """Write JSON atomically (rename locally; a single PUT on object stores)."""
        self.write_bytes(rel, json.dumps(data, indent=2, sort_keys=True, default=str).encode())

    def write_bytes(self, rel: str, blob: bytes) -> None:
        """Write ROOT/<rel> whole or not at all: on a local root through a temporary file in this process's
        folder under _tmp/_writes (renamed into place), so a writer killed mid-write leaves its temporary where
        `drop_dead_writes` finds it, not beside the target; a single PUT on object stores."""
        target = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = self._write_tmp()
            try:
                with open(tmp, "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
                _move_into_place(tmp, target)
            except BaseException:
                try:
                    os.remove(tmp)
                except OSError:
                    pass
                raise
        else:
            self.fs.pipe_file(target, blob)

    def _write_tmp(self) -> str:
        """A fresh temporary path in this process's folder ROOT/_tmp/_writes/<host>-<pid>-<start> (local roots),
        removed when the process exits (when empty)."""
        folder = self.path(WRITES_DIR, writer_tag())
        if folder not in _WRITE_FOLDERS:
            _WRITE_FOLDERS.add(folder)
            if len(_WRITE_FOLDERS) == 1:
                atexit.register(_remove_write_folders)
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, uuid.uuid4().hex)

    def drop_dead_writes(self, stale_after: float = DEFAULT_STALE_AFTER) -> int:
        """Remove what writers killed mid-write left under ROOT/_tmp/_writes (local roots): the folders of dead
        processes of this host, and files older than `stale_after` in other hosts' folders (a write takes well
        under a second). One listing of a folder with an entry per writing process. Returns the files removed."""
        if not self.is_local:
            return 0
        base = self.path(WRITES_DIR)
        try:
            entries = os.listdir(base)
        except FileNotFoundError:
            return 0
        here, _, _ = writer_tag().partition("-")
        removed = 0
        now = now_epoch()
        for entry in entries:
            folder = os.path.join(base, entry)
            host, pid, start = (entry.split("-") + ["", "", ""])[:3]
            if host == here and pid.isdigit():
                if pid_alive(int(pid), int(start) if start.isdigit() and start != "0" else None):
                    continue
                removed += sum(len(files) for _, _, files in os.walk(folder))
                shutil.rmtree(folder, ignore_errors=True)
                continue
            try:
                for name in os.listdir(folder):
                    path = os.path.join(folder, name)
                    if now - os.path.getmtime(path) > stale_after:
                        os.remove(path)
                        removed += 1
                if not os.listdir(folder) and now - os.path.getmtime(folder) > stale_after:
                    os.rmdir(folder)
            except OSError:
                continue  # removed meanwhile, or not ours to judge
        return removed

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm(self.path(rel))
        except FileNotFoundError:
            pass

    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self.path(rel), mode)

    # -- run.json guard ----------------------------------------------------------------------
    def check_run_meta(self, meta: dict[str, Any], must_match: tuple[str, ...] = ("shard_size",)) -> None:
        """Refuse settings that would renumber the shards run.json records (writes nothing)."""
        existing = self.read_json(RUN_META)
        if existing is not None:
            self._refuse_drift(meta, existing, must_match)

    def ensure_run_meta(self, meta: dict[str, Any], must_match: tuple[str, ...] = ("shard_size",)) -> dict[str, Any]:
        """Record the run's numbering settings, or refuse settings that would renumber its shards."""
        existing = self.read_json(RUN_META)
        if existing is None:
            record = {**meta, "created_at": now_iso(), "code_version": code_version()}
            self.write_json(RUN_META, record)
            return record
        self._refuse_drift(meta, existing, must_match)
        missing = {k: v for k, v in meta.items() if k not in existing}
        if missing:
            existing.update(missing)
            self.write_json(RUN_META, existing)
        return existing

    def _refuse_drift(self, meta: dict[str, Any], existing: dict[str, Any], must_match: tuple[str, ...]) -> None:
        for key in must_match:
            if key in meta and key in existing and existing[key] != meta[key]:
                raise RunDriftError(
                    f"refusing to run: {key} is {meta[key]!r} but {self.url(RUN_META)} records {existing[key]!r}; "
                    "this would renumber the existing shards. Use a new --root, or restore the original setting."
                )

    def run_meta(self) -> dict[str, Any] | None:
        return self.read_json(RUN_META)

    # -- commit markers (read through pipeline.markers) --------------------------------------
    def marker_rel(self, stage: str, unit: int | str) -> str:
        return self.done.rel(stage, unit_name(unit))

    def marker(self, stage: str, unit: int | str) -> dict[str, Any] | None:
        """A unit's marker, by name (one read)."""
        return self.done.get(stage, unit_name(unit))

    def markers(self, stage: str) -> dict[int, dict[str, Any]]:
        """shard -> marker for every committed-looking shard of a per-shard stage (whole-stage view)."""
        return {int(k): v for k, v in self.done.all(stage).items() if k.isdigit()}

    def unit_markers(self, stage: str) -> dict[str, dict[str, Any]]:
        """unit name ('00042' for a shard, 'all' for a whole-run unit) -> marker (whole-stage view)."""
        return self.done.all(stage)

    def output_sizes(self, rel_dirs: set[str]) -> dict[str, int]:
        """rel path -> size for every file under the given output dirs (one listing per dir)."""
        return output_sizes(self.fs, self.root, self.is_local, rel_dirs)

    def committed(self, stage: str, fingerprint: str | None = None) -> dict[int, dict[str, Any]]:
        """shard -> marker for shards that are committed: marker present, fingerprint matching, outputs intact
        (whole-stage view)."""
        return {int(k): v for k, v in self.committed_units(stage, fingerprint).items() if k.isdigit()}

    def committed_units(self, stage: str, fingerprint: str | None = None) -> dict[str, dict[str, Any]]:
        """unit name -> marker for every committed unit (shards and whole-run units) of a stage (whole-stage
        view: one listing, concurrent reads)."""
        return self._committed_of(self.done.all(stage), fingerprint, whole_stage=True)

    def committed_many(self, stage: str, units: list[int | str] | list[int] | list[str],
                       fingerprint: str | None = None) -> dict[int | str, dict[str, Any]]:
        """unit -> marker for those of `units` that are committed, read by name (what a task reads: its own
        units, never the whole stage)."""
        names = {unit_name(u): u for u in units}
        return {names[n]: m for n, m in self._committed_of(self.done.get_many(stage, names), fingerprint).items()}

    def _committed_of(self, markers: dict[str, dict[str, Any]], fingerprint: str | None,
                      whole_stage: bool = False) -> dict[str, dict[str, Any]]:
        if fingerprint is not None:
            markers = {n: m for n, m in markers.items() if m.get("config_fingerprint") == fingerprint}
        good = self.done.intact(markers, whole_stage)
        return {n: m for n, m in markers.items() if n in good}

    def outputs_intact(self, marker: dict[str, Any]) -> bool:
        """Whether every output a marker lists exists with its recorded size (by name)."""
        return bool(self.done.intact({"unit": marker}))

    def is_committed(self, stage: str, unit: int | str, fingerprint: str | None = None) -> bool:
        return bool(self.committed_many(stage, [unit], fingerprint))

    def require_committed(self, stage: str, unit: int | str) -> dict[str, Any]:
        """The marker of an upstream unit, or a clear error telling the user what to run first."""
        m = self.marker(stage, unit)
        if m is None or not self.outputs_intact(m):
            raise self.missing_input(stage, unit)
        return m

    def missing_input(self, stage: str, unit: int | str) -> MissingInputError:
        """The error for an upstream unit that is not committed, telling the user what to run first."""
        shards = f" --shards {unit}" if isinstance(unit, int) else ""
        return MissingInputError(f"input {unit_name(unit)} of stage '{stage}' is not committed under "
                                 f"{self.root_url}; run: python -m pipeline run --stage {stage}{shards}")

    # -- failure and claim records -----------------------------------------------------------
    def record_failure(self, stage: str, unit: int | str, record: dict[str, Any]) -> None:
        self.write_json(f"{FAILED_DIR}/{stage}/{unit_name(unit)}.json", record)

    def clear_failure(self, stage: str, unit: int | str) -> None:
        self.remove(f"{FAILED_DIR}/{stage}/{unit_name(unit)}.json")

    def failures(self, stage: str) -> dict[int, dict[str, Any]]:
        return {int(k): v for k, v in self.failure_records.all(stage).items() if k.isdigit()}

    def unit_failures(self, stage: str) -> dict[str, dict[str, Any]]:
        return self.failure_records.all(stage)

    def claim_rel(self, stage: str, unit: int | str) -> str:
        return f"{RUNNING_DIR}/{stage}/{unit_name(unit)}.json"

    def acquire(self, stage: str, unit: int | str, stale_after: float = DEFAULT_STALE_AFTER) -> Claim:
        """Claim a unit exclusively (see pipeline/claims.py), taking over a stale claim; ClaimHeld if a live
        owner has it."""
        rel = self.claim_rel(stage, unit)
        for _attempt in range(4):
            record = {**task_identity(), "token": uuid.uuid4().hex, "beat": now_epoch()}
            if self._create_exclusive(rel, json.dumps(record, indent=2, sort_keys=True).encode()):
                current = self.read_json(rel)
                if current is not None and current.get("token") == record["token"]:
                    return Claim(self, stage, unit, record)
                raise ClaimHeld(current or {}, "lost the claim to a concurrent writer")
            try:
                existing = self.read_json(rel)
            except ValueError:  # torn: its writer died between creating and writing it (judged stale below)
                existing = {}
            if existing is None:
                continue  # released meanwhile
            owner = judge(existing, jobs_for(existing), stale_after)
            if owner.live:
                raise ClaimHeld(existing, owner.reason)
            self._drop_stale_claim(rel, existing)
        raise ClaimHeld(self.read_json(rel) or {}, "the claim kept changing hands")

    def _create_exclusive(self, rel: str, blob: bytes) -> bool:
        """Create ROOT/<rel> only if it does not exist; False if it does."""
        target = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, blob)
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        try:
            self.fs.pipe_file(target, blob, IfNoneMatch="*")
        except FileExistsError:
            return False
        except OSError as exc:
            text = str(exc).lower().replace("-", "")
            if "precondition" in text or "412" in text:
                return False
            raise
        return True

    def _drop_stale_claim(self, rel: str, seen: dict[str, Any]) -> None:
        """Remove exactly the stale claim we judged (not one written since by another run)."""
        target = self.path(rel)
        if self.is_local:
            tomb = self._write_tmp()  # where drop_dead_writes finds it if this process dies before removing it
            try:
                _move_into_place(target, tomb)
            except FileNotFoundError:
                return
            with open(tomb, "rb") as f:
                blob = f.read()
            try:
                taken = json.loads(blob or b"{}")
            except ValueError:
                taken = {}
            if taken.get("token") != seen.get("token"):  # replaced between our read and the rename: put it back
                self._create_exclusive(rel, blob)
            os.remove(tomb)
            return
        current = self.read_json(rel)
        if current is not None and current.get("token") == seen.get("token"):
            self.remove(rel)

    def release(self, stage: str, unit: int | str, token: str | None = None) -> None:
        """Remove a unit's claim (only if it still carries `token`, when given)."""
        rel = self.claim_rel(stage, unit)
        if token is not None:
            current = self.read_json(rel)
            if current is None or current.get("token") != token:
                return
        self.remove(rel)

    def claims(self, stage: str) -> dict[int, dict[str, Any]]:
        return {int(k): v for k, v in self.claim_records.all(stage).items() if k.isdigit()}

    def unit_claims(self, stage: str) -> dict[str, dict[str, Any]]:
        return self.claim_records.all(stage)

    # -- transactions ------------------------------------------------------------------------
    def begin(self, stage: str, unit: int | str) -> ShardTransaction:
        """Start (re)writing a unit the caller holds the claim of: clear the staging that dead owners of the
        same unit left behind, open a fresh staging dir. The unit's marker stays until the commit replaces it."""
        token = uuid.uuid4().hex[:12]
        name = unit_name(unit)
        if self.is_local:
            base = self.path(TMP_DIR, stage)
            os.makedirs(base, exist_ok=True)
            prefix = f"{name}-"
            for entry in os.listdir(base):
                if entry.startswith(prefix):
                    shutil.rmtree(os.path.join(base, entry), ignore_errors=True)
            staging = os.path.join(base, prefix + token)
            os.makedirs(staging)
        else:
            prefix = self.scratch_prefix(stage, name)
            for entry in self.scratch_leftovers(stage, name, only_dead=False):
                shutil.rmtree(entry, ignore_errors=True)
            staging = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=self.scratch_dir())
        return ShardTransaction(storage=self, stage=stage, unit=unit, staging=staging)

    # -- local scratch of object-store roots -------------------------------------------------
    def scratch_dir(self) -> str:
        return self.work_dir or tempfile.gettempdir()

    def scratch_prefix(self, stage: str, name: str = "") -> str:
        """Local staging folders of this ROOT: pipeline-<root hash>-<stage>-<unit>-<pid>-<random>."""
        tag = hashlib.sha256(self.root_url.encode()).hexdigest()[:8]
        return f"pipeline-{tag}-{stage}-" + (f"{name}-" if name else "")

    def drop_dead_scratch(self, stage: str, units: list[int | str]) -> None:
        """Remove the local staging that killed tasks left for these units (a task killed between its commit
        and its cleanup leaves it for a unit that reruns then skip as committed)."""
        for unit in units:
            for entry in self.scratch_leftovers(stage, unit_name(unit)):
                shutil.rmtree(entry, ignore_errors=True)

    def drop_dead_claims(self, stage: str, units: list[int | str], stale_after: float = DEFAULT_STALE_AFTER) -> None:
        """Remove the claims that dead owners left on these units (a task killed between writing a unit's marker and
        releasing its claim leaves one on a unit that reruns then skip as committed); live owners' stay."""
        if not units:
            return
        claims = self.claim_records.get_many(stage, [unit_name(u) for u in units])  # by name: this task's units
        for name, claim in claims.items():
            if not judge(claim, jobs_for(claim), stale_after).live:
                self._drop_stale_claim(self.claim_rel(stage, name), claim)

    def scratch_leftovers(self, stage: str, name: str = "", only_dead: bool = True) -> list[str]:
        """Local staging folders of this ROOT's stage (or unit) on this host; with `only_dead`, those whose
        process is gone (a killed task's: reruns of the unit remove them, status counts them)."""
        if self.is_local:
            return []
        prefix = self.scratch_prefix(stage, name)
        try:
            entries = os.listdir(self.scratch_dir())
        except FileNotFoundError:
            return []
        out = []
        for entry in entries:
            if not entry.startswith(prefix):
                continue
            pid_text = entry[len(prefix):].split("-")[-2]  # <unit>-<pid>-<random>, random has no '-'
            dead = not (pid_text.isdigit() and pid_alive(int(pid_text)))
            if dead or not only_dead:
                out.append(os.path.join(self.scratch_dir(), entry))
        return out


_UNIT = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_WRITER: dict[int, str] = {}
_WRITE_FOLDERS: set[str] = set()


def _remove_write_folders() -> None:
    """At exit: this process's (empty) folders of temporaries (not a parent's, after a fork)."""
    for folder in _WRITE_FOLDERS:
        if os.path.basename(folder) != writer_tag():
            continue
        try:
            os.rmdir(folder)
        except OSError:
            pass


def writer_tag() -> str:
    """This process's name among writers: <host hash>-<pid>-<process start time> (0 where /proc cannot say)."""
    pid = os.getpid()
    if pid not in _WRITER:  # per pid: a forked child is another writer
        host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
        _WRITER[pid] = f"{host}-{pid}-{process_start(pid) or 0}"
    return _WRITER[pid]


def _move_into_place(src: str, dst: str) -> None:
    """os.replace, or, where src and dst lie on different file systems (a folder of ROOT mounted elsewhere),
    a copy to a temporary beside dst renamed into place."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        beside = f"{os.path.dirname(dst)}/.{os.path.basename(dst)}.tmp-{uuid.uuid4().hex}"
        try:
            shutil.copyfile(src, beside)
            os.replace(beside, dst)
        finally:
            if os.path.exists(beside):
                os.remove(beside)
        os.remove(src)


def unit_name(unit: int | str) -> str:
    """The file name (without .json) of a unit's marker: '00042' for shard 42, the name of a whole-run unit."""
    if isinstance(unit, int):
        return shard_name(unit)
    if unit.isdigit():
        return unit
    if not _UNIT.match(unit):
        raise ValueError(f"unit name {unit!r} must start with a lower-case letter and hold only a-z, 0-9, '_', '-'")
    return unit


@dataclass
class Claim:
    """A held claim: refresh it with `beat()` (False once another owner took it), give it back with `release()`."""

    storage: Storage
    stage: str
    unit: int | str
    record: dict[str, Any]

    @property
    def token(self) -> str:
        return self.record["token"]

    def beat(self) -> bool:
        """Refresh the heartbeat if the claim is still ours; False if it is not."""
        rel = self.storage.claim_rel(self.stage, self.unit)
        current = self.storage.read_json(rel)
        if current is None or current.get("token") != self.token:
            return False
        self.record = {**self.record, "beat": now_epoch(), "time": now_iso()}
        self.storage.write_json(rel, self.record)
        return True

    def release(self) -> None:
        self.storage.release(self.stage, self.unit, self.token)


def task_identity() -> dict[str, Any]:
    """Who is doing the work: host, pid, SLURM ids when present, and the executor, job and task an executor's
    task runs under (pipeline.executors.base.IDENTITY_ENV)."""
    from pipeline.executors.base import task_identity_from_env

    ident: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "time": now_iso()}
    started = process_start(os.getpid())
    if started is not None:
        ident["pid_start"] = started  # a later process given the same pid is not this owner
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        if var in os.environ:
            ident[var.lower()] = os.environ[var]
    ident.update(task_identity_from_env())
    return ident


@dataclass
class ShardTransaction:
    """Outputs of one shard in progress. Stages write to `path(rel)`; nothing is visible until commit."""

    storage: Storage
    stage: str
    unit: int | str
    staging: str
    _outputs: list[str] = field(default_factory=list)
    done: bool = False

    def path(self, rel: str) -> str:
        """A local path to write the output that will be committed as ROOT/<rel>."""
        if rel.startswith("/") or ".." in rel.split("/"):
            raise ValueError(f"output path must be relative to ROOT: {rel!r}")
        local = os.path.join(self.staging, rel.replace("/", "__"))
        if rel not in self._outputs:
            self._outputs.append(rel)
        return local

    @property
    def shard(self) -> int:
        if not isinstance(self.unit, int):
            raise TypeError(f"{self.stage}/{self.unit} is a whole-run unit, not a shard")
        return self.unit

    @property
    def outputs(self) -> list[str]:
        return list(self._outputs)

    def commit(self, marker_fields: dict[str, Any]) -> dict[str, Any]:
        """Drop the unit's old marker, finalize every staged output, then write the new marker (last).
        Returns the marker. Until this point a --force rerun leaves the old outputs committed."""
        st = self.storage
        st.remove(st.marker_rel(self.stage, self.unit))
        outputs: dict[str, dict[str, Any]] = {}
        for rel in self._outputs:
            local = os.path.join(self.staging, rel.replace("/", "__"))
            if not os.path.exists(local):
                raise FileNotFoundError(f"stage declared output {rel} but did not write it")
            size = os.path.getsize(local)
            outputs[rel] = {"size": size, "sha256": sha256_file(local)}
            target = st.path(rel)
            if st.is_local:
                with open(local, "rb+") as f:
                    os.fsync(f.fileno())
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(local, target)
            else:
                st.fs.put_file(local, target)
                remote = int(st.fs.size(target))
                if remote != size:
                    raise OSError(f"upload of {rel} is {remote} bytes, expected {size}")
        marker = {
            "stage": self.stage,
            **({"shard": self.unit} if isinstance(self.unit, int) else {"unit": self.unit}),
            "outputs": outputs,
            "code_version": code_version(),
            "committed_at": now_iso(),
            **task_identity(),
            **marker_fields,
        }
        st.write_json(st.marker_rel(self.stage, self.unit), marker)
        self.done = True
        self.cleanup()
        return marker

    def cleanup(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
