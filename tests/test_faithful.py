"""Faithfulness metrics: the demo world's claim parser on hand-written captions, repetition, aggregation."""

from __future__ import annotations

import random

import pytest

from pipeline import faithful
from pipeline.nano import claims, world

SCENE = world.Scene("gray", (world.SceneObject("circle", "red", "top left"),
                             world.SceneObject("star", "blue", "bottom right")))


def judged(caption: str) -> dict[str, bool]:
    return {c.text: c.true for c in claims.check_scene(SCENE, caption).claims}


def test_reference_captions_are_fully_covered_and_make_no_false_claim():
    rng = random.Random(3)
    for _ in range(100):
        scene = world.sample_scene(rng)
        for template in range(3):
            check = claims.check_scene(scene, world.caption(scene, template))
            assert check.hallucination == 0.0 and check.coverage == 1.0
            assert check.facts == 2 + 2 * len(scene.objects)


def test_invented_objects_and_a_wrong_count_are_false_claims():
    got = judged("A gray background with three shapes: a red circle in the top left, a green square in the "
                 "top right and a blue star in the bottom right.")
    assert got == {"background: gray": True, "count: three": False, "top left: circle": True,
                   "top left: red": True, "top right: square": False, "top right: green": False,
                   "bottom right: star": True, "bottom right: blue": True}
    check = claims.check_scene(SCENE, "A gray background with three shapes: a red circle in the top left, a green "
                                      "square in the top right and a blue star in the bottom right.")
    assert check.hallucination == pytest.approx(3 / 8)
    assert check.coverage == pytest.approx(5 / 6)  # the count is the one fact stated wrongly


def test_position_before_and_after_the_object_and_unplaced_mentions():
    got = judged("In the top left there is a red circle. The bottom right has a red star. There is a blue star.")
    assert got == {"top left: circle": True, "top left: red": True, "bottom right: star": True,
                   "bottom right: red": False, "a blue star": True}
    # a run-on caption: each quadrant phrase places one object, "in the P there is" binds first
    got = judged("in the top left there is a red circle in the bottom right there is a blue star")
    assert got == {"top left: circle": True, "top left: red": True, "bottom right: star": True,
                   "bottom right: blue": True}
    # verbless clauses (what RL's captions drift to) are placed; a run-on list keeps each object at its own "in
    # the P", and the list template's ", a X" is never bound to the quadrant before the comma
    got = judged("The top left a red circle. The top right there a yellow circle.")
    assert got == {"top left: circle": True, "top left: red": True, "top right: circle": False,
                   "top right: yellow": False}
    got = judged("a red circle in the top left a blue star in the bottom right")
    assert got == {"top left: circle": True, "top left: red": True, "bottom right: star": True,
                   "bottom right: blue": True}
    got = judged("shapes in the top left, a blue star")
    assert got == {"a blue star": True}
    # the article dropped (RL's captions from nano-vl-brief: "The bottom left has green star.") is still placed
    got = judged("The top left has red circle. The bottom right blue star. The top right there yellow circle.")
    assert got == {"top left: circle": True, "top left: red": True, "bottom right: star": True,
                   "bottom right: blue": True, "top right: circle": False, "top right: yellow": False}


def test_negations_are_claims_of_their_own_and_never_count_as_the_thing_negated():
    got = judged("There is no green triangle. There is no star. Nothing in the top right. The bottom right is "
                 "empty. The circle is not red. The star is not green. The background is not black.")
    assert got == {"no green triangle": True, "no star": False, "top right: empty": True,
                   "bottom right: empty": False, "the circle is not red": False, "the star is not green": True,
                   "background: not black": True}
    assert all(c.negated for c in claims.check_scene(SCENE, "There is no red circle.").claims)
    assert "a red circle" not in judged("There is no red circle.")
    assert judged("a red circle, not blue") == {"a red circle": True, "the circle is not blue": True}


def test_a_claim_said_twice_counts_once_and_a_caption_without_claims_has_no_hallucination():
    check = claims.check_scene(SCENE, "A red circle in the top left. A red circle in the top left.")
    assert len(check.claims) == 2 and check.hallucination == 0.0 and check.coverage == pytest.approx(2 / 6)
    empty = claims.check_scene(SCENE, "")
    assert empty.hallucination is None and empty.coverage == 0.0


def test_truth_checker_by_name_and_bad_truth():
    check = faithful.truth_checker("demo-scene")
    assert check(SCENE.to_json(), "A gray background.").hallucination == 0.0
    assert check("not json", "A gray background.") is None
    assert check('{"colour": 1}', "x") is None
    with pytest.raises(ValueError, match="unknown truth kind"):
        faithful.truth_checker("coco")


def test_repetition_metric_on_known_strings():
    assert faithful.repeats("there is a red circle there is a red circle there is a red circle")
    assert not faithful.repeats("there is a red circle there is a red circle")  # twice is not enough
    assert not faithful.repeats("A gray background with two shapes: a red circle in the top left.")
    assert faithful.repeats("In the top left. in THE top LEFT, in the top left!")  # case and punctuation
    assert not faithful.repeats("")
    assert faithful.repeated_share("a b c d a b c d") == pytest.approx(1 / 5)
    assert faithful.repeated_share("a b c") == 0.0


def test_caption_metrics_aggregate():
    caps = ["In the top left there is a red circle. In the top right there is a red circle.",
            "a b c d a b c d a b c d", ""]
    checks = [claims.check_scene(SCENE, c) for c in caps]
    m = faithful.caption_metrics(caps, checks)
    assert m.captions == 3
    assert m.hallucination == pytest.approx(0.5)  # only the first caption makes claims: 2 of 4 false
    assert m.coverage == pytest.approx((2 / 6) / 3)
    assert m.repetition == pytest.approx(1 / 3)
    assert m.length == pytest.approx((18 + 12 + 0) / 3)
    assert faithful.caption_metrics([], None).hallucination is None
