"""The caption quality monitor: the CapRL reward on a deterministic sample of a shard's captions.

Where MCQs exist for an image (the qa stage's ROOT/qa/<shard>.parquet, or the `mcqs` column that
the demo world carries through the image shards), a fraction of captions, chosen by a hash of the
sample key, is scored by the reader of `annotate.reward`. The score lands in the row (`quality`)
and its mean in the shard's stats, where `python -m pipeline status` shows the running mean.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline import shardio
from pipeline.config import QualityConfig, RewardConfig
from pipeline.engines.base import Engine, create_engine
from pipeline.errors import ConfigError
from pipeline.mcq import MCQ, parse_mcqs, qa_mcqs
from pipeline.resources import resolve_model
from pipeline.shards import shard_name
from pipeline.stage import ShardContext

log = logging.getLogger("stages.annotate.quality")

QA_DIR = "qa"


@dataclass
class QualityReport:
    """Per-key (reward, questions) for scored captions, and counts for the shard's stats."""

    scores: dict[str, tuple[float, int]]
    selected: int = 0
    missing: int = 0
    source: str = ""


def selected(key: str, fraction: float, seed: int = 0) -> bool:
    """Whether a sample is in the monitored fraction: a pure function of its key (stable across reruns)."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    h = int.from_bytes(hashlib.sha256(f"quality|{seed}|{key}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def validate(cfg: QualityConfig, reward: RewardConfig) -> None:
    """Fail early, with one line, on a monitor that cannot run."""
    if cfg.fraction > 0 and reward.reader.backend != "noop" and not reward.reader.model:
        raise ConfigError("annotate.quality.fraction > 0 needs a reader: set annotate.reward.reader.model")


def reader_key(reward: RewardConfig) -> str:
    """The resource key under which a process keeps the monitor's reader engine."""
    return "engine:annotate.reader:" + hashlib.sha256(reward.reader.model_dump_json().encode()).hexdigest()[:12]


def reader_engine(ctx: ShardContext, reward: RewardConfig) -> Engine:
    """The reader engine of this process (created once, reused for every shard)."""
    return ctx.resource(reader_key(reward), lambda: create_engine(resolve_model(reward.reader)))


def load_mcqs(ctx: ShardContext, cfg: QualityConfig, shard: int, from_images: Mapping[str, Any]) -> tuple[dict[str, list[MCQ]], str]:
    """The MCQs to score with, by key, and where they came from ('qa', 'images' or ''). The qa shard is
    recorded as this shard's (optional) input: its arrival or recommit makes the shard stale."""
    if cfg.mcq_source == "qa":
        ctx.require_input("qa")
        use_qa = True
    else:
        use_qa = cfg.mcq_source == "auto" and ctx.optional_input("qa") is not None
    if use_qa:
        rows = shardio.read_optional_manifest(ctx.storage.url(QA_DIR, f"{shard_name(shard)}.parquet"),
                                              ctx.storage.storage_options)
        return qa_mcqs(rows or []), "qa"
    parsed = {k: parse_mcqs(v) for k, v in from_images.items()}
    return {k: v for k, v in parsed.items() if v}, "images" if parsed else ""


def reward_scorer(ctx: ShardContext, reward_cfg: RewardConfig) -> Any:
    """The monitor's CapRLReward of this process: its reader engine and, when `reward.cache` is set, the
    on-disk cache (loaded once, flushed after every shard)."""
    from pipeline.reward import CapRLReward, RewardCache  # the reward pulls in the reader's engine code

    def build() -> CapRLReward:
        cache = RewardCache(reward_cfg.cache, ctx.storage.storage_options) if reward_cfg.cache else None
        return CapRLReward(reader_engine(ctx, reward_cfg), reward_cfg, cache)

    return ctx.resource(reader_key(reward_cfg) + ":reward", build)


def score_shard(ctx: ShardContext, cfg: QualityConfig, reward_cfg: RewardConfig, shard: int,
                captions: Mapping[str, str], image_mcqs: Mapping[str, Any]) -> QualityReport:
    """Score the selected captions of one shard in one batched reward call."""
    if cfg.fraction <= 0 or not captions:
        return QualityReport(scores={})
    mcqs, source = load_mcqs(ctx, cfg, shard, image_mcqs)
    keys = [k for k in captions if k in mcqs and selected(k, cfg.fraction, reward_cfg.seed)]
    report = QualityReport(scores={}, selected=len(keys), source=source)
    if not keys:
        return report
    reward = reward_scorer(ctx, reward_cfg)
    results = reward([captions[k] for k in keys], [mcqs[k] for k in keys], keys=keys)
    if reward.cache is not None:
        reward.cache.flush()
    for k, res in zip(keys, results, strict=True):
        if res.reward is None:
            report.missing += 1
            log.warning("quality of %s is missing: %s", k, res.reason)
        else:
            report.scores[k] = (float(res.reward), len(mcqs[k]))
    return report
