"""SLURM job arrays: render and submit sbatch scripts, remember submissions, list shards left to retry.

Array task i of N runs `pipeline.shards.slice_for_task(shards, N, i)` through `python -m pipeline run`.
The batch shell runs python as a child and forwards SIGTERM/SIGUSR1 to it, so a preempted or
time-limited task aborts its current shard cleanly (no marker, staging removed) and exits 75; with
`--requeue` a task stopped by the time-limit warning (USR1) puts itself back in the queue. Committed
shards are skipped by every rerun, so a requeued or retried task only does what is left.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.claims import squeue_job_ids
from pipeline.config import RunConfig
from pipeline.errors import PipelineError, SlurmError
from pipeline.markers import read_blobs
from pipeline.redact import is_secret_override, redact_override, redact_url
from pipeline.runner import EXIT_PREEMPTED, check_shard_range
from pipeline.shards import format_shard_spec, parse_shard_spec, slice_for_task
from pipeline.storage import LOGS_DIR, Storage, code_version, now_iso

_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
SUBMISSION_SUFFIX = ".submit.json"
"""Submission records of earlier versions: logs/<stage>-<time>.submit.json (still read)."""
SCRIPT_NAME = "job.sbatch"
RECORD_NAME = "submission.json"
"""Each submission's folder logs/<stage>-<time>/ holds job.sbatch, submission.json and <stage>-<job>_<task>.log."""
SECRET_SETTINGS_ENV = "PIPELINE_SECRET_SETTINGS"
"""The environment variable that carries secret `--set` overrides from `submit` to its tasks (a JSON list of
key=value items): sbatch passes the submitting environment on, so secrets never enter the script or ROOT/logs."""


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


@dataclass
class SubmitSpec:
    """What one array submission runs and with which resources."""

    stage: str
    shards: list[int]
    tasks: int
    parallel: int | None = None
    gpus: int = 0
    cpus: int | None = None
    mem: str | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    requeue: bool = False
    failed_only: bool = False
    manifest: str | None = None
    overrides: list[str] = field(default_factory=list)
    whole_run: bool = False
    """One job (not an array) running the stage once over `shards` (its input shards; [] = the stage's default)."""
    dependency: str | None = None
    """sbatch --dependency, e.g. 'afterok:1234' (chains: qa array -> train job -> annotate array)."""
    launcher: str | None = None
    """The stage's declared launcher: 'accelerate' starts a whole-run unit on all `gpus` with accelerate launch."""

    def validate(self) -> None:
        """Raise SlurmError with one line for a value sbatch would refuse later (or silently misread)."""
        if self.whole_run:
            self.tasks = 1
        elif not self.shards:
            raise SlurmError(f"nothing to submit for stage {self.stage!r}: the shard list is empty")
        if self.tasks < 1:
            raise SlurmError(f"--tasks must be at least 1, got {self.tasks}")
        if self.parallel is not None and self.parallel < 1:
            raise SlurmError(f"--parallel must be at least 1, got {self.parallel}")
        if self.gpus < 0 or (self.cpus is not None and self.cpus < 1):
            raise SlurmError("--gpus must be >= 0 and --cpus >= 1")
        if self.mem is not None and not _MEM_RE.match(self.mem):
            raise SlurmError(f"bad --mem {self.mem!r}: expected e.g. 64G, 500M or 16000")
        if self.time is not None and not _TIME_RE.match(self.time):
            raise SlurmError(f"bad --time {self.time!r}: expected e.g. 04:00:00, 90, 1-12:00:00")
        if self.tasks > len(self.shards) and not self.whole_run:
            self.tasks = len(self.shards)  # a task without shards would only cost a scheduler slot


@dataclass
class Submission:
    """A rendered (and maybe submitted) array job, recorded under ROOT/logs."""

    stage: str
    shard_spec: str
    tasks: int
    script: str
    script_url: str
    local_script: str | None
    log_dir: str
    job_id: str | None = None
    submitted_at: str = field(default_factory=now_iso)
    spec: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """What submit changed and why (e.g. tasks folded to the cluster's MaxArraySize)."""


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


def launch_args(spec: SubmitSpec) -> list[str]:
    """What goes between the interpreter and `-m pipeline`: accelerate's launcher for a whole-run unit of a stage
    that declares it, given more than one GPU (one process per GPU; rank 0 claims and commits)."""
    if not (spec.whole_run and spec.launcher == "accelerate" and spec.gpus > 1):
        return []
    return ["-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={spec.gpus}", "--num_machines=1",
            "--mixed_precision=no", "--dynamo_backend=no"]


def render_script(config: RunConfig, spec: SubmitSpec, storage: Storage, log_dir: str) -> str:
    """The sbatch script of an array over `spec.shards` in `spec.tasks` tasks."""
    spec.validate()
    q = shlex.quote
    sc = config.slurm
    if spec.time and sc.signal_s * 2 > time_limit_seconds(spec.time):
        raise SlurmError(f"slurm.signal_s={sc.signal_s} (the stop warning before the time limit) leaves too "
                         f"little of --time {spec.time} to work: lower slurm.signal_s or raise --time")
    array = f"0-{spec.tasks - 1}" + (f"%{spec.parallel}" if spec.parallel else "")
    job_name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{config.name}-{spec.stage}")
    directives = [f"--job-name={job_name}"]
    if spec.whole_run:
        directives += ["--nodes=1", f"--output={log_dir}/{spec.stage}-%j.log"]
    else:
        directives += [f"--array={array}", f"--output={log_dir}/{spec.stage}-%A_%a.log"]
    if spec.dependency:
        directives.append(f"--dependency={spec.dependency}")
        directives.append("--kill-on-invalid-dep=yes")
    directives += [
        "--open-mode=append",  # a requeued task adds to its log instead of truncating it
        f"--chdir={os.path.abspath(sc.workdir or os.getcwd())}",
        f"--signal=B:USR1@{sc.signal_s}",
        "--requeue" if spec.requeue else "--no-requeue",
        "--ntasks=1",
    ]
    if spec.cpus:
        directives.append(f"--cpus-per-task={spec.cpus}")
    if spec.gpus:
        directives.append(f"--gres=gpu:{spec.gpus}")
    if spec.mem:
        directives.append(f"--mem={spec.mem}")
    if spec.time:
        directives.append(f"--time={spec.time}")
    partition = spec.partition or sc.partition
    account = spec.account or sc.account
    if partition:
        directives.append(f"--partition={partition}")
    if account:
        directives.append(f"--account={account}")
    directives.extend(opt.strip() for opt in sc.extra_sbatch if opt.strip())

    shard_args = (["--shards", q(format_shard_spec(spec.shards))] if spec.shards else []) if spec.whole_run \
        else ["--shards", '"$MY_SHARDS"']
    run_args = ["-m", "pipeline", "run", "--stage", spec.stage, *shard_args, "--no-progress", "--root", q(storage.url())]
    if spec.manifest:
        run_args += ["--manifest", q(os.path.abspath(spec.manifest))]
    public, secret = split_overrides(spec.overrides)
    for item in public:
        run_args += ["--set", q(item)]
    if spec.failed_only:
        run_args.append("--failed-only")

    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {d}" for d in directives]
    what = (f"stage {spec.stage} (whole-run) over input shards {format_shard_spec(spec.shards) or 'its default'} in one job"
            if spec.whole_run else
            f"stage {spec.stage},\n# shards {format_shard_spec(spec.shards)} in {spec.tasks} array task(s)")
    lines += [
        f"# Rendered by caprl-pipeline {code_version()} at {now_iso()}: {what}. Resubmit with: sbatch <this file>",
        *([f"# {len(secret)} secret setting(s) ({', '.join(sorted(i.partition('=')[0] for i in secret))}) reach the "
           f"task through ${SECRET_SETTINGS_ENV},", "# which sbatch takes from the environment it was called in: "
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
            'MY_SHARDS=$("$PYTHON" -m pipeline.slurm slice "$SHARDS" "$NUM_TASKS" "$TASK") || exit 2',
            'if [ -z "$MY_SHARDS" ]; then echo "task $TASK: no shards"; exit 0; fi',
            f'echo "[$(date -u +%FT%TZ)] task $TASK/$NUM_TASKS job ${{SLURM_JOB_ID:-?}} on $(hostname): '
            f'stage {spec.stage} shards $MY_SHARDS"',
        ]
    lines += [
        "",
        f'if [ "$GOT_SIGNAL" -eq 1 ]; then echo "stopped before starting"; RC={EXIT_PREEMPTED}; else',
        '"$PYTHON" ' + " ".join(launch_args(spec) + run_args) + " &",
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


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(public, secret) `--set` items: secret ones (see pipeline.redact) travel in SECRET_SETTINGS_ENV only."""
    public = [o for o in overrides if not is_secret_override(o)]
    return public, [o for o in overrides if is_secret_override(o)]


def check_against_run(config: RunConfig, spec: SubmitSpec, storage: Storage) -> None:
    """Refuse, before anything is rendered, what the tasks' `run` would refuse: another shard_size than run.json
    records, or shards beyond the run's input."""
    from pipeline.stage import load_stage

    if redact_url(storage.url()) != storage.url():
        raise SlurmError(f"the root {redact_url(storage.url())} carries credentials in its URL, which would be "
                         "written into the script: give them in storage_options or the environment instead")
    try:
        meta = storage.run_meta() or {}
    except Exception:  # noqa: BLE001 - an unreadable root is reported by check_reachable when submitting
        return
    recorded = meta.get("shard_size")
    if recorded is not None and recorded != config.shard_size:
        raise SlurmError(f"refusing to submit: shard_size is {config.shard_size} but {storage.url('run.json')} "
                         f"records {recorded}; every task would refuse to run. Use a new --root, or restore the "
                         "original setting.")
    if spec.shards and not spec.whole_run:
        try:
            check_shard_range(load_stage(spec.stage, config), config, storage, spec.shards)
        except PipelineError as exc:
            raise SlurmError(f"refusing to submit: {exc}") from None


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


def fit_array(spec: SubmitSpec, limit: int | None) -> str | None:
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


def submission_name(spec: SubmitSpec) -> str:
    """The folder of one submission under logs/: <stage>-<UTC time>."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{spec.stage}-{stamp}"


def submit(config: RunConfig, spec: SubmitSpec, *, dry_run: bool = False) -> Submission:
    """Render the script; unless dry_run, save it under ROOT/logs/<submission>/, run sbatch and record the job id.
    Each submission has its own folder (script, record, one log per task), so logs/ stays small at 10,000 tasks.
    Secret overrides go to sbatch's environment, never into the script or the record; a refused submission
    leaves no script behind."""
    storage = Storage(config.root, config.storage_options, config.work_dir)
    name = submission_name(spec)
    log_dir = f"{log_dir_for(config, storage)}/{name}"
    check_against_run(config, spec, storage)
    note = fit_array(spec, max_array_size())
    script = render_script(config, spec, storage, log_dir)
    rel = f"{LOGS_DIR}/{name}/{SCRIPT_NAME}"
    recorded = {k: v for k, v in asdict(spec).items() if k != "shards"}
    recorded["overrides"] = [redact_override(o) for o in spec.overrides]
    sub = Submission(
        stage=spec.stage, shard_spec=format_shard_spec(spec.shards), tasks=spec.tasks, script=script,
        script_url=storage.url(rel), local_script=None, log_dir=log_dir, spec=recorded, notes=[note] if note else [],
    )
    if dry_run:
        return sub
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmError("sbatch not found on PATH: submit from a SLURM login node, or use --dry-run to see the script")
    storage.check_reachable()
    storage.write_bytes(rel, script.encode())
    os.makedirs(log_dir, exist_ok=True)
    if storage.is_local:
        local = storage.path(rel)
    else:
        local = os.path.join(log_dir, SCRIPT_NAME)
        Path(local).write_text(script)
    sub.local_script = local
    env = dict(os.environ)
    secret = split_overrides(spec.overrides)[1]
    if secret:
        env[SECRET_SETTINGS_ENV] = json.dumps(secret)
    try:
        proc = subprocess.run([sbatch, "--parsable", local], capture_output=True, text=True, timeout=120, env=env)
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise SlurmError(f"sbatch refused {local}: {msg[-1] if msg else f'exit code {proc.returncode}'}")
    except BaseException:
        _remove_quietly(storage, rel, None if storage.is_local else local)
        raise
    sub.job_id = proc.stdout.strip().split(";")[0]
    record = {k: v for k, v in asdict(sub).items() if k != "script"}
    storage.write_json(f"{LOGS_DIR}/{name}/{RECORD_NAME}", record)
    return sub


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


def submissions(storage: Storage, stage: str | None = None) -> list[dict[str, Any]]:
    """Recorded submissions under ROOT/logs (oldest first), optionally of one stage: one listing of logs/, then
    the records read concurrently (a folder per submission; flat *.submit.json files of earlier versions)."""
    logs = storage.path(LOGS_DIR)
    storage.fs.invalidate_cache(logs)
    try:
        entries = storage.fs.ls(logs, detail=True)
    except FileNotFoundError:
        return []
    paths = []
    for info in entries:
        path = str(info["name"]).rstrip("/")
        base = path.rsplit("/", 1)[-1]
        if stage is not None and not base.startswith(f"{stage}-"):
            continue
        if info.get("type") == "directory":
            paths.append(f"{path}/{RECORD_NAME}")
        elif base.endswith(SUBMISSION_SUFFIX):
            paths.append(path)
    records = []
    for blob in read_blobs(storage.fs, paths).values():
        try:
            record = json.loads(blob) if blob is not None else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and (stage is None or record.get("stage") == stage):
            records.append(record)
    return sorted(records, key=lambda r: r.get("submitted_at", ""))


def last_submission(config: RunConfig, stage: str) -> dict[str, Any] | None:
    """The newest submission record of `stage` under ROOT/logs, or None."""
    storage = Storage(config.root, config.storage_options, config.work_dir)
    records = submissions(storage, stage)
    return records[-1] if records else None


def active_submissions(config: RunConfig, stage: str) -> list[str]:
    """Job ids of this stage's recorded submissions that SLURM still has queued or running."""
    storage = Storage(config.root, config.storage_options, config.work_dir)
    ids = [str(r["job_id"]) for r in submissions(storage, stage) if r.get("job_id")]
    if not ids:
        return []
    queued = squeue_job_ids()
    if queued is None:
        return []
    arrays = {q.split("_", 1)[0] for q in queued}
    return [i for i in ids if i in arrays]


def _main(argv: list[str]) -> int:
    """`python -m pipeline.slurm slice SPEC NUM_TASKS TASK`: print the shard spec array task TASK runs."""
    if len(argv) != 4 or argv[0] != "slice":
        print("usage: python -m pipeline.slurm slice SHARD_SPEC NUM_TASKS TASK", file=sys.stderr)
        return 2
    shards = parse_shard_spec(argv[1])
    print(format_shard_spec(slice_for_task(shards, int(argv[2]), int(argv[3]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
