"""The control plane at scale: a task's storage requests do not grow with the root, whole-root views see every
change, control commands start without the heavy libraries."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.runner import run_stage
from pipeline.status import collect_status
from pipeline.storage import Storage
from tests.contract_stages import STAGES
from tests.scale_support import clone_shards, count_local_calls, count_s3_requests

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "vllm", "img2dataset", "webdataset", "albumentations", "ray")


def _root(tmp_path: Path, shards: int, name: str, root_url: str | None = None, options: dict | None = None):
    root = root_url or str(tmp_path / name)
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump({"root": root, "shard_size": 10, "stages": STAGES,
                                        "storage_options": options or {}, "extra": {"synth": {"rows": 3}}}))
    cfg = load_config(manifest)
    for stage in ("synth", "consumer"):
        assert run_stage(cfg, stage, [0], progress=False, out=io.StringIO()).exit_code == 0
    clone_shards(Storage(root, options), ["synth", "consumer"], shards)
    return cfg


def _task(cfg, shard: int = 7) -> str:
    out = io.StringIO()
    run_stage(cfg, "consumer", [shard], progress=False, out=out)
    return out.getvalue()


def test_clones_are_committed_and_current(tmp_path):
    cfg = _root(tmp_path, 20, "r20")
    (row,) = collect_status(cfg, "consumer")
    assert row["committed"] == 20 and row["outdated"] == 0 and row["pending"] == 0


def test_a_task_makes_the_same_storage_calls_on_20_and_200_shards(tmp_path):
    small, large = _root(tmp_path, 20, "r20"), _root(tmp_path, 200, "r200")
    counts = {}
    for name, cfg in (("small", small), ("large", large)):
        with count_local_calls() as skip:
            assert "skipping 1 committed" in _task(cfg)
        Storage(cfg.root).remove("_done/consumer/00007.json")
        with count_local_calls() as redo:
            assert "consumer 00007: 3 rows, 3 ok" in _task(cfg)
        counts[name] = (dict(skip), dict(redo))
    assert counts["small"] == counts["large"], counts
    assert sum(counts["large"][0].values()) < 30  # a handful of reads by name, not one per shard


def test_a_task_sends_the_same_s3_requests_on_20_and_200_shards(tmp_path, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)  # the test stages open URLs without options
    counts = []
    for n in (20, 200):
        root = f"{s3_server.make_bucket('scale')}/n{n}"
        cfg = _root(tmp_path, n, f"s{n}", root, s3_server.storage_options)
        with count_s3_requests() as skip:
            _task(cfg)
        counts.append(dict(skip))
    assert counts[0] == counts[1], counts


def test_status_sees_a_marker_written_after_the_index_and_a_deleted_output(tmp_path):
    cfg = _root(tmp_path, 20, "r")
    storage = Storage(cfg.root)
    assert collect_status(cfg, "consumer")[0]["committed"] == 20  # writes the marker index
    assert storage.exists("_index/_done/consumer.json.gz")
    (Path(cfg.root) / "consumed" / "00003.parquet").unlink()
    storage.remove("_done/consumer/00005.json")
    row = collect_status(cfg, "consumer")[0]
    assert row["committed"] == 18 and row["outdated_reasons"] == {"00003": "outputs missing or changed"}
    assert row["pending"] == 2  # the outdated shard 3 and the unmarked shard 5
    assert run_stage(cfg, "consumer", [3, 5], progress=False, out=io.StringIO()).committed == [3, 5]
    assert collect_status(cfg, "consumer")[0]["committed"] == 20  # markers written after the index are seen
    # A marker rewritten in place (same name, other content) is read afresh, not taken from the index.
    marker = storage.marker("consumer", 4)
    storage.write_json("_done/consumer/00004.json", {**marker, "config_fingerprint": "changed-elsewhere",
                                                     "config": {**marker["config"], "section": {"other": 1}}})
    assert collect_status(cfg, "consumer")[0]["outdated"] == 1


def test_a_torn_index_is_ignored(tmp_path):
    cfg = _root(tmp_path, 5, "r")
    collect_status(cfg, "consumer")
    Storage(cfg.root).write_bytes("_index/_done/consumer.json.gz", b"\x1f\x8b not gzip")
    assert collect_status(cfg, "consumer")[0]["committed"] == 5


HEAVY_CHECK = """
import runpy, sys
sys.argv = ["pipeline", *sys.argv[1:]]
try:
    runpy.run_module("pipeline", run_name="__main__")
except SystemExit:
    pass
print("HEAVY=" + ",".join(sorted(m for m in sys.modules if m in {heavy!r})))
"""


@pytest.mark.parametrize("argv", [
    ["status"], ["status", "--help"], ["verify"], ["retry", "--stage", "consumer", "--shards", "0-3"],
    ["submit", "--stage", "consumer", "--shards", "0-3", "--dry-run"], ["browse", "--stage", "synth"],
    ["export-qa", "--out", "{tmp}/qa.parquet"], ["run", "--help"], ["submit", "--help"], ["--help"],
])
def test_control_commands_import_no_heavy_library(tmp_path, argv):
    cfg = _root(tmp_path, 3, "r")
    manifest = tmp_path / "r.yaml"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--help" not in argv and argv[0] != "--help":
        argv += ["--manifest", str(manifest)]
    res = subprocess.run([sys.executable, "-c", HEAVY_CHECK.format(heavy=HEAVY), *argv], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    line = [x for x in res.stdout.splitlines() if x.startswith("HEAVY=")]
    assert line, res.stdout + res.stderr
    assert line[-1] == "HEAVY=", f"{argv} imported {line[-1]}; {cfg.root}"
