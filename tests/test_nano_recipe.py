"""The nano recipe runs, its loss falls, it is deterministic, and its building blocks are exact."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

from pipeline import world
from pipeline.mcq import CANNOT_ANSWER, READER_PREFILL, reader_messages, shuffle_options
from pipeline.models.builders import tiny_text_config
from pipeline.nano import data
from pipeline.nano.encode import ids, prompt_text, reader_tree, split_reader_prompt
from pipeline.nano.infer import tree_score
from pipeline.nano.train import ReaderRecipe, VLRecipe, make_tokenizer, train_reader, train_vl
from pipeline.nano.tree import tree_forward


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _falls(losses: list[float], k: int = 5) -> bool:
    return sum(losses[-k:]) / k < 0.8 * sum(losses[:k]) / k


def test_vl_short_training_loss_falls(tok, tmp_path):
    recipe = VLRecipe(steps=30, batch=8, qagen_batch=2, snapshots={}, warmup=5, lr=3e-3, phase2_steps=0, phase3_steps=0)
    info = train_vl(tok, tmp_path, recipe, seed=7, log=lambda _: None)
    assert len(info["losses"]) == 30 and _falls(info["losses"])
    assert (tmp_path / "nano-vl" / "model.safetensors").exists()


def test_reader_short_training_loss_falls(tok, tmp_path):
    recipe = ReaderRecipe(steps=30, captions=4, questions=4, layers=2, warmup=5, lr=3e-3, phase2_steps=0, phase3_steps=0)
    info = train_reader(tok, tmp_path, recipe, seed=7, log=lambda _: None)
    assert _falls(info["losses"])
    assert (tmp_path / "nano-reader" / "model.safetensors").exists()


def test_training_is_deterministic(tok, tmp_path):
    recipe = ReaderRecipe(steps=3, captions=2, questions=2, layers=1, warmup=1, phase2_steps=2, phase3_steps=0)
    train_reader(tok, tmp_path / "a", recipe, seed=3, log=lambda _: None)
    train_reader(tok, tmp_path / "b", recipe, seed=3, log=lambda _: None)
    train_reader(tok, tmp_path / "c", recipe, seed=4, log=lambda _: None)
    a, b, c = (load_file(tmp_path / d / "nano-reader" / "model.safetensors") for d in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tokenizer_is_reproducible_and_compact(tok):
    again = make_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    assert len(ids(tok, " red square")) == 2
    assert len(ids(tok, " " + CANNOT_ANSWER)) < 15


def test_reader_prompt_split_matches_whole_prompt(tok):
    rng = data.stream(0, "test-split")
    for _ in range(50):
        cap, items = data.reader_group(rng, 2)
        for shown, _ in items:
            pre, mid, q = split_reader_prompt(tok, cap, shown)
            whole = ids(tok, prompt_text(tok, reader_messages(cap, shown), READER_PREFILL))
            assert ids(tok, pre) + ids(tok, mid) + ids(tok, q) == whole


def test_tree_scoring_equals_row_by_row(tok):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_text_config(tok, layers=2)).eval()
    rng = random.Random(1)
    prompts, choices = [], []
    for i in range(5):
        scene = world.sample_scene(rng)
        shown = shuffle_options(rng.choice(world.scene_mcqs(scene, rng)), rng, extra_option=CANNOT_ANSWER)
        cap = world.caption(scene, i % 3) if i % 2 else ""
        prompts.append(ids(tok, prompt_text(tok, reader_messages(cap, shown), READER_PREFILL)))
        choices.append([ids(tok, " " + o) for o in shown.options])
    tree = tree_score(model, tok.pad_token_id, prompts, choices, chunk=3)
    with torch.no_grad():
        for p, cs, row in zip(prompts, choices, tree, strict=True):
            for c, got in zip(cs, row, strict=True):
                logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0], -1)
                want = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c))
                assert abs(want - got) < 1e-3


def test_reader_tree_targets_are_option_text(tok):
    rng = data.stream(0, "test-tree")
    cap, items = data.reader_group(rng, 3)
    targets = [[data.option_target(a) for _, a in items]]
    prefix, mids, leaves, plens = reader_tree(tok, [(cap, [s for s, _ in items])], targets)
    for leaf, n, (shown, answer) in zip(leaves[0], plens[0], items, strict=True):
        assert tok.decode(leaf[n:]) == f" {answer}.<|im_end|>"
        assert answer in shown.options
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_text_config(tok, layers=1))
    _, logits, leaf_ids, mask = tree_forward(model, prefix, mids, leaves, tok.pad_token_id)
    assert logits.shape[:2] == leaf_ids.shape == mask.shape


def test_reader_targets_follow_the_caption():
    rng = random.Random(5)
    scene = world.sample_scene(rng)
    for q in world.scene_mcqs(scene, rng):
        shown = shuffle_options(q, rng, extra_option=CANNOT_ANSWER)
        assert data.reader_answer(world.caption(scene, 0), shown) == q.answer_text
        assert data.reader_answer(world.UNINFORMATIVE_CAPTION, shown) == CANNOT_ANSWER
        assert data.reader_answer("", shown) == CANNOT_ANSWER


def test_filter_examples(tok):
    rng = data.stream(0, "test-filter")
    seen = set()
    for _ in range(200):
        ex = data.filter_example(rng)
        seen.add((ex.task, ex.target.startswith(" None of the above")))
        assert ex.prefill == READER_PREFILL and ex.target.endswith(".")
        assert (ex.image is not None) == (ex.task == "filter")
    assert {("filter", False), ("filter", True), ("filter_noimg", False)} <= seen


def test_train_scenes_exclude_eval_scenes():
    held_out = {s.to_json() for s in data.eval_scenes()}
    rng = data.stream(0, "test-scenes")
    assert not any(data.train_scene(rng).to_json() in held_out for _ in range(3000))


def test_phase2_from_saved_weights_equals_in_process(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.nano.train import reader_phase

    full = ReaderRecipe(steps=2, captions=2, questions=2, layers=1, warmup=1, phase2_steps=2, phase3_steps=0)
    train_reader(tok, tmp_path / "a", full, seed=3, log=lambda _: None)
    first = ReaderRecipe(steps=2, captions=2, questions=2, layers=1, warmup=1, phase2_steps=0, phase3_steps=0)
    train_reader(tok, tmp_path / "b", first, seed=3, log=lambda _: None)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "nano-reader")
    reader_phase(model, tok, tmp_path / "b", full, 2, seed=3, log=lambda _: None)
    want = load_file(tmp_path / "a" / "nano-reader" / "model.safetensors")
    got = dict(model.state_dict())
    assert all(torch.equal(want[k], got[k]) for k in want)
