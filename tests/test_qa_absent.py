"""Absent-thing questions in the qa stage: generated beside the generator's MCQs, gated, exported.

The demo world asks about quadrants: "What shape is in the top right?" with "There is no shape in the top
right." keyed right. A candidate whose quadrant holds a shape has a false key, and the gate must drop it; one
whose quadrant is empty is kept only if the filter picks the keyed answer with the image and not without it.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline import shardio
from pipeline.config import AbsentConfig, RunConfig, load_config
from pipeline.demo import DEMO_MANIFEST
from pipeline.engines.base import ChatRequest
from pipeline.nano import qa_eval, world
from pipeline.resources import resolve_model
from pipeline.runner import run_stage
from pipeline.storage import Storage
from stages.qa import published
from stages.qa.absent import absent_candidates
from stages.qa.stage import engine_key

NANO = Path(__file__).resolve().parent.parent / "models" / "nano"
ABSENT = ["qa.absent.per_image=2"]  # manifests/demo.yaml carries the quadrant questions (things, question, options)


def scenes(n: int, seed: int) -> list[world.Scene]:
    rng = random.Random(seed)
    return [world.sample_scene(rng, max_objects=2) for _ in range(n)]


def run_qa(config: RunConfig, resources: dict | None = None) -> None:
    """Shard 0 through the qa stage (one torch thread: the nano models' recorded numbers)."""
    out = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = run_stage(config, "qa", [0], progress=False, out=out, resources=resources).exit_code
    finally:
        torch.set_num_threads(threads)
    assert code == 0, out.getvalue()


def absent_rows(root: Path) -> list[dict]:
    return [r for r in shardio.read_manifest(str(root / "qa" / "00000.parquet")) if r["qtype"] == "absent"]


def quadrant(row: dict) -> str:
    return qa_eval.quadrant(row["question"])


def test_absent_candidates_are_seeded_per_image_and_keyed_on_the_absent_option():
    cfg = AbsentConfig(per_image=2, things=["dog", "cat", "car", "tree"])
    one, again = absent_candidates("k1", cfg, 5), absent_candidates("k1", cfg, 5)
    assert [c.mcq for c in one] == [c.mcq for c in again] and [c.index for c in one] == [5, 6]
    q = one[0].mcq
    thing = q.question.removeprefix("Where in the image is the ").removesuffix("?")
    assert q.answer == "E" and q.answer_text == f"There is no {thing} in the image." and q.qtype == "absent"
    seen = {tuple(c.mcq.question for c in absent_candidates(f"k{i}", cfg, 0)) for i in range(20)}
    assert len(seen) > 1  # different images, different things
    assert absent_candidates("k1", AbsentConfig(), 0) == []
    with pytest.raises(ValueError, match="at least"):
        AbsentConfig(per_image=3, things=["dog"])


class PixelOracle:
    """A stand-in VLM for the demo world: with the image it sees whether a quadrant is empty (the pixel at its
    centre is the background's) and picks "There is no shape" then, the shape option "circle" otherwise;
    without the image it never picks the keyed absent option."""

    model_id = "pixel-oracle"

    def score_choices(self, requests: Sequence[ChatRequest], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        out = []
        for req, opts in zip(requests, choices, strict=True):
            text = str(req.messages[-1]["content"])
            pos = next(p for p in world.POSITIONS if f"in the {p}?" in text)
            empty = False
            if req.images:
                im = req.images[0]
                half = im.width / 2
                col, row = ("left" not in pos), ("top" not in pos)
                centre = (int(col * half + half / 2), int(row * half + half / 2))
                empty = im.getpixel(centre) == im.getpixel((0, 0))
            want = " There is no shape" if empty else " circle"
            out.append([0.0 if o.startswith(want) else -5.0 for o in opts])
        return out

    def close(self) -> None:
        pass


def test_gate_keeps_truly_absent_things_and_export_carries_them(tmp_path):
    """Gate-only mode (no generator) with a filter that sees the scene: every absent-thing question is kept
    exactly when its quadrant is empty, and the export's ground truth keys "There is no shape ..."."""
    world_scenes = scenes(6, seed=4)
    keys = qa_eval.write_image_shard(Storage(str(tmp_path)), 0, world_scenes)
    config = load_config(DEMO_MANIFEST, ["shard_size=6", "qa.generate=false", "qa.filter.backend=noop",
                                         "qa.filter.model=oracle", *ABSENT], root=str(tmp_path))
    run_qa(config, {engine_key("model", resolve_model(config.qa.filter)): PixelOracle()})
    rows = absent_rows(tmp_path)
    truth = dict(zip(keys, world_scenes, strict=True))
    assert len(rows) == 2 * len(keys)
    for r in rows:
        empty = truth[r["key"]].at(quadrant(r)) is None
        assert r["options"]["ABCDE".index(r["answer"])] == f"There is no shape in the {quadrant(r)}."
        assert r["kept"] == empty, r
        assert r["reject_reason"] == (None if empty else "not_visual")
    assert any(r["kept"] for r in rows) and not all(r["kept"] for r in rows)
    out = tmp_path / "qa.parquet"
    published.export_qa(config, Storage(str(tmp_path)), str(out))
    exported = [q for row in pq.read_table(out).column("reward_model").to_pylist() for q in row["ground_truth"]]
    kept = [r for r in rows if r["kept"]]
    assert len(exported) == len(kept)
    for q in exported:
        keyed = next(c for c in q["choices"] if c.startswith(f"{q['answer']})"))
        assert keyed == f"{q['answer']}) There is no shape in the {quadrant(q)}."


@pytest.mark.skipif(not (NANO / "nano-filter" / "config.json").exists(), reason="no nano models")
def test_nano_models_generate_gate_and_export_with_absent_questions(tmp_path):
    """nano-VL writes its MCQs, the stage adds two absent-thing questions per image, nano-filter gates all:
    every absent question about an occupied quadrant is dropped, and whatever is kept is truly absent."""
    world_scenes = scenes(4, seed=9)
    keys = qa_eval.write_image_shard(Storage(str(tmp_path)), 0, world_scenes)
    config = load_config(DEMO_MANIFEST, ["shard_size=4", *ABSENT], root=str(tmp_path))
    run_qa(config)
    rows = shardio.read_manifest(str(tmp_path / "qa" / "00000.parquet"))
    absent = [r for r in rows if r["qtype"] == "absent"]
    generated = [r for r in rows if r["qtype"] != "absent" and r["question"]]
    assert len(absent) == 2 * len(keys) and len(generated) >= 4 * len(keys)
    truth = dict(zip(keys, world_scenes, strict=True))
    for r in absent:
        assert r["source"] == "absent" and r["answer"] == "E"
        assert r["options"][-1] == f"There is no shape in the {quadrant(r)}."
        assert len(r["visual_answers"]) == 4 and len(r["text_answers"]) == 4
        if truth[r["key"]].at(quadrant(r)) is not None:
            assert not r["kept"] and r["reject_reason"] == "not_visual"  # the filter sees the shape there
        elif r["kept"]:
            assert r["visual_acc"] > 0.75 and r["text_acc"] < 0.25
    out = tmp_path / "qa.parquet"
    published.export_qa(config, Storage(str(tmp_path)), str(out))
    exported = {q["question"] for row in pq.read_table(out).column("reward_model").to_pylist()
                for q in row["ground_truth"]}
    assert {r["question"] for r in rows if r["kept"]} <= exported


@pytest.mark.skipif(not (NANO / "nano-filter-absent" / "config.json").exists(), reason="no nano models")
def test_nano_filter_absent_keeps_truly_absent_things(tmp_path):
    """Gate-only, every quadrant asked: nano-filter-absent (trained on absence) drops every question about an
    occupied quadrant and keeps most of those about an empty one (100 scenes: 0.73 kept, 0 false keeps)."""
    world_scenes = scenes(8, seed=21)
    keys = qa_eval.write_image_shard(Storage(str(tmp_path)), 0, world_scenes)
    config = load_config(DEMO_MANIFEST, ["shard_size=8", "qa.generate=false", "qa.absent.per_image=4",
                                         "qa.filter.model=models/nano/nano-filter-absent"], root=str(tmp_path))
    run_qa(config)
    rows = absent_rows(tmp_path)
    res = qa_eval.absent_report(rows, dict(zip(keys, world_scenes, strict=True)))
    assert res["absent_n"] == 4 * len(keys)
    assert res["absent_kept_when_occupied"] == 0.0 and res["absent_kept_when_empty"] >= 0.5, res


def test_demo_manifest_asks_the_absent_questions_the_absent_models_were_trained_on():
    """manifests/demo.yaml's qa.absent and the nano recipe's absent question (pipeline.nano.data.absent_mcq, what
    nano-filter-absent and nano-reader-absent learned) are the same question with the same options."""
    from pipeline.nano import data
    from stages.qa.absent import absent_mcq

    cfg = load_config(DEMO_MANIFEST).qa.absent
    for position in world.POSITIONS:
        asked, trained = absent_mcq(position, cfg), data.absent_mcq(world.Scene("gray", ()), position)
        assert (asked.question, asked.options, asked.answer) == (trained.question, trained.options, trained.answer)
