"""Runs that share a root, storage faults and user slips: nothing lost, nothing done twice, one clear line."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import EngineConfig, load_config
from pipeline.runner import run_stage
from pipeline.shards import parse_shard_spec
from pipeline.storage import Storage
from tests.annotate_support import commit_image_shard, scene_rows

REPO = Path(__file__).resolve().parent.parent
SHARDS = [0, 1, 2, 3]


def _manifest(tmp_path: Path, root: str, storage_options: dict | None = None, **synth) -> Path:
    m = tmp_path / f"m{len(list(tmp_path.glob('m*.yaml')))}.yaml"
    m.write_text(yaml.safe_dump({"root": root, "shard_size": 10, "stages": {"synth": "tests.stages_for_tests"},
                                 "storage_options": storage_options or {}, "extra": {"synth": {"rows": 6, **synth}}}))
    return m


def _cli(manifest: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--stage", "synth", "--shards", "0-3",
                             "--manifest", str(manifest), "--no-progress", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, **(env or {})})


def _two_runs_at_once(manifest: Path) -> tuple[str, str]:
    a, b = _cli(manifest, "--force"), _cli(manifest, "--force")
    (out_a, err_a), (out_b, err_b) = a.communicate(timeout=180), b.communicate(timeout=180)
    assert a.returncode == 0 and b.returncode == 0, err_a + err_b
    assert "Traceback" not in err_a + err_b
    return out_a, out_b


def _commits(out: str) -> list[int]:
    return [int(m) for m in re.findall(r"^synth (\d{5}): \d+ rows", out, re.M)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_concurrent_runs_share_the_work(tmp_path, where, request):
    if where == "s3":
        s3 = request.getfixturevalue("s3_server")
        root, options = s3.make_bucket("concurrent-runs") + f"/{tmp_path.name}", s3.storage_options
    else:
        root, options = str(tmp_path / "root"), {}
    manifest = _manifest(tmp_path, root, options, delay=0.05)
    assert run_stage(load_config(manifest), "synth", SHARDS, progress=False, out=io.StringIO()).exit_code == 0
    out_a, out_b = _two_runs_at_once(manifest)
    done = sorted(_commits(out_a) + _commits(out_b))
    assert done == SHARDS, out_a + out_b  # each shard redone once, by one of the two runs
    assert "claimed by" in out_a + out_b or "another run" in out_a + out_b
    storage = Storage(root, options)
    assert sorted(storage.committed("synth")) == SHARDS
    assert storage.unit_claims("synth") == {}
    if where == "local":
        assert not any((Path(root) / "_tmp" / "synth").iterdir())


def test_a_live_claim_is_skipped_and_a_dead_one_taken_over(tmp_path, capsys):
    root = tmp_path / "root"
    manifest = _manifest(tmp_path, str(root))
    storage = Storage(str(root))
    live = storage.acquire("synth", 0)  # this process: alive
    dead = {"host": os.uname().nodename, "pid": 2**22 + 12345, "token": "t", "beat": 0}
    storage.write_json(storage.claim_rel("synth", 1), dead)
    assert main(["run", "--stage", "synth", "--shards", "0-1", "--manifest", str(manifest), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"synth 00000: skipped, claimed by {os.uname().nodename}:{os.getpid()}" in out
    assert sorted(storage.committed("synth")) == [1]
    assert storage.read_json(storage.claim_rel("synth", 0))["token"] == live.token  # never touched
    live.release()
    assert storage.unit_claims("synth") == {}


def test_force_keeps_the_old_marker_until_the_replacement_is_committed(tmp_path):
    root = tmp_path / "root"
    bad = tmp_path / "bad"
    bad.mkdir()
    manifest = _manifest(tmp_path, str(root), bad_input_dir=str(bad))
    cfg = load_config(manifest)
    assert run_stage(cfg, "synth", [0], progress=False, out=io.StringIO()).exit_code == 0
    (bad / "0").touch()
    report = run_stage(cfg, "synth", [0], force=True, progress=False, out=io.StringIO())
    assert report.failed and Storage(str(root)).committed("synth") == {0: Storage(str(root)).marker("synth", 0)}


def _bind_readonly(path: Path) -> None:
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True, capture_output=True)


def _can_mount(tmp_path: Path) -> str | None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "needs root and mount(8)"
    probe = tmp_path / "probe"
    probe.mkdir()
    try:
        _bind_readonly(probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"bind mounts are not allowed here: {exc}"
    subprocess.run(["umount", str(probe)], check=False)
    return None


@pytest.mark.parametrize("which", ["_tmp", "_running", "_failed"])
def test_readonly_storage_folders_fail_shards_not_the_run(tmp_path, capsys, which):
    if reason := _can_mount(tmp_path):
        pytest.skip(reason)
    root = tmp_path / "root"
    manifest = _manifest(tmp_path, str(root))
    (root / which / "synth").mkdir(parents=True)
    _bind_readonly(root / which / "synth")
    try:
        code = main(["run", "--stage", "synth", "--shards", "0-2", "--manifest", str(manifest), "--no-progress"])
    finally:
        subprocess.run(["umount", str(root / which / "synth")], check=False)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    if which == "_failed":
        assert code == 0  # nothing failed: the failure folder is never written
    else:
        assert code == 1
        assert len(re.findall(r"^synth 0000\d: FAILED: .*Read-only file system", out.out, re.M)) == 3, out.out
    if which == "_running":
        assert "could not be recorded" not in out.out  # _failed stays writable


def test_full_disk_fails_shards_with_one_line_and_leaves_no_temp_files(tmp_path, capsys):
    if reason := _can_mount(tmp_path):
        pytest.skip(reason)
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(root)], check=True)
    try:
        manifest = _manifest(tmp_path, str(root), rows=40)
        code = main(["run", "--stage", "synth", "--shards", "0-2", "--manifest", str(manifest), "--no-progress"])
        out = capsys.readouterr()
        assert code == 1 and "Traceback" not in out.out + out.err
        assert "No space left on device" in out.out
        leftovers = [p for p in root.rglob("*") if ".tmp-" in p.name]
        assert leftovers == []
        assert not any(p.is_file() for p in (root / "_tmp").rglob("*"))
    finally:
        subprocess.run(["umount", str(root)], check=False)


def test_unreachable_s3_root_is_one_error_line(tmp_path, s3_server, capsys):
    m = _manifest(tmp_path, "s3://no-such-bucket-here/run", s3_server.storage_options)
    assert main(["run", "--stage", "synth", "--shards", "0", "--manifest", str(m)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: storage root s3://no-such-bucket-here/run") and len(err.strip().splitlines()) == 1


def test_killed_s3_task_leaves_scratch_that_status_shows_and_a_rerun_removes(tmp_path, s3_server, capsys):
    root = s3_server.make_bucket("scratch-leak") + f"/{tmp_path.name}"
    work = tmp_path / "scratch"
    work.mkdir()
    manifest = _manifest(tmp_path, root, s3_server.storage_options)
    cfg = load_config(manifest, [f"work_dir={work}"])
    storage = Storage(root, s3_server.storage_options, str(work))
    orphan = work / f"{storage.scratch_prefix('synth', '00001')}{2**22 + 999}-abc_12"
    orphan.mkdir()
    (orphan / "_input.tar").write_bytes(b"x" * 100)
    assert run_stage(cfg, "synth", [0], progress=False, out=io.StringIO()).exit_code == 0
    print_out = io.StringIO()
    from pipeline.status import print_status

    print_status(cfg, "synth", out=print_out)
    assert "1 local staging folder(s) of killed tasks" in print_out.getvalue()
    assert run_stage(cfg, "synth", [1], progress=False, out=io.StringIO()).exit_code == 0
    assert not orphan.exists() and list(work.iterdir()) == []


def test_rerun_skipping_a_committed_shard_removes_its_dead_scratch(tmp_path, s3_server):
    """A task killed after its commit but before its cleanup leaves local staging of a committed unit."""
    root = s3_server.make_bucket("scratch-after-commit") + f"/{tmp_path.name}"
    work = tmp_path / "scratch"
    work.mkdir()
    cfg = load_config(_manifest(tmp_path, root, s3_server.storage_options), [f"work_dir={work}"])
    storage = Storage(root, s3_server.storage_options, str(work))
    assert run_stage(cfg, "synth", [0], progress=False, out=io.StringIO()).exit_code == 0
    dead = work / f"{storage.scratch_prefix('synth', '00000')}{2**22 + 999}-abc_12"
    live = work / f"{storage.scratch_prefix('synth', '00000')}{os.getpid()}-def_34"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "_input.tar").write_bytes(b"x" * 100)
    report = run_stage(cfg, "synth", [0], progress=False, out=io.StringIO())
    assert report.exit_code == 0 and report.skipped == [0]
    assert not dead.exists() and live.exists()  # a live owner's staging is left alone


def _three_shard_root(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "root"
    storage = Storage(str(root))
    storage.ensure_run_meta({"shard_size": 20, "num_shards": 3})
    for shard in range(3):
        commit_image_shard(storage, shard, scene_rows(2, shard=shard))
    return root, ["--set", "shard_size=20", "--set", "annotate.captioner.backend=noop"]


def test_shard_spec_beyond_the_run_is_refused_up_front(tmp_path, capsys):
    root, sets = _three_shard_root(tmp_path)
    code = main(["run", "--stage", "annotate", "--shards", "0-99999", "--root", str(root), *sets])
    err = capsys.readouterr().err
    assert code == 2 and "shard(s) 3-99999 are beyond the input of stage 'annotate', which has 3 shard(s)" in err and len(err.strip().splitlines()) == 1
    assert not (root / "_failed").exists() and not (root / "_done" / "annotate").exists()


@pytest.mark.parametrize("spec", ["²", "١", "0-²", "３"])
def test_non_ascii_digits_are_not_shard_ids(spec):
    from pipeline.errors import ShardSpecError

    with pytest.raises(ShardSpecError):
        parse_shard_spec(spec)


def test_root_without_a_bucket_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--stage", "annotate", "--shards", "0", "--root", "s3://"]) == 2
    assert "names no bucket" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_model_id_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    from pipeline.engines.base import create_engine
    from pipeline.resources import resolve_model

    ids = []
    for cwd in (REPO, tmp_path):
        monkeypatch.chdir(cwd)
        engine = create_engine(resolve_model(EngineConfig(model="models/nano/nano-reader", device="cpu")))
        ids.append(engine.model_id)
    assert ids[0] == ids[1] and ids[0].startswith("models/nano/nano-reader#sha256:")


def test_verify_finds_a_flipped_byte_and_repair_marks_it_failed_as_status_says(tmp_path, capsys):
    root = tmp_path / "root"
    manifest = _manifest(tmp_path, str(root))
    cfg = load_config(manifest)
    assert run_stage(cfg, "synth", [0, 1], progress=False, out=io.StringIO()).exit_code == 0
    good = (root / "synth" / "00001.parquet").read_bytes()
    blob = bytearray(good)
    blob[len(blob) // 2] ^= 0xFF
    (root / "synth" / "00001.parquet").write_bytes(bytes(blob))
    assert main(["verify", "--manifest", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert "synth 00001: CORRUPT: synth/00001.parquet: sha256" in out and "1 corrupt" in out
    assert main(["verify", "--manifest", str(manifest), "--repair"]) == 0
    out = capsys.readouterr().out
    assert "synth 00001: CORRUPT, now FAILED" in out and "1 marked FAILED" in out and "pending" not in out
    assert sorted(Storage(str(root)).committed("synth")) == [0]
    assert main(["status", "--manifest", str(manifest)]) == 0
    assert "synth: shard(s) 1 FAILED: corrupt output" in capsys.readouterr().out  # the same word in both
    report = run_stage(cfg, "synth", [0, 1], progress=False, out=io.StringIO())
    assert report.committed == [1] and (root / "synth" / "00001.parquet").read_bytes() == good
    assert main(["verify", "--manifest", str(manifest)]) == 0


def test_status_with_another_shard_size_says_why(tmp_path, capsys):
    root = tmp_path / "root"
    manifest = _manifest(tmp_path, str(root))
    run_stage(load_config(manifest), "synth", [0], progress=False, out=io.StringIO())
    assert main(["status", "--manifest", str(manifest), "--set", "shard_size=20"]) == 0
    out = capsys.readouterr().out
    assert "run.json records shard_size=10" in out and "settings changed: shard_size" in out


def test_missing_input_shards_are_one_error_line(tmp_path, capsys):
    root, sets = _three_shard_root(tmp_path)
    Storage(str(root)).remove("_done/download/00002.json")
    code = main(["run", "--stage", "annotate", "--shards", "0-2", "--root", str(root), *sets])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "image shard(s) 2 of stage 'download' are not committed" in err and "--shards 2" in err
    assert not (root / "_done" / "annotate").exists()


def test_s3_server_killed_mid_run_stops_with_one_error_line(tmp_path):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing",
                   "client_kwargs": {"region_name": "us-east-1"},
                   "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1, "read_timeout": 2}}
        import boto3

        client = boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket="killed-mid-run")
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        manifest = _manifest(tmp_path, "s3://killed-mid-run/run", options, delay=0.2)
        proc = _cli(manifest)
        time.sleep(4)
        server.kill()
        out, err = proc.communicate(timeout=120)
    finally:
        server.kill()
    assert proc.returncode == 2, out + err
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: storage root s3://killed-mid-run/run")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
