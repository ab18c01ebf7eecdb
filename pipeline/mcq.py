"""Multiple-choice questions: the record, option shuffling, the generator text format, reader prompts.

The generator (a strong VLM) writes MCQs as text in the format of `format_generator_output`; the
quality gate and the reward shuffle options with `shuffle_options`, and the reader is prompted with
`reader_messages` and pre-filled with `READER_PREFILL` so its first capital letter is the answer.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
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


# -- Parsing the generator's text and the reader's answer ------------------------------------------
_MD_NOISE = re.compile(r"\*\*|__|`")
_HEADER = re.compile(r"^#{1,6}\s*")
_BULLET = re.compile(r"^(?:[-*•+]\s*)")
_SEPARATOR = re.compile(r"^\s*(?:-{3,}|\*{3,}|_{3,}|={3,})\s*$")
_QUESTION_START = re.compile(
    r"^(?:(?:question|q)\s*(?P<n1>\d+)\s*[.):\-]?|(?P<n2>\d+)\s*[.):]|question\s*[:\-])\s*(?P<rest>.*)$",
    re.IGNORECASE,
)
_OPTION = re.compile(r"^(?:\((?P<l1>[A-Fa-f])\)|(?P<l2>[A-Fa-f])\s*[).:]|(?P<l3>[A-F])\s+-\s)\s*(?P<text>.*)$")
_ANSWER = re.compile(
    r"^(?:the\s+)?(?:correct\s+|right\s+)?answer(?:\s+is)?\s*[:\-–=]?\s*(?P<rest>.*)$", re.IGNORECASE
)
_ANSWER_LETTER = re.compile(r"^(?:(?i:option)\s+)?\(?(?P<letter>[A-F])\b\)?[).:]?\s*(?P<text>.*)$")
_INLINE_OPTION = re.compile(r"\s(?=\(?[B-F][).]\s)")
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")


@dataclass
class _Block:
    number: str | None = None
    question: list[str] = field(default_factory=list)
    options: list[tuple[str, str]] = field(default_factory=list)
    answer: str | None = None
    answer_letter: str | None = None
    answer_text: str = ""
    explicit: bool = False

    def empty(self) -> bool:
        return not self.question and not self.options and self.answer is None


def _clean(line: str) -> str:
    line = _MD_NOISE.sub("", line).strip()
    line = _HEADER.sub("", line)
    return line.strip()


def _norm(text: str) -> str:
    return re.sub(r"[\s.;,!]+$", "", " ".join(text.casefold().split()))


def _split_inline_options(text: str) -> list[str]:
    """'A) red B) blue C) green D) pink' -> one string per option (only for consecutive letters)."""
    parts = _INLINE_OPTION.split(text)
    return parts if len(parts) > 1 else [text]


def parse_generator_output(text: str, source: str = "generator") -> tuple[list[MCQ], list[str]]:
    """Parse the generator's MCQ text (the `format_generator_output` format, tolerating common drift).

    Tolerated: extra spaces and blank lines, bold or not, missing '---' separators, numbering as
    '1.', '1)', 'Q1.', 'Question 1:', option markers 'A)', 'A.', 'A:', '(A)', with or without a
    bullet, options written on one line, and answer lines such as 'Answer: C) text', '**Answer: C**',
    'Answer: (C)', 'Correct answer: C) text', 'The answer is C', or the answer's text alone.
    Returns the well-formed MCQs and one reason per rejected item (not 4 options, duplicate options,
    answer missing or not among the options, empty question, ...). Prose outside questions is ignored.
    """
    blocks: list[_Block] = []
    cur = _Block()

    def close() -> None:
        nonlocal cur
        if not cur.empty() or cur.explicit:
            blocks.append(cur)
        cur = _Block()

    for raw in text.splitlines():
        if _SEPARATOR.match(raw):
            close()
            continue
        line = _clean(raw)
        if not line:
            continue
        body = _BULLET.sub("", line).strip() if not _SEPARATOR.match(line) else ""
        if not body:
            continue
        m_ans = _ANSWER.match(body)
        if m_ans and (cur.question or cur.options or cur.explicit):
            rest = _clean(m_ans.group("rest"))
            m_letter = _ANSWER_LETTER.match(rest)
            cur.answer = rest
            if m_letter:
                cur.answer_letter = m_letter.group("letter")
                cur.answer_text = m_letter.group("text").strip()
            else:
                cur.answer_text = rest
            continue
        m_opt = _OPTION.match(body)
        if m_opt and (cur.question or cur.options or cur.explicit) and cur.answer is None:
            for piece in _split_inline_options(body):
                m_piece = _OPTION.match(piece.strip())
                if m_piece is None:
                    continue
                letter = (m_piece.group("l1") or m_piece.group("l2") or m_piece.group("l3")).upper()
                cur.options.append((letter, _clean(m_piece.group("text"))))
            continue
        m_q = _QUESTION_START.match(body)
        if m_q:
            close()
            cur.explicit = True
            cur.number = m_q.group("n1") or m_q.group("n2")
            rest = m_q.group("rest").strip()
            if rest:
                cur.question.append(rest)
            continue
        if cur.options or cur.answer is not None:
            close()
        cur.question.append(body)
    close()

    mcqs: list[MCQ] = []
    rejected: list[str] = []
    for i, block in enumerate(blocks, 1):
        if not block.explicit and not block.options and block.answer is None:
            continue  # prose before/after the questions
        label = f"question {block.number or i}"
        mcq, reason = _build_mcq(block, source)
        if mcq is None:
            rejected.append(f"{label}: {reason}")
        else:
            mcqs.append(mcq)
    return mcqs, rejected


def _build_mcq(block: _Block, source: str) -> tuple[MCQ | None, str]:
    question = " ".join(block.question).strip()
    if not question:
        return None, "empty question"
    letters = [letter for letter, _ in block.options]
    if len(block.options) != NUM_OPTIONS:
        return None, f"has {len(block.options)} options, expected {NUM_OPTIONS}"
    if sorted(letters) != list(LETTERS[:NUM_OPTIONS]):
        return None, f"option letters {''.join(letters)} are not A-D"
    options = [text for _, text in sorted(block.options)]
    if any(not o for o in options):
        return None, "an option is empty"
    normed = [_norm(o) for o in options]
    if len(set(normed)) != len(normed):
        return None, "duplicate options"
    if block.answer is None:
        return None, "no answer line"
    letter = block.answer_letter
    if _norm(block.answer) in normed:  # the answer's text alone, e.g. 'Answer: A red car'
        letter = LETTERS[normed.index(_norm(block.answer))]
    by_text = normed.index(_norm(block.answer_text)) if _norm(block.answer_text) in normed else None
    if letter is None:
        if by_text is None:
            return None, f"answer {block.answer!r} is not among the options"
        letter = LETTERS[by_text]
    if letter not in LETTERS[:NUM_OPTIONS]:
        return None, f"answer {letter} is not among the options A-D"
    if by_text is not None and LETTERS[by_text] != letter:
        return None, f"answer letter {letter} contradicts its text {block.answer_text!r}"
    return MCQ(question=question, options=tuple(options), answer=letter, source=source), ""


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ReasoningPreamble(ValueError):
    """A reader opened a reasoning block instead of answering (a hybrid-thinking model with thinking on): its
    output says nothing about the caption, so the query failed; it is not a wrong answer."""


def answer_body(text: str) -> str:
    """The answer part of a reader's output: after a leading copy of the pre-fill and after a closed
    <think> block. Raises ReasoningPreamble when the output opens a <think> block it does not close."""
    body = text.strip()
    if body.startswith(THINK_OPEN):
        end = body.find(THINK_CLOSE)
        if end < 0:
            raise ReasoningPreamble(f"the reader answered with a reasoning preamble ({body[:40]!r}...): give it "
                                    "chat_template_kwargs {enable_thinking: false} or a non-thinking model")
        body = body[end + len(THINK_CLOSE):].strip()
    if body.startswith(READER_PREFILL):
        body = body[len(READER_PREFILL):]
    return body


def parse_answer_letter(text: str, n_options: int) -> str | None:
    """The reader's answer: the first stand-alone capital letter A-F after the pre-fill, or None.

    `text` is what the model generated after READER_PREFILL (see `answer_body`: a leading copy of the
    pre-fill and a closed <think> block are skipped; an unclosed one raises ReasoningPreamble). The
    letter must be one of the first `n_options` letters; anything else is unparseable.
    """
    body = answer_body(text)
    for m in _STANDALONE_LETTER.finditer(body):
        letter = m.group(1)
        if letter in LETTERS:
            return letter if LETTERS.index(letter) < n_options else None
    return None


CHOICE_STYLES = {"paren": "{letter}) {text}", "dot": "{letter}. {text}"}
"""How published question sets letter their choices: CapRL-QA-75K writes "A) text", CapRL++'s sets "A. text"."""

_CHOICE = re.compile(r"^\s*\(?(?P<letter>[A-Fa-f])\s*[).:]\s*(?P<text>.*)$", re.S)
_ANSWER_FORM = re.compile(r"^\(?(?P<letter>[A-Fa-f])\s*(?:[).:]\s*(?P<text>.*))?$", re.S)


def lettered_choices(options: Sequence[str], style: str = "paren") -> list[str]:
    """Option texts as published choices in `style` (see CHOICE_STYLES)."""
    if style not in CHOICE_STYLES:
        raise ValueError(f"unknown choice style {style!r}: one of {', '.join(CHOICE_STYLES)}")
    return [CHOICE_STYLES[style].format(letter=LETTERS[i], text=o) for i, o in enumerate(options)]


def split_choices(choices: Sequence[str]) -> list[str]:
    """Published choices ("A) text", "A. text", "(A) text", "A: text", or bare texts) -> option texts. Raises
    ValueError when some are lettered and some not, or the letters are not A, B, C... in order."""
    parts = [_CHOICE.match(str(c)) for c in choices]
    if not any(parts):
        return [str(c).strip() for c in choices]
    letters = "".join(m.group("letter").upper() if m else "?" for m in parts)
    if letters != LETTERS[: len(choices)]:
        raise ValueError(f"choice letters {letters} are not {LETTERS[:len(choices)]} in order")
    return [m.group("text").strip() for m in parts if m is not None]


def choice_answer(answer: str, options: Sequence[str]) -> str:
    """A published answer ("C", "C)", "C.", "(C)", or with its text: "C) red", "C. red") -> its letter. Raises
    ValueError when it names no option letter or its text is another option's."""
    m = _ANSWER_FORM.match(answer.strip())
    letter = m.group("letter").upper() if m else ""
    if letter not in LETTERS[: len(options)]:
        raise ValueError(f"answer {answer!r} is not one of the option letters")
    text = (m.group("text") or "").strip() if m else ""
    if text and _norm(text) != _norm(options[LETTERS.index(letter)]):
        raise ValueError(f"answer {answer!r} contradicts option {letter}: {options[LETTERS.index(letter)]!r}")
    return letter


def parse_mcqs(value: Any) -> list[MCQ]:
    """MCQs from a JSON string / list of MCQ dicts (the image shards' `mcqs` column); [] if none or invalid."""
    if value is None:
        return []
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    if isinstance(value, dict):
        value = [value]
    out = []
    for item in value if isinstance(value, list) else []:
        try:
            out.append(MCQ.from_dict(item))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def qa_mcqs(rows: list[dict[str, Any]]) -> dict[str, list[MCQ]]:
    """key -> kept MCQs from a qa-stage parquet (columns: key, plus `mcqs` or `mcq` JSON, or
    question/options/answer; rows whose `kept` is false are skipped)."""
    out: dict[str, list[MCQ]] = {}
    for r in rows:
        if r.get("key") is None or r.get("kept", True) is False or r.get("status", "ok") != "ok":
            continue
        if "mcqs" in r:
            found = parse_mcqs(r["mcqs"])
        elif "mcq" in r:
            found = parse_mcqs(r["mcq"])
        elif {"question", "options", "answer"} <= r.keys():
            found = parse_mcqs([{k: r[k] for k in ("question", "options", "answer", "id", "qtype") if k in r}])
        else:
            found = []
        out.setdefault(str(r["key"]), []).extend(found)
    return out
