"""Executors: schedule the runner's units on a cluster, knowing nothing of what a stage does.

`base.py` holds the small interface (`fit`, `plan`, `submit`, `live_jobs`, `job_states`) and what every executor
shares (shard groups, the `python -m pipeline run` command of a group, the identity a task gives its claims, the
checks against run.json, secrets through the environment); `records.py` reads the submissions recorded under
ROOT/logs. `slurm.py` renders job arrays for sbatch, `ray.py` drives Ray tasks through Ray's job API. `submit`,
`retry` and `status` talk to this package only (see docs/architecture.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pipeline.config import RunConfig
from pipeline.errors import ExecutorError, PipelineError
from pipeline.executors.base import Executor, JobSpec
from pipeline.redact import redact_url

if TYPE_CHECKING:
    from pipeline.storage import Storage

EXECUTORS = {"slurm": "pipeline.executors.slurm:SlurmExecutor", "ray": "pipeline.executors.ray:RayExecutor"}
"""Executors behind the interface, by name (imported only when asked for: Ray is an optional extra)."""
DEFAULT = "slurm"


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
    for name in sorted({c.get("executor") for c in claims if c.get("executor") in EXECUTORS} - {"slurm"}):
        jobs = {str(c.get("job_id")) for c in claims if c.get("executor") == name}
        states = job_states(config, name, jobs)
        if states is not None:
            live[name] = {j for j, state in states.items() if state in ("PENDING", "RUNNING")}
    return live


def job_states(config: RunConfig, name: str, job_ids: Iterable[str],
               records: Iterable[dict[str, Any]] | None = None) -> dict[str, str | None] | None:
    """job id -> its state on executor `name`'s cluster (asked at the address its submission recorded, from
    `records` or ROOT/logs), or None when a cluster could not be reached. A job the cluster no longer knows
    (SLURM forgets finished jobs) maps to None."""
    from pipeline.executors.records import submissions
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
    from pipeline.executors.records import executor_of, submissions
    from pipeline.storage import Storage

    storage = Storage(config.root, config.storage_options, config.work_dir)
    ids = [str(r["job_id"]) for r in submissions(storage, stage) if executor_of(r) == name and r.get("job_id")]
    if not ids:
        return []
    live = get_executor(name, config, address).live_jobs() or set()
    return [i for i in ids if i in live]


def check_against_run(config: RunConfig, spec: JobSpec, storage: Storage) -> None:
    """Refuse, before anything is planned or written, what the tasks' `run` would refuse: another shard_size than
    run.json records, or shards beyond the run's input; and a root whose URL carries credentials (it is written
    into scripts and records)."""
    from pipeline.runner import check_shard_range
    from pipeline.stage import load_stage

    if redact_url(storage.url()) != storage.url():
        raise ExecutorError(f"the root {redact_url(storage.url())} carries credentials in its URL, which would be "
                            "written into the job's script and records: give them in storage_options or the "
                            "environment instead")
    try:
        meta = storage.run_meta() or {}
    except Exception:  # noqa: BLE001 - an unreadable root is reported when submitting
        return
    recorded = meta.get("shard_size")
    if recorded is not None and recorded != config.shard_size:
        raise ExecutorError(f"refusing to submit: shard_size is {config.shard_size} but {storage.url('run.json')} "
                            f"records {recorded}; every task would refuse to run. Use a new --root, or restore the "
                            "original setting.")
    if spec.shards and not spec.whole_run:
        try:
            check_shard_range(load_stage(spec.stage, config), config, storage, spec.shards)
        except PipelineError as exc:
            raise ExecutorError(f"refusing to submit: {exc}") from None
