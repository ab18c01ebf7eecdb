"""Status of a run, read from ROOT alone: per stage, committed / failed / running / stale / pending shards,
row counts, failure reasons and throughput.

A `_running` claim is *live* while its task is: a SLURM job still in squeue, a process still alive on this
host, or (when neither can be checked) a heartbeat newer than `stale_after` seconds. Claims of dead tasks
are shown as stale; their shards count as pending for `retry`.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import RunConfig
from pipeline.quality import mean_quality
from pipeline.shards import format_shard_spec, parse_shard_spec
from pipeline.stage import stage_modules
from pipeline.storage import TMP_DIR, Storage

DEFAULT_STALE_AFTER = 600.0
"""A claim whose heartbeat (refreshed every PIPELINE_HEARTBEAT_S=60 s) is older than this is stale."""


@dataclass
class ClaimState:
    shard: int
    live: bool
    reason: str
    claim: dict[str, Any]


@dataclass
class StageStatus:
    """One row of the status table."""

    stage: str
    universe: list[int] | None
    committed: dict[int, dict[str, Any]]
    outdated: list[int]
    failed: dict[int, dict[str, Any]]
    running: list[ClaimState]
    stale: list[ClaimState]
    staging_dirs: int = 0
    row_errors: Counter = field(default_factory=Counter)

    @property
    def pending(self) -> list[int] | None:
        """Shards of the run that are neither committed, failed nor running (None if the run's shards are unknown)."""
        if self.universe is None:
            return None
        busy = set(self.committed) | set(self.failed) | {c.shard for c in self.running}
        return [s for s in self.universe if s not in busy]

    @property
    def rows_ok(self) -> int:
        return sum(m.get("rows", {}).get("ok", 0) for m in self.committed.values())

    @property
    def rows_failed(self) -> int:
        return sum(m.get("rows", {}).get("failed", 0) for m in self.committed.values())

    @property
    def shards_with_failed_rows(self) -> list[int]:
        return sorted(s for s, m in self.committed.items() if m.get("rows", {}).get("failed", 0))

    def task_rate(self) -> float | None:
        """Rows per second of shard work (summed over tasks' own shard times)."""
        secs = sum(m.get("stats", {}).get("seconds", 0.0) for m in self.committed.values())
        return (self.rows_ok + self.rows_failed) / secs if secs else None

    def wall_rate(self) -> float | None:
        """Rows per second of wall-clock time, first shard start to last commit (all tasks together)."""
        spans = [(m["started_at"], m["started_at"] + float(m.get("stats", {}).get("seconds", 0.0)))
                 for m in self.committed.values() if isinstance(m.get("started_at"), int | float)]
        if not spans:
            return None
        starts, ends = zip(*spans, strict=True)
        if max(ends) <= min(starts):
            return None
        return (self.rows_ok + self.rows_failed) / (max(ends) - min(starts))


    def quality(self) -> float | None:
        """Running mean caption quality over committed shards (the annotate quality monitor), or None."""
        return mean_quality(self.committed.values())

    def to_row(self) -> dict[str, Any]:
        pending = self.pending
        return {
            "stage": self.stage,
            "committed": len(self.committed),
            "failed": len(self.failed),
            "running": len(self.running),
            "stale": len(self.stale),
            "pending": None if pending is None else len(pending),
            "outdated": len(self.outdated),
            "rows_ok": self.rows_ok,
            "rows_failed": self.rows_failed,
            "rows_per_s": None if (r := self.task_rate()) is None else round(r, 1),
            "rows_per_s_wall": None if (w := self.wall_rate()) is None else round(w, 1),
            "quality": None if (q := self.quality()) is None else round(q, 3),
            "failed_shards": format_shard_spec(self.failed),
            "failure_reasons": sorted({f.get("error", "?")[:200] for f in self.failed.values()}),
            "stale_shards": format_shard_spec(c.shard for c in self.stale),
            "row_errors": dict(self.row_errors),
        }


def _epoch(iso: Any) -> float | None:
    if not isinstance(iso, str):
        return None
    try:
        return _dt.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def classify_claim(shard: int, claim: dict[str, Any], jobs: set[str] | None, stale_after: float,
                   now: float | None = None) -> ClaimState:
    """Decide whether the task holding a claim is still alive (see the module docstring)."""
    now = now if now is not None else _dt.datetime.now(_dt.timezone.utc).timestamp()
    job = claim.get("slurm_job_id")
    if job and jobs is not None:
        if str(job) in jobs:
            return ClaimState(shard, True, f"SLURM job {job}", claim)
        return ClaimState(shard, False, f"SLURM job {job} is no longer in squeue", claim)
    host, pid = claim.get("host"), claim.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        if pid_alive(pid):
            return ClaimState(shard, True, f"pid {pid} on {host}", claim)
        return ClaimState(shard, False, f"process {pid} on {host} is gone", claim)
    beat = _epoch(claim.get("time"))
    age = now - beat if beat is not None else float("inf")
    where = f"SLURM job {job}" if job else f"pid {pid} on {host}"
    if age <= stale_after:
        return ClaimState(shard, True, f"{where}, heartbeat {age:.0f}s ago", claim)
    return ClaimState(shard, False, f"{where}: no heartbeat for {age:.0f}s", claim)


def run_universe(storage: Storage, stage: str) -> list[int] | None:
    """The run's shards: run.json num_shards when recorded, else every shard submitted for the stage."""
    meta = storage.run_meta() or {}
    total = meta.get("num_shards")
    if isinstance(total, int) and total > 0:
        return list(range(total))
    from pipeline.slurm import submissions

    shards: set[int] = set()
    for record in submissions(storage, stage):
        shards.update(parse_shard_spec(record["shard_spec"]))
    return sorted(shards) if shards else None


def stage_status(config: RunConfig, storage: Storage, stage: str, jobs: set[str] | None,
                 stale_after: float = DEFAULT_STALE_AFTER) -> StageStatus:
    """Everything `status` and `retry` need to know about one stage, from ROOT (plus squeue when present)."""
    committed = storage.committed(stage, config.fingerprint(stage))
    markers = storage.markers(stage)
    failed = {s: f for s, f in storage.failures(stage).items() if s not in committed}
    claims = [classify_claim(s, c, jobs, stale_after) for s, c in sorted(storage.claims(stage).items())
              if s not in committed]
    row_errors: Counter = Counter()
    for m in committed.values():
        row_errors.update(m.get("stats", {}).get("errors", {}))
    staging = 0
    if storage.is_local:
        try:
            staging = len(os.listdir(storage.path(TMP_DIR, stage)))
        except FileNotFoundError:
            staging = 0
    return StageStatus(
        stage=stage,
        universe=run_universe(storage, stage),
        committed=committed,
        outdated=sorted(set(markers) - set(committed)),
        failed=failed,
        running=[c for c in claims if c.live],
        stale=[c for c in claims if not c.live],
        staging_dirs=staging,
        row_errors=row_errors,
    )


def collect_status(config: RunConfig, only: str | None = None,
                   stale_after: float = DEFAULT_STALE_AFTER) -> list[dict[str, Any]]:
    """One plain dict per stage (counts, rows, rates, failed shards and reasons), e.g. for JSON output."""
    return [st.to_row() for st in collect_stage_status(config, only, stale_after)]


def collect_stage_status(config: RunConfig, only: str | None = None,
                         stale_after: float = DEFAULT_STALE_AFTER) -> list[StageStatus]:
    from pipeline.slurm import squeue_job_ids

    storage = Storage(config.root, config.storage_options, config.work_dir)
    storage.check_reachable(create=False)
    out = []
    jobs: set[str] | None = None
    jobs_checked = False
    for stage in stage_modules(config):
        if only and stage != only:
            continue
        if not jobs_checked and any(c.get("slurm_job_id") for c in storage.claims(stage).values()):
            jobs, jobs_checked = squeue_job_ids(), True
        st = stage_status(config, storage, stage, jobs, stale_after)
        if not (st.committed or st.outdated or st.failed or st.running or st.stale) and only is None:
            continue
        out.append(st)
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def print_status(config: RunConfig, only: str | None = None, out=None,
                 stale_after: float = DEFAULT_STALE_AFTER) -> int:
    """Print the table and, under it, failure reasons, stale claims and row-level error counts."""
    out = out or sys.stdout
    rows = collect_stage_status(config, only, stale_after)
    if not rows:
        print(f"no stage has run under {config.root}", file=out)
        return 0
    cols = ["stage", "committed", "failed", "running", "stale", "pending", "outdated",
            "rows_ok", "rows_failed", "rows/s/task", "rows/s"]
    table = []
    for st in rows:
        pending = st.pending
        table.append([st.stage, len(st.committed), len(st.failed), len(st.running), len(st.stale),
                      None if pending is None else len(pending), len(st.outdated),
                      st.rows_ok, st.rows_failed, st.task_rate(), st.wall_rate()])
    qualities = [st.quality() for st in rows]
    if any(q is not None for q in qualities):  # the caption quality monitor's running mean
        cols.append("quality")
        for r, q in zip(table, qualities, strict=True):
            r.append(None if q is None else f"{q:.3f}")
    cells = [[_fmt(v) for v in r] for r in table]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)), file=out)
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)), file=out)
    for st in rows:
        by_reason: dict[str, list[int]] = {}
        for shard, rec in st.failed.items():
            by_reason.setdefault(rec.get("error", "?").splitlines()[0][:200], []).append(shard)
        for reason, shards in sorted(by_reason.items()):
            print(f"{st.stage}: shard(s) {format_shard_spec(shards)} FAILED: {reason}", file=out)
        for c in st.stale:
            print(f"{st.stage}: shard {c.shard} has a stale claim ({c.reason}); `retry` will include it", file=out)
        for c in st.running:
            print(f"{st.stage}: shard {c.shard} running ({c.reason})", file=out)
        if st.row_errors:
            top = ", ".join(f"{k}: {v}" for k, v in st.row_errors.most_common(5))
            print(f"{st.stage}: failed rows in {format_shard_spec(st.shards_with_failed_rows)}: {top}", file=out)
        leftovers = st.staging_dirs - len(st.running)
        if leftovers > 0:
            print(f"{st.stage}: {leftovers} staging folder(s) of aborted shards under {TMP_DIR}/{st.stage} "
                  "(removed when those shards rerun)", file=out)
        if st.pending:
            print(f"{st.stage}: pending shards {format_shard_spec(st.pending)}", file=out)
    return 0
