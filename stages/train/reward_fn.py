"""The CapRL reward as a TRL reward function: captions of a step in, one reward (or None) per caption out.

A caption whose reward is missing (the reader failed after its retries, or its image has no question) is
returned as None: TRL leaves it out of its group's baseline and gives it no advantage. It is counted, never
scored 0. When more than `max_missing_share` of a step's captions are missing, the step fails loudly.
Two optional terms are mixed in, reward = (1 - w_len - w_rep) x utility + w_len x length + w_rep x repetition:
CapRL++'s length factor (1 up to `full_tokens` caption tokens, falling linearly to 0 at `zero_tokens`) and a
repetition factor (1 minus the share of the caption's word n-grams that repeat an earlier one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from pipeline.config import LengthTermConfig, RepetitionTermConfig
from pipeline.errors import PipelineError
from pipeline.faithful import repeated_share
from pipeline.mcq import parse_mcqs
from pipeline.reward import CapRLReward

log = logging.getLogger("stages.train")


class RewardUnavailable(PipelineError):
    """Too many captions of one step have no reward: the reader is down or the questions are broken."""


def length_factor(tokens: int, cfg: LengthTermConfig) -> float:
    """1 up to full_tokens, linearly down to 0 at zero_tokens, 0 beyond."""
    if tokens <= cfg.full_tokens:
        return 1.0
    if tokens >= cfg.zero_tokens:
        return 0.0
    return (cfg.zero_tokens - tokens) / (cfg.zero_tokens - cfg.full_tokens)


def completion_text(completion: Any) -> str:
    """A completion's text: TRL passes conversational completions as [{'role': 'assistant', 'content': ...}]."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:
        content = completion[-1].get("content", "")
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content)
    return ""


class CaptionReward:
    """Callable that TRL's GRPO / RLOO trainers call once per generation batch (see the module docstring)."""

    __name__ = "caprl"

    def __init__(self, reward: CapRLReward, length: LengthTermConfig | None = None, max_missing_share: float = 0.2,
                 repetition: RepetitionTermConfig | None = None):
        self.reward = reward
        self.length = length or LengthTermConfig()
        self.repetition = repetition or RepetitionTermConfig()
        self.max_missing_share = max_missing_share
        self.totals = {"captions": 0, "missing": 0, "reader_calls": 0, "draws": 0, "seconds": 0.0}
        self.step_images: dict[int, list[str]] = {}
        """optimizer step -> the image keys its captions came from (logged: the data order is checkable)"""

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], key: Sequence[str],
                 mcqs: Sequence[str], completion_ids: Sequence[Sequence[int]] | None = None,
                 trainer_state: Any = None, log_metric: Any = None, **_: Any) -> list[float | None]:
        step = int(getattr(trainer_state, "global_step", 0) or 0)
        captions = [completion_text(c) for c in completions]
        self.step_images.setdefault(step + 1, []).extend(dict.fromkeys(key))
        questions = [parse_mcqs(m) for m in mcqs]
        start = time.perf_counter()
        results = self.reward(captions, questions, keys=[f"{k}|step{step}" for k in key])
        seconds = time.perf_counter() - start
        draws = self.reward.last_stats.get("draws", 0)
        asked = draws - self.reward.last_stats.get("cached", 0)
        missing = [r for r in results if r.missing]
        self.totals["captions"] += len(results)
        self.totals["missing"] += len(missing)
        self.totals["reader_calls"] += asked
        self.totals["draws"] += draws
        self.totals["seconds"] += seconds
        if log_metric is not None:
            log_metric("missing_rewards", float(len(missing)))
            log_metric("reader_calls_per_s", asked / max(seconds, 1e-9))
            log_metric("reward_seconds", seconds)
        if results and len(missing) / len(results) > self.max_missing_share:
            raise RewardUnavailable(
                f"train step {step}: {len(missing)}/{len(results)} captions have no reward (more than "
                f"train.max_missing_share={self.max_missing_share}); first reason: {missing[0].reason}")
        if missing:
            log.warning("train step %d: %d/%d captions without a reward (masked): %s", step, len(missing),
                        len(results), missing[0].reason)
        out: list[float | None] = []
        repeated = [repeated_share(c, self.repetition.n) for c in captions]
        if log_metric is not None:
            log_metric("repeated_ngrams", sum(repeated) / max(len(repeated), 1))
        for i, r in enumerate(results):
            if r.reward is None:
                out.append(None)
                continue
            tokens = len(completion_ids[i]) if completion_ids is not None else len(captions[i].split())
            out.append(self.mix(r.reward, tokens, repeated[i]))
        return out

    def mix(self, utility: float, tokens: int, repeated: float) -> float:
        """(1 - w_len - w_rep) x utility + w_len x length factor + w_rep x (1 - repeated n-gram share)."""
        w_len, w_rep = self.length.weight, self.repetition.weight
        value = (1 - w_len - w_rep) * utility
        if w_len > 0:
            value += w_len * length_factor(tokens, self.length)
        if w_rep > 0:
            value += w_rep * (1.0 - repeated)
        return value
