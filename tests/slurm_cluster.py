"""A throwaway one-node SLURM cluster on this machine for the `slurm` tests.

`SlurmCluster.start()` writes a slurm.conf into a temp dir (auth/none, proctrack/linuxproc, task/none,
one partition of this node), starts slurmctld and slurmd in the foreground mode (-D) as child processes,
and waits until `sinfo` shows the node idle. `stop()` terminates only those two processes, by pid.
Clients find the cluster through SLURM_CONF, which the fixture exports for the whole test session.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo", "scontrol")


def missing_binaries() -> list[str]:
    """SLURM programs the tests need that are not on PATH (install with tools/setup_slurm.sh)."""
    found = []
    for name in (*DAEMONS, *CLIENTS):
        if shutil.which(name) is None and not Path("/usr/sbin", name).exists():
            found.append(name)
    return found


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


@dataclass
class SlurmCluster:
    """A one-node cluster whose state, spool and logs live under `base`."""

    base: Path
    cpus: int = max(4, os.cpu_count() or 1)
    partition: str = "pipetest"
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.base / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, d_port = _free_ports(2)
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "root")
        lines = [
            "ClusterName=pipetest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d_port}",
            "AuthType=auth/none",
            "CredType=cred/none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            f"StateSaveLocation={self.base / 'state'}",
            f"SlurmdSpoolDir={self.base / 'spool'}",
            f"SlurmctldPidFile={self.base / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.base / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.base / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.base / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1",
            "MinJobAge=600",
            "KillWait=10",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={max(512, _mem_mb() - 1024)} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60.0) -> None:
        """Write the config, start both daemons, wait for the node to be idle (or raise with their logs)."""
        self.write_conf()
        for daemon in DAEMONS:
            out = open(self.base / "log" / f"{daemon}.stdout", "wb")  # noqa: SIM115 - lives as long as the daemon
            args = [_binary(daemon), "-D", "-f", str(self.conf)]
            if daemon == "slurmctld":
                args.append("-c")  # clean start: no saved state
            self.procs[daemon] = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
            if daemon == "slurmctld":
                self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), 30, "slurmctld to answer")
        self._wait(self.node_idle, timeout, "the node to become idle")

    def _ok(self, cmd: list[str], needle: str) -> bool:
        try:
            r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0 and needle in r.stdout

    def node_idle(self) -> bool:
        return self._ok(["sinfo", "-h", "-N", "-o", "%t"], "idle")

    def _wait(self, check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n{self.logs()}")
            if check():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        out = []
        for path in sorted((self.base / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        """Stop the daemons this object started (by pid, slurmd first), then reap them."""
        for name in reversed(DAEMONS):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()


def wait_for_job(job_id: str, env: dict[str, str] | None = None, timeout: float = 120.0) -> None:
    """Poll squeue until no task of `job_id` is pending or running (TimeoutError after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i %T"], env=env, capture_output=True, text=True)
        if r.returncode == 0 and not r.stdout.strip():
            return
        time.sleep(0.3)
    raise TimeoutError(f"SLURM job {job_id} still queued after {timeout:.0f}s")


def job_tasks(job_id: str, env: dict[str, str] | None = None) -> dict[int, dict[str, str]]:
    """array task id -> scontrol's fields (JobState, ExitCode, ...) of a finished or running array job."""
    r = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True)
    out: dict[int, dict[str, str]] = {}
    for line in r.stdout.splitlines():
        fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        if "ArrayTaskId" in fields and fields["ArrayTaskId"].isdigit():
            out[int(fields["ArrayTaskId"])] = fields
    return out


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node SLURM cluster for the session (SLURM_CONF exported); skipped without slurm-wlm."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): run tools/setup_slurm.sh")
    if os.geteuid() != 0:
        pytest.skip("the one-node test cluster runs slurmd as root (auth/none); run the slurm tests as root")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            subprocess.run(["scancel", "-p", cluster.partition], env=cluster.env, capture_output=True, timeout=10)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                r = subprocess.run(["squeue", "-h"], env=cluster.env, capture_output=True, text=True, timeout=10)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.3)
        except (OSError, subprocess.SubprocessError):
            pass
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
