"""The commit protocol: atomic shards under SIGKILL, locally and on a real S3 endpoint."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.runner import run_stage
from pipeline.storage import Storage

SHARDS = "0-3"


def _manifest(tmp_path: Path, root: str, **synth) -> Path:
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({
        "root": root, "shard_size": 10, "stages": {"synth": "tests.stages_for_tests"},
        "extra": {"synth": {"rows": 12, **synth}},
    }))
    return m


def _run_cli(manifest: Path, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "--stage", "synth", "--shards", SHARDS,
         "--manifest", str(manifest), "--no-progress", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent, **kw,
    )


def _final_files(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted((root / "synth").glob("*")):
        if p.name.endswith("_stats.json"):
            continue  # holds timings
        out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _check_markers_trustworthy(root: Path) -> None:
    """Every marker's outputs exist with the recorded size and checksum."""
    st = Storage(str(root))
    for shard, marker in st.markers("synth").items():
        for rel, info in marker["outputs"].items():
            data = (root / rel).read_bytes()
            assert len(data) == info["size"], f"shard {shard}: {rel} size mismatch"
            assert hashlib.sha256(data).hexdigest() == info["sha256"], f"shard {shard}: {rel} checksum mismatch"


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    root = tmp / "root"
    proc = _run_cli(_manifest(tmp, str(root)))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return _final_files(root)


def test_sigkill_never_leaves_a_marker_without_outputs(tmp_path, clean_run):
    rng = random.Random(1234)
    trials = 22
    killed_mid_run = 0
    for trial in range(trials):
        root = tmp_path / f"root{trial}"
        manifest = _manifest(tmp_path, str(root), delay=0.015)
        proc = _run_cli(manifest)
        time.sleep(rng.uniform(0.3, 1.6))
        if proc.poll() is None:
            killed_mid_run += 1
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        _check_markers_trustworthy(root)
        committed = set(Storage(str(root)).committed("synth"))
        # A rerun finishes the rest; committed shards are not redone; outputs equal a clean run's.
        rerun = _run_cli(manifest)
        out, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err
        if committed:
            assert "skipping" in out
        _check_markers_trustworthy(root)
        assert _final_files(root) == clean_run
        leftovers = [p for p in (root / "_tmp").rglob("*") if p.is_file()] if (root / "_tmp").exists() else []
        assert leftovers == [], f"stray temporary files after a completed rerun: {leftovers}"
    assert killed_mid_run >= trials // 2, "kill times did not hit running work often enough"


def test_uncommitted_final_named_file_is_not_trusted(tmp_path):
    root = tmp_path / "root"
    cfg = load_config(_manifest(tmp_path, str(root)))
    run_stage(cfg, "synth", [0, 1], progress=False)
    st = Storage(str(root))
    # Simulate a kill between finalize and marker: a truncated final-named file and no marker.
    (root / "_done/synth/00001.json").unlink()
    (root / "synth/00001.tar").write_bytes(b"partial")
    assert set(st.committed("synth")) == {0}
    # A marker whose output was damaged later is not trusted either.
    (root / "synth/00000.parquet").write_bytes(b"x")
    assert not st.is_committed("synth", 0)
    assert set(st.committed("synth")) == set()
    report = run_stage(cfg, "synth", [0, 1], progress=False)
    assert sorted(report.committed) == [0, 1]
    _check_markers_trustworthy(root)


def test_commit_protocol_on_s3(tmp_path, s3_server):
    root = s3_server.make_bucket("commit-protocol") + "/run"
    cfg = load_config(_manifest(tmp_path, root), storage_options=s3_server.storage_options)
    report = run_stage(cfg, "synth", [0, 1, 2], progress=False)
    assert report.exit_code == 0 and sorted(report.committed) == [0, 1, 2]
    st = Storage(root, s3_server.storage_options)
    assert set(st.committed("synth", cfg.fingerprint("synth"))) == {0, 1, 2}
    marker = st.marker("synth", 1)
    for rel, info in marker["outputs"].items():
        blob = st.fs.cat_file(st.path(rel))
        assert hashlib.sha256(blob).hexdigest() == info["sha256"]
    # Compare with a local run: same bytes.
    local_root = tmp_path / "local"
    run_stage(load_config(_manifest(tmp_path, str(local_root))), "synth", [0, 1, 2], progress=False)
    for name in ("00001.tar", "00002.parquet"):
        assert st.fs.cat_file(st.path(f"synth/{name}")) == (local_root / "synth" / name).read_bytes()
    # Damage on S3: a marker whose object shrank is not committed; a missing marker means redo.
    st.fs.pipe_file(st.path("synth/00002.tar"), b"short")
    st.remove("_done/synth/00000.json")
    assert set(st.committed("synth")) == {1}
    again = run_stage(cfg, "synth", [0, 1, 2], progress=False)
    assert sorted(again.committed) == [0, 2] and again.skipped == [1]
    # Nothing staged remotely: staging for object stores is local scratch.
    assert not st.fs.exists(st.path("_tmp"))
    assert st.run_meta()["shard_size"] == 10


def test_sigterm_aborts_cleanly_and_exits_for_requeue(tmp_path):
    root = tmp_path / "root"
    manifest = _manifest(tmp_path, str(root), delay=0.05)
    proc = _run_cli(manifest)
    # signal once a shard is claimed (the handlers are in place by then), not after a fixed sleep: on a loaded
    # machine the interpreter may still be importing after 2 s and die of the default SIGTERM action
    deadline = time.monotonic() + 60
    while not any((root / "_running" / "synth").glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, (out, err)
    assert "stopped by signal" in out
    _check_markers_trustworthy(root)
    staging = [p for p in (root / "_tmp").rglob("*") if p.is_file()] if (root / "_tmp").exists() else []
    assert staging == []
    assert not any((root / "_running" / "synth").glob("*.json"))
    assert os.path.exists(root / "run.json")
