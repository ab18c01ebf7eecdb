"""A throwaway local Ray cluster on 127.0.0.1 for the `ray` tests.

`RayCluster.start()` runs `ray start --head --block` (2 CPUs, free ports, its own temp dir) as a child in a
new session and waits until the job API answers. `stop()` ends that session's processes only (the head's
GCS, raylet, dashboard and their workers), by process group: never `ray stop`, which would stop every Ray
process of this user on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.slurm_cluster import _free_ports


@dataclass
class RayCluster:
    """A one-node Ray cluster whose session files live under `temp_dir`."""

    temp_dir: Path
    cpus: int = 2
    ports: list[int] = field(default_factory=lambda: _free_ports(7))
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        """The job API (what `submit --address` and RAY_ADDRESS take)."""
        return f"http://127.0.0.1:{self.ports[1]}"

    def start(self, timeout: float = 180.0) -> None:
        gcs, dash, agent_http, agent_grpc, metrics, node_manager, object_manager = self.ports
        ray = str(Path(sys.executable).parent / "ray") if (Path(sys.executable).parent / "ray").exists() else "ray"
        args = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                f"--num-cpus={self.cpus}", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent_http}",
                f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
                f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
                "--disable-usage-stats", f"--temp-dir={self.temp_dir}"]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        self.log = open(self.temp_dir.parent / "ray-start.log", "wb")  # noqa: SIM115 - lives as long as the head
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.logs()}")
            if self.answers():
                return
            time.sleep(1)
        raise RuntimeError(f"the Ray job API did not answer within {timeout:.0f}s:\n{self.logs()}")

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.address}/api/version", timeout=5) as resp:
                return "ray_version" in json.loads(resp.read())
        except (OSError, ValueError):
            return False

    def logs(self, tail: int = 40) -> str:
        path = self.temp_dir.parent / "ray-start.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-tail:]) if path.exists() else ""

    def stop(self) -> None:
        """Stop the head this object started and everything in its session (by process group)."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                time.sleep(1)  # the session's other processes follow their group's signal
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None
        self.log.close()


def wait_for_job(address: str, job_id: str, timeout: float = 300.0) -> str:
    """Poll the job API until the job ends; its final state (TimeoutError after `timeout`)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = str(client.get_job_status(job_id).value)
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return state
        time.sleep(0.5)
    raise TimeoutError(f"Ray job {job_id} still running after {timeout:.0f}s:\n{client.get_job_logs(job_id)[-3000:]}")


def job_logs(address: str, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address).get_job_logs(job_id)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray head for the whole session (skips, saying why, without ray)."""
    pytest.importorskip("ray.job_submission", reason="ray is not installed: bash tools/setup_ray.sh")
    if shutil.which("ray") is None and not (Path(sys.executable).parent / "ray").exists():
        pytest.skip("the `ray` command is not on PATH: bash tools/setup_ray.sh")
    base = Path(tempfile.mkdtemp(prefix="rayt-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    cluster = RayCluster(base / "s")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
