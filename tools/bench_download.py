"""Benchmark: our download stage vs plain img2dataset on the same URL list served on 127.0.0.1.

    python tools/bench_download.py [--n 2000] [--processes 2] [--threads 16] [--shard-size 1000]

Generates --n distinct JPEGs once into a temp dir, serves them from a separate process, then times
(a warm-up of each first) `run_stage(download)` and `img2dataset.download` with the same processes,
threads, shard size, resizing and encoding. Every timed run is a fresh Python process whose clock starts
after its imports, so both pay their own worker start-up and neither inherits the other's warm pool.
Prints images/s for both, checks that both wrote the same image bytes, and ends with
`ratio=<ours/img2dataset>`.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """n distinct 512x384 JPEGs with shapes and noise (so decoding/resizing does real work)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = Image.effect_noise((512, 384), 40).convert("RGB")
    for i in range(n):
        img = base.copy()
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.randrange(480), rng.randrange(350)
            draw.ellipse((x, y, x + rng.randrange(20, 120), y + rng.randrange(20, 120)),
                         fill=tuple(rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        (folder / f"{i:05d}.jpg").write_bytes(buf.getvalue())


def write_list(path: Path, base_url: str, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": [f"{base_url}/img/{i:05d}.jpg" for i in range(n)],
                             "caption": [f"image {i}" for i in range(n)]}), path)


def _serve(folder: str, port: int) -> None:
    from pipeline.demo import serve_directory

    with serve_directory(folder, port):
        while True:
            time.sleep(3600)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the two contenders, each run in a fresh process ------------------------------------------------

def run_ours(urls: str, out: str, args: argparse.Namespace) -> dict:
    import stages.download  # noqa: F401 - import img2dataset before the clock starts, as run_img2dataset does
    from pipeline.config import load_config
    from pipeline.runner import run_stage

    cfg = load_config(None, [f"download.urls={urls}", "download.caption_col=caption",
                             f"download.image_size={args.image_size}", "download.resize_mode=keep_ratio",
                             "download.encode_format=jpg", f"download.processes={args.processes}",
                             f"download.threads={args.threads}", "download.retries=0",
                             f"shard_size={args.shard_size}"], root=out)
    shards = list(range(-(-args.n_rows // args.shard_size)))
    t0 = time.perf_counter()
    report = run_stage(cfg, "download", shards, progress=False, out=open(os.devnull, "w"))
    seconds = time.perf_counter() - t0
    ok = sum(s.ok for s in report.stats.values())
    return {"seconds": seconds, "ok": ok, "failed": len(report.failed)}


def run_img2dataset(urls: str, out: str, args: argparse.Namespace) -> dict:
    import contextlib
    import glob

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        download(url_list=urls, input_format="parquet", url_col="url", caption_col="caption",
                 output_folder=out, output_format="webdataset", image_size=args.image_size,
                 resize_mode="keep_ratio", resize_only_if_bigger=True, encode_format="jpg", encode_quality=95,
                 processes_count=args.processes, thread_count=args.threads,
                 number_sample_per_shard=args.shard_size, extract_exif=False, timeout=10, retries=0,
                 user_agent_token="caprl-pipeline")
    seconds = time.perf_counter() - t0
    ok = 0
    for stats in glob.glob(f"{out}/*_stats.json"):
        ok += json.loads(Path(stats).read_text())["successes"]
    return {"seconds": seconds, "ok": ok, "failed": 0}


def _timed(which: str, urls: str, out: str, args: argparse.Namespace, n_rows: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", which, "--urls", urls, "--out", out, "--n-rows", str(n_rows),
           "--processes", str(args.processes), "--threads", str(args.threads),
           "--shard-size", str(args.shard_size), "--image-size", str(args.image_size)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise SystemExit(f"{which} run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def same_images(ours: str, theirs: str, shard_size: int) -> tuple[int, int]:
    """(equal, compared) image bytes per row between our shards and img2dataset's."""
    import glob
    import math
    import tarfile

    from pipeline import shardio
    from pipeline.shards import sample_key

    digits = math.ceil(math.log10(shard_size))  # img2dataset's key: shard * 10**digits + index

    mine: dict[str, bytes] = {}
    for path in sorted(glob.glob(f"{ours}/images/*.tar")):
        with open(path, "rb") as f:
            for sample in shardio.iter_tar(f):
                mine[sample.key] = sample.files["jpg"]
    equal = compared = 0
    for path in sorted(glob.glob(f"{theirs}/*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    shard, index = divmod(int(m.name[:-4]), 10**digits)
                    key = sample_key(shard, index)
                    compared += 1
                    equal += mine.get(key) == tar.extractfile(m).read()
    return equal, compared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="URLs in the timed list")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="timed runs of each (alternating order); median kept")
    ap.add_argument("--worker", choices=["ours", "img2dataset"], help=argparse.SUPPRESS)
    ap.add_argument("--urls", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--n-rows", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        fn = run_ours if args.worker == "ours" else run_img2dataset
        print("RESULT " + json.dumps(fn(args.urls, args.out, args)), flush=True)
        return

    work = Path(tempfile.mkdtemp(prefix="bench_download-"))
    t0 = time.perf_counter()
    make_images(work / "img", args.n)
    print(f"generated {args.n} JPEGs (512x384) in {time.perf_counter() - t0:.1f}s under {work}")
    port = _free_port()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(str(work), port), daemon=True)
    server.start()
    time.sleep(1.0)
    base = f"http://127.0.0.1:{port}"
    write_list(work / "urls.parquet", base, args.n)
    warm = min(200, args.n)
    write_list(work / "warm.parquet", base, warm)
    try:
        for which in ("ours", "img2dataset"):
            _timed(which, str(work / "warm.parquet"), str(work / f"warm-{which}"), args, warm)
        times: dict[str, list[dict]] = {"ours": [], "img2dataset": []}
        order = ["ours", "img2dataset"]
        for r in range(args.rounds):
            for which in order if r % 2 == 0 else order[::-1]:
                res = _timed(which, str(work / "urls.parquet"), str(work / f"{which}-{r}"), args, args.n)
                if res["ok"] != args.n or res["failed"]:
                    raise SystemExit(f"{which} fetched {res['ok']} of {args.n} images: {res}")
                times[which].append(res)
                print(f"round {r} {which:<11} {res['seconds']:.2f}s  {res['ok'] / res['seconds']:.0f} images/s")
    finally:
        server.terminate()
    rate = {k: args.n / statistics.median(x["seconds"] for x in v) for k, v in times.items()}
    equal, compared = same_images(str(work / "ours-0"), str(work / "img2dataset-0"), args.shard_size)
    print(f"processes={args.processes} threads={args.threads} shard_size={args.shard_size} n={args.n} "
          f"resize keep_ratio {args.image_size}px jpg")
    print(f"identical image bytes: {equal}/{compared}")
    print(f"ours={rate['ours']:.0f} images/s  img2dataset={rate['img2dataset']:.0f} images/s")
    print(f"ratio={rate['ours'] / rate['img2dataset']:.3f}")


if __name__ == "__main__":
    main()
