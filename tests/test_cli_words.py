"""The CLI says the right word: stage and table names accepted both ways where unambiguous (one error line listing
the valid names otherwise), `export-qa --out` into a folder that does not exist yet, reasons cut with '...'."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import UnknownStageError, clip
from pipeline.stage import resolve_stage_name


@pytest.mark.parametrize("given, stage", [("annotate", "annotate"), ("captions", "annotate"), ("images", "download"),
                                          ("eval", "evaluate"), ("checkpoints", "train"), ("qa", "qa")])
def test_stage_names_and_output_folders(given, stage):
    assert resolve_stage_name(given, load_config()) == stage


def test_unknown_name_lists_the_valid_ones(tmp_path, capsys):
    with pytest.raises(UnknownStageError, match=r"stages \(output folder\): download \(images\), qa, train"):
        resolve_stage_name("caption", load_config())
    for args in (["status", "--stage", "caption"], ["verify", "--stage", "nope"], ["run", "--stage", "x"],
                 ["submit", "--stage", "qa,nope", "--dry-run"]):
        assert main([*args, "--root", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "annotate (captions)" in err[0], err


def test_status_and_browse_accept_either_name(tmp_path, capsys):
    (tmp_path / "_done" / "annotate").mkdir(parents=True)
    assert main(["status", "--stage", "captions", "--root", str(tmp_path)]) == 0
    assert main(["browse", str(tmp_path), "--stage", "annotate"]) == 2  # accepted; nothing committed yet
    err = capsys.readouterr().err
    assert "captions" in err and "no table" not in err
    assert main(["browse", str(tmp_path), "--stage", "train"]) == 2
    assert "browse has no table for 'train'; tables: captions, images, qa, eval" in capsys.readouterr().err


def test_export_qa_creates_the_out_folder(tmp_path, capsys):
    (tmp_path / "root").mkdir()
    out = tmp_path / "missing" / "dir" / "qa.parquet"
    assert main(["export-qa", "--root", str(tmp_path / "root"), "--out", str(out)]) == 0
    assert out.is_file()
    (tmp_path / "a_file").write_text("")
    assert main(["export-qa", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "a_file" / "x.parquet")]) == 2
    assert capsys.readouterr().err.startswith("error: cannot write --out ")


def test_clip_says_when_it_cut():
    assert clip("short") == "short"
    assert clip("x" * 300, 200) == "x" * 197 + "..."
    assert len(clip("y" * 201, 200)) == 200


def test_status_cuts_a_long_failure_reason_with_an_ellipsis(tmp_path, capsys):
    (tmp_path / "_failed" / "annotate").mkdir(parents=True)
    reason = "RuntimeError: " + "the captioning engine failed on every image " * 10 + "TAIL"
    (tmp_path / "_failed" / "annotate" / "00003.json").write_text(
        json.dumps({"stage": "annotate", "unit": "00003", "shard": 3, "error": reason + "\nsecond line"}))
    assert main(["status", "--root", str(tmp_path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "FAILED" in x)
    assert line.endswith("...") and "TAIL" not in line and line.startswith("annotate: shard(s) 3 FAILED: RuntimeError: the")
