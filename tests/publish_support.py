"""A small real root for the publish tests: the demo world (26 URLs, two of them the same image) through the
real download and annotate stages (a scripted captioner with varied caption lengths, the world's rule reader
scoring quality; one URL missing), a licence column carried from the URL list, plus a committed train log and
an evaluate report."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.config import RunConfig, load_config
from pipeline.demo import DEMO_MANIFEST, make_demo_data, serve_directory, write_url_list
from pipeline.nano import world
from pipeline.runner import run_stage
from pipeline.storage import Storage
from stages.annotate import quality
from stages.annotate.stage import captioner_key
from tests.annotate_support import RuleReader, ScriptedCaptioner

N_SCENES = 24
DUPLICATES = 2
"""URL rows appended that point at scene 0 again: the same image bytes under other keys."""
URL_ROWS = N_SCENES + DUPLICATES + 1
"""The URL list: the scenes, the duplicates, one missing file."""
SHARD_SIZE = 8
LICENSES = ("cc-by-4.0", "cc0-1.0", None)
PROMPT = "Describe this picture in detail."
EVAL_NAME = "demo"


def varied_caption(img: Image.Image) -> str:
    """A deterministic caption of an image whose length depends on its pixels (the background colour first)."""
    rgb = img.convert("RGB")
    bg = min(world.BACKGROUNDS, key=lambda b: sum((x - y) ** 2 for x, y in zip(rgb.getpixel((1, 1)), world.RGB[b],
                                                                              strict=False)))
    extra = hashlib.sha256(rgb.tobytes()).digest()[0] % 4
    return f"The image shows shapes on a {bg} background." + " The shapes are clearly visible." * extra


def _url_list(data: Path, base_url: str) -> Path:
    rows = pq.read_table(write_url_list(data, base_url)).to_pylist()
    rows += [dict(rows[0]) for _ in range(DUPLICATES)]
    rows.append({**rows[1], "url": f"{base_url}/images/missing.png"})  # a 404: an image dropped by download
    for i, r in enumerate(rows):
        r["license"] = LICENSES[i % len(LICENSES)]
    path = data / "urls-licensed.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def build_root(base: Path, root: str | None = None, storage_options: dict | None = None) -> RunConfig:
    """Download + annotate over the demo world into `root` (default base/root); returns the run's config."""
    data = base / "data"
    if not (data / "world.parquet").exists():
        make_demo_data(data, n_images=N_SCENES, size=64)
    with serve_directory(data) as base_url:
        urls = _url_list(data, base_url)
        config = load_config(DEMO_MANIFEST, [
            f"shard_size={SHARD_SIZE}", f"download.urls={urls}", "download.image_size=64",
            "download.save_additional_columns=[scene_id,scene,mcqs,license]",
            "annotate.captioner.backend=noop", "annotate.captioner.model=scripted-captioner",
            f"annotate.prompt={PROMPT}", "annotate.quality.fraction=1.0"], root=root or str(base / "root"))
        if storage_options:
            config.storage_options = storage_options
        resources = {captioner_key(config.annotate.captioner): ScriptedCaptioner(varied_caption),
                     quality.reader_key(config.annotate.reward): RuleReader()}
        out = io.StringIO()
        shards = list(range(-(-URL_ROWS // SHARD_SIZE)))
        for stage in ("download", "annotate"):
            report = run_stage(config, stage, shards, progress=False, out=out, resources=resources)
            assert report.exit_code == 0, out.getvalue()
    storage = Storage(config.root, config.storage_options, config.work_dir)
    commit_train_log(storage)
    commit_eval_report(storage)
    return config


def commit_train_log(storage: Storage) -> None:
    """A committed RL train unit with a train_log.jsonl of 6 steps and 2 audits (the report's curves)."""
    txn = storage.begin("train", "all")
    lines = []
    for step in range(1, 7):
        rec = {"step": step, "max_steps": 6, "reward_mean": 0.2 + 0.1 * step, "caption_tokens": 20 + step}
        if step in (3, 6):
            rec["audit"] = {"step": step, "train_reward": 0.3 + 0.05 * step, "audit_reward": 0.25 + 0.05 * step,
                            "truth": 0.5 + 0.05 * step, "caption_tokens": 20, "alarm": False}
        lines.append(json.dumps(rec))
    with open(txn.path("checkpoints/all/train_log.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    txn.commit({"config_fingerprint": "fixture", "artifact": "checkpoints/all",
                "config": {"shard_size": SHARD_SIZE, "section": {"load": None, "algorithm": "grpo",
                                                                 "policy": {"model": "models/nano/nano-vl-step300"}}},
                "rows": {"total": 6, "ok": 6, "failed": 0},
                "stats": {"rows": 6, "ok": 6, "errors": {}, "seconds": 12.0,
                          "extra": {"mode": "rl", "steps": 6, "last_step": {"step": 6, "reward_mean": 0.8}}}})


def commit_eval_report(storage: Storage) -> None:
    """A committed evaluate unit with its report.json (the card's scores)."""
    txn = storage.begin("evaluate", EVAL_NAME)
    report = {"captioners": {"scripted": {"mean": 0.625, "best_of_k": 0.75, "per_benchmark": {}},
                             "empty": {"mean": 0.2, "best_of_k": 0.2, "per_benchmark": {}}}}
    with open(txn.path(f"eval/{EVAL_NAME}/report.json"), "w") as f:
        json.dump(report, f)
    txn.commit({"config_fingerprint": "fixture", "artifact": f"eval/{EVAL_NAME}",
                "rows": {"total": 2, "ok": 2, "failed": 0}, "stats": {"rows": 2, "ok": 2, "errors": {}, "seconds": 1.0}})
