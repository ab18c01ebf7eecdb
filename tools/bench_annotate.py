"""Benchmarks of the annotate stage, measured side by side in one run.

1. Pipeline overhead: the stage (runner, commit, manifests) with the noop engine vs a bare loop that
   only reads the same shard, decodes + resizes in the same worker pool and writes a tar.
   ratio = stage images/s / bare images/s (>= 0.9 wanted).
2. Engine efficiency: the stage with the hf engine on the small captioner vs that engine's own
   `generate` on the same images, pre-decoded, with the same chunk and batch size.
   ratio = generate-only seconds / stage seconds (>= 0.9 wanted).

    python tools/bench_annotate.py [--images 600] [--engine-images 64] [--repeats 3] [--model DIR]

The last line is `min_ratio=<min of the two ratios>`.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.engines.base import (  # noqa: E402
    Sampling,
    create_engine,
    image_request,  # noqa: E402
)
from pipeline.engines.grid import ImageGrid  # noqa: E402
from pipeline.engines.preprocess import map_ahead  # noqa: E402
from pipeline.nano import world  # noqa: E402
from pipeline.runner import run_stage  # noqa: E402
from pipeline.shardio import TarWriter as TarSink  # noqa: E402
from pipeline.shardio import read_samples  # noqa: E402
from pipeline.shards import sample_key, shard_name  # noqa: E402
from pipeline.storage import Storage  # noqa: E402
from stages.annotate import stage as annotate  # noqa: E402
from stages.annotate.imageprep import decode_image  # noqa: E402

MAX_PIXELS = 448 * 448
BARE_GRID = ImageGrid(1, 1, 3136, MAX_PIXELS)  # the noop captioner's: its pixel budget, no model grid


def photo_like(rng: random.Random, w: int = 640, h: int = 480) -> bytes:
    """A JPEG with gradients, shapes and blur: decodes and resizes like a web photo."""
    img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = rng.randrange(w), rng.randrange(h)
        r = rng.randrange(10, 120)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def demo_scene_png(rng: random.Random) -> bytes:
    return world.encode(world.render(world.sample_scene(rng)))


def make_root(root: Path, n: int, make_image) -> Storage:
    """A run root with image shard 0 committed (download layout) holding n images."""
    sys.path.insert(0, str(REPO / "tests"))
    from tests.annotate_support import write_shard_files

    rng = random.Random(0)
    rows = []
    for i in range(n):
        data = make_image(rng)
        ext = "jpg" if data[:2] == b"\xff\xd8" else "png"
        rows.append({"key": sample_key(0, i), "image": data, "ext": ext, "scene": "{}", "mcqs": "[]",
                     "scene_id": i, "caption": "alt text"})
    storage = Storage(str(root))
    txn = storage.begin("download", 0)
    write_shard_files(txn.path("images/00000.tar"), txn.path("images/00000.parquet"), rows)
    txn.commit({"config_fingerprint": "bench", "inputs": {}, "rows": {"total": n, "ok": n, "failed": 0}})
    return storage


def bare_loop(tar: str, out_dir: Path, workers: int) -> float:
    """Read, decode + resize (same pool), write image + text: the floor any captioning pipeline pays."""
    t0 = time.perf_counter()
    samples = read_samples(tar)
    with TarSink(str(out_dir / "bare.tar")) as sink:
        for prepared in map_ahead(lambda s: decode_image(s.image, BARE_GRID), samples, workers=workers,
                                  ahead=512):
            s = prepared.item
            sink.write(s.key, {s.image_ext: s.image, "txt": b"A placeholder caption."})
    return time.perf_counter() - t0


def stage_run(root: Path, overrides: list[str], resources: dict | None = None) -> float:
    config = load_config(None, overrides, root=str(root))
    shutil.rmtree(root / "captions", ignore_errors=True)
    t0 = time.perf_counter()
    report = run_stage(config, "annotate", [0], force=True, progress=False, out=io.StringIO(), resources=resources)
    elapsed = time.perf_counter() - t0
    if report.committed != [0]:
        raise SystemExit(f"annotate failed during the benchmark: {report.failed}")
    return elapsed


def bench_overhead(tmp: Path, n: int, repeats: int, workers: int) -> float:
    root = tmp / "overhead"
    make_root(root, n, photo_like)
    tar = str(root / "images" / f"{shard_name(0)}.tar")
    overrides = ["annotate.captioner.backend=noop", f"annotate.captioner.max_pixels={MAX_PIXELS}",
                 f"annotate.captioner.preprocess_workers={workers}", "annotate.captioner.chunk_size=256"]
    bare_loop(tar, tmp, workers)  # warm-up: page cache, imports, thread start-up
    stage_run(root, overrides)
    bare, stage = [], []
    for _ in range(repeats):  # interleaved, best of each: the machine is shared
        bare.append(bare_loop(tar, tmp, workers))
        stage.append(stage_run(root, overrides))
    b, s = min(bare), min(stage)
    ratio = b / s
    print(f"overhead: {n} images 640x480 jpg -> {MAX_PIXELS} px, {workers} decode workers: "
          f"stage+noop {n / s:.1f} img/s, bare read/decode/resize/write {n / b:.1f} img/s, ratio {ratio:.3f}")
    return ratio


def bench_engine(tmp: Path, n: int, repeats: int, model: Path, batch: int, tokens: int) -> float:
    root = tmp / "engine"
    make_root(root, n, demo_scene_png)
    overrides = ["annotate.captioner.backend=hf", f"annotate.captioner.model={model}",
                 f"annotate.captioner.batch_size={batch}", f"annotate.captioner.chunk_size={n}",
                 "annotate.sampling.temperature=0", f"annotate.sampling.max_new_tokens={tokens}"]
    config = load_config(None, overrides, root=str(root))
    engine = create_engine(config.annotate.captioner)
    resources = {annotate.captioner_key(config.annotate.captioner): engine}
    images = [decode_image(s.image, engine.image_grid).image
              for s in read_samples(str(root / "images" / "00000.tar"))]
    sampling = Sampling(temperature=0.0, max_new_tokens=tokens)
    stage_run(root, overrides, resources)  # warm-up
    direct, stage = [], []
    out_tokens = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        gens = engine.generate([image_request(config.annotate.prompt, im) for im in images], sampling)
        direct.append(time.perf_counter() - t0)
        out_tokens = sum(g[0].num_tokens for g in gens)
        stage.append(stage_run(root, overrides, resources))
    d, s = min(direct), min(stage)
    ratio = d / s
    print(f"engine: {n} images, hf {model.name}, batch {batch}, {tokens} new tokens ({out_tokens} generated): "
          f"stage {n / s:.1f} img/s, engine.generate {n / d:.1f} img/s, ratio {ratio:.3f}")
    return ratio


def small_captioner(tmp: Path) -> Path:
    nano = REPO / "models" / "nano" / "nano-vl"
    if (nano / "config.json").exists():
        return nano
    from pipeline.nano.random_checkpoints import build_random_vl_model

    return build_random_vl_model(tmp / "random-vl", seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000,
                    help="images for the overhead benchmark (large enough to amortize per-shard fixed costs)")
    ap.add_argument("--engine-images", type=int, default=1024, help="images for the engine benchmark")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="decode workers (stage and bare loop alike)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--model", type=Path, default=None, help="captioner dir (default: models/nano/nano-vl or a random one)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    with tempfile.TemporaryDirectory(prefix="bench-annotate-") as d:
        tmp = Path(d)
        r1 = bench_overhead(tmp, args.images, args.repeats, args.workers)
        r2 = bench_engine(tmp, args.engine_images, args.repeats, args.model or small_captioner(tmp), args.batch,
                          args.tokens)
    print(f"min_ratio={min(r1, r2):.3f}")


if __name__ == "__main__":
    main()
