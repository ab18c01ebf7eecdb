"""The runner's --failed-only mode: which stages and flag combinations it accepts."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.runner import run_stage


def _cfg(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({"root": str(tmp_path / "root"), "shard_size": 10,
                                 "stages": {"synth": "tests.stages_for_tests"}, "extra": {"synth": {"rows": 3}}}))
    return load_config(m)


def test_failed_only_needs_a_stage_that_can_retry_rows(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(PipelineError, match="no retry_shard"):
        run_stage(cfg, "synth", [0], failed_only=True, progress=False)


def test_failed_only_and_force_exclude_each_other(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(PipelineError, match="exclude each other"):
        run_stage(cfg, "download", [0], failed_only=True, force=True, progress=False)
