"""Status of a run, read from ROOT alone: per stage, committed / failed / running / stale / pending shards,
row counts, failure reasons and throughput.

A `_running` claim is *live* while its task is: a SLURM job still in squeue, a process still alive on this
host, or (when neither can be checked) a heartbeat newer than `stale_after` seconds. Claims of dead tasks
are shown as stale; their shards count as pending for `retry`.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.claims import DEFAULT_STALE_AFTER, judge
from pipeline.config import RunConfig, changed_settings
from pipeline.errors import PipelineError, SlurmError, clip
from pipeline.executors import job_states, live_jobs
from pipeline.executors.records import executor_of, submissions
from pipeline.markers import as_unit
from pipeline.runner import stale_inputs
from pipeline.shards import format_shard_spec, parse_shard_spec
from pipeline.stage import (
    PER_SHARD,
    WHOLE_RUN,
    InputCache,
    Stage,
    available_stages,
    load_stage,
    stage_modules,
)
from pipeline.storage import TMP_DIR, Storage, unit_name


@dataclass
class ClaimState:
    shard: int
    live: bool
    reason: str
    claim: dict[str, Any]


@dataclass
class Outdated:
    """A committed unit that no longer matches: settings that changed, inputs recommitted since."""

    unit: int | str
    settings: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs_changed: bool = False

    def reason(self, stage: str) -> str:
        parts = ["outputs missing or changed"] if self.outputs_changed else []
        if self.settings:
            parts.append("settings changed: " + ", ".join(f"{stage}.{s}" if s != "shard_size" else s
                                                          for s in self.settings[:6]))
        if self.inputs:
            more = f" (+{len(self.inputs) - 4} more)" if len(self.inputs) > 4 else ""
            parts.append("inputs recommitted since: " + ", ".join(self.inputs[:4]) + more)
        return "; ".join(parts)


@dataclass
class StageStatus:
    """One row of the status table. Units are shard ids, or names for a whole-run stage."""

    stage: str
    universe: list[int | str] | None
    committed: dict[int | str, dict[str, Any]]
    outdated: list[Outdated]
    failed: dict[int | str, dict[str, Any]]
    running: list[ClaimState]
    stale: list[ClaimState]
    staging_dirs: int = 0
    row_errors: Counter = field(default_factory=Counter)
    kind: str = PER_SHARD
    fingerprints: Counter = field(default_factory=Counter)
    """settings fingerprint -> committed units made with it (as recorded in the markers)."""
    orphaned_scratch: int = 0
    """Object-store roots: local staging folders of dead tasks on this host."""

    @property
    def pending(self) -> list[int | str] | None:
        """Units of the run that are neither committed, failed nor running (None if the run's shards are unknown)."""
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
        return sorted(s for s, m in self.committed.items() if isinstance(s, int) and m.get("rows", {}).get("failed", 0))

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
            "kind": self.kind,
            "committed": len(self.committed),
            "failed": len(self.failed),
            "running": len(self.running),
            "stale": len(self.stale),
            "pending": None if pending is None else len(pending),
            "outdated": len(self.outdated),
            "outdated_reasons": {unit_name(o.unit): o.reason(self.stage) for o in self.outdated},
            "rows_ok": self.rows_ok,
            "rows_failed": self.rows_failed,
            "rows_per_s": None if (r := self.task_rate()) is None else round(r, 1),
            "rows_per_s_wall": None if (w := self.wall_rate()) is None else round(w, 1),
            "quality": None if (q := self.quality()) is None else round(q, 3),
            "failed_shards": _spec(self.failed),
            "failure_reasons": sorted({clip(f.get("error", "?")) for f in self.failed.values()}),
            "stale_shards": _spec(c.shard for c in self.stale),
            "row_errors": dict(self.row_errors),
            "fingerprints": dict(self.fingerprints),
            "live_owners": [c.reason for c in self.running],
            "orphaned_scratch": self.orphaned_scratch,
        }


def _label(unit: int | str) -> str:
    return f"shard {unit}" if isinstance(unit, int) else unit_name(unit)


def _units(units: Iterable[int | str]) -> str:
    units = list(units)
    return ("shard(s) " if all(isinstance(u, int) for u in units) else "") + _spec(units)


def _spec(units: Iterable[int | str]) -> str:
    """A shard spec for shard ids; names joined by commas for whole-run units."""
    units = list(units)
    ints = [u for u in units if isinstance(u, int)]
    names = sorted(str(u) for u in units if not isinstance(u, int))
    return ",".join(x for x in [format_shard_spec(ints) if ints else "", *names] if x)


def mean_quality(markers: Iterable[Mapping[str, Any]]) -> float | None:
    """Running mean quality over committed units' markers (stats.extra quality_mean weighted by
    quality_scored, as a stage's quality monitor reports it); None when no unit was scored."""
    total = n = 0.0
    for m in markers:
        extra = m.get("stats", {}).get("extra", {})
        if extra.get("quality_mean") is not None and extra.get("quality_scored"):
            total += extra["quality_mean"] * extra["quality_scored"]
            n += extra["quality_scored"]
    return total / n if n else None


def gate_summary(markers: Iterable[Mapping[str, Any]]) -> str | None:
    """The qa gate over committed units' markers (stats.extra parsed / kept / gated / leak_rate / images_ok):
    'K of P parsed questions kept (r), leak rate l, k per image', or None when no unit reports a gate."""
    parsed = kept = gated = leaky = images = 0.0
    for m in markers:
        extra = m.get("stats", {}).get("extra", {})
        if extra.get("parsed") is None or extra.get("kept") is None:
            continue
        parsed += extra["parsed"]
        kept += extra["kept"]
        gated += extra.get("gated") or 0
        leaky += (extra.get("leak_rate") or 0.0) * (extra.get("gated") or 0)
        images += extra.get("images_ok") or 0
    if not parsed:
        return None
    return (f"{kept:.0f} of {parsed:.0f} parsed questions kept ({kept / parsed:.3f}), leak rate "
            f"{(leaky / gated if gated else 0.0):.3f}, {(kept / images if images else 0.0):.2f} kept per image")


def classify_claim(shard: int | str, claim: dict[str, Any], jobs: set[str] | None, stale_after: float,
                   now: float | None = None, live: Mapping[str, set[str]] | None = None) -> ClaimState:
    """Decide whether the task holding a claim is still alive (pipeline.claims.judge)."""
    owner = judge(claim, jobs, stale_after, now, live)
    return ClaimState(shard, owner.live, owner.reason, claim)


def run_universe(storage: Storage, stage: str) -> list[int] | None:
    """The run's shards: run.json num_shards when recorded, else every shard submitted for the stage."""
    meta = storage.run_meta() or {}
    total = meta.get("num_shards")
    if isinstance(total, int) and total > 0:
        return list(range(total))
    shards: set[int] = set()
    for record in submissions(storage, stage):
        shards.update(parse_shard_spec(record["shard_spec"]))
    return sorted(shards) if shards else None


def stage_status(config: RunConfig, storage: Storage, stage: str, jobs: set[str] | None,
                 stale_after: float = DEFAULT_STALE_AFTER, compare: bool = True,
                 cache: InputCache | None = None, declared: Stage | None = None,
                 claims: dict[str, dict[str, Any]] | None = None,
                 live: Mapping[str, set[str]] | None = None) -> StageStatus:
    """Everything `status` and `retry` need to know about one stage, from ROOT (plus squeue when present).

    A unit is committed when its marker and outputs are intact and every input it recorded is unchanged;
    with `compare` (a manifest or --set was given) its recorded settings must also match `config`'s. The
    others are outdated, with the setting or the input that changed.
    """
    cache = cache or InputCache(storage)
    kind = declared.kind if declared is not None else PER_SHARD
    markers = storage.done.all(stage)  # one listing, concurrent reads of what the marker index lacks
    intact_names = storage.done.intact(markers, whole_stage=True)
    cache.seed(stage, markers, intact_names)
    intact = {as_unit(k): m for k, m in markers.items() if k in intact_names}
    cache.prefetch_keys([key for m in intact.values() for key in (m.get("inputs", {}) or {})], whole_above=32)
    fingerprint = config.fingerprint(stage) if compare else None
    changes_of: dict[Any, list[str]] = {}
    committed: dict[int | str, dict[str, Any]] = {}
    outdated: list[Outdated] = []
    for unit, m in sorted(intact.items(), key=lambda kv: (isinstance(kv[0], str), str(kv[0]).zfill(12))):
        settings: list[str] = []
        if fingerprint is not None and m.get("config_fingerprint") != fingerprint:
            seen = m.get("config_fingerprint")
            if seen not in changes_of:  # one reading per distinct recorded configuration
                changes_of[seen] = changed_settings(m.get("config"), config, stage)
            settings = changes_of[seen]
        changed = stale_inputs(m, cache)
        if settings or changed:
            outdated.append(Outdated(unit, settings, changed))
        else:
            committed[unit] = m
    outdated += [Outdated(u, outputs_changed=True)
                 for u in sorted({as_unit(k) for k in markers} - set(intact), key=str)]
    failed = {as_unit(k): f for k, f in storage.unit_failures(stage).items() if as_unit(k) not in committed}
    if claims is None:
        claims = storage.unit_claims(stage)
    claim_states = [classify_claim(as_unit(k), c, jobs, stale_after, live=live) for k, c in sorted(claims.items())
                    if as_unit(k) not in committed]
    row_errors: Counter = Counter()
    for m in committed.values():
        row_errors.update(m.get("stats", {}).get("errors", {}))
    staging = 0
    if storage.is_local:
        try:
            staging = len(os.listdir(storage.path(TMP_DIR, stage)))
        except FileNotFoundError:
            staging = 0
    if kind == WHOLE_RUN:  # the configured unit when comparing with a configuration, else the units on record
        seen = sorted({*committed, *(o.unit for o in outdated), *failed}, key=str)
        universe: list[int | str] | None = ([declared.unit_of(config)] if compare and declared is not None
                                            else seen)
    else:
        universe = run_universe(storage, stage)  # type: ignore[assignment]
    return StageStatus(
        stage=stage,
        universe=universe,
        committed=committed,
        outdated=outdated,
        failed=failed,
        running=[c for c in claim_states if c.live],
        stale=[c for c in claim_states if not c.live],
        staging_dirs=staging,
        row_errors=row_errors,
        kind=kind,
        fingerprints=Counter(m.get("config_fingerprint", "?")[:8] for m in committed.values()),
        orphaned_scratch=len(storage.scratch_leftovers(stage)),
    )


def collect_status(config: RunConfig, only: str | None = None,
                   stale_after: float = DEFAULT_STALE_AFTER, compare: bool = True) -> list[dict[str, Any]]:
    """One plain dict per stage (counts, rows, rates, failed shards and reasons), e.g. for JSON output."""
    return [st.to_row() for st in collect_stage_status(config, only, stale_after, compare)]


def _scheduler(claim: dict[str, Any]) -> str | None:
    """The scheduler to ask about a claim's owner: 'slurm', an executor's name, or None."""
    return "slurm" if claim.get("slurm_job_id") else claim.get("executor")


def collect_stage_status(config: RunConfig, only: str | None = None,
                         stale_after: float = DEFAULT_STALE_AFTER, compare: bool = True) -> list[StageStatus]:
    storage = Storage(config.root, config.storage_options, config.work_dir)
    storage.check_reachable(create=False)
    declared = available_stages(config)
    cache = InputCache(storage)
    out = []
    live: dict[str, set[str]] = {}
    asked: set[str] = set()
    for stage in stage_modules(config):
        if only and stage != only:
            continue
        claims = storage.unit_claims(stage)
        fresh = [c for c in claims.values() if _scheduler(c) and _scheduler(c) not in asked]
        if fresh:  # each scheduler is asked once per status
            live.update(live_jobs(config, fresh))
            asked |= {_scheduler(c) for c in fresh}
        st = stage_status(config, storage, stage, live.get("slurm"), stale_after, compare, cache,
                          declared.get(stage), claims, live)
        if not (st.committed or st.outdated or st.failed or st.running or st.stale) and only is None:
            continue
        out.append(st)
    return out


def retry_shards(config: RunConfig, stage: str, *, failed_only: bool = False, shards: list[int] | None = None,
                 include_running: bool = False, stale_after: float | None = None,
                 compare: bool = True) -> list[int | str]:
    """Units of `stage` to redo: not committed (failed, never run, stale claims, outdated), or with
    `failed_only` committed shards whose manifests hold failed rows. Units of live tasks are left out unless
    asked. Without `compare` (no manifest given) units are judged by the settings their markers record. A
    whole-run stage answers with its unit names (the configured unit, or those on record)."""
    storage = Storage(config.root, config.storage_options, config.work_dir)
    storage.check_reachable(create=False)
    claims = storage.unit_claims(stage)
    live = live_jobs(config, claims.values())
    try:
        declared: Stage | None = load_stage(stage, config)
    except PipelineError:
        declared = None
    st = stage_status(config, storage, stage, live.get("slurm"), stale_after or DEFAULT_STALE_AFTER,
                      compare=compare, declared=declared, claims=claims, live=live)
    busy = set(st.committed) if include_running else set(st.committed) | {c.shard for c in st.running}
    if st.kind == WHOLE_RUN:
        return [] if failed_only else [u for u in (st.universe or []) if u not in busy]
    universe = shards if shards is not None else st.universe
    if failed_only:
        picked = st.shards_with_failed_rows
        return [s for s in picked if universe is None or s in set(universe)]
    if universe is None:
        raise SlurmError(
            f"cannot tell which shards stage {stage!r} should have under {storage.url()}: run.json has no "
            "num_shards and no submission is recorded under logs/; pass --shards"
        )
    return [s for s in universe if isinstance(s, int) and s not in busy]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def unit_progress(config: RunConfig, storage: Storage, st: StageStatus) -> dict[str, str]:
    """unit -> the stage's progress line (e.g. train's last step) for the whole-run units on record."""
    try:
        declared = load_stage(st.stage, config)
    except PipelineError:
        return {}
    if declared.progress is None:
        return {}
    units = {*map(str, st.committed), *(str(c.shard) for c in st.running), *map(str, st.failed),
             *(str(o.unit) for o in st.outdated), *(map(str, st.pending or []))}
    out = {}
    for unit in sorted(units):
        try:
            line = declared.progress(config, storage, unit)
        except Exception as exc:  # noqa: BLE001 - a progress line is informative only
            line = f"progress unreadable: {type(exc).__name__}: {exc}"
        if line:
            out[unit] = line
    return out


def executor_job_lines(config: RunConfig, storage: Storage, stages: Iterable[str]) -> dict[str, list[str]]:
    """stage -> 'Ray job <id> RUNNING: shards 0-99 in 10 task(s)' for each recorded submission of the stage that
    its cluster still runs (SLURM's through squeue, Ray's through its job API). One listing of ROOT/logs, one
    request per cluster."""
    from pipeline.executors import get_executor

    stages = set(stages)
    records = [r for r in submissions(storage) if r.get("job_id") and r.get("stage") in stages]
    lines: dict[str, list[str]] = {}
    for name in sorted({executor_of(r) for r in records}):
        mine = [r for r in records if executor_of(r) == name]
        try:
            label = get_executor(name, config).label
        except PipelineError:
            label = name
        states = job_states(config, name, [str(r["job_id"]) for r in mine], mine) or {}
        for r in mine:
            state = states.get(str(r["job_id"]))
            if state in ("PENDING", "RUNNING"):
                what = f"shards {r['shard_spec']} in {r['tasks']} task(s)" if r.get("shard_spec") else "one task"
                lines.setdefault(r["stage"], []).append(f"{label} job {r['job_id']} {state}: {what}")
    return lines


def print_status(config: RunConfig, only: str | None = None, out=None,
                 stale_after: float = DEFAULT_STALE_AFTER, compare: bool = True) -> int:
    """Print the table and, under it, failure reasons, outdated units, claims and row-level error counts.

    Without `compare` (no manifest given) units are judged by their markers alone: committed with the
    settings they were made with, which are listed; with it, units made with other settings are outdated
    and the setting that differs is named."""
    out = out or sys.stdout
    rows = collect_stage_status(config, only, stale_after, compare)
    if not rows:
        print(f"no stage has run under {config.root}", file=out)
        return 0
    storage = Storage(config.root, config.storage_options, config.work_dir)
    meta = storage.run_meta() or {}
    if compare and isinstance(meta.get("shard_size"), int) and meta["shard_size"] != config.shard_size:
        print(f"note: the configuration says shard_size={config.shard_size} but {config.root}/run.json records "
              f"shard_size={meta['shard_size']}: with it every shard would be numbered differently, so every "
              "shard shows as outdated (settings changed: shard_size). Use the run's manifest.", file=out)
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
    job_lines = executor_job_lines(config, storage, [st.stage for st in rows])
    for st in rows:
        if st.kind == WHOLE_RUN:
            for unit, m in st.committed.items():
                shards = m.get("shards", [])
                print(f"{st.stage}: {unit} committed {m.get('committed_at', '?')} from {len(shards)} input shard(s)"
                      + (f" [{format_shard_spec(shards)}]" if shards else ""), file=out)
            for unit, line in unit_progress(config, storage, st).items():
                print(f"{st.stage}: {unit} {line}", file=out)
        if not compare and st.fingerprints:
            made = ", ".join(f"{fp} ({n})" for fp, n in st.fingerprints.most_common())
            print(f"{st.stage}: committed with settings {made} as recorded in the markers; "
                  "pass --manifest to compare with a configuration", file=out)
        gate = gate_summary(st.committed.values())
        if gate:
            print(f"{st.stage}: {gate}", file=out)
        by_reason: dict[str, list[int | str]] = {}
        for unit, rec in st.failed.items():
            by_reason.setdefault(clip(" ".join(str(rec.get("error") or "?").split())), []).append(unit)
        for reason, units in sorted(by_reason.items()):
            print(f"{st.stage}: {_units(units)} FAILED: {reason}", file=out)
        by_outdated: dict[str, list[int | str]] = {}
        for o in st.outdated:
            by_outdated.setdefault(o.reason(st.stage), []).append(o.unit)
        for reason, units in sorted(by_outdated.items()):
            print(f"{st.stage}: {_units(units)} OUTDATED ({reason})", file=out)
        for c in st.stale:
            print(f"{st.stage}: {_label(c.shard)} has a stale claim ({c.reason}); `retry` will include it", file=out)
        for c in st.running:
            print(f"{st.stage}: {_label(c.shard)} running ({c.reason})", file=out)
        for line in job_lines.get(st.stage, []):
            print(f"{st.stage}: {line}", file=out)
        if st.row_errors:
            top = ", ".join(f"{k}: {v}" for k, v in st.row_errors.most_common(5))
            print(f"{st.stage}: failed rows in {format_shard_spec(st.shards_with_failed_rows)}: {top}", file=out)
        if st.orphaned_scratch:
            print(f"{st.stage}: {st.orphaned_scratch} local staging folder(s) of killed tasks on this host "
                  "(removed when those units rerun)", file=out)
        leftovers = st.staging_dirs - len(st.running)
        if leftovers > 0:
            print(f"{st.stage}: {leftovers} staging folder(s) of aborted units under {TMP_DIR}/{st.stage} "
                  "(removed when those units rerun)", file=out)
        if st.pending:
            print(f"{st.stage}: pending {'shards ' if st.kind == PER_SHARD else ''}{_spec(st.pending)}", file=out)
    return 0
