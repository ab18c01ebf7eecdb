"""annotate: caption every image of an image shard into ROOT/captions/<shard>.{tar,parquet}.

Input: the committed download shard ROOT/images/<shard>.tar (+ .parquet), or any WebDataset shard
named by `annotate.input_pattern`. Output: a WebDataset tar with `<key>.<original ext>` (the
original bytes unless `reencode` is set), `<key>.txt` (the caption) and `<key>.json` (metadata and
provenance) for every captioned image, and a parquet manifest with one row per input sample (ok or
error). The tar is a pure function of the input, the config and the captions, so a greedy rerun after
a kill commits the same bytes; so is the parquet when SOURCE_DATE_EPOCH fixes its row timestamps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline import shardio
from pipeline.config import AnnotateConfig, EngineConfig, RunConfig
from pipeline.engines.base import Engine, Sampling, create_engine
from pipeline.engines.grid import ImageGrid, load_grid
from pipeline.errors import ConfigError, MissingInputError
from pipeline.inputs import InputShard, pattern_shard_count, resolve_input
from pipeline.resources import resolve_model, stage_reference
from pipeline.shardio import Sample, read_samples
from pipeline.shards import format_shard_spec, shard_name
from pipeline.stage import PER_SHARD, Input, Resources, RunContext, ShardContext, ShardStats, Stage
from pipeline.storage import code_version, output_timestamp
from stages.annotate import quality as quality_monitor
from stages.annotate.captioning import CaptionJob, CaptionResult, FeedConfig, caption_images, summarize
from stages.annotate.imageprep import encode_image

OUTPUT_DIR = "captions"

_J = {"json": "1"}
CAPTION_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False, metadata=_J),
    pa.field("url", pa.string(), metadata=_J),
    pa.field("sha256", pa.string(), metadata=_J),
    pa.field("width", pa.int32(), metadata=_J),
    pa.field("height", pa.int32(), metadata=_J),
    pa.field("image_ext", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("captions", pa.list_(pa.string()), metadata=_J),
    pa.field("caption_tokens", pa.int32(), metadata=_J),
    pa.field("finish_reason", pa.string(), metadata=_J),
    pa.field("model", pa.string(), metadata=_J),
    pa.field("model_id", pa.string(), metadata=_J),
    pa.field("prompt_hash", pa.string(), metadata=_J),
    pa.field("sampling", pa.string(), metadata=_J),
    pa.field("pipeline_version", pa.string(), metadata=_J),
    pa.field("timestamp", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_reason", pa.string()),
    pa.field("error", pa.string()),
    pa.field("attempts", pa.int32()),
    pa.field("abstained", pa.list_(pa.list_(pa.string())), metadata=_J),
    pa.field("quality", pa.float64(), metadata=_J),
    pa.field("quality_questions", pa.int32()),
    pa.field("source_license", pa.string()),
    pa.field("source_caption", pa.string()),
])
"""ROOT/captions/<shard>.parquet: one row per sample of the input shard, ok or error. Fields marked
{"json": "1"} also go into each sample's .json in the caption tar (not the timestamp: the tar is then the
same bytes on every greedy rerun even without SOURCE_DATE_EPOCH). The source_* columns come from the input
sample's json (img2dataset's `license` from save_additional_columns, its caption column `caption`); the
whole object stays in the tar json's `source`. `abstained` (annotate.abstain_below > 0): per caption, the
sentences the gate dropped (pipeline.abstain); null when the gate is off or could not run."""
JSON_FIELDS = shardio.json_fields(CAPTION_SCHEMA)


# -- provenance -------------------------------------------------------------------------------
def prompt_hash(prompt: str) -> str:
    """A short stable id of the captioning prompt."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def sampling_json(cfg: AnnotateConfig) -> str:
    """The sampling settings of a caption (with `abstain_below` when the abstention gate is on)."""
    settings = cfg.sampling.model_dump()
    if cfg.abstain_below:
        settings["abstain_below"] = cfg.abstain_below
    return json.dumps(settings, sort_keys=True)


def captioner_key(cfg: EngineConfig) -> str:
    """The resource key under which a process keeps its captioning engine."""
    return "engine:annotate.captioner:" + hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:12]


def captioner_config(ctx: ShardContext) -> EngineConfig:
    """annotate.captioner, with a registered checkpoint ('train:latest') resolved to its local folder and
    recorded as this shard's input (a retrained checkpoint makes the shard stale)."""
    cfg = ctx.config.annotate.captioner
    if cfg.backend != "noop" and not cfg.model:
        raise ConfigError("annotate.captioner.model is not set: give a checkpoint path or model name")
    ref = stage_reference(cfg.model)
    if ref is not None:
        return cfg.model_copy(update={"model": ctx.input_folder(*ref), "label": cfg.label or cfg.model})
    return resolve_model(cfg)


def captioner_grid(ctx: ShardContext) -> ImageGrid:
    """The captioner's image grid, read from its processor's settings without loading the model (images are
    resized in the decode pool before the engine starts)."""
    cfg = captioner_config(ctx)
    return ctx.resource(captioner_key(cfg) + ":grid", lambda: load_grid(cfg))


def captioner(ctx: ShardContext) -> Engine:
    """The captioning engine of this process (created once per model, reused for every shard)."""
    cfg = captioner_config(ctx)
    return ctx.resource(captioner_key(cfg), lambda: create_engine(cfg))


def prepare(run: RunContext) -> None:
    """Check the input pattern covers the requested shards before any work starts."""
    cfg = run.config.annotate
    if cfg.sampling.n > 1 and cfg.sampling.temperature == 0:
        raise ConfigError("annotate.sampling.n > 1 needs temperature > 0: greedy decoding gives n identical captions")
    if cfg.input_pattern:
        for shard in run.shards[:1] + run.shards[-1:]:
            resolve_input(run.config, run.storage, shard)
    else:
        have = run.storage.committed_many("download", run.shards)  # by name: this run's shards only
        missing = [s for s in run.shards if s not in have]
        if missing:
            raise MissingInputError(
                f"image shard(s) {format_shard_spec(missing)} of stage 'download' are not committed under "
                f"{run.storage.root_url}; run: python -m pipeline run --stage download --shards {format_shard_spec(missing)}")
    quality_monitor.validate(cfg.quality, cfg.reward)


# -- the shard --------------------------------------------------------------------------------
@dataclass
class _SampleInfo:
    key: str
    url: str | None
    ext: str | None
    meta: dict[str, Any]
    mcqs: Any = None
    source: dict[str, str | None] = field(default_factory=dict)
    """The source columns (licence, original caption) of the input sample."""
    files: dict[str, bytes] | None = None
    """The input sample's files while they fit the memory budget (else pass 2 reads the tar again)."""


@dataclass
class _Plan:
    """What pass 1 learned about the input, and the captions it made."""

    infos: list[_SampleInfo] = field(default_factory=list)
    results: dict[str, CaptionResult] = field(default_factory=dict)
    held: bool | None = None
    """False once a sample did not fit the memory budget (pass 2 then re-reads the input tar)."""

    def samples(self, local_tar: str) -> Iterator[Sample]:
        """The input samples again, in order: from memory when every one was held."""
        if self.held is False:
            yield from read_samples(local_tar)
        else:
            for info in self.infos:
                yield Sample(info.key, info.files or {})


def run_shard(ctx: ShardContext, shard: int) -> ShardStats:
    return _annotate(ctx, shard, keep={})


def retry_shard(ctx: ShardContext, shard: int, previous_marker: dict[str, Any]) -> ShardStats:
    """Redo only the failed rows of a committed shard; ok rows are kept byte-identical."""
    rel = f"{OUTPUT_DIR}/{shard_name(shard)}.parquet"
    rows = shardio.read_manifest(ctx.storage.url(rel), ctx.storage.storage_options)
    keep = {r["key"]: r for r in rows if r["status"] == "ok"}
    return _annotate(ctx, shard, keep=keep)


def _annotate(ctx: ShardContext, shard: int, keep: dict[str, dict[str, Any]]) -> ShardStats:
    cfg = ctx.config.annotate
    src = resolve_input(ctx.config, ctx.storage, shard)
    if src.upstream_stage:
        ctx.require_input(src.upstream_stage)
    local_tar = _local_copy(src, ctx.txn.staging)
    extras = src.sidecar_rows()
    stamp = output_timestamp()

    plan = _caption_pass(ctx, cfg, local_tar, src, extras, keep)
    quality = quality_monitor.score_shard(ctx, cfg.quality, cfg.reward, shard, _ok_captions(plan),
                                          {i.key: i.mcqs for i in plan.infos if i.mcqs is not None})

    engine_id = _engine_id(ctx, plan, keep)
    rows = []
    with shardio.TarWriter(ctx.output(".tar")) as sink:
        for info, sample in zip(plan.infos, plan.samples(local_tar), strict=True):
            if info.key in keep:
                row = keep[info.key]
            else:
                row = _row(cfg, info, plan.results[info.key], engine_id, stamp, quality.scores.get(info.key))
            rows.append(row)
            if row["status"] == "ok":
                sink.write(info.key, _tar_files(cfg, row, info, sample))
    shardio.write_manifest(rows, CAPTION_SCHEMA, ctx.output(".parquet"))
    if local_tar != src.tar_url:
        os.remove(local_tar)
    return _stats(rows, plan, src, engine_id, quality, len(keep), ctx.output(".tar"), ctx.output(".parquet"),
                  cfg.abstain_below)


def _ok_captions(plan: _Plan) -> dict[str, str]:
    return {k: r.caption for k, r in plan.results.items() if r.status == "ok"}


def _engine_id(ctx: ShardContext, plan: _Plan, keep: dict[str, dict[str, Any]]) -> str:
    """The captioner's model id; without loading the engine when a retry had nothing to redo."""
    if not plan.results and keep:
        return next(iter(keep.values()))["model_id"]
    return captioner(ctx).model_id


def _local_copy(src: InputShard, staging: str) -> str:
    """The input tar as a local file (remote tars are fetched once into staging: a shard bigger than
    hold_images_mb is read twice, and a local copy makes the second read free)."""
    if src.is_local:
        return src.tar_url
    local = os.path.join(staging, "_input.tar")
    with src.open() as fin, open(local, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    return local


def _caption_pass(ctx: ShardContext, cfg: AnnotateConfig, local_tar: str, src: InputShard,
                  extras: dict[str, dict[str, Any]], keep: dict[str, dict[str, Any]]) -> _Plan:
    plan = _Plan()

    budget = cfg.hold_images_mb * (1 << 20)

    def jobs() -> Iterator[CaptionJob]:
        """The input's samples as caption jobs. Runs in caption_images' feeder thread: it alone fills
        plan.infos (read only after caption_images is done) and the results of unreadable samples."""
        nonlocal budget
        for sample in read_samples(local_tar):
            info = _info(sample, extras.get(sample.key, {}))
            plan.infos.append(info)
            size = sum(len(v) for v in sample.files.values())
            if plan.held is not False and size <= budget:
                info.files, budget = sample.files, budget - size
            else:
                plan.held = False
            if not sample.ok:
                plan.results[info.key] = CaptionResult(key=info.key, status="error", reason=sample.error_reason,
                                                       error=sample.error)
            elif info.key not in keep:
                yield CaptionJob(key=sample.key, data=sample.image)

    ecfg = cfg.captioner
    feed = FeedConfig(
        prompt=cfg.prompt, sampling=Sampling.from_config(cfg.sampling, logprobs=cfg.abstain_below > 0),
        grid=captioner_grid(ctx), abstain_below=cfg.abstain_below,
        chunk_size=ecfg.chunk_size, workers=ecfg.preprocess_workers,
        truncated_is_error=cfg.truncated_is_error, retry=cfg.retry_failed_rows, retry_batch_size=cfg.retry_batch_size,
    )
    for res in caption_images(lambda: captioner(ctx), jobs(), feed):
        plan.results[res.key] = res
    return plan


SOURCE_COLUMNS = {"source_license": ("license", "licence", "LICENSE"), "source_caption": ("caption", "alt_text")}
"""manifest column -> the input json / sidecar keys it is read from (first present wins)."""


def source_columns(meta: dict[str, Any]) -> dict[str, str | None]:
    """The source columns of one input sample (None where the source has no such field)."""
    out: dict[str, str | None] = {}
    for column, keys in SOURCE_COLUMNS.items():
        value = next((meta[k] for k in keys if meta.get(k) not in (None, "")), None)
        out[column] = None if value is None else str(value)
    return out


def _info(sample: Sample, extra: dict[str, Any]) -> _SampleInfo:
    meta = sample.meta
    return _SampleInfo(
        key=sample.key,
        url=meta.get("url") or extra.get("url"),
        ext=sample.image_ext,
        meta=meta,
        mcqs=meta.get("mcqs", extra.get("mcqs")),
        source=source_columns({**extra, **meta}),
    )


def _row(cfg: AnnotateConfig, info: _SampleInfo, res: CaptionResult, engine_id: str, stamp: str,
         score: tuple[float, int] | None) -> dict[str, Any]:
    first = res.generations[0] if res.generations else None
    return {
        "key": info.key, "url": info.url, "sha256": res.sha256, "width": res.width, "height": res.height,
        "image_ext": (cfg.reencode if cfg.reencode != "no" else info.ext),
        "caption": res.caption if res.status == "ok" else None,
        "captions": res.captions if res.generations else [],
        "caption_tokens": first.num_tokens if first else None,
        "finish_reason": first.finish_reason if first else None,
        "model": cfg.captioner.model or cfg.captioner.backend, "model_id": engine_id,
        "prompt_hash": prompt_hash(cfg.prompt), "sampling": sampling_json(cfg),
        "pipeline_version": code_version(), "timestamp": stamp,
        "status": res.status, "error_reason": res.reason, "error": res.error, "attempts": res.attempts,
        "abstained": [list(d) for d in res.abstained] if res.abstained is not None else None,
        "quality": score[0] if score else None, "quality_questions": score[1] if score else None,
        **info.source,
    }


def _tar_files(cfg: AnnotateConfig, row: dict[str, Any], info: _SampleInfo, sample: Sample) -> dict[str, bytes]:
    """The files of one output sample: a pure function of the row and the input sample."""
    image = sample.image or b""
    ext = info.ext or "jpg"
    if cfg.reencode != "no":
        image, ext = encode_image(image, cfg.reencode, cfg.reencode_quality), cfg.reencode
    meta = {k: row[k] for k in JSON_FIELDS}
    meta["sampling"] = json.loads(row["sampling"])
    meta["source"] = info.meta
    return {
        ext: image,
        "txt": row["caption"].encode(),
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode(),
    }


def _stats(rows: list[dict[str, Any]], plan: _Plan, src: InputShard, engine_id: str,
           quality: quality_monitor.QualityReport, kept: int,
           tar_path: str, parquet_path: str, abstain_below: float = 0.0) -> ShardStats:
    stats = ShardStats.from_statuses([r["status"] for r in rows], [r["error_reason"] for r in rows])
    counts = summarize(plan.results.values())
    scored = [r["quality"] for r in rows if r["quality"] is not None]
    stats.bytes_out = os.path.getsize(tar_path) + os.path.getsize(parquet_path)
    stats.extra = {
        "input": src.tar_url, "model_id": engine_id, "captioned": counts["rows"], "kept_from_previous": kept,
        "output_tokens": counts["tokens"], "finish_length": counts["length"],
        "retried": counts["retried"], "retried_ok": counts["retried_ok"],
        "quality_scored": len(scored),
        "quality_mean": round(sum(scored) / len(scored), 4) if scored else None,
        "quality_missing": quality.missing, "quality_source": quality.source,
    }
    if abstain_below:
        stats.extra.update(abstain_below=abstain_below, abstained_sentences=counts.get("abstained_sentences", 0),
                           ungated=counts.get("ungated", 0))
    return stats


def engines(config: RunConfig) -> dict[str, EngineConfig]:
    """The captioner, and the quality monitor's reader when a fraction is scored."""
    cfg = config.annotate
    out = {"annotate.captioner": cfg.captioner}
    if cfg.quality.fraction > 0:
        out["annotate.reward.reader"] = cfg.reward.reader
    return out


STAGE = Stage(
    name="annotate",
    output_dir=OUTPUT_DIR,
    kind=PER_SHARD,
    inputs=(Input("download"), Input("qa", required=False), Input("train", required=False)),
    schema=CAPTION_SCHEMA,
    run_shard=run_shard,
    retry_shard=retry_shard,
    prepare=prepare,
    shard_count=lambda config, storage: pattern_shard_count(config.annotate.input_pattern, storage),
    resources=Resources(gpus=1),
    engines=engines,
    description="the captioner over image shards -> caption WebDataset shards + parquet manifests",
)
