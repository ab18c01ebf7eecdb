"""The reward-hacking alarm: held-out images captioned greedily by the policy, scored three ways.

Every `train.audit.every` steps (and before the first) the policy captions the held-out images with greedy
decoding. The captions are scored by the training reward (the reader the policy is optimised against), by
an audit reward whose reader is a different model, and by the images' ground truth where it exists (the demo
world's scenes, pipeline.faithful: `truth` is the coverage of the scene's facts, `hallucination` the share of
the caption's claims that are false); `repetition` (captions with a word 4-gram said 3+ times) needs no truth.
A policy that learns to please its reader rather than to describe the image shows the training reward rising
while the audit or the truth falls, or while hallucination rises; the alarm names that in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.config import AuditConfig
from pipeline.engines.base import image_messages
from pipeline.faithful import caption_metrics, check_all, mean_known
from pipeline.reward import CapRLReward
from stages.train.data import TrainImage

log = logging.getLogger("stages.train")

AUDIT_KEY = "audit"
"""Audit draws are keyed without the step, so every audit asks the same questions of the same caption."""


@torch.no_grad()
def greedy_captions(model: Any, processor: Any, images: Sequence[Any], prompt: str, max_new_tokens: int,
                    batch_size: int = 16) -> list[str]:
    """Greedy captions of PIL images by a Qwen2.5-VL-style model and its processor (left-padded batches)."""
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    was_training = model.training
    model.eval()
    text = processor.apply_chat_template(image_messages(prompt), add_generation_prompt=True, tokenize=False)
    out: list[str] = []
    try:
        for start in range(0, len(images), batch_size):
            part = list(images[start:start + batch_size])
            batch = processor(text=[text] * len(part), images=[[im] for im in part], return_tensors="pt",
                              padding=True).to(model.device)
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            new = ids[:, batch["input_ids"].shape[1]:]
            out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = side
        if was_training:
            model.train()
    return out


TRUTH_KIND = "demo-scene"
"""The truth the image metadata carries (the demo world's `scene`), checked by pipeline.faithful."""


@dataclass
class AuditResult:
    step: int
    train_reward: float | None
    audit_reward: float | None
    truth: float | None
    caption_tokens: float
    alarm: str | None = None
    captions: list[str] = field(default_factory=list)
    hallucination: float | None = None
    repetition: float | None = None

    def record(self) -> dict[str, Any]:
        return {"step": self.step, "train_reward": self.train_reward, "audit_reward": self.audit_reward,
                "truth": self.truth, "hallucination": self.hallucination, "repetition": self.repetition,
                "caption_tokens": self.caption_tokens, "alarm": self.alarm, "examples": self.captions[:3]}


class Audit:
    """Runs audits and keeps their history (the first audit is the baseline of the alarm)."""

    def __init__(self, cfg: AuditConfig, images: Sequence[TrainImage], train_reward: CapRLReward,
                 audit_reward: CapRLReward | None, prompt: str, max_new_tokens: int,
                 history: Sequence[dict[str, Any]] = ()):
        self.cfg = cfg
        self.images = list(images)
        self.train_reward = train_reward
        self.audit_reward = audit_reward
        self.prompt = prompt
        self.max_new_tokens = cfg.max_new_tokens or max_new_tokens
        self.history: list[dict[str, Any]] = list(history)
        self.use_truth = cfg.truth != "none" and any(im.truth for im in self.images)

    def due(self, step: int) -> bool:
        return bool(self.images) and self.cfg.every > 0 and step % self.cfg.every == 0 \
            and not any(h["step"] == step for h in self.history)

    def run(self, step: int, model: Any, processor: Any, load_image: Any) -> AuditResult:
        pictures = [load_image(im) for im in self.images]
        captions = greedy_captions(model, processor, pictures, self.prompt, self.max_new_tokens)
        keys = [f"{AUDIT_KEY}|{im.key}" for im in self.images]
        questions = [list(im.mcqs) for im in self.images]
        train = mean_known([r.reward for r in self.train_reward(captions, questions, keys=keys)])
        audit = None
        if self.audit_reward is not None:
            audit = mean_known([r.reward for r in self.audit_reward(captions, questions, keys=keys)])
        checks = check_all(captions, [im.truth for im in self.images], TRUTH_KIND) if self.use_truth else None
        metrics = caption_metrics(captions, checks, lambda c: len(processor.tokenizer(c)["input_ids"]))
        result = AuditResult(step, train, audit, metrics.coverage, metrics.length, captions=captions,
                             hallucination=metrics.hallucination, repetition=metrics.repetition)
        result.alarm = self.alarm(result)
        if result.alarm:
            log.warning("train: reward-hacking alarm at step %d: %s", step, result.alarm)
        self.history.append(result.record())
        return result

    def alarm(self, now: AuditResult) -> str | None:
        """A warning when the training reward rose since the first audit while the audit reward or the truth
        fell, or hallucination rose."""
        if not self.history:
            return None
        first = self.history[0]
        tol = self.cfg.tolerance
        if now.train_reward is None or first.get("train_reward") is None:
            return None
        rise = now.train_reward - first["train_reward"]
        if rise <= tol:
            return None
        falls = []
        for name, value in (("audit_reward", now.audit_reward), ("truth", now.truth)):
            base = first.get(name)
            if value is not None and base is not None and value < base - tol:
                falls.append(f"{name} {base:.3f} -> {value:.3f}")
        base = first.get("hallucination")
        if now.hallucination is not None and base is not None and now.hallucination > base + tol:
            falls.append(f"hallucination {base:.3f} -> {now.hallucination:.3f}")
        if not falls:
            return None
        return (f"training reward {first['train_reward']:.3f} -> {now.train_reward:.3f} while "
                + ", ".join(falls) + " (the policy may be exploiting its reader)")
