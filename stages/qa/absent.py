"""Absent-thing questions: MCQs about things an image may not show, with "there is no <thing>" keyed right.

Per image, `qa.absent.per_image` things are drawn from `qa.absent.things` by an RNG seeded from (seed, image key),
so a rerun asks the same. They join the image's other candidates and go through the same gate: the filter must
pick the keyed answer with the image (the thing is really absent; a present thing makes the filter pick where it
is, and the question is dropped as not visual) and must not pick it without the image (absence that can be
guessed is leaky). A kept one costs a caption that invents the thing: the reader then answers where it is.
"""

from __future__ import annotations

import hashlib
import random

from pipeline.config import AbsentConfig
from pipeline.mcq import LETTERS, MCQ
from stages.qa.questions import Candidate

QTYPE = "absent"


def absent_mcq(thing: str, cfg: AbsentConfig) -> MCQ:
    """The question about one thing: the configured options, then the keyed "there is no" answer."""
    options = [o.format(thing=thing) for o in cfg.options] + [cfg.answer.format(thing=thing)]
    return MCQ(question=cfg.question.format(thing=thing), options=tuple(options), answer=LETTERS[len(options) - 1],
               source=QTYPE, qtype=QTYPE)


def absent_candidates(key: str, cfg: AbsentConfig, first_index: int) -> list[Candidate]:
    """The image's absent-thing candidates (none when per_image is 0), indexed from `first_index`."""
    if not cfg.per_image:
        return []
    blob = f"qa-absent|{cfg.seed}|{key}".encode()
    rng = random.Random(int.from_bytes(hashlib.sha256(blob).digest()[:8], "big"))
    things = rng.sample(cfg.things, cfg.per_image)
    return [Candidate(first_index + i, mcq=absent_mcq(t, cfg), source=QTYPE) for i, t in enumerate(things)]
