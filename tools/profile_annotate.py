"""Where one annotate shard's wall time goes beside the engine: a timeline of the stage's phases.

Runs the stage on one shard (built like `tools/bench_annotate.py`'s) several times in this process, with
the engine's own `generate` on the same pre-decoded images in between (the machine may be shared: compare
shares within one run), and prints a markdown table of seconds per phase:

    python tools/profile_annotate.py [--backend hf|noop] [--images 512] [--repeats 3]

Phases: the runner before the shard; shard start -> first engine call (input read, first chunk decoded);
the engine calls and the gaps between them; the quality monitor; the caption tar (pass 2); the parquet;
the rest of the shard; the runner's commit. `--cprofile` adds a cProfile of one more stage run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_annotate as bench  # noqa: E402
import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.engines.base import Sampling, create_engine, image_request  # noqa: E402
from pipeline.shardio import read_samples  # noqa: E402
from stages.annotate import stage as annotate  # noqa: E402
from stages.annotate.imageprep import decode_image  # noqa: E402

Events = list[tuple[str, float]]


def instrument(obj: Any, attr: str, name: str, events: Events) -> None:
    """Record `name+` / `name-` around every call of obj.attr."""
    fn = getattr(obj, attr)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        events.append((name + "+", time.perf_counter()))
        try:
            return fn(*args, **kwargs)
        finally:
            events.append((name + "-", time.perf_counter()))

    setattr(obj, attr, wrapped)


def phases(events: Events) -> dict[str, float]:
    """Seconds per phase from one stage run's events (the first is the run's start, the last its end)."""
    at = dict(events)
    starts = [t for k, t in events if k == "gen+"]
    ends = [t for k, t in events if k == "gen-"]
    return {
        "stage total": events[-1][1] - events[0][1],
        "engine.generate (all calls)": sum(b - a for a, b in zip(starts, ends, strict=True)),
        "runner before the shard": at["shard+"] - events[0][1],
        "shard start -> first engine call": starts[0] - at["shard+"],
        "between engine calls": sum(starts[i + 1] - ends[i] for i in range(len(starts) - 1)),
        "last engine call -> captions done": at["pass1-"] - ends[-1],
        "quality monitor": at["quality-"] - at["quality+"],
        "caption tar (pass 2)": at["parquet+"] - at["quality-"],
        "parquet manifest": at["parquet-"] - at["parquet+"],
        "rest of the shard": at["shard-"] - at["parquet-"],
        "runner after the shard (commit)": events[-1][1] - at["shard-"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["hf", "noop"], default="hf")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cprofile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    n = args.images
    with tempfile.TemporaryDirectory(prefix="profile-annotate-") as d:
        tmp = Path(d)
        root = tmp / "root"
        if args.backend == "hf":
            bench.make_root(root, n, bench.demo_scene_png)
            overrides = ["annotate.captioner.backend=hf", f"annotate.captioner.model={bench.small_captioner(tmp)}",
                         "annotate.captioner.batch_size=32", f"annotate.captioner.chunk_size={n}",
                         "annotate.sampling.temperature=0", "annotate.sampling.max_new_tokens=32"]
        else:
            bench.make_root(root, n, bench.photo_like)
            overrides = ["annotate.captioner.backend=noop", f"annotate.captioner.max_pixels={bench.MAX_PIXELS}",
                         "annotate.captioner.chunk_size=256"]
        config = load_config(None, overrides, root=str(root))
        cap = config.annotate.captioner
        engine = create_engine(cap)
        resources = {annotate.captioner_key(cap): engine}
        images = [decode_image(s.image, cap.min_pixels, cap.max_pixels).image
                  for s in read_samples(str(root / "images" / "00000.tar"))]
        requests = [image_request(config.annotate.prompt, im) for im in images]
        sampling = Sampling(temperature=0.0, max_new_tokens=32)

        events: Events = []
        for obj, attr, name in [(engine, "generate", "gen"), (annotate, "_annotate", "shard"),
                                (annotate, "_caption_pass", "pass1"), (annotate.quality_monitor, "score_shard", "quality"),
                                (annotate.shardio, "write_manifest", "parquet")]:
            instrument(obj, attr, name, events)

        def stage() -> dict[str, float]:
            events.clear()
            events.append(("start", time.perf_counter()))
            bench.stage_run(root, overrides, resources)
            events.append(("end", time.perf_counter()))
            return phases(events)

        def direct() -> float:
            t0 = time.perf_counter()
            engine.generate(requests, sampling)
            return time.perf_counter() - t0

        stage()  # warm-up
        runs: list[dict[str, float]] = []
        for _ in range(args.repeats):
            row = {"engine.generate alone, same images": direct()} if args.backend == "hf" else {}
            runs.append({**stage(), **row})
        print(f"{args.backend}, {n} images, one shard; seconds per phase")
        print("| phase | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " |")
        print("|---|" + "---|" * len(runs))
        for key in runs[0]:
            print(f"| {key} | " + " | ".join(f"{r[key]:.2f}" for r in runs) + " |")
        if args.cprofile:
            profile(lambda: bench.stage_run(root, overrides, resources))


def profile(fn: Callable[[], Any]) -> None:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(40)
    print(out.getvalue())


if __name__ == "__main__":
    main()
