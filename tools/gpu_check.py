"""GPU throughput check: a random-weight model with the real Qwen2.5-VL-3B architecture on the hf engine.

Run through tools/gpu_check.sh. Phases (each reports and goes on if it fails):
1. imports: what is present, what is missing (nothing is installed: the GPU machine may be offline);
2. model: Qwen2.5-VL-3B config written out explicitly, random bf16 weights created on the GPU, saved
   as a checkpoint directory with a tokenizer/processor from pipeline/models/builders.py;
3. engine: the hf engine (pipeline/engines/hf.py) over N images with exactly T new tokens each
   (min_new_tokens = max_new_tokens): images/s and output tokens/s; then over the stage phase's
   images alone (same batches as the stage). Without the pipeline's dependencies, the same
   measurement with transformers' generate directly;
4. stage: the annotate stage over one image shard with the same loaded engine: images/s, and the
   stage / engine ratio on the same images.

GPU_CHECK_TINY=1 runs a tiny config on CPU (checks the script's logic in a minute).
Env: GPU_CHECK_IMAGES (512), GPU_CHECK_TOKENS (256), GPU_CHECK_BATCH (256), GPU_CHECK_SIDE (448),
GPU_CHECK_STAGE_IMAGES (256), GPU_CHECK_DIR (scratch dir), GPU_CHECK_FALLBACK=1 (force phase 3's fallback).
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
RESULTS: dict[str, object] = {}

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
                RESULTS[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
                return None
        return run
    return wrap


MODULES = ["torch", "transformers", "tokenizers", "safetensors", "accelerate", "PIL", "numpy", "pydantic", "yaml",
           "pyarrow", "fsspec", "webdataset", "braceexpand", "tqdm"]


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
        RESULTS["gpu"] = torch.cuda.get_device_name(0)
    else:
        print("  cuda: not available (CPU run)")
    RESULTS["missing"] = missing
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
def build_model(out: Path) -> Path:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from pipeline.nano.builders import SPECIAL_TOKENS, build_processor, build_tokenizer, save_model_dir

    texts = ["Please describe this image in detail.", "The image shows a red circle on a white background."] * 50
    tok = build_tokenizer(texts, vocab_size=400)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_cfg = dict(TINY_TEXT if TINY else QWEN25_VL_3B_TEXT)
    text_cfg.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    if len(tok) > text_cfg["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tok)} tokens, more than the config's vocab {text_cfg['vocab_size']}")
    vision_cfg = TINY_VISION if TINY else QWEN25_VL_3B_VISION
    special = {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
               "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}
    config = Qwen2_5_VLConfig(text_config=text_cfg, vision_config=vision_cfg, tie_word_embeddings=True, **special)
    text = getattr(config, "text_config", config)
    if getattr(text, "hidden_size", None) != text_cfg["hidden_size"]:  # an older transformers with a flat config
        config = Qwen2_5_VLConfig(**text_cfg, vision_config=vision_cfg, **special)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  Qwen2.5-VL architecture: text {text_cfg['num_hidden_layers']} layers x {text_cfg['hidden_size']}, "
          f"vision depth {vision_cfg['depth']} x {vision_cfg['hidden_size']}; {n_params / 1e9:.3f} B parameters, {dtype}")
    RESULTS["params_b"] = round(n_params / 1e9, 3)
    # random weights must only emit text tokens the tokenizer can decode: suppress the padded vocab rows
    # and the special / blank tokens (EOS is held off by min_new_tokens in the benchmark)
    keep_eos = ids["<|im_end|>"]
    blank = [i for i in range(len(tok)) if not tok.decode([i], skip_special_tokens=True).strip()]
    suppress = sorted({i for i in blank if i != keep_eos} | set(range(len(tok), text_cfg["vocab_size"])))
    model.generation_config.suppress_tokens = suppress
    processor = build_processor(tok, side=SIDE)
    path = save_model_dir(model, tok, processor, out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def engine_config(model: Path):
    from pipeline.config import EngineConfig

    return EngineConfig(backend="hf", model=str(model), dtype="bfloat16" if not TINY else "float32",
                        device="auto", batch_size=BATCH, max_batch_tokens=10_000_000, min_pixels=SIDE * SIDE,
                        max_pixels=SIDE * SIDE, chunk_size=4096, preprocess_workers=8)


def fix_length(model) -> None:
    """Every sequence generates exactly TOKENS tokens (random weights may emit EOS early)."""
    model.generation_config.min_new_tokens = TOKENS


def report(name: str, n: int, seconds: float, tokens: int) -> None:
    print(f"  {name}: {n} images in {seconds:.1f}s = {n / seconds:.2f} images/s, "
          f"{tokens} output tokens = {tokens / seconds:.0f} tokens/s")
    RESULTS[name] = {"images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 2),
                     "output_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


@phase("engine")
def bench_engine(model_dir: Path, images: list):
    import torch

    from pipeline.engines.base import Sampling, image_request
    from pipeline.engines.hf import HFEngine
    from pipeline.engines.preprocess import prepare_image

    engine = HFEngine(engine_config(model_dir))
    print(f"  engine {engine.model_id} on {engine.device}")
    prepared = [prepare_image(im, SIDE * SIDE, SIDE * SIDE) for im in images]
    sampling = Sampling(temperature=0.0, max_new_tokens=TOKENS)
    warm = engine.generate([image_request("Please describe this image in detail.", im) for im in prepared[:2]],
                           Sampling(max_new_tokens=4))  # warm-up: kernels, allocator
    print(f"  warm-up caption: {warm[0][0].text!r}")
    fix_length(engine.model)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = engine.generate([image_request("Please describe this image in detail.", im) for im in prepared], sampling)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = sum(g[0].num_tokens for g in out)
    report("engine", len(prepared), seconds, tokens)
    # the same images and batches as the stage phase below, for a like-for-like stage / engine ratio
    same = prepared[:STAGE_IMAGES]
    t0 = time.perf_counter()
    out = engine.generate([image_request("Please describe this image in detail.", im) for im in same], sampling)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    report("engine_stage_images", len(same), time.perf_counter() - t0, sum(g[0].num_tokens for g in out))
    if torch.cuda.is_available():
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return engine


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
                          "chunk_size", "preprocess_workers")]
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


def main() -> int:
    t_start = time.perf_counter()
    found = check_imports() or {}
    if not found.get("torch") or not found.get("transformers"):
        print("torch and transformers are required; stopping")
        return 1
    workdir = Path(os.environ.get("GPU_CHECK_DIR") or tempfile.mkdtemp(prefix="gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    images = [photo(rng) for _ in range(N_IMAGES)]
    print(f"\nsettings: {N_IMAGES} images 640x480 -> {SIDE}x{SIDE} ({(SIDE // 28) ** 2} visual tokens), "
          f"{TOKENS} new tokens each (fixed), batch {BATCH}, {'TINY CPU config' if TINY else 'Qwen2.5-VL-3B architecture'}")
    model_dir = build_model(workdir / "model")
    if model_dir is None:
        return 1
    engine = None
    pipeline_ok = all(found.get(m) for m in ("pydantic", "yaml", "PIL"))
    if pipeline_ok and not FORCE_FALLBACK:
        engine = bench_engine(model_dir, images)
    if engine is None:
        bench_direct(model_dir, images)
    stage_ok = all(found.get(m) for m in ("pydantic", "yaml", "pyarrow", "fsspec", "webdataset", "braceexpand", "tqdm"))
    if engine is not None and stage_ok:
        bench_stage(engine, workdir, images[:STAGE_IMAGES])
        if "stage" in RESULTS and "engine_stage_images" in RESULTS:
            ratio = RESULTS["stage"]["images_per_s"] / RESULTS["engine_stage_images"]["images_per_s"]  # type: ignore[index]
            print(f"  stage / engine images/s on the same {STAGE_IMAGES} images: {ratio:.3f}")
            RESULTS["stage_engine_ratio"] = round(ratio, 3)
    elif engine is not None:
        print("\n== stage: skipped (missing packages for the stage)")
    if not os.environ.get("GPU_CHECK_DIR"):
        shutil.rmtree(workdir, ignore_errors=True)
    RESULTS["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print("\nRESULTS " + json.dumps(RESULTS, sort_keys=True))
    return 0 if any(k in RESULTS for k in ("engine", "engine_direct")) else 1


if __name__ == "__main__":
    sys.exit(main())
