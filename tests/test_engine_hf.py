"""The hf engine end to end on small random-weight checkpoints built offline, for both families: Qwen2 readers
with Qwen2.5-VL captioners (28 px grid) and the CapRL++ generation, Qwen3 readers with Qwen3-VL captioners
(32 px grid). Every test that takes a model runs once per family."""

from __future__ import annotations

import io
import random

import pytest
import torch
from PIL import Image

from pipeline.config import EngineConfig, RewardConfig
from pipeline.engines import ChatRequest, Engine, Sampling, create_engine
from pipeline.engines.hf import HFEngine, ModelLoadError
from pipeline.mcq import READER_PREFILL
from pipeline.nano import world
from pipeline.nano.random_checkpoints import build_random_text_model, build_random_vl_model
from pipeline.reward import CapRLReward

GENERATIONS = {"qwen2.5": ("qwen2", "qwen2.5-vl"), "qwen3": ("qwen3", "qwen3-vl")}
"""A model generation: its reader family and its captioner family."""


@pytest.fixture(scope="session", params=list(GENERATIONS))
def generation(request) -> tuple[str, str]:
    return GENERATIONS[request.param]


pytestmark = pytest.mark.usefixtures("generation")  # every test runs once per generation


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory, generation):
    family = generation[0]
    return build_random_text_model(tmp_path_factory.mktemp("models") / family, seed=0, family=family)


@pytest.fixture(scope="session")
def vl_model_dir(tmp_path_factory, generation):
    family = generation[1]
    return build_random_vl_model(tmp_path_factory.mktemp("models") / family, seed=0, family=family)


@pytest.fixture(scope="module")
def text_engine(text_model_dir):
    torch.set_num_threads(1)
    # small budgets force several batches of different widths
    return HFEngine(EngineConfig(model=str(text_model_dir), batch_size=3, max_batch_tokens=2000))


@pytest.fixture(scope="module")
def vl_engine(vl_model_dir):
    return HFEngine(EngineConfig(model=str(vl_model_dir), batch_size=3, max_batch_tokens=4000))


def text_requests() -> list[ChatRequest]:
    rng = random.Random(0)
    reqs = []
    for i in range(7):
        scene = world.sample_scene(rng)
        msgs = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": world.caption(scene, i % 3) + " What is shown?" * (1 + i % 3)}]
        reqs.append(ChatRequest(messages=msgs, prefill=READER_PREFILL if i % 2 else ""))
    return reqs


def vl_requests() -> list[ChatRequest]:
    rng = random.Random(1)
    reqs = []
    for i in range(5):
        img = world.render(world.sample_scene(rng)).resize((112 + 28 * i, 112))
        content = [{"type": "image"}, {"type": "text", "text": "Please describe this image in detail." + " Be exact." * i}]
        reqs.append(ChatRequest(messages=[{"role": "user", "content": content}], images=[img]))
    return reqs


@pytest.mark.parametrize("kind", ["text", "vl"])
def test_batched_greedy_equals_one_at_a_time(kind, request):
    engine = request.getfixturevalue(f"{kind}_engine")
    reqs = text_requests() if kind == "text" else vl_requests()
    params = Sampling(max_new_tokens=12)
    batched = engine.generate(reqs, params)
    single = [engine.generate([r], params)[0] for r in reqs]
    assert batched == single
    assert len({g[0].text for g in batched}) > 1  # the random model does depend on its input
    for [g] in batched:
        assert g.finish_reason == "length" and g.num_tokens == 12


@pytest.mark.parametrize("kind", ["text", "vl"])
def test_score_choices_batched_equals_single(kind, request):
    engine = request.getfixturevalue(f"{kind}_engine")
    reqs = text_requests()[:5] if kind == "text" else vl_requests()
    choices = [[" A", " B", " C", " D", " E"], [" red circle", " blue", " a green star in the top left"],
               [" white background.", " A"], [" two"], [" B", " the caption does not say"]][: len(reqs)]
    batched = engine.score_choices(reqs, choices)
    single = [engine.score_choices([r], [c])[0] for r, c in zip(reqs, choices, strict=True)]
    assert [len(s) for s in batched] == [len(c) for c in choices]
    for b, s in zip(batched, single, strict=True):
        assert b == pytest.approx(s, abs=1e-4)
    assert all(x < 0 for row in batched for x in row)


def test_score_is_the_sum_of_token_logprobs(text_engine):
    req = text_requests()[1]
    choice = " a red circle in the top left"
    [[score]] = text_engine.score_choices([req], [[choice]])
    prompt = text_engine.encode(req)["input_ids"][0].tolist()
    ids = text_engine.choice_ids(choice)
    assert len(ids) > 1
    with torch.no_grad():
        logits = text_engine.model(torch.tensor([prompt + ids])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    manual = sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(ids))
    assert score == pytest.approx(manual, abs=1e-4)


def test_sampling_is_seeded_and_gives_n_samples(text_engine):
    reqs = text_requests()[:3]
    params = Sampling(temperature=1.0, max_new_tokens=8, n=4, seed=11)
    first = text_engine.generate(reqs, params)
    assert [len(g) for g in first] == [4, 4, 4]
    assert text_engine.generate(reqs, params) == first
    other = text_engine.generate(reqs, Sampling(temperature=1.0, max_new_tokens=8, n=4, seed=12))
    assert other != first
    assert len({g.text for g in first[0]}) > 1


def test_stop_strings_end_generation(text_engine):
    req = text_requests()[0]
    [[full]] = text_engine.generate([req], Sampling(max_new_tokens=12))
    stop = full.text[3:6]
    [[cut]] = text_engine.generate([req], Sampling(max_new_tokens=12, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert full.text.startswith(cut.text) and stop not in cut.text


def test_images_go_through_preprocess(vl_engine):
    img = world.render(world.sample_scene(random.Random(5))).resize((140, 112))
    rotated = img.rotate(90, expand=True)  # stored sideways, EXIF says "rotate back"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buf = io.BytesIO()
    rotated.save(buf, format="PNG", exif=exif)
    rgba = img.convert("RGBA")
    content = [{"type": "image"}, {"type": "text", "text": "Please describe this image in detail."}]
    reqs = [ChatRequest(messages=[{"role": "user", "content": content}], images=[src])
            for src in (img, buf.getvalue(), rgba, rotated)]
    outs = vl_engine.generate(reqs, Sampling(max_new_tokens=10))
    assert outs[0] == outs[1] == outs[2]  # bytes + EXIF orientation, alpha: same as the upright RGB image
    assert outs[3] != outs[0]  # without the EXIF tag the sideways image is a different input


def test_text_model_rejects_images(text_engine):
    req = ChatRequest(messages=[{"role": "user", "content": "hi"}], images=[Image.new("RGB", (28, 28))])
    with pytest.raises(ValueError, match="text-only"):
        text_engine.generate([req], Sampling(max_new_tokens=2))


def test_model_id_and_factory(text_model_dir, tmp_path):
    engine = create_engine(EngineConfig(backend="hf", model=str(text_model_dir)))
    assert isinstance(engine, HFEngine) and isinstance(engine, Engine)
    assert engine.model_id.startswith(str(text_model_dir)) and "#sha256:" in engine.model_id
    other = build_random_text_model(tmp_path / "other", seed=1)
    assert HFEngine(EngineConfig(model=str(other))).model_id.split("#")[1] != engine.model_id.split("#")[1]
    with pytest.raises(ModelLoadError):
        HFEngine(EngineConfig(model=str(tmp_path / "missing")))


@pytest.mark.parametrize("mode", ["sample", "letter_prob", "option_text"])
def test_reward_runs_on_the_hf_reader(text_engine, mode):
    rng = random.Random(2)
    scenes = [world.sample_scene(rng) for _ in range(3)]
    mcqs = [world.pick_mcqs(s, rng) for s in scenes]
    reward = CapRLReward(text_engine, RewardConfig(mode=mode, n_draws=4))
    results = reward([world.caption(s) for s in scenes], mcqs)
    assert all(r.reward is not None and 0.0 <= r.reward <= 1.0 for r in results)
    assert reward.last_stats["reader_calls"] == 1
    again = CapRLReward(text_engine, RewardConfig(mode=mode, n_draws=4))([world.caption(s) for s in scenes], mcqs)
    assert [r.reward for r in again] == [r.reward for r in results]


def reader_requests(n: int = 12) -> list[ChatRequest]:
    """Reward-style reader prompts: shared few-shot prefix, several draws per caption."""
    from pipeline.mcq import CANNOT_ANSWER, reader_messages, shuffle_options

    rng = random.Random(4)
    reqs = []
    for _ in range(n // 3):
        scene = world.sample_scene(rng)
        cap = world.caption(scene)
        for q in world.pick_mcqs(scene, rng)[:3]:
            reqs.append(ChatRequest(messages=reader_messages(cap, shuffle_options(q, rng, CANNOT_ANSWER)),
                                    prefill=READER_PREFILL))
    return reqs


def test_shared_prefix_reuse_matches_plain_batching(text_model_dir, text_engine):
    reqs = reader_requests()
    plan = text_engine._plan([text_engine.encode(r) for r in reqs])
    assert plan is not None and plan.shared > 100 and any(g > plan.shared for g in plan.group_len)
    plain = HFEngine(EngineConfig(model=str(text_model_dir), batch_size=5, share_prefix=False))
    params = Sampling(max_new_tokens=10)
    shared = text_engine.generate(reqs, params)
    assert shared == plain.generate(reqs, params)
    assert shared == [text_engine.generate([r], params)[0] for r in reqs]
    choices = [[" A", " B", " C", " D", " E"], [" red", " two shapes"]] * (len(reqs) // 2)
    # repeated prompts (a draw asked twice) and choices of 1-5 tokens, all on the prompt-cache path
    reqs, choices = reqs + reqs[:3], choices + [[" blue star", " CANNOT"], [" x"], [" the top left corner", " A"]]
    a, b = text_engine.score_choices(reqs, choices), plain.score_choices(reqs, choices)
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=1e-4)
    sampled = text_engine.generate(reqs, Sampling(max_new_tokens=6, temperature=1.0, n=3, seed=2))
    assert all(len(g) == 3 for g in sampled) and len({g.text for g in sampled[0]}) > 1


def test_end_of_sequence_gives_stop_and_token_count(text_model_dir):
    engine = HFEngine(EngineConfig(model=str(text_model_dir)))
    reqs = text_requests()[:3]
    first = int(engine._generate_batch([engine.encode(reqs[0])], Sampling(max_new_tokens=1), 0)[0, 0])
    engine.eos_ids = [first]  # pretend the first token request 0 generates is the end-of-sequence token
    ended = engine.generate(reqs, Sampling(max_new_tokens=6))
    assert ended[0][0].finish_reason == "stop" and ended[0][0].num_tokens == 1
    for g in ended[1:]:
        assert g[0].finish_reason in ("stop", "length") and 1 <= g[0].num_tokens <= 6


@pytest.mark.parametrize("kind", ["text", "vl"])
def test_compiled_decoding_settings_give_the_eager_results(kind, request):
    """`compile: true` decodes into a static KV cache with bucketed widths (on a GPU transformers then
    compiles the decode step; on CPU it stays eager): greedy results equal the default path's."""
    model_dir = request.getfixturevalue(f"{kind}_model_dir")
    reqs = text_requests() if kind == "text" else vl_requests()
    default = HFEngine(EngineConfig(model=str(model_dir), batch_size=3))
    compiled = HFEngine(EngineConfig(model=str(model_dir), batch_size=3, compile=True))
    params = Sampling(max_new_tokens=10)
    assert compiled.generate(reqs, params) == default.generate(reqs, params)
    batch = compiled._collate([compiled.encode(r) for r in reqs[:2]], multiple=64)
    assert batch["input_ids"].shape[1] % 64 == 0


def test_images_are_encoded_one_batch_ahead_with_the_same_results(vl_model_dir, monkeypatch):
    import threading

    reqs = vl_requests()
    first = HFEngine(EngineConfig(model=str(vl_model_dir), batch_size=2))  # auto: off on CPU
    ahead = HFEngine(EngineConfig(model=str(vl_model_dir), batch_size=2, encode_ahead="on"))
    threads: list[str] = []
    encode = ahead.encode

    def spy(req):
        threads.append(threading.current_thread().name)
        return encode(req)

    monkeypatch.setattr(ahead, "encode", spy)
    params = Sampling(max_new_tokens=8)
    assert ahead.generate(reqs, params) == first.generate(reqs, params)
    assert len(threads) == len(reqs) and all(t.startswith("hf-encode") for t in threads)
    # the estimate (no processor run) matches the processor's token count for prepared images
    for r in reqs:
        tokens, patches = ahead._estimate(r)
        enc = encode(r)
        assert tokens == enc["input_ids"].shape[1]
        assert patches == int(enc["image_grid_thw"].prod(-1).sum())
        buf = io.BytesIO()
        r.images[0].save(buf, format="PNG")
        as_bytes = ChatRequest(messages=r.messages, images=[buf.getvalue()])
        assert ahead._estimate(as_bytes) == (tokens, patches)  # from the header alone


def test_batches_sized_from_a_memory_budget(vl_engine):
    from pipeline.engines.memory import row_cost, rows_that_fit

    class Cfg:  # Qwen2.5-VL-3B's text and vision sizes
        text_config = type("T", (), dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=2,
                                          num_hidden_layers=36, intermediate_size=11008, vocab_size=151936))()
        vision_config = type("V", (), dict(hidden_size=1280, intermediate_size=3420))()

    cost = row_cost(Cfg(), 2)
    assert cost.kv_per_token == 2 * 36 * 2 * 128 * 2  # 36 KiB of bf16 K and V per token
    row = cost.row_bytes(300, 256, 1024)
    assert rows_that_fit(100 * 2**30, cost, 300, 256, 1024) == 100 * 2**30 // row
    assert rows_that_fit(2 * 2**30, cost, 300, 256) > rows_that_fit(2 * 2**30, cost, 3000, 256)
    lengths = [50] * 10
    assert vl_engine.memory_budget() is None  # batch_memory 0 (and no GPU here)
    assert [len(b) for b in vl_engine._batches(lengths, 10)] == [3, 3, 3, 1]  # batch_size 3
    budget = 2 * vl_engine._row_cost.row_bytes(50, 10)
    assert [len(b) for b in vl_engine._batches(lengths, 10, budget=budget)] == [2] * 5


def test_images_are_resized_once_to_the_models_own_grid(vl_engine, generation, monkeypatch):
    """The grid is the model's (28 px Qwen2.5-VL, 32 px Qwen3-VL); the engine's budget reaches the processor (the
    tiny processors' own budget is one fixed size, which would shrink every image), so the processor keeps the
    prepared image as it is, and the length estimate is exact."""
    grid = vl_engine.image_grid
    assert grid.factor == {"qwen2.5-vl": 28, "qwen3-vl": 32}[generation[1]]
    resizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda im, *a, **k: resizes.append(im.size) or resize(im, *a, **k))
    for size in [(640, 480), (300, 97), (112, 112)]:
        img = world.render(world.sample_scene(random.Random(3))).resize(size)
        resizes.clear()
        req = ChatRequest(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi."}]}],
                          images=[img])
        enc = vl_engine.encode(req)
        h, w = grid.fit(size[1], size[0])
        assert len(resizes) == (1 if (h, w) != (size[1], size[0]) else 0)
        assert enc["image_grid_thw"][0].tolist() == [1, h // grid.patch, w // grid.patch]
        image_tokens = int((enc["input_ids"] == vl_engine.processor.image_token_id).sum())
        assert image_tokens == grid.tokens(img)
        assert vl_engine._estimate(req) == (enc["input_ids"].shape[1], int(enc["image_grid_thw"].prod()))


def test_chat_template_options_reach_the_template(text_model_dir, generation):
    """Readers default to enable_thinking: false (a Qwen3 template then opens an empty think block, so the model
    answers at once); other roles pass no option unless configured."""
    reader_cfg = RewardConfig(reader=EngineConfig(model=str(text_model_dir))).reader
    assert reader_cfg.chat_template_kwargs == {"enable_thinking": False}
    reader = HFEngine(reader_cfg)
    plain = HFEngine(EngineConfig(model=str(text_model_dir)))
    req = text_requests()[1]
    empty_think = "<think>\n\n</think>\n\n"
    assert plain.prompt_text(req).endswith("<|im_start|>assistant\n" + READER_PREFILL)
    if generation[0] == "qwen3":
        assert reader.prompt_text(req).endswith(empty_think + READER_PREFILL)
    else:  # Qwen2's template has no such option: the prompt is unchanged
        assert reader.prompt_text(req) == plain.prompt_text(req)


def test_template_options_the_template_never_reads_are_not_passed(vl_model_dir, generation):
    """A processor takes a chat-template option its template does not name for its own call and warns on every
    prompt (transformers >= 5.25): the readers' enable_thinking reaches only a template that reads it, and the
    prompt is the one without the option."""
    from pipeline.engines.common import template_options

    class Owner:
        chat_template = {"default": "{% if enable_thinking %}x{% endif %}", "tool_use": "{{ tools }}"}

    assert template_options(Owner(), {"enable_thinking": False, "other": 1}) == {"enable_thinking": False}
    assert template_options(object(), {"enable_thinking": False}) == {"enable_thinking": False}
    reader = HFEngine(RewardConfig(reader=EngineConfig(model=str(vl_model_dir))).reader)
    plain = HFEngine(EngineConfig(model=str(vl_model_dir)))
    names = "enable_thinking" in str(reader.processor.chat_template)
    assert reader._template_kwargs == ({"enable_thinking": False} if names else {})
    req = vl_requests()[0]
    if not names:
        assert reader.prompt_text(req) == plain.prompt_text(req)
