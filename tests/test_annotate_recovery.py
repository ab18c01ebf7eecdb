"""Kill the annotate stage mid-shard (SIGKILL), rerun: identical committed bytes, nothing lost or duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.storage import Storage
from tests.annotate_support import commit_image_shard, scene_rows

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# The child runs the real stage through the runner; only the captioning model is a scripted stand-in
# (oracle captions, slowed down so that the kill lands mid-shard).
CHILD = textwrap.dedent("""
    import sys, time, pathlib
    from pipeline.config import load_config
    from pipeline.runner import run_stage
    from stages.annotate import stage as annotate
    from tests.annotate_support import ScriptedCaptioner, oracle_policy, scene_rows

    root, delay, flag = sys.argv[1], float(sys.argv[2]), pathlib.Path(sys.argv[3])
    config = load_config(None, ["annotate.captioner.backend=hf", "annotate.captioner.model=scripted",
                                "annotate.captioner.chunk_size=4", "annotate.sampling.temperature=0"], root=root)
    policy = oracle_policy(scene_rows(24, shard=0) + scene_rows(24, shard=1))

    def slow(img):
        flag.touch()
        time.sleep(delay)
        return policy(img)

    resources = {annotate.captioner_key(config.annotate.captioner): ScriptedCaptioner(slow)}
    report = run_stage(config, "annotate", [0, 1], progress=False, resources=resources)
    sys.exit(report.exit_code)
""")


def _child(root: Path, delay: float, flag: Path, epoch: str | None = "1767225600") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SOURCE_DATE_EPOCH", None)
    if epoch:
        env["SOURCE_DATE_EPOCH"] = epoch
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(delay), str(flag)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _prepare(root: Path) -> Storage:
    storage = Storage(str(root))
    commit_image_shard(storage, 0, scene_rows(24, shard=0))
    commit_image_shard(storage, 1, scene_rows(24, shard=1))
    return storage


def _committed_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "captions").glob("*")) if p.suffix in (".tar", ".parquet")}


def test_sigkill_mid_shard_then_rerun_gives_identical_committed_output(tmp_path):
    reference = tmp_path / "reference"
    _prepare(reference)
    proc = _child(reference, 0.0, tmp_path / "ref.flag")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out

    killed = tmp_path / "killed"
    storage = _prepare(killed)
    flag = tmp_path / "kill.flag"
    proc = _child(killed, 0.05, flag)
    deadline = time.time() + 60
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # inside the first shard's captioning
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert storage.marker("annotate", 0) is None and storage.marker("annotate", 1) is None
    assert not (killed / "captions" / "00000.tar").exists()  # nothing half-written under a final name

    proc = _child(killed, 0.0, tmp_path / "again.flag")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert _committed_bytes(killed) == _committed_bytes(reference)
    assert len(_committed_bytes(killed)) == 4
    for shard in (0, 1):
        keys = pq.read_table(killed / f"captions/{shard:05d}.parquet").column("key").to_pylist()
        assert len(keys) == len(set(keys)) == 24
    assert not any((killed / "_tmp" / "annotate").iterdir())  # stale staging cleared


def test_tar_bytes_do_not_depend_on_the_run_time(tmp_path):
    roots = [tmp_path / "a", tmp_path / "b"]
    for root, epoch in zip(roots, ["1767225600", None], strict=True):
        _prepare(root)
        proc = _child(root, 0.0, tmp_path / "flag", epoch)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
    a, b = (_committed_bytes(r) for r in roots)
    assert {k: v for k, v in a.items() if k.endswith(".tar")} == {k: v for k, v in b.items() if k.endswith(".tar")}
    for name in ("00000.parquet", "00001.parquet"):
        ta, tb = (pq.read_table(r / "captions" / name) for r in roots)
        assert ta.drop(["timestamp"]).equals(tb.drop(["timestamp"]))
        assert set(ta.column("timestamp").to_pylist()) == {"2026-01-01T00:00:00Z"}
