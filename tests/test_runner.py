"""The runner and CLI: skipping, --force, failure isolation, run.json drift, one-line user errors, status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import RunDriftError, SettingsChangedError
from pipeline.runner import run_stage
from pipeline.status import collect_status
from pipeline.storage import Storage

REPO = Path(__file__).parent.parent


def _cfg(tmp_path: Path, **synth):
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({
        "root": str(tmp_path / "root"), "shard_size": 10, "stages": {"synth": "tests.stages_for_tests"},
        "extra": {"synth": {"rows": 5, **synth}},
    }))
    return m, load_config(m)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_failure_isolation_commits_the_others(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "2").touch()
    manifest, _ = _cfg(tmp_path, bad_input_dir=str(bad))
    res = cli("run", "--stage", "synth", "--shards", "0-4", "--manifest", str(manifest), "--no-progress")
    assert res.returncode == 1
    assert "synth 00002: FAILED: RuntimeError: planted failure in shard 2" in res.stdout
    assert "4 committed" in res.stdout and "1 FAILED [2]" in res.stdout
    st = Storage(str(tmp_path / "root"))
    assert set(st.committed("synth")) == {0, 1, 3, 4}
    failure = st.failures("synth")[2]
    assert "planted failure" in failure["error"] and "Traceback" in failure["traceback"]
    stats = json.loads((tmp_path / "root/synth/00001_stats.json").read_text())
    assert stats["rows"] == 5 and stats["ok"] == 5
    # status reads the failure from ROOT alone
    rows = collect_status(load_config(manifest), "synth")
    assert rows[0]["committed"] == 4 and rows[0]["failed"] == 1 and "planted" in rows[0]["failure_reasons"][0]
    res = cli("status", "--manifest", str(manifest))
    assert res.returncode == 0 and "synth" in res.stdout and "planted failure" in res.stdout
    # Fix the input and rerun: only the failed shard runs, its failure record is cleared.
    (bad / "2").unlink()
    res = cli("run", "--stage", "synth", "--shards", "0-4", "--manifest", str(manifest), "--no-progress")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 committed, 4 skipped" in res.stdout
    assert st.failures("synth") == {}


def test_force_redoes_and_skip_is_default(tmp_path):
    _, cfg = _cfg(tmp_path)
    first = run_stage(cfg, "synth", [0, 1], progress=False)
    assert first.committed == [0, 1]
    marker_before = Storage(cfg.root).marker("synth", 0)
    again = run_stage(cfg, "synth", [0, 1], progress=False)
    assert again.committed == [] and again.skipped == [0, 1]
    forced = run_stage(cfg, "synth", [0, 1], force=True, progress=False)
    assert forced.committed == [0, 1]
    marker_after = Storage(cfg.root).marker("synth", 0)
    def data(m):
        return {k: v for k, v in m["outputs"].items() if not k.endswith("_stats.json")}

    assert data(marker_after) == data(marker_before)  # deterministic outputs
    assert marker_after["committed_at"] >= marker_before["committed_at"]


def test_config_change_refuses_to_replace_committed_shards_without_force(tmp_path):
    """Changed settings never silently replace committed outputs: one line names the changed key and the ways
    on; --force replaces; shards not yet committed still run with the new settings."""
    _, cfg = _cfg(tmp_path)
    run_stage(cfg, "synth", [0], progress=False)
    before = Storage(cfg.root).marker("synth", 0)
    cfg2 = load_config(None, root=cfg.root, shard_size=10, stages=cfg.stages,
                       extra={"synth": {"rows": 6}})
    with pytest.raises(SettingsChangedError, match=r"synth shard\(s\) 0, .*changed: synth.rows.*--force.*--root"):
        run_stage(cfg2, "synth", [0, 1], progress=False)
    assert Storage(cfg.root).marker("synth", 0) == before  # untouched, and nothing else ran
    assert Storage(cfg.root).marker("synth", 1) is None
    assert run_stage(cfg2, "synth", [1], progress=False).committed == [1]
    report = run_stage(cfg2, "synth", [0], force=True, progress=False)
    assert report.committed == [0]


def test_run_json_refuses_renumbering(tmp_path):
    manifest, cfg = _cfg(tmp_path)
    run_stage(cfg, "synth", [0], progress=False)
    with pytest.raises(RunDriftError, match="shard_size"):
        run_stage(load_config(manifest, ["shard_size=20"]), "synth", [0], progress=False)
    res = cli("run", "--stage", "synth", "--shards", "0", "--manifest", str(manifest), "--set", "shard_size=20")
    assert res.returncode == 2
    assert res.stderr.startswith("error: refusing to run: shard_size is 20") and "Traceback" not in res.stderr


@pytest.mark.parametrize("args,needle", [
    (["run", "--stage", "synth", "--shards", "3-1"], "reversed range"),
    (["run", "--stage", "nope", "--shards", "1"], "unknown stage 'nope'"),
    (["run", "--stage", "synth", "--shards", "1", "--set", "bogus.key=1"], "bogus: unknown key"),
    (["run", "--stage", "synth", "--shards", "1", "--manifest", "missing.yaml"], "manifest not found"),
])
def test_user_errors_are_one_line(tmp_path, args, needle):
    manifest, _ = _cfg(tmp_path)
    if "--manifest" not in args:
        args = [*args, "--manifest", str(manifest)]
    res = cli(*args)
    assert res.returncode == 2
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_unreachable_storage_is_one_line(tmp_path):
    manifest, _ = _cfg(tmp_path)
    res = cli("run", "--stage", "synth", "--shards", "0", "--manifest", str(manifest),
              "--root", "s3://bucket/run",
              "--set", "storage_options={key: a, secret: b, client_kwargs: {endpoint_url: 'http://127.0.0.1:9'}}",
              "--set", "storage_options.config_kwargs={retries: {max_attempts: 1}, connect_timeout: 1}")
    assert res.returncode == 2, res.stderr
    assert "unreachable" in res.stderr and "Traceback" not in res.stderr


def test_missing_input_shard_is_reported(tmp_path):
    from pipeline.errors import MissingInputError

    st = Storage(str(tmp_path / "root"))
    with pytest.raises(MissingInputError, match="run: python -m pipeline run --stage download --shards 7"):
        st.require_committed("download", 7)


def test_help_documents_run_flags():
    res = cli("run", "--help")
    for flag in ("--stage", "--shards", "--manifest", "--root", "--force"):
        assert flag in res.stdout
    for sub in ("status", "demo"):
        assert cli(sub, "--help").returncode == 0


def test_a_usage_error_writes_nothing_that_binds_the_next_command(tmp_path, capsys):
    """`run --stage download` without --shards, or with a URL list that does not exist, leaves no run.json:
    the user's next, correct command with their own shard size is not refused."""
    from pipeline.cli import main

    root = tmp_path / "root"
    assert main(["run", "--stage", "download", "--root", str(root)]) == 2
    assert main(["run", "--stage", "download", "--shards", "0", "--root", str(root),
                 "--set", f"download.urls={tmp_path / 'missing.parquet'}"]) == 2
    capsys.readouterr()
    assert not (root / "run.json").exists()
    urls = tmp_path / "urls.csv"
    urls.write_text("url\nhttp://127.0.0.1:9/a.png\n")
    assert main(["run", "--stage", "download", "--shards", "0", "--root", str(root), "--no-progress",
                 "--set", f"download.urls={urls}", "--set", "shard_size=5"]) in (0, 1)
    assert json.loads((root / "run.json").read_text())["shard_size"] == 5
