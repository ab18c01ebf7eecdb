"""End to end on a real one-node SLURM cluster (tests/slurm_cluster.py): array submission, equality with a
local run, scancel mid-shard + retry --submit, and a failing task reported by status."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.runner import run_stage
from pipeline.shards import sample_key, shard_name
from pipeline.storage import Storage
from tests.sched_world import N_IMAGES, NUM_SHARDS, SHARD_SIZE, served_world, url_list, write_manifest  # noqa: F401
from tests.slurm_cluster import job_tasks, wait_for_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
ALL = f"0-{NUM_SHARDS - 1}"


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m pipeline ...` from the repo root, as a user on the login node would run it."""
    env = {**os.environ, "PIPELINE_HEARTBEAT_S": "0.5"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def submit(manifest: Path, stage: str, shards: str = ALL, tasks: int = 3, *extra: str) -> str:
    out = cli("submit", "--stage", stage, "--shards", shards, "--tasks", str(tasks), "--manifest", str(manifest),
              *extra).stdout
    match = re.search(r"submitted job (\d+)", out)
    assert match, out
    return match.group(1)


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]  # type: ignore[union-attr]


def committed(root: Path, stage: str) -> set[int]:
    return set(Storage(str(root)).committed(stage))


def manifest_table(root: Path, rel: str):
    """A per-shard parquet manifest without the columns that record when/by what it was written."""
    table = pq.read_table(root / rel)
    return table.drop_columns([c for c in ("downloaded_at", "pipeline_version") if c in table.column_names])


def test_array_outputs_equal_local_run(tmp_path, slurm_cluster, served_world):  # noqa: F811
    """The demo's download (+ a digest stage reading its shards) over 6 shards as 3-task arrays."""
    root, local = tmp_path / "slurm_root", tmp_path / "local_root"
    manifest = write_manifest(tmp_path / "m.yaml", root, served_world.urls(tmp_path / "urls.parquet"))
    for stage in ("download", "digest"):
        job = submit(manifest, stage)
        wait_for_job(job)
        states = job_tasks(job)
        assert sorted(states) == [0, 1, 2] and all(t["JobState"] == "COMPLETED" for t in states.values()), states
        assert committed(root, stage) == set(range(NUM_SHARDS))
        logs = sorted((root / "logs").glob(f"{stage}-*/{stage}-{job}_*.log"))
        assert len(logs) == 3 and "task 1/3" in logs[1].read_text() and "shards 2-3" in logs[1].read_text()
        assert list((root / "logs").glob(f"{stage}-*/job.sbatch"))

    config = load_config(manifest, root=str(local))
    for stage in ("download", "digest"):
        assert run_stage(config, stage, list(range(NUM_SHARDS)), progress=False, out=io.StringIO()).exit_code == 0
    for shard in range(NUM_SHARDS):
        name = shard_name(shard)
        assert tar_members(root / "images" / f"{name}.tar") == tar_members(local / "images" / f"{name}.tar")
        for rel in (f"images/{name}.parquet", f"digests/{name}.parquet"):
            assert manifest_table(root, rel).equals(manifest_table(local, rel)), rel
    keys = [k for s in range(NUM_SHARDS) for k in pq.read_table(root / f"digests/{shard_name(s)}.parquet")["key"].to_pylist()]
    assert keys == [sample_key(i // SHARD_SIZE, i % SHARD_SIZE) for i in range(N_IMAGES)]


def test_scancel_mid_shard_then_retry_submit(tmp_path, slurm_cluster, served_world):  # noqa: F811
    """Task 1 (shards 2-3) is cancelled while shard 2 waits on a held URL; retry --submit finishes 2-3."""
    root = tmp_path / "root"
    urls = served_world.urls(tmp_path / "urls.parquet", held={7: "scancel"})  # row 7 = shard 2, row 1
    manifest = write_manifest(tmp_path / "m.yaml", root, urls)
    job = submit(manifest, "download", ALL, 3, "--requeue")
    claim = root / "_running" / "download" / "00002.json"
    held = [p for p in served_world.server.hits if p.startswith("/hold/scancel/")]
    deadline = time.monotonic() + 120
    while not (held and claim.exists() and committed(root, "download") == {0, 1, 4, 5}):
        assert time.monotonic() < deadline, "task 1 never got stuck in shard 2 while the others finished"
        time.sleep(0.2)
        held = [p for p in served_world.server.hits if p.startswith("/hold/scancel/")]
    status = cli("status", "--manifest", str(manifest), "--stage", "download").stdout
    assert re.search(r"shard 2 running \(SLURM job \d+", status), status
    assert re.search(rf"download: SLURM job {job} (RUNNING|PENDING): shards 0-5 in 3 task\(s\)", status), status

    refused = cli("retry", "--stage", "download", "--manifest", str(manifest), "--submit", check=False)
    assert refused.returncode == 2 and f"job(s) {job} of stage 'download' are still queued" in refused.stderr

    subprocess.run(["scancel", f"{job}_1"], check=True)
    wait_for_job(job)
    assert job_tasks(job)[1]["JobState"] == "CANCELLED"
    log = next((root / "logs").glob(f"download-*/download-{job}_1.log")).read_text()
    assert "stopped by signal 15" in log, log
    assert not claim.exists() and list((root / "_tmp" / "download").iterdir()) == []
    assert committed(root, "download") == {0, 1, 4, 5}

    assert cli("retry", "--stage", "download", "--manifest", str(manifest)).stdout.strip() == "2-3"
    served_world.server.release("scancel")
    out = cli("retry", "--stage", "download", "--manifest", str(manifest), "--submit").stdout
    retry_job = re.search(r"submitted job (\d+)", out).group(1)
    assert "shards 2-3 in 2 task(s)" in out
    wait_for_job(retry_job)
    assert committed(root, "download") == set(range(NUM_SHARDS))
    retry_script = sorted((root / "logs").glob("download-*/job.sbatch"))[-1].read_text()
    assert "#SBATCH --requeue" in retry_script  # resources default to the last submission's
    assert "SHARDS=2-3" in retry_script

    keys, members, scenes = [], [], []
    for shard in range(NUM_SHARDS):
        table = pq.read_table(root / f"images/{shard_name(shard)}.parquet")
        keys += table["key"].to_pylist()
        assert set(table["status"].to_pylist()) == {"ok"}
        scenes += [int(s) for s in table["scene_id"].to_pylist()]
        members += [n for n, _ in tar_members(root / f"images/{shard_name(shard)}.tar")]
    expected = [sample_key(i // SHARD_SIZE, i % SHARD_SIZE) for i in range(N_IMAGES)]
    assert keys == expected and scenes == list(range(N_IMAGES))  # no row lost or duplicated
    assert sorted(m.split(".")[0] for m in members if m.endswith(".png")) == expected
    assert cli("retry", "--stage", "download", "--manifest", str(manifest)).stdout.strip() == ""


def test_failed_task_reported_by_status(tmp_path, slurm_cluster, served_world):  # noqa: F811
    """digest fails on a corrupt image shard (planted bad input): status shows the shard and its reason;
    a 404 row shows as a failed row, and retry --failed-only --submit redoes just that shard's failed rows."""
    root = tmp_path / "root"
    urls = served_world.urls(tmp_path / "urls.parquet", broken=frozenset({7}))
    manifest = write_manifest(tmp_path / "m.yaml", root, urls)
    config = load_config(manifest)
    assert run_stage(config, "download", list(range(NUM_SHARDS)), progress=False, out=io.StringIO()).exit_code == 0
    tar = root / "images" / "00004.tar"
    tar.write_bytes(b"\x00not a tar\x00" * (tar.stat().st_size // 11) + b"x" * (tar.stat().st_size % 11))

    job = submit(manifest, "digest")
    wait_for_job(job)
    states = job_tasks(job)
    assert states[2]["ExitCode"].startswith("1:") and states[0]["ExitCode"].startswith("0:"), states
    assert committed(root, "digest") == {0, 1, 2, 3, 5}

    status = cli("status", "--manifest", str(manifest)).stdout
    table = {line.split()[0]: line.split() for line in status.splitlines()[1:3]}
    assert table["download"][1:3] == ["6", "0"] and table["digest"][1:3] == ["5", "1"], status
    assert re.search(r"digest: shard\(s\) 4 FAILED: .*(tar|header)", status), status
    assert re.search(r"download: failed rows in 2: .*404.*: 1", status), status
    failure = json.loads((root / "_failed" / "digest" / "00004.json").read_text())
    assert failure["slurm_array_task_id"] == "2"
    assert cli("retry", "--stage", "digest", "--manifest", str(manifest)).stdout.strip() == "4"
    assert cli("retry", "--stage", "download", "--failed-only", "--manifest", str(manifest)).stdout.strip() == "2"

    before = json.loads((root / "_done" / "download" / "00002.json").read_text())
    out = cli("retry", "--stage", "download", "--failed-only", "--submit", "--manifest", str(manifest)).stdout
    retry_job = re.search(r"submitted job (\d+)", out).group(1)
    wait_for_job(retry_job)
    assert "--failed-only" in sorted((root / "logs").glob("download-*/job.sbatch"))[-1].read_text()
    after = json.loads((root / "_done" / "download" / "00002.json").read_text())
    assert after["retries"] == 1 and after["retry_of"] == before["committed_at"]
    assert after["rows"] == before["rows"]  # the 404 is still a 404, recorded once


TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def test_time_limit_warning_requeues_task(tmp_path, slurm_cluster, served_world):  # noqa: F811
    """USR1 to the batch shell (what --signal=B:USR1@N sends before the time limit): the task aborts its shard,
    exits 75 and, with --requeue, puts itself back in the queue; the requeued run finishes only what is left."""
    root = tmp_path / "root"
    hold = tmp_path / "hold"
    hold.write_text("")
    urls = served_world.urls(tmp_path / "urls.parquet")
    manifest = write_manifest(tmp_path / "m.yaml", root, urls, hold={"shards": [3], "file": str(hold)})
    job = submit(manifest, "fetch", "2-3", 1, "--requeue", "--time", "10:00")
    claim = root / "_running" / "fetch" / "00003.json"
    deadline = time.monotonic() + 60
    while not claim.exists():
        assert time.monotonic() < deadline, "the task never reached shard 3"
        time.sleep(0.1)
    assert committed(root, "fetch") == {2}
    first = json.loads((root / "_done" / "fetch" / "00002.json").read_text())["committed_at"]
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{job}_0"], check=True)
    log = next((root / "logs").glob("fetch-*/")) / f"fetch-{job}_0.log"
    deadline = time.monotonic() + 60
    while "requeueing" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.1)
    hold.unlink()
    deadline = time.monotonic() + 30
    while (task := job_tasks(job)[0])["JobState"] != "PENDING":
        assert time.monotonic() < deadline, task
        time.sleep(0.2)
    assert task["Restarts"] == "1", task
    # SLURM holds a requeued job back for a while (BeginTime); let it start now instead of in minutes. Not in
    # the same second as the requeue: slurmctld revokes the old run's credential with a one-second timestamp
    # and kills a relaunch inside that second ("Job credential revoked"; the task then FAILS, exit 1).
    time.sleep(2.0)
    subprocess.run(["scontrol", "update", f"JobId={job}_0", "StartTime=now"], check=True)
    deadline = time.monotonic() + 90
    while (task := job_tasks(job)[0])["JobState"] not in TERMINAL_STATES:
        assert time.monotonic() < deadline, task
        time.sleep(0.3)
    assert committed(root, "fetch") == {2, 3}, {k: task.get(k) for k in ("JobState", "Reason", "Restarts", "ExitCode")}
    text = log.read_text()
    assert "stopped by signal 10" in text and "exit code 75" in text, text
    assert "skipping 1 committed shard(s) [2]" in text, text  # the requeued run did not redo shard 2
    assert json.loads((root / "_done" / "fetch" / "00002.json").read_text())["committed_at"] == first
    assert job_tasks(job)[0]["JobState"] == "COMPLETED"


@pytest.fixture
def s3_root(tmp_path):
    """A bucket on a moto S3 server on 127.0.0.1 and the fsspec options that reach it."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket="runs")
        yield "s3://runs/demo", {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
                                 "client_kwargs": {"region_name": "us-east-1"}}
    finally:
        server.stop()


def test_remote_root_on_s3(tmp_path, slurm_cluster, served_world, s3_root):  # noqa: F811
    """ROOT on S3: the script is saved under ROOT/logs and kept locally for sbatch; task logs go to slurm.log_dir."""
    root, options = s3_root
    log_dir = tmp_path / "slurm_logs"
    urls = served_world.urls(tmp_path / "urls.parquet")
    manifest = write_manifest(tmp_path / "m.yaml", root, urls, slurm={"log_dir": str(log_dir)},
                              storage_options=options)
    job = submit(manifest, "fetch", ALL, 2)
    wait_for_job(job)
    storage = Storage(root, options)
    assert set(storage.committed("fetch")) == set(range(NUM_SHARDS))
    assert len(list(log_dir.glob(f"fetch-*/fetch-{job}_*.log"))) == 2
    local_script = next(log_dir.glob("fetch-*/job.sbatch"))
    remote = [p for p in storage.fs.find(storage.path("logs")) if p.endswith(".sbatch")]
    assert len(remote) == 1 and storage.fs.cat(remote[0]).decode() == local_script.read_text()
    status = cli("status", "--manifest", str(manifest)).stdout
    assert status.splitlines()[1].split()[:3] == ["fetch", "6", "0"], status
