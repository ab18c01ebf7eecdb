"""Where a shard's questions come from: the generator's text, or questions already stored with the images.

Either way every candidate becomes a `Candidate`: a parsed MCQ, or the reason it is not one plus the raw
text it came from, so a bad item is a row with its reason, never dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pipeline.mcq import LETTERS, MCQ, choice_answer, parse_generator_output, split_choices


@dataclass
class Candidate:
    """One question of an image: parsed (`mcq`), or unparseable (`reason`, `raw`)."""

    index: int
    mcq: MCQ | None = None
    reason: str | None = None
    raw: str | None = None
    source: str = "generator"


def from_generator_text(text: str) -> list[Candidate]:
    """The generator's MCQ text -> candidates: the parsed questions in order, then one per rejected item
    (its reason from `parse_generator_output`, and the whole text as raw)."""
    mcqs, rejected = parse_generator_output(text)
    out = [Candidate(i, mcq=q) for i, q in enumerate(mcqs)]
    out += [Candidate(len(mcqs) + i, reason=r, raw=text) for i, r in enumerate(rejected)]
    return out


def from_stored(value: Any, source: str = "imported") -> list[Candidate]:
    """Questions stored with an image (a JSON string or a list): MCQ dicts {question, options, answer,
    qtype?, id?} or the published layout {question, choices: ['A) ..', ...] or ['A. ..', ...], answer: 'C'}."""
    if value is None:
        return []
    raw_value = value
    if isinstance(value, bytes | str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            return [Candidate(0, reason=f"stored questions are not JSON: {exc}", raw=_text(raw_value), source=source)]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return [Candidate(0, reason="stored questions are not a list", raw=_text(raw_value), source=source)]
    out = []
    for i, item in enumerate(value):
        try:
            out.append(Candidate(i, mcq=stored_mcq(item, source), source=source))
        except (KeyError, TypeError, ValueError) as exc:
            out.append(Candidate(i, reason=f"question {i + 1}: {exc}", raw=_text(item), source=source))
    return out


def stored_mcq(item: Any, source: str) -> MCQ:
    """One stored question as an MCQ (see `from_stored`); raises ValueError on a malformed one."""
    if not isinstance(item, dict):
        raise ValueError("not a mapping")
    question = str(item.get("question") or "").strip()
    if not question:
        raise ValueError("empty question")
    if "options" in item:
        options = [str(o).strip() for o in item["options"]]
    elif "choices" in item:
        options = split_choices(item["choices"])
    else:
        raise ValueError("no options or choices")
    if len(options) < 2 or len(options) > len(LETTERS) or any(not o for o in options):
        raise ValueError(f"{len(options)} options (need 2-{len(LETTERS)}, none empty)")
    if len({o.casefold() for o in options}) != len(options):
        raise ValueError("duplicate options")
    answer = choice_answer(str(item.get("answer") or ""), options)
    meta = {k: item[k] for k in ("id",) if item.get(k)}
    return MCQ(question=question, options=tuple(options), answer=answer, source=source,
               qtype=str(item.get("qtype") or ""), meta=meta)


def answer_in_question(mcq: MCQ) -> bool:
    """Whether the keyed answer is written in the question (as whole words) while no distractor is: the
    question answers itself ("What colour is the red circle?")."""
    def said(option: str) -> bool:
        words = re.escape(option.strip().casefold())
        return bool(words) and re.search(rf"(?<!\w){words}(?!\w)", mcq.question.casefold()) is not None

    return said(mcq.answer_text) and not any(said(o) for i, o in enumerate(mcq.options) if i != mcq.answer_index)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
