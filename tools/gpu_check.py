"""GPU throughput check: random-weight models with the real Qwen2.5-VL-3B and Qwen3-VL-4B architectures on the
hf engine (GPU_CHECK_FAMILIES, default both: "qwen2.5-vl,qwen3-vl"; the first family's results are the top-level
keys of RESULTS, each other family's sit under its name, and later families skip the baseline and the profile).

Run through tools/gpu_check.sh. Phases per family (each reports and goes on if it fails):
1. imports: what is present, what is missing (nothing is installed: the GPU machine may be offline);
2. model: the Qwen2.5-VL-3B or Qwen3-VL-4B config written out explicitly, random bf16 weights created on the
   GPU, saved as a checkpoint directory with a tokenizer/processor (its own patch size) from
   pipeline/nano/builders.py;
3. engine: the hf engine (pipeline/engines/hf.py) over N images with exactly T new tokens each
   (min_new_tokens = max_new_tokens), twice in the same call: `engine_baseline` with the settings of
   the first H200 record (eager decoding, batch GPU_CHECK_BATCH, every image encoded first) and
   `engine` with the engine's own choice (`compile: true`: static KV cache + compiled decode step;
   `batch_memory`: rows per batch from free GPU memory, at most GPU_CHECK_MAX_BATCH; images encoded
   one batch ahead). Images/s, output tokens/s, the speedup, the share of a roofline estimate
   (prefill FLOPs at the card's bf16 peak + decode reading weights and KV cache at its bandwidth),
   peak memory, and a profile of a few decode steps (GPU kernel time against wall time). Then the
   new engine over the stage phase's images alone. Without the pipeline's dependencies, the same
   measurement with transformers' generate directly;
4. stage: the annotate stage over one image shard with the same loaded engine: images/s, and the
   stage / engine ratio on the same images;
5. grpo: TRL's GRPOTrainer on the same model as the train stage builds it (stages/train: trainer
   settings, policy loading, dataset), 4 images x 8 generations x GPU_CHECK_GRPO_TOKENS (256) caption
   tokens per step, a random reward (no reader: the policy's side), GPU_CHECK_GRPO_STEPS (3) steps:
   seconds per step after the first. Skipped with GPU_CHECK_GRPO=0 or when trl is missing.

GPU_CHECK_TINY=1 runs a tiny config on CPU (checks the script's logic in a minute).
Env: GPU_CHECK_IMAGES (512), GPU_CHECK_TOKENS (256), GPU_CHECK_BATCH (256), GPU_CHECK_SIDE (448),
GPU_CHECK_STAGE_IMAGES (256), GPU_CHECK_DIR (scratch dir), GPU_CHECK_FALLBACK=1 (force phase 3's fallback),
GPU_CHECK_MAX_BATCH (1024), GPU_CHECK_MEMORY (0.85: the engine's batch_memory), GPU_CHECK_BASELINE=0 (skip it).
"""

from __future__ import annotations

import importlib
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TINY = os.environ.get("GPU_CHECK_TINY") == "1"
N_IMAGES = int(os.environ.get("GPU_CHECK_IMAGES", "16" if TINY else "512"))
TOKENS = int(os.environ.get("GPU_CHECK_TOKENS", "8" if TINY else "256"))
BATCH = int(os.environ.get("GPU_CHECK_BATCH", "8" if TINY else "256"))
SIDE = int(os.environ.get("GPU_CHECK_SIDE", "112" if TINY else "448"))
STAGE_IMAGES = int(os.environ.get("GPU_CHECK_STAGE_IMAGES", "12" if TINY else "256"))
FORCE_FALLBACK = os.environ.get("GPU_CHECK_FALLBACK") == "1"
MAX_BATCH = int(os.environ.get("GPU_CHECK_MAX_BATCH", "16" if TINY else "1024"))
MEMORY = float(os.environ.get("GPU_CHECK_MEMORY", "0.85"))
BASELINE = os.environ.get("GPU_CHECK_BASELINE", "1") != "0"
GRPO = os.environ.get("GPU_CHECK_GRPO", "1") != "0"
GRPO_STEPS = int(os.environ.get("GPU_CHECK_GRPO_STEPS", "3"))
GRPO_TOKENS = int(os.environ.get("GPU_CHECK_GRPO_TOKENS", "8" if TINY else "256"))
PROMPT = "Please describe this image in detail."
# dense bf16 peak FLOP/s and memory bandwidth (bytes/s) by card name, for the roofline estimate
CARDS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}
FAMILIES = [f.strip() for f in os.environ.get("GPU_CHECK_FAMILIES", "qwen2.5-vl,qwen3-vl").split(",") if f.strip()]
RESULTS: dict[str, object] = {}
OUT: dict[str, object] = RESULTS
"""Where the current family's results go (RESULTS itself for the first family)."""

# Qwen2.5-VL-3B-Instruct's architecture (its config.json), written out.
QWEN25_VL_3B_TEXT = {
    "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
    "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "hidden_act": "silu", "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 32768,
    "max_window_layers": 70, "attention_dropout": 0.0,
}
QWEN25_VL_3B_VISION = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_chans": 3, "in_channels": 3,
    "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "hidden_act": "silu",
}
TINY_TEXT = {**QWEN25_VL_3B_TEXT, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 512,
             "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}}
TINY_VISION = {**QWEN25_VL_3B_VISION, "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
               "out_hidden_size": 64, "fullatt_block_indexes": [1]}
# Qwen3-VL-4B-Instruct's architecture (its config.json; the text model is Qwen3-4B's), written out.
QWEN3_VL_4B_TEXT = {
    "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_dropout": 0.0, "attention_bias": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                        "mrope_interleaved": True},
}
QWEN3_VL_4B_VISION = {
    "depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "in_channels": 3,
    "out_hidden_size": 2560, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17], "hidden_act": "gelu_pytorch_tanh",
}
TINY3_TEXT = {**QWEN3_VL_4B_TEXT, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 512,
              "rope_parameters": {**QWEN3_VL_4B_TEXT["rope_parameters"], "mrope_section": [4, 6, 6]}}
TINY3_VISION = {**QWEN3_VL_4B_VISION, "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                "out_hidden_size": 64, "deepstack_visual_indexes": [1], "num_position_embeddings": 64}
ARCHITECTURES = {"qwen2.5-vl": ("Qwen2.5-VL-3B", QWEN25_VL_3B_TEXT, QWEN25_VL_3B_VISION, TINY_TEXT, TINY_VISION),
                 "qwen3-vl": ("Qwen3-VL-4B", QWEN3_VL_4B_TEXT, QWEN3_VL_4B_VISION, TINY3_TEXT, TINY3_VISION)}


def phase(name: str):
    """Decorator: time a phase, print its outcome, never let it stop the script."""
    def wrap(fn):
        def run(*args, **kwargs):
            print(f"\n== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                print(f"== {name}: done in {time.perf_counter() - t0:.1f}s", flush=True)
                return out
            except Exception as exc:  # noqa: BLE001 - report and go on to the next phase
                traceback.print_exc()
                print(f"== {name}: FAILED after {time.perf_counter() - t0:.1f}s: {type(exc).__name__}: {exc}", flush=True)
                OUT[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
                return None
        return run
    return wrap


MODULES = ["torch", "transformers", "tokenizers", "safetensors", "accelerate", "PIL", "numpy", "pydantic", "yaml",
           "pyarrow", "fsspec", "webdataset", "braceexpand", "tqdm", "trl", "datasets"]


@phase("imports")
def check_imports() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for mod in MODULES:
        try:
            m = importlib.import_module(mod)
            found[mod] = str(getattr(m, "__version__", "present"))
        except Exception as exc:  # noqa: BLE001
            found[mod] = None
            print(f"  missing: {mod} ({type(exc).__name__}: {exc})")
    print("  present: " + ", ".join(f"{k} {v}" for k, v in found.items() if v))
    missing = [k for k, v in found.items() if v is None]
    print("  missing: " + (", ".join(missing) if missing else "nothing"))
    import torch

    if torch.cuda.is_available():
        print(f"  cuda: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, cuda {torch.version.cuda}")
        OUT["gpu"] = torch.cuda.get_device_name(0)
    else:
        print("  cuda: not available (CPU run)")
    OUT["missing"] = missing
    return found


def photo(rng: random.Random, w: int = 640, h: int = 480):
    from PIL import Image, ImageDraw

    img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x, y, r = rng.randrange(w), rng.randrange(h), rng.randrange(10, 120)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


def jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@phase("model")
def build_model(out: Path, family: str = "qwen2.5-vl") -> Path:
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    from pipeline.nano.builders import SPECIAL_TOKENS, build_processor, build_tokenizer, save_model_dir

    texts = ["Please describe this image in detail.", "The image shows a red circle on a white background."] * 50
    tok = build_tokenizer(texts, vocab_size=400)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    name, full_text, full_vision, tiny_text, tiny_vision = ARCHITECTURES[family]
    text_cfg = dict(tiny_text if TINY else full_text)
    text_cfg.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    if len(tok) > text_cfg["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tok)} tokens, more than the config's vocab {text_cfg['vocab_size']}")
    vision_cfg = tiny_vision if TINY else full_vision
    special = {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
               "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}
    config_cls = Qwen3VLConfig if family == "qwen3-vl" else Qwen2_5_VLConfig
    model_cls = Qwen3VLForConditionalGeneration if family == "qwen3-vl" else Qwen2_5_VLForConditionalGeneration
    config = config_cls(text_config=text_cfg, vision_config=vision_cfg, tie_word_embeddings=True, **special)
    text = getattr(config, "text_config", config)
    if getattr(text, "hidden_size", None) != text_cfg["hidden_size"]:  # an older transformers with a flat config
        config = config_cls(**text_cfg, vision_config=vision_cfg, **special)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  {name} architecture: text {text_cfg['num_hidden_layers']} layers x {text_cfg['hidden_size']}, "
          f"vision depth {vision_cfg['depth']} x {vision_cfg['hidden_size']}; {n_params / 1e9:.3f} B parameters, {dtype}")
    OUT["params_b"] = round(n_params / 1e9, 3)
    # random weights must only emit text tokens the tokenizer can decode: suppress the padded vocab rows
    # and the special / blank tokens (EOS is held off by min_new_tokens in the benchmark)
    keep_eos = ids["<|im_end|>"]
    blank = [i for i in range(len(tok)) if not tok.decode([i], skip_special_tokens=True).strip()]
    suppress = sorted({i for i in blank if i != keep_eos} | set(range(len(tok), text_cfg["vocab_size"])))
    model.generation_config.suppress_tokens = suppress
    processor = build_processor(tok, side=SIDE, family=family)
    path = save_model_dir(model, tok, processor, out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def engine_config(model: Path, **settings):
    from pipeline.config import EngineConfig

    base = dict(backend="hf", model=str(model), dtype="bfloat16" if not TINY else "float32", device="auto",
                batch_size=MAX_BATCH, max_batch_tokens=10_000_000, min_pixels=SIDE * SIDE, max_pixels=SIDE * SIDE,
                chunk_size=4096, preprocess_workers=8, encode_ahead="on", compile=True, batch_memory=MEMORY)
    return EngineConfig(**{**base, **settings})


# the first H200 record's settings: eager decoding, a fixed batch, every image encoded before the first batch
BASELINE_SETTINGS = dict(batch_size=BATCH, encode_ahead="off", compile=False, batch_memory=0.0)


def fix_length(model) -> None:
    """Every sequence generates exactly TOKENS tokens (random weights may emit EOS early)."""
    model.generation_config.min_new_tokens = TOKENS


def report(name: str, n: int, seconds: float, tokens: int) -> None:
    print(f"  {name}: {n} images in {seconds:.1f}s = {n / seconds:.2f} images/s, "
          f"{tokens} output tokens = {tokens / seconds:.0f} tokens/s")
    OUT[name] = {"images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 2),
                     "output_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def timed_generate(engine, prepared: list, sampling) -> tuple[float, int]:
    import torch

    from pipeline.engines.base import image_request

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = engine.generate([image_request(PROMPT, im) for im in prepared], sampling)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, sum(g[0].num_tokens for g in out)


def roofline_seconds(engine, n_images: int, batch_rows: int) -> float | None:
    """Prefill FLOPs at the card's bf16 peak plus decode reading the weights and the batch's KV cache
    once per step at its bandwidth (the issue's estimate); None for an unknown card."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    card = next((v for k, v in CARDS.items() if k in name), None)
    if card is None:
        return None
    peak, bandwidth = card
    params = sum(p.numel() for p in engine.model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    prompt = engine.image_grid.tokens((SIDE, SIDE)) + 30
    prefill = 2 * params * prompt * n_images / peak
    batches = -(-n_images // max(1, batch_rows))
    kv = engine._row_cost.kv_per_token
    decode = sum(TOKENS * (weight_bytes + batch_rows * (prompt + TOKENS / 2) * kv) / bandwidth for _ in range(batches))
    return prefill + decode


def profile_decode(engine, prepared: list) -> None:
    """GPU kernel time against wall time over one short generate call (a few decode steps)."""
    import torch

    from pipeline.engines.base import Sampling

    if not torch.cuda.is_available():
        print("  profile: no GPU")
        return
    from torch.profiler import ProfilerActivity, profile

    from pipeline.engines.base import image_request

    reqs = [image_request(PROMPT, im) for im in prepared]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.generate(reqs, Sampling(max_new_tokens=16))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()

    def device_us(event) -> float:  # the attribute's name differs across torch versions
        return getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0))

    kernel_us = sum(device_us(e) for e in events)
    share = kernel_us / 1e6 / wall
    print(f"  profile: {len(reqs)} images x 16 tokens: wall {wall:.2f}s, GPU kernels {kernel_us / 1e6:.2f}s "
          f"({share:.0%} of wall)")
    for e in sorted(events, key=lambda e: -device_us(e))[:8]:
        print(f"    {device_us(e) / 1e3:9.1f} ms  "
              f"{e.count:6d}x  {e.key[:90]}")
    OUT["profile"] = {"images": len(reqs), "wall_s": round(wall, 3), "kernel_s": round(kernel_us / 1e6, 3),
                          "kernel_share": round(share, 3)}


def run_engine(model_dir: Path, images: list, name: str, **settings):
    import torch

    from pipeline.engines.base import Sampling, image_request
    from pipeline.engines.hf import HFEngine
    from pipeline.engines.preprocess import prepare_image

    engine = HFEngine(engine_config(model_dir, **settings))
    cfg = engine.config
    print(f"  {name}: {engine.model_id} on {engine.device}; compile={cfg.compile} batch_size={cfg.batch_size} "
          f"batch_memory={cfg.batch_memory} encode_ahead={cfg.encode_ahead} "
          f"attention={getattr(engine.model.config, '_attn_implementation', '?')}")
    prepared = [prepare_image(im, engine.image_grid) for im in images]
    warm = engine.generate([image_request(PROMPT, im) for im in prepared[:2]], Sampling(max_new_tokens=4))
    print(f"  warm-up caption: {warm[0][0].text!r}")
    fix_length(engine.model)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sampling = Sampling(temperature=0.0, max_new_tokens=TOKENS)
    if cfg.compile:  # the compiled shapes of a full run: compile time is not throughput
        seconds, _ = timed_generate(engine, prepared[:min(len(prepared), 2 * cfg.batch_size)], sampling)
        print(f"  compile warm-up run: {seconds:.1f}s")
    seconds, tokens = timed_generate(engine, prepared, sampling)
    report(name, len(prepared), seconds, tokens)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"  peak GPU memory {peak:.1f} GiB")
        OUT[name]["peak_gib"] = round(peak, 1)  # type: ignore[index]
    rows = cfg.batch_size
    budget = engine.memory_budget()
    if budget is not None:
        rows = len(engine._batches([engine.image_grid.tokens((SIDE, SIDE)) + 30] * len(prepared), TOKENS,
                                   budget=budget)[0])
        print(f"  rows per batch from free memory: {rows}")
    estimate = roofline_seconds(engine, len(prepared), min(rows, len(prepared)))
    if estimate:
        print(f"  roofline estimate {estimate:.1f}s: this run reaches {estimate / seconds:.0%} of it")
        OUT[name]["roofline_share"] = round(estimate / seconds, 3)  # type: ignore[index]
    return engine, prepared, sampling


@phase("engine")
def bench_engine(model_dir: Path, images: list, first: bool = True):
    import gc

    import torch

    if BASELINE and first:
        old, _, _ = run_engine(model_dir, images, "engine_baseline", **BASELINE_SETTINGS)
        del old
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    engine, prepared, sampling = run_engine(model_dir, images, "engine")
    if "engine_baseline" in OUT:
        speedup = OUT["engine"]["images_per_s"] / OUT["engine_baseline"]["images_per_s"]  # type: ignore[index]
        print(f"  speedup over the baseline settings: {speedup:.2f}x")
        OUT["engine_speedup"] = round(speedup, 2)
    if first:
        profile_decode(engine, prepared[:min(len(prepared), 64)])
    # the same images and batches as the stage phase below, for a like-for-like stage / engine ratio
    seconds, tokens = timed_generate(engine, prepared[:STAGE_IMAGES], sampling)
    report("engine_stage_images", min(STAGE_IMAGES, len(prepared)), seconds, tokens)
    if first:
        bench_logprobs(engine, prepared[:STAGE_IMAGES], sampling, seconds)
    return engine


@phase("logprobs")
def bench_logprobs(engine, prepared: list, sampling, plain_seconds: float) -> None:
    """What recording token log-probabilities costs (annotate.abstain_below asks for them): the images of
    engine_stage_images again, with Sampling(logprobs=True)."""
    from dataclasses import replace

    seconds, tokens = timed_generate(engine, prepared, replace(sampling, logprobs=True))
    report("engine_logprobs", len(prepared), seconds, tokens)
    print(f"  seconds with / without log-probabilities: {seconds / plain_seconds:.3f}")
    OUT["logprobs_cost"] = round(seconds / plain_seconds, 3)


@phase("engine_fallback")
def bench_direct(model_dir: Path, images: list) -> None:
    """transformers only: processor + generate in batches of BATCH, left padding."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype)
    except TypeError:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, torch_dtype=dtype)
    model = model.to(device).eval()
    fix_length(model)
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Please describe this image in detail."}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    t0 = time.perf_counter()
    tokens = 0
    with torch.inference_mode():
        for i in range(0, len(images), BATCH):
            chunk = images[i:i + BATCH]
            enc = processor(text=[prompt] * len(chunk), images=chunk, return_tensors="pt", padding=True).to(device)
            seqs = model.generate(**enc, max_new_tokens=TOKENS, do_sample=False)
            tokens += int((seqs[:, enc["input_ids"].shape[1]:] != processor.tokenizer.pad_token_id).sum())
    if device == "cuda":
        torch.cuda.synchronize()
    report("engine_direct", len(images), time.perf_counter() - t0, tokens)


@phase("stage")
def bench_stage(engine, workdir: Path, images: list) -> None:
    import pyarrow.parquet as pq

    from pipeline.config import load_config
    from pipeline.runner import run_stage
    from pipeline.shards import sample_key
    from pipeline.storage import Storage
    from stages.annotate import stage as annotate
    from tests.annotate_support import write_shard_files

    root = workdir / "run"
    shutil.rmtree(root, ignore_errors=True)
    storage = Storage(str(root))
    rows = [{"key": sample_key(0, i), "image": jpeg(im), "ext": "jpg", "scene": "{}", "mcqs": "[]", "scene_id": i,
             "caption": ""} for i, im in enumerate(images)]
    txn = storage.begin("download", 0)
    write_shard_files(txn.path("images/00000.tar"), txn.path("images/00000.parquet"), rows)
    txn.commit({"config_fingerprint": "gpu-check", "inputs": {}, "rows": {"total": len(rows), "ok": len(rows), "failed": 0}})
    cfg = engine_config(Path(engine.config.model))
    overrides = [f"annotate.captioner.{k}={v}" for k, v in cfg.model_dump().items()
                 if k in ("backend", "model", "dtype", "batch_size", "max_batch_tokens", "min_pixels", "max_pixels",
                          "chunk_size", "preprocess_workers", "compile", "batch_memory", "encode_ahead")]
    overrides += ["annotate.sampling.temperature=0", f"annotate.sampling.max_new_tokens={TOKENS}"]
    config = load_config(None, overrides, root=str(root))
    resources = {annotate.captioner_key(config.annotate.captioner): engine}
    t0 = time.perf_counter()
    out = io.StringIO()
    result = run_stage(config, "annotate", [0], progress=False, out=out, resources=resources)
    seconds = time.perf_counter() - t0
    print("  " + out.getvalue().strip().replace("\n", "\n  "))
    table = pq.read_table(root / "captions" / "00000.parquet")
    ok = sum(s == "ok" for s in table.column("status").to_pylist())
    tokens = sum(t or 0 for t in table.column("caption_tokens").to_pylist())
    if result.committed != [0] or ok != len(images):
        raise RuntimeError(f"stage committed {result.committed}, {ok}/{len(images)} rows ok")
    report("stage", len(images), seconds, tokens)


@phase("grpo")
def bench_grpo(model_dir: Path, images: list, workdir: Path) -> None:
    import random as rnd

    import torch
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from pipeline.config import TrainConfig
    from pipeline.mcq import MCQ
    from stages.train.data import TrainImage, prompt_dataset
    from stages.train.trainer import load_policy, trainer_args

    use_cpu = not torch.cuda.is_available()
    cfg = TrainConfig(max_steps=GRPO_STEPS, num_generations=8, images_per_step=4, max_new_tokens=GRPO_TOKENS,
                      temperature=1.0, beta=0.04, learning_rate=1e-6, save_steps=10_000, dtype="bfloat16",
                      gradient_checkpointing=True,
                      policy={"model": str(model_dir), "min_pixels": SIDE * SIDE, "max_pixels": SIDE * SIDE})
    folder = workdir / "grpo_images"
    folder.mkdir(parents=True, exist_ok=True)
    train = []
    for i, im in enumerate(images[:4 * GRPO_STEPS]):
        path = folder / f"{i}.jpg"
        path.write_bytes(jpeg(im))
        train.append(TrainImage(key=str(i), path=str(path), mcqs=(MCQ("q", ("a", "b", "c", "d"), "A"),)))
    model, processor, grid = load_policy(str(model_dir), cfg, use_cpu)
    fix_length(model)
    rng = rnd.Random(0)

    def reward(completions, **kwargs):  # the policy's side only: no reader
        return [rng.random() for _ in completions]

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    trainer = GRPOTrainer(model=model, reward_funcs=[reward], processing_class=processor, callbacks=[Clock()],
                          args=trainer_args(cfg, str(workdir / "grpo_out"), use_cpu, GRPO_STEPS),
                          train_dataset=prompt_dataset(train, cfg.prompt, grid))
    trainer.train()
    steady = times[1:] or times
    per_step = sum(steady) / len(steady)
    print(f"  GRPO steps (4 images x 8 generations x {GRPO_TOKENS} tokens): "
          + ", ".join(f"{t:.1f}s" for t in times) + f"; {per_step:.1f} s/step after the first")
    OUT["grpo"] = {"steps": len(times), "seconds": [round(t, 2) for t in times], "s_per_step": round(per_step, 2),
                       "tokens": GRPO_TOKENS}
    if torch.cuda.is_available():
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def run_family(family: str, first: bool, found: dict, workdir: Path, images: list) -> bool:
    """Every phase for one model family; its results go to OUT. False when its model could not be built."""
    print(f"\n##### {family} ({ARCHITECTURES[family][0]} architecture{', TINY CPU config' if TINY else ''})")
    model_dir = build_model(workdir / f"model-{family}", family)
    if model_dir is None:
        return False
    engine = None
    pipeline_ok = all(found.get(m) for m in ("pydantic", "yaml", "PIL"))
    if pipeline_ok and not FORCE_FALLBACK:
        engine = bench_engine(model_dir, images, first)
    if engine is None:
        bench_direct(model_dir, images)
    stage_ok = all(found.get(m) for m in ("pydantic", "yaml", "pyarrow", "fsspec", "webdataset", "braceexpand", "tqdm"))
    if engine is not None and stage_ok:
        bench_stage(engine, workdir, images[:STAGE_IMAGES])
        if "stage" in OUT and "engine_stage_images" in OUT:
            ratio = OUT["stage"]["images_per_s"] / OUT["engine_stage_images"]["images_per_s"]  # type: ignore[index]
            print(f"  stage / engine images/s on the same {STAGE_IMAGES} images: {ratio:.3f}")
            OUT["stage_engine_ratio"] = round(ratio, 3)
    elif engine is not None:
        print("\n== stage: skipped (missing packages for the stage)")
    engine = None
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    except ImportError:
        pass
    if GRPO and found.get("trl") and pipeline_ok:
        bench_grpo(model_dir, images, workdir)
    shutil.rmtree(model_dir, ignore_errors=True)
    return True


def main() -> int:
    global OUT
    t_start = time.perf_counter()
    found = check_imports() or {}
    if not found.get("torch") or not found.get("transformers"):
        print("torch and transformers are required; stopping")
        return 1
    unknown = [f for f in FAMILIES if f not in ARCHITECTURES]
    if unknown or not FAMILIES:
        print(f"GPU_CHECK_FAMILIES: unknown {unknown or 'empty'}; known: {', '.join(ARCHITECTURES)}")
        return 2
    workdir = Path(os.environ.get("GPU_CHECK_DIR") or tempfile.mkdtemp(prefix="gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    images = [photo(rng) for _ in range(N_IMAGES)]
    print(f"\nsettings: {N_IMAGES} images 640x480 -> {SIDE}x{SIDE} ({(SIDE // 28) ** 2} visual tokens of 28 px, "
          f"{(SIDE // 32) ** 2} of 32 px), {TOKENS} new tokens each (fixed), batch {BATCH}, families {FAMILIES}")
    built = []
    for i, family in enumerate(FAMILIES):
        OUT = RESULTS if i == 0 else RESULTS.setdefault(family, {})  # type: ignore[assignment]
        OUT["family"] = family
        built.append(run_family(family, i == 0, found, workdir, images))
    OUT = RESULTS
    if not os.environ.get("GPU_CHECK_DIR"):
        shutil.rmtree(workdir, ignore_errors=True)
    RESULTS["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print("\nRESULTS " + json.dumps(RESULTS, sort_keys=True))
    measured = [RESULTS] + [RESULTS.get(f, {}) for f in FAMILIES[1:]]
    return 0 if all(built) and all(any(k in m for k in ("engine", "engine_direct")) for m in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
