"""status and retry without a cluster: which shards are committed, failed, running, stale or pending."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.runner import run_stage
from pipeline.status import classify_claim, collect_stage_status, collect_status
from pipeline.storage import Storage
from tests.sched_world import served_world, write_manifest  # noqa: F401 - fixture


@pytest.fixture
def half_run(tmp_path, served_world):  # noqa: F811
    """download committed on shards 0-2 of 6 (row 4, in shard 1, is a 404), digest failing on a corrupt shard 2."""
    root = tmp_path / "root"
    urls = served_world.urls(tmp_path / "urls.parquet", broken=frozenset({4}))
    manifest = write_manifest(tmp_path / "m.yaml", root, urls)
    config = load_config(manifest)
    assert run_stage(config, "download", [0, 1, 2], progress=False, out=io.StringIO()).exit_code == 0
    (root / "images" / "00002.tar").write_bytes(b"x" * (root / "images" / "00002.tar").stat().st_size)
    assert run_stage(config, "digest", [0, 1, 2], progress=False, out=io.StringIO()).exit_code == 1
    return root, manifest, config


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_retry_lists_uncommitted_shards_of_the_run(half_run, capsys):
    _, manifest, _ = half_run
    # the download stage records num_shards in run.json: that is the run's shard set
    assert main(["retry", "--stage", "download", "--manifest", str(manifest)]) == 0
    assert capsys.readouterr().out.strip() == "3-5"
    assert main(["retry", "--stage", "digest", "--manifest", str(manifest)]) == 0
    assert capsys.readouterr().out.strip() == "2-5"
    assert main(["retry", "--stage", "download", "--manifest", str(manifest), "--failed-only"]) == 0
    assert capsys.readouterr().out.strip() == "1"


def test_retry_without_run_json_uses_submissions(tmp_path, served_world, capsys):  # noqa: F811
    root = tmp_path / "root"
    urls = served_world.urls(tmp_path / "urls.parquet", broken=frozenset({1}))
    manifest = write_manifest(tmp_path / "m.yaml", root, urls)
    assert run_stage(load_config(manifest), "fetch", [0], progress=False, out=io.StringIO()).exit_code == 0
    assert main(["retry", "--stage", "fetch", "--manifest", str(manifest), "--failed-only"]) == 0
    assert capsys.readouterr().out.strip() == "0"
    # fetch has no retry_shard: refused on the login node, before anything is submitted
    assert main(["retry", "--stage", "fetch", "--manifest", str(manifest), "--failed-only", "--submit"]) == 2
    assert "cannot redo single rows" in capsys.readouterr().err
    # no run.json num_shards and no submission: retry needs to be told the run's shards
    assert main(["retry", "--stage", "fetch", "--manifest", str(manifest)]) == 2
    assert "pass --shards" in capsys.readouterr().err
    assert main(["retry", "--stage", "fetch", "--manifest", str(manifest), "--shards", "0-5"]) == 0
    assert capsys.readouterr().out.strip() == "1-5"
    # submission records under ROOT/logs define the run's shards (all of a stage's submissions together)
    (root / "logs").mkdir()
    for i, spec in enumerate(["0-3", "7"]):
        (root / "logs" / f"fetch-{i}.submit.json").write_text(json.dumps(
            {"stage": "fetch", "shard_spec": spec, "tasks": 2, "submitted_at": f"2026-01-0{i + 1}T00:00:00+00:00"}))
    assert main(["retry", "--stage", "fetch", "--manifest", str(manifest)]) == 0
    assert capsys.readouterr().out.strip() == "1-3,7"


def test_status_table_failures_and_row_errors(half_run, capsys):
    _, manifest, _ = half_run
    assert main(["status", "--manifest", str(manifest)]) == 0
    out = capsys.readouterr().out
    header, download, digest = out.splitlines()[:3]
    assert header.split()[:6] == ["stage", "committed", "failed", "running", "stale", "pending"]
    assert download.split()[:6] == ["download", "3", "0", "0", "0", "3"]
    assert download.split()[7:9] == ["8", "1"]  # rows ok / failed
    assert digest.split()[:6] == ["digest", "2", "1", "0", "0", "3"]
    assert "digest: shard(s) 2 FAILED: ReadError" in out
    assert re.search(r"download: failed rows in 1: .*404.*: 1", out), out


def test_stale_claims_of_dead_tasks(half_run, capsys):
    root, manifest, config = half_run
    storage = Storage(str(root))
    dead = {"host": socket.gethostname(), "pid": _dead_pid(), "time": "2026-01-01T00:00:00+00:00"}
    storage.write_json("_running/download/00004.json", dead)
    storage.write_json("_running/download/00005.json", {**dead, "pid": os.getpid()})
    (st,) = collect_stage_status(config, "download")
    (row,) = collect_status(config, "download")
    assert row["stale"] == 1 and row["stale_shards"] == "4" and row["running"] == 1 and row["committed"] == 3
    assert [c.shard for c in st.stale] == [4] and [c.shard for c in st.running] == [5]
    assert "is gone" in st.stale[0].reason
    assert main(["retry", "--stage", "download", "--manifest", str(manifest)]) == 0
    assert capsys.readouterr().out.strip() == "3-4"  # 5 is held by a live process
    assert main(["retry", "--stage", "download", "--manifest", str(manifest), "--include-running"]) == 0
    assert capsys.readouterr().out.strip() == "3-5"
    main(["status", "--manifest", str(manifest), "--stage", "download"])
    assert "shard 4 has a stale claim" in capsys.readouterr().out


def test_classify_claim_rules():
    now = 1_800_000_000.0
    iso = "2027-01-15T08:00:00+00:00"  # 1_800_000_000 - 0
    job = {"host": "node7", "pid": 1, "time": iso, "slurm_job_id": "42"}
    assert classify_claim(1, job, {"42", "41_3"}, 600, now).live
    gone = classify_claim(1, job, {"41"}, 600, now)
    assert not gone.live and "no longer in squeue" in gone.reason
    remote = {"host": "node7", "pid": 1, "time": iso}
    assert classify_claim(1, remote, None, 600, now + 60).live
    old = classify_claim(1, remote, None, 600, now + 601)
    assert not old.live and "no heartbeat for 601s" in old.reason


def test_retry_without_a_manifest_judges_by_the_recorded_settings(half_run, capsys):
    """Without -m, retry (like status) uses the settings the markers record, not built-in defaults: committed
    shards stay committed, --failed-only finds the failed rows, and it says which settings it used."""
    root, _, _ = half_run
    assert main(["retry", "--stage", "download", "--root", str(root)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "3-5" and "settings their markers record" in captured.err
    assert main(["retry", "--stage", "download", "--root", str(root), "--failed-only"]) == 0
    assert capsys.readouterr().out.strip() == "1"


def test_retry_says_plainly_when_nothing_is_left(half_run, capsys):
    _, manifest, config = half_run
    assert run_stage(config, "download", [3, 4, 5], progress=False, out=io.StringIO()).exit_code == 0
    assert main(["retry", "--stage", "download", "--manifest", str(manifest)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "every unit is committed (or held by a live task); nothing to retry" in captured.err
