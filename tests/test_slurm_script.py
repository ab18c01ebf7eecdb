"""The sbatch script submit renders, without a cluster: its directives, its dry run, and its signal handling
(the script runs under plain bash as array task 1, and a SIGTERM/SIGUSR1 to the shell aborts the shard cleanly)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.executors.slurm import SlurmSpec, render_script
from pipeline.runner import EXIT_PREEMPTED
from pipeline.storage import Storage
from tests.sched_world import served_world, write_manifest  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, **slurm):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(json.dumps({"name": "demo run", "root": str(tmp_path / "root"), "slurm": slurm}))
    return load_config(manifest), manifest


def test_render_directives_and_task_command(tmp_path):
    config, manifest = _config(tmp_path, setup=["module load cuda/12.4", "source /opt/venv/bin/activate"],
                               partition="gpu", account="proj", extra_sbatch=["--qos=high"], signal_s=300)
    spec = SlurmSpec(stage="annotate", shards=list(range(1000)), tasks=100, parallel=32, gpus=1, cpus=8,
                      mem="64G", time="04:00:00", requeue=True, manifest=str(manifest),
                      overrides=["annotate.captioner.batch_size=16", "name=it's"])
    storage = Storage(config.root)
    script = render_script(config, spec, storage, "/logs")
    lines = script.splitlines()
    for directive in ["--array=0-99%32", "--gres=gpu:1", "--cpus-per-task=8", "--mem=64G", "--time=04:00:00",
                      "--partition=gpu", "--account=proj", "--qos=high", "--signal=B:USR1@300", "--requeue",
                      "--output=/logs/annotate-%A_%a.log", "--job-name=demo_run-annotate"]:
        assert f"#SBATCH {directive}" in lines, directive
    assert lines.index("module load cuda/12.4") < lines.index("source /opt/venv/bin/activate")
    assert "PYTHON=python" in lines  # setup lines given: the activated environment's python
    assert "SHARDS=0-999" in lines and "NUM_TASKS=100" in lines
    run_line = next(line for line in lines if " -m pipeline run " in line)
    assert f"--manifest {manifest}" in run_line and f"--root {storage.url()}" in run_line
    assert "--set annotate.captioner.batch_size=16" in run_line and "--set 'name=it'\"'\"'s'" in run_line
    assert "scontrol requeue" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_render_defaults_and_task_cap(tmp_path):
    config, _ = _config(tmp_path)
    spec = SlurmSpec(stage="download", shards=[3, 4, 9], tasks=10)
    script = render_script(config, spec, Storage(config.root), "/l")
    assert "#SBATCH --array=0-2" in script.splitlines()  # never more tasks than shards
    assert "#SBATCH --no-requeue" in script and "scontrol requeue" not in script
    assert f"PYTHON={sys.executable}" in script  # no setup lines: this interpreter
    assert "--gres" not in script and "--partition" not in script


@pytest.mark.parametrize("args, needle", [
    (["--mem", "lots"], "bad --mem"),
    (["--time", "4h"], "bad --time"),
    (["--tasks", "0"], "--tasks must be"),
    (["--time", "3"], "slurm.signal_s=120"),
    (["--stage", "nope"], "unknown stage"),
])
def test_submit_rejects_bad_options_in_one_line(tmp_path, capsys, args, needle):
    base = {"--stage": "fetch", "--tasks": "2", "--shards": "0-5"}
    argv = ["submit", "--root", str(tmp_path / "r"), "--dry-run", "--set", "stages.fetch=tests.plugin_stages:fetch"]
    for k, v in base.items():
        if k not in args:
            argv += [k, v]
    assert main(argv + args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_time_limit_formats():
    from pipeline.executors.slurm import time_limit_seconds

    assert [time_limit_seconds(t) for t in ["90", "5:30", "04:00:00", "1-12", "1-0:30", "2-01:00:05"]] == [
        5400, 330, 14400, 129600, 88200, 176405]


def test_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    root = tmp_path / "root"
    code = main(["submit", "--stage", "fetch", "--shards", "0-5", "--tasks", "3", "--parallel", "2", "--dry-run",
                 "--root", str(root), "--set", "stages.fetch=tests.plugin_stages:fetch"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and "#SBATCH --array=0-2%2" in out
    assert not root.exists()


@pytest.mark.parametrize("module", ["pipeline.executors.slurm", "pipeline.slurm"])
def test_slice_helper_matches_slice_for_task(module):
    """The helper scripts call (pipeline.slurm: the name in scripts rendered by earlier versions)."""
    got = [subprocess.run([sys.executable, "-m", module, "slice", "0-5,9", "3", str(t)],
                          capture_output=True, text=True, check=True, cwd=REPO).stdout.strip() for t in range(3)]
    assert got == ["0-2", "3-4", "5,9"]


def _wait(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_batch_shell_aborts_shard_cleanly(tmp_path, served_world, sig):  # noqa: F811
    """Array task 1 of 3 gets shards 2-3; shard 2 is held; a signal to the shell stops it with exit 75,
    leaving no marker, no claim and no staging for shard 2, and shard 3 untouched."""
    root = tmp_path / "root"
    hold = tmp_path / "hold"
    hold.write_text("")
    urls = served_world.urls(tmp_path / "urls.parquet")
    manifest = write_manifest(tmp_path / "m.yaml", root, urls, hold={"shards": [2], "file": str(hold)})
    config = load_config(manifest)
    storage = Storage(config.root)
    script = render_script(config, SlurmSpec(stage="fetch", shards=list(range(6)), tasks=3, manifest=str(manifest)),
                           storage, str(tmp_path))
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "PIPELINE_HEARTBEAT_S": "0.2"}
    log = open(tmp_path / "task.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(["bash", "-c", script], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        claim = root / "_running" / "fetch" / "00002.json"
        _wait(claim.exists, what="shard 2's claim")
        first = json.loads(claim.read_text())["time"]
        _wait(lambda: claim.exists() and json.loads(claim.read_text())["time"] != first, timeout=15,
              what="a heartbeat")
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == EXIT_PREEMPTED
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "task.log").read_text()
    assert f"stopped by signal {int(sig)}" in text, text
    assert not claim.exists()
    assert not (root / "_done" / "fetch" / "00002.json").exists()
    assert not (root / "_done" / "fetch" / "00003.json").exists()
    assert list((root / "_tmp" / "fetch").iterdir()) == []
    assert not (root / "_failed" / "fetch").exists()


def test_signal_during_setup_stops_before_python(tmp_path):
    """A SIGTERM while the environment set-up runs: python never starts, the task exits 75."""
    ready = tmp_path / "ready"
    config, _ = _config(tmp_path, setup=[f"touch {ready}", "sleep 2"])
    script = render_script(config, SlurmSpec(stage="download", shards=[0, 1], tasks=1), Storage(config.root), "/l")
    proc = subprocess.Popen(["bash", "-c", script], cwd=REPO, env={**os.environ, "SLURM_ARRAY_TASK_ID": "0"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait(ready.exists, timeout=30, what="the setup lines")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_PREEMPTED and "stopped before starting" in out, out
    assert not (tmp_path / "root").exists()


def test_more_tasks_than_max_array_size_are_folded_and_said(tmp_path, capsys, monkeypatch):
    """A cluster whose MaxArraySize (scontrol show config) is below --tasks: the array is folded to that many
    tasks (one job id, so chains and retry keep working), every shard still in exactly one task, and submit says so."""
    from pipeline.shards import slice_for_task

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2\" = 'show config' ] && printf 'ClusterName = fake\\n"
                                      "MaxArraySize            = 10\\nMaxJobCount = 10000\\n'\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code = main(["submit", "--stage", "fetch", "--shards", "0-99", "--tasks", "40", "--dry-run",
                 "--root", str(tmp_path / "root"), "--set", "stages.fetch=tests.plugin_stages:fetch"])
    captured = capsys.readouterr()
    assert code == 0 and "#SBATCH --array=0-9" in captured.out and "NUM_TASKS=10" in captured.out
    assert "--tasks 40 exceeds the cluster's MaxArraySize 10: folded into 10 array tasks of up to 10 shard(s)" \
        in captured.err
    shards = sorted(s for t in range(10) for s in slice_for_task(list(range(100)), 10, t))
    assert shards == list(range(100))
    # within the limit: untouched, nothing said
    assert main(["submit", "--stage", "fetch", "--shards", "0-99", "--tasks", "10", "--dry-run",
                 "--root", str(tmp_path / "root"), "--set", "stages.fetch=tests.plugin_stages:fetch"]) == 0
    captured = capsys.readouterr()
    assert "#SBATCH --array=0-9" in captured.out and "note:" not in captured.err
