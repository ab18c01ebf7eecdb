"""Faithfulness metrics of captions: hallucination, coverage, repetition and length.

- `hallucination`: the share of a caption's claims (objects and their attributes) that are false for the
  image; a caption that makes no claim has none (None, left out of means).
- `coverage`: the share of the image's true facts (objects and attributes) the caption states correctly.
- `repetition`: whether a caption repeats one word 4-gram 3 or more times (over a set: the share of such captions).
- `length`: caption tokens (`count_tokens`, default whitespace words).

Hallucination and coverage need truth: a *truth checker* turns (truth, caption) into a `FactCheck`. Checkers
are named in `CHECKERS` and imported lazily (the demo world's `demo-scene` parses captions against the scene
metadata, see pipeline/nano/claims.py); real data has no truth and is judged by a VLM (stages/evaluate/judge.py).
"""

from __future__ import annotations

import importlib
import re
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

REPEAT_N = 4
REPEAT_TIMES = 3

CHECKERS: dict[str, str] = {"demo-scene": "pipeline.nano.claims:check_caption"}
"""truth kind -> 'module:function' with the signature (truth: str, caption: str) -> FactCheck | None."""

_WORD = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True)
class Claim:
    """One checkable statement of a caption, e.g. 'top left: red' or 'no green star', and whether it holds."""

    text: str
    true: bool
    negated: bool = False


@dataclass
class FactCheck:
    """A caption against its truth: its distinct claims, and how many of the truth's facts it states correctly."""

    claims: list[Claim] = field(default_factory=list)
    facts: int = 0
    covered: int = 0

    @property
    def false_claims(self) -> list[Claim]:
        return [c for c in self.claims if not c.true]

    @property
    def hallucination(self) -> float | None:
        return len(self.false_claims) / len(self.claims) if self.claims else None

    @property
    def coverage(self) -> float | None:
        return self.covered / self.facts if self.facts else None


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, apostrophes)."""
    return _WORD.findall(text.lower())


def repeats(text: str, n: int = REPEAT_N, times: int = REPEAT_TIMES) -> bool:
    """Whether some word n-gram occurs `times` or more times in the text."""
    toks = words(text)
    grams = Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def repeated_share(text: str, n: int = REPEAT_N) -> float:
    """The share of a text's word n-grams that are repeats of an earlier one (0: no repetition): a graded
    repetition signal for a reward term, where `repeats` is the yes/no metric."""
    toks = words(text)
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def truth_checker(kind: str) -> Callable[[str, str], FactCheck | None]:
    """The checker for a truth kind (see CHECKERS); raises ValueError for an unknown kind."""
    if kind not in CHECKERS:
        raise ValueError(f"unknown truth kind {kind!r} (known: {', '.join(sorted(CHECKERS))})")
    module, name = CHECKERS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def mean_known(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are not None (None when there are none)."""
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


@dataclass
class CaptionMetrics:
    """The four metrics over a set of captions (hallucination / coverage None where no truth or no claim)."""

    captions: int
    hallucination: float | None
    coverage: float | None
    repetition: float
    length: float
    claims: float | None = None
    """mean distinct claims per caption (where truth was checked)"""

    def to_dict(self) -> dict[str, Any]:
        return {"captions": self.captions, "hallucination": self.hallucination, "coverage": self.coverage,
                "repetition": self.repetition, "length": self.length, "claims": self.claims}


def check_all(captions: Sequence[str], truths: Sequence[str | None], kind: str) -> list[FactCheck | None]:
    """One FactCheck per caption (None where its truth is missing or not of this kind)."""
    check = truth_checker(kind)
    return [check(t, c) if t else None for c, t in zip(captions, truths, strict=True)]


def caption_metrics(captions: Sequence[str], checks: Sequence[FactCheck | None] | None = None,
                    count_tokens: Callable[[str], int] | None = None) -> CaptionMetrics:
    """Aggregate metrics: repetition share, mean length, and (from `checks`) mean hallucination over the
    captions that make a claim and mean coverage over the captions with truth."""
    count = count_tokens or (lambda c: len(c.split()))
    checked = [c for c in (checks or []) if c is not None]
    return CaptionMetrics(
        captions=len(captions),
        hallucination=mean_known([c.hallucination for c in checked]),
        coverage=mean_known([c.coverage for c in checked]),
        repetition=statistics.fmean(repeats(c) for c in captions) if captions else 0.0,
        length=statistics.fmean(count(c) for c in captions) if captions else 0.0,
        claims=statistics.fmean(len(c.claims) for c in checked) if checked else None)
