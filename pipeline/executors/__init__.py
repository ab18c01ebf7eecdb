"""Executors: schedule the runner's units on a cluster, knowing nothing of what a stage does.

`base.py` holds the small interface (`plan`, `submit`, `live_jobs`) and what every executor shares (shard
groups, the `python -m pipeline run` command of a group, the identity a task gives its claims). `ray.py` is the
Ray executor. SLURM arrays are still rendered by `pipeline/slurm.py` (see docs/architecture.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import ExecutorError, PipelineError
from pipeline.executors.base import Executor

EXECUTORS = {"ray": "pipeline.executors.ray:RayExecutor"}
"""Executors behind the interface, by name (imported only when asked for: Ray is an optional extra)."""


def get_executor(name: str, config: RunConfig, address: str | None = None) -> Executor:
    """The executor `name` for a run's configuration (`address`: where its cluster is, when it has one)."""
    if name not in EXECUTORS:
        raise ExecutorError(f"unknown executor {name!r}; known: {', '.join(EXECUTORS)}")
    module, _, attr = EXECUTORS[name].partition(":")
    return getattr(importlib.import_module(module), attr)(config, address)


def live_jobs(config: RunConfig, claims: Iterable[dict[str, Any]]) -> dict[str, set[str]]:
    """executor name -> ids of its jobs still queued or running, for each executor named in the claims that
    could be asked (SLURM's squeue; Ray's job API at the addresses their submissions recorded). An executor
    missing from the answer could not be asked: its claims are judged by the owner's process or heartbeat."""
    from pipeline.claims import squeue_job_ids

    claims = list(claims)
    live: dict[str, set[str]] = {}
    if any(c.get("slurm_job_id") for c in claims):
        queued = squeue_job_ids()
        if queued is not None:
            live["slurm"] = queued
    for name in sorted({c.get("executor") for c in claims if c.get("executor") in EXECUTORS}):
        jobs = {str(c.get("job_id")) for c in claims if c.get("executor") == name}
        states = job_states(config, name, jobs)
        if states is not None:
            live[name] = {j for j, state in states.items() if state in ("PENDING", "RUNNING")}
    return live


def job_states(config: RunConfig, name: str, job_ids: Iterable[str],
               records: Iterable[dict[str, Any]] | None = None) -> dict[str, str | None] | None:
    """job id -> its state on executor `name`'s cluster (asked at the address its submission recorded, from
    `records` or ROOT/logs), or None when a cluster could not be reached."""
    from pipeline.slurm import submissions
    from pipeline.storage import Storage

    job_ids = set(job_ids)
    if records is None:
        try:
            records = submissions(Storage(config.root, config.storage_options, config.work_dir))
        except PipelineError:
            records = []
    recorded = {str(r["job_id"]): r.get("address") for r in records if str(r.get("job_id")) in job_ids}
    out: dict[str, str | None] = {}
    for address in {recorded.get(j) for j in job_ids}:
        try:
            executor = get_executor(name, config, address)
        except PipelineError:
            executor = get_executor(name, config, None)
        states = executor.job_states()
        if states is None:
            return None
        out.update({j: states.get(j) for j in job_ids if recorded.get(j) == address})
    return out


def active_executor_jobs(config: RunConfig, stage: str, name: str, address: str | None = None) -> list[str]:
    """Job ids of `stage`'s recorded submissions to executor `name` that its cluster still runs."""
    from pipeline.slurm import submissions
    from pipeline.storage import Storage

    storage = Storage(config.root, config.storage_options, config.work_dir)
    ids = [str(r["job_id"]) for r in submissions(storage, stage) if r.get("executor") == name and r.get("job_id")]
    if not ids:
        return []
    live = get_executor(name, config, address).live_jobs() or set()
    return [i for i in ids if i in live]
