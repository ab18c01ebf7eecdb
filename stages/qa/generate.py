"""MCQ generation: one generator request per image, all of a shard's images in engine-sized chunks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from pipeline.engines.base import ChatRequest, Engine, Generation, Sampling, image_messages
from stages.qa.questions import Candidate, from_generator_text


@dataclass
class Generated:
    """What the generator made of one image: its candidates, or the error that stopped it."""

    key: str
    candidates: list[Candidate] = field(default_factory=list)
    raw: str | None = None
    finish_reason: str | None = None
    error: str | None = None


def generate_questions(engine: Engine, images: Sequence[tuple[str, Image.Image]], prompt: str, sampling: Sampling,
                       chunk_size: int) -> list[Generated]:
    """Generate and parse MCQs for every (key, image), in order; `chunk_size` requests per engine call."""
    messages = image_messages(prompt)
    out: list[Generated] = []
    for start in range(0, len(images), chunk_size):
        chunk = images[start: start + chunk_size]
        gens = engine.generate([ChatRequest(messages, [img]) for _, img in chunk], sampling)
        out += [_parsed(key, g[0] if g else None) for (key, _), g in zip(chunk, gens, strict=True)]
    return out


def _parsed(key: str, gen: Generation | None) -> Generated:
    if gen is None or gen.finish_reason == "error" or gen.error:
        return Generated(key, error=(gen.error if gen is not None else None) or "the generator returned nothing")
    return Generated(key, candidates=from_generator_text(gen.text), raw=gen.text, finish_reason=gen.finish_reason)
