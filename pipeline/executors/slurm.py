"""The SLURM executor: a job array per per-shard stage (one job for a whole-run stage), rendered as an sbatch script.

Array task i of N runs `pipeline.shards.slice_for_task(shards, N, i)` through `python -m pipeline run`.
The batch shell runs python as a child and forwards SIGTERM/SIGUSR1 to it, so a preempted or
time-limited task aborts its current shard cleanly (no marker, staging removed) and exits 75; with
`--requeue` a task stopped by the time-limit warning (USR1) puts itself back in the queue. Committed
shards are skipped by every rerun, so a requeued or retried task only does what is left. Each submission
gets a folder ROOT/logs/<stage>-<time>/ with its script, its record and one log per task.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.claims import squeue
from pipeline.config import RunConfig
from pipeline.errors import SlurmError
from pipeline.executors.base import (
    JobRef,
    JobSpec,
    run_argv,
    secret_env,
    secret_note,
)
from pipeline.executors.records import RECORD_NAME
from pipeline.redact import redact_override
from pipeline.runner import EXIT_PREEMPTED
from pipeline.shards import format_shard_spec, parse_shard_spec, slice_for_task
from pipeline.storage import LOGS_DIR, Storage, code_version, now_iso

if TYPE_CHECKING:
    from pipeline.stage import Resources

NAME = "slurm"
SCRIPT_NAME = "job.sbatch"
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")
_MY_SHARDS = "$MY_SHARDS"
"""The array task's shard group, computed in the script: passed to `run` as a shell variable."""
_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}


@dataclass
class SlurmSpec(JobSpec):
    """A JobSpec with SLURM's own options."""

    time: str | None = None
    """Time limit per task, SLURM's notation: 04:00:00, 90, 1-12:00:00."""
    partition: str | None = None
    account: str | None = None
    requeue: bool = False
    dependency: str | None = None
    """sbatch --dependency, e.g. 'afterok:1234' (set from the job a chain comes after)."""

    def validate(self) -> None:
        super().validate()
        if self.gpus != int(self.gpus):
            raise SlurmError(f"--gpus {self.gpus:g}: SLURM gives a task whole GPUs")
        if self.time is not None and not _TIME_RE.match(self.time):
            raise SlurmError(f"bad --time {self.time!r}: expected e.g. 04:00:00, 90, 1-12:00:00")


def time_limit_seconds(text: str) -> int:
    """SLURM's --time formats in seconds: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m, sec = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + sec
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def task_python(config: RunConfig) -> str:
    """The interpreter array tasks use: configured, else `python` after setup lines, else this one."""
    if config.slurm.python:
        return config.slurm.python
    return "python" if config.slurm.setup else sys.executable


def log_dir_for(config: RunConfig, storage: Storage) -> str:
    """Where task logs go: slurm.log_dir, else ROOT/logs for a local ROOT, else ./slurm_logs."""
    if config.slurm.log_dir:
        return os.path.abspath(config.slurm.log_dir)
    if storage.is_local:
        return storage.path(LOGS_DIR)
    return os.path.abspath("slurm_logs")


def _directives(config: RunConfig, spec: SlurmSpec, log_dir: str) -> list[str]:
    sc = config.slurm
    job_name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{config.name}-{spec.stage}")
    out = [f"--job-name={job_name}"]
    if spec.whole_run:
        out += ["--nodes=1", f"--output={log_dir}/{spec.stage}-%j.log"]
    else:
        array = f"0-{spec.tasks - 1}" + (f"%{spec.parallel}" if spec.parallel else "")
        out += [f"--array={array}", f"--output={log_dir}/{spec.stage}-%A_%a.log"]
    if spec.dependency:
        out += [f"--dependency={spec.dependency}", "--kill-on-invalid-dep=yes"]
    out += [
        "--open-mode=append",  # a requeued task adds to its log instead of truncating it
        f"--chdir={os.path.abspath(sc.workdir or os.getcwd())}",
        f"--signal=B:USR1@{sc.signal_s}",
        "--requeue" if spec.requeue else "--no-requeue",
        "--ntasks=1",
    ]
    if spec.cpus > 1:
        out.append(f"--cpus-per-task={spec.cpus}")
    if spec.gpus:
        out.append(f"--gres=gpu:{int(spec.gpus)}")
    if spec.mem:
        out.append(f"--mem={spec.mem}")
    if spec.time:
        out.append(f"--time={spec.time}")
    partition = spec.partition or sc.partition
    account = spec.account or sc.account
    if partition:
        out.append(f"--partition={partition}")
    if account:
        out.append(f"--account={account}")
    out.extend(opt.strip() for opt in sc.extra_sbatch if opt.strip())
    return out


def render_script(config: RunConfig, spec: SlurmSpec, storage: Storage, log_dir: str) -> str:
    """The sbatch script of an array over `spec.shards` in `spec.tasks` tasks (one job for a whole-run stage)."""
    spec.validate()
    q = shlex.quote
    sc = config.slurm
    if spec.time and sc.signal_s * 2 > time_limit_seconds(spec.time):
        raise SlurmError(f"slurm.signal_s={sc.signal_s} (the stop warning before the time limit) leaves too "
                         f"little of --time {spec.time} to work: lower slurm.signal_s or raise --time")
    manifest = os.path.abspath(spec.manifest) if spec.manifest else None
    argv = run_argv(spec, spec.shards if spec.whole_run else _MY_SHARDS, storage.url(), manifest)
    run_line = " ".join(f'"{a}"' if a == _MY_SHARDS else q(a) for a in argv)
    secret = secret_note(spec.overrides)

    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in _directives(config, spec, log_dir))]
    what = (f"stage {spec.stage} (whole-run) over input shards {format_shard_spec(spec.shards) or 'its default'} in one job"
            if spec.whole_run else
            f"stage {spec.stage},\n# shards {format_shard_spec(spec.shards)} in {spec.tasks} array task(s)")
    lines += [
        f"# Rendered by caprl-pipeline {code_version()} at {now_iso()}: {what}. Resubmit with: sbatch <this file>",
        *(f"# note: {note}" for note in spec.notes),
        *([f"# {secret},", "# which sbatch takes from the environment it was called in: "
           "export it before resubmitting this file"] if secret else []),
        "set -uo pipefail",
        "export PYTHONUNBUFFERED=1",
        "",
        "# python runs as a child so this shell can forward SLURM's signals to it (and requeue afterwards):",
        "# SIGTERM (scancel, preemption) or SIGUSR1 (time limit near) -> the current unit aborts cleanly, exit 75.",
        "GOT_USR1=0",
        "GOT_SIGNAL=0",
        "CHILD=",
        'trap \'GOT_USR1=1; GOT_SIGNAL=1; [ -n "$CHILD" ] && kill -USR1 "$CHILD" 2>/dev/null\' USR1',
        'trap \'GOT_SIGNAL=1; [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null\' TERM',
        "",
        "# --- environment set-up (slurm.setup in the manifest)",
        *sc.setup,
        "",
        f"PYTHON={q(task_python(config))}",
    ]
    if spec.whole_run:
        lines += [
            'TASK=0',
            f'echo "[$(date -u +%FT%TZ)] job ${{SLURM_JOB_ID:-?}} on $(hostname): stage {spec.stage} (whole-run)"',
        ]
    else:
        lines += [
            f"SHARDS={q(format_shard_spec(spec.shards))}",
            f"NUM_TASKS={spec.tasks}",
            'TASK="${SLURM_ARRAY_TASK_ID:?this script is a SLURM array job: submit it with sbatch}"',
            'MY_SHARDS=$("$PYTHON" -m pipeline.executors.slurm slice "$SHARDS" "$NUM_TASKS" "$TASK") || exit 2',
            'if [ -z "$MY_SHARDS" ]; then echo "task $TASK: no shards"; exit 0; fi',
            f'echo "[$(date -u +%FT%TZ)] task $TASK/$NUM_TASKS job ${{SLURM_JOB_ID:-?}} on $(hostname): '
            f'stage {spec.stage} shards $MY_SHARDS"',
        ]
    lines += [
        "",
        f'if [ "$GOT_SIGNAL" -eq 1 ]; then echo "stopped before starting"; RC={EXIT_PREEMPTED}; else',
        f'"$PYTHON" {run_line} &',
        "CHILD=$!",
        'while true; do wait "$CHILD"; RC=$?; kill -0 "$CHILD" 2>/dev/null || break; done',
        "fi",
        'echo "[$(date -u +%FT%TZ)] task $TASK exit code $RC"',
    ]
    if spec.requeue:
        lines += [
            f'if [ "$RC" -eq {EXIT_PREEMPTED} ] && [ "$GOT_USR1" -eq 1 ]; then',
            *(['  echo "time limit near: requeueing $SLURM_JOB_ID"', '  scontrol requeue "$SLURM_JOB_ID"']
              if spec.whole_run else
              ['  echo "time limit near: requeueing ${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_${TASK}"',
               '  scontrol requeue "${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_${TASK}"']),
            "fi",
        ]
    lines.append('exit "$RC"')
    return "\n".join(lines) + "\n"


def max_array_size() -> int | None:
    """The cluster's MaxArraySize (`scontrol show config`): an array's task ids must stay below it. None when
    scontrol is missing or does not say."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return None
    try:
        out = subprocess.run([scontrol, "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize" and value.strip().isdigit():
            return int(value.strip())
    return None


def fit_array(spec: JobSpec, limit: int | None) -> str | None:
    """Fold more shards into each task when `spec.tasks` exceeds the cluster's MaxArraySize (task ids run from 0
    to tasks - 1 < MaxArraySize); returns the note saying so, or None. Folding keeps one job id, so chains
    (`afterok`) and `retry` see one array; each task's time limit now covers more shards."""
    if spec.whole_run or limit is None or spec.tasks <= limit:
        return None
    asked = spec.tasks
    spec.tasks = limit
    per = -(-len(spec.shards) // limit)
    return (f"--tasks {asked} exceeds the cluster's MaxArraySize {limit}: folded into {limit} array tasks of up to "
            f"{per} shard(s) each (raise --time if a task's shards need longer)")


def squeue_states() -> dict[str, str] | None:
    """Array (or plain) job id -> PENDING or RUNNING for every job SLURM still holds; None when squeue is missing
    or fails. A job with some tasks running is RUNNING."""
    lines = squeue("%F %T")
    if lines is None:
        return None
    states: dict[str, str] = {}
    for line in lines:
        job, _, state = line.strip().partition(" ")
        if job:
            mapped = "PENDING" if state.strip().upper() in _PENDING else "RUNNING"
            states[job] = "RUNNING" if "RUNNING" in (mapped, states.get(job)) else mapped
    return states


class SlurmExecutor:
    """Stages as SLURM job arrays through sbatch (see the module docstring)."""

    name = NAME
    label = "SLURM"
    spec_type = SlurmSpec

    def __init__(self, config: RunConfig, address: str | None = None):
        if address:
            raise SlurmError("--address names a Ray cluster; SLURM jobs go to the cluster of the machine that runs "
                             "submit (sbatch)")
        self.config = config
        self.storage = Storage(config.root, config.storage_options, config.work_dir)

    def stage_resources(self, needs: Resources, stage: str) -> dict[str, Any]:
        """The stage's declared GPUs and CPUs; nothing for what SLURM gives by default (no GPU, one CPU)."""
        return {k: v for k, v in {"gpus": needs.gpus or None, "cpus": needs.cpus if needs.cpus > 1 else None}.items()
                if v is not None}

    def fit(self, spec: JobSpec) -> list[str]:
        note = fit_array(spec, max_array_size())
        spec.notes.extend([note] if note else [])
        return [note] if note else []

    def _chained(self, spec: JobSpec, after: JobRef | None) -> SlurmSpec:
        if not isinstance(spec, SlurmSpec):
            spec = SlurmSpec(**asdict(spec))
        return replace(spec, dependency=f"afterok:{after.job_id}") if after is not None else spec

    def _name(self, spec: JobSpec) -> str:
        """The folder of one submission under logs/: <stage>-<UTC time>."""
        return f"{spec.stage}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}"

    def plan(self, spec: JobSpec, after: JobRef | None = None) -> str:
        """The sbatch script `submit` would send; nothing is written."""
        log_dir = f"{log_dir_for(self.config, self.storage)}/{self._name(spec)}"
        return render_script(self.config, self._chained(spec, after), self.storage, log_dir)

    def submit(self, spec: JobSpec, after: JobRef | None = None) -> JobRef:
        """Save the script under ROOT/logs/<submission>/, run sbatch, record the job id. Secret overrides go to
        sbatch's environment, never into the script or the record; a refused submission leaves no script."""
        spec = self._chained(spec, after)
        storage = self.storage
        name = self._name(spec)
        log_dir = f"{log_dir_for(self.config, storage)}/{name}"
        script = render_script(self.config, spec, storage, log_dir)
        sbatch = shutil.which("sbatch")
        if sbatch is None:
            raise SlurmError("sbatch not found on PATH: submit from a SLURM login node, or use --dry-run to see the script")
        storage.check_reachable()
        rel = f"{LOGS_DIR}/{name}/{SCRIPT_NAME}"
        storage.write_bytes(rel, script.encode())
        os.makedirs(log_dir, exist_ok=True)
        if storage.is_local:
            local = storage.path(rel)
        else:
            local = os.path.join(log_dir, SCRIPT_NAME)
            Path(local).write_text(script)
        env = {**os.environ, **secret_env(spec.overrides)}
        try:
            proc = subprocess.run([sbatch, "--parsable", local], capture_output=True, text=True, timeout=120, env=env)
            if proc.returncode != 0:
                msg = (proc.stderr or proc.stdout).strip().splitlines()
                raise SlurmError(f"sbatch refused {local}: {msg[-1] if msg else f'exit code {proc.returncode}'}")
        except BaseException:
            _remove_quietly(storage, rel, None if storage.is_local else local)
            raise
        job_id = proc.stdout.strip().split(";")[0]
        recorded = {k: v for k, v in asdict(spec).items() if k not in ("shards", "notes")}
        recorded["overrides"] = [redact_override(o) for o in spec.overrides]
        record = {"executor": NAME, "stage": spec.stage, "shard_spec": format_shard_spec(spec.shards),
                  "tasks": spec.tasks, "script_url": storage.url(rel), "local_script": local, "log_dir": log_dir,
                  "job_id": job_id, "submitted_at": now_iso(), "spec": recorded, "notes": list(spec.notes)}
        record_rel = f"{LOGS_DIR}/{name}/{RECORD_NAME}"
        storage.write_json(record_rel, record)
        what = (f"stage {spec.stage} (whole-run, one job), input shards {record['shard_spec'] or 'default'}"
                if spec.whole_run else f"stage {spec.stage}, shards {record['shard_spec']} in {spec.tasks} task(s)")
        log_name = f"{spec.stage}-{job_id}.log" if spec.whole_run else f"{spec.stage}-{job_id}_<task>.log"
        lines = (f"submitted job {job_id}: {what}" + (f", after {spec.dependency}" if spec.dependency else ""),
                 f"script: {storage.url(rel)}", f"logs:   {log_dir}/{log_name}")
        return JobRef(NAME, job_id, spec.stage, storage.url(record_rel),
                      {"script_url": storage.url(rel), "log_dir": log_dir}, lines)

    def live_jobs(self) -> set[str] | None:
        """Ids of the arrays and jobs SLURM still has pending or running; None when squeue cannot be asked."""
        states = squeue_states()
        return None if states is None else set(states)

    def job_states(self) -> dict[str, str] | None:
        """Pending or running jobs -> PENDING / RUNNING (squeue forgets finished jobs: they are absent)."""
        return squeue_states()


def _remove_quietly(storage: Storage, rel: str, local: str | None) -> None:
    """Remove a refused submission's script and its folders, when empty (a failure to remove must not hide
    sbatch's error)."""
    try:
        storage.remove(rel)
    except Exception:  # noqa: BLE001
        pass
    folders = [os.path.dirname(local)] if local else []
    if local:
        Path(local).unlink(missing_ok=True)
    if storage.is_local:
        folders.append(os.path.dirname(storage.path(rel)))
    for folder in folders:
        try:
            os.rmdir(folder)  # only when empty: a task log or another file stays
        except OSError:
            pass


def _main(argv: list[str]) -> int:
    """`python -m pipeline.executors.slurm slice SPEC NUM_TASKS TASK`: print the shard spec array task TASK runs."""
    if len(argv) != 4 or argv[0] != "slice":
        print("usage: python -m pipeline.executors.slurm slice SHARD_SPEC NUM_TASKS TASK", file=sys.stderr)
        return 2
    shards = parse_shard_spec(argv[1])
    print(format_shard_spec(slice_for_task(shards, int(argv[2]), int(argv[3]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
