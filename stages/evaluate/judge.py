"""The optional VLM judge: factuality, coverage and hallucination of captions where no truth exists.

The judge (any engine: a served VLM behind `openai`, or `hf` / `vllm`) sees the image and the instruction
`evaluate.judge.prompt` with the caption in it, and answers one JSON object with the three scores in
0..scale. Rules as in the reward: an engine error or an answer that does not parse into three numbers in
range is re-asked `retries` times; what still fails is a recorded failure (its reason and raw answers kept),
left out of the means, never a zero. Every raw answer goes to judge.parquet beside the report.
"""

from __future__ import annotations

import io
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from pipeline.config import JudgeConfig
from pipeline.engines.base import ChatRequest, Engine, Sampling, image_messages

SCORES = ("factuality", "coverage", "hallucination")
_OBJECT = re.compile(r"\{[^{}]*\}", re.S)

JUDGE_SCHEMA = pa.schema([
    pa.field("benchmark", pa.string(), nullable=False),
    pa.field("captioner", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("caption_index", pa.int32(), nullable=False),
    pa.field("caption", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("raw", pa.list_(pa.string())),
    *[pa.field(name, pa.float64()) for name in SCORES],
])
"""ROOT/eval/<name>/judge.parquet: one row per judged caption; scores in 0..1 (None when it failed)."""


@dataclass
class Judged:
    """One caption to judge and, once asked, its scores (0..1) or the failure and every raw answer."""

    benchmark: str
    captioner: str
    image_id: str
    caption_index: int
    caption: str
    image: bytes
    scores: dict[str, float] | None = None
    error: str | None = None
    raw: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "captioner": self.captioner, "image_id": self.image_id,
                "caption_index": self.caption_index, "caption": self.caption,
                "status": "ok" if self.scores is not None else "failed", "error": self.error, "raw": self.raw,
                **{name: (self.scores or {}).get(name) for name in SCORES}}


def parse_scores(text: str, scale: float) -> dict[str, float]:
    """The three scores of a judge answer, divided by `scale`; ValueError names what is wrong."""
    for match in reversed(_OBJECT.findall(text)):
        try:
            obj = json.loads(match)
        except ValueError:
            continue
        if isinstance(obj, dict):
            break
    else:
        raise ValueError("no JSON object in the answer")
    out = {}
    for name in SCORES:
        value = obj.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name} is missing or not a number")
        if not 0 <= value <= scale:
            raise ValueError(f"{name}={value} is outside 0..{scale:g}")
        out[name] = float(value) / scale
    return out


def _image(data: bytes) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def judge_all(engine: Engine, items: Sequence[Judged], cfg: JudgeConfig) -> None:
    """Ask the judge about every item (one engine call per attempt), filling scores or error in place."""
    todo = list(items)
    base = Sampling(temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                    max_new_tokens=cfg.sampling.max_new_tokens, seed=cfg.sampling.seed)
    for attempt in range(cfg.retries + 1):
        if not todo:
            return
        requests = [ChatRequest(image_messages(cfg.prompt.format(caption=it.caption)), [_image(it.image)])
                    for it in todo]
        try:
            outs = engine.generate(requests, replace(base, seed=base.seed + attempt))
            if len(outs) != len(todo):
                raise RuntimeError(f"judge returned {len(outs)} results for {len(todo)} requests")
        except Exception as exc:  # noqa: BLE001 - a failed call is a recorded failure of every item, re-asked
            for it in todo:
                it.error = f"{type(exc).__name__}: {exc}"
            continue
        for it, gens in zip(todo, outs, strict=True):
            gen = gens[0] if gens else None
            if gen is None or gen.finish_reason == "error" or gen.error:
                it.error = (gen.error if gen is not None else None) or "the judge returned nothing"
                it.raw.append("" if gen is None else gen.text)
                continue
            it.raw.append(gen.text)
            try:
                it.scores, it.error = parse_scores(gen.text, cfg.scale), None
            except ValueError as exc:
                it.error = f"malformed answer: {exc}"
        todo = [it for it in todo if it.scores is None]


def summary(items: Sequence[Judged], captioners: Sequence[str]) -> dict[str, Any]:
    """Per captioner: the mean of each score over its judged captions, and how many were judged / failed."""
    out: dict[str, Any] = {}
    for name in captioners:
        mine = [it for it in items if it.captioner == name]
        ok = [it.scores for it in mine if it.scores is not None]
        out[name] = {**{s: (statistics.fmean(o[s] for o in ok) if ok else None) for s in SCORES},
                     "judged": len(ok), "failed": len(mine) - len(ok)}
    return out
