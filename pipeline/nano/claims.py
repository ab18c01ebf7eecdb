"""The demo world's claim parser: what a caption asserts about a scene, each assertion checked against the truth.

Claims are extracted from the lower-cased caption in two passes (each claim counted once per caption):
1. **Negations**, then blanked out of the text so that "no red circle" never also counts as a red circle:
   "no [colour] shape[s] [in the P]" (no such object [there]), "no shape / nothing in the P", "the P is empty"
   (the quadrant is empty), "the shape [in the P] is not C" / "a circle, not red" (no such object has colour C),
   "the background is not B" / "not a B background".
2. **Positive claims**: "B background" (the background), "N shapes" / "N objects" (the count), and every
   "colour shape" mention. A mention is placed at a quadrant when the same clause says so, first in the
   forms "in the P there is a ..." / "the P has a ..." (position before the object; the article may be dropped,
   "the P has X"), then "... in the P" (position after), last the verbless "the P [there] [a] X" for a mention
   still unplaced (after the other two, so a run-on "a X in the P a Y in the Q" keeps Y at Q); each quadrant phrase places at most one object. A placed
   object makes two claims (its shape at P, its colour at P), both false when P is empty (an invented object);
   an unplaced one makes one ("there is a red circle somewhere").
Coverage counts the scene's facts (background, count, each object's shape and colour at its quadrant: the
attribute accuracy of `world.caption_accuracy`) that a true claim states.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from pipeline.faithful import Claim, FactCheck
from pipeline.nano.world import BACKGROUNDS, COLORS, COUNT_WORDS, POSITIONS, SHAPES, Scene, SceneObject

_C, _S, _P, _B = ("|".join(v) for v in (COLORS, SHAPES, POSITIONS, BACKGROUNDS))
_NEGATIONS = (
    ("object", re.compile(rf"\bno (?:({_C}) )?({_S})s?(?: (?:in|at) the ({_P}))?\b")),
    ("empty", re.compile(rf"\b(?:no (?:shapes?|objects?)|nothing) (?:in|at) the ({_P})\b")),
    ("empty", re.compile(rf"\bthe ({_P}) is empty\b")),
    ("color", re.compile(rf"\b(?:the )?({_S}|shape)(?: (?:in|at) the ({_P}))?,? (?:is |but |and )?not ({_C})\b")),
    ("background", re.compile(rf"\b(?:the )?background is not ({_B})\b")),
    ("background", re.compile(rf"\bnot an? ({_B}) background\b")),
)
_BACKGROUND = re.compile(rf"\b({_B}) background\b")
_COUNT = re.compile(rf"\b({'|'.join(COUNT_WORDS[1:])}) (?:shape|object)s?\b")
_MENTION = re.compile(rf"\b(?P<color>{_C}) (?P<shape>{_S})s?\b|\b(?P<pos>{_P})\b")
_BEFORE = re.compile(r"^\s*,?\s*(?:there (?:is|are)|has|contains|holds|is)(?:\s+(?:a|an|one))?\s*$")
_VERBLESS = re.compile(r"^\s+(?:there\s+)?(?:(?:a|an|one)\s+)?$")
_AFTER = re.compile(r"^\s*(?:(?:which|that) )?(?:is |are |sits )?(?:in|at) the\s*$")


def check_caption(truth: str, caption: str) -> FactCheck | None:
    """The caption's claims checked against a scene given as JSON (None: the truth is not a scene)."""
    try:
        scene = Scene.from_dict(json.loads(truth))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return check_scene(scene, caption)


def check_scene(scene: Scene, caption: str) -> FactCheck:
    """The caption's distinct claims (see the module docstring) and the scene facts it covers."""
    text = caption.lower()
    claims: dict[str, Claim] = {}

    def add(name: str, true: bool, negated: bool = False) -> None:
        claims.setdefault(name, Claim(name, true, negated))

    text = _negations(scene, text, add)
    for m in _BACKGROUND.finditer(text):
        add(f"background: {m.group(1)}", m.group(1) == scene.background)
    for m in _COUNT.finditer(text):
        add(f"count: {m.group(1)}", COUNT_WORDS.index(m.group(1)) == len(scene.objects))
    for color, shape, pos in _objects(text):
        if pos is None:
            add(f"a {color} {shape}", any(o.color == color and o.shape == shape for o in scene.objects))
            continue
        there = scene.at(pos)
        add(f"{pos}: {shape}", there is not None and there.shape == shape)
        add(f"{pos}: {color}", there is not None and there.color == color)
    facts = [f"background: {scene.background}", f"count: {COUNT_WORDS[len(scene.objects)]}"]
    facts += [f"{o.position}: {v}" for o in scene.objects for v in (o.shape, o.color)]
    covered = sum(1 for f in facts if f in claims and claims[f].true)
    return FactCheck(list(claims.values()), len(facts), covered)


def _negations(scene: Scene, text: str, add: Callable[[str, bool, bool], None]) -> str:
    """Record every negated claim and return the text with those phrases blanked out."""
    for kind, pattern in _NEGATIONS:
        spans = []
        for m in pattern.finditer(text):
            _negated_claim(scene, kind, m.groups(), add)
            # "a red circle, not blue": only "not blue" goes; the circle is still stated
            spans.append((m.start(3) - len("not "), m.end(3)) if kind == "color" else m.span(0))
        for start, end in spans:
            text = text[:start] + " " * (end - start) + text[end:]
    return text


def _negated_claim(scene: Scene, kind: str, groups: tuple[str | None, ...], add: Callable[[str, bool, bool], None]) -> None:
    def matches(o: SceneObject, color: str | None, shape: str | None, pos: str | None) -> bool:
        return (color is None or o.color == color) and (shape in (None, "shape") or o.shape == shape) \
            and (pos is None or o.position == pos)

    if kind == "object":
        color, shape, pos = groups
        name = f"no {' '.join(w for w in (color, shape) if w)}" + (f" in the {pos}" if pos else "")
        add(name, not any(matches(o, color, shape, pos) for o in scene.objects), True)
    elif kind == "empty":
        add(f"{groups[0]}: empty", scene.at(groups[0] or "") is None, True)
    elif kind == "color":
        shape, pos, color = groups
        name = f"the {shape}" + (f" in the {pos}" if pos else "") + f" is not {color}"
        add(name, not any(matches(o, color, shape, pos) for o in scene.objects), True)
    else:
        add(f"background: not {groups[0]}", scene.background != groups[0], True)


def _objects(text: str) -> list[tuple[str, str, str | None]]:
    """Every 'colour shape' mention with the quadrant its clause places it at (or None)."""
    tokens = list(_MENTION.finditer(text))
    objects = [i for i, t in enumerate(tokens) if t.group("pos") is None]
    placed: dict[int, str] = {}
    used: set[int] = set()

    def place(offset: int, gap: re.Pattern[str]) -> None:
        """Bind each still unplaced mention to the unused quadrant phrase `offset` tokens away when the text
        between the two matches `gap`."""
        for i in objects:
            j = i + offset
            if i in placed or not 0 <= j < len(tokens) or not tokens[j].group("pos") or j in used:
                continue
            first, last = sorted((tokens[i], tokens[j]), key=lambda t: t.start())
            if gap.match(text[first.end():last.start()]):
                placed[i] = tokens[j].group("pos")
                used.add(j)

    place(-1, _BEFORE)    # "in the P there is a X", "the P has a X"
    place(+1, _AFTER)     # "a X in the P"
    place(-1, _VERBLESS)  # "the P a X" (no verb, no comma: the list template's ", a X" is never placed here)
    return [(tokens[i].group("color"), tokens[i].group("shape"), placed.get(i)) for i in objects]
