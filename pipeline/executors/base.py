"""The executor interface and what every executor shares.

An executor runs a `JobSpec` (one stage over shard groups, with resources) on a cluster and knows nothing of
the stage: each task runs `python -m pipeline run --stage S --shards <its group>`, so claiming, committing and
failure records stay in `pipeline.runner`. A task tells the runner who it is through `PIPELINE_EXECUTOR`,
`PIPELINE_JOB_ID`, `PIPELINE_TASK` and `PIPELINE_TASK_ID`; `pipeline.storage.task_identity` writes them into
the unit's claim, and `live_jobs()` lets the claim judge ask whether that job still runs. Secret `--set` items
reach a task through `PIPELINE_SECRET_SETTINGS`, never through a script or a record under ROOT/logs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.errors import ExecutorError, PipelineError
from pipeline.redact import is_secret_override
from pipeline.shards import format_shard_spec, slice_for_task

IDENTITY_ENV = {"executor": "PIPELINE_EXECUTOR", "job_id": "PIPELINE_JOB_ID", "task": "PIPELINE_TASK",
                "task_id": "PIPELINE_TASK_ID"}
"""Claim field -> the environment variable an executor sets for the `run` process of each task."""

_MEM_RE = re.compile(r"^(\d+)([KMGT]?)$", re.IGNORECASE)


@dataclass
class JobSpec:
    """One stage over a set of shards, cut into `tasks` shard groups, with what each task needs."""

    stage: str
    shards: list[int]
    tasks: int = 1
    parallel: int | None = None
    """At most this many tasks at once (None: as many as the cluster fits)."""
    cpus: int = 1
    gpus: float = 0
    mem: str | None = None
    """Memory per task, SLURM's notation: 64G, 500M, 16000 (MiB)."""
    manifest: str | None = None
    overrides: list[str] = field(default_factory=list)
    failed_only: bool = False
    whole_run: bool = False
    """One task running the stage once over `shards` (its input shards; [] = the stage's default)."""
    launcher: str | None = None
    """The stage's declared launcher: 'accelerate' starts a whole-run unit on all its GPUs."""
    notes: list[str] = field(default_factory=list)
    """What the executor changed to fit its cluster, and why (said by submit, kept in the record)."""

    def validate(self) -> None:
        """Raise ExecutorError with one line for a value no cluster would run."""
        if self.whole_run:
            self.tasks = 1
        elif not self.shards:
            raise ExecutorError(f"nothing to submit for stage {self.stage!r}: the shard list is empty")
        if self.tasks < 1:
            raise ExecutorError(f"--tasks must be at least 1, got {self.tasks}")
        if self.parallel is not None and self.parallel < 1:
            raise ExecutorError(f"--parallel must be at least 1, got {self.parallel}")
        if self.gpus < 0 or self.cpus is None or self.cpus < 1:
            raise ExecutorError("--gpus must be >= 0 and --cpus >= 1")
        if self.mem is not None:
            try:
                memory_bytes(self.mem)
            except ExecutorError:
                raise ExecutorError(f"bad --mem {self.mem!r}: expected e.g. 64G, 500M or 16000") from None
        if not self.whole_run and self.tasks > len(self.shards):
            self.tasks = len(self.shards)  # a task without shards would only cost a scheduler slot


@dataclass(frozen=True)
class JobRef:
    """A submitted job: which executor, its id there, and the record written under ROOT/logs."""

    executor: str
    job_id: str
    stage: str
    record_url: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    lines: tuple[str, ...] = ()
    """What to tell the user after submitting: where the script or plan and the logs are."""


class Executor(Protocol):
    """What `submit`, `retry` and `status` ask of a cluster."""

    name: str
    label: str
    """How the cluster is named to the user: 'SLURM', 'Ray'."""
    spec_type: type[JobSpec]
    """The JobSpec (sub)class this executor takes: its fields beyond JobSpec's are the executor's own options."""

    def stage_resources(self, needs: Any, stage: str) -> dict[str, Any]:
        """Per-task resources when the command line gives none, from the stage's declared `needs`
        (a pipeline.stage.Resources)."""
        ...

    def fit(self, spec: JobSpec) -> list[str]:
        """Adjust `spec` to the cluster's limits (e.g. SLURM's MaxArraySize); one note per change."""
        ...

    def plan(self, spec: JobSpec, after: JobRef | None = None) -> str:
        """What `submit` would send, as text for --dry-run; no side effects."""
        ...

    def submit(self, spec: JobSpec, after: JobRef | None = None) -> JobRef:
        """Send the job (after `after` succeeded, when given), record it under ROOT/logs, return at once."""
        ...

    def live_jobs(self) -> set[str] | None:
        """Ids of this executor's jobs that are queued or running, or None when the cluster cannot be asked."""
        ...

    def job_states(self) -> dict[str, str] | None:
        """Every job the cluster knows -> its state (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), or None."""
        ...


def executor_options(spec_type: type[JobSpec]) -> list[str]:
    """The fields of an executor's spec class beyond JobSpec's: its own options (SLURM's time, partition, ...)."""
    from dataclasses import fields

    base = {f.name for f in fields(JobSpec)}
    return [f.name for f in fields(spec_type) if f.name not in base]


SECRET_SETTINGS_ENV = "PIPELINE_SECRET_SETTINGS"
"""The environment variable that carries secret `--set` overrides from `submit` to its tasks (a JSON list of
key=value items), so secrets never enter a script, a plan or ROOT/logs."""


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(public, secret) `--set` items: secret ones (see pipeline.redact) travel in SECRET_SETTINGS_ENV only."""
    public = [o for o in overrides if not is_secret_override(o)]
    return public, [o for o in overrides if is_secret_override(o)]


def secret_note(overrides: list[str]) -> str | None:
    """'N secret setting(s) (keys) reach each task through $PIPELINE_SECRET_SETTINGS' for the secret items of
    `overrides` (names only, never values), or None when there are none: the line plans and scripts show."""
    secret = split_overrides(overrides)[1]
    if not secret:
        return None
    keys = ", ".join(sorted(i.partition("=")[0] for i in secret))
    return f"{len(secret)} secret setting(s) ({keys}) reach each task through ${SECRET_SETTINGS_ENV}"


def secret_env(overrides: list[str]) -> dict[str, str]:
    """The environment that hands the secret items of `overrides` to a task (read back by
    `secret_overrides_from_env`); empty when there are none."""
    secret = split_overrides(overrides)[1]
    return {SECRET_SETTINGS_ENV: json.dumps(secret)} if secret else {}


def secret_overrides_from_env() -> list[str]:
    """The secret `--set` items `submit` passed to this task through SECRET_SETTINGS_ENV (none outside a task)."""
    raw = os.environ.get(SECRET_SETTINGS_ENV)
    if not raw:
        return []
    try:
        items = json.loads(raw)
    except json.JSONDecodeError:
        raise PipelineError(f"${SECRET_SETTINGS_ENV} is not a JSON list of key=value settings") from None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise PipelineError(f"${SECRET_SETTINGS_ENV} is not a JSON list of key=value settings")
    return items


def shard_groups(spec: JobSpec) -> list[list[int]]:
    """The shard group of each task: the same contiguous slices SLURM array tasks run; one group for a
    whole-run stage (its input shards)."""
    spec.validate()
    if spec.whole_run:
        return [list(spec.shards)]
    return [slice_for_task(spec.shards, spec.tasks, i) for i in range(spec.tasks)]


def launcher_args(spec: JobSpec) -> list[str]:
    """What goes between the interpreter and `-m pipeline`: accelerate's launcher for a whole-run unit of a stage
    that declares it, given more than one GPU (one process per GPU; rank 0 claims and commits)."""
    if not (spec.whole_run and spec.launcher == "accelerate" and spec.gpus > 1):
        return []
    return ["-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={int(spec.gpus)}",
            "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]


def run_argv(spec: JobSpec, group: list[int] | str, root: str, manifest: str | None) -> list[str]:
    """The arguments after the interpreter that run one task's shard group (or a `--shards` value given as text,
    e.g. a shell variable): `-m pipeline run ...`. Secret `--set` items are left out: they travel in
    SECRET_SETTINGS_ENV."""
    text = group if isinstance(group, str) else format_shard_spec(group)
    shards = ["--shards", text] if text else []
    argv = [*launcher_args(spec), "-m", "pipeline", "run", "--stage", spec.stage, *shards, "--no-progress",
            "--root", root]
    if manifest:
        argv += ["--manifest", manifest]
    for item in split_overrides(spec.overrides)[0]:
        argv += ["--set", item]
    if spec.failed_only:
        argv.append("--failed-only")
    return argv


def task_env(executor: str, job_id: str, task: int) -> dict[str, str]:
    """The identity variables of task `task` of a job; a retried attempt of a task gets the same ones."""
    values = {"executor": executor, "job_id": job_id, "task": str(task), "task_id": f"{job_id}:{task}"}
    return {IDENTITY_ENV[k]: v for k, v in values.items()}


def task_identity_from_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The claim fields an executor's task set in the environment (empty outside one)."""
    env = os.environ if environ is None else environ
    return {k: env[v] for k, v in IDENTITY_ENV.items() if env.get(v)}


def memory_bytes(text: str) -> int:
    """SLURM's memory notation in bytes: 64G, 500M, 1T, 16000 (a bare number is MiB, as for --mem)."""
    match = _MEM_RE.match(str(text).strip())
    if not match:
        raise ExecutorError(f"bad memory {text!r}: expected e.g. 64G, 500M or 16000")
    unit = (match.group(2) or "M").upper()
    return int(match.group(1)) * 1024 ** {"K": 1, "M": 2, "G": 3, "T": 4}[unit]


def shell_line(argv: list[str]) -> str:
    """A command line a user can paste."""
    return " ".join(shlex.quote(a) for a in argv)
