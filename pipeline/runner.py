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

from pipeline.claims import ClaimHeld
from pipeline.config import RunConfig, changed_settings, same_settings
from pipeline.errors import PipelineError, Preempted, SettingsChangedError, StorageError
from pipeline.preflight import check_engines
from pipeline.redact import redact_text
from pipeline.shards import format_shard_spec
from pipeline.stage import InputCache, RunContext, ShardContext, ShardStats, Stage, load_stage, timed
from pipeline.storage import Claim, Storage, now_iso, task_identity, unit_name

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
    held: dict[int | str, str] = field(default_factory=dict)
    """Units skipped because a live owner held their claim: unit -> owner."""
    skipped_late: list[int | str] = field(default_factory=list)
    """Units another run committed between this run's plan and its claim."""

    @property
    def exit_code(self) -> int:
        if self.preempted is not None:
            return EXIT_PREEMPTED
        return EXIT_SHARDS_FAILED if self.failed else EXIT_OK

    def summary(self) -> str:
        parts = [f"{self.stage}: {len(self.committed)} committed, {len(self.skipped)} skipped (already committed)"]
        if self.retried:
            parts.append(f"{len(self.retried)} with failed rows redone [{format_shard_spec(self.retried)}]")
        if self.held:
            parts.append(f"{len(self.held)} left to their live owners")
        if self.skipped_late:
            parts.append(f"{len(self.skipped_late)} committed meanwhile by another run")
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
    if not declared.whole_run and shards is None:
        raise PipelineError(f"stage {stage!r} runs per shard: give --shards")
    storage = storage or Storage(config.root, config.storage_options, config.work_dir)
    storage.check_reachable()
    with unreachable_as_one_line(storage):
        return _run_planned(config, declared, storage, shards, force=force, failed_only=failed_only,
                            resources=resources, progress=progress, out=out)


@contextlib.contextmanager
def unreachable_as_one_line(storage: Storage) -> Iterator[None]:
    """A backend error while planning (reading run.json or markers) from a root that went away becomes the
    one-line StorageError; any other error passes through unchanged."""
    try:
        yield
    except (PipelineError, Preempted):
        raise
    except Exception:
        storage.check_reachable(create=False)
        raise


def _run_planned(config: RunConfig, declared: Stage, storage: Storage, shards: list[int] | None, *, force: bool,
                 failed_only: bool, resources: dict[str, Any] | None, progress: bool, out: Any) -> RunReport:
    stage = declared.name
    storage.check_run_meta({"shard_size": config.shard_size})  # refuse a renumbering before any work
    storage.drop_dead_writes(config.claim_stale_s)  # temporaries of writers killed mid-write (local roots)
    preflight = not resources  # engines handed in by the caller (tests, a long-lived process) are built already
    resources = {} if resources is None else resources
    cache = InputCache(storage)
    if declared.whole_run:
        shards = whole_run_shards(declared, config, storage, shards)
    report = RunReport(stage=stage)

    if not declared.whole_run:
        check_shard_range(declared, config, storage, shards)
    work = _Work(declared, config, storage, resources, cache, report, out, force=force)
    units = [declared.unit_of(config)] if declared.whole_run else list(shards)
    found = storage.committed_many(stage, units)  # this task's own markers, by name, whatever their settings
    if not force and not declared.redo_on_new_settings:
        refuse_changed_settings(declared, found, work.fingerprint, config)
    done = {u: m for u, m in found.items() if same_settings(m, work.fingerprint, config, stage)}
    if declared.prepare is not None:
        declared.prepare(RunContext(config, storage, stage, shards, resources, log))
    # Written only once the arguments and inputs are known good: a usage error leaves no run.json behind.
    storage.ensure_run_meta({"shard_size": config.shard_size})

    if declared.whole_run:
        unit = units[0]
        marker = done.get(unit)
        if marker is not None:
            cache.prefetch_keys(list(marker.get("inputs", {}) or {}))
        if not force and marker is not None and is_current(marker, cache, shards, declared):
            report.skipped = [0]
            storage.drop_dead_scratch(stage, [unit])
            storage.drop_dead_claims(stage, [unit], config.claim_stale_s)
            print(f"{stage}: {unit} is committed and current; skipping (--force redoes it)", file=out)
        else:
            if preflight:
                check_engines(declared, config)
            with preemption_signals():
                try:
                    work.run(unit, shards)
                except Preempted as sig:
                    report.preempted = sig.signum
        print(report.summary(), file=out)
        return report

    cache.prefetch_keys([key for m in done.values() for key in (m.get("inputs", {}) or {})])
    todo = [s for s in shards if force or s not in done or not is_current(done[s], cache)]
    redo_rows = {s: done[s] for s in shards if failed_only and s not in todo and _failed_rows(done[s]) > 0}
    todo = sorted([*todo, *redo_rows])
    report.skipped = [s for s in shards if s not in todo]
    storage.drop_dead_scratch(stage, report.skipped)
    storage.drop_dead_claims(stage, report.skipped, config.claim_stale_s)
    if report.skipped:
        print(f"{stage}: skipping {len(report.skipped)} committed shard(s) [{format_shard_spec(report.skipped)}]", file=out)

    if todo and preflight:
        check_engines(declared, config)
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


def refuse_changed_settings(declared: Stage, found: dict[int | str, dict[str, Any]], fingerprint: str,
                            config: RunConfig) -> None:
    """Refuse, with one line, to replace committed units (`found`: unit -> marker) that were made with other
    settings (their outputs would be lost): name the changed settings and the ways on (--force, a new --root).
    Units `import-qa` committed from a published file are not refused: their source keeps them."""
    changed: set[str] = set()
    other = []
    for unit, marker in found.items():
        if marker.get("imported_from"):  # import-qa's units: rederiving them (e.g. re-gating) loses nothing
            continue
        if marker.get("config_fingerprint") != fingerprint:
            changes = changed_settings(marker.get("config"), config, declared.name)
            if changes:
                other.append(unit)
                changed.update(changes)
    if not other:
        return
    names = ", ".join(f"{declared.name}.{k}" if k != "shard_size" else k for k in sorted(changed)[:6])
    more = f" (+{len(changed) - 6} more)" if len(changed) > 6 else ""
    label = "shard(s) " + format_shard_spec(sorted(other)) if not declared.whole_run else ", ".join(map(str, other))
    raise SettingsChangedError(
        f"refusing to replace {declared.name} {label}, committed with other settings (changed: {names}{more}); "
        f"--force replaces them (their outputs are lost), or use a new --root to keep both")


def check_shard_range(declared: Stage, config: RunConfig, storage: Storage, shards: list[int]) -> None:
    """Refuse, with one line, shard ids beyond the stage's input (run.json's num_shards by default)."""
    if declared.shard_count is not None:
        count = declared.shard_count(config, storage)
        where = f"the input of stage {declared.name!r}"
    else:
        count = (storage.run_meta() or {}).get("num_shards")
        where = f"the run ({storage.url('run.json')})"
    if not isinstance(count, int):
        return
    beyond = [s for s in shards if s >= count]
    if beyond:
        have = f"shards 0-{count - 1}" if count else "no shards"
        raise PipelineError(f"shard(s) {format_shard_spec(beyond)} are beyond {where}, which has {count} shard(s) "
                            f"({have}); nothing was run")


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
    if stale_inputs(marker, cache):
        return False
    if shards is not None and declared is not None and declared.whole_run:
        if sorted(marker.get("shards", [])) != sorted(shards):
            return False
    return True


def stale_inputs(marker: dict[str, Any], cache: InputCache) -> list[str]:
    """The recorded inputs ('stage/unit') whose current digest differs from the one the marker recorded."""
    return sorted(k for k, d in (marker.get("inputs", {}) or {}).items() if not cache.matches(k, d))


class Heartbeat:
    """Refreshes a held claim every `interval` seconds, so `status` and other runs can tell a live task from
    a dead one (PIPELINE_HEARTBEAT_S, default 60). `lost` is set when another owner took the claim over."""

    def __init__(self, claim: Claim, interval: float | None = None):
        self.claim = claim
        self.interval = interval if interval is not None else heartbeat_interval()
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{claim.unit}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.claim.beat():
                    self.lost = True
                    return
            except Exception:  # noqa: BLE001 - a missed heartbeat is not worth failing a unit
                log.debug("heartbeat of %s failed", unit_name(self.claim.unit), exc_info=True)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def secondary_rank() -> bool:
    """Whether this process is a non-zero rank of a distributed launch (RANK set by accelerate / torchrun)."""
    try:
        return int(os.environ.get("RANK", "0") or 0) > 0
    except ValueError:
        return False


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
    force: bool = False
    fingerprint: str = ""
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.fingerprint = self.config.fingerprint(self.declared.name)

    def run(self, unit: int | str, shards: list[int], previous: dict[str, Any] | None = None) -> None:
        """Run (or, given the previous marker, retry the failed rows of) one unit under an exclusive claim.
        A unit claimed by a live owner is skipped; any error, storage faults included, becomes this unit's
        failure (recorded if the storage allows) and the run goes on."""
        stage, name = self.declared.name, unit_name(unit)
        if self.declared.whole_run and secondary_rank():
            self._secondary(unit, shards)
            return
        try:
            claim = self.storage.acquire(stage, unit, self.config.claim_stale_s)
        except ClaimHeld as held:
            self.report.held[unit] = held.who
            print(f"{stage} {name}: skipped, claimed by {held.who} ({held.reason})", file=self.out, flush=True)
            return
        except Exception as exc:  # noqa: BLE001 - a storage fault while claiming fails this unit only
            self._fail(unit, exc)
            return
        txn = None
        try:
            if previous is None and self._now_current(unit, shards):
                self.report.skipped_late.append(unit)
                print(f"{stage} {name}: committed meanwhile by another run; skipping", file=self.out, flush=True)
                return
            with Heartbeat(claim) as beat:
                txn = self.storage.begin(stage, unit)
                self._claimed(unit, shards, txn, previous, beat)
        except Exception as exc:  # noqa: BLE001 - e.g. staging could not be created
            self._fail(unit, exc)
        finally:
            # Also reached when a signal lands between begin() and the unit's own handlers.
            if txn is not None and not txn.done:
                txn.cleanup()
            try:
                claim.release()
            except Exception as exc:  # noqa: BLE001 - a claim left behind is judged stale later
                log.debug("could not release the claim of %s/%s: %s: %s", stage, name, type(exc).__name__, exc)

    def _now_current(self, unit: int | str, shards: list[int]) -> bool:
        """Whether another run committed this unit (current) between our plan and our claim; with --force,
        whether another run committed it after this run started (it did this run's work already)."""
        marker = self.storage.marker(self.declared.name, unit)
        if marker is None or not same_settings(marker, self.fingerprint, self.config, self.declared.name):
            return False
        if self.force and not float(marker.get("started_at") or 0) >= self.started:
            return False
        self.cache.forget(self.declared.name)
        return self.storage.outputs_intact(marker) and is_current(marker, self.cache, shards, self.declared)

    def _fail(self, unit: int | str, exc: BaseException) -> None:
        """Record a unit's failure (if the storage lets us) and report it in one line."""
        stage, name = self.declared.name, unit_name(unit)
        message = redact_text(str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}")
        try:
            self.storage.record_failure(stage, unit, {
                "stage": stage, "unit": name, **({"shard": unit} if isinstance(unit, int) else {}),
                "error": message, "error_type": type(exc).__name__,
                "traceback": redact_text("".join(traceback.format_exception(exc))), "failed_at": now_iso(), **task_identity(),
            })
        except Exception as rec_exc:  # noqa: BLE001 - the storage itself is failing: say so, go on
            message += f" (and the failure could not be recorded: {type(rec_exc).__name__}: {rec_exc})"
        self.report.failed[unit if isinstance(unit, int) else 0] = message
        print(f"{stage} {name}: FAILED: {message}", file=self.out, flush=True)
        log.debug("unit %s failed", name, exc_info=exc)
        if not isinstance(exc, PipelineError) or isinstance(exc, StorageError):  # any backend error: is ROOT gone?
            try:
                self.storage.check_reachable(create=False)
            except StorageError as unreachable:
                raise StorageError(f"{unreachable}; stopping the run ({stage} {name} was the last unit tried)") from None

    def _secondary(self, unit: int | str, shards: list[int]) -> None:
        """A non-zero rank of a multi-process unit (`accelerate launch`): compute beside rank 0, which holds
        the claim and commits; this rank's own outputs are staged privately and dropped."""
        txn = self.storage.begin(self.declared.name, unit)
        try:
            self.declared.run_whole(self._context(shards, txn), list(shards))  # type: ignore[misc]
        finally:
            txn.cleanup()

    def _context(self, shards: list[int], txn) -> ShardContext:
        stage = self.declared.name
        return ShardContext(
            config=self.config, storage=self.storage, stage=stage, output_dir=self.declared.output_dir,
            txn=txn, resources=self.resources, log=logging.getLogger(f"pipeline.{stage}"),
            cache=self.cache, shards=list(shards),
        )

    def _claimed(self, unit: int | str, shards: list[int], txn, previous: dict[str, Any] | None,
                 beat: Heartbeat) -> None:
        declared, stage = self.declared, self.declared.name
        name = unit_name(unit)
        ctx = self._context(shards, txn)
        started = time.time()
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
        if beat.lost:
            raise PipelineError(f"the claim on {stage} {name} was taken over by another run; not committing")
        _commit_hook()
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
        try:
            self.storage.clear_failure(stage, unit)
        except Exception as exc:  # noqa: BLE001 - the unit is committed; an old failure record is only noise
            log.warning("could not clear the failure record of %s/%s: %s", stage, name, exc)
        key = unit if isinstance(unit, int) else 0
        self.report.committed.append(key)
        if previous is not None:
            self.report.retried.append(key)
        self.report.stats[key] = stats
        print(f"{stage} {name}: {stats.line()}", file=self.out, flush=True)


def _commit_hook() -> None:
    """Test hook (PIPELINE_TEST_COMMIT_DELAY_S): widen the window just before a commit, so chaos trials can
    kill a task mid-commit. Unset in production."""
    delay = os.environ.get("PIPELINE_TEST_COMMIT_DELAY_S")
    if delay:
        time.sleep(float(delay))
