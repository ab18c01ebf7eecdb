"""What a stage is: a declared `Stage`, registered by name; and what it sees while it works.

A stage module declares itself once::

    STAGE = Stage(
        name="annotate", output_dir="captions", kind=PER_SHARD,
        inputs=(Input("download"), Input("qa", required=False), Input("train", required=False)),
        schema=CAPTION_SCHEMA, run_shard=run_shard, retry_shard=retry_shard, prepare=prepare,
        resources=Resources(gpus=1),
    )

Two kinds:
- per-shard: `run_shard(ctx, shard) -> ShardStats`; shard k derives from shard k of its inputs.
- whole-run: `run_whole(ctx, shards) -> ShardStats`, one unit of work over a set of input shards (a
  checkpoint, a report), committed as ROOT/_done/<stage>/<unit>.json.
The runner, slurm.py, status, the demo and browse read the declaration; stages never know how they are
scheduled. Every input a unit reads is recorded in its marker (`ctx.require_input` / `ctx.optional_input`)
with the digest of the upstream marker, so a recommitted input makes the consumer stale.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.config import EngineConfig, RunConfig
from pipeline.errors import MissingInputError, UnknownStageError
from pipeline.storage import ShardTransaction, Storage, unit_name

PER_SHARD = "per_shard"
WHOLE_RUN = "whole_run"

BUILTIN_STAGES: dict[str, str] = {
    "download": "stages.download",
    "qa": "stages.qa",
    "train": "stages.train",
    "annotate": "stages.annotate",
    "evaluate": "stages.evaluate",
}
"""Stage name -> module (its `STAGE`) or `module:attr`. Plugins add more through the manifest's `stages:`."""

STAGE_ORDER = list(BUILTIN_STAGES)

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


@dataclass
class ShardStats:
    """What a stage reports for one unit; saved as <output>_stats.json and in the marker."""

    rows: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    bytes_out: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def add_error(self, reason: str, count: int = 1) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + count

    @classmethod
    def from_statuses(cls, statuses: list[str], reasons: list[str | None], **kw: Any) -> ShardStats:
        """Stats from per-row status ('ok'/'error') and error reasons."""
        errs = Counter(r or "unknown" for s, r in zip(statuses, reasons, strict=True) if s != "ok")
        return cls(rows=len(statuses), ok=sum(s == "ok" for s in statuses), errors=dict(errs), **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        rate = f", {self.rows / self.seconds:.1f} rows/s" if self.seconds > 0 else ""
        errs = ""
        if self.errors:
            top = sorted(self.errors.items(), key=lambda kv: -kv[1])[:4]
            errs = " (" + ", ".join(f"{k}: {v}" for k, v in top) + ")"
        return f"{self.rows} rows, {self.ok} ok, {self.failed} failed{errs} in {self.seconds:.1f}s{rate}"


@dataclass(frozen=True)
class Input:
    """A stage this one reads: required (its absence is an error) or optional (used when committed)."""

    stage: str
    required: bool = True


@dataclass(frozen=True)
class Resources:
    """What one task of the stage needs; `submit` uses these as defaults. `gpus` is what a task takes when one
    of the stage's engines runs on a GPU (see `Stage.needs`)."""

    cpus: int = 1
    gpus: int = 0


def engine_wants_gpu(cfg: EngineConfig) -> bool:
    """A local model on a GPU: hf or vllm not pinned to the CPU (noop, the rule reader and openai need none here)."""
    return cfg.backend in ("hf", "vllm") and cfg.device != "cpu"


@dataclass(frozen=True)
class Stage:
    """A stage's declaration (see the module docstring)."""

    name: str
    output_dir: str
    kind: str = PER_SHARD
    inputs: tuple[Input, ...] = ()
    schema: pa.Schema | None = field(default=None, repr=False)
    """The pyarrow schema of its parquet manifest (browse and the shard I/O module use it)."""
    run_shard: Callable[[ShardContext, int], ShardStats] | None = None
    run_whole: Callable[[ShardContext, list[int]], ShardStats] | None = None
    retry_shard: Callable[[ShardContext, int, dict[str, Any]], ShardStats] | None = None
    prepare: Callable[[RunContext], None] | None = None
    unit: Callable[[RunConfig], str] | None = None
    """whole-run: the name of the unit it commits (default 'all'), e.g. an evaluation's name."""
    default_shards: Callable[[RunConfig, Storage], list[int]] | None = None
    """whole-run: the input shards used when none are given (default: every committed shard of its first
    required input)."""
    shard_count: Callable[[RunConfig, Storage], int | None] | None = None
    """per-shard: how many shards its input has (shards beyond are refused up front); default: run.json's
    num_shards when recorded. None from the callable means unknown (no check)."""
    resources: Resources = Resources()
    engines: Callable[[RunConfig], dict[str, EngineConfig]] | None = None
    """The engines a unit of the stage uses under a configuration, by setting ('annotate.captioner': cfg): what
    `submit` sizes GPUs by and what the runner checks (model paths, endpoints) before the first unit."""
    progress: Callable[[RunConfig, Storage, str], str | None] | None = None
    """whole-run: one line on how far a unit has got (e.g. train's last step), shown by `status`."""
    launcher: str | None = None
    """whole-run: 'accelerate' when one unit may span several GPUs: `submit --gpus N` (N > 1) starts it with
    `accelerate launch` on N processes; rank 0 claims and commits, the other ranks only compute."""
    redo_on_new_settings: bool = False
    """Whether a unit committed with other settings is simply redone (evaluate: its report is remade from its
    caption cache). Otherwise `run` refuses to replace it without --force, naming the changed settings."""
    description: str = ""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise UnknownStageError(f"stage name {self.name!r} must be lower-case letters, digits, '_' or '-'")
        if not self.output_dir or self.output_dir.startswith(("/", "_")) or ".." in self.output_dir.split("/"):
            raise UnknownStageError(f"stage {self.name!r}: output_dir {self.output_dir!r} must be a relative folder "
                                    "not starting with '_'")
        if self.kind not in (PER_SHARD, WHOLE_RUN):
            raise UnknownStageError(f"stage {self.name!r}: kind must be {PER_SHARD!r} or {WHOLE_RUN!r}")
        if self.kind == PER_SHARD and self.run_shard is None:
            raise UnknownStageError(f"per-shard stage {self.name!r} declares no run_shard")
        if self.kind == WHOLE_RUN and self.run_whole is None:
            raise UnknownStageError(f"whole-run stage {self.name!r} declares no run_whole")

    @property
    def whole_run(self) -> bool:
        return self.kind == WHOLE_RUN

    def needs(self, config: RunConfig) -> Resources:
        """The resources a task takes under `config`: the declared GPUs only when one of its engines wants a GPU."""
        if self.engines is None or any(engine_wants_gpu(e) for e in self.engines(config).values()):
            return self.resources
        return Resources(cpus=self.resources.cpus, gpus=0)

    def unit_of(self, config: RunConfig) -> str:
        """The marker name of a whole-run stage's unit."""
        name = self.unit(config) if self.unit else "all"
        unit_name(name)  # validates
        return name


@dataclass
class RunContext:
    """What a stage's `prepare` sees: the whole run."""

    config: RunConfig
    storage: Storage
    stage: str
    shards: list[int]
    resources: dict[str, Any]
    log: logging.Logger


class InputCache:
    """Upstream markers read once per run and shared by the runner's staleness check and the stages.

    A task asks for its own inputs by name (`committed`, `prefetch`): its reads do not grow with the root.
    Whole-root views (status) hand it the stages they have read whole (`seed`) or let it read a stage whole
    when asked about many of its units at once."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self._checked: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._whole: set[str] = set()

    def committed(self, stage: str, unit: int | str) -> dict[str, Any] | None:
        """The upstream marker if that unit is committed (outputs present with their sizes), else None."""
        key = (stage, unit_name(unit))
        if key not in self._checked:
            if stage in self._whole:
                return None
            self.prefetch(stage, [unit])
        return self._checked[key]

    def prefetch(self, stage: str, units: list[int | str] | list[str]) -> None:
        """Read the markers of these units of `stage` that are not cached yet, concurrently, by name."""
        names = [n for n in dict.fromkeys(unit_name(u) for u in units)
                 if (stage, n) not in self._checked and stage not in self._whole]
        if not names:
            return
        found = self.storage.done.get_many(stage, names)
        good = self.storage.done.intact(found)
        for n in names:
            self._checked[(stage, n)] = found[n] if n in good else None

    def prefetch_keys(self, keys: list[str], whole_above: int = 256) -> None:
        """Prefetch input keys 'stage/unit'; a stage asked about more than `whole_above` units is read whole
        (one listing and the marker index) instead of by name."""
        by_stage: dict[str, list[str]] = {}
        for key in keys:
            stage, _, unit = key.partition("/")
            by_stage.setdefault(stage, []).append(unit)
        for stage, units in by_stage.items():
            if len(units) > whole_above and stage not in self._whole:
                markers = self.storage.done.all(stage)
                self.seed(stage, markers, self.storage.done.intact(markers, whole_stage=True))
            else:
                self.prefetch(stage, units)

    def seed(self, stage: str, markers: dict[str, dict[str, Any]], intact: set[str]) -> None:
        """Take a whole stage read elsewhere (status): `markers` are all of them, `intact` the committed ones."""
        self._whole.add(stage)
        self._checked = {k: v for k, v in self._checked.items() if k[0] != stage}
        for name, marker in markers.items():
            self._checked[(stage, name)] = marker if name in intact else None

    def digest(self, key: str) -> str | None:
        """The current digest of an input key 'stage/unit' (None when not committed)."""
        stage, _, unit = key.partition("/")
        marker = self.committed(stage, unit)
        return None if marker is None else marker_digest(marker)

    def matches(self, key: str, recorded: str | None) -> bool:
        """Whether input `key` still has the digest a consumer recorded (in today's form or the older one that
        counted the unit's records too, so markers of older versions stay current)."""
        current = self.digest(key)
        if current == recorded:
            return True
        stage, _, unit = key.partition("/")
        marker = self.committed(stage, unit)
        return marker is not None and marker_digest(marker, with_records=True) == recorded

    def forget(self, stage: str) -> None:
        self._whole.discard(stage)
        self._checked = {k: v for k, v in self._checked.items() if k[0] != stage}


@dataclass
class ShardContext:
    """What a stage's `run_shard` / `run_whole` sees: config, storage, where to write, shared resources,
    stop requests, and the inputs it records."""

    config: RunConfig
    storage: Storage
    stage: str
    output_dir: str
    txn: ShardTransaction
    resources: dict[str, Any]
    log: logging.Logger
    stop_requested: Callable[[], bool] = lambda: False
    inputs: dict[str, str | None] = field(default_factory=dict)
    cache: InputCache | None = None
    shards: list[int] = field(default_factory=list)
    """whole-run: the input shards of this unit (per-shard: [shard])."""

    @property
    def unit(self) -> str:
        return unit_name(self.txn.unit)

    @property
    def shard(self) -> int:
        if not isinstance(self.txn.unit, int):
            raise TypeError(f"stage {self.stage} is whole-run: it has no shard")
        return self.txn.unit

    def output(self, suffix: str) -> str:
        """Local path to write ROOT/<output_dir>/<unit><suffix> (e.g. '.tar', '.parquet'); committed atomically."""
        return self.txn.path(f"{self.output_dir}/{self.unit}{suffix}")

    def output_file(self, name: str) -> str:
        """Local path to write ROOT/<output_dir>/<unit>/<name> (a whole-run unit's folder of files)."""
        return self.txn.path(f"{self.output_dir}/{self.unit}/{name}")

    def output_rel(self, rel: str) -> str:
        """Local path for an arbitrary output ROOT/<rel> of this unit."""
        return self.txn.path(rel)

    def _cache(self) -> InputCache:
        if self.cache is None:
            self.cache = InputCache(self.storage)
        return self.cache

    def require_input(self, stage: str, unit: int | str | None = None) -> dict[str, Any]:
        """The committed upstream marker (clear error if missing); recorded as this unit's input."""
        u = self.txn.unit if unit is None else unit
        marker = self._cache().committed(stage, u)
        if marker is None:
            raise self.storage.missing_input(stage, u)
        self.inputs[f"{stage}/{unit_name(u)}"] = marker_digest(marker)
        return marker

    def optional_input(self, stage: str, unit: int | str | None = None) -> dict[str, Any] | None:
        """The upstream marker if committed, else None; recorded either way (its later arrival or
        recommit makes this unit stale)."""
        u = self.txn.unit if unit is None else unit
        marker = self._cache().committed(stage, u)
        self.inputs[f"{stage}/{unit_name(u)}"] = None if marker is None else marker_digest(marker)
        return marker

    def input_folder(self, stage: str, unit: str) -> str:
        """A local folder holding a committed whole-run unit's artifact (e.g. train's checkpoint), recorded as
        an input. On an object store the folder is fetched once per digest into local scratch."""
        marker = self.require_input(stage, unit)
        rel = marker.get("artifact")
        if not rel:
            raise MissingInputError(f"{stage}/{unit} records no artifact folder")
        if self.storage.is_local:
            return self.storage.path(rel)
        local = os.path.join(self.storage.work_dir or tempfile.gettempdir(), "pipeline-artifacts",
                             f"{stage}-{unit}-{marker_digest(marker)}")
        if not os.path.isdir(local):
            tmp = f"{local}.part-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            prefix = rel.rstrip("/") + "/"
            for out_rel in marker.get("outputs", {}):
                if out_rel.startswith(prefix):
                    target = os.path.join(tmp, out_rel[len(prefix):])
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    self.storage.fs.get_file(self.storage.path(out_rel), target)
            os.replace(tmp, local)
        return local

    def resource(self, key: str, factory: Callable[[], Any]) -> Any:
        """A shared object (an engine, a tokenizer) created once per process and reused by every unit."""
        if key not in self.resources:
            self.resources[key] = factory()
        return self.resources[key]


RECORD_SUFFIXES = ("_stats.json", "_summary.json")
"""Outputs that tell how a unit was made (timings, counts: `00042_stats.json`, `train_summary.json`), not what it
holds. A unit's digest leaves them out, so redoing a unit into the same bytes (`train --force` with the same
weights) does not make its consumers stale."""


def marker_digest(marker: dict[str, Any], with_records: bool = False) -> str:
    """A digest of a marker's content outputs: changes iff the committed data (not its records) change.
    with_records: the digest as recorded before records were left out (markers written by older versions)."""
    outputs = {k: v for k, v in marker.get("outputs", {}).items() if with_records or not k.endswith(RECORD_SUFFIXES)}
    blob = json.dumps(outputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def stage_modules(config: RunConfig) -> dict[str, str]:
    """Registered stage name -> module target (built-ins, then the manifest's plugins)."""
    return {**BUILTIN_STAGES, **config.stages}


def stage_folders(config: RunConfig) -> dict[str, str]:
    """Registered stage name -> its output folder (the name `browse` gives its table: captions, images, eval)."""
    out = {}
    for name in stage_modules(config):
        try:
            out[name] = load_stage(name, config).output_dir
        except Exception:  # noqa: BLE001 - a broken plugin is reported when it is used, not here
            continue
    return out


def resolve_stage_name(name: str, config: RunConfig) -> str:
    """A stage named by its name or, where that is unambiguous, by its output folder (captions -> annotate,
    images -> download, eval -> evaluate); else UnknownStageError listing the valid names."""
    mapping = stage_modules(config)
    if name in mapping:
        return name
    folders = stage_folders(config)
    matches = [stage for stage, folder in folders.items() if folder == name]
    if len(matches) == 1:
        return matches[0]
    valid = ", ".join(f"{s} ({folders[s]})" if folders.get(s, s) != s else s for s in mapping)
    what = f" (it names the output of stages {', '.join(matches)})" if matches else ""
    raise UnknownStageError(f"unknown stage {name!r}{what}; stages (output folder): {valid}")


def load_stage(name: str, config: RunConfig) -> Stage:
    """The declared Stage registered under `name` (built-in or a plugin from the manifest)."""
    mapping = stage_modules(config)
    if name not in mapping:
        raise UnknownStageError(f"unknown stage {name!r}; known stages: {', '.join(mapping)}")
    target = mapping[name]
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise UnknownStageError(f"stage {name!r} is not available yet ({module_name} is missing)") from None
        raise
    declared = getattr(module, attr or "STAGE", None)
    if not isinstance(declared, Stage):
        raise UnknownStageError(f"stage {name!r} ({target}) declares no Stage"
                                + ("" if attr else " named STAGE") + "; see pipeline/stage.py")
    if declared.name != name:
        raise UnknownStageError(f"stage registered as {name!r} ({target}) declares itself {declared.name!r}")
    return declared


def available_stages(config: RunConfig) -> dict[str, Stage]:
    """Registered stages whose modules exist in this checkout, by name, in registration order."""
    out = {}
    for name in stage_modules(config):
        try:
            out[name] = load_stage(name, config)
        except UnknownStageError:
            continue
    return out


def timed(fn: Callable[[], ShardStats]) -> ShardStats:
    t0 = time.perf_counter()
    stats = fn()
    stats.seconds = round(time.perf_counter() - t0, 3)
    return stats


__all__ = [
    "PER_SHARD", "WHOLE_RUN", "Input", "InputCache", "Resources", "RunContext", "ShardContext", "ShardStats",
    "Stage", "available_stages", "load_stage", "marker_digest", "stage_modules", "timed",
]
