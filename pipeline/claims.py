"""Who works on a unit: exclusive claims with an owner token and a heartbeat, and whether an owner still lives.

A claim is ROOT/_running/<stage>/<unit>.json: the owner's host, pid, SLURM ids, a random token and the time of
its last heartbeat. It is created exclusively, so two runs on one shard never both work on it:
- local and shared POSIX file systems: `open(O_CREAT | O_EXCL)`, atomic on one host and on NFSv3+ / Lustre /
  GPFS; a stale claim is taken over by renaming exactly that file away (one racer wins the rename);
- object stores: a conditional PUT (`If-None-Match: *`, honoured by S3, MinIO and moto) followed by a read
  back of the token. A store that ignores the condition degrades to a lease: the last writer's token wins the
  read back and the other run skips the unit, so two owners overlap only if both write within one round
  trip and both read back their own token, which a consistent store rules out.
A claim is stale, and may be taken over, when its owner is gone: its SLURM job is no longer in squeue, its
executor's job (Ray) no longer runs, it was left by an earlier attempt of the very task now asking (an
executor retries a task only after its attempt died), its process on this host is dead (gone, a zombie not
yet reaped, or its pid now another process's: the claim records the process's start time), or (when none of
these can be checked) its heartbeat is older than `stale_after`.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.executors.base import IDENTITY_ENV

DEFAULT_STALE_AFTER = 600.0
"""A claim whose heartbeat (refreshed every PIPELINE_HEARTBEAT_S=60 s) is older than this is stale."""


@dataclass
class Owner:
    """A verdict on a claim: is its owner alive, and why we think so."""

    live: bool
    reason: str


class ClaimHeld(Exception):  # noqa: N818 - a state, raised to skip a unit
    """The unit is claimed by a live owner."""

    def __init__(self, claim: dict[str, Any], reason: str):
        super().__init__(reason)
        self.claim = claim
        self.reason = reason

    @property
    def who(self) -> str:
        job = self.claim.get("slurm_job_id")
        where = f" (SLURM job {job})" if job else (f" ({_executor_job(self.claim)})" if self.claim.get("job_id") else "")
        return f"{self.claim.get('host', '?')}:{self.claim.get('pid', '?')}" + where


def now_epoch() -> float:
    return _dt.datetime.now(_dt.timezone.utc).timestamp()


def _epoch(iso: Any) -> float | None:
    if isinstance(iso, int | float):
        return float(iso)
    if not isinstance(iso, str):
        return None
    try:
        return _dt.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat), or None where /proc cannot say."""
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of a process from /proc (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, started: int | None = None) -> bool:
    """Whether process `pid` on this host still runs: not gone, not a zombie (killed but not yet reaped, as a
    killed task's process is until init reaps it) and, when `started` is given, the same process that started
    then, not a later one given the same pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, start = stat
    if state in ("Z", "X", "x"):
        return False
    return started is None or start == started


def _executor_job(claim: dict[str, Any]) -> str:
    """'Ray job <id> task <i>' for a claim an executor's task wrote."""
    name = {"ray": "Ray"}.get(str(claim.get("executor")), str(claim.get("executor")))
    task = claim.get("task")
    return f"{name} job {claim.get('job_id')}" + (f" task {task}" if task is not None else "")


def judge(claim: dict[str, Any], jobs: set[str] | None, stale_after: float, now: float | None = None,
          live: Mapping[str, set[str]] | None = None) -> Owner:
    """Whether the task holding a claim is still alive (see the module docstring). `jobs`: squeue's ids;
    `live`: executor name -> its live job ids, for the executors that could be asked."""
    now = now if now is not None else now_epoch()
    job = claim.get("slurm_job_id")
    if job and jobs is not None:
        if str(job) in jobs:
            return Owner(True, f"SLURM job {job}")
        return Owner(False, f"SLURM job {job} is no longer in squeue")
    executor, executor_job = claim.get("executor"), claim.get("job_id")
    prefix = f"{_executor_job(claim)}, " if executor and executor_job else ""
    if prefix and live is not None and executor in live and str(executor_job) not in live[executor]:
        return Owner(False, f"{_executor_job(claim)}: the job no longer runs")
    if claim.get("task_id") and claim.get("task_id") == os.environ.get(IDENTITY_ENV["task_id"]):
        return Owner(False, f"{prefix}an earlier attempt of this task (retried after it died)")
    host, pid = claim.get("host"), claim.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        started = claim.get("pid_start")
        if pid_alive(pid, started if isinstance(started, int) else None):
            return Owner(True, f"{prefix}pid {pid} on {host}")
        return Owner(False, f"{prefix}process {pid} on {host} is gone")
    beat = _epoch(claim.get("beat", claim.get("time")))
    age = now - beat if beat is not None else float("inf")
    where = f"SLURM job {job}" if job else f"{prefix}pid {pid} on {host}"
    if age <= stale_after:
        return Owner(True, f"{where}, heartbeat {age:.0f}s ago")
    return Owner(False, f"{where}: no heartbeat for {age:.0f}s")


def squeue(fmt: str) -> list[str] | None:
    """squeue's lines in format `fmt` (no header) for every job SLURM still holds, or None when squeue is
    missing or fails."""
    binary = shutil.which("squeue")
    if binary is None:
        return None
    try:
        proc = subprocess.run([binary, "-h", "-o", fmt], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.splitlines() if proc.returncode == 0 else None


def squeue_job_ids() -> set[str] | None:
    """Ids of the jobs SLURM still knows as pending/running (unique ids of array tasks too), or None if unknown."""
    lines = squeue("%A %i")
    return None if lines is None else {token for line in lines for token in line.split()}


def jobs_for(claim: dict[str, Any]) -> set[str] | None:
    """squeue's job ids when the claim names a SLURM job (else None: no need to ask)."""
    return squeue_job_ids() if claim.get("slurm_job_id") else None
