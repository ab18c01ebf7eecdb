"""The stage contract: declared stages, whole-run units, staleness through every recorded input, status."""

from __future__ import annotations

import hashlib
import io
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import UnknownStageError
from pipeline.runner import run_stage
from pipeline.stage import Stage, available_stages, load_stage
from pipeline.status import collect_status, print_status
from pipeline.storage import Storage
from tests.contract_stages import STAGES

REPO = Path(__file__).resolve().parent.parent


def _manifest(tmp_path: Path, root: Path, **extra) -> Path:
    m = tmp_path / f"m{len(list(tmp_path.glob('m*.yaml')))}.yaml"
    m.write_text(yaml.safe_dump({"root": str(root), "shard_size": 10, "stages": STAGES,
                                 "extra": {"synth": {"rows": 5}, **extra}}))
    return m


def _run(manifest: Path, stage: str, shards: list[int] | None, **kw):
    out = io.StringIO()
    report = run_stage(load_config(manifest), stage, shards, progress=False, out=out, **kw)
    return report, out.getvalue()


def _status(manifest: Path, stage: str, compare: bool = True) -> dict:
    (row,) = collect_status(load_config(manifest), stage, compare=compare)
    return row


def test_declared_stages_are_read_not_probed(tmp_path):
    config = load_config(_manifest(tmp_path, tmp_path / "r"))
    declared = available_stages(config)
    assert isinstance(declared["annotate"], Stage) and declared["annotate"].schema is not None
    assert [i.stage for i in declared["annotate"].inputs] == ["download", "qa", "train"]
    assert declared["summary"].whole_run and declared["summary"].unit_of(config) == "all"
    bad = load_config(None, root=str(tmp_path / "r"))
    bad.stages = {"odd": "tests.contract_stages:STAGES"}
    with pytest.raises(UnknownStageError, match="declares no Stage"):
        load_stage("odd", bad)
    bad.stages = {"odd": "tests.contract_stages:notes"}
    with pytest.raises(UnknownStageError, match="declares itself 'notes'"):
        load_stage("odd", bad)
    with pytest.raises(UnknownStageError, match="declares no run_whole"):
        Stage(name="x", output_dir="x", kind="whole_run")


def test_plugin_stage_runs_commits_and_shows_in_status(tmp_path):
    root = tmp_path / "r"
    m = _manifest(tmp_path, root)
    report, _ = _run(m, "synth", [0, 1])
    assert report.committed == [0, 1]
    row = _status(m, "synth")
    assert row["committed"] == 2 and row["rows_ok"] == 10 and row["outdated"] == 0


def test_whole_run_commits_one_marker_with_input_digests_and_goes_stale(tmp_path):
    root = tmp_path / "r"
    m = _manifest(tmp_path, root)
    _run(m, "synth", [0, 1, 2])
    report, out = _run(m, "summary", None)  # default: every committed synth shard
    assert report.exit_code == 0, out
    storage = Storage(str(root))
    marker = storage.marker("summary", "all")
    assert marker["unit"] == "all" and marker["shards"] == [0, 1, 2]
    assert sorted(marker["inputs"]) == ["synth/00000", "synth/00001", "synth/00002"]
    assert set(marker["outputs"]) == {"summaries/all/summary.json", "summaries/all/keys.parquet", "summaries/all_stats.json"}
    for rel, info in marker["outputs"].items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == info["sha256"]
    assert marker["artifact"] == "summaries/all"

    report, out = _run(m, "summary", None)
    assert report.committed == [] and "current; skipping" in out
    # A different set of input shards is a different unit of work.
    report, _ = _run(m, "summary", [0, 1])
    assert report.committed == [0]
    _run(m, "summary", None)
    # Recommitting one input shard with other content makes the whole-run unit stale.
    m2 = _manifest(tmp_path, root, synth={"rows": 6})
    _run(m2, "synth", [1], force=True)  # other settings replace a committed shard only when forced
    row = _status(m, "summary", compare=False)
    assert row["outdated"] == 1 and "synth/00001" in row["outdated_reasons"]["all"]
    report, _ = _run(m, "summary", None)
    assert report.committed == [0]


def test_optional_input_staleness_like_qa_to_annotate_quality(tmp_path):
    root = tmp_path / "r"
    m = _manifest(tmp_path, root, notes={"text": "v1"})
    _run(m, "synth", [0, 1, 2, 3])
    _run(m, "consumer", [0, 1, 2, 3])
    marker = Storage(str(root)).marker("consumer", 3)
    assert marker["inputs"]["notes/00003"] is None  # absent when consumed: recorded as such
    # The optional input arrives for shard 3: only consumer shard 3 is stale.
    _run(m, "notes", [3])
    row = _status(m, "consumer")
    assert row["outdated"] == 1 and "notes/00003" in row["outdated_reasons"]["00003"]
    report, _ = _run(m, "consumer", [0, 1, 2, 3])
    assert report.committed == [3] and report.skipped == [0, 1, 2]
    # Recommitting notes shard 3 (new settings) makes consumer shard 3 stale again, nothing else.
    m2 = _manifest(tmp_path, root, notes={"text": "v2"})
    report, _ = _run(m2, "notes", [3], force=True)
    assert report.committed == [3]
    report, _ = _run(m, "consumer", [0, 1, 2, 3])
    assert report.committed == [3]
    from pipeline import shardio

    rows = shardio.read_manifest(str(root / "consumed" / "00003.parquet"))
    assert rows[0]["note"].startswith("v2:")


def test_retrained_artifact_makes_every_consumer_shard_stale(tmp_path):
    root = tmp_path / "r"
    m = _manifest(tmp_path, root)
    _run(m, "synth", [0, 1, 2])
    _run(m, "summary", [0, 1])
    report, _ = _run(m, "user", [0, 1, 2])
    assert report.committed == [0, 1, 2]
    assert _run(m, "user", [0, 1, 2])[0].skipped == [0, 1, 2]
    _run(m, "summary", [0, 1, 2])  # "retrained"
    row = _status(m, "user")
    assert row["outdated"] == 3 and all("summary/all" in r for r in row["outdated_reasons"].values())
    assert _run(m, "user", [0, 1, 2])[0].committed == [0, 1, 2]


def _run_cli(manifest: Path, stage: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--stage", stage, "--manifest", str(manifest),
                             "--no-progress", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)


def test_whole_run_sigkill_leaves_no_marker_or_a_complete_output(tmp_path):
    root = tmp_path / "r"
    m = _manifest(tmp_path, root, summary={"delay": 0.25})
    _run(m, "synth", [0, 1, 2])
    rng = random.Random(7)
    storage = Storage(str(root))
    reference = None
    killed_mid_run = 0
    for _trial in range(12):
        proc = _run_cli(m, "summary", "--force")
        time.sleep(rng.uniform(0.4, 2.0))
        if proc.poll() is None:
            killed_mid_run += 1
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        marker = storage.marker("summary", "all")
        if marker is not None:  # a marker is only ever next to its complete outputs
            for rel, info in marker["outputs"].items():
                assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == info["sha256"], rel
        rerun = _run_cli(m, "summary")
        out, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err
        if marker is not None:
            assert "current; skipping" in out
        final = storage.marker("summary", "all")
        digest = {rel: info["sha256"] for rel, info in final["outputs"].items() if not rel.endswith("_stats.json")}
        reference = reference or digest
        assert digest == reference
    assert killed_mid_run >= 6, "kill times did not hit running work often enough"


def test_status_without_manifest_reports_markers_as_recorded(tmp_path, capsys):
    root = tmp_path / "r"
    m = _manifest(tmp_path, root, synth={"rows": 5})
    _run(m, "synth", [0, 1])
    # A manifest with another setting: outdated, naming the setting.
    m2 = _manifest(tmp_path, root, synth={"rows": 7})
    assert main(["status", "--manifest", str(m2), "--stage", "synth"]) == 0
    out = capsys.readouterr().out
    assert "OUTDATED (settings changed: synth.rows)" in out
    # --root alone: plugin stages need their registration, so use a manifest-less look at a built-in stage.
    row = _status(m, "synth", compare=False)
    assert row["committed"] == 2 and row["outdated"] == 0


def test_status_root_alone_on_builtin_stages(tmp_path, capsys):
    """`status --root R` takes the markers as they are (the default shard_size would otherwise make every
    shard outdated); a --set that changes a setting names it."""
    from tests.annotate_support import commit_image_shard, scene_rows

    root = tmp_path / "r"
    config = load_config(None, ["shard_size=20", "annotate.captioner.backend=noop"], root=str(root))
    storage = Storage(str(root))
    for shard in range(3):
        commit_image_shard(storage, shard, scene_rows(4, shard=shard))
    assert run_stage(config, "annotate", [0, 1, 2], progress=False, out=io.StringIO()).exit_code == 0
    assert main(["status", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    annotate_line = next(line for line in out.splitlines() if line.startswith("annotate "))
    assert annotate_line.split()[1] == "3" and annotate_line.split()[6] == "0"  # committed, outdated
    assert "committed with settings" in out
    assert main(["status", "--root", str(root), "--set", "shard_size=20",
                 "--set", "annotate.captioner.backend=noop", "--set", "annotate.prompt=Describe."]) == 0
    out = capsys.readouterr().out
    assert "annotate: shard(s) 0-2 OUTDATED (settings changed: annotate.prompt)" in out


def test_submit_dry_run_renders_a_chain_with_dependencies(tmp_path, capsys):
    m = _manifest(tmp_path, tmp_path / "r")
    assert main(["submit", "--stage", "synth,summary,user", "--shards", "0-3", "--tasks", "2", "--dry-run",
                 "--manifest", str(m)]) == 0
    out = capsys.readouterr().out
    synth, summary, user = out.split("# ---- ")[1:]
    assert "#SBATCH --array=0-1" in synth and "--dependency" not in synth
    assert "#SBATCH --array" not in summary and "#SBATCH --nodes=1" in summary
    assert "#SBATCH --gres=gpu:2" in summary  # the stage's declared resources
    assert "#SBATCH --dependency=afterok:<job id of synth>" in summary
    assert "--stage summary --shards 0-3" in summary
    assert "#SBATCH --dependency=afterok:<job id of summary>" in user and "#SBATCH --array=0-1" in user


def test_print_status_names_whole_run_units(tmp_path):
    root = tmp_path / "r"
    m = _manifest(tmp_path, root)
    _run(m, "synth", [0, 1])
    _run(m, "summary", None)
    out = io.StringIO()
    print_status(load_config(m), "summary", out=out)
    assert "summary: all committed" in out.getvalue() and "from 2 input shard(s) [0-1]" in out.getvalue()
