"""A unit's digest follows its data, not its records: `train --force` with the same weights keeps every consumer
current (the stats file's timing and the summary's seconds change, the weights do not)."""

from __future__ import annotations

import io
import time

from pipeline.config import load_config
from pipeline.demo import DEMO_MANIFEST
from pipeline.runner import run_stage, stale_inputs
from pipeline.stage import InputCache, marker_digest
from pipeline.storage import Storage


def _marker(weights: str, seconds: float) -> dict:
    return {"outputs": {"checkpoints/all/model.safetensors": {"sha256": weights, "size": 3},
                        "checkpoints/all/train_summary.json": {"sha256": f"s{seconds}", "size": 9},
                        "checkpoints/all_stats.json": {"sha256": f"t{seconds}", "size": 9}}}


def test_digest_leaves_records_out():
    assert marker_digest(_marker("w1", 1.0)) == marker_digest(_marker("w1", 2.5))
    assert marker_digest(_marker("w1", 1.0)) != marker_digest(_marker("w2", 1.0))
    assert marker_digest(_marker("w1", 1.0), with_records=True) != marker_digest(_marker("w1", 2.5), with_records=True)


def test_train_force_with_the_same_weights_keeps_consumers_current(tmp_path):
    config = load_config(DEMO_MANIFEST, root=str(tmp_path / "root"))
    storage = Storage(config.root)
    assert run_stage(config, "train", None, progress=False, out=io.StringIO()).exit_code == 0
    first = storage.marker("train", "all")
    consumer = {"inputs": {"train/all": marker_digest(first)}}
    legacy = {"inputs": {"train/all": marker_digest(first, with_records=True)}}  # recorded by an older version
    assert stale_inputs(legacy, InputCache(storage)) == []
    time.sleep(1.1)  # committed_at has whole seconds: the rerun's records must differ (its stats may not)
    assert run_stage(config, "train", None, force=True, progress=False, out=io.StringIO()).exit_code == 0
    second = storage.marker("train", "all")
    assert second["committed_at"] > first["committed_at"]
    assert stale_inputs(consumer, InputCache(storage)) == []
