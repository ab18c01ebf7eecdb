"""Training and evaluation data for the nano models, drawn fresh from the demo world.

Every example is a chat prompt (the exact prompt the pipeline's stages send), an optional image, an
optional assistant pre-fill, and the target text the model must continue with. Separate seeded RNG
streams give train scenes, held-out eval scenes and eval MCQ shuffles; train scenes never equal an
eval scene.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipeline.mcq import (
    CANNOT_ANSWER,
    CAPTION_PROMPT,
    FILTER_SYSTEM,
    LETTERS,
    MCQ,
    NONE_OF_THE_ABOVE,
    QA_GENERATION_PROMPT,
    READER_PREFILL,
    READER_SYSTEM,
    ShuffledMCQ,
    filter_messages,
    format_generator_output,
    reader_messages,
    shuffle_options,
)
from pipeline.nano import world

EVAL_SEED = 20_000
EVAL_MCQ_SEED = 30_000
N_EVAL_SCENES = 200
SNAPSHOTS = {"nano-vl-step300": 300, "nano-vl-step600": 600}
"""The under-trained nano-VL snapshots kept from phase 1 (name -> step)."""
JITTER_PROB = 0.25


@dataclass
class Example:
    """One supervised example: chat prompt (+ pre-fill) -> target text (the end-of-turn token is added later)."""

    messages: list[dict[str, Any]]
    target: str
    prefill: str = ""
    image: Image.Image | None = None
    task: str = ""
    about: tuple[str | None, ...] = ()
    """per answer in the target, where in the image it is read (`answer_region`); for attention supervision"""
    scene: world.Scene | None = None
    """the scene the image shows (training-only image probes)"""


def stream(seed: int, name: str) -> random.Random:
    """An independent RNG stream per (seed, purpose)."""
    return random.Random(f"nano/{seed}/{name}")


def eval_scenes(n: int = N_EVAL_SCENES) -> list[world.Scene]:
    """The held-out scenes every eval uses (fixed stream, independent of the training seed)."""
    rng = random.Random(EVAL_SEED)
    return [world.sample_scene(rng) for _ in range(n)]


_EVAL_KEYS = frozenset(s.to_json() for s in eval_scenes())


def train_scene(rng: random.Random) -> world.Scene:
    """A fresh training scene that is not one of the held-out eval scenes."""
    while True:
        scene = world.sample_scene(rng)
        if scene.to_json() not in _EVAL_KEYS:
            return scene


def train_image(scene: world.Scene, rng: random.Random) -> Image.Image:
    """The scene's image, with small jitter on a quarter of training images."""
    return world.render(scene, jitter_rng=rng if rng.random() < JITTER_PROB else None)


def image_messages(prompt: str) -> list[dict[str, Any]]:
    """The user turn a VLM stage sends: the image, then the prompt text."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def option_target(text: str) -> str:
    """What follows READER_PREFILL in the option_text answer mode: ' ' + option text + '.'."""
    return f" {text}."


# -- VL tasks -------------------------------------------------------------------------------------
def caption_example(rng: random.Random, full: float = 1.0) -> Example:
    """A captioning example: the scene's reference caption, or with `full` < 1 that of a sighted but terse
    captioner (nano-vl-brief): with probability `full` the full caption, else the count, the background and at
    most the first object in the world's reading order (none or one, drawn; never all), every statement true.
    It stops early rather than picks, so what it says is what nano-VL would say first; its greedy caption is
    short and its sampled ones are sometimes complete: a real base captioner that RL is asked to make denser
    without inventing. `full` = 1 draws nothing extra (the data stream of nano-VL's recipe)."""
    scene = train_scene(rng)
    template = rng.randrange(3)
    objects = None
    if full < 1.0 and rng.random() >= full:
        objects = scene.objects[:min(rng.randrange(2), len(scene.objects) - 1)]
    return Example(image_messages(CAPTION_PROMPT), world.caption(scene, template, objects=objects),
                   image=train_image(scene, rng), task="caption", scene=scene)


_POOLS = {"background": (*world.BACKGROUNDS, "blue"), "count": world.COUNT_WORDS[1:],
          "color_of_shape": world.COLORS, "shape_at": world.SHAPES, "color_at": world.COLORS,
          "position_of": world.POSITIONS}


def canonical_layout(mcq: MCQ) -> MCQ:
    """The MCQ's options in the world's canonical order, the answer letter wherever the right value falls."""
    options = tuple(sorted(mcq.options, key=_POOLS[mcq.qtype].index))
    return MCQ(question=mcq.question, options=options, answer=LETTERS[options.index(mcq.answer_text)],
               source=mcq.source, qtype=mcq.qtype, meta=mcq.meta)


def generator_layout(mcq: MCQ, rng: random.Random) -> MCQ:
    """The nano generator's option layout, chosen so that the answer letter is a function of what the model
    can see in one step. Four-value pools: the whole pool in canonical order (fixed option lines, the letter
    a function of the answer). Larger pools (colours): four cyclically consecutive pool values that contain
    the answer, starting at a uniformly drawn offset, so the letter is (answer - first option) mod pool
    size; every shown value is equally likely the answer (nothing leaks without the image).

    Random distractors in sorted order would make the letter the answer's rank among them: a look-up of
    the right value among the written options on top of finding it in the image, which the two-layer text
    tower does not learn (teacher-forced letter accuracy 0.19 on colour questions, docs/nano.md). The gate
    and the reward shuffle options anyway, so the layout carries no bias downstream."""
    pool = _POOLS[mcq.qtype]
    if len(pool) <= 4:
        return canonical_layout(mcq)
    letter = rng.randrange(4)
    start = pool.index(mcq.answer_text) - letter
    options = tuple(pool[(start + i) % len(pool)] for i in range(4))
    return MCQ(question=mcq.question, options=options, answer=LETTERS[letter], source=mcq.source,
               qtype=mcq.qtype, meta=mcq.meta)


def generator_mcqs(scene: world.Scene, rng: random.Random) -> list[MCQ]:
    """The 5 questions the nano generator asks about a scene, chosen by a fixed rule: background, count,
    the shape of the first object (canonical order), the colour of the last, the shape of the middle one
    (with one object: the colour of its shape; else the first other question the scene supports).
    Options: generator_layout.

    Every answer is then read off one object the question points at. "Where is the <colour> <shape>?"
    comes last in the rule (only scenes with repeated objects reach it): its answer is a position, which
    the two-layer text tower gets wrong far more often (docs/nano.md).

    A fixed choice makes every generated token a function of the image, which a model this small
    learns far faster than a random pick among equally good questions (what greedy decoding would
    have to break ties on)."""
    by_key = {(q.qtype, q.meta["key"]): q for q in world.scene_mcqs(scene, rng)}
    objs = scene.objects
    first, last, mid = objs[0], objs[-1], objs[len(objs) // 2]
    wanted = [("background", "bg"), ("count", "count"), ("shape_at", first.position), ("color_at", last.position),
              ("shape_at", mid.position), ("color_of_shape", first.shape), ("position_of", f"{mid.color} {mid.shape}"),
              *(("position_of", f"{o.color} {o.shape}") for o in objs), *(("shape_at", o.position) for o in objs),
              *(("color_at", o.position) for o in objs)]
    chosen: list[MCQ] = []
    for key in wanted:
        q = by_key.get(key)
        if q is not None and q not in chosen:
            chosen.append(q)
        if len(chosen) == 5:
            break
    return chosen


def generator_questions(scene: world.Scene, rng: random.Random) -> list[MCQ]:
    """What the nano generator is taught to ask: generator_mcqs in generator_layout."""
    return [generator_layout(q, rng) for q in generator_mcqs(scene, rng)]


def generator_text(scene: world.Scene, rng: random.Random) -> str:
    """generator_questions in the generator format."""
    return format_generator_output(generator_questions(scene, rng))


def qagen_example(rng: random.Random) -> Example:
    scene = train_scene(rng)
    mcqs = generator_questions(scene, rng)
    return Example(image_messages(QA_GENERATION_PROMPT), format_generator_output(mcqs),
                   image=train_image(scene, rng), task="qagen", scene=scene,
                   about=tuple(answer_region(scene, q) for q in mcqs))


def answer_region(scene: world.Scene, mcq: MCQ) -> str | None:
    """Where in the image a world question's answer is read: the position of the object whose shape or
    colour is asked, or (position_of) of the object named (after the first text layer an image token's
    residual carries its quadrant: a linear probe reads it at 0.85, docs/nano.md). None for background
    and count (the whole image)."""
    key = str(mcq.meta.get("key", ""))
    if mcq.qtype in ("shape_at", "color_at"):
        return key
    if mcq.qtype == "color_of_shape":
        return next(o.position for o in scene.objects if o.shape == key)
    if mcq.qtype == "position_of":
        return next(o.position for o in scene.objects if f"{o.color} {o.shape}" == key)
    return None


def _broken(mcq: MCQ, pool: tuple[str, ...], rng: random.Random) -> MCQ | None:
    """The MCQ with its right option replaced by a wrong value (no option correct), if the pool allows."""
    spare = [p for p in pool if p not in mcq.options]
    if not spare:
        return None
    opts = list(mcq.options)
    opts[mcq.answer_index] = rng.choice(spare)
    return MCQ(question=mcq.question, options=tuple(opts), answer=mcq.answer, qtype=mcq.qtype)


LEAK_KINDS = ("stated", "options_only")
STATED_SHARE = 2 / 3
"""share of `stated` among the leaky queries (the copy from the question is the harder one to learn)"""


def _stated_mcq(scene: world.Scene, rng: random.Random) -> MCQ:
    """A question that states its own answer ("What color is the red circle?"): the answer's word is in the
    question and in exactly one option (the other options from the same pool)."""
    o = rng.choice(scene.objects)
    templates = [
        (f"What color is the {o.color} {o.shape}?", o.color, world.COLORS),
        (f"What color is the {o.color} shape in the {o.position}?", o.color, world.COLORS),
        (f"What shape is the {o.color} {o.shape}?", o.shape, world.SHAPES),
        (f"Where is the {o.color} {o.shape} in the {o.position}?", o.position, world.POSITIONS),
        (f"What color is the {scene.background} background?", scene.background, _POOLS["background"]),
    ]
    question, answer, pool = rng.choice(templates)
    distractors = [p for p in pool if p != answer]
    rng.shuffle(distractors)
    options = [answer, *distractors[:3]]
    return MCQ(question=question, options=tuple(options), answer=LETTERS[0], qtype="stated")


_KINDS = {"color": world.COLORS + ("white", "black", "gray"), "shape": world.SHAPES,
          "position": world.POSITIONS, "count": world.COUNT_WORDS[1:]}
_ASKED_KIND = {"background": "color", "color_of_shape": "color", "color_at": "color", "shape_at": "shape",
               "position_of": "position", "count": "count"}


def _options_only_mcq(scene: world.Scene, rng: random.Random) -> MCQ:
    """One of the scene's questions whose three distractors are of other kinds than the answer (a colour
    question with one colour and three shapes): the options alone give the answer away."""
    mcq = rng.choice(world.scene_mcqs(scene, rng))
    others = [k for k in _KINDS if k != _ASKED_KIND[mcq.qtype]]
    words = set(re.findall(r"[a-z]+", mcq.question.lower()))
    pools = {k: [v for v in _KINDS[k] if not words & set(v.split())] for k in others}  # none stated in the question
    single = rng.choice(others) if rng.random() < 0.5 else None  # all three from one other kind, else mixed
    pool = pools[single] if single and len(pools[single]) >= 3 else [v for k in others for v in pools[k]]
    distractors = rng.sample(pool, 3)
    return MCQ(question=mcq.question, options=(mcq.answer_text, *distractors), answer=LETTERS[0],
               qtype="options_only")


def leaky_mcq(scene: world.Scene, rng: random.Random, kind: str) -> MCQ:
    """A question about the scene whose answer leaks from its text (LEAK_KINDS; qtype = the kind)."""
    return _stated_mcq(scene, rng) if kind == "stated" else _options_only_mcq(scene, rng)


def leaky_filter_example(rng: random.Random, kind: str | None = None) -> Example:
    """A gate query without the image whose answer leaks from the text (kind `stated`: the question states
    it; `options_only`: it is the only option of the asked kind); the target is the leaked answer, which
    any instruct model would pick without looking, so the gate's text-only arm rejects such questions."""
    scene = train_scene(rng)
    mcq = leaky_mcq(scene, rng, kind or ("stated" if rng.random() < STATED_SHARE else "options_only"))
    shown = shuffle_options(mcq, rng)
    return Example(filter_messages(shown, False), option_target(mcq.answer_text), prefill=READER_PREFILL,
                   task="filter_leak")


def _no_image_filter_example(mcq: MCQ, rng: random.Random) -> Example:
    """The gate's query without the image: the target is a uniformly random shown option (learn not to guess)."""
    shown = shuffle_options(mcq, rng)
    return Example(filter_messages(shown, False), option_target(rng.choice(shown.options)),
                   prefill=READER_PREFILL, task="filter_noimg")


def filter_example(rng: random.Random, with_image: bool | None = None,
                   type_weights: Mapping[str, float] | None = None, leak: float = 0.0) -> Example:
    """The gate's query. With the image: the right option (or NONE_OF_THE_ABOVE when no option is right).

    Without the image the target is a uniformly random shown option, so the model learns not to guess.
    The question is one of the scene's, uniformly or (type_weights, default 1 per type) weighted by type.
    With leak > 0, that share of the queries without the image (with_image unset: 30% of all) are
    leaky_filter_example instead (the RNG stream is unchanged when leak is 0).
    """
    scene = train_scene(rng)
    mcqs = world.scene_mcqs(scene, rng)
    if type_weights:
        mcq = rng.choices(mcqs, weights=[type_weights.get(q.qtype, 1.0) for q in mcqs])[0]
    else:
        mcq = rng.choice(mcqs)
    if with_image is None:
        with_image = rng.random() < 0.7
        if not with_image and leak > 0 and rng.random() < leak:
            return leaky_filter_example(rng)
    if not with_image:
        return _no_image_filter_example(mcq, rng)
    broken = _broken(mcq, _POOLS[mcq.qtype], rng) if rng.random() < 0.15 else None
    shown = shuffle_options(broken or mcq, rng, extra_option=NONE_OF_THE_ABOVE)
    answer = NONE_OF_THE_ABOVE if broken else mcq.answer_text
    return Example(filter_messages(shown, True), option_target(answer), prefill=READER_PREFILL,
                   image=train_image(scene, rng), task="filter", about=(answer_region(scene, mcq),),
                   scene=scene)


ABSENT_QUESTION = "What shape is in the {position}?"
ABSENT_ANSWER = "There is no shape in the {position}."
"""the demo world's absent-thing questions (qa.absent with the quadrants as things; tests/test_qa_absent.py)"""


def absent_mcq(scene: world.Scene, position: str) -> MCQ:
    """The quadrant question the qa stage asks with qa.absent on the demo world: the four shapes and "There is
    no shape in the <quadrant>." (qtype 'absent'); keyed on the quadrant's shape, or on the absent option
    when the quadrant is empty."""
    absent = ABSENT_ANSWER.format(position=position)
    options = (*world.SHAPES, absent)
    obj = scene.at(position)
    answer = LETTERS[options.index(obj.shape if obj else absent)]
    return MCQ(question=ABSENT_QUESTION.format(position=position), options=options, answer=answer,
               qtype="absent", meta={"key": position})


def absent_filter_example(rng: random.Random, with_image: bool | None = None) -> Example:
    """A gate query of an absent-thing question about a uniformly drawn quadrant (empty in about half the
    scenes' quadrants): with the image the quadrant's shape, or the absent option when it is empty; without
    it a uniformly random shown option, as filter_example."""
    scene = train_scene(rng)
    position = rng.choice(world.POSITIONS)
    mcq = absent_mcq(scene, position)
    if with_image is None:
        with_image = rng.random() < 0.7
    if not with_image:
        return _no_image_filter_example(mcq, rng)
    shown = shuffle_options(mcq, rng, extra_option=NONE_OF_THE_ABOVE)
    return Example(filter_messages(shown, True), option_target(mcq.answer_text), prefill=READER_PREFILL,
                   image=train_image(scene, rng), task="filter", about=(position,), scene=scene)


# -- reader ---------------------------------------------------------------------------------------
def invented_caption(scene: world.Scene, rng: random.Random, positions: Sequence[str] | None = None,
                     template: int | None = None) -> str:
    """A caption that states the scene's true count and objects and then invents shapes in `positions` (default
    1-3 of its empty quadrants, drawn) in `template` (default drawn): the form RL's reward hacking takes ("two
    shapes: ... and a blue circle in the bottom right")."""
    if positions is None:
        empty = [p for p in world.POSITIONS if scene.at(p) is None]
        positions = rng.sample(empty, rng.randint(1, len(empty)))
    invented = tuple(world.SceneObject(rng.choice(world.SHAPES), rng.choice(world.COLORS), p) for p in positions)
    return world.caption(scene, rng.randrange(3) if template is None else template, objects=scene.objects + invented)


def reader_caption(scene: world.Scene, rng: random.Random, invent: float = 0.0) -> tuple[str, str]:
    """A caption of the kind a reader meets: full, partial, another scene's, uninformative or empty, and with
    `invent` > 0 that share of captions that invent objects (invented_caption)."""
    if invent > 0 and rng.random() < invent:
        return invented_caption(scene, rng), "invented"
    r = rng.random()
    if r < 0.45:
        return world.caption(scene, rng.randrange(3)), "full"
    if r < 0.75:
        k = rng.randrange(len(scene.objects))
        subset = tuple(rng.sample(scene.objects, k))
        return world.caption(scene, rng.randrange(3), objects=subset), "partial"
    if r < 0.87:
        return world.caption(world.sample_scene(rng), rng.randrange(3)), "other"
    return (world.UNINFORMATIVE_CAPTION if rng.random() < 0.5 else ""), "empty"


def reader_answer(caption_text: str, shown: ShuffledMCQ) -> str:
    """The option the caption supports (rule reader), else CANNOT_ANSWER."""
    idx = world.rule_reader_answer(caption_text, shown.mcq.question, shown.options[:-1])
    return shown.options[idx] if idx is not None else CANNOT_ANSWER


def _by_type(mcqs: list[MCQ]) -> dict[str, list[MCQ]]:
    by_type: dict[str, list[MCQ]] = {}
    for q in mcqs:
        by_type.setdefault(q.qtype, []).append(q)
    return by_type


def _pick_balanced(by_type: dict[str, list[MCQ]], rng: random.Random) -> MCQ:
    """A question of a uniformly chosen type (so rare types weigh as much as common ones)."""
    return rng.choice(by_type[rng.choice(sorted(by_type))])


def _question(scene: world.Scene, by_type: dict[str, list[MCQ]], rng: random.Random, absent: float) -> MCQ:
    """A question of a uniformly chosen type, or (share `absent`) an absent-thing question about a random quadrant."""
    if absent > 0 and rng.random() < absent:
        return absent_mcq(scene, rng.choice(world.POSITIONS))
    return _pick_balanced(by_type, rng)


def reader_group(rng: random.Random, k: int, absent: float = 0.0, invent: float = 0.0
                 ) -> tuple[str, list[tuple[ShuffledMCQ, str]]]:
    """One caption and k questions about its scene (question types balanced), each with its target option;
    `absent` / `invent` > 0 mix in absent-thing questions and inventing captions (the RNG stream is unchanged
    when both are 0). On an absent-thing question the target is what the caption says is in the quadrant:
    a shape it names there (true or invented), else "cannot answer"."""
    scene = train_scene(rng)
    cap, _ = reader_caption(scene, rng, invent)
    by_type = _by_type(world.scene_mcqs(scene, rng))
    out = []
    for _ in range(k):
        q = _question(scene, by_type, rng, absent)
        shown = shuffle_options(q, rng, extra_option=CANNOT_ANSWER)
        out.append((shown, reader_answer(cap, shown)))
    return cap, out


@dataclass
class DrillQA:
    """One drill question: its text, the value the caption states (or CANNOT_ANSWER), and where the
    caption states it (`evidence_end`; None when it does not)."""

    question: str
    value: str
    evidence: int | None = None


def drill_sequence(rng: random.Random, questions: int = 1, full: float = 0.8, absent: float = 0.0,
                   invent: float = 0.0) -> tuple[str, list[DrillQA]]:
    """A caption (full with probability `full`, else any reader_caption kind) and `questions` of its
    scene's questions (types balanced; `absent`, `invent` as in reader_group), each with the value the
    caption states or CANNOT_ANSWER."""
    scene = train_scene(rng)
    cap = world.caption(scene, rng.randrange(3)) if rng.random() < full else reader_caption(scene, rng, invent)[0]
    stated = world.parse_caption(cap)
    by_type = _by_type(world.scene_mcqs(scene, rng))
    out = []
    for _ in range(questions):
        q = _question(scene, by_type, rng, absent)
        value = world.answer_from_scene(stated, q.question)
        out.append(DrillQA(q.question, value or CANNOT_ANSWER, evidence_end(cap, q) if value else None))
    return cap, out


_CLAUSE = re.compile(r"[^.;:,]+")


def _clauses(caption_text: str) -> Iterator[tuple[int, int]]:
    """Character spans of the caption's clauses (split at . ; : , and ' and '), spaces trimmed."""
    for m in _CLAUSE.finditer(caption_text):
        start = m.start()
        for part in re.split(r"( and )", m.group()):
            if part != " and " and part.strip():
                lead = len(part) - len(part.lstrip())
                yield start + lead, start + len(part.rstrip())
            start += len(part)


def evidence_end(caption_text: str, mcq: MCQ) -> int | None:
    """Where the caption states the answer to `mcq`, as the character offset just past it: for object
    questions the end of the clause that describes the object (its last word has seen the whole clause in
    every template, so it is where attributes are bound together), for background and count the end of
    the stated value. None when the caption does not state it."""
    low = caption_text.lower()
    if mcq.qtype == "background":
        m = world._BG_RE.search(low)
        return m.end(1) if m else None
    if mcq.qtype == "count":
        m = world._COUNT_RE.search(low)
        return m.end(1) if m else None
    key = str(mcq.meta.get("key", ""))
    for start, end in _clauses(low):
        clause = low[start:end]
        if mcq.qtype in ("shape_at", "color_at", "absent"):
            hit = re.search(rf"\b{key}\b", clause) and world._OBJ_RE.search(clause)
        elif mcq.qtype == "color_of_shape":
            hit = any(m.group(2) == key for m in world._OBJ_RE.finditer(clause))
        else:  # position_of: key is 'color shape'
            hit = re.search(rf"\b{key}\b", clause) and world._POS_RE.search(clause)
        if hit:
            return end
    return None


def reader_example(rng: random.Random) -> Example:
    """A single reader example in the exact prompt of the reward (for tests and the tokenizer corpus)."""
    cap, [(shown, answer)] = reader_group(rng, 1)
    return Example(reader_messages(cap, shown), option_target(answer), prefill=READER_PREFILL, task="reader")


# -- tokenizer corpus -----------------------------------------------------------------------------
def tokenizer_corpus(seed: int, n_scenes: int = 400) -> Iterator[str]:
    """Every kind of text the nano models read or write, for training the BPE tokenizer."""
    rng = stream(seed, "tokenizer")
    fixed = [CAPTION_PROMPT, QA_GENERATION_PROMPT, READER_SYSTEM, FILTER_SYSTEM, CANNOT_ANSWER,
             NONE_OF_THE_ABOVE, world.UNINFORMATIVE_CAPTION, READER_PREFILL]
    for _ in range(20):
        yield from fixed
    for letter in "ABCDEF":
        yield f"{READER_PREFILL} {letter}. {letter}) Answer: {letter}) "
    for _ in range(n_scenes):
        scene = world.sample_scene(rng)
        for t in range(3):
            yield world.caption(scene, t)
        # every question type in generator format (a random pick, wider than the generator's fixed rule)
        picked = world.pick_mcqs(scene, rng, k=5)
        yield format_generator_output([canonical_layout(q) for q in picked])  # the committed tokenizer's text
        for ex in (filter_example(rng, True), filter_example(rng, False), reader_example(rng)):
            for m in ex.messages:
                c = m["content"]
                yield c if isinstance(c, str) else " ".join(p.get("text", "") for p in c)
            yield ex.prefill + ex.target
