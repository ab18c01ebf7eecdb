"""The nano recipe: tokenizer, nano-VL (captioner + MCQ generator), nano-filter (the gate), nano-reader.

Deterministic: fixed seeds, fixed step counts, one thread per training process (weights are
bit-identical for the same seed, thread count and torch build). Fresh scenes every step.

    python -m pipeline.nano.train --all            # rebuild everything under models/nano (~27 min)
    python -m pipeline.nano.train --model reader   # one model (--model filter: from models/nano/nano-vl)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2ForCausalLM,
)

from pipeline.nano import data, world
from pipeline.nano.builders import (
    IMAGE_TOKENS,
    build_processor,
    build_tokenizer,
    save_model_dir,
    tiny_text_config,
    tiny_vl_config,
)
from pipeline.nano.encode import (
    answer_copy_targets,
    collate_drill,
    collate_vl,
    first_option_targets,
    ids,
    image_region_targets,
    image_token_labels,
    question_word_targets,
    reader_tree,
    split_reader_prompt,
    token_at,
)
from pipeline.nano.tree import tree_forward
from pipeline.resources import repo_path

REPO_ROOT = repo_path()
NANO_DIR = REPO_ROOT / "models" / "nano"
TOKENIZER_DIR = "tokenizer"
SEED = 1234
THREADS = 1
CHECKPOINTS = "_checkpoints"
CHECKPOINT_EVERY = 200


@dataclass
class Schedule:
    steps: int
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 50
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    clip: float = 1.0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


@dataclass
class Phase:
    """One optimisation phase: fresh AdamW, warm-up then cosine lr -> lr/10, its own data stream.

    Per-step batch sizes: for nano-VL, captions / filters / qagen examples; for the reader, `captions`
    captions x the recipe's `questions` in the exact reward prompt (a tree) and `drill` short drill
    sequences (caption, question, value: `drill_loss`)."""

    steps: int
    lr: float
    warmup: int = 50
    captions: int = 0
    filters: int = 0
    qagen: int = 0
    drill: int = 0

    def schedule(self) -> Schedule:
        return Schedule(steps=self.steps, lr=self.lr, min_lr=self.lr / 10, warmup=self.warmup)


@dataclass
class VLRecipe:
    """nano-VL: captioning alone first (perception; the under-trained snapshots come from it), then all
    three tasks (captions, gate-filter answers, MCQ generation) on the learned features."""

    phases: list[Phase] = field(default_factory=lambda: [
        Phase(steps=1500, lr=1e-3, captions=32),
        Phase(steps=700, lr=5e-4, warmup=20, captions=12, filters=12, qagen=4),
        Phase(steps=800, lr=5e-4, warmup=20, captions=8, filters=24, qagen=8),
    ])
    snapshots: dict[str, int] = field(default_factory=lambda: dict(data.SNAPSHOTS))
    name: str = "nano-vl"
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 1
    attention_weight: float = 1.0
    attention_layer: int = -1
    region_head: int | None = 1
    option_head: int | None = 0
    copy_head: int | None = None
    option_layer: int | None = None
    region_filter: bool = False
    """attention supervision (weight, text layer, heads; None: off): region_head makes each generated answer
    letter and text (and with region_filter the gate filter's answer) look at the image tokens where the
    answer is read (image_region_targets); option_head makes each answer letter look at its question's
    option A (first_option_targets; in text layer option_layer, default attention_layer); copy_head makes
    answer texts copies of the option their letter names (answer_copy_targets)"""
    word_layer: int = 0
    shape_word_head: int | None = None
    color_word_head: int | None = None
    """attention supervision (weight attention_weight; None: off) of the gate filter's question gathering:
    at the positions that predict a filter answer, these heads of word_layer attend to the question's
    shape / colour word when the question names its object by look (question_word_targets)"""
    filter_type_weights: dict[str, float] = field(default_factory=dict)
    """sampling weight of each question type in the gate filter's examples (default 1: the scene's
    questions uniformly; data.filter_example)"""
    leak_queries: float = 0.0
    """share of the gate filter's text-only queries that are leaky (data.leaky_filter_example: the answer
    stated in the question, or the only option of the asked kind; target the leaked answer, and with the
    word heads on, the head of a stated colour / shape word looks at it), so the gate's text-only arm sees
    such leaks itself (0: off, the data stream unchanged)"""
    full_captions: float = 1.0
    """share of the caption examples that are full captions; below 1 the rest are terse, true captions
    (data.caption_example: count, background and at most the first object; 1: the data stream unchanged)"""
    absent_queries: float = 0.0
    """share of the gate filter's queries that are absent-thing questions about a quadrant
    (data.absent_filter_example: "There is no shape in the <quadrant>." keyed when it is empty; 0: off, the
    data stream unchanged)"""
    position_probe: float = 0.0
    object_probe: float = 0.0
    """weights of auxiliary losses (training only; the probes are not saved): linear probes on the residual
    after the first text layer predict each image token's quadrant (position_probe) and the shape and
    colour of the object in that quadrant (object_probe), so that a question naming an object can find
    its tokens by content (ImageProbe)"""

    start_from: str | None = None
    """a model folder under the output root to start from (its architecture; None: fresh weights)"""

    def config(self, tok: PreTrainedTokenizerBase):
        head_dim = 128 // self.text_heads
        section = (head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16)
        return tiny_vl_config(tok, layers=self.text_layers, heads=self.text_heads, kv_heads=self.text_kv_heads,
                              mrope_section=section)


@dataclass
class FilterRecipe(VLRecipe):
    """nano-filter, the gate's filter model: nano-VL fine-tuned on the gate's queries alone, with the
    circuit for "Where is the <colour> <shape>?" told where to look: first-layer heads gather the
    question's shape / colour word, a position probe makes the first layer write each image token's
    quadrant, and the last layer's region head looks at the object the question names. Its own model
    because in nano-VL's two text layers that supervision breaks MCQ generation (docs/nano.md)."""

    phases: list[Phase] = field(default_factory=lambda: [
        Phase(steps=400, lr=5e-4, warmup=20, captions=4, filters=32),
        Phase(steps=400, lr=3e-4, warmup=20, captions=4, filters=32),
    ])
    snapshots: dict[str, int] = field(default_factory=dict)
    name: str = "nano-filter"
    start_from: str | None = "nano-vl"
    region_filter: bool = True
    shape_word_head: int | None = 0
    color_word_head: int | None = 1
    position_probe: float = 1.0
    leak_queries: float = 0.5


@dataclass
class FilterAbsentRecipe(FilterRecipe):
    """nano-filter-absent: nano-filter fine-tuned with absent-thing questions among its queries (a quarter of
    them: "What shape is in the <quadrant>?" with "There is no shape in the <quadrant>." offered), so that the
    gate can keep the demo world's absent-thing questions (qa.absent, the faithfulness lever of docs/train.md)."""

    phases: list[Phase] = field(default_factory=lambda: [
        Phase(steps=300, lr=3e-4, warmup=20, captions=4, filters=32),
    ])
    name: str = "nano-filter-absent"
    start_from: str | None = "nano-filter"
    absent_queries: float = 0.25


@dataclass
class BriefRecipe(VLRecipe):
    """nano-vl-brief: nano-VL fine-tuned to caption tersely: 15% of its training captions are full, the rest
    state the count, the background and at most the first object, all true. It sees as well as nano-VL but
    its greedy caption leaves most objects out: the start for RL that is asked to make captions denser
    without inventing (the CapRL situation: a base captioner that sees, writing short captions; docs/train.md)."""

    phases: list[Phase] = field(default_factory=lambda: [
        Phase(steps=400, lr=3e-4, warmup=20, captions=32),
    ])
    snapshots: dict[str, int] = field(default_factory=dict)
    name: str = "nano-vl-brief"
    start_from: str | None = "nano-vl"
    full_captions: float = 0.15


@dataclass
class ReaderRecipe:
    """nano-reader: a text-only Qwen2; the drill first, then the drill with the exact reward prompt (a tree
    of captions x questions); answers are option text."""

    phases: list[Phase] = field(default_factory=lambda: [
        Phase(steps=2000, lr=3e-4, drill=32),
        Phase(steps=1300, lr=2e-4, warmup=20, captions=8, drill=16),
    ])
    questions: int = 4
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 512
    init_std: float = 0.08
    """initial weight std (the default 0.02 leaves the reader longer on its first plateau)"""
    per_example_loss: bool = True
    few_shot_frac: float = 0.5
    """fraction of steps whose prompts carry the two few-shot examples (the rest: no examples)"""
    drill_weight: float = 1.0
    drill_questions: int = 2
    """questions asked per drill caption (each answer supervised)"""
    attention_weight: float = 1.0
    attention_layer: int = -1
    attention_head: int = 0
    """attention supervision in the drill and the reward-prompt tree (drill_loss, reader_loss): weight, and
    which layer's which head"""
    absent_questions: float = 0.0
    invented_captions: float = 0.0
    """shares of absent-thing questions and of captions that invent objects (data.reader_group; 0: off)"""
    name: str = "nano-reader"
    start_from: str | None = None
    """a reader folder under the output root to start from (None: fresh weights)"""

    @property
    def attention(self) -> tuple[float, int, int]:
        """(weight, layer, head), the form drill_loss and reader_loss take."""
        return self.attention_weight, self.attention_layer, self.attention_head


def scaled(recipe: VLRecipe | ReaderRecipe, factor: float) -> VLRecipe | ReaderRecipe:
    """The recipe with every phase's step count (and snapshot step) multiplied by `factor` (quick runs)."""
    phases = [replace(p, steps=max(1, round(p.steps * factor)), warmup=max(1, round(p.warmup * min(1.0, factor))))
              for p in recipe.phases]
    if isinstance(recipe, VLRecipe):
        snaps = {k: max(1, round(v * factor)) for k, v in recipe.snapshots.items()}
        return replace(recipe, phases=phases, snapshots=snaps)
    return replace(recipe, phases=phases)


def _optimizer(model: torch.nn.Module, sched: Schedule, extra: Sequence[torch.nn.Parameter] = ()
               ) -> torch.optim.Optimizer:
    return torch.optim.AdamW([*model.parameters(), *extra], lr=sched.lr, betas=sched.betas,
                             weight_decay=sched.weight_decay)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Schedule, step: int, loss: torch.Tensor) -> None:
    for g in opt.param_groups:
        g["lr"] = sched.lr_at(step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), sched.clip)
    opt.step()


def make_tokenizer(seed: int = SEED) -> PreTrainedTokenizerBase:
    return build_tokenizer(data.tokenizer_corpus(seed), vocab_size=512)


def _sha_dir(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


Log = Callable[[str], None]
StepLoss = Callable[[random.Random], torch.Tensor]
Save = Callable[[Path], None]


def run_phase(model: torch.nn.Module, recipe: VLRecipe | ReaderRecipe, index: int, seed: int, loss_fn: StepLoss,
              save: Save, out_root: Path, log: Log, step_offset: int = 0) -> dict:
    """Phase `index` of the recipe: torch seeded with seed + index, the phase's own scene stream, fresh
    AdamW; checkpoints every CHECKPOINT_EVERY steps and the recipe's snapshots (counted over all phases)."""
    phase = recipe.phases[index]
    torch.manual_seed(seed + index)
    rng = data.stream(seed, f"{recipe.name}-train-{index}")
    sched = phase.schedule()
    snapshots = getattr(recipe, "snapshots", {})
    model.train()
    opt = _optimizer(model, sched, getattr(loss_fn, "extra_parameters", ()))
    losses: list[float] = []
    t0 = time.time()
    snaps: dict[str, dict] = {}
    for step in range(phase.steps):
        loss = loss_fn(rng)
        _step(model, opt, sched, step, loss)
        losses.append(loss.item())
        done = step + 1
        if done % 50 == 0 or done == phase.steps:
            log(f"[{recipe.name} phase {index + 1}] step {done}/{phase.steps} "
                f"loss {sum(losses[-50:]) / len(losses[-50:]):.4f} {time.time() - t0:.0f}s")
        if done % CHECKPOINT_EVERY == 0 and done < phase.steps:
            save(out_root / CHECKPOINTS / f"{recipe.name}-phase{index + 1}-step{done}")
        for snap, at in snapshots.items():
            if step_offset + done == at:
                save(out_root / snap)
                snaps[snap] = {"steps": at, "seconds": round(time.time() - t0, 1)}
    return {"steps": phase.steps, "seconds": round(time.time() - t0, 1), "losses": losses, "snapshots": snaps}


def train_phases(model: torch.nn.Module, recipe: VLRecipe | ReaderRecipe, seed: int, loss_fns: list[StepLoss],
                 save: Save, out_root: Path, log: Log) -> dict:
    """Every phase in order (phase i uses loss_fns[i]), then the final save under the recipe's name;
    steps, seconds and losses summed over phases, snapshot times counted from the start."""
    info: dict = {"steps": 0, "seconds": 0.0, "losses": [], "snapshots": {}}
    for index, loss_fn in enumerate(loss_fns):
        part = run_phase(model, recipe, index, seed, loss_fn, save, out_root, log, step_offset=info["steps"])
        for snap, s in part["snapshots"].items():
            info["snapshots"][snap] = {**s, "seconds": round(info["seconds"] + s["seconds"], 1)}
        info.update(steps=info["steps"] + part["steps"], seconds=round(info["seconds"] + part["seconds"], 1),
                    losses=info["losses"] + part["losses"])
    save(out_root / recipe.name)
    return info


# -- nano-VL --------------------------------------------------------------------------------------
class ImageProbe(torch.nn.Module):
    """Training-only linear probes from each image token's residual to what the scene has there: its
    quadrant (world.POSITIONS) and the shape and colour of the object in that quadrant (or none)."""

    SIZES = {"position": len(world.POSITIONS), "shape": len(world.SHAPES) + 1, "color": len(world.COLORS) + 1}

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, n) for k, n in self.SIZES.items()})
        for head in self.heads.values():
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)

    def loss(self, hidden: torch.Tensor, image_mask: torch.Tensor, scenes: Sequence[world.Scene],
             weights: dict[str, float]) -> torch.Tensor:
        """Sum over probes of weight x cross-entropy over every image's IMAGE_TOKENS tokens, in batch order
        (0 for a batch without images)."""
        total = hidden.new_zeros(())
        if not scenes:
            return total
        x = hidden[image_mask].view(len(scenes), IMAGE_TOKENS, hidden.shape[-1])
        labels = [image_token_labels(s) for s in scenes]
        for name, w in weights.items():
            if w > 0:
                y = torch.tensor([v for lab in labels for v in lab[name]], device=hidden.device)
                logits = self.heads[name](x).reshape(-1, self.SIZES[name])
                total = total + w * torch.nn.functional.cross_entropy(logits.float(), y)
        return total


def vl_loss_fn(model: torch.nn.Module, tok: PreTrainedTokenizerBase, processor, phase: Phase,
               device: str, recipe: VLRecipe | None = None) -> StepLoss:
    """One nano-VL step's loss: a mixed caption + filter batch, plus (if any) an MCQ-generation batch
    (long sequences, so batched on their own); the two mean token losses are summed, plus the recipe's
    attention supervision (weight x attention_loss of the chosen heads of one text layer): region_head,
    option_head and copy_head on the MCQ-generation batch, region_head (region_filter) on the filter questions."""
    weight, layer = (recipe.attention_weight, recipe.attention_layer) if recipe else (0.0, -1)
    copy_head = recipe.copy_head if recipe and weight > 0 else None
    region_head = recipe.region_head if recipe and weight > 0 else None
    option_head = recipe.option_head if recipe and weight > 0 else None
    region_filter = bool(recipe and recipe.region_filter)
    option_layer = layer if recipe is None or recipe.option_layer is None else recipe.option_layer
    weights = recipe.filter_type_weights if recipe else {}
    leak = recipe.leak_queries if recipe else 0.0
    absent = recipe.absent_queries if recipe else 0.0
    full = recipe.full_captions if recipe else 1.0
    probe_weights = {"position": recipe.position_probe, "shape": recipe.object_probe,
                     "color": recipe.object_probe} if recipe else {}
    probe = ImageProbe(model.config.text_config.hidden_size).to(device) \
        if any(w > 0 for w in probe_weights.values()) else None

    def supervised(out, examples: list[data.Example], head: int | None, targets, at: int = layer) -> torch.Tensor:
        if head is None:
            return torch.zeros((), device=device)
        return weight * attention_loss(out.attentions[at][:, head], [targets(tok, ex) for ex in examples])

    def filter_query(rng: random.Random) -> data.Example:
        if absent > 0 and rng.random() < absent:
            return data.absent_filter_example(rng)
        return data.filter_example(rng, type_weights=weights, leak=leak)

    def loss(rng: random.Random) -> torch.Tensor:
        kinds = ["caption"] * phase.captions + ["filter"] * phase.filters
        total = torch.zeros((), device=device)
        if kinds:
            short = [data.caption_example(rng, full) if k == "caption" else filter_query(rng) for k in kinds]
            words = [(h, kind) for h, kind in ((recipe.shape_word_head, "shape"), (recipe.color_word_head, "color"))
                     if h is not None] if recipe and weight > 0 else []
            watch = (region_head is not None and region_filter) or bool(words)
            batch = collate_vl(tok, processor.image_processor, short)
            out = model(**batch.model_inputs(device), output_attentions=watch,
                        output_hidden_states=probe is not None)
            total = total + out.loss
            if probe is not None:
                image_mask = (batch.input_ids == batch.image_token_id).to(device)
                scenes = [ex.scene for ex in short if ex.image is not None]
                total = total + probe.loss(out.hidden_states[1], image_mask, scenes, probe_weights)  # type: ignore[arg-type]
            if region_head is not None and region_filter:
                total = total + supervised(out, short, region_head, image_region_targets)
            for head, kind in words:
                total = total + supervised(out, short, head, partial(question_word_targets, kind=kind),
                                           recipe.word_layer)  # type: ignore[union-attr]
        if phase.qagen:
            qa = [data.qagen_example(rng) for _ in range(phase.qagen)]
            watch = any(h is not None for h in (copy_head, region_head, option_head))
            out = model(**collate_vl(tok, processor.image_processor, qa).model_inputs(device),
                        output_attentions=watch)
            total = total + out.loss
            if watch:
                total = total + supervised(out, qa, region_head, image_region_targets)
                total = total + supervised(out, qa, option_head, first_option_targets, option_layer)
                total = total + supervised(out, qa, copy_head, answer_copy_targets)
        return total

    if probe is not None:
        loss.extra_parameters = list(probe.parameters())  # type: ignore[attr-defined]
    return loss


def vl_phase(model: torch.nn.Module, tok: PreTrainedTokenizerBase, out_root: Path, recipe: VLRecipe,
             index: int, seed: int = SEED, log: Log = print, device: str = "cpu") -> dict:
    """Run phase `index` of the recipe on `model` alone (e.g. resuming from a saved earlier phase)."""
    processor = build_processor(tok)
    model = _attention_ready(model, recipe)
    return run_phase(model, recipe, index, seed,
                     vl_loss_fn(model, tok, processor, recipe.phases[index], device, recipe),
                     lambda path: save_model_dir(model, tok, processor, path), out_root, log)


def train_vl(tok: PreTrainedTokenizerBase, out_root: Path, recipe: VLRecipe, seed: int = SEED,
             log: Log = print, device: str = "cpu") -> dict:
    """A nano-VL recipe: every phase (snapshots on the way), from fresh weights or from the model folder
    `recipe.start_from` under out_root (nano-filter starts from nano-VL)."""
    processor = build_processor(tok)
    torch.manual_seed(seed)
    model = _initial_model(Qwen2_5_VLForConditionalGeneration, recipe, out_root, lambda: recipe.config(tok), device)
    fns = [vl_loss_fn(model, tok, processor, p, device, recipe) for p in recipe.phases]
    return train_phases(model, recipe, seed, fns, lambda path: save_model_dir(model, tok, processor, path),
                        out_root, log)


# -- nano-reader ----------------------------------------------------------------------------------
def tree_attention_targets(tok: PreTrainedTokenizerBase, groups: list[tuple[str, list]], answers: list[list[str]],
                           prefix: list[int], mids: list[list[int]], plens: list[list[int]], few_shot: bool,
                           ) -> list[list[tuple[int, int]]]:
    """For each leaf of a reader tree (row-major), the (leaf position, key position) attention pairs: every
    position that predicts a value token of a stated answer attends to where the caption states it; key
    positions index tree_forward's leaf attention keys (prefix, then the left-padded mids)."""
    width = max(len(m) for m in mids)
    attend: list[list[tuple[int, int]]] = []
    for g, (cap, shows) in enumerate(groups):
        _, mid_text, _ = split_reader_prompt(tok, cap, shows[0], few_shot)
        offsets = tok(mid_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        base = len(prefix) + width - len(mids[g])
        for j, shown in enumerate(shows):
            end = data.evidence_end(cap, shown.mcq) if answers[g][j] != data.CANNOT_ANSWER else None
            pairs = []
            if end is not None:
                key = base + token_at(offsets, end - 1)
                first = plens[g][j] - 1  # the leaf position that predicts the first value token
                pairs = [(first + t, key) for t in range(len(ids(tok, " " + answers[g][j])))]
            attend.append(pairs)
    return attend


def reader_loss(model: torch.nn.Module, tok: PreTrainedTokenizerBase, rng: random.Random, n_captions: int,
                k: int, per_example: bool = False, few_shot: bool = True,
                attention: tuple[float, int, int] = (0.0, -1, 0), mix: tuple[float, float] = (0.0, 0.0)
                ) -> torch.Tensor:
    """Cross-entropy of the targets over a tree of n_captions captions x k questions each: the mean over
    target tokens, or (per_example) each question's summed answer loss, averaged over questions.

    attention = (weight, layer, head): as in drill_loss, plus weight x the attention loss of that head at
    each position that predicts a value token, its target the caption token where the answer is stated.
    mix = (absent-thing question share, inventing caption share) of data.reader_group."""
    weight, layer, head = attention
    groups, targets, answers = [], [], []
    for _ in range(n_captions):
        cap, items = data.reader_group(rng, k, *mix)
        groups.append((cap, [s for s, _ in items]))
        targets.append([data.option_target(a) for _, a in items])
        answers.append([a for _, a in items])
    prefix, mids, leaves, plens = reader_tree(tok, groups, targets, few_shot=few_shot)
    attns: list | None = [] if weight > 0 else None
    _, logits, leaf_ids, leaf_mask = tree_forward(model, prefix, mids, leaves, tok.pad_token_id, attns)
    labels = leaf_ids.clone()
    labels[leaf_mask == 0] = -100
    for r, n in enumerate(p for row in plens for p in row):
        labels[r, :n] = -100
    flat = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none")
    if per_example:  # every question weighs the same, however long its answer text
        loss = flat.view(labels.shape[0], -1).sum(1).mean()
    else:
        loss = flat.sum() / (labels[:, 1:] != -100).sum()
    if attns is None:
        return loss
    attend = tree_attention_targets(tok, groups, answers, prefix, mids, plens, few_shot)
    return loss + weight * attention_loss(attns[layer][:, head], attend)


def attention_loss(attentions: torch.Tensor, attend: Sequence[Sequence[tuple[int, int | Sequence[int]]]]
                   ) -> torch.Tensor:
    """Mean -log attention weight of each supervised (query, target) pair; attentions [B, T, T] (one head).
    A target may be several key positions (a region): then -log of the weight summed over them."""
    rows = [(b, q, t) for b, pairs in enumerate(attend) for q, t in pairs]
    if not rows:
        return attentions.sum() * 0
    if all(isinstance(t, int) for _, _, t in rows):
        b, q, t = (torch.tensor(x, device=attentions.device) for x in zip(*rows, strict=True))
        return -torch.log(attentions[b, q, t] + 1e-6).mean()
    flat = [(i, b, q, k) for i, (b, q, t) in enumerate(rows) for k in ([t] if isinstance(t, int) else t)]
    i, b, q, k = (torch.tensor(x, device=attentions.device) for x in zip(*flat, strict=True))
    mass = torch.zeros(len(rows), dtype=attentions.dtype, device=attentions.device).index_add(0, i, attentions[b, q, k])
    return -torch.log(mass + 1e-6).mean()


def drill_loss(model: torch.nn.Module, tok: PreTrainedTokenizerBase, rng: random.Random, n: int,
               questions: int = 1, attention: tuple[float, int, int] = (0.0, -1, 0),
               mix: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """Mean answer-token loss over n drill sequences ('Caption: ...', 'Question: ...', 'The answer is'
    value): short, mostly full captions, the question right before its answer, so the caption-reading
    circuits form long before they would from the full reward prompt alone (where the long prompt
    dilutes the signal and mixed question types interfere).

    attention = (weight, layer, head): with weight > 0, plus weight x the attention loss of that head at
    each position that predicts a value token, whose target is the caption token where the caption states
    the answer (for an object, the last word of its clause). Without it the reader sits for thousands of
    steps on copying *some* colour / shape / position from the caption (about 0.7 accuracy) and never binds
    attributes to their object; with it binding is learned within about a thousand steps (docs/nano.md)."""
    weight, layer, head = attention
    absent, invent = mix
    batch, attend = collate_drill(tok, [data.drill_sequence(rng, questions, absent=absent, invent=invent)
                                        for _ in range(n)])
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()}, output_attentions=weight > 0)
    if weight <= 0:
        return out.loss
    return out.loss + weight * attention_loss(out.attentions[layer][:, head], attend)


def reader_loss_fn(model: torch.nn.Module, tok: PreTrainedTokenizerBase, recipe: ReaderRecipe,
                   phase: Phase) -> StepLoss:
    """One reader step's loss: the reward-prompt tree (if the phase has captions) + the drill (if any)."""

    mix = (recipe.absent_questions, recipe.invented_captions)

    def loss(rng: random.Random) -> torch.Tensor:
        total = torch.zeros((), device=next(model.parameters()).device)
        if phase.captions:
            few_shot = recipe.few_shot_frac >= 1 or rng.random() < recipe.few_shot_frac
            total = total + reader_loss(model, tok, rng, phase.captions, recipe.questions, recipe.per_example_loss,
                                        few_shot, recipe.attention, mix)
        if phase.drill:
            total = total + recipe.drill_weight * drill_loss(model, tok, rng, phase.drill, recipe.drill_questions,
                                                             recipe.attention, mix)
        return total

    return loss


def _initial_model(cls: Any, recipe: VLRecipe | ReaderRecipe, out_root: Path, config: Callable[[], Any],
                   device: str) -> torch.nn.Module:
    """Fresh weights of `config()`, or the model folder `recipe.start_from` under out_root (a fine-tune),
    made ready for the recipe's attention supervision."""
    if recipe.start_from:
        start = out_root / recipe.start_from
        if not (start / "config.json").is_file():
            raise FileNotFoundError(f"{recipe.name} starts from {start}, which holds no model: train it first")
        model = cls.from_pretrained(start).to(device)
    else:
        model = cls(config()).to(device)
    return _attention_ready(model, recipe)


def _attention_ready(model: torch.nn.Module, recipe: VLRecipe | ReaderRecipe) -> torch.nn.Module:
    """The eager attention implementation when the recipe supervises attention (only it returns attention
    weights); the saved model loads with the default implementation, same numbers."""
    if recipe.attention_weight > 0:
        model.set_attn_implementation("eager")
    return model


def reader_phase(model: torch.nn.Module, tok: PreTrainedTokenizerBase, out_root: Path, recipe: ReaderRecipe,
                 index: int, seed: int = SEED, log: Log = print) -> dict:
    """Run phase `index` of the recipe on `model` alone (e.g. resuming from a saved earlier phase)."""
    model = _attention_ready(model, recipe)
    return run_phase(model, recipe, index, seed, reader_loss_fn(model, tok, recipe, recipe.phases[index]),
                     lambda path: save_model_dir(model, tok, None, path), out_root, log)


def train_reader(tok: PreTrainedTokenizerBase, out_root: Path, recipe: ReaderRecipe, seed: int = SEED,
                 log: Log = print, device: str = "cpu") -> dict:
    """Text-only nano-reader: answers ' ' + option text + '.' after the reward's exact prompt and pre-fill."""
    torch.manual_seed(seed)
    cfg = tiny_text_config(tok, hidden=recipe.hidden, layers=recipe.layers, heads=recipe.heads,
                           kv_heads=recipe.kv_heads, ffn=recipe.ffn)
    cfg.initializer_range = recipe.init_std
    model = _initial_model(Qwen2ForCausalLM, recipe, out_root, lambda: cfg, device)
    fns = [reader_loss_fn(model, tok, recipe, p) for p in recipe.phases]
    return train_phases(model, recipe, seed, fns, lambda path: save_model_dir(model, tok, None, path),
                        out_root, log)


@dataclass
class ReaderAbsentRecipe(ReaderRecipe):
    """nano-reader-absent: nano-reader fine-tuned with absent-thing questions and inventing captions, so that
    it answers what a caption says is in a quadrant (an invented shape too) and "cannot answer" when it says
    nothing: the reader for the absent-thing lever (qa.absent, reward.absent_abstain; docs/train.md)."""

    phases: list[Phase] = field(default_factory=lambda: [
        Phase(steps=500, lr=1e-4, warmup=20, captions=8, drill=16),
    ])
    absent_questions: float = 0.25
    invented_captions: float = 0.15
    name: str = "nano-reader-absent"
    start_from: str | None = "nano-reader"


# -- orchestration --------------------------------------------------------------------------------
RECIPES = {"vl": VLRecipe, "filter": FilterRecipe, "reader": ReaderRecipe, "filter-absent": FilterAbsentRecipe,
           "reader-absent": ReaderAbsentRecipe, "vl-brief": BriefRecipe}
FULL_RUN = ("vl", "filter", "reader")
"""what --all trains (the -absent models are fine-tunes of nano-filter and nano-reader: --model filter-absent)"""


def _job(kind: str, out_root: str, seed: int, threads: int, scale: float, device: str) -> dict:
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    root = Path(out_root)
    tok = AutoTokenizer.from_pretrained(root / TOKENIZER_DIR)
    logf = open(root / f"train_{kind}.log", "a", buffering=1)  # noqa: SIM115 - closed below

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")

    recipe = scaled(RECIPES[kind](), scale)
    try:
        if isinstance(recipe, VLRecipe):
            info = train_vl(tok, root, recipe, seed, log, device)
        else:
            info = train_reader(tok, root, recipe, seed, log, device)
    except Exception as exc:  # one failed model must not kill the other's run
        log(f"[{kind}] FAILED: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}", "recipe": asdict(recipe)}
    finally:
        logf.close()
    info["recipe"] = asdict(recipe)
    return info


def train_models(kinds: Sequence[str], job_args: tuple, pool: Any, while_filter_trains: Callable[[], None] | None = None
                 ) -> dict[str, dict]:
    """Train the requested models on `pool` (one task each, `_job(kind, *job_args)`). nano-filter starts
    from nano-VL's weights, so when both are requested it is queued once nano-VL is done (and skipped
    if nano-VL failed). `while_filter_trains` runs here once every other model is trained, while
    nano-filter still trains (the eval's other sections: the core the other models freed)."""
    wanted = list(dict.fromkeys(kinds))
    pending = {k: pool.apply_async(_job, (k, *job_args)) for k in wanted if k != "filter"}
    infos: dict[str, dict] = {}
    gate = None
    if "filter" in wanted:
        if "vl" in pending:
            infos["vl"] = pending.pop("vl").get()
        if "error" in infos.get("vl", {}):
            infos["filter"] = {"error": "skipped: nano-VL failed", "recipe": asdict(FilterRecipe())}
        else:
            gate = pool.apply_async(_job, ("filter", *job_args))
    infos.update({k: job.get() for k, job in pending.items()})
    if gate is not None:
        if while_filter_trains is not None and not any("error" in v for v in infos.values()):
            while_filter_trains()
        infos["filter"] = gate.get()
    return {k: infos[k] for k in wanted}


def update_manifest(out: Path, infos: list[dict], seed: int, threads: int, device: str,
                    command: str = "python -m pipeline.nano.train --all") -> dict:
    """Record each trained model (recipe, steps, time, final loss) and every model folder's sha256."""
    import transformers

    path = out / "MANIFEST.json"
    manifest = json.loads(path.read_text()) if path.exists() else {"models": {}}
    common = {"seed": seed, "threads": threads, "torch": torch.__version__, "device": device,
              "transformers": transformers.__version__, "command": command}
    for info in infos:
        recipe = info["recipe"]
        losses = info["losses"]
        manifest["models"][recipe["name"]] = {
            **common, "recipe": recipe, "steps": info["steps"], "train_seconds": info["seconds"],
            "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4)}
        for snap, sinfo in info.get("snapshots", {}).items():
            manifest["models"][snap] = {**common, "snapshot_of": recipe["name"], "steps": sinfo["steps"],
                                        "train_seconds": sinfo["seconds"]}
    for name in manifest["models"]:
        manifest["models"][name]["sha256"] = _sha_dir(out / name)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.nano.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true",
                    help="tokenizer, nano-VL then nano-filter, and nano-reader (two processes), then the eval")
    ap.add_argument("--model", choices=list(RECIPES), action="append", default=[],
                    help="one model (repeatable); filter starts from the nano-vl already under --out")
    ap.add_argument("--out", default=str(NANO_DIR))
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads per training process")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every phase's step count (quick trials; the committed models use 1)")
    ap.add_argument("--no-eval", action="store_true", help="skip the eval written into MANIFEST.json")
    ap.add_argument("--device", default="cpu", help="cpu (the reference) or cuda")
    ap.add_argument("--tokenizer", default=None,
                    help="reuse this tokenizer dir instead of training one (default with --model: --out's tokenizer)")
    args = ap.parse_args(argv)
    kinds = list(FULL_RUN) if args.all else args.model
    if not kinds:
        ap.error(f"pass --all or --model {'|'.join(RECIPES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    here = out / TOKENIZER_DIR
    source = Path(args.tokenizer) if args.tokenizer else (here if not args.all and here.is_dir() else None)
    tok = AutoTokenizer.from_pretrained(source) if source else make_tokenizer(args.seed)
    if source is None or source.resolve() != here.resolve():  # a fine-tune leaves the models' tokenizer as it is
        tok.save_pretrained(here)
    job_args = (str(out), args.seed, args.threads, args.scale, args.device)
    from pipeline.nano import eval as nano_eval

    evaluate = not args.no_eval and set(kinds) == set(FULL_RUN)
    early: dict[str, float] = {}

    def eval_models() -> None:  # nano-VL, the reader and the snapshots are final: evaluate them meanwhile (1 thread)
        early.update(nano_eval.run(out, data.N_EVAL_SCENES, device=args.device, sections=["models"]))

    with mp.get_context("spawn").Pool(min(2, len(kinds))) as pool:
        infos = train_models(kinds, job_args, pool, eval_models if evaluate else None)
    failed = {k: v["error"] for k, v in infos.items() if "error" in v}
    command = "python -m pipeline.nano.train " + ("--all" if args.all else " ".join(f"--model {k}" for k in kinds))
    update_manifest(out, [v for v in infos.values() if "error" not in v], args.seed, args.threads, args.device, command)
    if failed:
        print(f"training failed: {failed}", file=sys.stderr)
        return 1
    if evaluate:
        res = early | nano_eval.run(out, data.N_EVAL_SCENES, device=args.device, sections=["gate"])
        res["eval_seconds"] = round(early["eval_seconds"] + res["eval_seconds"], 1)
        nano_eval.write_manifest(out, res, data.N_EVAL_SCENES)
        nano_eval.report(res)
    elif not args.no_eval:
        nano_eval.main(["--models", str(out), "--write-manifest", "--device", args.device])
    return 0


if __name__ == "__main__":
    sys.exit(main())
