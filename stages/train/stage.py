"""train: RL of the captioner with the CapRL reward on the kept questions of the qa shards, or `load`.

One whole-run unit, ROOT/checkpoints/<train.name>/: a plain Hugging Face folder (weights, config, processor,
chat template) that annotate and evaluate name `train:latest`, plus train_log.jsonl and train_summary.json.
Progress (TRL checkpoints every `save_steps`) lives in ROOT/checkpoints/_progress/<name>/ on a local root and
in run.work_dir otherwise; a killed run resumes from it when the settings and data are unchanged.
With `train.load` the stage validates a trained checkpoint (a vision-language model with a processor that
captions an image) and registers a copy of it instead of training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

from pipeline.config import EngineConfig, RunConfig, TrainConfig
from pipeline.engines.base import Sampling, create_engine, image_request
from pipeline.engines.common import model_identity
from pipeline.errors import ConfigError
from pipeline.resources import resolve_model, resolve_resource
from pipeline.reward import CapRLReward
from pipeline.shards import parse_shard_spec
from pipeline.stage import WHOLE_RUN, Input, Resources, RunContext, ShardContext, ShardStats, Stage
from pipeline.storage import Storage
from stages.train import data
from stages.train.reward_fn import CaptionReward

OUTPUT_DIR = "checkpoints"
PROGRESS_DIR = "checkpoints/_progress"
SUMMARY_FILE = "train_summary.json"
MODEL_FILES = (".json", ".safetensors", ".jinja", ".txt", ".model", ".tiktoken", ".py", ".bin")
"""Files of a checkpoint folder that `load` copies (weights, configs, tokenizer, processor, chat template)."""
MODEL_FREE = ("noop", "nano-rule")
"""Reader backends that need no model path."""


def unit_of(config: RunConfig) -> str:
    return config.train.name


def default_shards(config: RunConfig, storage: Storage) -> list[int]:
    """Every committed qa shard except those the evaluate stage holds out (kind qa benchmarks); none for load."""
    if config.train.load:
        return []
    held = {s for b in config.evaluate.benchmarks if b.kind == "qa" and b.shards for s in parse_shard_spec(b.shards)}
    shards = sorted(s for s in storage.committed("qa") if s not in held)
    if not shards:
        raise ConfigError(f"train reads the kept questions of the qa shards, and none is committed under "
                          f"{storage.root_url} (outside evaluate's held-out shards): run qa first, or give train.load")
    return shards


def prepare(run: RunContext) -> None:
    """Refuse, with one line, a run that cannot work, before anything is claimed or loaded."""
    cfg = run.config.train
    if cfg.load:
        check_checkpoint(resolve_resource(cfg.load), "train.load")
        return
    check(cfg)


def check(cfg: TrainConfig) -> None:
    if not cfg.policy.model:
        raise ConfigError("train.policy.model is not set: give the starting checkpoint (or train.load to register "
                          "a trained one)")
    if cfg.reward.reader.backend not in MODEL_FREE and not cfg.reward.reader.model:
        raise ConfigError("train.reward.reader.model is not set: the reward needs a text-only reader")
    audit = cfg.audit.reward
    if audit is not None:
        if audit.reader.backend not in MODEL_FREE and not audit.reader.model:
            raise ConfigError("train.audit.reward.reader.model is not set")
        if reader_identity(audit.reader) == reader_identity(cfg.reward.reader) and audit.mode == cfg.reward.mode:
            raise ConfigError("train.audit.reward must use another reader than train.reward (the audit catches a "
                              "policy that exploits its training reader)")
    check_checkpoint(resolve_resource(cfg.policy.model), "train.policy.model")


def reader_identity(cfg: EngineConfig) -> tuple[str, str, str]:
    return cfg.backend, resolve_resource(cfg.model), cfg.base_url if cfg.backend == "openai" else ""


def check_checkpoint(path: str, setting: str) -> None:
    """A local folder holding a vision-language model with a processor (one clear error otherwise)."""
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if not path:
        raise ConfigError(f"{setting} is empty")
    if not os.path.isdir(path):
        raise ConfigError(f"{setting}: {path!r} is not a checkpoint folder (no such directory)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{setting}: {path!r} holds no readable model config: {str(exc).splitlines()[0]}") from None
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ConfigError(f"{setting}: {path!r} is a text-only model (model_type {config.model_type!r}); the "
                          "captioner must be a vision-language model such as Qwen2.5-VL")
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{setting}: {path!r} has no usable processor: {str(exc).splitlines()[0]}") from None
    if getattr(processor, "image_processor", None) is None:
        raise ConfigError(f"{setting}: {path!r} has no image processor (processor files are missing)")
    if not getattr(processor, "chat_template", None) and not getattr(processor.tokenizer, "chat_template", None):
        raise ConfigError(f"{setting}: {path!r} has no chat template")


# -- load -----------------------------------------------------------------------------------------
def sample_image() -> Any:
    """An image to caption when registering a checkpoint: a demo-world scene (deterministic)."""
    import random

    from pipeline.nano import world

    return world.render(world.sample_scene(random.Random(0)))


def run_load(ctx: ShardContext, cfg: TrainConfig) -> ShardStats:
    """Caption one image with the checkpoint (`prepare` checked the folder) and register a copy of it."""
    source = resolve_resource(cfg.load or "")
    engine_cfg = cfg.policy.model_copy(update={"backend": "hf", "model": source, "label": cfg.load})
    engine = create_engine(engine_cfg)
    try:
        gens = engine.generate([image_request(cfg.prompt, sample_image())], Sampling(max_new_tokens=64))
        caption = gens[0][0].text if gens and gens[0] else ""
        model_id = engine.model_id
    finally:
        engine.close()
    copied = 0
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if os.path.isfile(path) and name.endswith(MODEL_FILES):
            shutil.copy2(path, ctx.output_file(name))
            copied += 1
    summary = {"mode": "load", "source": cfg.load, "model_id": model_id, "sample_caption": caption, "files": copied}
    _write_json(ctx.output_file(SUMMARY_FILE), summary)
    ctx.log.info("train: registered %s (sample caption: %r)", cfg.load, caption[:120])
    return ShardStats(rows=1, ok=1, extra=summary)


# -- RL -------------------------------------------------------------------------------------------
def progress_dir(ctx: ShardContext) -> str:
    """Where TRL's checkpoints of this unit live while it trains (survives a killed process)."""
    if ctx.storage.is_local:
        return ctx.storage.path(f"{PROGRESS_DIR}/{ctx.unit}")
    root = hashlib.sha256(ctx.storage.root_url.encode()).hexdigest()[:12]
    return os.path.join(ctx.storage.work_dir or tempfile.gettempdir(), "caprl-train-progress", f"{root}-{ctx.unit}")


def image_folder(ctx: ShardContext) -> str:
    """A local folder for the training images (shared by units and reruns: files are named by content)."""
    return os.path.join(ctx.storage.work_dir or tempfile.gettempdir(), "caprl-train-images")


def build_reward(cfg_reward: Any) -> CapRLReward:
    return CapRLReward.from_config(cfg_reward.model_copy(update={"reader": resolve_model(cfg_reward.reader)}))


def run_whole(ctx: ShardContext, shards: list[int]) -> ShardStats:
    cfg = ctx.config.train
    if cfg.load:
        return run_load(ctx, cfg)
    from stages.train.audit import Audit  # torch: imported by the functions that train, never at declaration
    from stages.train.trainer import run_rl

    images = data.collect(ctx.config, ctx.storage, shards, image_folder(ctx),
                          lambda stage, shard: ctx.require_input(stage, shard))
    train_images, held_out = data.split(images, cfg.audit.images if cfg.audit.every > 0 else 0)
    if not train_images:
        raise ConfigError(f"train: the qa shards {shards[:5]}{'...' if len(shards) > 5 else ''} kept no question "
                          f"for any image outside the {len(held_out)} held out for the audit")
    policy = resolve_model(cfg.policy)
    reward = build_reward(cfg.reward)
    audit_reward = build_reward(cfg.audit.reward) if cfg.audit.reward is not None else None
    audit = Audit(cfg.audit, held_out, reward, audit_reward, cfg.prompt, cfg.max_new_tokens) if held_out else None
    identity = {"fingerprint": ctx.config.fingerprint("train"), "data": data.dataset_digest(images),
                "policy": model_identity(policy.model, policy.revision)}
    final_dir = tempfile.mkdtemp(prefix="caprl-train-final-", dir=ctx.storage.work_dir)
    try:
        summary = run_rl(cfg, policy.model, train_images, held_out,
                         CaptionReward(reward, cfg.length, cfg.max_missing_share, cfg.repetition), audit, progress_dir(ctx),
                         identity, final_dir)
        publish(ctx, final_dir)
    finally:
        shutil.rmtree(final_dir, ignore_errors=True)
        for r in (reward, audit_reward):
            if r is not None:
                r.reader.close()
    summary = {"mode": "rl", "algorithm": cfg.algorithm, "policy": cfg.policy.model, **summary}
    _write_json(ctx.output_file(SUMMARY_FILE), summary)
    last = summary.get("last_step") or {}
    ctx.log.info("train: %d steps, last reward %s", summary["steps"], last.get("reward_mean"))
    return ShardStats(rows=summary["steps"], ok=summary["steps"],
                      extra={k: summary[k] for k in ("steps", "resumed_from", "images", "held_out", "last_step")})


def progress(config: RunConfig, storage: Storage, unit: str) -> str | None:
    """`status`'s line for a train unit: the last logged step (of the committed checkpoint, else of the run in
    progress) with its reward, and the last audit."""
    from stages.train.trainer import LOG_FILE, parse_log, summarize_log

    if config.train.load and unit == config.train.name:
        return None
    for rel, what in ((f"{OUTPUT_DIR}/{unit}/{LOG_FILE}", "trained"), (f"{PROGRESS_DIR}/{unit}/{LOG_FILE}", "in progress")):
        if storage.exists(rel):
            with storage.open(rel, "rb") as f:
                line = summarize_log(parse_log(f.read().decode()))
            return f"{what}: {line}" if line else None
    return None


def publish(ctx: ShardContext, folder: str) -> None:
    """Move every file of a local folder into this unit's outputs (the committed artifact folder)."""
    for base, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(base, name)
            os.replace(path, ctx.output_file(os.path.relpath(path, folder).replace(os.sep, "/")))


def _write_json(path: str, value: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True, default=str)


def engines(config: RunConfig) -> dict[str, EngineConfig]:
    """The registered checkpoint (train.load), else the policy, the reward's reader and the audit's."""
    cfg = config.train
    if cfg.load:
        return {"train.load": cfg.policy.model_copy(update={"backend": "hf", "model": cfg.load})}
    out = {"train.policy": cfg.policy, "train.reward.reader": cfg.reward.reader}
    if cfg.audit.reward is not None:
        out["train.audit.reward.reader"] = cfg.audit.reward.reader
    return out


STAGE = Stage(
    name="train",
    output_dir=OUTPUT_DIR,
    kind=WHOLE_RUN,
    inputs=(Input("qa", required=False), Input("download", required=False)),
    run_whole=run_whole,
    prepare=prepare,
    unit=unit_of,
    default_shards=default_shards,
    resources=Resources(gpus=1),
    engines=engines,
    launcher="accelerate",
    progress=progress,
    description="RL of the captioner with the CapRL reward (TRL GRPO/RLOO), or register a trained checkpoint",
)
