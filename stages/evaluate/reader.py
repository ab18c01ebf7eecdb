"""The evaluation reader: a text-only model answers one benchmark question from one caption alone.

Prompt: a role line (system), then the description and the question with its options in the benchmark's
order (user), and the assistant turn pre-filled with "The answer is". Two answer modes:
- generate: the reader writes at temperature 0; the first stand-alone option letter is its answer
  (none: counted wrong);
- score: the option whose text (" " + text after the pre-fill) has the highest log-likelihood
  (the nano reader answers this way).
With `abstain` an extra last option says the description does not tell; choosing it is always wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.engines.base import ChatRequest, Engine, Sampling
from pipeline.mcq import CANNOT_ANSWER, LETTERS, MCQ, READER_PREFILL, parse_answer_letter

ROLE = ("You read a description of an image that you cannot see, then answer a multiple-choice question about "
        "the image using only what the description says. Reply with the letter of one option.")


@dataclass(frozen=True)
class Item:
    """One question asked about one caption."""

    caption: str
    mcq: MCQ


@dataclass(frozen=True)
class Answer:
    letter: str | None
    """The chosen option's letter (None: no parseable letter)."""
    correct: bool
    raw: str = ""


def shown_options(mcq: MCQ, abstain: bool) -> list[str]:
    return [*mcq.options, CANNOT_ANSWER] if abstain else list(mcq.options)


def reader_request(item: Item, abstain: bool) -> ChatRequest:
    options = shown_options(item.mcq, abstain)
    user = ("Description:\n" + item.caption.strip() + "\n\nQuestion: " + item.mcq.question.strip() + "\n"
            + "\n".join(f"{LETTERS[i]}) {o}" for i, o in enumerate(options)))
    return ChatRequest(messages=[{"role": "system", "content": ROLE}, {"role": "user", "content": user}],
                       prefill=READER_PREFILL)


def prompt_version(abstain: bool) -> str:
    """A short hash of the prompt wording (recorded with every answer)."""
    probe = reader_request(Item("x", MCQ("q", ("a", "b", "c", "d"), "A")), abstain)
    return hashlib.sha256((json.dumps(probe.messages) + probe.prefill).encode()).hexdigest()[:12]


def answer_all(reader: Engine, items: Sequence[Item], mode: str, abstain: bool, max_new_tokens: int = 10,
               retries: int = 1) -> list[Answer]:
    """The reader's answer to every item, in one engine call (retried whole on an engine error; a failure
    that persists raises: an evaluation is not scored on partial answers)."""
    if not items:
        return []
    requests = [reader_request(it, abstain) for it in items]
    for attempt in range(retries + 1):
        try:
            if mode == "generate":
                return _by_generation(reader, items, requests, abstain, max_new_tokens)
            return _by_scores(reader, items, requests, abstain)
        except Exception:
            if attempt == retries:
                raise
    raise AssertionError("unreachable")


def _by_generation(reader: Engine, items: Sequence[Item], requests: list[ChatRequest], abstain: bool,
                   max_new_tokens: int) -> list[Answer]:
    outs = reader.generate(requests, Sampling(temperature=0.0, max_new_tokens=max_new_tokens, n=1))
    if len(outs) != len(items):
        raise RuntimeError(f"reader returned {len(outs)} results for {len(items)} questions")
    answers = []
    for it, gens in zip(items, outs, strict=True):
        if not gens or gens[0].finish_reason == "error":
            raise RuntimeError(f"reader failed: {gens[0].error if gens else 'no generation'}")
        letter = parse_answer_letter(gens[0].text, len(shown_options(it.mcq, abstain)))
        answers.append(Answer(letter, letter == it.mcq.answer, gens[0].text))
    return answers


def _by_scores(reader: Engine, items: Sequence[Item], requests: list[ChatRequest], abstain: bool) -> list[Answer]:
    choices = [[" " + o for o in shown_options(it.mcq, abstain)] for it in items]
    scores = reader.score_choices(requests, choices)
    if len(scores) != len(items):
        raise RuntimeError(f"reader returned {len(scores)} score lists for {len(items)} questions")
    answers = []
    for it, row, cands in zip(items, scores, choices, strict=True):
        if len(row) != len(cands) or not all(math.isfinite(s) for s in row):
            raise RuntimeError(f"reader scores invalid: {list(row)!r}")
        best = max(range(len(row)), key=row.__getitem__)
        answers.append(Answer(LETTERS[best], LETTERS[best] == it.mcq.answer))
    return answers
