"""The Ray executor: one Ray task per shard group, driven by a Ray job submitted through the job API.

`submit` sends a small plan (the stage, its shards, the task count, resources) as a Ray job whose entrypoint is
`python -m pipeline.executors.ray drive`; it returns at once, so the submitting laptop may disconnect. The
driver runs on the cluster: it waits for the job it comes `after` (a chain), then starts one task per shard group
(`pipeline.executors.base.shard_groups`, the slices SLURM array tasks get) with the stage's resources as
`num_cpus` / `num_gpus` / `memory`, at most `parallel` at once. Each task runs `python -m pipeline run` over its
group in a child process that dies with its worker, so claims, commits and failure records stay the runner's.
Ray reruns a task whose worker or node died (`max_retries`); the rerun takes over the claims its earlier attempt
left (same task id) and skips what that attempt committed. A copy of the plan and the submission record are
written under ROOT/logs; the driver adds a log of every task's output there when the job ends.

This module is the only one that imports ray (an optional extra: `pip install -e '.[ray]'`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from pipeline.config import RunConfig, load_config
from pipeline.errors import ExecutorError
from pipeline.executors.base import (
    JobRef,
    JobSpec,
    memory_bytes,
    run_argv,
    secret_env,
    secret_note,
    shard_groups,
    shell_line,
    task_env,
)
from pipeline.executors.records import SUBMISSION_SUFFIX
from pipeline.runner import EXIT_PREEMPTED
from pipeline.shards import format_shard_spec, parse_shard_spec
from pipeline.storage import LOGS_DIR, Storage, code_version, now_iso

if TYPE_CHECKING:
    from pipeline.stage import Resources

NAME = "ray"
PLAN_ENV = "PIPELINE_RAY_PLAN"
"""The job's plan travels to its driver in this environment variable (a copy is written under ROOT/logs)."""
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
LIVE_STATES = {"PENDING", "RUNNING"}
DONE_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}
_SECRET_SET = re.compile(r"^(storage_options|ray\.env)\.", re.IGNORECASE)
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "0.0.0.0", socket.gethostname()}


class TaskStopped(Exception):
    """A task's `run` stopped on a signal (exit 75) before finishing its group: Ray reruns it."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ExecutorError("the Ray executor needs ray: pip install -e '.[ray]' (or bash tools/setup_ray.sh)") from None
    return ray


def _job_client(address: str) -> Any:
    _ray()
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise ExecutorError("Ray's job API needs ray[default]: pip install -e '.[ray]'") from None
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, ValueError, RuntimeError alike
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExecutorError(f"cannot reach the Ray job API at {address}: {first[:300]}") from None


def resolve_address(given: str | None, configured: str | None) -> str:
    """--address, else ray.address, else RAY_ADDRESS, else the local head's job API. Ray's own client lets
    RAY_ADDRESS override any address it is given, so a different RAY_ADDRESS next to --address is refused."""
    env = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    chosen = given or configured
    if chosen and env and env != chosen:
        raise ExecutorError(f"RAY_ADDRESS={env} differs from the address given ({chosen}); Ray would use the "
                            "environment's: unset it or pass the same one")
    return chosen or env or DEFAULT_ADDRESS


def is_local(address: str) -> bool:
    """Whether the address names a cluster on this host (its driver can use this interpreter)."""
    host = re.sub(r"^[a-z]+://", "", address).rsplit(":", 1)[0]
    return host in _LOCAL_HOSTS or address == "auto"


class RayExecutor:
    """Stages on a Ray cluster through its job API (see the module docstring)."""

    name = NAME
    label = "Ray"
    spec_type = JobSpec

    def __init__(self, config: RunConfig, address: str | None = None):
        self.config = config
        self.address = resolve_address(address, config.ray.address)
        self.storage = Storage(config.root, config.storage_options, config.work_dir)

    def stage_resources(self, needs: Resources, stage: str) -> dict[str, Any]:
        """The stage's declared CPUs and GPUs, overridden by the manifest's ray.resources.<stage>."""
        out: dict[str, Any] = {"gpus": needs.gpus, "cpus": needs.cpus}
        own = self.config.ray.resources.get(stage)
        if own is not None:
            out.update({k: v for k, v in {"cpus": own.cpus, "gpus": own.gpus, "mem": own.memory}.items()
                        if v is not None})
        return out

    def fit(self, spec: JobSpec) -> list[str]:
        """Ray queues any number of tasks: nothing to fit."""
        return []

    # -- the plan ------------------------------------------------------------------------------------------
    def task_options(self, spec: JobSpec) -> dict[str, Any]:
        """Ray's options for each task of `spec`: resources, retries."""
        options: dict[str, Any] = {"num_cpus": spec.cpus, "num_gpus": spec.gpus,
                                   "max_retries": self.config.ray.max_retries}
        if spec.mem:
            options["memory"] = memory_bytes(spec.mem)
        return options

    def _manifest_path(self, manifest: str | None) -> str | None:
        """The manifest as the cluster sees it: relative to an uploaded working_dir it lies in, else absolute."""
        if not manifest:
            return None
        path = os.path.abspath(manifest)
        wd = self.config.ray.working_dir
        if wd and os.path.commonpath([path, os.path.abspath(wd)]) == os.path.abspath(wd):
            return os.path.relpath(path, os.path.abspath(wd))
        return path

    def _plan(self, spec: JobSpec, job_id: str, after: JobRef | None) -> dict[str, Any]:
        spec.validate()
        fields = {k: v for k, v in asdict(spec).items() if k not in ("shards", "manifest")}
        return {
            "format": 1, "executor": NAME, "job_id": job_id, "stage": spec.stage, "created_at": now_iso(),
            "code_version": code_version(), "root": self.storage.url(),
            "manifest": self._manifest_path(spec.manifest), "shards": format_shard_spec(spec.shards),
            "spec": fields, "after": after.job_id if after else None, "options": self.task_options(spec),
        }

    def plan(self, spec: JobSpec, after: JobRef | None = None) -> str:
        """The plan and the job submission `submit` would send, as text; nothing is written or sent."""
        plan = self._plan(spec, "<job id at submission>", after)
        groups = shard_groups(_spec_of(plan))
        lines = [f"# Ray job at {self.address}: stage {spec.stage}"
                 + (" (whole-run, one task)" if spec.whole_run else f", {len(groups)} task(s)")
                 + (f", after job {after.job_id} succeeded" if after else ""),
                 f"# entrypoint: {shell_line(self._entrypoint())}",
                 f"# runtime_env: {json.dumps(self._runtime_env(None, redacted=True), sort_keys=True)}",
                 f"# each task: {json.dumps(plan['options'], sort_keys=True)}"
                 + (f", at most {spec.parallel} at once" if spec.parallel else "")]
        note = secret_note(spec.overrides)
        if note:
            lines.append(f"# {note} (the plan travels in the job's environment)")
        for i, group in enumerate(groups):
            argv = run_argv(_spec_of(plan), group, plan["root"], plan["manifest"])
            lines.append(f"task {i}: python {shell_line(_redact_argv(argv))}")
        return "\n".join(lines) + "\n"

    def _entrypoint(self) -> list[str]:
        python = self.config.ray.python or (sys.executable if is_local(self.address) else "python")
        return [python, "-m", "pipeline.executors.ray", "drive"]

    def _runtime_env(self, plan: dict[str, Any] | None, redacted: bool = False) -> dict[str, Any]:
        rc = self.config.ray
        env = {"RAY_DEDUP_LOGS": "0",  # each task's shard lines are its own: Ray must not fold them together
               **{k: ("<hidden>" if redacted else v) for k, v in rc.env.items()}}
        if plan is not None:
            env[PLAN_ENV] = json.dumps(plan, sort_keys=True)
        out: dict[str, Any] = {"env_vars": env}
        if rc.working_dir:
            out["working_dir"] = os.path.abspath(rc.working_dir)
            out["excludes"] = list(rc.excludes)
        if rc.pip:
            out["pip"] = list(rc.pip)
        return out

    # -- submission ----------------------------------------------------------------------------------------
    def submit(self, spec: JobSpec, after: JobRef | None = None) -> JobRef:
        """Write the plan under ROOT/logs, submit the job through Ray's job API, record it; return at once."""
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        job_id = re.sub(r"[^a-z0-9_-]", "-", f"{self.config.name}-{spec.stage}-{stamp}".lower())
        plan = self._plan(spec, job_id, after)
        client = _job_client(self.address)
        self.storage.check_reachable()
        rel = f"{LOGS_DIR}/{spec.stage}-{stamp}.ray.json"
        self.storage.write_bytes(rel, json.dumps(_redact_plan(plan), indent=2, sort_keys=True).encode())
        try:
            client.submit_job(entrypoint=shell_line(self._entrypoint()), submission_id=job_id,
                              runtime_env=self._runtime_env(plan), entrypoint_num_cpus=0,
                              metadata={"stage": spec.stage, "root": plan["root"]})
        except Exception as exc:  # noqa: BLE001 - the job API's errors carry the server's reason
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise ExecutorError(f"the Ray job API at {self.address} refused the job: {first[:300]}") from None
        record = {
            "executor": NAME, "stage": spec.stage, "shard_spec": plan["shards"], "tasks": spec.tasks,
            "job_id": job_id, "address": self.address, "script_url": self.storage.url(rel), "local_script": None,
            "log_dir": self.storage.url(LOGS_DIR), "submitted_at": now_iso(), "after": plan["after"],
            "spec": {**plan["spec"], "manifest": spec.manifest, "overrides": _redact_argv(list(spec.overrides))},
        }
        record_rel = f"{LOGS_DIR}/{spec.stage}-{stamp}{SUBMISSION_SUFFIX}"
        self.storage.write_json(record_rel, record)
        groups = "one task" if spec.whole_run else f"shards {plan['shards']} in {spec.tasks} task(s)"
        lines = (f"submitted Ray job {job_id}: stage {spec.stage}, {groups}"
                 + (f", after job {after.job_id}" if after else ""),
                 f"plan:   {self.storage.url(rel)}",
                 f"logs:   ray job logs --address {self.address} --follow {job_id}  "
                 f"(a summary goes to ROOT/logs/{spec.stage}-{job_id}.log when it ends)")
        return JobRef(NAME, job_id, spec.stage, self.storage.url(record_rel),
                      {"plan_url": self.storage.url(rel), "address": self.address}, lines)

    def live_jobs(self) -> set[str] | None:
        """Submission ids of the cluster's pending or running jobs; None when the job API cannot be reached."""
        states = self.job_states()
        return None if states is None else {j for j, state in states.items() if state in LIVE_STATES}

    def job_states(self) -> dict[str, str] | None:
        """Every job the cluster knows -> PENDING / RUNNING / SUCCEEDED / FAILED / STOPPED (one request);
        None when the job API cannot be reached."""
        try:
            jobs = _job_client(self.address).list_jobs()
        except Exception:  # noqa: BLE001 - unknown, not dead
            return None
        return {j.submission_id: _state(j.status) for j in jobs if j.submission_id}


def _state(status: Any) -> str:
    return str(getattr(status, "value", status)).upper()


def _redact_argv(argv: list[str]) -> list[str]:
    """`--set storage_options.key=secret` and alike shown as `<hidden>`: never written to disk."""
    return [re.sub(r"=.*", "=<hidden>", a, flags=re.S) if _SECRET_SET.match(a) else a for a in argv]


def _redact_plan(plan: dict[str, Any]) -> dict[str, Any]:
    spec = dict(plan["spec"])
    spec["overrides"] = _redact_argv(list(spec.get("overrides", [])))
    groups = shard_groups(_spec_of(plan))
    return {**plan, "spec": spec, "groups": [format_shard_spec(g) for g in groups],
            "resubmit": f"python -m pipeline retry --stage {plan['stage']} --executor ray --submit (what is left), or "
                        "ray job submit -- python -m pipeline.executors.ray drive <this file, where the driver can "
                        "read it> (values shown <hidden> must be filled in again)"}


def _spec_of(plan: dict[str, Any]) -> JobSpec:
    shards = parse_shard_spec(plan["shards"]) if plan["shards"] else []
    return JobSpec(shards=shards, manifest=plan.get("manifest"), **plan["spec"])


# -- the driver (runs inside the Ray job) -------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the task's child: be killed when the Ray worker that started it dies (Linux prctl PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_task(argv: list[str], env: dict[str, str], label: str) -> dict[str, Any]:
    """One Ray task: `python -m pipeline run` over its shard group in a child process; its output goes to
    the job's log with `label` in front. Exit 75 (stopped by a signal) raises TaskStopped so Ray reruns it."""
    proc = subprocess.Popen([sys.executable, *argv], env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_die_with_parent)
    tail: deque[str] = deque(maxlen=200)
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"[{label}] {line}", end="", flush=True)
        tail.append(line)
    rc = proc.wait()
    if rc == EXIT_PREEMPTED:
        raise TaskStopped(f"{label}: `run` stopped by a signal before finishing")
    return {"rc": rc, "pid": proc.pid, "host": socket.gethostname(), "tail": "".join(tail)}


def _wait_for(job_id: str, poll_s: float = 2.0) -> str:
    """Inside a job: the final state of the job this one comes after."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient()
    while True:
        state = _state(client.get_job_status(job_id))
        if state in DONE_STATES:
            return state
        time.sleep(poll_s)


def _check_fits(ray: Any, options: dict[str, Any]) -> str | None:
    """Why no live node of the cluster could ever run a task with these options, or None."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    wants = {"CPU": options.get("num_cpus", 1) or 0, "GPU": options.get("num_gpus", 0) or 0,
             "memory": options.get("memory", 0) or 0}
    if any(all(n.get(k, 0) >= v for k, v in wants.items()) for n in nodes):
        return None
    show = {k: (f"{v / 2**30:.1f} GiB" if k == "memory" else f"{v:g}") for k, v in wants.items()}
    for key, want in wants.items():
        have = max((n.get(key, 0) for n in nodes), default=0)
        if want > have:
            have_text = f"{have / 2**30:.1f} GiB" if key == "memory" else f"{have:g}"
            return (f"each task asks for {show[key]} {key} but the largest node of the cluster has {have_text}: "
                    "lower it (--cpus/--gpus/--mem or ray.resources in the manifest)")
    return (f"no single node of the cluster has {', '.join(f'{v} {k}' for k, v in show.items())} at once: lower "
            "them (--cpus/--gpus/--mem or ray.resources in the manifest)")


def _own_submission_id() -> str | None:
    """Inside a Ray job's driver: the job's submission id (Ray passes it in the job config's metadata)."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return None
    return (config.get("metadata") or {}).get("job_submission_id")


def drive(plan: dict[str, Any], out: Any = None) -> int:
    """Run a plan's tasks on the cluster this job belongs to; exit 0 when every task's `run` exited 0."""
    out = out or sys.stdout
    ray = _ray()
    job_id, stage = _own_submission_id() or plan["job_id"], plan["stage"]
    if job_id != plan["job_id"]:
        print(f"job {job_id}: running the plan of job {plan['job_id']} under this job's id", file=out, flush=True)
        plan = {**plan, "job_id": job_id}
    ray.init(log_to_driver=True)
    if plan.get("after"):
        print(f"job {job_id}: waiting for job {plan['after']} to succeed", file=out, flush=True)
        state = _wait_for(plan["after"])
        if state != "SUCCEEDED":
            print(f"job {job_id}: job {plan['after']} ended {state}; stage {stage} not started", file=out, flush=True)
            return 1
    spec = _spec_of(plan)
    groups = shard_groups(spec)
    options = dict(plan["options"])
    why = _check_fits(ray, options)
    if why:
        print(f"error: stage {stage}: {why}", file=out, flush=True)
        return 2
    remote = ray.remote(run_task)
    secrets = secret_env(spec.overrides)
    pending = deque(enumerate(groups))
    running: dict[Any, int] = {}
    results: dict[int, dict[str, Any]] = {}
    print(f"job {job_id}: stage {stage}, {len(groups)} task(s), each {json.dumps(options, sort_keys=True)}",
          file=out, flush=True)
    while pending or running:
        while pending and (spec.parallel is None or len(running) < spec.parallel):
            i, group = pending.popleft()
            argv = run_argv(spec, group, plan["root"], plan["manifest"])
            label = f"{stage} task {i}"
            ref = remote.options(**options, retry_exceptions=[TaskStopped], name=f"{stage}-task-{i}").remote(
                argv, {**task_env(NAME, job_id, i), **secrets}, label)
            running[ref] = i
        done, _ = ray.wait(list(running), num_returns=1)
        for ref in done:
            i = running.pop(ref)
            try:
                results[i] = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a task that failed after its retries
                results[i] = {"rc": None, "error": f"{type(exc).__name__}: {str(exc).strip()[:500]}", "tail": ""}
            r = results[i]
            what = f"exit code {r['rc']}" if r["rc"] is not None else r["error"]
            print(f"job {job_id}: task {i} (shards {format_shard_spec(groups[i]) or 'default'}) {what}",
                  file=out, flush=True)
    failed = sorted(i for i, r in results.items() if r["rc"] != 0)
    _write_log(plan, groups, results)
    print(f"job {job_id}: {len(groups) - len(failed)} of {len(groups)} task(s) succeeded"
          + (f"; failed: {', '.join(map(str, failed))}" if failed else ""), file=out, flush=True)
    return 0 if not failed else 1


def _write_log(plan: dict[str, Any], groups: list[list[int]], results: dict[int, dict[str, Any]]) -> None:
    """ROOT/logs/<stage>-<job id>.log: every task's outcome and the tail of its output."""
    parts = []
    for i, group in enumerate(groups):
        r = results.get(i, {})
        parts.append(f"== task {i} shards {format_shard_spec(group) or 'default'}: "
                     f"{'exit code ' + str(r.get('rc')) if r.get('rc') is not None else r.get('error', '?')}\n"
                     f"{r.get('tail', '')}")
    try:
        config = load_config(plan.get("manifest"), list(plan["spec"].get("overrides", [])), root=plan["root"])
        storage = Storage(config.root, config.storage_options, config.work_dir)
        storage.write_bytes(f"{LOGS_DIR}/{plan['stage']}-{plan['job_id']}.log", "\n".join(parts).encode())
    except Exception as exc:  # noqa: BLE001 - the log is a convenience; the job's outcome stands
        print(f"could not write the job log under {plan['root']}/{LOGS_DIR}: {exc}", file=sys.stderr)


def _main(argv: list[str]) -> int:
    """`python -m pipeline.executors.ray drive [PLAN.json]`: the driver of a submitted job."""
    if not argv or argv[0] != "drive" or len(argv) > 2:
        print("usage: python -m pipeline.executors.ray drive [PLAN.json]  (else the plan is in $PIPELINE_RAY_PLAN)",
              file=sys.stderr)
        return 2
    text = open(argv[1]).read() if len(argv) == 2 else os.environ.get(PLAN_ENV)
    if not text:
        print(f"error: no plan: give a file or set {PLAN_ENV}", file=sys.stderr)
        return 2
    return drive(json.loads(text))


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
