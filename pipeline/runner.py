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
from pipeline.shards import format_shard_spec, shard_name
from pipeline.stage import RunContext, ShardContext, ShardStats, load_stage, marker_digest, timed
from pipeline.storage import Storage, now_iso, task_identity

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
    shards: list[int],
    *,
    force: bool = False,
    failed_only: bool = False,
    storage: Storage | None = None,
    resources: dict[str, Any] | None = None,
    progress: bool = True,
    out=None,
) -> RunReport:
    """Run `stage` over `shards` in sequence with one set of shared resources (engines load once).

    With `failed_only`, committed shards whose marker counts failed rows are handed to the stage's
    `retry_shard(ctx, shard, previous_marker)`, which redoes only those rows; uncommitted shards run as usual.
    """
    out = out or sys.stdout
    module = load_stage(stage, config)
    retry = getattr(module, "retry_shard", None)
    if failed_only and force:
        raise PipelineError("--force and --failed-only exclude each other: --force redoes whole shards")
    if failed_only and retry is None:
        raise PipelineError(f"stage {stage!r} cannot redo single rows (it has no retry_shard); use --force")
    storage = storage or Storage(config.root, config.storage_options, config.work_dir)
    storage.check_reachable()
    storage.ensure_run_meta({"shard_size": config.shard_size})
    resources = {} if resources is None else resources
    fingerprint = config.fingerprint(stage)
    report = RunReport(stage=stage)
    input_stage = getattr(module, "INPUT_STAGE", None)

    prepare = getattr(module, "prepare", None)
    if prepare is not None:
        prepare(RunContext(config, storage, stage, shards, resources, log))

    done = storage.committed(stage, fingerprint)
    upstream = storage.markers(input_stage) if input_stage else {}

    def is_current(shard: int) -> bool:
        marker = done.get(shard)
        if marker is None:
            return False
        if input_stage and shard in upstream:
            key = f"{input_stage}/{shard_name(shard)}"
            recorded = marker.get("inputs", {}).get(key)
            return recorded is None or recorded == marker_digest(upstream[shard])
        return True

    todo = [s for s in shards if force or not is_current(s)]
    redo_rows = {s: done[s] for s in shards if failed_only and s not in todo and _failed_rows(done[s]) > 0}
    todo = sorted([*todo, *redo_rows])
    report.skipped = [s for s in shards if s not in todo]
    if report.skipped:
        print(f"{stage}: skipping {len(report.skipped)} committed shard(s) [{format_shard_spec(report.skipped)}]", file=out)

    bar = tqdm(todo, desc=stage, unit="shard", disable=not progress or not todo, file=sys.stderr, leave=False)
    with preemption_signals():
        try:
            for shard in bar:
                _run_one(module, config, storage, stage, shard, fingerprint, resources, report, out,
                         previous=redo_rows.get(shard))
        except Preempted as sig:
            report.preempted = sig.signum
    bar.close()
    print(report.summary(), file=out)
    return report


class Heartbeat:
    """Refreshes a shard's `_running` claim every `interval` seconds, so `status` can tell a live task
    from a dead one (PIPELINE_HEARTBEAT_S, default 60). Stopped before the claim is released."""

    def __init__(self, storage: Storage, stage: str, shard: int, interval: float | None = None):
        self.storage, self.stage, self.shard = storage, stage, shard
        self.interval = interval if interval is not None else heartbeat_interval()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{shard}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.storage.claim(self.stage, self.shard)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.claim(self.stage, self.shard)
            except Exception:  # noqa: BLE001 - a missed heartbeat is not worth failing a shard
                log.debug("heartbeat of shard %s failed", shard_name(self.shard), exc_info=True)

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


def _run_one(module, config, storage, stage, shard, fingerprint, resources, report, out, previous=None) -> None:
    """Run (or, given the previous marker, retry the failed rows of) one shard inside a transaction,
    holding a heartbeat claim on it; on any exit its staging is removed and its claim released."""
    txn = None
    try:
        txn = storage.begin(stage, shard)
        with Heartbeat(storage, stage, shard):
            _run_claimed(module, config, storage, stage, shard, fingerprint, resources, report, out, txn, previous)
    finally:
        # Also reached when a signal lands between begin() and the shard's own handlers.
        if txn is not None and not txn.done:
            txn.cleanup()
        storage.release(stage, shard)


def _run_claimed(module, config, storage, stage, shard, fingerprint, resources, report, out, txn, previous) -> None:
    name = shard_name(shard)
    ctx = ShardContext(
        config=config, storage=storage, stage=stage, output_dir=module.OUTPUT_DIR,
        txn=txn, resources=resources, log=logging.getLogger(f"pipeline.{stage}"),
    )
    started = time.time()
    try:
        if previous is not None:
            stats = timed(lambda: module.retry_shard(ctx, shard, previous))
        else:
            stats = timed(lambda: module.run_shard(ctx, shard))
        if not isinstance(stats, ShardStats):
            raise TypeError(f"stage {stage}.run_shard returned {type(stats).__name__}, expected ShardStats")
        with open(ctx.output("_stats.json"), "w") as f:
            json.dump({"stage": stage, "shard": shard, **stats.to_dict()}, f, indent=2, sort_keys=True)
        txn.commit({
            "config_fingerprint": fingerprint,
            "inputs": ctx.inputs,
            "rows": {"total": stats.rows, "ok": stats.ok, "failed": stats.failed},
            "stats": stats.to_dict(),
            "started_at": started,
            **({"retry_of": previous.get("committed_at"), "retries": int(previous.get("retries", 0)) + 1}
               if previous is not None else {}),
        })
        storage.clear_failure(stage, shard)
        report.committed.append(shard)
        if previous is not None:
            report.retried.append(shard)
        report.stats[shard] = stats
        print(f"{stage} {name}: {stats.line()}", file=out, flush=True)
    except Exception as exc:  # noqa: BLE001 - isolate any shard failure (staging is removed by _run_one)
        message = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
        storage.record_failure(stage, shard, {
            "stage": stage, "shard": shard, "error": message, "error_type": type(exc).__name__,
            "traceback": traceback.format_exc(), "failed_at": now_iso(), **task_identity(),
        })
        report.failed[shard] = message
        print(f"{stage} {name}: FAILED: {message}", file=out, flush=True)
        log.debug("shard %s failed", name, exc_info=True)
