"""The visual-dependency gate (paper Eq. 4): keep a question the filter answers right with the image and
wrong without it.

Every question is asked R times per arm, each time with its options freshly shuffled by an RNG seeded from
(seed, image key, question id, arm, rotation), so a rerun asks exactly the same queries. The with-image arm
also offers NONE_OF_THE_ABOVE. The filter answers by generating a letter (`generate`) or by
`score_choices` over the shown options (`score`: ' A', ' B', ... or ' ' + each option's text). All queries
of one arm go to the engine in one call per `chunk_size` requests.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from PIL import Image

from pipeline.config import QAConfig
from pipeline.engines.base import ChatRequest, Engine, Sampling
from pipeline.mcq import (
    FILTER_SYSTEM,
    LETTERS,
    MCQ,
    NONE_OF_THE_ABOVE,
    READER_PREFILL,
    ReasoningPreamble,
    ShuffledMCQ,
    filter_messages,
    parse_answer_letter,
    shuffle_options,
)
from stages.qa.questions import answer_in_question

VISUAL, TEXT = "visual", "text"


@dataclass(frozen=True)
class GateSettings:
    """The gate's knobs (from QAConfig)."""

    rotations: int = 4
    visual_threshold: float = 0.75
    text_threshold: float = 0.25
    none_option: bool = True
    mode: str = "generate"
    choices: str = "letter"
    text_pooling: bool = False
    answer_in_question: bool = True
    seed: int = 0
    sampling: Sampling = Sampling(temperature=0.1, max_new_tokens=4)
    chunk_size: int = 4096

    @classmethod
    def from_config(cls, cfg: QAConfig) -> GateSettings:
        s = cfg.filter_sampling
        return cls(rotations=cfg.rotations, visual_threshold=cfg.visual_threshold, text_threshold=cfg.text_threshold,
                   none_option=cfg.none_option, mode=cfg.filter_mode, choices=cfg.filter_choices,
                   text_pooling=cfg.text_pooling, answer_in_question=cfg.answer_in_question, seed=cfg.seed,
                   sampling=replace(Sampling.from_config(s), seed=s.seed + cfg.seed), chunk_size=cfg.filter.chunk_size)

    def describe(self) -> str:
        """The settings that decide a verdict, as JSON (row provenance)."""
        d = asdict(self)
        d.pop("chunk_size")
        if self.mode == "score":
            d.pop("sampling")
        else:
            d.pop("choices")
            d.pop("text_pooling")
        return json.dumps(d, sort_keys=True)


def filter_prompt_hash() -> str:
    """A short id of the gate's prompt (system text, layout, extra option, pre-fill)."""
    probe = ShuffledMCQ(MCQ("Q?", ("a", "b"), "A", id="x"), ("a", "b"), "A", (0, 1))
    blob = json.dumps([FILTER_SYSTEM, filter_messages(probe, True), NONE_OF_THE_ABOVE, READER_PREFILL])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class GateItem:
    """One question to gate: its image key, the MCQ and the prepared image."""

    key: str
    mcq: MCQ
    image: Image.Image


@dataclass
class Verdict:
    """The gate's result for one question; answers and picks per rotation (picks as option texts)."""

    visual_acc: float
    text_acc: float
    visual_answers: list[str] = field(default_factory=list)
    visual_picks: list[str | None] = field(default_factory=list)
    text_answers: list[str] = field(default_factory=list)
    text_picks: list[str | None] = field(default_factory=list)
    kept: bool = False
    reason: str | None = None


def rotation_rng(seed: int, key: str, question_id: str, arm: str, rotation: int) -> random.Random:
    """The RNG of one shuffle: a pure function of (seed, key, question id, arm, rotation)."""
    blob = f"qa-gate|{seed}|{key}|{question_id}|{arm}|{rotation}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(blob).digest()[:8], "big"))


def shown_options(item: GateItem, arm: str, settings: GateSettings) -> list[ShuffledMCQ]:
    """The R shuffles of one question for one arm (the with-image arm adds NONE_OF_THE_ABOVE)."""
    extra = NONE_OF_THE_ABOVE if arm == VISUAL and settings.none_option else None
    return [shuffle_options(item.mcq, rotation_rng(settings.seed, item.key, item.mcq.id, arm, r), extra)
            for r in range(settings.rotations)]


def run_gate(engine: Engine, items: Sequence[GateItem], settings: GateSettings) -> list[Verdict]:
    """Gate every item: R shuffles x 2 arms, each arm's queries in chunked engine calls."""
    if not items:
        return []
    arms = {}
    for arm in (VISUAL, TEXT):
        shown = [shown_options(it, arm, settings) for it in items]
        flat = [(i, s) for i, per in enumerate(shown) for s in per]
        requests = [ChatRequest(filter_messages(s, arm == VISUAL), [items[i].image] if arm == VISUAL else [],
                                READER_PREFILL) for i, s in flat]
        answers = _ask(engine, requests, [s for _, s in flat], settings)
        arms[arm] = (shown, _per_item(answers, settings.rotations))
    verdicts = []
    for i, item in enumerate(items):
        v_shown, v_ans = arms[VISUAL][0][i], arms[VISUAL][1][i]
        t_shown, t_ans = arms[TEXT][0][i], arms[TEXT][1][i]
        t_picks = [a.pick for a in t_ans]
        failed = any(a.failed for a in v_ans + t_ans)
        if settings.mode == "score" and settings.text_pooling and not failed:
            t_picks = _pooled(t_shown, [a.scores for a in t_ans])
        verdicts.append(_verdict(item.mcq, v_shown, v_ans, t_shown, t_ans, t_picks, failed, settings))
    return verdicts


@dataclass
class Answer:
    """One gate query's outcome: raw answer, picked shown position (None: unparseable), choice scores (score
    mode), and whether the engine failed on it (a failure is never counted as a wrong answer)."""

    raw: str
    pick: int | None
    scores: list[float] | None = None
    failed: bool = False


def _ask(engine: Engine, requests: list[ChatRequest], shown: list[ShuffledMCQ], settings: GateSettings) -> list[Answer]:
    """The filter's answer to every query, `chunk_size` queries per engine call."""
    out: list[Answer] = []
    for start in range(0, len(requests), settings.chunk_size):
        reqs, part = requests[start: start + settings.chunk_size], shown[start: start + settings.chunk_size]
        if settings.mode == "score":
            choices = [[" " + (LETTERS[k] if settings.choices == "letter" else o) for k, o in enumerate(s.options)]
                       for s in part]
            for scores in engine.score_choices(reqs, choices):
                if not scores or any(math.isnan(x) for x in scores):
                    out.append(Answer("", None, None, failed=True))
                    continue
                pick = max(range(len(scores)), key=scores.__getitem__)
                out.append(Answer(LETTERS[pick], pick, list(scores)))
        else:
            for s, gens in zip(part, engine.generate(reqs, settings.sampling), strict=True):
                gen = gens[0] if gens else None
                if gen is None or gen.finish_reason == "error" or gen.error:
                    out.append(Answer((gen.error or "") if gen else "", None, failed=True))
                    continue
                try:
                    out.append(Answer(gen.text, pick_from_text(gen.text, s)))
                except ReasoningPreamble:  # the filter thought aloud: a failed query, not a wrong answer
                    out.append(Answer(gen.text, None, failed=True))
    return out


_WORD_END = re.compile(r"[\s.,;:!?)]")


def pick_from_text(text: str, shown: ShuffledMCQ) -> int | None:
    """The shown position a generated answer names: its first stand-alone letter, else the option whose
    text it starts with (the longest such)."""
    letter = parse_answer_letter(text, len(shown.options))
    if letter is not None:
        return LETTERS.index(letter)
    body = text.strip().casefold()
    hits = [(len(o), k) for k, o in enumerate(shown.options)
            if body.startswith(o.strip().casefold()) and (len(body) == len(o.strip()) or
                                                          _WORD_END.match(body[len(o.strip()):]))]
    return max(hits)[1] if hits else None


def _per_item(answers: list, rotations: int) -> list[list]:
    return [answers[i: i + rotations] for i in range(0, len(answers), rotations)]


def _pooled(shown: list[ShuffledMCQ], scores: list[list[float] | None]) -> list[int | None]:
    """One pick for all rotations: the original option with the highest log-likelihood summed over its
    shuffles, mapped back to each rotation's position."""
    total: dict[int, float] = {}
    for s, sc in zip(shown, scores, strict=True):
        for pos, original in enumerate(s.permutation):
            total[original] = total.get(original, 0.0) + (sc[pos] if sc is not None else 0.0)
    best = max(sorted(total), key=total.__getitem__)
    return [s.permutation.index(best) for s in shown]


def _arm(shown: list[ShuffledMCQ], picks: list[int | None]) -> tuple[float, list[str | None]]:
    right = [p is not None and s.permutation[p] >= 0 and s.permutation[p] == s.mcq.answer_index
             for s, p in zip(shown, picks, strict=True)]
    texts = [None if p is None else s.options[p] for s, p in zip(shown, picks, strict=True)]
    return sum(right) / len(right), texts


def _verdict(mcq: MCQ, v_shown: list[ShuffledMCQ], v_ans: list[Answer], t_shown: list[ShuffledMCQ],
             t_ans: list[Answer], t_picks: list[int | None], failed: bool, settings: GateSettings) -> Verdict:
    v_acc, v_texts = _arm(v_shown, [a.pick for a in v_ans])
    t_acc, t_texts = _arm(t_shown, t_picks)
    reason = None
    if failed:
        reason = "filter_error"
    elif settings.answer_in_question and answer_in_question(mcq):
        reason = "answer_in_question"
    elif not v_acc > settings.visual_threshold:
        reason = "not_visual"
    elif not t_acc < settings.text_threshold:
        reason = "leaky"
    return Verdict(visual_acc=v_acc, text_acc=t_acc, visual_answers=[a.raw for a in v_ans], visual_picks=v_texts,
                   text_answers=[a.raw for a in t_ans], text_picks=t_texts, kept=reason is None, reason=reason)
