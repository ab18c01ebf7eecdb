"""Run one stage over a set of shards in this process: skip committed, isolate failures, report."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from pipeline.config import RunConfig
from pipeline.errors import PipelineError, Preempted
from pipeline.shards import format_shard_spec
from pipeline.stage import InputCache, RunContext, ShardContext, ShardStats, Stage, load_stage, timed
from pipeline.storage import Storage, now_iso, task_identity, unit_name

log = logging.getLogger("pipeline.runner")

EXIT_OK = 0
EXIT_SHARDS_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75
"""EX_TEMPFAIL: the task stopped on a signal before finishing; safe to requeue."""


@dataclass
class RunReport:
    stage: str
    committed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    retried: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    preempted: int | None = None
    stats: dict[int, ShardStats] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        if self.preempted is not None:
            return EXIT_PREEMPTED
        return EXIT_SHARDS_FAILED if self.failed else EXIT_OK

    def summary(self) -> str:
        parts = [f"{self.stage}: {len(self.committed)} committed, {len(self.skipped)} skipped (already committed)"]
        if self.retried:
            parts.append(f"{len(self.retried)} with failed rows redone [{format_shard_spec(self.retried)}]")
        if self.failed:
            parts.append(f"{len(self.failed)} FAILED [{format_shard_spec(self.failed)}]")
        if self.preempted is not None:
            parts.append(f"stopped by signal {self.preempted}; rerun to finish")
        return ", ".join(parts)


@contextlib.contextmanager
def preemption_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGUSR1 into a Preempted exception in the main thread for the duration."""

    fired: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        # Raise once: a second signal (SLURM signals the whole process tree, the batch shell forwards
        # the same signal) must not interrupt the clean-up of the shard being aborted.
        if fired:
            return
        fired.append(signum)
        raise Preempted(signum)

    old = {}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, prev in old.items():
            signal.signal(sig, prev)


def run_stage(
    config: RunConfig,
    stage: str,
    shards: list[int] | None,
    *,
    force: bool = False,
    failed_only: bool = False,
    storage: Storage | None = None,
    resources: dict[str, Any] | None = None,
    progress: bool = True,
    out=None,
) -> RunReport:
    """Run `stage` over `shards` in sequence with one set of shared resources (engines load once).

    A whole-run stage runs once over `shards` (its input shards; None: the stage's default). With
    `failed_only`, committed shards whose marker counts failed rows are handed to the stage's
    `retry_shard(ctx, shard, previous_marker)`, which redoes only those rows; uncommitted shards run as usual.
    """
    out = out or sys.stdout
    declared = load_stage(stage, config)
    if failed_only and force:
        raise PipelineError("--force and --failed-only exclude each other: --force redoes whole shards")
    if failed_only and declared.retry_shard is None:
        raise PipelineError(f"stage {stage!r} cannot redo single rows (it has no retry_shard); use --force")
    storage = storage or Storage(config.root, config.storage_options, config.work_dir)
    storage.check_reachable()
    storage.ensure_run_meta({"shard_size": config.shard_size})
    resources = {} if resources is None else resources
    cache = InputCache(storage)
    if declared.whole_run:
        shards = whole_run_shards(declared, config, storage, shards)
    elif shards is None:
        raise PipelineError(f"stage {stage!r} runs per shard: give --shards")
    report = RunReport(stage=stage)

    if declared.prepare is not None:
        declared.prepare(RunContext(config, storage, stage, shards, resources, log))

    work = _Work(declared, config, storage, resources, cache, report, out)
    if declared.whole_run:
        unit = declared.unit_of(config)
        marker = storage.committed_units(stage, work.fingerprint).get(unit)
        if not force and marker is not None and is_current(marker, cache, shards, declared):
            report.skipped = [0]
            print(f"{stage}: {unit} is committed and current; skipping (--force redoes it)", file=out)
        else:
            with preemption_signals():
                try:
                    work.run(unit, shards)
                except Preempted as sig:
                    report.preempted = sig.signum
        print(report.summary(), file=out)
        return report

    done = storage.committed(stage, work.fingerprint)
    todo = [s for s in shards if force or s not in done or not is_current(done[s], cache)]
    redo_rows = {s: done[s] for s in shards if failed_only and s not in todo and _failed_rows(done[s]) > 0}
    todo = sorted([*todo, *redo_rows])
    report.skipped = [s for s in shards if s not in todo]
    if report.skipped:
        print(f"{stage}: skipping {len(report.skipped)} committed shard(s) [{format_shard_spec(report.skipped)}]", file=out)

    bar = tqdm(todo, desc=stage, unit="shard", disable=not progress or not todo, file=sys.stderr, leave=False)
    with preemption_signals():
        try:
            for shard in bar:
                work.run(shard, [shard], previous=redo_rows.get(shard))
        except Preempted as sig:
            report.preempted = sig.signum
    bar.close()
    print(report.summary(), file=out)
    return report


def whole_run_shards(declared: Stage, config: RunConfig, storage: Storage, shards: list[int] | None) -> list[int]:
    """The input shards of a whole-run unit: as given, else the stage's default, else every committed shard
    of its first required input."""
    if shards is not None:
        return shards
    if declared.default_shards is not None:
        return declared.default_shards(config, storage)
    first = next((i.stage for i in declared.inputs if i.required), None)
    if first is None:
        return []
    found = sorted(storage.committed(first))
    if not found:
        raise PipelineError(f"stage {declared.name!r} reads the shards of {first!r}, and none is committed under "
                            f"{storage.root_url}; run {first} first (or give --shards)")
    return found


def is_current(marker: dict[str, Any], cache: InputCache, shards: list[int] | None = None,
               declared: Stage | None = None) -> bool:
    """Whether a committed unit still matches every input it recorded (and, for a whole-run unit, was made
    from the same input shards)."""
    recorded = marker.get("inputs", {}) or {}
    for key, digest in recorded.items():
        if cache.digest(key) != digest:
            return False
    if shards is not None and declared is not None and declared.whole_run:
        if sorted(marker.get("shards", [])) != sorted(shards):
            return False
    return True


def stale_inputs(marker: dict[str, Any], cache: InputCache) -> list[str]:
    """The recorded inputs ('stage/unit') whose current digest differs from the one the marker recorded."""
    return sorted(k for k, d in (marker.get("inputs", {}) or {}).items() if cache.digest(k) != d)


class Heartbeat:
    """Refreshes a shard's `_running` claim every `interval` seconds, so `status` can tell a live task
    from a dead one (PIPELINE_HEARTBEAT_S, default 60). Stopped before the claim is released."""

    def __init__(self, storage: Storage, stage: str, unit: int | str, interval: float | None = None):
        self.storage, self.stage, self.shard = storage, stage, unit
        self.interval = interval if interval is not None else heartbeat_interval()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{unit}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.storage.claim(self.stage, self.shard)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.claim(self.stage, self.shard)
            except Exception:  # noqa: BLE001 - a missed heartbeat is not worth failing a shard
                log.debug("heartbeat of %s failed", unit_name(self.shard), exc_info=True)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def heartbeat_interval() -> float:
    """Seconds between claim refreshes (PIPELINE_HEARTBEAT_S)."""
    try:
        return max(0.05, float(os.environ.get("PIPELINE_HEARTBEAT_S", "60")))
    except ValueError:
        return 60.0


def _failed_rows(marker: dict[str, Any]) -> int:
    return int(marker.get("rows", {}).get("failed", 0) or 0)


@dataclass
class _Work:
    """One stage's units run in this process: each inside a transaction, holding a heartbeat claim."""

    declared: Stage
    config: RunConfig
    storage: Storage
    resources: dict[str, Any]
    cache: InputCache
    report: RunReport
    out: Any
    fingerprint: str = ""

    def __post_init__(self) -> None:
        self.fingerprint = self.config.fingerprint(self.declared.name)

    def run(self, unit: int | str, shards: list[int], previous: dict[str, Any] | None = None) -> None:
        """Run (or, given the previous marker, retry the failed rows of) one unit; on any exit its staging
        is removed and its claim released."""
        stage = self.declared.name
        txn = None
        try:
            txn = self.storage.begin(stage, unit)
            with Heartbeat(self.storage, stage, unit):
                self._claimed(unit, shards, txn, previous)
        finally:
            # Also reached when a signal lands between begin() and the unit's own handlers.
            if txn is not None and not txn.done:
                txn.cleanup()
            self.storage.release(stage, unit)

    def _claimed(self, unit: int | str, shards: list[int], txn, previous: dict[str, Any] | None) -> None:
        declared, stage = self.declared, self.declared.name
        name = unit_name(unit)
        ctx = ShardContext(
            config=self.config, storage=self.storage, stage=stage, output_dir=declared.output_dir,
            txn=txn, resources=self.resources, log=logging.getLogger(f"pipeline.{stage}"),
            cache=self.cache, shards=list(shards),
        )
        started = time.time()
        try:
            if declared.whole_run:
                stats = timed(lambda: declared.run_whole(ctx, list(shards)))  # type: ignore[misc]
            elif previous is not None:
                stats = timed(lambda: declared.retry_shard(ctx, unit, previous))  # type: ignore[misc]
            else:
                stats = timed(lambda: declared.run_shard(ctx, unit))  # type: ignore[misc]
            if not isinstance(stats, ShardStats):
                raise TypeError(f"stage {stage} returned {type(stats).__name__}, expected ShardStats")
            with open(ctx.output("_stats.json"), "w") as f:
                json.dump({"stage": stage, "unit": name, **stats.to_dict()}, f, indent=2, sort_keys=True)
            txn.commit({
                "config_fingerprint": self.fingerprint,
                "config": self.config.semantic(stage),
                "inputs": ctx.inputs,
                **({"shards": list(shards), "artifact": f"{declared.output_dir}/{name}"} if declared.whole_run else {}),
                "rows": {"total": stats.rows, "ok": stats.ok, "failed": stats.failed},
                "stats": stats.to_dict(),
                "started_at": started,
                **({"retry_of": previous.get("committed_at"), "retries": int(previous.get("retries", 0)) + 1}
                   if previous is not None else {}),
            })
            self.storage.clear_failure(stage, unit)
            key = unit if isinstance(unit, int) else 0
            self.report.committed.append(key)
            if previous is not None:
                self.report.retried.append(key)
            self.report.stats[key] = stats
            print(f"{stage} {name}: {stats.line()}", file=self.out, flush=True)
        except Exception as exc:  # noqa: BLE001 - isolate any unit failure (staging is removed by run)
            message = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
            self.storage.record_failure(stage, unit, {
                "stage": stage, "unit": name, **({"shard": unit} if isinstance(unit, int) else {}),
                "error": message, "error_type": type(exc).__name__,
                "traceback": traceback.format_exc(), "failed_at": now_iso(), **task_identity(),
            })
            self.report.failed[unit if isinstance(unit, int) else 0] = message
            print(f"{stage} {name}: FAILED: {message}", file=self.out, flush=True)
            log.debug("unit %s failed", name, exc_info=True)
