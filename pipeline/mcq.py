"""Multiple-choice questions: the record, option shuffling, the generator text format, reader prompts.

The generator (a strong VLM) writes MCQs as text in the format of `format_generator_output`; the
quality gate and the reward shuffle options with `shuffle_options`, and the reader is prompted with
`reader_messages` and pre-filled with `READER_PREFILL` so its first capital letter is the answer.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

LETTERS = "ABCDEF"
NUM_OPTIONS = 4
CANNOT_ANSWER = "The caption does not contain enough information to answer."
NONE_OF_THE_ABOVE = "None of the above."
CAPTION_PROMPT = "Please describe this image in detail."
READER_PREFILL = "The answer is"


@dataclass(frozen=True)
class MCQ:
    """One multiple-choice question: 4 option texts (no letters) and the letter of the right one."""

    question: str
    options: tuple[str, ...]
    answer: str
    id: str = ""
    source: str = ""
    qtype: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(self.options))
        if self.answer not in LETTERS[: len(self.options)]:
            raise ValueError(f"answer {self.answer!r} is not one of the {len(self.options)} option letters")
        if not self.id:
            object.__setattr__(self, "id", self.content_id())

    @property
    def answer_index(self) -> int:
        return LETTERS.index(self.answer)

    @property
    def answer_text(self) -> str:
        return self.options[self.answer_index]

    def content_id(self) -> str:
        """A stable id from the question and its option set (order-free)."""
        blob = "\x1f".join([self.question.strip(), *sorted(o.strip() for o in self.options), self.answer_text])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def lettered(self) -> list[str]:
        return [f"{LETTERS[i]}) {o}" for i, o in enumerate(self.options)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = list(self.options)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MCQ:
        return cls(
            question=d["question"], options=tuple(d["options"]), answer=d["answer"],
            id=d.get("id", ""), source=d.get("source", ""), qtype=d.get("qtype", ""), meta=d.get("meta") or {},
        )

    def to_ground_truth(self) -> dict[str, Any]:
        """The published CapRL-QA layout: {question, choices: ['A) ..', ...], answer: 'C'}."""
        return {"question": self.question, "choices": self.lettered(), "answer": self.answer}


@dataclass(frozen=True)
class ShuffledMCQ:
    """An MCQ as shown once: options in a new order, possibly with an extra option appended."""

    mcq: MCQ
    options: tuple[str, ...]
    answer: str
    permutation: tuple[int, ...]
    """permutation[i] = index in mcq.options of the option shown at position i (-1: the extra option)."""

    def lettered(self) -> list[str]:
        return [f"{LETTERS[i]}) {o}" for i, o in enumerate(self.options)]

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]


def shuffle_options(mcq: MCQ, rng: random.Random, extra_option: str | None = None) -> ShuffledMCQ:
    """A fresh order of the options (the right answer follows its text), plus an optional last extra option."""
    order = list(range(len(mcq.options)))
    rng.shuffle(order)
    options = [mcq.options[i] for i in order]
    answer = LETTERS[order.index(mcq.answer_index)]
    perm = list(order)
    if extra_option is not None:
        options.append(extra_option)
        perm.append(-1)
    return ShuffledMCQ(mcq=mcq, options=tuple(options), answer=answer, permutation=tuple(perm))


def format_generator_output(mcqs: Sequence[MCQ]) -> str:
    """MCQs in the generator's text format (numbered bold question, '- A) ...' lines, 'Answer: X)' line, separators)."""
    blocks = []
    for n, q in enumerate(mcqs, 1):
        lines = [f"**{n}. {q.question}**"]
        lines += [f"- {opt}" for opt in q.lettered()]
        lines.append(f"Answer: {q.answer}) {q.answer_text}")
        blocks.append("\n".join(lines))
    return "\n\n---\n\n".join(blocks) + "\n"


QA_GENERATION_PROMPT = (
    "Look at the image and write 5 multiple-choice questions about its visible content. "
    "Each question must be answerable only by looking at the image, have exactly 4 options A) to D), "
    "and exactly one correct option. Use this format for every question:\n"
    "**1. Question text?**\n- A) option\n- B) option\n- C) option\n- D) option\nAnswer: X) correct option\n"
    "Separate questions with a line '---'."
)

READER_SYSTEM = (
    "You answer multiple-choice questions about an image you cannot see, using only its caption. "
    "Rely strictly on what the caption states and ignore any outside knowledge or guesses. "
    "If the caption does not give the answer, choose the option saying it cannot be answered. "
    "Reply with the letter of one option."
)

_READER_EXAMPLES = [
    (
        "A red bicycle leans against a white fence next to a green door.",
        "What color is the door?",
        ["blue", "green", "red", "yellow", CANNOT_ANSWER],
        "B",
    ),
    (
        "A red bicycle leans against a white fence next to a green door.",
        "What time does the clock show?",
        ["three o'clock", "noon", "half past six", "midnight", CANNOT_ANSWER],
        "E",
    ),
]


def _reader_user_turn(caption: str, question: str, lettered_options: Sequence[str]) -> str:
    return (
        "Caption:\n<caption>\n" + caption.strip() + "\n</caption>\n\n"
        f"Question: {question.strip()}\n" + "\n".join(lettered_options)
    )


def reader_messages(caption: str, shown: ShuffledMCQ, few_shot: bool = True) -> list[dict[str, str]]:
    """Chat messages for the reader: instruction, optional two few-shot examples, then caption + question.

    The assistant turn is left for the engine to pre-fill with READER_PREFILL.
    """
    msgs: list[dict[str, str]] = [{"role": "system", "content": READER_SYSTEM}]
    if few_shot:
        for cap, question, options, answer in _READER_EXAMPLES:
            lettered = [f"{LETTERS[i]}) {o}" for i, o in enumerate(options)]
            msgs.append({"role": "user", "content": _reader_user_turn(cap, question, lettered)})
            msgs.append({"role": "assistant", "content": f"{READER_PREFILL} {answer}."})
    msgs.append({"role": "user", "content": _reader_user_turn(caption, shown.mcq.question, shown.lettered())})
    return msgs


FILTER_SYSTEM = "Answer the multiple-choice question. Reply with the letter of one option only."


def filter_messages(shown: ShuffledMCQ, with_image: bool) -> list[dict]:
    """The quality gate's query: the question (with the image, or without it), options, letter answer.

    With the image the gate appends NONE_OF_THE_ABOVE via shuffle_options(extra_option=...).
    The assistant turn is left for the engine to pre-fill with READER_PREFILL.
    """
    text = f"Question: {shown.mcq.question.strip()}\n" + "\n".join(shown.lettered())
    content: list[dict] | str = [{"type": "image"}, {"type": "text", "text": text}] if with_image else text
    return [{"role": "system", "content": FILTER_SYSTEM}, {"role": "user", "content": content}]
