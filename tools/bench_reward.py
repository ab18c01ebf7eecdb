"""Reward throughput: all reader prompts of a batch of captions in ONE engine call vs one call per draw.

Same hf engine, same reader model (a small random-weight Qwen2 built offline, or --model DIR), same
CapRL draws (256 captions x 8 draws by default, demo-world captions and MCQs, sample mode at the
paper's temperature 0.6 / 10 tokens). Prints both timings and the ratio; last line
`batched_speedup=<ratio>`.

    python tools/bench_reward.py [--captions 256] [--draws 8] [--mode sample] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.config import EngineConfig, RewardConfig  # noqa: E402
from pipeline.engines.base import ChatRequest, Generation, Sampling  # noqa: E402
from pipeline.engines.hf import HFEngine  # noqa: E402
from pipeline.nano import world  # noqa: E402
from pipeline.nano.random_checkpoints import build_random_text_model  # noqa: E402
from pipeline.reward import CapRLReward  # noqa: E402


class OneCallPerDraw:
    """The same engine, asked one request at a time (what an unbatched reward loop does)."""

    def __init__(self, engine: HFEngine):
        self.engine = engine
        self.model_id = engine.model_id

    def generate(self, requests: Sequence[ChatRequest], params: Sampling) -> list[list[Generation]]:
        return [self.engine.generate([r], params)[0] for r in requests]

    def score_choices(self, requests: Sequence[ChatRequest], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        return [self.engine.score_choices([r], [c])[0] for r, c in zip(requests, choices, strict=True)]

    def close(self) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=int, default=256)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--mode", choices=["sample", "letter_prob", "option_text"], default="sample")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-batch-tokens", type=int, default=1_000_000)
    ap.add_argument("--model", help="reader checkpoint dir (default: build a random Qwen2 in a temp dir)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_random_text_model(Path(tmp) / "reader", seed=0, layers=4))
        engine = HFEngine(EngineConfig(model=model, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens))
        rng = random.Random(0)
        scenes = [world.sample_scene(rng) for _ in range(args.captions)]
        captions = [world.caption(s, rng.randrange(3)) for s in scenes]
        mcqs = [world.pick_mcqs(s, rng) for s in scenes]
        cfg = RewardConfig(mode=args.mode, n_draws=args.draws, seed=0)
        n = args.captions * args.draws
        print(f"reader {engine.model_id} | {args.captions} captions x {args.draws} draws = {n} reader prompts "
              f"| mode {args.mode} | batch_size {args.batch_size} | threads {args.threads}")

        batched = CapRLReward(engine, cfg)
        w0, c0 = time.perf_counter(), time.process_time()
        res_b = batched(captions, mcqs)
        wall_b, cpu_b = time.perf_counter() - w0, time.process_time() - c0
        assert batched.last_stats["reader_calls"] == 1

        single = CapRLReward(OneCallPerDraw(engine), cfg)
        w0, c0 = time.perf_counter(), time.process_time()
        res_s = single(captions, mcqs)
        wall_s, cpu_s = time.perf_counter() - w0, time.process_time() - c0

        for name, res, wall, cpu in (("batched (1 engine call)", res_b, wall_b, cpu_b),
                                     (f"one call per draw ({n} calls)", res_s, wall_s, cpu_s)):
            ok = [r.reward for r in res if r.reward is not None]
            print(f"{name:32s} wall {wall:8.2f} s  cpu {cpu:8.2f} s  {n / wall:7.1f} prompts/s"
                  f"  mean reward {sum(ok) / max(1, len(ok)):.3f}  missing {len(res) - len(ok)}")
        print(f"cpu-time ratio {cpu_s / cpu_b:.2f} (less sensitive to other load on a shared machine)")
        print(f"batched_speedup={wall_s / wall_b:.2f}")


if __name__ == "__main__":
    main()
