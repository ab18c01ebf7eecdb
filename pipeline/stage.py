"""What a stage is: a module with `run_shard(ctx, shard) -> ShardStats`, found by name in a registry.

A stage module defines::

    NAME = "annotate"            # the stage's name (also its _done/<NAME> folder)
    OUTPUT_DIR = "captions"      # where its per-shard outputs live under ROOT
    INPUT_STAGE = "download"     # the upstream stage whose shard k feeds shard k (or None)
    def run_shard(ctx: ShardContext, shard: int) -> ShardStats: ...
    def prepare(run: RunContext) -> None: ...      # optional, once per run before any shard

Stages never know how they are scheduled: the runner (local) and slurm.py (arrays) call them the same way.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import UnknownStageError
from pipeline.shards import shard_name
from pipeline.storage import ShardTransaction, Storage

BUILTIN_STAGES: dict[str, str] = {
    "download": "stages.download",
    "qa": "stages.qa",
    "train": "stages.train",
    "annotate": "stages.annotate",
    "evaluate": "stages.evaluate",
}
"""Stage name -> module. Plugins add more through the manifest's `stages:` mapping."""

STAGE_ORDER = list(BUILTIN_STAGES)


@dataclass
class ShardStats:
    """What a stage reports for one shard; saved as <OUTPUT_DIR>/<shard>_stats.json and in the marker."""

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


@dataclass
class RunContext:
    """What a stage's `prepare` sees: the whole run."""

    config: RunConfig
    storage: Storage
    stage: str
    shards: list[int]
    resources: dict[str, Any]
    log: logging.Logger


@dataclass
class ShardContext:
    """What a stage's `run_shard` sees: config, storage, where to write, shared resources, stop requests."""

    config: RunConfig
    storage: Storage
    stage: str
    output_dir: str
    txn: ShardTransaction
    resources: dict[str, Any]
    log: logging.Logger
    stop_requested: Callable[[], bool] = lambda: False
    inputs: dict[str, str] = field(default_factory=dict)

    def output(self, suffix: str) -> str:
        """Local path to write ROOT/<OUTPUT_DIR>/<shard><suffix> (e.g. '.tar', '.parquet'); committed atomically."""
        return self.txn.path(f"{self.output_dir}/{shard_name(self.txn.shard)}{suffix}")

    def output_rel(self, rel: str) -> str:
        """Local path for an arbitrary output ROOT/<rel> of this shard."""
        return self.txn.path(rel)

    def require_input(self, stage: str, shard: int | None = None) -> dict[str, Any]:
        """The committed upstream marker (clear error if missing); recorded as this shard's input provenance."""
        s = self.txn.shard if shard is None else shard
        marker = self.storage.require_committed(stage, s)
        self.inputs[f"{stage}/{shard_name(s)}"] = marker_digest(marker)
        return marker

    def resource(self, key: str, factory: Callable[[], Any]) -> Any:
        """A shared object (an engine, a tokenizer) created once per process and reused by every shard."""
        if key not in self.resources:
            self.resources[key] = factory()
        return self.resources[key]


def marker_digest(marker: dict[str, Any]) -> str:
    """A digest of a marker's outputs: changes iff the committed files change."""
    blob = json.dumps(marker.get("outputs", {}), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def stage_modules(config: RunConfig) -> dict[str, str]:
    return {**BUILTIN_STAGES, **config.stages}


def load_stage(name: str, config: RunConfig) -> ModuleType:
    """Import the stage module registered under `name` (built-in or a plugin from the manifest)."""
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
    if attr:
        module = getattr(module, attr)
    for needed in ("run_shard", "OUTPUT_DIR"):
        if not hasattr(module, needed):
            raise UnknownStageError(f"stage {name!r} ({target}) does not define {needed}")
    return module


def available_stages(config: RunConfig) -> list[str]:
    """Registered stages whose modules exist in this checkout."""
    out = []
    for name in stage_modules(config):
        try:
            load_stage(name, config)
        except UnknownStageError:
            continue
        out.append(name)
    return out


def timed(fn: Callable[[], ShardStats]) -> ShardStats:
    t0 = time.perf_counter()
    stats = fn()
    stats.seconds = round(time.perf_counter() - t0, 3)
    return stats
