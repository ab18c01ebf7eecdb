"""The executor interface without a cluster: shard groups, resources from declarations and the manifest's
`ray:` section, the dry-run plan, secrets kept out of it, task identity in claims and how claims of an
executor's tasks are judged."""

from __future__ import annotations

import os
import socket

import pytest

from pipeline.claims import judge
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ExecutorError
from pipeline.executors.base import JobSpec, memory_bytes, shard_groups, task_env
from pipeline.executors.ray import RayExecutor, resolve_address
from pipeline.shards import slice_for_task
from pipeline.storage import task_identity


def test_shard_groups_are_the_slurm_array_slices():
    shards = list(range(10))
    spec = JobSpec(stage="annotate", shards=shards, tasks=3)
    assert shard_groups(spec) == [slice_for_task(shards, 3, i) for i in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert shard_groups(JobSpec(stage="annotate", shards=[1, 2], tasks=5)) == [[1], [2]]  # capped at the shards
    assert shard_groups(JobSpec(stage="train", shards=[], tasks=4, whole_run=True)) == [[]]
    with pytest.raises(ExecutorError, match="shard list is empty"):
        shard_groups(JobSpec(stage="annotate", shards=[]))


@pytest.mark.parametrize(("text", "expected"), [("64G", 64 << 30), ("500m", 500 << 20), ("16000", 16000 << 20),
                                                ("1T", 1 << 40)])
def test_memory_in_slurm_notation(text, expected):
    assert memory_bytes(text) == expected


def test_bad_memory_is_one_line():
    with pytest.raises(ExecutorError, match="bad --mem '12 GB'"):
        JobSpec(stage="qa", shards=[0], mem="12 GB").validate()


def test_dry_run_plan_maps_resources_and_hides_secrets(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    manifest = tmp_path / "m.yaml"
    manifest.write_text("ray:\n  env: {HF_TOKEN: secret-token}\n  resources:\n    annotate: {gpus: 0.5, memory: 4G}\n")
    code = main(["submit", "--executor", "ray", "--address", "http://head:8265", "--stage", "download,annotate",
                 "--shards", "0-9", "--tasks", "3", "--parallel", "2", "--manifest", str(manifest), "--root",
                 str(tmp_path / "root"), "--set", "storage_options.secret=hunter2", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    download, annotate = out.split("# ---- annotate")
    assert '"num_cpus": 1, "num_gpus": 0' in download  # the declaration (download: 1 CPU, no GPU)
    assert '"memory": 4294967296' in annotate and '"num_gpus": 0.5' in annotate  # ray.resources.annotate
    assert "after job <job id of download> succeeded" in annotate and "at most 2 at once" in annotate
    assert "task 2: python -m pipeline run --stage annotate --shards 7-9 --no-progress" in annotate
    assert "hunter2" not in out and "secret-token" not in out and "storage_options.secret='=<hidden>'" not in out
    assert "--set storage_options.secret" not in out  # secret settings travel in the task's environment
    assert "1 secret setting(s) (storage_options.secret) reach each task through $PIPELINE_SECRET_SETTINGS" in out
    assert not (tmp_path / "root").exists()  # nothing written


def test_command_line_resources_win_and_slurm_only_options_are_refused(tmp_path, capsys):
    args = ["submit", "--executor", "ray", "--stage", "annotate", "--shards", "0-3", "--root", str(tmp_path),
            "--address", "http://h:8265", "--dry-run"]
    assert main([*args, "--gpus", "0", "--cpus", "3", "--mem", "2G"]) == 0
    assert '"memory": 2147483648, "num_cpus": 3, "num_gpus": 0' in capsys.readouterr().out
    assert main([*args, "--time", "1:00:00", "--partition", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --time, --partition: SLURM only; the ray executor has no such setting (Ray reruns a "
                   "task whose worker died: ray.max_retries)")


def test_manifest_path_relative_to_an_uploaded_working_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "manifests").mkdir()
    manifest = tmp_path / "manifests" / "run.yaml"
    manifest.write_text("name: x\n")
    config = load_config(manifest, [f"ray.working_dir={tmp_path}"], root=str(tmp_path / "root"))
    plan = RayExecutor(config).plan(JobSpec(stage="qa", shards=[0], manifest=str(manifest)))
    assert "--manifest manifests/run.yaml" in plan and '"working_dir": "' + str(tmp_path) in plan


def test_address_precedence(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert resolve_address(None, None) == "http://127.0.0.1:8265"
    assert resolve_address(None, "http://m:8265") == "http://m:8265"
    assert resolve_address("ray://a:10001", "http://m:8265") == "ray://a:10001"
    monkeypatch.setenv("RAY_ADDRESS", "http://env:8265")
    assert resolve_address(None, None) == "http://env:8265"
    with pytest.raises(ExecutorError, match="RAY_ADDRESS=http://env:8265 differs"):
        resolve_address("http://other:8265", None)


def test_a_task_records_executor_job_and_task_in_its_claims(monkeypatch):
    for var, value in task_env("ray", "job-7", 3).items():
        monkeypatch.setenv(var, value)
    ident = task_identity()
    assert (ident["executor"], ident["job_id"], ident["task"], ident["task_id"]) == ("ray", "job-7", "3", "job-7:3")


def _ray_claim(pid: int, host: str | None = None, task: int = 1) -> dict:
    return {"host": host or socket.gethostname(), "pid": pid, "beat": 0.0, "executor": "ray", "job_id": "job-7",
            "task": str(task), "task_id": f"job-7:{task}"}


def test_judging_claims_of_ray_tasks(monkeypatch):
    monkeypatch.delenv("PIPELINE_TASK_ID", raising=False)
    alive = _ray_claim(os.getpid())
    verdict = judge(alive, None, 600, now=1.0, live={"ray": {"job-7"}})
    assert verdict.live and verdict.reason == f"Ray job job-7 task 1, pid {os.getpid()} on {socket.gethostname()}"
    gone = judge(alive, None, 600, now=1.0, live={"ray": {"other"}})
    assert not gone.live and gone.reason == "Ray job job-7 task 1: the job no longer runs"
    remote = _ray_claim(12345, host="elsewhere")  # unknown job state, another host: the heartbeat decides
    assert judge(remote, None, 600, now=100.0).live and not judge(remote, None, 600, now=1000.0).live
    monkeypatch.setenv("PIPELINE_TASK_ID", "job-7:1")  # the rerun of task 1: its earlier attempt died
    verdict = judge(remote, None, 600, now=1.0, live={"ray": {"job-7"}})
    assert not verdict.live and "an earlier attempt of this task" in verdict.reason
    assert judge(_ray_claim(12345, host="elsewhere", task=2), None, 600, now=1.0, live={"ray": {"job-7"}}).live


class _FakeRay:
    def __init__(self, *nodes: dict):
        self._nodes = nodes

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "Resources": n} for n in self._nodes] + [{"Alive": False, "Resources": {"GPU": 8}}]


def test_a_task_no_node_can_hold_is_refused_with_its_reason():
    from pipeline.executors.ray import _check_fits

    ray = _FakeRay({"CPU": 2, "memory": 8 << 30}, {"CPU": 16, "GPU": 1})
    assert _check_fits(ray, {"num_cpus": 8, "num_gpus": 1}) is None
    assert _check_fits(ray, {"num_cpus": 1, "num_gpus": 2}) == (
        "each task asks for 2 GPU but the largest node of the cluster has 1: lower it (--cpus/--gpus/--mem or "
        "ray.resources in the manifest)")
    assert "asks for 16.0 GiB memory but the largest node of the cluster has 8.0 GiB" in _check_fits(
        ray, {"num_cpus": 1, "memory": 16 << 30})
    assert _check_fits(ray, {"num_cpus": 4, "num_gpus": 0, "memory": 4 << 30}).startswith(
        "no single node of the cluster has 4 CPU, 0 GPU, 4.0 GiB memory at once")


def test_a_whole_run_stage_is_one_task_with_its_launcher(tmp_path, capsys):
    code = main(["submit", "--executor", "ray", "--address", "http://h:8265", "--stage", "train", "--gpus", "4",
                 "--root", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "(whole-run, one task)" in out and '"num_gpus": 4' in out
    assert "task 0: python -m accelerate.commands.launch --multi_gpu --num_processes=4" in out
    assert "-m pipeline run --stage train --no-progress" in out and "task 1" not in out


def test_the_driver_runs_under_its_own_job_id(monkeypatch):
    from pipeline.executors.ray import _own_submission_id

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}, "metadata": {"job_submission_id": "j-2"}}')
    assert _own_submission_id() == "j-2"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")
    assert _own_submission_id() is None


class _FakeCluster:
    """Just enough of ray for `drive`: tasks 'run' when waited for; records what was asked and how many at once."""

    def __init__(self, failing: set[int]):
        self.failing, self.calls, self.in_flight, self.most = failing, [], set(), 0

    def init(self, **_):
        pass

    def nodes(self):
        return [{"Alive": True, "Resources": {"CPU": 4, "memory": 8 << 30}}]

    def remote(self, fn):
        cluster = self

        class _Remote:
            def options(self, **options):
                def submit(argv, env, label):
                    ref = len(cluster.calls)
                    cluster.calls.append((options, argv, env))
                    cluster.in_flight.add(ref)
                    cluster.most = max(cluster.most, len(cluster.in_flight))
                    return ref
                return type("R", (), {"remote": staticmethod(submit)})()
        return _Remote()

    def wait(self, refs, num_returns):
        done = min(refs)
        self.in_flight.discard(done)
        return [done], [r for r in refs if r != done]

    def get(self, ref):
        return {"rc": 1 if ref in self.failing else 0, "tail": f"output of {ref}\n"}


def test_the_driver_caps_tasks_at_once_and_fails_the_job_when_a_task_failed(tmp_path, monkeypatch, capsys):
    import pipeline.executors.ray as ray_executor

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    fake = _FakeCluster(failing={3})
    monkeypatch.setattr(ray_executor, "_ray", lambda: fake)
    config = load_config(None, [], root=str(tmp_path / "root"))
    spec = JobSpec(stage="annotate", shards=list(range(10)), tasks=5, parallel=2, cpus=2, gpus=0, mem="1G")
    plan = RayExecutor(config, "http://h:8265")._plan(spec, "job-9", None)
    assert ray_executor.drive(plan) == 1
    assert fake.most == 2 and len(fake.calls) == 5
    options, argv, env = fake.calls[3]
    assert options["num_cpus"] == 2 and options["memory"] == 1 << 30 and options["name"] == "annotate-task-3"
    assert options["retry_exceptions"] == [ray_executor.TaskStopped] and options["max_retries"] == 3
    assert argv[argv.index("--shards") + 1] == "6-7" and env["PIPELINE_TASK_ID"] == "job-9:3"
    out = capsys.readouterr().out
    assert "job job-9: task 3 (shards 6-7) exit code 1" in out and "4 of 5 task(s) succeeded; failed: 3" in out
    log = (tmp_path / "root" / "logs" / "annotate-job-9.log").read_text()
    assert "== task 3 shards 6-7: exit code 1\noutput of 3" in log


class RecordingExecutor:
    """An executor that records what `submit` asks of it (registered under 'slurm' for the test)."""

    name, label = "slurm", "Fake"
    calls: list[tuple[str, ...]] = []

    def __init__(self, config, address=None):
        from pipeline.executors.slurm import SlurmSpec

        self.spec_type = SlurmSpec

    def stage_resources(self, needs, stage):
        return {"cpus": 3}

    def fit(self, spec):
        spec.tasks = 1
        spec.notes.append("folded into 1 task")
        return ["folded into 1 task"]

    def plan(self, spec, after=None):
        return f"PLAN {spec.stage} after {after.job_id if after else '-'}\n"

    def submit(self, spec, after=None):
        from pipeline.executors.base import JobRef

        RecordingExecutor.calls.append((spec.stage, after.job_id if after else "-", str(spec.tasks), str(spec.cpus),
                                        spec.time or "-"))
        return JobRef(self.name, f"J{len(RecordingExecutor.calls)}", spec.stage, lines=(f"sent {spec.stage}",))

    def live_jobs(self):
        return set()

    def job_states(self):
        return {}


def test_submit_goes_through_the_executor_interface_for_slurm_too(tmp_path, capsys, monkeypatch):
    """`submit` knows executors only by the interface: the default (SLURM) executor replaced by a recorder gets
    the chain in order, each after the previous job, with the stage's resources, its own options (--time) and the
    changes its `fit` made."""
    from pipeline.executors import EXECUTORS

    monkeypatch.setitem(EXECUTORS, "slurm", f"{__name__}:RecordingExecutor")
    RecordingExecutor.calls = []
    argv = ["submit", "--stage", "download,annotate", "--shards", "0-3", "--tasks", "4", "--time", "1:00:00",
            "--root", str(tmp_path / "root")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert RecordingExecutor.calls == [("download", "-", "1", "3", "1:00:00"), ("annotate", "J1", "1", "3", "1:00:00")]
    assert captured.out.splitlines()[:2] == ["sent download", "sent annotate"]
    assert captured.err.count("note: folded into 1 task") == 2
    assert main([*argv, "--dry-run"]) == 0
    assert "PLAN download after -\n" in (out := capsys.readouterr().out) and "PLAN annotate after <job id of download>" in out
