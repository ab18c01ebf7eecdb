"""evaluate: Prism-style caption quality of several captioners, side by side, as one whole-run unit.

For every benchmark image each captioner writes k captions (cached, see captions.py); the built-in
baselines are the empty caption and the benchmark's reference caption (one each: they are deterministic).
A text-only reader answers every question of the image from each caption alone (reader.py). The unit
ROOT/eval/<name>/ holds report.md (the table), report.json, chart.png and answers.parquet (every caption and
every reader answer). Deterministic given the seed: an image's captions depend only on the captioner, the
image, the sampling settings and the seed; the reader decodes greedily or scores options.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipeline import shardio
from pipeline.config import EngineConfig, EvaluateConfig, RunConfig
from pipeline.engines.base import Engine, create_engine
from pipeline.engines.common import model_identity
from pipeline.errors import ConfigError
from pipeline.faithful import caption_metrics, check_all
from pipeline.resources import resolve_model, stage_reference
from pipeline.stage import WHOLE_RUN, Input, Resources, RunContext, ShardContext, ShardStats, Stage
from pipeline.storage import Storage
from stages.evaluate import judge as judging
from stages.evaluate import report as reporting
from stages.evaluate.benchmarks import BenchImage, load_benchmark, qa_shards
from stages.evaluate.captions import CaptionCache, CaptionSpec, caption_all
from stages.evaluate.reader import Answer, Item, answer_all, prompt_version

log = logging.getLogger("stages.evaluate")

OUTPUT_DIR = "eval"
CACHE_DIR = "eval/_cache/captions"
READER_CHUNK = 4096

ANSWER_SCHEMA = pa.schema([
    pa.field("benchmark", pa.string(), nullable=False),
    pa.field("captioner", pa.string(), nullable=False),
    pa.field("model_id", pa.string()),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("image_sha256", pa.string()),
    pa.field("caption_index", pa.int32(), nullable=False),
    pa.field("caption", pa.string()),
    pa.field("caption_chars", pa.int32()),
    pa.field("question_id", pa.string()),
    pa.field("question", pa.string()),
    pa.field("options", pa.list_(pa.string())),
    pa.field("answer", pa.string()),
    pa.field("reader_answer", pa.string()),
    pa.field("correct", pa.bool_(), nullable=False),
    pa.field("reader_raw", pa.string()),
    pa.field("status", pa.string(), nullable=False),
])
"""ROOT/eval/<name>/answers.parquet: one row per (captioner, image, caption, question)."""


def unit_of(config: RunConfig) -> str:
    return config.evaluate.name


def default_shards(config: RunConfig, storage: Storage) -> list[int]:
    """The held-out qa shards its qa benchmarks name (none for file benchmarks)."""
    return sorted({s for b in config.evaluate.benchmarks for s in qa_shards(b)})


def prepare(run: RunContext) -> None:
    """Refuse an evaluation that cannot run before any model is loaded."""
    check(run.config.evaluate)


def check(cfg: EvaluateConfig) -> None:
    if not cfg.captioners and not cfg.baselines:
        raise ConfigError("evaluate: no captioner and no baseline to evaluate (evaluate.captioners)")
    if not cfg.benchmarks:
        raise ConfigError("evaluate.benchmarks is empty: give a JSONL, a CapRL-QA parquet or held-out qa shards")
    if not cfg.reader.model and cfg.reader.backend != "noop":
        raise ConfigError("evaluate.reader.model is not set")
    for name, ecfg in cfg.captioners.items():
        if not ecfg.model and ecfg.backend != "noop":
            raise ConfigError(f"evaluate.captioners.{name}.model is not set")
    for name, threshold in cfg.abstain_below.items():
        if name not in cfg.captioners:
            raise ConfigError(f"evaluate.abstain_below.{name}: no captioner of that name (evaluate.captioners)")
        if not 0.0 <= threshold < 1.0:
            raise ConfigError(f"evaluate.abstain_below.{name} = {threshold}: a probability in [0, 1)")


def captioner_config(ctx: ShardContext, cfg: EngineConfig) -> EngineConfig:
    """A captioner's engine config with 'train:latest' (a committed whole-run artifact, recorded as an input:
    a retrained checkpoint makes the report stale) or a repository path resolved."""
    ref = stage_reference(cfg.model)
    if ref is not None:
        return cfg.model_copy(update={"model": ctx.input_folder(*ref)})
    return resolve_model(cfg)


def model_ident(cfg: EngineConfig, load: Any) -> str:
    """A captioner's provenance id (as its engine reports it), without loading it where the config tells."""
    if cfg.backend in ("hf", "vllm"):
        return model_identity(cfg.model, cfg.revision)
    return load().model_id


def cache_id(ident: str) -> str:
    """The id the caption cache files a model under: a local folder is its weights' hash (the same weights at
    another path share captions)."""
    return ident.split("#", 1)[1] if "#sha256:" in ident else ident


def run_whole(ctx: ShardContext, shards: list[int]) -> ShardStats:
    cfg = ctx.config.evaluate
    check(cfg)
    storage = ctx.storage
    images: dict[str, list[BenchImage]] = {
        b.name: load_benchmark(b, storage, lambda stage, shard: ctx.require_input(stage, shard))
        for b in cfg.benchmarks
    }
    for name, found in images.items():
        if not found:
            raise ConfigError(f"evaluate: benchmark {name!r} has no image with a question")
    cache = CaptionCache(cfg.cache or storage.url(CACHE_DIR), {} if cfg.cache else storage.storage_options)
    captions, models, cache_stats = _caption(ctx, cfg, images, cache)

    reader_cfg = resolve_model(cfg.reader)
    reader = create_engine(reader_cfg)
    try:
        rows = _answer(cfg, reader, images, captions, models)
    finally:
        reader.close()

    names = [*cfg.captioners, *cfg.baselines]
    benches = [b.name for b in cfg.benchmarks]
    scored = [reporting.Scored(r["captioner"], r["benchmark"], r["image_id"], r["caption_index"], r["correct"])
              for r in rows]
    report = {
        "name": cfg.name, "k": cfg.k, "seed": cfg.seed, "benchmarks": benches,
        "reader": reader.model_id, "answer_mode": cfg.answer_mode, "abstain_option": cfg.abstain_option,
        "reader_prompt": prompt_version(cfg.abstain_option),
        "prompt": cfg.prompt, "sampling": cfg.sampling.model_dump(),
        "captioner_models": {**models, **{b: f"baseline:{b}" for b in cfg.baselines}},
        "captioners": reporting.scores(scored, names, benches),
    }
    _add_faithfulness(report, cfg, images, captions, models)
    judged = _judge(ctx, cfg, images, captions, models, report) if cfg.judge else None
    table = reporting.markdown(report)
    with open(ctx.output_file("report.md"), "w") as f:
        f.write(table)
    reporting.write_json(report, ctx.output_file("report.json"))
    reporting.bar_chart(report, ctx.output_file("chart.png"))
    shardio.write_manifest(rows, ANSWER_SCHEMA, ctx.output_file("answers.parquet"))
    if judged is not None:
        shardio.write_manifest([it.row() for it in judged], judging.JUDGE_SCHEMA, ctx.output_file("judge.parquet"))
    stats = ShardStats(rows=len(rows), ok=len(rows))
    stats.extra = {"captions": cache_stats, "images": sum(len(ims) for ims in images.values()),
                   "questions": sum(len(im.questions) for ims in images.values() for im in ims),
                   "overall_mean": {n: report["captioners"][n]["mean"] for n in names}}
    return stats


Captions = dict[str, dict[str, dict[str, list[str]]]]
"""captioner -> benchmark -> image sha256 -> its k captions"""


def _caption(ctx: ShardContext, cfg: EvaluateConfig, images: dict[str, list[BenchImage]], cache: CaptionCache
             ) -> tuple[Captions, dict[str, str], dict[str, dict[str, int]]]:
    """Every captioner's captions of every benchmark (one engine at a time, loaded only if something is not
    cached), each captioner's model id, and per captioner how many images were cached / generated."""
    captions: Captions = {}
    models: dict[str, str] = {}
    stats: dict[str, dict[str, int]] = {}
    for name, raw in cfg.captioners.items():
        ecfg = captioner_config(ctx, raw)
        engine: list[Engine] = []

        def load(ecfg: EngineConfig = ecfg, engine: list[Engine] = engine) -> Engine:
            if not engine:
                log.info("loading captioner %s", ecfg.model)
                engine.append(create_engine(ecfg))
            return engine[0]

        models[name] = model_ident(ecfg, load)
        spec = CaptionSpec(cache_id(models[name]), cfg.prompt, cfg.k, cfg.sampling, ecfg.min_pixels,
                           ecfg.max_pixels, cfg.seed, cfg.abstain_below.get(name, 0.0))
        captions[name], made = {}, 0
        for bench, ims in images.items():
            hits = cache.hits
            captions[name][bench] = caption_all(load, spec, [(im.sha256, im.data) for im in ims], cache,
                                                cfg.caption_chunk)
            made += len(captions[name][bench]) - (cache.hits - hits)
        stats[name] = {"cached": sum(len(c) for c in captions[name].values()) - made, "generated": made}
        if engine:
            engine[0].close()
        ctx.log.info("evaluate: captioner %s: %s", name, stats[name])
    return captions, models, stats


def _caption_sets(cfg: EvaluateConfig, im: BenchImage, captions: Captions,
                  models: dict[str, str]) -> Iterator[tuple[str, str, list[str]]]:
    """(captioner, model id, captions) for one image: every captioner's k, then the baselines' one."""
    for name in cfg.captioners:
        yield name, models[name], captions[name][im.benchmark][im.sha256]
    for base in cfg.baselines:
        if base == "empty":
            yield base, "baseline:empty", [""]
        elif im.reference is not None:
            yield base, "baseline:reference", [im.reference]


def _add_faithfulness(report: dict[str, Any], cfg: EvaluateConfig, images: dict[str, list[BenchImage]],
                      captions: Captions, models: dict[str, str]) -> None:
    """Every captioner's faithfulness metrics (pipeline.faithful) per benchmark and overall, into the report:
    hallucination and coverage where the benchmark names its truth, repetition and length (words) always."""
    truth_kind = {b.name: b.truth for b in cfg.benchmarks}
    per: dict[str, dict[str, Any]] = {name: {} for name in report["captioners"]}
    for bench, ims in images.items():
        texts: dict[str, list[str]] = {}
        truths: dict[str, list[str | None]] = {}
        for im in ims:
            for name, _, caps in _caption_sets(cfg, im, captions, models):
                texts.setdefault(name, []).extend(caps)
                truths.setdefault(name, []).extend([im.truth] * len(caps))
        for name, caps in texts.items():
            kind = truth_kind[bench]
            checks = check_all(caps, truths[name], kind) if kind else None
            metrics = caption_metrics(caps, checks).to_dict()
            per[name][bench] = metrics
            if report["captioners"][name]["per_benchmark"].get(bench):
                report["captioners"][name]["per_benchmark"][bench]["faithfulness"] = metrics
    for name, by_bench in per.items():
        report["captioners"][name]["faithfulness"] = reporting.faithfulness(by_bench)


def _judge(ctx: ShardContext, cfg: EvaluateConfig, images: dict[str, list[BenchImage]], captions: Captions,
           models: dict[str, str], report: dict[str, Any]) -> list[judging.Judged]:
    """The VLM judge's scores of the first `captions_per_image` captions of every captioner (and the reference)
    per image, into the report (`judge`); the empty baseline states nothing and is not judged."""
    assert cfg.judge is not None
    items = [judging.Judged(bench, name, im.image_id, ci, caption, im.data)
             for bench, ims in images.items() for im in ims
             for name, _, caps in _caption_sets(cfg, im, captions, models) if name != "empty"
             for ci, caption in enumerate(caps[:cfg.judge.captions_per_image])]
    engine = create_engine(resolve_model(cfg.judge.engine))
    try:
        judging.judge_all(engine, items, cfg.judge)
        model_id = engine.model_id
    finally:
        engine.close()
    failed = [it for it in items if it.scores is None]
    if failed:
        ctx.log.warning("evaluate: the judge failed on %d/%d captions (recorded in judge.parquet): %s",
                        len(failed), len(items), failed[0].error)
    report["judge"] = {"model": model_id, "prompt": cfg.judge.prompt, "scale": cfg.judge.scale,
                       "captions_per_image": cfg.judge.captions_per_image,
                       "captioners": judging.summary(items, [n for n in report["captioners"] if n != "empty"])}
    return items


def _answer(cfg: EvaluateConfig, reader: Engine, images: dict[str, list[BenchImage]],
            captions: Captions, models: dict[str, str]) -> list[dict[str, Any]]:
    """Every reader answer as an answers.parquet row. Identical (caption, question) pairs are asked once."""
    plan: list[tuple[dict[str, Any], Item]] = []
    for bench, ims in images.items():
        for im in ims:
            for name, model_id, caps in _caption_sets(cfg, im, captions, models):
                for ci, caption in enumerate(caps):
                    for q in im.questions:
                        row = {"benchmark": bench, "captioner": name, "model_id": model_id, "image_id": im.image_id,
                               "image_sha256": im.sha256, "caption_index": ci, "caption": caption,
                               "caption_chars": len(caption), "question_id": q.id, "question": q.question,
                               "options": list(q.options), "answer": q.answer, "status": "ok"}
                        plan.append((row, Item(caption, q)))
    distinct = list(dict.fromkeys(item for _, item in plan))
    answers: dict[Item, Answer] = {}
    for start in range(0, len(distinct), READER_CHUNK):
        chunk = distinct[start:start + READER_CHUNK]
        answers.update(zip(chunk, answer_all(reader, chunk, cfg.answer_mode, cfg.abstain_option,
                                             cfg.reader_max_new_tokens), strict=True))
    rows = []
    for row, item in plan:
        a = answers[item]
        rows.append({**row, "reader_answer": a.letter, "correct": a.correct, "reader_raw": a.raw})
    return rows


def engines(config: RunConfig) -> dict[str, EngineConfig]:
    """Every captioner and the reader."""
    cfg = config.evaluate
    return {**{f"evaluate.captioners.{n}": e for n, e in cfg.captioners.items()}, "evaluate.reader": cfg.reader}


STAGE = Stage(
    name="evaluate",
    output_dir=OUTPUT_DIR,
    kind=WHOLE_RUN,
    inputs=(Input("qa", required=False), Input("train", required=False), Input("download", required=False)),
    schema=ANSWER_SCHEMA,
    run_whole=run_whole,
    prepare=prepare,
    unit=unit_of,
    default_shards=default_shards,
    resources=Resources(gpus=1),
    redo_on_new_settings=True,  # a report is remade from the caption cache: adding a captioner just reruns
    engines=engines,
    description="Prism-style caption quality: captioners' captions, a text-only reader answers benchmark MCQs",
)
