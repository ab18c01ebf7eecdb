"""End to end on a real local Ray cluster (tests/ray_cluster.py): the demo's download + annotate submitted as a
chain through `submit --executor ray` equals a local `run`; a worker SIGKILLed mid-shard is rerun by Ray with
nothing lost or duplicated; `status` during and after; `retry --executor ray` after a planted failure (the
`digest` plugin stage of tests/plugin_stages.py on a corrupt image tar)."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import load_config
from pipeline.runner import run_stage
from pipeline.shards import sample_key, shard_name
from tests.ray_cluster import job_logs, ray_cluster, wait_for_job  # noqa: F401
from tests.sched_world import N_IMAGES, NUM_SHARDS, SHARD_SIZE, served_world, write_manifest  # noqa: F401
from tests.test_slurm_e2e import committed, manifest_table, tar_members

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
ALL = f"0-{NUM_SHARDS - 1}"
EPOCH = "1700000000"


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m pipeline ...` from the repo root, as a user on a laptop would run it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def ray_manifest(tmp_path: Path, root: Path, urls: Path) -> Path:
    """The scheduling world's manifest with the noop captioner and a `ray:` section for the local cluster."""
    path = write_manifest(tmp_path / "m.yaml", root, urls)
    data = yaml.safe_load(path.read_text())
    data["annotate"] = {"captioner": {"backend": "noop"}}
    data["ray"] = {"env": {"PYTHONPATH": str(REPO), "PIPELINE_HEARTBEAT_S": "0.5", "SOURCE_DATE_EPOCH": EPOCH},
                   "max_retries": 2}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def submit(cluster, manifest: Path, stage: str, shards: str = ALL, tasks: int = 3, *extra: str) -> list[str]:
    out = cli("submit", "--executor", "ray", "--address", cluster.address, "--stage", stage, "--shards", shards,
              "--tasks", str(tasks), "--gpus", "0", "--manifest", str(manifest), *extra).stdout
    jobs = re.findall(r"submitted Ray job (\S+):", out)
    assert jobs, out
    return jobs


def finish(cluster, job: str, expect: str = "SUCCEEDED") -> str:
    state = wait_for_job(cluster.address, job)
    logs = job_logs(cluster.address, job)
    deadline = time.monotonic() + 30  # the job API may report the end before the driver's last lines
    while "task(s) succeeded" not in logs and time.monotonic() < deadline:
        time.sleep(0.5)
        logs = job_logs(cluster.address, job)
    assert state == expect, logs[-4000:]
    return logs


def test_chain_equals_local_run(tmp_path, ray_cluster, served_world, monkeypatch):  # noqa: F811
    """download then annotate (noop captioner), 6 shards in 3 Ray tasks each, chained: the same bytes as `run`."""
    root, local = tmp_path / "ray_root", tmp_path / "local_root"
    manifest = ray_manifest(tmp_path, root, served_world.urls(tmp_path / "urls.parquet"))
    download_job, annotate_job = submit(ray_cluster, manifest, "download,annotate")
    logs = finish(ray_cluster, download_job)
    assert "3 of 3 task(s) succeeded" in logs and "download task 1" in logs
    logs = finish(ray_cluster, annotate_job)
    assert f"waiting for job {download_job}" in logs and "3 of 3 task(s) succeeded" in logs
    for stage in ("download", "annotate"):
        assert committed(root, stage) == set(range(NUM_SHARDS))
    assert list((root / "logs").glob("download-*.ray.json")) and (root / "logs" / f"annotate-{annotate_job}.log").exists()
    records = [yaml.safe_load(p.read_text()) for p in (root / "logs").glob("*.submit.json")]
    assert sorted((r["stage"], r["executor"], r["job_id"]) for r in records) == sorted(
        [("download", "ray", download_job), ("annotate", "ray", annotate_job)])

    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    config = load_config(manifest, root=str(local))
    for stage in ("download", "annotate"):
        assert run_stage(config, stage, list(range(NUM_SHARDS)), progress=False, out=io.StringIO()).exit_code == 0
    for shard in range(NUM_SHARDS):
        name = shard_name(shard)
        assert tar_members(root / "images" / f"{name}.tar") == tar_members(local / "images" / f"{name}.tar")
        assert manifest_table(root, f"images/{name}.parquet").equals(manifest_table(local, f"images/{name}.parquet"))
        for rel in (f"captions/{name}.tar", f"captions/{name}.parquet"):
            assert (root / rel).read_bytes() == (local / rel).read_bytes(), rel
    status = cli("status", "--manifest", str(manifest)).stdout
    assert re.search(r"annotate\s+6\s+0\s+0\s+0\s+0", status), status


def _wait(check, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_killed_worker_is_rerun_then_retry_after_planted_failure(tmp_path, ray_cluster, served_world):  # noqa: F811
    """Task 1 (shards 2-3) is SIGKILLed (its Ray worker) while shard 2 waits on a held URL: Ray reruns it, the
    rerun takes over the claim and every shard is committed once. Then
    digest on a corrupt image tar 4 fails there; status says so; retry --executor ray --submit finishes shard 4
    alone once the tar is whole again."""
    root = tmp_path / "root"
    urls = served_world.urls(tmp_path / "urls.parquet", held={7: "raykill"})  # row 7 = shard 2, row 1
    manifest = ray_manifest(tmp_path, root, urls)
    (job,) = submit(ray_cluster, manifest, "download")
    claim = root / "_running" / "download" / "00002.json"
    _wait(lambda: claim.exists() and any(p.startswith("/hold/raykill/") for p in served_world.server.hits),
          "task 1 never got stuck in shard 2")
    _wait(lambda: committed(root, "download") >= {0, 1, 4, 5}, "the other tasks did not finish")
    status = cli("status", "--manifest", str(manifest), "--stage", "download").stdout
    assert re.search(rf"shard 2 running \(Ray job {job} task 1, pid \d+ on ", status), status
    assert f"Ray job {job} RUNNING: shards {ALL} in 3 task(s)" in status, status

    owner = yaml.safe_load(claim.read_text())
    assert owner["executor"] == "ray" and owner["job_id"] == job and owner["task"] == "1"
    worker = int(Path(f"/proc/{owner['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the run's parent
    os.kill(worker, signal.SIGKILL)
    _wait(lambda: not Path(f"/proc/{owner['pid']}").exists(), "the run process outlived its killed worker", 30)
    served_world.server.release("raykill")
    logs = finish(ray_cluster, job)
    assert "3 of 3 task(s) succeeded" in logs
    assert committed(root, "download") == set(range(NUM_SHARDS)) and not claim.exists()
    held_hits = sum(n for p, n in served_world.server.hits.items() if p.startswith("/hold/raykill/"))
    assert held_hits >= 2  # the killed attempt and its rerun both fetched the held row
    keys, members = [], []
    for shard in range(NUM_SHARDS):
        table = pq.read_table(root / f"images/{shard_name(shard)}.parquet")
        keys += table["key"].to_pylist()
        assert set(table["status"].to_pylist()) == {"ok"}
        members += [n for n, _ in tar_members(root / f"images/{shard_name(shard)}.tar") if n.endswith(".png")]
    expected = [sample_key(i // SHARD_SIZE, i % SHARD_SIZE) for i in range(N_IMAGES)]
    assert keys == expected and sorted(m.split(".")[0] for m in members) == expected  # none lost or duplicated
    after = cli("status", "--manifest", str(manifest), "--stage", "download").stdout
    assert "running" not in after.split("\n", 2)[-1] and re.search(r"download\s+6\s+0\s+0\s+0\s+0", after), after

    tar = root / "images" / "00004.tar"  # plant a failure: digest (tests/plugin_stages.py) fails on a bad tar
    good = tar.read_bytes()
    tar.write_bytes(b"\x00not a tar\x00" * (len(good) // 11) + b"x" * (len(good) % 11))
    (job,) = submit(ray_cluster, manifest, "digest", ALL, 2)
    logs = finish(ray_cluster, job, "FAILED")
    assert "task 1 (shards 3-5) exit code 1" in logs, logs[-3000:]
    assert committed(root, "digest") == {0, 1, 2, 3, 5}
    failure = yaml.safe_load((root / "_failed" / "digest" / "00004.json").read_text())
    assert (failure["executor"], failure["job_id"], failure["task"]) == ("ray", job, "1")
    status = cli("status", "--manifest", str(manifest), "--stage", "digest").stdout
    assert re.search(r"digest: shard\(s\) 4 FAILED: .*(tar|header)", status), status
    tar.write_bytes(good)
    assert cli("retry", "--stage", "digest", "--manifest", str(manifest)).stdout.strip() == "4"
    out = cli("retry", "--stage", "digest", "--manifest", str(manifest), "--submit", "--address",
              ray_cluster.address).stdout
    (retry_job,) = re.findall(r"submitted Ray job (\S+): stage digest, shards 4 in 1 task\(s\)", out)
    finish(ray_cluster, retry_job)
    assert committed(root, "digest") == set(range(NUM_SHARDS))
    assert cli("retry", "--stage", "digest", "--manifest", str(manifest)).stdout.strip() == ""
