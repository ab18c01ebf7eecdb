"""The nano recipe runs, its loss falls, it is deterministic, and its building blocks are exact."""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

from pipeline.mcq import (
    CANNOT_ANSWER,
    NONE_OF_THE_ABOVE,
    READER_PREFILL,
    parse_generator_output,
    reader_messages,
    shuffle_options,
)
from pipeline.nano import claims, data, world
from pipeline.nano.builders import tiny_text_config
from pipeline.nano.encode import ids, prompt_text, reader_tree, split_reader_prompt
from pipeline.nano.infer import tree_score
from pipeline.nano.train import (
    BriefRecipe,
    Phase,
    ReaderRecipe,
    VLRecipe,
    make_tokenizer,
    scaled,
    train_reader,
    train_vl,
)
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
    recipe = VLRecipe(phases=[Phase(steps=25, lr=3e-3, warmup=5, captions=8),
                              Phase(steps=10, lr=1e-3, warmup=2, captions=4, filters=4, qagen=2)],
                      snapshots={"nano-vl-step5": 5, "nano-vl-step30": 30})
    info = train_vl(tok, tmp_path, recipe, seed=7, log=lambda _: None)
    assert len(info["losses"]) == 35 and _falls(info["losses"][:25])
    assert info["snapshots"]["nano-vl-step30"]["steps"] == 30  # counted across phases
    for name in ("nano-vl", "nano-vl-step5", "nano-vl-step30"):
        assert (tmp_path / name / "model.safetensors").exists()


def test_reader_short_training_loss_falls(tok, tmp_path):
    recipe = ReaderRecipe(phases=[Phase(steps=30, lr=3e-3, warmup=5, captions=4, drill=4)], questions=4, layers=2)
    info = train_reader(tok, tmp_path, recipe, seed=7, log=lambda _: None)
    assert _falls(info["losses"])
    assert (tmp_path / "nano-reader" / "model.safetensors").exists()


def test_training_is_deterministic(tok, tmp_path):
    recipe = ReaderRecipe(phases=[Phase(steps=3, lr=1e-3, warmup=1, drill=2),
                                  Phase(steps=2, lr=1e-3, warmup=1, captions=2, drill=1)], questions=2, layers=1)
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


def _kind_of(value):
    return next(k for k, vs in data._KINDS.items() if value in vs)


def test_leaky_filter_examples_give_their_answer_away():
    """Leaky gate queries (no image): `stated` names the answer in the question and in exactly one option;
    `options_only` has exactly one option of the asked kind, and no distractor is written in the question.
    The target is that answer."""
    rng = data.stream(0, "test-leaky")
    for kind in data.LEAK_KINDS:
        for _ in range(300):
            ex = data.leaky_filter_example(rng, kind)
            assert ex.image is None and ex.task == "filter_leak" and ex.prefill == READER_PREFILL
            text = ex.messages[-1]["content"]
            question = re.search(r"Question: (.*)", text).group(1).lower()
            options = re.findall(r"^[A-D]\) (.*)$", text, re.M)
            answer = ex.target.strip().rstrip(".")
            assert len(options) == 4 and options.count(answer) == 1
            in_question = [o for o in options if re.search(rf"\b{o}\b", question)]
            if kind == "stated":
                assert in_question == [answer]
                assert len({_kind_of(o) for o in options}) == 1
            else:
                assert in_question == []
                assert [_kind_of(o) for o in options].count(_kind_of(answer)) == 1


def test_leak_queries_share_and_default_stream():
    """filter_example(leak=p) makes about p of the queries without the image leaky; leak=0 is the default stream, example for
    example; VLRecipe (nano-VL) leaves it off."""
    def draw(**kw):
        rng = data.stream(0, "test-leak-share")
        return [data.filter_example(rng, **kw) for _ in range(400)]

    plain, off = draw(), draw(leak=0.0)
    assert [(e.target, e.messages) for e in plain] == [(e.target, e.messages) for e in off]
    leaky = draw(leak=0.5)  # half of the 30% without the image
    share = sum(e.task == "filter_leak" for e in leaky) / 400
    assert 0.1 < share < 0.2 and 0.62 < sum(e.image is not None for e in leaky) / 400 < 0.78
    assert not any(e.task == "filter_leak" for e in plain)
    assert VLRecipe().leak_queries == 0


def test_filter_type_weights_oversample_a_question_type():
    def questions(weights):
        rng = data.stream(0, "test-filter-weights")
        exs = [data.filter_example(rng, with_image=True, type_weights=weights) for _ in range(300)]
        return [(ex.messages[-1]["content"][-1]["text"], ex.target) for ex in exs]

    def position_share(weights):
        return sum(text.startswith("Question: Where is the") for text, _ in questions(weights)) / 300

    plain, heavy = position_share(None), position_share({"position_of": 10.0})
    assert 0.1 < plain < 0.35 and heavy > 0.6
    assert questions({}) == questions(None)  # no weights: the default stream, example for example


def test_train_scenes_exclude_eval_scenes():
    held_out = {s.to_json() for s in data.eval_scenes()}
    rng = data.stream(0, "test-scenes")
    assert not any(data.train_scene(rng).to_json() in held_out for _ in range(3000))


def test_phase2_from_saved_weights_equals_in_process(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.nano.train import reader_phase

    full = ReaderRecipe(phases=[Phase(steps=2, lr=1e-3, warmup=1, drill=2),
                                Phase(steps=2, lr=5e-4, warmup=1, captions=2, drill=1)], questions=2, layers=1)
    train_reader(tok, tmp_path / "a", full, seed=3, log=lambda _: None)
    first = ReaderRecipe(phases=full.phases[:1], questions=2, layers=1)
    train_reader(tok, tmp_path / "b", first, seed=3, log=lambda _: None)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "nano-reader")
    reader_phase(model, tok, tmp_path / "b", full, 1, seed=3, log=lambda _: None)
    want = load_file(tmp_path / "a" / "nano-reader" / "model.safetensors")
    got = dict(model.state_dict())
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_scaled_recipe_keeps_phases_and_snapshots():
    quick = scaled(VLRecipe(), 0.1)
    assert [p.steps for p in quick.phases] == [round(p.steps * 0.1) for p in VLRecipe().phases]
    assert quick.snapshots == {k: round(v * 0.1) for k, v in VLRecipe().snapshots.items()}
    assert all(p.lr == q.lr for p, q in zip(quick.phases, VLRecipe().phases, strict=True))


def test_generator_layout_makes_the_letter_a_function_of_what_the_model_sees():
    rng = data.stream(0, "test-layout")
    letters = {"color": [], "other": []}
    for _ in range(200):
        scene = world.sample_scene(rng)
        chosen = data.generator_mcqs(scene, rng)
        assert [q.qtype for q in chosen[:2]] == ["background", "count"] and len(chosen) == 5
        for q in (data.generator_layout(c, rng) for c in chosen):
            pool = data._POOLS[q.qtype]
            assert q.answer_text == world.answer_from_scene(world.scene_facts(scene), q.question)
            if len(pool) == 4:  # fixed option lines
                assert q.options == pool
                letters["other"].append(q.answer)
            else:  # four cyclically consecutive colours from a drawn offset
                first = pool.index(q.options[0])
                assert q.options == tuple(pool[(first + i) % len(pool)] for i in range(4))
                assert (pool.index(q.answer_text) - first) % len(pool) == "ABCD".index(q.answer)
                letters["color"].append(q.answer)
        mcqs, rejected = parse_generator_output(data.generator_text(scene, rng))
        assert len(mcqs) == 5 and not rejected
        assert all(q.answer_text == world.answer_from_scene(world.scene_facts(scene), q.question) for q in mcqs)
    colour = letters["color"]
    assert all(colour.count(x) > 0.15 * len(colour) for x in "ABCD")  # the offset is drawn, no position bias


def test_answer_copy_targets_point_at_the_named_option(tok):
    """Each supervised pair: the query predicts an answer-text token, the key is that same token in the option
    line the answer's letter names; every token of every answer text is covered."""
    from pipeline.nano.encode import answer_copy_spans, answer_copy_targets, encode_example

    rng = data.stream(3, "test-copy")
    for _ in range(20):
        ex = data.qagen_example(rng)
        seq, labels = encode_example(tok, ex)
        pairs = answer_copy_targets(tok, ex)
        spans = answer_copy_spans(ex.target)
        assert len(spans) == 5
        assert len(pairs) == sum(len(ids(tok, " " + ex.target[a: a + n])) for a, _, n in spans)
        for q, key in pairs:
            assert labels[q + 1] == seq[q + 1] == seq[key]  # a supervised target token, copied from the key
            assert key < q
        text = tok.decode(seq)
        for m in re.finditer(r"Answer: ([A-D])\) (.+)", ex.target):
            assert re.search(rf"- {m[1]}\) {re.escape(m[2])}\n", text)
    assert answer_copy_spans("**1. Q?**\n- A) red\n- B) blue\nAnswer: C) red\n") == []


def test_training_inputs_equal_the_processors(tok):
    """The VL training batch carries exactly what the real processor gives the model at inference,
    mm_token_type_ids included (without it Qwen2.5-VL trains on 1-D positions and fails under any
    real processor, the hf engine and vLLM all)."""
    from pipeline.mcq import CAPTION_PROMPT
    from pipeline.nano.builders import build_processor
    from pipeline.nano.encode import collate_vl

    processor = build_processor(tok)
    scene = data.eval_scenes(1)[0]
    ex = data.Example(data.image_messages(CAPTION_PROMPT), world.caption(scene), image=world.render(scene))
    got = collate_vl(tok, processor.image_processor, [ex]).model_inputs()
    want = processor(text=[prompt_text(tok, ex.messages)], images=[ex.image], return_tensors="pt")
    n = want["input_ids"].shape[1]
    assert set(want) <= set(got)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        assert torch.equal(got[key][:, :n], want[key]), key
    assert torch.equal(got["pixel_values"], want["pixel_values"])
    assert torch.equal(got["image_grid_thw"], want["image_grid_thw"])


def test_drill_sequence_answers_follow_the_caption(tok):
    from pipeline.nano.encode import drill_ids

    rng = data.stream(0, "test-drill")
    for _ in range(50):
        cap, qas = data.drill_sequence(rng, questions=2)
        for qa in qas:
            stated = world.answer_from_scene(world.parse_caption(cap), qa.question)
            assert qa.value == (stated or CANNOT_ANSWER)
            assert (qa.evidence is None) == (stated is None)
        row = drill_ids(tok, cap, qas)
        answers = tok.decode([t for t, lab in zip(row.ids, row.labels, strict=True) if lab != -100])
        assert answers == "".join(f" {qa.value}.\n" for qa in qas)


def test_drill_attention_targets_the_clause_that_states_the_answer(tok):
    """Each supervised query is a position that predicts a value token; its target is the caption token
    ending the clause of the asked object (which has seen all the object's words), or the stated
    background / count word."""
    from pipeline.nano.encode import drill_ids

    rng = data.stream(1, "test-drill-attention")
    checked = set()
    for _ in range(80):
        cap, qas = data.drill_sequence(rng, questions=3, full=1.0)
        row = drill_ids(tok, cap, qas)
        assert row.attend and all(t < q for q, t in row.attend)
        for q, _ in row.attend:
            assert row.labels[q + 1] != -100  # q predicts a value token
        for qa in qas:
            clause = cap[: qa.evidence].lower()
            last = re.split(r"[.,:]| and ", clause)[-1]
            if "background" in qa.question:
                assert clause.endswith(("white", "black", "gray"))
                checked.add("background")
            elif qa.question.startswith("How many"):
                assert clause.endswith(("one", "two", "three"))
                checked.add("count")
            elif qa.question.startswith("Where"):
                obj = qa.question.removeprefix("Where is the ").rstrip("?")
                assert obj in last and qa.value in last, (cap, qa)
                checked.add("position")
            else:
                assert qa.value in last, (cap, qa)
                checked.add("attribute")
    target_words = {tok.decode([row.ids[t]]).strip() for _, t in row.attend}
    assert target_words and all(w.isalpha() for w in target_words)
    assert checked == {"background", "count", "position", "attribute"}


def test_evidence_end_is_none_when_the_caption_omits_the_object():
    scene = world.Scene(background="black", objects=(world.SceneObject("star", "red", "top left"),
                                                     world.SceneObject("circle", "blue", "bottom right")))
    partial = world.caption(scene, 0, objects=(scene.objects[0],))
    by_key = {q.meta["key"]: q for q in world.scene_mcqs(scene, random.Random(0))}
    assert data.evidence_end(partial, by_key["bottom right"]) is None
    assert data.evidence_end(partial, by_key["red star"]) == len(partial) - 1  # '... a red star.'
    assert data.evidence_end("", by_key["bg"]) is None


def test_attention_supervision_trains_the_chosen_head(tok):
    """The drill's attention loss is differentiable through the chosen head and falls when trained."""
    from pipeline.nano.train import drill_loss

    torch.manual_seed(0)
    cfg = tiny_text_config(tok, layers=2, heads=2, kv_heads=1)
    model = Qwen2ForCausalLM(cfg)
    model.set_attn_implementation("eager")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    plain = drill_loss(model, tok, random.Random(0), 8, 2)
    losses = []
    for step in range(30):
        loss = drill_loss(model, tok, random.Random(step % 3), 8, 2, (1.0, -1, 0)) - drill_loss(
            model, tok, random.Random(step % 3), 8, 2).detach()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert plain.item() > 0 and _falls(losses)


def test_reward_prompt_attention_targets(tok):
    """In the reward-prompt tree, each supervised pair maps a leaf position that predicts a value token of
    the target option to the caption token where that value is stated (the clause end for objects)."""
    from pipeline.nano.train import tree_attention_targets

    rng = data.stream(2, "test-tree-attention")
    groups, targets, answers = [], [], []
    for _ in range(6):
        cap, items = data.reader_group(rng, 4)
        groups.append((cap, [s for s, _ in items]))
        targets.append([data.option_target(a) for _, a in items])
        answers.append([a for _, a in items])
    prefix, mids, leaves, plens = reader_tree(tok, groups, targets, few_shot=True)
    attend = tree_attention_targets(tok, groups, answers, prefix, mids, plens, True)
    width = max(len(m) for m in mids)
    supervised = 0
    for r, pairs in enumerate(attend):
        g, j = divmod(r, 4)
        keys = list(prefix) + [tok.pad_token_id] * (width - len(mids[g])) + list(mids[g])
        leaf = leaves[g][j]
        assert (not pairs) == (answers[g][j] == CANNOT_ANSWER or not groups[g][0])
        for t, (q, key) in enumerate(pairs):
            assert q == plens[g][j] - 1 + t
            value_token = tok.decode([leaf[q + 1]]).strip()
            assert value_token and value_token in answers[g][j]
            base = len(prefix) + width - len(mids[g])
            assert base <= key < len(keys)
            cap, shown = groups[g][0], groups[g][1][j]
            assert tok.decode(mids[g][: key - base + 1]) == cap[: data.evidence_end(cap, shown.mcq)]
            supervised += 1
    assert supervised >= 6


def test_image_region_targets_point_at_the_object_asked_about(tok):
    """Filter questions about one object (its shape, its colour, or where it is): each position that predicts
    a value token attends to the four image tokens of that object's quadrant; background and count
    questions are not supervised."""
    from pipeline.nano.encode import IMAGE_PAD, encode_example, image_region_targets, quadrant_tokens

    assert quadrant_tokens("top left") == [0, 1, 4, 5] and quadrant_tokens("bottom right") == [10, 11, 14, 15]
    rng = data.stream(4, "test-region")
    pad = tok.convert_tokens_to_ids(IMAGE_PAD)
    seen, where = set(), 0
    for _ in range(60):
        ex = data.filter_example(rng, with_image=True)
        seq, labels = encode_example(tok, ex)
        pairs = image_region_targets(tok, ex)
        question = ex.messages[-1]["content"][-1]["text"]
        if "background" in question or "How many" in question:
            assert ex.about == (None,) and not pairs  # the whole image
            continue
        (about,) = ex.about
        assert about in world.POSITIONS and pairs
        seen.add(about)
        pads = [i for i, t in enumerate(seq) if t == pad]
        value = ex.target.strip().rstrip(".")
        if "Where is" in question:
            where += 1
            assert value in (about, NONE_OF_THE_ABOVE)  # the named object is where the answer says
        assert [tok.decode([seq[q + 1]]) for q, _ in pairs] == [tok.decode([t]) for t in ids(tok, " " + value)]
        for q, region in pairs:
            assert labels[q + 1] != -100 and [pads.index(k) for k in region] == quadrant_tokens(about)
    assert seen == set(world.POSITIONS) and where >= 3
    assert not image_region_targets(tok, data.filter_example(rng, with_image=False))
    # MCQ generation: the positions predicting each answer letter and answer text look at its question's object
    for _ in range(10):
        ex = data.qagen_example(rng)
        seq, labels = encode_example(tok, ex)
        pads = [i for i, t in enumerate(seq) if t == pad]
        pairs = image_region_targets(tok, ex)
        objects = [(n, pos) for n, pos in enumerate(ex.about) if pos is not None]
        assert ex.about[:2] == (None, None) and len(objects) == 3
        lines = [i for i, t in enumerate(seq) if labels[i] != -100 and tok.convert_ids_to_tokens(t) == "Answer"]
        want = []
        for n, pos in objects:  # ':' predicts the letter; from after ')' on, the text tokens up to the newline
            end = next(i for i in range(lines[n], len(seq)) if "\n" in tok.decode([seq[i]]))
            region = [pads[k] for k in quadrant_tokens(pos)]
            want += [(lines[n] + 1, region)] + [(q, region) for q in range(lines[n] + 3, end - 1)]
        assert pairs == want
        assert all(labels[q + 1] == seq[q + 1] for q, _ in pairs)


def test_attention_loss_over_a_region_sums_its_weights():
    from pipeline.nano.train import attention_loss

    att = torch.tensor([[[0.1, 0.2, 0.3, 0.4]] * 4])
    assert torch.isclose(attention_loss(att, [[(0, 3)]]), -torch.log(torch.tensor(0.4 + 1e-6)))
    assert torch.isclose(attention_loss(att, [[(1, [0, 2])]]), -torch.log(torch.tensor(0.4 + 1e-6)))
    both = attention_loss(att, [[(0, 3), (2, [1, 2, 3])]])
    assert torch.isclose(both, -(torch.log(torch.tensor(0.4 + 1e-6)) + torch.log(torch.tensor(0.9 + 1e-6))) / 2)


def test_first_option_targets_look_at_option_a_from_each_answer_letter(tok):
    from pipeline.nano.encode import encode_example, first_option_targets

    rng = data.stream(5, "test-first-option")
    for _ in range(10):
        ex = data.qagen_example(rng)
        seq, labels = encode_example(tok, ex)
        pairs = first_option_targets(tok, ex)
        letters = re.findall(r"^Answer: ([A-D])\)", ex.target, re.M)
        firsts = re.findall(r"^- A\) (\S+)", ex.target, re.M)
        assert len(pairs) == len(letters) == len(firsts) == 5
        for (q, key), letter, first in zip(pairs, letters, firsts, strict=True):
            assert labels[q + 1] == seq[q + 1] and tok.decode([seq[q + 1]]).strip() == letter
            assert tok.decode(seq[key - 2: key]) == " A)" and tok.decode([seq[key]]).strip() == first


def test_vl_recipe_config_keeps_head_dim_and_mrope_consistent(tok):
    for heads, kv, layers in ((2, 1, 2), (4, 2, 3)):
        cfg = VLRecipe(text_heads=heads, text_kv_heads=kv, text_layers=layers).config(tok)
        text = cfg.text_config
        head_dim = text.hidden_size // text.num_attention_heads
        assert text.num_attention_heads == heads and 2 * sum(text.rope_parameters["mrope_section"]) == head_dim
        assert text.num_hidden_layers == layers and text.num_key_value_heads == kv


def test_image_token_labels_and_the_probe_learn_them():
    from pipeline.nano.encode import image_token_labels, quadrant_tokens
    from pipeline.nano.train import ImageProbe

    scene = world.Scene("white", (world.SceneObject("star", "red", "top right"),))
    lab = image_token_labels(scene)
    for q, pos in enumerate(world.POSITIONS):
        assert [lab["position"][k] for k in quadrant_tokens(pos)] == [q] * 4
        want = (world.SHAPES.index("star"), world.COLORS.index("red")) if pos == "top right" else \
            (len(world.SHAPES), len(world.COLORS))
        assert {(lab["shape"][k], lab["color"][k]) for k in quadrant_tokens(pos)} == {want}
    probe = ImageProbe(8)
    # two images of 16 tokens (hidden 8) between padding, features that encode the quadrant
    hidden = torch.randn(2, 20, 8) * 0.1
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[:, 2:18] = True
    hidden[:, 2:18, :4] += torch.nn.functional.one_hot(torch.tensor(lab["position"]), 4).float()
    opt = torch.optim.AdamW(probe.parameters(), lr=0.1)
    first = probe.loss(hidden, mask, [scene, scene], {"position": 1.0}).item()
    assert abs(first - torch.log(torch.tensor(4.0)).item()) < 1e-5  # zero-initialised: uniform
    assert probe.loss(hidden, torch.zeros_like(mask), [], {"position": 1.0}).item() == 0  # a batch without images
    for _ in range(30):
        opt.zero_grad()
        probe.loss(hidden, mask, [scene, scene], {"position": 1.0}).backward()
        opt.step()
    assert probe.loss(hidden, mask, [scene, scene], {"position": 1.0}).item() < 0.2 * first


def test_position_probe_trains_beside_the_model_and_is_not_saved(tok, tmp_path):
    from dataclasses import replace

    from transformers import Qwen2_5_VLForConditionalGeneration

    from pipeline.nano.builders import build_processor
    from pipeline.nano.train import vl_loss_fn

    recipe = VLRecipe(phases=[Phase(steps=4, lr=3e-3, warmup=1, captions=2, filters=2)], snapshots={},
                      position_probe=1.0, object_probe=0.5)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(recipe.config(tok))
    fn = vl_loss_fn(model, tok, build_processor(tok), recipe.phases[0], "cpu", recipe)
    weight = fn.extra_parameters[0]
    assert len(fn.extra_parameters) == 6 and not weight.any()
    info = train_vl(tok, tmp_path, recipe, seed=1, log=lambda _: None)
    assert len(info["losses"]) == 4
    train_vl(tok, tmp_path / "plain", replace(recipe, position_probe=0.0, object_probe=0.0), seed=1, log=lambda _: None)
    saved, plain = (load_file(d / "nano-vl" / "model.safetensors") for d in (tmp_path, tmp_path / "plain"))
    assert set(saved) == set(plain) and {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in plain.items()}
    loss = fn(data.stream(1, "probe"))
    loss.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0  # the probe's loss reaches it


def test_question_word_targets_point_at_the_words_that_name_the_object(tok):
    """Gate-filter queries that name their object by look: every position that predicts a value token attends
    to the question's shape word (and, for "Where is the <colour> <shape>?", its colour word); other queries
    and MCQ generation are not supervised."""
    from pipeline.nano.encode import encode_example, question_word_targets

    rng = data.stream(6, "test-words")
    kinds = set()
    for _ in range(80):
        ex = data.filter_example(rng, with_image=True)
        seq, labels = encode_example(tok, ex)
        question = ex.messages[-1]["content"][-1]["text"].splitlines()[0]
        value = ex.target.strip().rstrip(".")
        for kind, pool in (("shape", world.SHAPES), ("color", world.COLORS)):
            pairs = question_word_targets(tok, ex, kind)
            named = [w for w in re.findall(r"[a-z]+", question.lower()) if w in pool]
            if not named:
                assert not pairs
                continue
            kinds.add((question.split()[2], kind))
            assert [tok.decode([seq[q + 1]]) for q, _ in pairs] == [tok.decode([t]) for t in ids(tok, " " + value)]
            assert all(labels[q + 1] != -100 for q, _ in pairs)
            assert {tok.decode([seq[k]]).strip() for _, k in pairs} == set(named)
            assert len({k for _, k in pairs}) == 1 and pairs[0][1] < min(q for q, _ in pairs)
    assert kinds == {("color", "shape"), ("is", "shape"), ("is", "color")}  # What color is the <shape>? / Where is ...
    assert not question_word_targets(tok, data.filter_example(rng, with_image=False), "shape")
    assert not question_word_targets(tok, data.qagen_example(rng), "shape")


def test_question_word_targets_of_leaky_queries_point_at_the_stated_answer(tok):
    """A leaky text-only query is supervised only where the question states its answer as a colour / shape
    word: the positions that predict the value attend to that word (the copy); never for options_only."""
    from pipeline.nano.encode import encode_example, question_word_targets

    rng = data.stream(7, "test-leak-words")
    hits = 0
    for kind in data.LEAK_KINDS:
        for _ in range(60):
            ex = data.leaky_filter_example(rng, kind)
            seq, _ = encode_example(tok, ex)
            value = ex.target.strip().rstrip(".")
            for word_kind, pool in (("shape", world.SHAPES), ("color", world.COLORS + world.BACKGROUNDS)):
                pairs = question_word_targets(tok, ex, word_kind)
                if kind == "options_only" or value not in pool:
                    assert not pairs
                    continue
                hits += 1
                assert {tok.decode([seq[k]]).strip() for _, k in pairs} == {value}
                assert [tok.decode([seq[q + 1]]) for q, _ in pairs] == [tok.decode([t]) for t in ids(tok, " " + value)]
    assert hits > 20


def test_option_head_is_supervised_in_the_option_layer(tok, monkeypatch):
    """option_layer moves the option head's attention supervision to another text layer (here the first of
    three); the region head stays in attention_layer."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pipeline.nano import train
    from pipeline.nano.builders import build_processor
    from pipeline.nano.encode import collate_vl

    recipe = VLRecipe(phases=[Phase(steps=1, lr=1e-3, qagen=2)], text_layers=3, option_layer=0)
    torch.manual_seed(0)
    model = train._attention_ready(Qwen2_5_VLForConditionalGeneration(recipe.config(tok)), recipe)
    processor = build_processor(tok)
    seen: list[torch.Tensor] = []

    def spy(attentions, attend):
        seen.append(attentions.detach())
        return attentions.sum() * 0

    monkeypatch.setattr(train, "attention_loss", spy)
    train.vl_loss_fn(model, tok, processor, recipe.phases[0], "cpu", recipe)(random.Random(3))
    rng = random.Random(3)
    batch = collate_vl(tok, processor.image_processor, [data.qagen_example(rng) for _ in range(2)])
    with torch.no_grad():
        attentions = model(**batch.model_inputs("cpu"), output_attentions=True).attentions
    region, option = seen  # region head (1) of the last layer, then option head (0) of layer 0
    assert torch.allclose(region, attentions[-1][:, 1]) and torch.allclose(option, attentions[0][:, 0])
    assert not torch.allclose(option, attentions[-1][:, 0])


def test_filter_recipe_starts_from_the_trained_vl(tok, tmp_path):
    """nano-filter starts from the nano-VL folder under the output root (lr 0: its weights, unchanged)
    and refuses to start without it."""
    from pipeline.nano.train import FilterRecipe

    train_vl(tok, tmp_path, VLRecipe(phases=[Phase(steps=2, lr=1e-3, warmup=1, captions=2)], snapshots={}),
             log=lambda _: None)
    still = FilterRecipe(phases=[Phase(steps=1, lr=0.0, warmup=1, captions=1, filters=2)])
    train_vl(tok, tmp_path, still, log=lambda _: None)
    vl, filt = (load_file(tmp_path / name / "model.safetensors") for name in ("nano-vl", "nano-filter"))
    assert set(vl) == set(filt) and all(torch.equal(vl[k], filt[k]) for k in vl)
    info = train_vl(tok, tmp_path, FilterRecipe(phases=[Phase(steps=2, lr=1e-3, warmup=1, filters=2)]),
                    log=lambda _: None)
    assert info["steps"] == 2 and all(math.isfinite(x) for x in info["losses"])
    moved = load_file(tmp_path / "nano-filter" / "model.safetensors")
    assert any(not torch.equal(vl[k], moved[k]) for k in vl)
    with pytest.raises(FileNotFoundError, match="train it first"):
        train_vl(tok, tmp_path / "empty", still, log=lambda _: None)


def test_filter_trains_after_the_vl_and_is_skipped_when_it_fails(tok, tmp_path, monkeypatch):
    """train_models queues nano-filter once nano-VL is done, runs the in-between work while it trains,
    and skips it when nano-VL failed (it must not start from a stale nano-VL)."""
    from multiprocessing.dummy import Pool

    from pipeline.nano import train

    order: list[str] = []

    def fake_training(tok, root, recipe, *args):  # stands in for train_vl and train_reader
        order.append(recipe.name)
        if recipe.name == "nano-vl" and (root / "break").exists():
            raise RuntimeError("nano-vl broke")
        return {"steps": 1, "seconds": 0.0, "losses": [1.0], "snapshots": {}}

    monkeypatch.setattr(train, "train_vl", fake_training)
    monkeypatch.setattr(train, "train_reader", fake_training)
    tok.save_pretrained(tmp_path / train.TOKENIZER_DIR)
    args = (str(tmp_path), 0, 1, 0.01, "cpu")
    with Pool(2) as pool:
        infos = train.train_models(["vl", "filter", "reader"], args, pool, lambda: order.append("eval"))
    assert list(infos) == ["vl", "filter", "reader"] and not any("error" in v for v in infos.values())
    assert order.index("nano-vl") < order.index("nano-filter") and order.index("nano-reader") < order.index("eval")
    (tmp_path / "break").touch()
    with Pool(2) as pool:
        infos = train.train_models(["vl", "filter"], args, pool, lambda: order.append("late eval"))
    assert infos["vl"]["error"] == "RuntimeError: nano-vl broke" and infos["filter"]["error"].startswith("skipped")
    assert infos["filter"]["recipe"]["name"] == "nano-filter" and "late eval" not in order
    assert "nano-vl broke" in (tmp_path / "train_vl.log").read_text()


def test_train_all_command_builds_every_model_and_the_manifest(tok, tmp_path):
    """`python -m pipeline.nano.train --all` at a tiny scale: nano-VL, then nano-filter from it, and
    nano-reader in a second process; MANIFEST.json records each (nano-filter's start) with its sha256."""
    from pipeline.nano import train

    tok.save_pretrained(tmp_path / "tok")
    out = tmp_path / "out"
    assert train.main(["--all", "--scale", "0.002", "--out", str(out), "--no-eval", "--tokenizer", str(tmp_path / "tok")]) == 0
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert {"nano-vl", "nano-filter", "nano-reader"} <= set(manifest["models"])
    assert manifest["models"]["nano-filter"]["recipe"]["start_from"] == "nano-vl"
    assert manifest["models"]["nano-filter"]["steps"] == 2 and manifest["models"]["nano-vl"]["steps"] == 6
    for name, entry in manifest["models"].items():
        assert (out / name / "model.safetensors").is_file() and "model.safetensors" in entry["sha256"]


def test_absent_filter_examples_key_the_absent_option_exactly_when_the_quadrant_is_empty():
    """The gate filter's absent-thing queries (nano-filter-absent): with the image the target is "There is no
    shape in the <quadrant>." when it is empty and the quadrant's shape otherwise, the region is the quadrant;
    without the image a shown option."""
    rng = data.stream(0, "test-absent-filter")
    kinds = set()
    for _ in range(300):
        ex = data.absent_filter_example(rng)
        question = json.dumps(ex.messages)
        position = next(p for p in world.POSITIONS if f"What shape is in the {p}?" in question)
        assert f"There is no shape in the {position}." in question
        if ex.task == "filter_noimg":
            kinds.add("noimg")
            continue
        obj = ex.scene.at(position)
        assert ex.about == (position,)
        assert ex.target == data.option_target(obj.shape if obj else f"There is no shape in the {position}.")
        kinds.add("occupied" if obj else "empty")
    assert kinds == {"noimg", "occupied", "empty"}


def test_reader_group_absent_questions_follow_what_the_caption_says_and_off_changes_nothing():
    """With absent-thing questions and inventing captions mixed in, the target of an absent-thing question is
    the shape the caption names in that quadrant (an invented one too), else "cannot answer"; with both shares
    0 the examples are those of the plain reader (same RNG stream)."""
    rng = data.stream(1, "test-absent-reader")
    seen = set()
    for _ in range(200):
        cap, items = data.reader_group(rng, 4, absent=0.5, invent=0.3)
        stated = {o["position"]: o["shape"] for o in world.parse_caption(cap)["objects"]}
        for shown, answer in items:
            if shown.mcq.qtype != "absent":
                continue
            position = shown.mcq.meta["key"]
            assert answer == stated.get(position, CANNOT_ANSWER)
            seen.add("named" if position in stated else "cannot")
    assert seen == {"named", "cannot"}
    invented = data.invented_caption(world.Scene("gray", (world.SceneObject("star", "red", "top left"),)), rng)
    said = world.parse_caption(invented)
    assert said["count"] == 1 and len(said["objects"]) >= 2  # the true count, more objects listed
    a, b = data.stream(5, "same"), data.stream(5, "same")
    assert data.reader_group(a, 3) == data.reader_group(b, 3, absent=0.0, invent=0.0)
    assert data.drill_sequence(a, 2) == data.drill_sequence(b, 2, absent=0.0, invent=0.0)


def test_reader_recipe_can_start_from_a_trained_reader(tok, tmp_path):
    """nano-reader-absent fine-tunes the nano-reader under the output root (lr 0: its weights unchanged) and
    refuses to start without one."""
    from pipeline.nano.train import ReaderAbsentRecipe

    base = ReaderRecipe(phases=[Phase(steps=2, lr=1e-3, warmup=1, drill=2)], questions=2, layers=1)
    train_reader(tok, tmp_path, base, log=lambda _: None)
    still = replace(ReaderAbsentRecipe(), phases=[Phase(steps=1, lr=0.0, warmup=1, captions=1, drill=1)],
                    questions=2, layers=1)
    train_reader(tok, tmp_path, still, log=lambda _: None)
    start, tuned = (load_file(tmp_path / n / "model.safetensors") for n in ("nano-reader", "nano-reader-absent"))
    assert set(start) == set(tuned) and all(torch.equal(start[k], tuned[k]) for k in start)
    with pytest.raises(FileNotFoundError, match="train it first"):
        train_reader(tok, tmp_path / "empty", still, log=lambda _: None)


def test_brief_captions_are_true_and_terse():
    """nano-vl-brief's training captions: about `full` of them complete, the others state the count, the background
    and at most the first object (never every object); no caption claims anything false. VLRecipe keeps the full stream."""
    rng = data.stream(0, "test-brief")
    examples = [data.caption_example(rng, 0.25) for _ in range(400)]
    full = 0
    for ex in examples:
        check = claims.check_scene(ex.scene, ex.target)
        assert check.hallucination == 0.0, ex.target
        stated = world.caption_accuracy(ex.scene, ex.target)["attribute_accuracy"]
        mentioned = sum(f"the {o.position}" in ex.target.lower() for o in ex.scene.objects)
        if stated == 1.0:
            full += 1
        else:
            assert mentioned <= 1 and mentioned < len(ex.scene.objects), ex.target
            if mentioned:  # it stops early, it does not pick: the one object said is the first in reading order
                assert f"the {ex.scene.objects[0].position}" in ex.target.lower(), ex.target
    assert 0.18 < full / 400 < 0.32
    assert VLRecipe().full_captions == 1.0 and BriefRecipe().full_captions < 0.5 and BriefRecipe().start_from == "nano-vl"
    plain, same = data.stream(0, "test-brief-full"), data.stream(0, "test-brief-full")
    assert [data.caption_example(plain).target for _ in range(50)] == \
        [data.caption_example(same, 1.0).target for _ in range(50)]
