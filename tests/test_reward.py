"""CapRL reward mechanics with scripted readers (test doubles standing for the reader model)."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence

import pytest

from pipeline.config import RewardConfig, SamplingConfig
from pipeline.engines.base import ChatRequest, Generation, Sampling
from pipeline.mcq import CANNOT_ANSWER, LETTERS, MCQ, READER_PREFILL
from pipeline.nano import world
from pipeline.reward import CapRLReward, RewardCache, compute_rewards

# A reader policy maps (caption, question, shown options) -> generated text after the prefill.
Policy = Callable[[str, str, list[str]], str]


def _parse_prompt(req: ChatRequest) -> tuple[str, str, list[str]]:
    user = req.messages[-1]["content"]
    caption = re.search(r"<caption>\n(.*)\n</caption>", user, re.S).group(1)
    question = re.search(r"Question: (.*)", user).group(1)
    options = re.findall(r"^[A-F]\) (.*)$", user, re.M)
    return caption, question, options


class ScriptedReader:
    """A stand-in for the reader model: answers by a policy, can fail on command."""

    def __init__(self, policy: Policy, fail_calls: Sequence[int] = (), error_when: Callable[[str], bool] | None = None):
        self.policy = policy
        self.fail_calls = set(fail_calls)
        self.error_when = error_when
        self.calls: list[int] = []
        self.model_id = "scripted-reader"

    def generate(self, requests: Sequence[ChatRequest], params: Sampling) -> list[list[Generation]]:
        self.calls.append(len(requests))
        if len(self.calls) in self.fail_calls:
            raise ConnectionError("reader server unreachable")
        out = []
        for req in requests:
            assert req.prefill == READER_PREFILL
            caption, question, options = _parse_prompt(req)
            if self.error_when and self.error_when(caption):
                out.append([Generation(text="", finish_reason="error", error="HTTP 500")])
            else:
                out.append([Generation(text=self.policy(caption, question, options), num_tokens=2)])
        return out

    def score_choices(self, requests: Sequence[ChatRequest], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        self.calls.append(len(requests))
        if len(self.calls) in self.fail_calls:
            raise ConnectionError("reader server unreachable")
        out = []
        for req, cands in zip(requests, choices, strict=True):
            caption, question, options = _parse_prompt(req)
            letter = parse_letter(self.policy(caption, question, options))
            target = (" " + letter) if cands[0].strip() in LETTERS else (" " + options[LETTERS.index(letter)])
            out.append([math.log(0.9) if c == target else math.log(0.1 / (len(cands) - 1)) for c in cands])
        return out

    def close(self) -> None:
        pass


def parse_letter(text: str) -> str:
    return text.strip()[0]


def oracle(answers: dict[str, str]) -> Policy:
    """Knows each question's right answer text; says 'cannot answer' when the caption is empty."""
    def policy(caption: str, question: str, options: list[str]) -> str:
        if not caption.strip():
            return f" {LETTERS[options.index(CANNOT_ANSWER)]}."
        return f" {LETTERS[options.index(answers[question])]}."
    return policy


def rule_policy(caption: str, question: str, options: list[str]) -> str:
    """pipeline.world's rule reader as the reader model: parses the caption, else 'cannot answer'."""
    idx = world.rule_reader_answer(caption, question, options)
    return f" {LETTERS[idx if idx is not None else options.index(CANNOT_ANSWER)]}."


def make_mcqs(n: int, tag: str = "") -> list[MCQ]:
    return [MCQ(question=f"Question {tag}{i}?", options=(f"w{i}", f"x{i}", f"y{i}", f"z{i}"), answer=LETTERS[i % 4])
            for i in range(n)]


def answers_of(mcqs: Sequence[MCQ]) -> dict[str, str]:
    return {q.question: q.answer_text for q in mcqs}


def test_right_reader_scores_one_in_one_batched_call() -> None:
    qs = make_mcqs(5)
    reader = ScriptedReader(oracle(answers_of(qs)))
    results = compute_rewards(["a caption"] * 10, [qs] * 10, reader, RewardConfig())
    assert [r.reward for r in results] == [1.0] * 10
    assert reader.calls == [80]  # 10 captions x 8 draws, one engine call
    for r in results:
        assert len(r.draws) == 8
        for d in r.draws:
            assert d.permutation[-1] == -1 and len(d.permutation) == 5  # CANNOT_ANSWER appended last
            assert d.reader_answer == d.shown_answer and d.correct == 1.0


def test_reward_is_mean_correctness_over_draws() -> None:
    qs = make_mcqs(4)
    good = answers_of(qs[:2])  # the reader only knows questions 0 and 1

    def policy(caption: str, question: str, options: list[str]) -> str:
        if question in good:
            return f" {LETTERS[options.index(good[question])]}"
        return f" {LETTERS[options.index(CANNOT_ANSWER)]}"

    reward = CapRLReward(ScriptedReader(policy), RewardConfig(n_draws=8))
    [result] = reward(["c"], [qs])
    known = sum(d.question_id in {qs[0].id, qs[1].id} for d in result.draws)
    assert result.reward == known / 8


def test_draws_are_with_replacement_and_reshuffled_and_deterministic() -> None:
    [q] = make_mcqs(1)
    reward = CapRLReward(ScriptedReader(oracle(answers_of([q]))), RewardConfig(n_draws=8, seed=3))
    [r1] = reward(["cap"], [[q]])
    assert {d.question_id for d in r1.draws} == {q.id}  # 8 draws from 1 question: with replacement
    assert len({d.permutation for d in r1.draws}) > 1  # a fresh shuffle per draw
    [r2] = reward(["cap"], [[q]])
    assert [d.permutation for d in r1.draws] == [d.permutation for d in r2.draws]
    [r3] = reward(["cap"], [[q]], seed=4)
    assert [d.permutation for d in r3.draws] != [d.permutation for d in r1.draws]
    qs = make_mcqs(5)
    plan = reward.plan("cap", qs, "k", 0)
    assert plan == reward.plan("cap", qs, "k", 0)
    assert plan != reward.plan("cap", qs, "other-key", 0)


def test_unparseable_answer_is_wrong_and_counted() -> None:
    qs = make_mcqs(3)
    results = compute_rewards(["c"], [qs], ScriptedReader(lambda *_: " hmm, not sure"), RewardConfig())
    assert results[0].reward == 0.0
    assert results[0].unparsed == 8
    assert all(d.reader_answer is None and d.correct == 0.0 for d in results[0].draws)


def test_a_reasoning_preamble_is_a_failed_draw_not_a_wrong_answer() -> None:
    """A hybrid-thinking reader left thinking on opens with <think> (and, cut at 10 tokens, never answers): its
    draws are failures (reward missing, with the reason), never 0; a closed think block before the answer is
    read past."""
    qs = make_mcqs(3)
    thinking = ScriptedReader(lambda *_: "<think>\nOkay, A caption says")
    [r] = compute_rewards(["c"], [qs], thinking, RewardConfig(retries=0))
    assert r.reward is None and r.missing and "reasoning preamble" in r.reason and "enable_thinking" in r.reason
    right = oracle(answers_of(qs))
    closed = ScriptedReader(lambda *a: "<think>\n\n</think>\n\n" + right(*a))
    [r] = compute_rewards(["c"], [qs], closed, RewardConfig())
    assert r.reward == 1.0


def test_failing_reader_gives_missing_reward_not_zero() -> None:
    qs = make_mcqs(3)
    reader = ScriptedReader(oracle(answers_of(qs)), fail_calls=(1, 2))
    reward = CapRLReward(reader, RewardConfig(retries=1))
    results = reward(["a", "b"], [qs, qs])
    assert reader.calls == [16, 16]  # first call + one retry
    for r in results:
        assert r.reward is None and r.missing
        assert "ConnectionError" in r.reason
        assert all(d.correct is None for d in r.draws)
    assert reward.last_stats["missing"] == 2


def test_failing_reader_is_retried_once_and_then_scores() -> None:
    qs = make_mcqs(3)
    reader = ScriptedReader(oracle(answers_of(qs)), fail_calls=(1,))
    results = compute_rewards(["a", "b"], [qs, qs], reader, RewardConfig(retries=1))
    assert reader.calls == [16, 16]
    assert [r.reward for r in results] == [1.0, 1.0]


def test_per_request_errors_mask_only_their_caption() -> None:
    qs = make_mcqs(3)
    reader = ScriptedReader(oracle(answers_of(qs)), error_when=lambda caption: caption == "bad")
    results = compute_rewards(["good", "bad", "good too"], [qs] * 3, reader, RewardConfig(retries=1))
    assert [r.reward for r in results] == [1.0, None, 1.0]
    assert "HTTP 500" in results[1].reason
    assert reader.calls == [24, 8]  # the retry re-asks only the failed draws


def test_caption_without_mcqs_is_missing_with_reason() -> None:
    qs = make_mcqs(2)
    reader = ScriptedReader(oracle(answers_of(qs)))
    results = compute_rewards(["x", "y"], [[], qs], reader, RewardConfig())
    assert results[0].reward is None and results[0].reason == "no MCQs for this image"
    assert results[1].reward == 1.0
    assert reader.calls == [8]


def test_cache_in_memory_and_on_disk_replays_without_the_reader(tmp_path) -> None:
    qs = make_mcqs(5)
    calls: list[str] = []

    def noisy(caption: str, question: str, options: list[str]) -> str:
        calls.append(question)
        return f" {random.choice('ABCDE')}"  # a sampling reader: replay must come from the cache

    cfg = RewardConfig(cache=str(tmp_path / "cache"))
    reward = CapRLReward.from_config(cfg, reader=ScriptedReader(noisy))
    first = reward(["c1", "c2"], [qs, qs])
    assert len(calls) == 16 and reward.last_stats["cached"] == 0
    again = reward(["c1", "c2"], [qs, qs])
    assert len(calls) == 16 and reward.last_stats["cached"] == 16
    assert [r.reward for r in again] == [r.reward for r in first]
    assert all(d.cached for r in again for d in r.draws)
    assert reward.cache.flush() is not None
    replay = CapRLReward.from_config(cfg, reader=ScriptedReader(noisy))
    results = replay(["c1", "c2"], [qs, qs])
    assert len(calls) == 16
    assert [r.reward for r in results] == [r.reward for r in first]
    assert [d.reader_answer for d in results[0].draws] == [d.reader_answer for d in first[0].draws]
    # another reader id (sampling temperature) does not reuse the answers
    other = CapRLReward.from_config(cfg.model_copy(update={"sampling": SamplingConfig(temperature=1.0)}),
                                    reader=ScriptedReader(noisy))
    other(["c1"], [qs])
    assert len(calls) == 24


def test_failures_are_not_cached() -> None:
    qs = make_mcqs(2)
    cache = RewardCache()
    reader = ScriptedReader(oracle(answers_of(qs)), fail_calls=(1, 2))
    assert CapRLReward(reader, RewardConfig(retries=1), cache)(["c"], [qs])[0].missing
    assert len(cache) == 0
    assert CapRLReward(reader, RewardConfig(retries=1), cache)(["c"], [qs])[0].reward == 1.0


@pytest.mark.parametrize("mode,expected,want", [
    ("letter_prob", False, 0.9), ("option_text", False, 1.0), ("option_text", True, 0.9),
])
def test_choice_scoring_modes(mode: str, expected: bool, want: float) -> None:
    qs = make_mcqs(4)
    reader = ScriptedReader(oracle(answers_of(qs)))
    [r] = compute_rewards(["c"], [qs], reader, RewardConfig(mode=mode, expected=expected))
    assert r.reward == pytest.approx(want)
    assert all(d.reader_answer == d.shown_answer and d.prob == pytest.approx(0.9) for d in r.draws)


def test_invalid_scores_are_failures() -> None:
    class NanReader(ScriptedReader):
        def score_choices(self, requests, choices):
            self.calls.append(len(requests))
            return [[float("nan")] * len(c) for c in choices]

    [r] = compute_rewards(["c"], [make_mcqs(2)], NanReader(lambda *_: " A"), RewardConfig(mode="letter_prob"))
    assert r.missing and "invalid" in r.reason


def test_rule_reader_ground_truth_captions_score_high_and_empty_low() -> None:
    rng = random.Random(7)
    scenes = [world.sample_scene(rng) for _ in range(40)]
    mcqs = [world.pick_mcqs(s, rng) for s in scenes]
    reader = ScriptedReader(rule_policy)
    reward = CapRLReward(reader, RewardConfig(n_draws=8, seed=1))
    gt = reward([world.caption(s) for s in scenes], mcqs)
    empty = reward([""] * len(scenes), mcqs)
    generic = reward([world.UNINFORMATIVE_CAPTION] * len(scenes), mcqs)
    mean = lambda rs: sum(r.reward for r in rs) / len(rs)  # noqa: E731
    assert mean(gt) > 0.95
    assert mean(empty) < 0.05 and mean(generic) < 0.05
    assert reader.calls == [320, 320, 320]


@pytest.mark.parametrize("mode", ["option_text", "sample"])
def test_absent_questions_cost_a_caption_that_invents_the_thing(mode: str) -> None:
    """'What shape is in the bottom left?' about an empty quadrant, "There is no shape ..." keyed right: the
    rule reader abstains on the honest caption (credited under absent_abstain) and answers the invented shape."""
    from pipeline.nano.rule_reader import RuleReaderEngine

    scene = world.Scene("gray", (world.SceneObject("circle", "red", "top left"),))
    absent = MCQ("What shape is in the bottom left?", ("circle", "square", "triangle", "star",
                                                      "There is no shape in the bottom left."), "E", qtype="absent")
    honest = world.caption(scene)
    inventing = honest + " In the bottom left there is a blue square."
    for credit, want in ((True, [1.0, 0.0]), (False, [0.0, 0.0])):
        reward = CapRLReward(RuleReaderEngine(), RewardConfig(mode=mode, n_draws=4, absent_abstain=credit))
        assert [r.reward for r in reward([honest, inventing], [[absent], [absent]])] == want
    # the credit is only for absent-thing questions
    plain = MCQ("What shape is in the top left?", ("circle", "square", "triangle", "star"), "A")
    reward = CapRLReward(RuleReaderEngine(), RewardConfig(mode=mode, n_draws=4, absent_abstain=True))
    assert [r.reward for r in reward(["", honest], [[plain], [plain]])] == [0.0, 1.0]


@pytest.mark.parametrize("mode", ["option_text", "sample"])
def test_negative_marking_costs_a_wrong_claim_more_than_silence(mode: str) -> None:
    """wrong_penalty: right 1, "cannot answer" 0, wrong -penalty; off, a wrong answer and silence both score 0.
    On absent-thing questions under absent_abstain, silence is right and an invented shape is wrong."""
    from pipeline.nano.rule_reader import RuleReaderEngine

    scene = world.Scene("gray", (world.SceneObject("circle", "red", "top left"),))
    plain = MCQ("What shape is in the top left?", ("circle", "square", "triangle", "star"), "A")
    captions = [world.caption(scene), "A gray background.", "In the top left there is a red square."]
    for penalty, want in ((0.0, [1.0, 0.0, 0.0]), (1.0, [1.0, 0.0, -1.0]), (0.5, [1.0, 0.0, -0.5])):
        reward = CapRLReward(RuleReaderEngine(), RewardConfig(mode=mode, n_draws=4, wrong_penalty=penalty))
        results = reward(captions, [[plain]] * 3)
        assert [r.reward for r in results] == want
        assert [d.abstained for d in results[1].draws] == [1.0] * 4
    absent = MCQ("What shape is in the bottom left?", ("circle", "square", "triangle", "star",
                                                      "There is no shape in the bottom left."), "E", qtype="absent")
    inventing = captions[0] + " In the bottom left there is a blue square."
    reward = CapRLReward(RuleReaderEngine(), RewardConfig(mode=mode, n_draws=4, wrong_penalty=1.0, absent_abstain=True))
    assert [r.reward for r in reward([captions[0], inventing], [[absent]] * 2)] == [1.0, -1.0]


def test_negative_marking_with_probabilities_and_old_cache_entries() -> None:
    """expected: right probability minus penalty x the probability of a wrong option; a cache entry from before
    abstentions were kept is asked again under a penalty (and replayed as it is without one)."""
    qs = [MCQ("Q?", ("w", "x", "y", "z"), "A")]

    def policy(caption: str, question: str, options: list[str]) -> str:
        if caption == "right":
            return f" {LETTERS[options.index('w')]}"
        if caption == "wrong":
            return f" {LETTERS[options.index('x')]}"
        return f" {LETTERS[options.index(CANNOT_ANSWER)]}"

    reader = ScriptedReader(policy)
    cfg = RewardConfig(mode="option_text", expected=True, n_draws=2, wrong_penalty=1.0)
    results = CapRLReward(reader, cfg)(["right", "silent", "wrong"], [qs] * 3)
    # 0.9 on the reader's choice, 0.025 on each of the other four options
    assert [r.reward for r in results] == pytest.approx([0.9 - 0.075, 0.025 - 0.075, 0.025 - 0.95])
    cache = RewardCache()
    CapRLReward(reader, RewardConfig(n_draws=2), cache)(["wrong"], [qs])
    for key in list(cache._data):
        cache._data[key].pop("abstained")
    reader.calls.clear()
    assert CapRLReward(reader, RewardConfig(n_draws=2), cache)(["wrong"], [qs])[0].reward == 0.0
    assert reader.calls == []
    assert CapRLReward(reader, RewardConfig(n_draws=2, wrong_penalty=1.0), cache)(["wrong"], [qs])[0].reward == -1.0
    assert reader.calls == [2]
