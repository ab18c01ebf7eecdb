"""Before the first shard, every model path and endpoint a stage needs is checked once: one `error:` line, exit 2,
nothing claimed or recorded (instead of one failure per shard, or a dead server retried for every row)."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from pipeline.config import EngineConfig, load_config
from pipeline.demo import DEMO_MANIFEST, make_demo_data, serve_directory
from pipeline.preflight import engine_problem
from pipeline.resources import repo_path
from pipeline.stage import load_stage
from tests.test_engine_openai import ScriptedServer


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory) -> tuple[Path, Path]:
    """A root with two committed download shards of the demo world, and its manifest."""
    tmp = tmp_path_factory.mktemp("preflight")
    data = make_demo_data(tmp / "data", n_images=4, size=48)
    root = tmp / "root"
    with serve_directory(data) as served:
        rows = [{"url": f"{served}/{r['file']}"} for r in pq.read_table(data / "world.parquet").to_pylist()]
        pq.write_table(pa.Table.from_pylist(rows), data / "urls.parquet")
        download = yaml.safe_load(DEMO_MANIFEST.read_text())["download"]
        download.update(urls=str(data / "urls.parquet"), caption_col=None, save_additional_columns=[], image_size=48)
        manifest = tmp / "m.yaml"
        manifest.write_text(yaml.safe_dump({"root": str(root), "shard_size": 2, "download": download}))
        assert main(["run", "--stage", "download", "--shards", "0-1", "--no-progress", "-m", str(manifest)]) == 0
    return root, manifest


def _run_annotate(manifest: Path, *sets: str) -> int:
    args = ["run", "--stage", "annotate", "--shards", "0-1", "--no-progress", "-m", str(manifest)]
    for item in sets:
        args += ["--set", item]
    return main(args)


def test_missing_captioner_fails_once_before_any_shard(downloaded, capsys):
    root, manifest = downloaded
    code = _run_annotate(manifest, "annotate.captioner.model=./models/no-such-model", "annotate.captioner.device=cpu")
    out = capsys.readouterr()
    assert code == 2
    assert out.err.strip().splitlines() == [
        f"error: stage 'annotate': annotate.captioner.model './models/no-such-model' does not exist "
        f"(looked in {Path('./models/no-such-model').resolve()}); nothing was run"]
    assert "FAILED" not in out.out
    assert not (root / "_failed" / "annotate").exists() and not (root / "_running" / "annotate").exists()


def test_dead_openai_server_is_named_before_any_row(downloaded, capsys):
    _, manifest = downloaded
    start = time.monotonic()
    code = _run_annotate(manifest, "annotate.captioner.backend=openai", "annotate.captioner.model=m",
                         "annotate.captioner.base_url=http://u:pw-0@127.0.0.1:9/v1", "annotate.captioner.max_retries=4")
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - start < 10
    assert "cannot reach the openai server http://127.0.0.1:9/v1 (ConnectError: " in err and "pw-0" not in err


def test_committed_shards_need_no_engine(downloaded, capsys):
    """A rerun with nothing to do does not check (or need) its engines."""
    _, manifest = downloaded
    server = ScriptedServer()
    try:
        live = ["annotate.captioner.backend=openai", "annotate.captioner.model=m", "annotate.captioner.concurrency=2"]
        assert _run_annotate(manifest, *live, f"annotate.captioner.base_url={server.url}") == 0
    finally:
        server.close()
    capsys.readouterr()
    assert _run_annotate(manifest, *live, "annotate.captioner.base_url=http://127.0.0.1:9/v1") == 0
    assert "skipping 2 committed shard(s)" in capsys.readouterr().out


def test_engine_problems_in_words(tmp_path, monkeypatch):
    assert engine_problem("x", EngineConfig(backend="noop")) is None
    assert engine_problem("x", EngineConfig(backend="hf", model="train:latest")) is None
    assert engine_problem("x", EngineConfig(backend="hf", model=str(repo_path("models", "nano", "nano-reader")))) is None
    assert engine_problem("x", EngineConfig(backend="hf", model="")) == "x.model is not set"
    (tmp_path / "empty").mkdir()
    assert "without config.json" in engine_problem("x", EngineConfig(backend="hf", model=str(tmp_path / "empty")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert "Hugging Face cache" in engine_problem("x", EngineConfig(backend="hf", model="org/not-cached"))


def test_submit_sizes_gpus_by_the_engines(tmp_path, capsys):
    """A CPU manifest (nano engines on cpu, noop, openai) gets no --gres; a GPU one gets the declared GPU."""
    demo = ["-m", str(DEMO_MANIFEST), "--root", str(tmp_path / "r")]
    assert main(["submit", "--stage", "annotate", "--shards", "0-3", "--dry-run", *demo]) == 0
    assert "--gres" not in capsys.readouterr().out
    assert main(["submit", "--stage", "qa", "--shards", "0", "--dry-run", *demo,
                 "--set", "qa.filter.device=auto"]) == 0
    assert "#SBATCH --gres=gpu:1" in capsys.readouterr().out
    for backend in ("noop", "openai"):
        assert main(["submit", "--stage", "annotate", "--shards", "0", "--dry-run", "--root", str(tmp_path / "r"),
                     "--set", f"annotate.captioner.backend={backend}"]) == 0
        assert "--gres" not in capsys.readouterr().out
    config = load_config()
    assert load_stage("annotate", config).needs(config).gpus == 1  # default hf on 'auto': a GPU


def test_submit_refuses_what_run_json_would_refuse(downloaded, tmp_path, capsys):
    root, manifest = downloaded
    base = ["submit", "--stage", "annotate", "--dry-run", "-m", str(manifest)]
    assert main([*base, "--shards", "0-1", "--set", "shard_size=3"]) == 2
    assert "shard_size is 3 but" in capsys.readouterr().err
    assert main([*base, "--shards", "0-5"]) == 2
    assert "shard(s) 2-5 are beyond" in capsys.readouterr().err
    assert main([*base, "--shards", "0-1"]) == 0
