"""The demo world: synthetic scenes with exact ground truth, so every stage can be judged on CPU.

A scene is a background colour and 1-3 coloured shapes in distinct quadrants. From a scene come
its image (Pillow), reference captions (3 templates, objects in a canonical order), ground-truth
MCQs of six types, and a rule reader that answers MCQs from a caption by parsing it (a control
for learned readers and a low-variance reward for testing RL mechanics).
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from pipeline.mcq import LETTERS, MCQ

BACKGROUNDS = ("white", "black", "gray")
SHAPES = ("circle", "square", "triangle", "star")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = ("zero", "one", "two", "three", "four")
MAX_OBJECTS = 3
IMAGE_SIZE = 112
UNINFORMATIVE_CAPTION = "An image."

RGB = {
    "white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128),
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 80, 230),
    "yellow": (240, 210, 20), "purple": (140, 50, 180), "orange": (250, 140, 20),
}
QTYPES = ("background", "count", "color_of_shape", "shape_at", "color_at", "position_of")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    position: str


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [o.__dict__ for o in self.objects]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        objs = tuple(SceneObject(**o) for o in d["objects"])
        return cls(background=d["background"], objects=_canonical(objs))

    def at(self, position: str) -> SceneObject | None:
        return next((o for o in self.objects if o.position == position), None)


def _canonical(objs: tuple[SceneObject, ...]) -> tuple[SceneObject, ...]:
    return tuple(sorted(objs, key=lambda o: POSITIONS.index(o.position)))


def sample_scene(rng: random.Random, max_objects: int = MAX_OBJECTS) -> Scene:
    """A random scene: background, 1..max_objects shapes in distinct quadrants."""
    n = rng.randint(1, max_objects)
    positions = rng.sample(POSITIONS, n)
    objs = tuple(SceneObject(rng.choice(SHAPES), rng.choice(COLORS), p) for p in positions)
    return Scene(background=rng.choice(BACKGROUNDS), objects=_canonical(objs))


def render(scene: Scene, size: int = IMAGE_SIZE, jitter_rng: random.Random | None = None) -> Image.Image:
    """Draw the scene; optional jitter moves and resizes shapes a little inside their quadrants."""
    img = Image.new("RGB", (size, size), RGB[scene.background])
    draw = ImageDraw.Draw(img)
    half = size / 2
    for obj in scene.objects:
        row, col = (0 if "top" in obj.position else 1), (0 if "left" in obj.position else 1)
        cx, cy = col * half + half / 2, row * half + half / 2
        r = half * 0.34
        if jitter_rng is not None:
            cx += jitter_rng.uniform(-0.08, 0.08) * half
            cy += jitter_rng.uniform(-0.08, 0.08) * half
            r *= jitter_rng.uniform(0.85, 1.1)
        _draw_shape(draw, obj.shape, cx, cy, r, RGB[obj.color])
    return img


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.88
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# -- captions -------------------------------------------------------------------------------------
def _an(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, template: int = 0, objects: tuple[SceneObject, ...] | None = None) -> str:
    """A reference caption; `objects` restricts it to a subset (an incomplete caption)."""
    objs = scene.objects if objects is None else _canonical(tuple(objects))
    n = len(scene.objects)
    noun = "shape" if n == 1 else "shapes"
    count = f"{COUNT_WORDS[n]} {noun}"
    if template == 0:
        parts = [f"The image shows {count} on {_an(scene.background)} {scene.background} background."]
        parts += [f"In the {o.position} there is {_an(o.color)} {o.color} {o.shape}." for o in objs]
        return " ".join(parts)
    if template == 1:
        items = [f"{_an(o.color)} {o.color} {o.shape} in the {o.position}" for o in objs]
        body = _join(items)
        return f"{_an(scene.background).capitalize()} {scene.background} background with {count}" + (
            f": {body}." if body else "."
        )
    if template == 2:
        parts = [f"On {_an(scene.background)} {scene.background} background, there {'is' if n == 1 else 'are'} {count}."]
        parts += [f"The {o.position} has {_an(o.color)} {o.color} {o.shape}." for o in objs]
        return " ".join(parts)
    raise ValueError(f"unknown caption template {template}")


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


_OBJ_RE = re.compile(r"\b(" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r")s?\b")
_POS_RE = re.compile(r"\b(" + "|".join(POSITIONS) + r")\b")
_BG_RE = re.compile(r"\b(" + "|".join(BACKGROUNDS) + r") background\b")
_COUNT_RE = re.compile(r"\b(" + "|".join(COUNT_WORDS[1:]) + r") (?:shape|object)s?\b")


def parse_caption(text: str) -> dict[str, Any]:
    """What a caption states: background, count, and objects (color, shape, position or None)."""
    low = text.lower()
    bg = _BG_RE.search(low)
    cnt = _COUNT_RE.search(low)
    objects = []
    for clause in re.split(r"[.;:,]| and ", low):
        found = _OBJ_RE.findall(clause)
        pos = _POS_RE.findall(clause)
        for i, (color, shape) in enumerate(found):
            objects.append({"color": color, "shape": shape, "position": pos[i] if i < len(pos) else None})
    return {
        "background": bg.group(1) if bg else None,
        "count": COUNT_WORDS.index(cnt.group(1)) if cnt else None,
        "objects": objects,
    }


# -- MCQs -----------------------------------------------------------------------------------------
def _make(question: str, answer: str, pool: tuple[str, ...] | list[str], rng: random.Random, qtype: str, key: str) -> MCQ:
    distractors = [p for p in pool if p != answer]
    rng.shuffle(distractors)
    options = [answer, *distractors[:3]]
    rng.shuffle(options)
    return MCQ(question=question, options=tuple(options), answer=LETTERS[options.index(answer)],
               source="world", qtype=qtype, meta={"key": key})


def scene_mcqs(scene: Scene, rng: random.Random) -> list[MCQ]:
    """Every ground-truth question the scene supports, one per (type, subject), options shuffled."""
    out: list[MCQ] = []
    bg_pool = (*BACKGROUNDS, "blue")
    out.append(_make("What color is the background?", scene.background, bg_pool, rng, "background", "bg"))
    out.append(_make("How many shapes are in the image?", COUNT_WORDS[len(scene.objects)],
                     COUNT_WORDS[1:], rng, "count", "count"))
    shapes = [o.shape for o in scene.objects]
    for o in scene.objects:
        if shapes.count(o.shape) == 1:
            out.append(_make(f"What color is the {o.shape}?", o.color, COLORS, rng, "color_of_shape", o.shape))
        out.append(_make(f"What shape is in the {o.position}?", o.shape, SHAPES, rng, "shape_at", o.position))
        out.append(_make(f"What color is the shape in the {o.position}?", o.color, COLORS, rng, "color_at", o.position))
        same = [p for p in scene.objects if p.color == o.color and p.shape == o.shape]
        if len(same) == 1:
            out.append(_make(f"Where is the {o.color} {o.shape}?", o.position, POSITIONS, rng,
                             "position_of", f"{o.color} {o.shape}"))
    return out


def pick_mcqs(scene: Scene, rng: random.Random, k: int = 5) -> list[MCQ]:
    """k questions of as many different types as possible (what a generator is asked for)."""
    pool = scene_mcqs(scene, rng)
    rng.shuffle(pool)
    chosen: list[MCQ] = []
    for qtype in rng.sample(QTYPES, len(QTYPES)):
        match = next((q for q in pool if q.qtype == qtype and q not in chosen), None)
        if match is not None and len(chosen) < k:
            chosen.append(match)
    for q in pool:
        if len(chosen) >= k:
            break
        if q not in chosen:
            chosen.append(q)
    return chosen


def answer_from_scene(scene_facts: dict[str, Any], question: str) -> str | None:
    """The answer text a set of stated facts gives to one of the world's questions, or None if not stated."""
    objs = scene_facts.get("objects", [])
    q = question.lower()
    if q.startswith("what color is the background"):
        return scene_facts.get("background")
    if q.startswith("how many shapes"):
        n = scene_facts.get("count")
        return COUNT_WORDS[n] if n is not None and 0 < n < len(COUNT_WORDS) else None
    m = re.match(r"what color is the shape in the (.+)\?", q)
    if m:
        hits = [o for o in objs if o["position"] == m.group(1)]
        return hits[0]["color"] if len(hits) == 1 else None
    m = re.match(r"what color is the (\w+)\?", q)
    if m:
        hits = {o["color"] for o in objs if o["shape"] == m.group(1)}
        return hits.pop() if len(hits) == 1 else None
    m = re.match(r"what shape is in the (.+)\?", q)
    if m:
        hits = [o for o in objs if o["position"] == m.group(1)]
        return hits[0]["shape"] if len(hits) == 1 else None
    m = re.match(r"where is the (\w+) (\w+)\?", q)
    if m:
        hits = [o for o in objs if o["color"] == m.group(1) and o["shape"] == m.group(2) and o["position"]]
        return hits[0]["position"] if len(hits) == 1 else None
    return None


def rule_reader_answer(caption_text: str, question: str, options: list[str] | tuple[str, ...]) -> int | None:
    """Index of the option the caption supports, or None when the caption does not say (the control reader)."""
    value = answer_from_scene(parse_caption(caption_text), question)
    if value is None:
        return None
    return next((i for i, o in enumerate(options) if o.strip().lower() == value), None)


def scene_facts(scene: Scene) -> dict[str, Any]:
    return {"background": scene.background, "count": len(scene.objects),
            "objects": [o.__dict__ for o in scene.objects]}


def caption_accuracy(scene: Scene, caption_text: str) -> dict[str, float]:
    """Per-attribute agreement of a caption with its scene, and whether it states the exact scene."""
    stated = parse_caption(caption_text)
    truth = scene_facts(scene)
    checks = {"background": stated["background"] == scene.background,
              "count": stated["count"] == len(scene.objects)}
    stated_at = {o["position"]: o for o in stated["objects"] if o["position"]}
    for o in scene.objects:
        s = stated_at.get(o.position)
        checks[f"{o.position}/shape"] = bool(s and s["shape"] == o.shape)
        checks[f"{o.position}/color"] = bool(s and s["color"] == o.color)
    exact = all(checks.values()) and {(o["color"], o["shape"], o["position"]) for o in stated["objects"]} == {
        (o["color"], o["shape"], o["position"]) for o in truth["objects"]}
    return {"attribute_accuracy": sum(checks.values()) / len(checks), "exact": float(exact)}
