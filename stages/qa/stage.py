"""qa: MCQs for every image of an image shard, gated for visual dependency -> ROOT/qa/<shard>.parquet.

Input: the committed download shard ROOT/images/<shard>.tar (+ .parquet), or any WebDataset shard named by
`qa.input_pattern`. For each image the generator writes MCQs (`qa.generate`; else the questions stored with
the image under `qa.questions_field` are used, e.g. an imported set), then the gate asks the filter every
question R times with and without the image (gate.py). Output: one row per question (kept or not, with the
reason) plus one row per image that has no question row (undecodable, generator error, nothing stored).
The parquet is a pure function of the input, the config and the models' answers; its timestamps follow
SOURCE_DATE_EPOCH when set.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from PIL import Image

from pipeline import shardio
from pipeline.config import EngineConfig, QAConfig, RunConfig
from pipeline.engines.base import Engine, Sampling, create_engine
from pipeline.engines.grid import ImageGrid, load_grid
from pipeline.errors import ConfigError
from pipeline.inputs import InputShard, resolve_input
from pipeline.mcq import LETTERS, QA_GENERATION_PROMPT
from pipeline.resources import resolve_model
from pipeline.shardio import Sample, read_samples
from pipeline.stage import PER_SHARD, Input, Resources, RunContext, ShardContext, ShardStats, Stage
from pipeline.storage import code_version, output_timestamp
from stages.qa.absent import absent_candidates
from stages.qa.gate import GateItem, GateSettings, Verdict, filter_prompt_hash, run_gate
from stages.qa.generate import generate_questions
from stages.qa.images import load_image
from stages.qa.questions import Candidate, from_stored

OUTPUT_DIR = "qa"

QA_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("question_index", pa.int32()),
    pa.field("question_id", pa.string()),
    pa.field("question", pa.string()),
    pa.field("options", pa.list_(pa.string())),
    pa.field("answer", pa.string()),
    pa.field("qtype", pa.string()),
    pa.field("source", pa.string()),
    pa.field("raw", pa.string()),
    pa.field("generator_model", pa.string()),
    pa.field("generator_model_id", pa.string()),
    pa.field("generator_prompt_hash", pa.string()),
    pa.field("generator_sampling", pa.string()),
    pa.field("filter_model", pa.string()),
    pa.field("filter_model_id", pa.string()),
    pa.field("filter_prompt_hash", pa.string()),
    pa.field("filter_settings", pa.string()),
    pa.field("visual_acc", pa.float64()),
    pa.field("text_acc", pa.float64()),
    pa.field("visual_answers", pa.list_(pa.string())),
    pa.field("visual_picks", pa.list_(pa.string())),
    pa.field("text_answers", pa.list_(pa.string())),
    pa.field("text_picks", pa.list_(pa.string())),
    pa.field("kept", pa.bool_(), nullable=False),
    pa.field("reject_reason", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_reason", pa.string()),
    pa.field("error", pa.string()),
    pa.field("pipeline_version", pa.string()),
    pa.field("timestamp", pa.string()),
])
"""ROOT/qa/<shard>.parquet: one row per question (status ok, kept or with its reject_reason; status error
for unparseable items) and one row per image without any question row (status error). Options are in the
generator's order and `answer` is their letter; the gate's answers are per rotation, picks as option texts."""


# -- provenance -------------------------------------------------------------------------------
def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def generation_prompt(cfg: QAConfig) -> str:
    return cfg.prompt or QA_GENERATION_PROMPT


def engine_key(role: str, cfg: EngineConfig) -> str:
    """The resource key of an engine: generator and filter share one when their configs are equal."""
    return f"engine:qa:{role}:" + hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:12]


def engine(ctx: ShardContext, cfg: EngineConfig) -> Engine:
    """The process's engine for `cfg` (created once, reused for every shard)."""
    resolved = resolve_model(cfg)
    return ctx.resource(engine_key("model", resolved), lambda: create_engine(resolved))


def prepare(run: RunContext) -> None:
    """Fail early on settings that cannot work, and check the input pattern covers the shards."""
    cfg = run.config.qa
    for role, ecfg in (("generator", cfg.generator), ("filter", cfg.filter)):
        if role == "generator" and not cfg.generate:
            continue
        if ecfg.backend != "noop" and not ecfg.model:
            raise ConfigError(f"qa.{role}.model is not set")
    if cfg.filter_mode == "generate" and cfg.text_pooling:
        raise ConfigError("qa.text_pooling needs qa.filter_mode: score")
    if cfg.input_pattern:
        for shard in run.shards[:1] + run.shards[-1:]:
            _source(run.config, run.storage, shard)


def _source(config: Any, storage: Any, shard: int) -> InputShard:
    cfg = config.qa
    return resolve_input(config, storage, shard, pattern=cfg.input_pattern,
                         pattern_options=cfg.input_storage_options, setting="qa.input_pattern")


# -- the shard --------------------------------------------------------------------------------
@dataclass
class _Image:
    """One input sample on its way through the stage."""

    key: str
    url: str | None
    sha256: str | None = None
    decoded: bool = False
    error_reason: str | None = None
    error: str | None = None
    raw: str | None = None
    candidates: list[Candidate] = field(default_factory=list)
    verdicts: dict[int, Verdict] = field(default_factory=dict)


@dataclass
class _Provenance:
    generator_model: str | None
    generator_model_id: str | None
    generator_prompt_hash: str | None
    generator_sampling: str | None
    filter_model: str
    filter_model_id: str | None
    filter_prompt_hash: str
    filter_settings: str


def run_shard(ctx: ShardContext, shard: int) -> ShardStats:
    cfg = ctx.config.qa
    src = _source(ctx.config, ctx.storage, shard)
    if src.upstream_stage:
        ctx.require_input(src.upstream_stage)
    extras = src.sidecar_rows()
    settings = GateSettings.from_config(cfg)
    prov = _Provenance(
        generator_model=(cfg.generator.model or cfg.generator.backend) if cfg.generate else None,
        generator_model_id=None,
        generator_prompt_hash=short_hash(generation_prompt(cfg)) if cfg.generate else None,
        generator_sampling=json.dumps(cfg.generation.model_dump(), sort_keys=True) if cfg.generate else None,
        filter_model=cfg.filter.model or cfg.filter.backend, filter_model_id=None,
        filter_prompt_hash=filter_prompt_hash(), filter_settings=settings.describe(),
    )
    images: list[_Image] = []
    for block in _blocks(read_samples(src.tar_url, src.storage_options), cfg.images_per_pass):
        images += _process(ctx, cfg, settings, block, extras, prov)
    stamp = output_timestamp()
    rows = [{n: row.get(n) for n in QA_SCHEMA.names} for img in images for row in _rows(img, prov, stamp)]
    shardio.write_manifest(rows, QA_SCHEMA, ctx.output(".parquet"))
    stats = _stats(rows, images, src, prov, settings)
    stats.bytes_out = os.path.getsize(ctx.output(".parquet"))
    return stats


def _blocks(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    block: list[Sample] = []
    for s in samples:
        block.append(s)
        if len(block) >= size:
            yield block
            block = []
    if block:
        yield block


def _process(ctx: ShardContext, cfg: QAConfig, settings: GateSettings, block: list[Sample],
             extras: dict[str, dict[str, Any]], prov: _Provenance) -> list[_Image]:
    """Decode, generate (or read) and gate the questions of one block of samples."""
    first = cfg.generator if cfg.generate else cfg.filter
    grid = image_grid(ctx, first)
    out, prepared = _load(cfg, block, extras, grid)
    if cfg.generate and prepared:
        _generate(ctx, cfg, out, prepared, prov)
    for img in out:
        if img.decoded and img.error_reason is None:
            img.candidates += absent_candidates(img.key, cfg.absent, len(img.candidates))
    if cfg.generate and prepared and image_grid(ctx, cfg.filter) != grid:  # another model: its own grid, one resize
        prepared = {s.key: load_image(s.image, image_grid(ctx, cfg.filter)).image for s in block if s.key in prepared}
    _gate(ctx, cfg, settings, out, prepared, prov)
    return out


def image_grid(ctx: ShardContext, cfg: EngineConfig) -> ImageGrid:
    """The image grid of the model `cfg` names (read from its processor's settings, once per process)."""
    resolved = resolve_model(cfg)
    return ctx.resource(engine_key("grid", resolved), lambda: load_grid(resolved))


def _load(cfg: QAConfig, block: list[Sample], extras: dict[str, dict[str, Any]], grid: ImageGrid
          ) -> tuple[list[_Image], dict[str, Image.Image]]:
    """The block's images decoded and resized to `grid` (errors recorded); gate-only: their stored questions."""
    out: list[_Image] = []
    prepared: dict[str, Image.Image] = {}
    for sample in block:
        extra = extras.get(sample.key, {})
        img = _Image(key=sample.key, url=sample.meta.get("url") or extra.get("url"))
        out.append(img)
        if not sample.ok:
            img.error_reason, img.error = sample.error_reason, sample.error
            continue
        loaded = load_image(sample.image, grid)
        img.sha256 = loaded.sha256
        if loaded.image is None:
            img.error_reason = "decode_error" if sample.image is not None else "no_image"
            img.error = loaded.error
            continue
        prepared[img.key] = loaded.image
        img.decoded = True
        if not cfg.generate:
            img.candidates = from_stored(sample.meta.get(cfg.questions_field, extra.get(cfg.questions_field)))
    return out, prepared


def _generate(ctx: ShardContext, cfg: QAConfig, out: list[_Image], prepared: dict[str, Image.Image],
              prov: _Provenance) -> None:
    """One generator request per decoded image; its parsed candidates (or error) onto each image."""
    gen = engine(ctx, cfg.generator)
    prov.generator_model_id = gen.model_id
    made = generate_questions(gen, list(prepared.items()), generation_prompt(cfg), Sampling.from_config(cfg.generation),
                              cfg.generator.chunk_size)
    by_key = {g.key: g for g in made}
    for img in out:
        g = by_key.get(img.key)
        if g is None:
            continue
        img.raw, img.candidates = g.raw, g.candidates
        if g.error:
            img.error_reason, img.error = "generation_error", g.error


def _gate(ctx: ShardContext, cfg: QAConfig, settings: GateSettings, out: list[_Image],
          prepared: dict[str, Image.Image], prov: _Provenance) -> None:
    """Gate every parsed, non-duplicate question of the block in one run of the gate."""
    items, owners = [], []
    for img in out:
        seen: set[str] = set()
        for c in img.candidates:
            if c.mcq is None:
                continue
            if c.mcq.id in seen:
                c.reason = "duplicate"
                continue
            seen.add(c.mcq.id)
            items.append(GateItem(img.key, c.mcq, prepared[img.key]))
            owners.append((img, c.index))
    if not items:
        return
    filt = engine(ctx, cfg.filter)
    prov.filter_model_id = filt.model_id
    for (img, index), verdict in zip(owners, run_gate(filt, items, settings), strict=True):
        img.verdicts[index] = verdict


def _rows(img: _Image, prov: _Provenance, stamp: str) -> list[dict[str, Any]]:
    base = {"key": img.key, "url": img.url, "sha256": img.sha256, "pipeline_version": code_version(),
            "timestamp": stamp, "generator_model": prov.generator_model,
            "generator_model_id": prov.generator_model_id, "generator_prompt_hash": prov.generator_prompt_hash,
            "generator_sampling": prov.generator_sampling}
    if not img.candidates:
        reason = img.error_reason or "no_questions"
        error = img.error or ("the generator wrote no question" if img.raw is not None else "no questions stored")
        return [{**base, "raw": img.raw, "kept": False, "reject_reason": reason, "status": "error",
                 "error_reason": reason, "error": error}]
    rows = []
    for c in img.candidates:
        row: dict[str, Any] = {**base, "question_index": c.index, "source": c.source, "kept": False}
        if c.mcq is None:
            rows.append({**row, "raw": c.raw, "reject_reason": "parse_error", "status": "error",
                         "error_reason": "parse_error", "error": c.reason})
            continue
        q = c.mcq
        row.update(question_id=q.meta.get("id") or q.id, question=q.question, options=list(q.options), answer=q.answer,
                   qtype=q.qtype or None, status="ok")
        v = img.verdicts.get(c.index)
        if v is None:
            rows.append({**row, "reject_reason": c.reason or "not_gated"})
            continue
        rows.append({**row, "filter_model": prov.filter_model, "filter_model_id": prov.filter_model_id,
                     "filter_prompt_hash": prov.filter_prompt_hash, "filter_settings": prov.filter_settings,
                     "visual_acc": v.visual_acc, "text_acc": v.text_acc, "visual_answers": v.visual_answers,
                     "visual_picks": v.visual_picks, "text_answers": v.text_answers, "text_picks": v.text_picks,
                     "kept": v.kept, "reject_reason": v.reason,
                     **({"status": "error", "error_reason": "filter_error",
                         "error": "the filter engine failed on some of this question's queries"}
                        if v.reason == "filter_error" else {})})
    return rows


def _stats(rows: list[dict[str, Any]], images: list[_Image], src: InputShard, prov: _Provenance,
           settings: GateSettings) -> ShardStats:
    stats = ShardStats.from_statuses([r["status"] for r in rows], [r["error_reason"] for r in rows])
    questions = [r for r in rows if r["question_index"] is not None]
    parsed = [r for r in questions if r["question"] is not None]
    gated = [r for r in parsed if r["visual_acc"] is not None]
    kept = [r for r in gated if r["kept"]]
    leaky = [r for r in gated if r["reject_reason"] == "answer_in_question" or r["text_acc"] >= settings.text_threshold]
    ok_images = [i for i in images if i.decoded]
    per_image = Counter(r["key"] for r in kept)
    stats.extra = {
        "input": src.tar_url,
        "images": len(images), "images_ok": len(ok_images),
        "images_without_questions": sum(1 for i in images if not any(c.mcq for c in i.candidates)),
        "questions_generated": len(questions), "parsed": len(parsed), "gated": len(gated), "kept": len(kept),
        "keep_rate": round(len(kept) / len(parsed), 4) if parsed else None,
        "rejected": dict(sorted(Counter(r["reject_reason"] for r in questions if not r["kept"]).items())),
        "leak_rate": round(len(leaky) / len(gated), 4) if gated else None,
        "answer_letters_before": _letters(parsed), "answer_letters_after": _letters(kept),
        "kept_per_image": round(len(kept) / len(ok_images), 4) if ok_images else None,
        "kept_per_image_hist": {str(n): c for n, c in sorted(Counter(per_image.get(i.key, 0) for i in ok_images).items())},
        "generator_model_id": prov.generator_model_id, "filter_model_id": prov.filter_model_id,
    }
    return stats


def _letters(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts = Counter(r["answer"] for r in rows)
    return {k: counts[k] for k in LETTERS if counts.get(k)}


def engines(config: RunConfig) -> dict[str, EngineConfig]:
    """The generator (unless questions are only gated) and the filter."""
    cfg = config.qa
    return {**({"qa.generator": cfg.generator} if cfg.generate else {}), "qa.filter": cfg.filter}


STAGE = Stage(
    name="qa",
    output_dir=OUTPUT_DIR,
    kind=PER_SHARD,
    inputs=(Input("download"),),
    schema=QA_SCHEMA,
    run_shard=run_shard,
    prepare=prepare,
    resources=Resources(gpus=1),
    engines=engines,
    description="MCQ generation + the visual-dependency gate -> per-question parquet manifests",
)
