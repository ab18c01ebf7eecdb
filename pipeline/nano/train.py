"""The nano recipe: tokenizer, nano-VL (captioner + MCQ generator + gate filter), nano-reader.

Deterministic: fixed seeds, fixed step counts, one thread per training process (weights are
bit-identical for the same seed, thread count and torch build). Fresh scenes every step.

    python -m pipeline.nano.train --all            # rebuild everything under models/nano (~25 min)
    python -m pipeline.nano.train --model reader   # one model
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2ForCausalLM,
)

from pipeline.models.builders import (
    build_processor,
    build_tokenizer,
    save_model_dir,
    tiny_text_config,
    tiny_vl_config,
)
from pipeline.nano import data
from pipeline.nano.encode import collate_vl, reader_tree
from pipeline.nano.tree import tree_forward

REPO_ROOT = Path(__file__).resolve().parents[2]
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
class VLRecipe:
    steps: int = 1600
    batch: int = 16
    qagen_batch: int = 4
    filter_frac: float = 0.35
    snapshots: dict[str, int] = field(default_factory=lambda: {"nano-vl-step300": 300, "nano-vl-step600": 600})
    name: str = "nano-vl"
    lr: float = 1e-3
    warmup: int = 50
    phase2_steps: int = 1200
    phase2_lr: float = 5e-4
    phase2_warmup: int = 20
    phase3_steps: int = 0
    phase3_lr: float = 5e-4


@dataclass
class ReaderRecipe:
    steps: int = 1000
    captions: int = 8
    questions: int = 4
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 512
    per_example_loss: bool = True
    few_shot_frac: float = 1.0
    """fraction of steps whose prompts carry the two few-shot examples (the rest: no examples)"""
    name: str = "nano-reader"
    lr: float = 2e-3
    warmup: int = 50
    phase2_steps: int = 600
    phase2_lr: float = 1e-3
    phase2_warmup: int = 20
    phase3_steps: int = 1500
    phase3_lr: float = 1e-3


def _restart_schedule(recipe: VLRecipe | ReaderRecipe, phase: int, seed: int) -> Schedule:
    """Phase 2 or 3 (warm restarts): seeds torch for the phase; cosine lr -> lr/10."""
    steps, lr = (recipe.phase2_steps, recipe.phase2_lr) if phase == 2 else (recipe.phase3_steps, recipe.phase3_lr)
    torch.manual_seed(seed + phase - 1)
    return Schedule(steps=steps, lr=lr, min_lr=lr / 10, warmup=recipe.phase2_warmup)


def _warm_restarts(info: dict, recipe: VLRecipe | ReaderRecipe, run_phase: Callable[[int], dict]) -> None:
    """Run the recipe's phases 2 and 3 (those with steps) and add their steps, time and losses to `info`."""
    for phase, steps in ((2, recipe.phase2_steps), (3, recipe.phase3_steps)):
        if steps:
            more = run_phase(phase)
            info.update(steps=info["steps"] + more["steps"], seconds=round(info["seconds"] + more["seconds"], 1),
                        losses=info["losses"] + more["losses"])


def _optimizer(model: torch.nn.Module, sched: Schedule) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=sched.lr, betas=sched.betas, weight_decay=sched.weight_decay)


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


def _vl_steps(model: torch.nn.Module, tok: PreTrainedTokenizerBase, processor, recipe: VLRecipe,
              rng: random.Random, sched: Schedule, out_root: Path, tag: str, log: Log, device: str,
              snapshots: dict[str, int]) -> dict:
    """One optimisation phase of nano-VL (fresh AdamW): every step = a caption/filter batch + an
    MCQ-generation batch, losses summed."""
    model.train()
    opt = _optimizer(model, sched)
    losses: list[float] = []
    t0 = time.time()
    info: dict = {"snapshots": {}}
    for step in range(sched.steps):
        short = [data.filter_example(rng) if rng.random() < recipe.filter_frac else data.caption_example(rng)
                 for _ in range(recipe.batch)]
        loss = model(**collate_vl(tok, processor.image_processor, short).model_inputs(device)).loss
        if recipe.qagen_batch:
            qa = [data.qagen_example(rng) for _ in range(recipe.qagen_batch)]
            loss = loss + model(**collate_vl(tok, processor.image_processor, qa).model_inputs(device)).loss
        _step(model, opt, sched, step, loss)
        losses.append(loss.item())
        done = step + 1
        if done % 50 == 0 or done == sched.steps:
            log(f"[{tag}] step {done}/{sched.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                f"{time.time() - t0:.0f}s")
        if done % CHECKPOINT_EVERY == 0 and done < sched.steps:
            save_model_dir(model, tok, processor, out_root / CHECKPOINTS / f"{recipe.name}-{tag}-step{done}")
        for snap, at in snapshots.items():
            if done == at:
                save_model_dir(model, tok, processor, out_root / snap)
                info["snapshots"][snap] = {"steps": at, "seconds": round(time.time() - t0, 1)}
    info.update(steps=sched.steps, seconds=round(time.time() - t0, 1), losses=losses)
    return info


def vl_phase(model: torch.nn.Module, tok: PreTrainedTokenizerBase, out_root: Path, recipe: VLRecipe,
             phase: int, seed: int = SEED, log: Log = print, device: str = "cpu") -> dict:
    """Phase 2 or 3 (warm restarts): fresh AdamW, the phase's own data stream, cosine lr -> lr/10."""
    sched = _restart_schedule(recipe, phase, seed)
    return _vl_steps(model, tok, build_processor(tok), recipe, data.stream(seed, f"vl-train-{phase}"), sched,
                     out_root, f"vl{phase}", log, device, {})


def train_vl(tok: PreTrainedTokenizerBase, out_root: Path, recipe: VLRecipe, seed: int = SEED,
             log: Log = print, device: str = "cpu") -> dict:
    """Multi-task nano-VL: phase 1 from scratch (snapshots on the way), then the optional phase 2."""
    torch.manual_seed(seed)
    rng = data.stream(seed, "vl-train")
    processor = build_processor(tok)
    model = Qwen2_5_VLForConditionalGeneration(tiny_vl_config(tok)).to(device)
    sched = Schedule(steps=recipe.steps, lr=recipe.lr, min_lr=recipe.lr / 10, warmup=recipe.warmup)
    info = _vl_steps(model, tok, processor, recipe, rng, sched, out_root, "vl", log, device, recipe.snapshots)
    _warm_restarts(info, recipe, lambda phase: vl_phase(model, tok, out_root, recipe, phase, seed, log, device))
    save_model_dir(model, tok, processor, out_root / recipe.name)
    return info


def reader_loss(model: torch.nn.Module, tok: PreTrainedTokenizerBase, rng: random.Random, n_captions: int,
                k: int, per_example: bool = False, few_shot: bool = True) -> torch.Tensor:
    """Cross-entropy of the targets over a tree of n_captions captions x k questions each: the mean over
    target tokens, or (per_example) each question's summed answer loss, averaged over questions."""
    groups, targets = [], []
    for _ in range(n_captions):
        cap, items = data.reader_group(rng, k)
        groups.append((cap, [s for s, _ in items]))
        targets.append([data.option_target(a) for _, a in items])
    prefix, mids, leaves, plens = reader_tree(tok, groups, targets, few_shot=few_shot)
    _, logits, leaf_ids, leaf_mask = tree_forward(model, prefix, mids, leaves, tok.pad_token_id)
    labels = leaf_ids.clone()
    labels[leaf_mask == 0] = -100
    for r, n in enumerate(p for row in plens for p in row):
        labels[r, :n] = -100
    flat = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none")
    if per_example:  # every question weighs the same, however long its answer text
        return flat.view(labels.shape[0], -1).sum(1).mean()
    return flat.sum() / (labels[:, 1:] != -100).sum()


def _reader_steps(model: torch.nn.Module, tok: PreTrainedTokenizerBase, recipe: ReaderRecipe,
                  rng: random.Random, sched: Schedule, out_root: Path, tag: str, log: Log) -> dict:
    """One optimisation phase of the reader (fresh AdamW)."""
    model.train()
    opt = _optimizer(model, sched)
    losses: list[float] = []
    t0 = time.time()
    for step in range(sched.steps):
        few_shot = recipe.few_shot_frac >= 1 or rng.random() < recipe.few_shot_frac
        loss = reader_loss(model, tok, rng, recipe.captions, recipe.questions, recipe.per_example_loss, few_shot)
        _step(model, opt, sched, step, loss)
        losses.append(loss.item())
        done = step + 1
        if done % 50 == 0 or done == sched.steps:
            log(f"[{tag}] step {done}/{sched.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                f"{time.time() - t0:.0f}s")
        if done % CHECKPOINT_EVERY == 0 and done < sched.steps:
            save_model_dir(model, tok, None, out_root / CHECKPOINTS / f"{recipe.name}-{tag}-step{done}")
    return {"steps": sched.steps, "seconds": round(time.time() - t0, 1), "losses": losses}


def reader_phase(model: torch.nn.Module, tok: PreTrainedTokenizerBase, out_root: Path, recipe: ReaderRecipe,
                 phase: int, seed: int = SEED, log: Log = print) -> dict:
    """Phase 2 or 3 (warm restarts): fresh AdamW, the phase's own data stream, cosine lr -> lr/10."""
    sched = _restart_schedule(recipe, phase, seed)
    return _reader_steps(model, tok, recipe, data.stream(seed, f"reader-train-{phase}"), sched, out_root,
                         f"reader{phase}", log)


def train_reader(tok: PreTrainedTokenizerBase, out_root: Path, recipe: ReaderRecipe, seed: int = SEED,
                 log: Log = print, device: str = "cpu") -> dict:
    """Text-only nano-reader: answers ' ' + option text + '.' after the reward's exact prompt and pre-fill."""
    torch.manual_seed(seed)
    rng = data.stream(seed, "reader-train")
    cfg = tiny_text_config(tok, hidden=recipe.hidden, layers=recipe.layers, heads=recipe.heads,
                             kv_heads=recipe.kv_heads, ffn=recipe.ffn)
    model = Qwen2ForCausalLM(cfg).to(device)
    sched = Schedule(steps=recipe.steps, lr=recipe.lr, min_lr=recipe.lr / 10, warmup=recipe.warmup)
    info = _reader_steps(model, tok, recipe, rng, sched, out_root, "reader", log)
    _warm_restarts(info, recipe, lambda phase: reader_phase(model, tok, out_root, recipe, phase, seed, log))
    save_model_dir(model, tok, None, out_root / recipe.name)
    return info


# -- orchestration --------------------------------------------------------------------------------
def _job(kind: str, out_root: str, seed: int, threads: int, overrides: dict, device: str) -> dict:
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    root = Path(out_root)
    tok = AutoTokenizer.from_pretrained(root / TOKENIZER_DIR)
    logf = open(root / f"train_{kind}.log", "a", buffering=1)  # noqa: SIM115 - closed below

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")

    recipe = VLRecipe(**overrides) if kind == "vl" else ReaderRecipe(**overrides)
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


def update_manifest(out: Path, infos: list[dict], seed: int, threads: int, device: str) -> dict:
    """Record each trained model (recipe, steps, time, final loss) and every model folder's sha256."""
    import transformers

    path = out / "MANIFEST.json"
    manifest = json.loads(path.read_text()) if path.exists() else {"models": {}}
    common = {"seed": seed, "threads": threads, "torch": torch.__version__, "device": device,
              "transformers": transformers.__version__, "command": "python -m pipeline.nano.train --all"}
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
    ap.add_argument("--all", action="store_true", help="tokenizer + nano-VL + nano-reader (two processes)")
    ap.add_argument("--model", choices=["vl", "reader"], action="append", default=[])
    ap.add_argument("--out", default=str(NANO_DIR))
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads per training process")
    ap.add_argument("--vl-steps", type=int, default=None)
    ap.add_argument("--reader-steps", type=int, default=None)
    ap.add_argument("--no-eval", action="store_true", help="skip the eval written into MANIFEST.json")
    ap.add_argument("--device", default="cpu", help="cpu (the reference) or cuda")
    ap.add_argument("--tokenizer", default=None, help="reuse this tokenizer dir instead of training one")
    args = ap.parse_args(argv)
    kinds = ["vl", "reader"] if args.all else args.model
    if not kinds:
        ap.error("pass --all or --model vl|reader")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else make_tokenizer(args.seed)
    tok.save_pretrained(out / TOKENIZER_DIR)
    overrides = {"vl": {} if args.vl_steps is None else {"steps": args.vl_steps},
                 "reader": {} if args.reader_steps is None else {"steps": args.reader_steps}}
    jobs = [(k, str(out), args.seed, args.threads, overrides[k], args.device) for k in kinds]
    if len(jobs) == 1:
        results = [_job(*jobs[0])]
    else:
        with mp.get_context("spawn").Pool(len(jobs)) as pool:
            results = pool.starmap(_job, jobs)
    infos = dict(zip(kinds, results, strict=True))
    failed = {k: v["error"] for k, v in infos.items() if "error" in v}
    update_manifest(out, [v for v in infos.values() if "error" not in v], args.seed, args.threads, args.device)
    if failed:
        print(f"training failed: {failed}", file=sys.stderr)
        return 1
    if not args.no_eval:
        from pipeline.nano import eval as nano_eval

        nano_eval.main(["--models", str(out), "--write-manifest", "--device", args.device])
    return 0


if __name__ == "__main__":
    sys.exit(main())
