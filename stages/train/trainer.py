"""RL of the captioner with TRL: GRPO (the paper, KL to the starting policy) or RLOO (the released recipe).

`run_rl` builds the trainer from `train:` settings, resumes from the last checkpoint of the same run (same
settings, same data), and writes one JSON line per optimizer step (plus the audits) to `train_log.jsonl`.
TRL owns the loop: sampling G captions per image, advantages (with None rewards masked), the clipped policy
loss, KL, checkpoints. This module only configures it and watches it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from pipeline.config import TrainConfig
from pipeline.engines.grid import ImageGrid
from pipeline.engines.preprocess import prepare_image
from pipeline.errors import ConfigError
from pipeline.runner import secondary_rank
from stages.train.audit import Audit
from stages.train.data import TrainImage, prompt_dataset
from stages.train.reward_fn import CaptionReward

log = logging.getLogger("stages.train")

LOG_FILE = "train_log.jsonl"
STEP_FIELDS = {
    "reward": "reward_mean", "reward_std": "reward_std", "frac_reward_zero_std": "zero_variance_groups",
    "completions/mean_length": "caption_tokens", "completions/clipped_ratio": "truncated_share",
    "missing_rewards": "missing_rewards", "reader_calls_per_s": "reader_calls_per_s", "learning_rate": "lr",
    "repeated_ngrams": "repeated_ngrams",
    "kl": "kl", "loss": "loss", "grad_norm": "grad_norm", "entropy": "entropy",
}
"""TRL's metric name -> the name in train_log.jsonl."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def per_device_batch(cfg: TrainConfig, processes: int) -> int:
    """Completions per device per micro-step: images_per_step x num_generations over processes x accumulation."""
    total = cfg.images_per_step * cfg.num_generations
    per = total // (processes * cfg.gradient_accumulation_steps)
    if per < 1 or per * processes * cfg.gradient_accumulation_steps != total:
        raise ConfigError(
            f"train: images_per_step x num_generations = {total} captions per step cannot be split over "
            f"{processes} process(es) x {cfg.gradient_accumulation_steps} accumulation step(s)")
    return per


def trainer_args(cfg: TrainConfig, output_dir: str, use_cpu: bool, steps: int) -> Any:
    """GRPOConfig / RLOOConfig for `cfg` (see docs/train.md for how each setting maps)."""
    from trl import GRPOConfig, RLOOConfig

    common: dict[str, Any] = dict(
        output_dir=output_dir, per_device_train_batch_size=per_device_batch(cfg, world_size()),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_generations=cfg.num_generations,
        num_iterations=cfg.num_iterations, epsilon=cfg.epsilon,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, beta=cfg.beta,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, max_steps=steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.keep_checkpoints,
        seed=cfg.seed, data_seed=cfg.seed, logging_steps=1, report_to=report_targets(cfg), remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=use_cpu, bf16=not use_cpu and cfg.dtype == "bfloat16",
        fp16=not use_cpu and cfg.dtype == "float16",
        **({"gradient_checkpointing": True} if cfg.gradient_checkpointing else {}),
        log_completions=False, disable_tqdm=False, save_only_model=False,
    )
    if cfg.algorithm == "grpo":
        return GRPOConfig(**common, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards)
    return RLOOConfig(**common)


def report_targets(cfg: TrainConfig) -> list[str]:
    """TRL's `report_to` for train.report_to: none -> [], tensorboard (event files under the progress folder's
    runs/), wandb in offline mode (WANDB_MODE=offline unless set; `wandb sync` uploads later)."""
    if cfg.report_to == "none":
        return []
    import importlib.util

    packages = ("tensorboard", "tensorboardX") if cfg.report_to == "tensorboard" else ("wandb",)
    if not any(importlib.util.find_spec(p) is not None for p in packages):
        raise ConfigError(f"train.report_to={cfg.report_to} needs the {packages[0]} package "
                          f"(pip install {packages[0]}), or set train.report_to=none")
    if cfg.report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
    return [cfg.report_to]


def total_steps(cfg: TrainConfig, n_images: int) -> int:
    """max_steps, else `epochs` passes over the training images (each generation batch of images_per_step
    images serves num_iterations optimizer steps)."""
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_images / cfg.images_per_step)) * cfg.num_iterations


def last_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint-K folder (one with trainer_state.json), or None."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith("checkpoint-") and name[11:].isdigit() and os.path.isfile(
                os.path.join(path, "trainer_state.json")):
            found.append((int(name[11:]), path))
    return max(found)[1] if found else None


def checkpoint_step(path: str | None) -> int:
    return int(os.path.basename(path)[11:]) if path else 0


def prepare_progress(output_dir: str, identity: dict[str, Any]) -> str | None:
    """Make `output_dir` this run's progress folder: keep it (and return its last checkpoint) when it was
    made by the same settings and data, else clear it. Writes progress.json."""
    meta_path = os.path.join(output_dir, "progress.json")
    if os.path.isdir(output_dir):
        try:
            with open(meta_path) as f:
                found = json.load(f)
        except (OSError, ValueError):
            found = None
        if found != identity:
            log.warning("train: %s holds another run's progress (settings or data changed); starting over",
                        output_dir)
            shutil.rmtree(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    with open(meta_path + ".tmp", "w") as f:
        json.dump(identity, f, sort_keys=True)
    os.replace(meta_path + ".tmp", meta_path)
    return last_checkpoint(output_dir)


def wait_progress(output_dir: str, identity: dict[str, Any], timeout_s: float = 600.0) -> str | None:
    """A non-zero rank: wait until rank 0 has made the progress folder this run's, then resume from the same
    checkpoint."""
    meta_path = os.path.join(output_dir, "progress.json")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with open(meta_path) as f:
                if json.load(f) == identity:
                    return last_checkpoint(output_dir)
        except (OSError, ValueError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"rank 0 did not prepare {output_dir} within {timeout_s:.0f}s")


def parse_log(text: str) -> list[dict[str, Any]]:
    """The records of a train_log.jsonl (a torn last line is skipped)."""
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def read_log(path: str, upto: int | None = None) -> list[dict[str, Any]]:
    """The log's records (those of steps <= upto, when given)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        records = parse_log(f.read())
    return [r for r in records if upto is None or int(r.get("step", 0)) <= upto]


def summarize_log(records: list[dict[str, Any]]) -> str | None:
    """One line from a train log's records: the last step with its reward, and the last audit."""
    steps = [r for r in records if "reward_mean" in r]
    audits = [r["audit"] for r in records if "audit" in r]
    if not steps and not audits:
        return None
    parts = []
    if steps:
        s = steps[-1]
        parts.append(f"step {s['step']}/{s.get('max_steps', '?')}, reward {s['reward_mean']:.3f}"
                     + (f" (std {s['reward_std']:.3f})" if s.get("reward_std") is not None else "")
                     + (f", {s['missing_rewards']:.0f} missing" if s.get("missing_rewards") else ""))
    if audits:
        a = audits[-1]
        vals = ", ".join(f"{k} {a[k]:.3f}" for k in ("train_reward", "audit_reward", "truth") if a.get(k) is not None)
        parts.append(f"audit at step {a['step']}: {vals}" + (" ALARM" if a.get("alarm") else ""))
    return "; ".join(parts)


def rewrite_log(path: str, records: list[dict[str, Any]]) -> None:
    with open(path + ".tmp", "w") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    os.replace(path + ".tmp", path)


@dataclass
class StepLog(TrainerCallback):
    """One JSON line per optimizer step in train_log.jsonl (and the audits, on their step's line)."""

    path: str
    audit: Audit | None
    reward: CaptionReward | None = None
    trainer: Any = None
    load_image: Any = None
    started: float = field(default_factory=time.time)
    pending_audit: dict[str, Any] | None = None

    def _audit(self, step: int, model: Any) -> None:
        if self.audit is None or not self.audit.due(step) or secondary_rank():
            return
        processor = self.trainer.processing_class
        unwrapped = self.trainer.accelerator.unwrap_model(model)
        result = self.audit.run(step, unwrapped, processor, self.load_image)
        self.pending_audit = result.record()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self._audit(state.global_step, model)
        if self.pending_audit is not None and state.global_step == 0:
            self.write({"step": 0, "audit": self.pending_audit})
            self.pending_audit = None

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self._audit(state.global_step, model)
        delay = os.environ.get("PIPELINE_TEST_TRAIN_STEP_DELAY_S")  # test hook: time to kill a run mid-way
        if delay:
            time.sleep(float(delay))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if secondary_rank() or not logs or "train_runtime" in logs:
            return
        rec: dict[str, Any] = {"step": state.global_step, "max_steps": state.max_steps,
                               "seconds": round(time.time() - self.started, 2)}
        for src, dst in STEP_FIELDS.items():
            if src in logs and logs[src] is not None:
                rec[dst] = logs[src]
        if self.reward is not None and state.global_step in self.reward.step_images:
            rec["images"] = self.reward.step_images.pop(state.global_step)
        if self.pending_audit is not None:
            rec["audit"] = self.pending_audit
            self.pending_audit = None
        self.write(rec)

    def write(self, rec: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")


def quiet_progress_bar(trainer: Any) -> None:
    """Keep TRL's progress bar but drop the metrics dict it prints on every step (they go to the JSON log)."""
    from transformers.trainer_callback import ProgressCallback

    class _Bar(ProgressCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if self.training_bar is not None and logs and logs.get("reward") is not None:
                self.training_bar.set_postfix(reward=f"{logs['reward']:.3f}", refresh=False)

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_Bar())


def load_policy(path: str, cfg: TrainConfig, use_cpu: bool) -> tuple[Any, Any, ImageGrid]:
    """The policy model, its processor (with the policy's pixel budget as its default: TRL calls it without
    one) and its image grid, from a checkpoint folder."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = torch.float32 if use_cpu else {"bfloat16": torch.bfloat16, "float16": torch.float16,
                                           "float32": torch.float32}[cfg.dtype]
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    processor = AutoProcessor.from_pretrained(path)
    grid = ImageGrid.from_processor(processor, cfg.policy)
    grid.apply_to(processor)
    return model, processor, grid


def run_rl(cfg: TrainConfig, policy_path: str, train_images: list[TrainImage], held_out: list[TrainImage],
           reward: CaptionReward, audit: Audit | None, progress_dir: str, identity: dict[str, Any],
           final_dir: str) -> dict[str, Any]:
    """Train (resuming where the same run stopped), save the final checkpoint to `final_dir` as a plain Hugging
    Face folder, copy the log there; returns a summary."""
    from trl import GRPOTrainer, RLOOTrainer

    use_cpu = not torch.cuda.is_available() or cfg.policy.device == "cpu"
    log_path = os.path.join(progress_dir, LOG_FILE)
    if not secondary_rank():
        resume = prepare_progress(progress_dir, identity)
        rewrite_log(log_path, read_log(log_path, upto=checkpoint_step(resume)))
    else:
        resume = wait_progress(progress_dir, identity)
    if audit is not None:
        audit.history = [r["audit"] for r in read_log(log_path) if "audit" in r]
    steps = total_steps(cfg, len(train_images))
    model, processor, grid = load_policy(policy_path, cfg, use_cpu)
    dataset = prompt_dataset(train_images, cfg.prompt, grid)
    args = trainer_args(cfg, progress_dir, use_cpu, steps)
    step_log = StepLog(log_path, audit, reward,
                       load_image=lambda im: prepare_image(im.path, grid))
    cls = GRPOTrainer if cfg.algorithm == "grpo" else RLOOTrainer
    trainer = cls(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                  processing_class=processor, callbacks=[step_log])
    step_log.trainer = trainer
    quiet_progress_bar(trainer)
    if resume:
        log.info("train: resuming from %s", resume)
    started = time.time()
    trainer.train(resume_from_checkpoint=resume)
    final_step = trainer.state.global_step
    if audit is not None and audit.images and cfg.audit.every > 0 and not secondary_rank() and (
            not audit.history or audit.history[-1]["step"] != final_step):
        result = audit.run(final_step, trainer.accelerator.unwrap_model(trainer.model), processor, step_log.load_image)
        step_log.write({"step": final_step, "audit": result.record(), "final": True})
    if not secondary_rank():
        os.makedirs(final_dir, exist_ok=True)
        trainer.save_model(final_dir)
        processor.save_pretrained(final_dir)
        shutil.copy(log_path, os.path.join(final_dir, LOG_FILE))
    records = read_log(log_path)
    steps_done = [r for r in records if "reward_mean" in r]
    return {"steps": trainer.state.global_step, "resumed_from": checkpoint_step(resume),
            "seconds": round(time.time() - started, 1), "images": len(train_images), "held_out": len(held_out),
            "last_step": steps_done[-1] if steps_done else None,
            "audits": [r["audit"] for r in records if "audit" in r], "reward_totals": reward.totals}
