"""The generator-output parser on realistic outputs (well-formed and drifted), reader answer parsing,
and shuffling properties."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.mcq import (
    CANNOT_ANSWER,
    LETTERS,
    MCQ,
    format_generator_output,
    parse_answer_letter,
    parse_generator_output,
    shuffle_options,
)

COLOR_Q = ("What color is the car?", ("red", "blue", "green", "white"))

# (generator text, [(question, options, answer letter) expected], [substrings of rejection reasons])
CASES: list[tuple[str, list[tuple[str, tuple[str, ...], str]], list[str]]] = [
    # 1 canonical format
    ("**1. What color is the car?**\n- A) red\n- B) blue\n- C) green\n- D) white\nAnswer: B) blue\n",
     [(*COLOR_Q, "B")], []),
    # 2 two canonical blocks with separator
    ("**1. What color is the car?**\n- A) red\n- B) blue\n- C) green\n- D) white\nAnswer: C) green\n\n---\n\n"
     "**2. How many people are visible?**\n- A) one\n- B) two\n- C) three\n- D) four\nAnswer: A) one\n",
     [(*COLOR_Q, "C"), ("How many people are visible?", ("one", "two", "three", "four"), "A")], []),
    # 3 missing separators
    ("**1. What color is the car?**\n- A) red\n- B) blue\n- C) green\n- D) white\nAnswer: D) white\n"
     "**2. Is it day or night?**\n- A) day\n- B) night\n- C) dusk\n- D) dawn\nAnswer: A) day\n",
     [(*COLOR_Q, "D"), ("Is it day or night?", ("day", "night", "dusk", "dawn"), "A")], []),
    # 4 A. instead of A)
    ("1. What color is the car?\nA. red\nB. blue\nC. green\nD. white\nAnswer: A. red", [(*COLOR_Q, "A")], []),
    # 5 A: markers
    ("1. What color is the car?\nA: red\nB: blue\nC: green\nD: white\nAnswer: B", [(*COLOR_Q, "B")], []),
    # 6 (A) markers
    ("1. What color is the car?\n(A) red\n(B) blue\n(C) green\n(D) white\nAnswer: (C)", [(*COLOR_Q, "C")], []),
    # 7 bold answer line
    ("**1. What color is the car?**\n- A) red\n- B) blue\n- C) green\n- D) white\n**Answer: C**",
     [(*COLOR_Q, "C")], []),
    # 8 'Correct answer:' with text
    ("1) What color is the car?\nA) red\nB) blue\nC) green\nD) white\nCorrect answer: C) green",
     [(*COLOR_Q, "C")], []),
    # 9 Q1. numbering
    ("Q1. What color is the car?\nA) red\nB) blue\nC) green\nD) white\nAnswer: D", [(*COLOR_Q, "D")], []),
    # 10 'Question 1:' numbering, bold label
    ("**Question 1:** What color is the car?\n- A) red\n- B) blue\n- C) green\n- D) white\n**Answer:** B",
     [(*COLOR_Q, "B")], []),
    # 11 extra spaces everywhere
    ("   **1.   What color is the car?**  \n  -   A)   red  \n -  B)  blue\n- C)    green\n-D) white  \n"
     "  Answer :   A )  red  ", [(*COLOR_Q, "A")], []),
    # 12 options on one line
    ("1. What color is the car?\nA) red B) blue C) green D) white\nAnswer: B) blue", [(*COLOR_Q, "B")], []),
    # 13 markdown header numbering and '*' bullets
    ("### 1. What color is the car?\n* A) red\n* B) blue\n* C) green\n* D) white\nAnswer: A",
     [(*COLOR_Q, "A")], []),
    # 14 preamble and closing chatter
    ("Sure! Here are five questions about the image.\n\n1. What color is the car?\nA) red\nB) blue\nC) green\n"
     "D) white\nAnswer: B) blue\n\nLet me know if you need more.", [(*COLOR_Q, "B")], []),
    # 15 'The answer is C.'
    ("1. What color is the car?\nA) red\nB) blue\nC) green\nD) white\nThe answer is C.", [(*COLOR_Q, "C")], []),
    # 16 answer given as text only
    ("1. What color is the car?\nA) red\nB) blue\nC) green\nD) white\nAnswer: green", [(*COLOR_Q, "C")], []),
    # 17 answer text only, starting with an article
    ("1. What is parked?\nA) A red car\nB) A bus\nC) A bike\nD) A truck\nAnswer: A bus",
     [("What is parked?", ("A red car", "A bus", "A bike", "A truck"), "B")], []),
    # 18 question text on the line after the number
    ("Question 1:\nWhat color is the car?\nA) red\nB) blue\nC) green\nD) white\nAnswer: D) white",
     [(*COLOR_Q, "D")], []),
    # 19 lowercase option letters
    ("1. What color is the car?\na) red\nb) blue\nc) green\nd) white\nAnswer: B", [(*COLOR_Q, "B")], []),
    # 20 option with trailing period and answer text matching case-insensitively
    ("1. What color is the car?\nA) Red.\nB) Blue.\nC) Green.\nD) White.\nAnswer: A) red",
     [("What color is the car?", ("Red.", "Blue.", "Green.", "White."), "A")], []),
    # 21 answer 'Option B'
    ("1. What color is the car?\nA) red\nB) blue\nC) green\nD) white\nAnswer: Option B", [(*COLOR_Q, "B")], []),
    # 22 '***' separators and 'Answer - C'
    ("1. What color is the car?\nA) red\nB) blue\nC) green\nD) white\nAnswer - C\n***\n"
     "2. Which side is the tree on?\nA) left\nB) right\nC) center\nD) none\nAnswer - A",
     [(*COLOR_Q, "C"), ("Which side is the tree on?", ("left", "right", "center", "none"), "A")], []),
    # --- malformed items (rejected with a reason) -----------------------------------------
    # 23 three options
    ("1. What color is the car?\nA) red\nB) blue\nC) green\nAnswer: B", [], ["3 options"]),
    # 24 five options
    ("1. What color is the car?\nA) red\nB) blue\nC) green\nD) white\nE) black\nAnswer: B", [], ["5 options"]),
    # 25 duplicate options
    ("1. What color is the car?\nA) red\nB) blue\nC) Red\nD) white\nAnswer: B", [], ["duplicate options"]),
    # 26 answer letter not among the options
    ("1. What color is the car?\nA) red\nB) blue\nC) green\nD) white\nAnswer: E", [], ["not among the options"]),
    # 27 answer text not among the options
    ("1. What color is the car?\nA) red\nB) blue\nC) green\nD) white\nAnswer: purple", [],
     ["not among the options"]),
    # 28 empty question
    ("**1. **\n- A) red\n- B) blue\n- C) green\n- D) white\nAnswer: A) red", [], ["empty question"]),
    # 29 no answer line
    ("1. What color is the car?\nA) red\nB) blue\nC) green\nD) white\n", [], ["no answer line"]),
    # 30 answer letter contradicts answer text
    ("1. What color is the car?\nA) red\nB) blue\nC) green\nD) white\nAnswer: B) green", [], ["contradicts"]),
    # 31 repeated option letter
    ("1. What color is the car?\nA) red\nB) blue\nB) green\nD) white\nAnswer: A", [], ["not A-D"]),
    # 32 numbered question without any options
    ("1. What color is the car?\nAnswer: red", [], ["0 options"]),
    # 33 mix: one good, one bad, one good
    ("**1. What color is the car?**\n- A) red\n- B) blue\n- C) green\n- D) white\nAnswer: A) red\n---\n"
     "**2. How many wheels?**\n- A) two\n- B) four\nAnswer: B) four\n---\n"
     "**3. Is the car moving?**\n- A) yes\n- B) no\n- C) unclear\n- D) parked\nAnswer: D) parked\n",
     [(*COLOR_Q, "A"), ("Is the car moving?", ("yes", "no", "unclear", "parked"), "D")], ["question 2: has 2 options"]),
    # 34 empty output
    ("", [], []),
    # 35 prose only (a refusal)
    ("I'm sorry, I cannot see any image in this conversation.", [], []),
    # 36 empty option text
    ("1. What color is the car?\nA) red\nB)\nC) green\nD) white\nAnswer: A", [], ["option is empty"]),
    # 37 multi-line question text
    ("1. Look at the vehicle in the foreground.\nWhat color is it?\nA) red\nB) blue\nC) green\nD) white\n"
     "Answer: C", [("Look at the vehicle in the foreground. What color is it?", COLOR_Q[1], "C")], []),
    # 38 'Answer: **B) blue**' and extra explanation after the answer
    ("1. What color is the car?\nA) red\nB) blue\nC) green\nD) white\nAnswer: **B) blue**\n"
     "Explanation: the car body is blue.", [(*COLOR_Q, "B")], []),
]


@pytest.mark.parametrize("text,expected,reasons", CASES, ids=[f"case{i + 1}" for i in range(len(CASES))])
def test_parse_generator_output(text: str, expected: list, reasons: list[str]) -> None:
    mcqs, rejected = parse_generator_output(text)
    assert [(m.question, m.options, m.answer) for m in mcqs] == expected
    assert len(rejected) == len(reasons), rejected
    for reason, want in zip(rejected, reasons, strict=True):
        assert want in reason
    assert all(m.source == "generator" and m.id for m in mcqs)


def test_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30


def test_real_five_question_output_keeps_ids_stable() -> None:
    mcqs = [MCQ(question=f"Question number {i}?", options=("a", "b", "c", "d"), answer=LETTERS[i % 4])
            for i in range(5)]
    parsed, rejected = parse_generator_output(format_generator_output(mcqs))
    assert rejected == []
    assert [m.id for m in parsed] == [m.id for m in mcqs]


@pytest.mark.parametrize("text,n,want", [
    (" B.", 5, "B"), (" E", 5, "E"), ("(C)", 5, "C"), (" D) green", 5, "D"), ("The answer is A.", 5, "A"),
    (" I think C", 5, "C"), (" F", 5, None), (" none", 5, None), ("", 5, None), (" Definitely B", 5, "B"),
    (" E.", 4, None), ("b", 5, None),
])
def test_parse_answer_letter(text: str, n: int, want: str | None) -> None:
    assert parse_answer_letter(text, n) == want


_option = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ", min_size=1, max_size=12).map(str.strip).filter(bool)


@st.composite
def mcqs(draw: st.DrawFn) -> MCQ:
    options = draw(st.lists(_option, min_size=4, max_size=4, unique_by=lambda s: " ".join(s.split())))
    question = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz ?", min_size=1, max_size=40).map(str.strip)
                    .filter(lambda s: s.strip("?").strip() != ""))
    return MCQ(question="What " + question, options=tuple(" ".join(o.split()) for o in options),
               answer=draw(st.sampled_from("ABCD")))


@settings(max_examples=200, deadline=None)
@given(mcq=mcqs(), seed=st.integers(0, 2**32 - 1), extra=st.booleans())
def test_shuffle_keeps_the_right_answer_right(mcq: MCQ, seed: int, extra: bool) -> None:
    shown = shuffle_options(mcq, random.Random(seed), extra_option=CANNOT_ANSWER if extra else None)
    assert shown.options[LETTERS.index(shown.answer)] == mcq.answer_text
    assert sorted(shown.options[:4]) == sorted(mcq.options)
    assert [mcq.options[i] if i >= 0 else CANNOT_ANSWER for i in shown.permutation] == list(shown.options)
    if extra:
        assert shown.options[-1] == CANNOT_ANSWER and shown.permutation[-1] == -1


@settings(max_examples=100, deadline=None)
@given(mcq=mcqs(), seed=st.integers(0, 2**32 - 1))
def test_shuffled_then_formatted_roundtrips_through_the_parser(mcq: MCQ, seed: int) -> None:
    shown = shuffle_options(mcq, random.Random(seed))
    as_mcq = MCQ(question=mcq.question, options=shown.options, answer=shown.answer)
    parsed, rejected = parse_generator_output(format_generator_output([as_mcq]))
    assert rejected == []
    assert parsed[0].answer_text == mcq.answer_text
    assert parsed[0].options == shown.options
