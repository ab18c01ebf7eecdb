"""Benchmark of the qa stage against the same engine calls made directly (numbers in docs/benchmarks.md).

The stage (runner, tar reading, decoding, parsing, the gate's shuffles, rows, parquet, commit) over one
shard of demo-world images with the demo models (nano-VL generates, nano-filter gates by choice scoring),
against a bare loop that decodes the same images and makes the same engine calls: one `generate` over
every image, then one `score_choices` per gate arm over every question's R shuffles. Both share the
loaded engines (model loading is outside both timings); the best of --repeats runs counts.

    python tools/bench_qa.py [--images 100] [--repeats 2] [--threads 1]

The last line is `min_ratio=<stage images/s / direct images/s>` (>= 0.9 wanted).
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.config import RunConfig, load_config  # noqa: E402
from pipeline.demo import DEMO_MANIFEST  # noqa: E402
from pipeline.engines.base import ChatRequest, Sampling, create_engine, image_messages  # noqa: E402
from pipeline.engines.preprocess import prepare_image  # noqa: E402
from pipeline.mcq import LETTERS, READER_PREFILL, filter_messages, parse_generator_output  # noqa: E402
from pipeline.nano import qa_eval, world  # noqa: E402
from pipeline.resources import resolve_model  # noqa: E402
from pipeline.runner import run_stage  # noqa: E402
from pipeline.shardio import read_samples  # noqa: E402
from pipeline.storage import Storage  # noqa: E402
from stages.qa import gate  # noqa: E402
from stages.qa.stage import engine_key, generation_prompt  # noqa: E402


class TimedEngine:
    """An engine wrapper that adds up the seconds spent in its calls (to show the stage's own overhead)."""

    def __init__(self, engine) -> None:
        self.engine, self.model_id, self.seconds = engine, engine.model_id, 0.0

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def generate(self, requests, params):
        return self._timed(self.engine.generate, requests, params)

    def score_choices(self, requests, choices):
        return self._timed(self.engine.score_choices, requests, choices)

    def close(self) -> None:
        self.engine.close()


def direct(config: RunConfig, resources: dict, tar: str) -> int:
    """Decode, generate, parse, and both gate arms' engine calls, with nothing else; returns questions."""
    cfg = config.qa
    gen = resources[engine_key("model", resolve_model(cfg.generator))]
    filt = resources[engine_key("model", resolve_model(cfg.filter))]
    samples = [s for s in read_samples(tar)]
    images = {s.key: prepare_image(s.image, gen.image_grid) for s in samples}
    messages = image_messages(generation_prompt(cfg))
    outs = gen.generate([ChatRequest(messages, [im]) for im in images.values()], Sampling.from_config(cfg.generation))
    settings = gate.GateSettings.from_config(cfg)
    items = [gate.GateItem(key, q, images[key]) for key, o in zip(images, outs, strict=True)
             for q in parse_generator_output(o[0].text)[0]]
    for arm in (gate.VISUAL, gate.TEXT):
        shown = [s for it in items for s in gate.shown_options(it, arm, settings)]
        owners = [it for it in items for _ in range(settings.rotations)]
        reqs = [ChatRequest(filter_messages(s, arm == gate.VISUAL), [it.image] if arm == gate.VISUAL else [],
                            READER_PREFILL) for s, it in zip(shown, owners, strict=True)]
        choices = [[" " + (LETTERS[k] if settings.choices == "letter" else o) for k, o in enumerate(s.options)]
                   for s in shown]
        filt.score_choices(reqs, choices)
    return len(items)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = tempfile.mkdtemp(prefix="bench-qa-")
    rng = random.Random(0)
    storage = Storage(root)
    storage.ensure_run_meta({"shard_size": args.images})
    qa_eval.write_image_shard(storage, 0, [world.sample_scene(rng) for _ in range(args.images)])
    config = load_config(DEMO_MANIFEST, [f"shard_size={args.images}"], root=root)
    if config.qa.filter_mode != "score":
        raise SystemExit("bench_qa measures the demo manifest's score-mode gate")
    resources: dict = {}
    for ecfg in (config.qa.generator, config.qa.filter):
        resolved = resolve_model(ecfg)
        resources.setdefault(engine_key("model", resolved), TimedEngine(create_engine(resolved)))
    engines = list(resources.values())
    tar = storage.path("images", "00000.tar")
    stage_s, direct_s, overhead = [], [], []

    def run_the_stage() -> None:
        before = sum(e.seconds for e in engines)
        t0 = time.perf_counter()
        report = run_stage(config, "qa", [0], force=True, progress=False, resources=resources, out=io.StringIO())
        stage_s.append(time.perf_counter() - t0)
        overhead.append(stage_s[-1] - (sum(e.seconds for e in engines) - before))
        if report.exit_code:
            raise SystemExit(f"the qa stage failed: {report.failed}")

    def run_direct() -> int:
        t0 = time.perf_counter()
        n = direct(config, resources, tar)
        direct_s.append(time.perf_counter() - t0)
        return n

    for r in range(args.repeats):  # alternate the order: a machine shared with other work drifts
        if r % 2 == 0:
            run_the_stage()
            n_questions = run_direct()
        else:
            n_questions = run_direct()
            run_the_stage()
    stage_rate, direct_rate = args.images / min(stage_s), args.images / min(direct_s)
    print(f"images {args.images}, questions gated {n_questions}, rotations {config.qa.rotations}, threads {args.threads}")
    print(f"stage   {min(stage_s):7.2f} s  {stage_rate:6.2f} images/s   (runs: {', '.join(f'{s:.2f}' for s in stage_s)})")
    print(f"direct  {min(direct_s):7.2f} s  {direct_rate:6.2f} images/s   (runs: {', '.join(f'{s:.2f}' for s in direct_s)})")
    print(f"stage time outside engine calls: {min(overhead):.2f} s (runs: {', '.join(f'{s:.2f}' for s in overhead)})")
    print(f"min_ratio={stage_rate / direct_rate:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
