"""Choose an abstention threshold (annotate.abstain_below) on demo-world scenes that bench_train never scores.

    python tools/calibrate_abstain.py --start models/nano/nano-vl-brief --trained <checkpoint> [--scenes 3000]

Captions `--scenes` validation scenes greedily with both checkpoints (the nano eval stream after the first
`--skip` scenes, which hold bench_train's held-out set, and without any scene equal to one of those), gates
them at each threshold of the sweep (pipeline.abstain) and prints coverage and hallucination per side. The
chosen threshold is the smallest one at which the trained captioner's hallucination is no higher than the
start's under the same gate (the least coverage given up for issue 29's halluc_after <= halluc_before).
Last line: threshold=<chosen, or none> coverage_after=<at it> halluc_start=<> halluc_trained=<>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python tools/calibrate_abstain.py` from anywhere

from pipeline.config import EngineConfig  # noqa: E402
from pipeline.nano import data as nano_data  # noqa: E402
from pipeline.resources import resolve_resource  # noqa: E402
from tools.bench_train import captions, fact_checks, faithfulness, gated  # noqa: E402

SWEEP = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995)
PROMPT = "Please describe this image in detail."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", required=True)
    ap.add_argument("--trained", required=True)
    ap.add_argument("--scenes", type=int, default=3000)
    ap.add_argument("--skip", type=int, default=250, help="eval-stream scenes left to bench_train's held-out set")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args(argv)
    stream = nano_data.eval_scenes(args.skip + args.scenes)
    held = {s.to_json() for s in stream[:args.skip]}
    scenes = [s for s in stream[args.skip:] if s.to_json() not in held]
    policy = EngineConfig(backend="hf", device="cpu", min_pixels=12544, max_pixels=12544)
    gens = {side: captions(resolve_resource(path), policy, PROMPT, scenes, args.max_new_tokens)
            for side, path in (("start", args.start), ("trained", args.trained))}
    print(f"{len(scenes)} validation scenes (eval stream {args.skip}..{args.skip + args.scenes})")
    print("threshold  start coverage / hallucination   trained coverage / hallucination")
    rows = {}
    for t in SWEEP:
        rows[t] = {}
        for side, g in gens.items():
            caps = gated(g, t)
            rows[t][side] = faithfulness(caps, fact_checks(caps, scenes), lambda text: len(text.split()))
        s, r = rows[t]["start"], rows[t]["trained"]
        print(f"{t:9.3f}  {s['coverage']:.4f} / {s['hallucination']:.4f}            "
              f"{r['coverage']:.4f} / {r['hallucination']:.4f}")
    chosen = next((t for t in SWEEP if rows[t]["trained"]["hallucination"] <= rows[t]["start"]["hallucination"]), None)
    at = rows[chosen] if chosen is not None else rows[SWEEP[0]]
    print(f"threshold={chosen if chosen is not None else 'none'} coverage_after={at['trained']['coverage']} "
          f"halluc_start={at['start']['hallucination']} halluc_trained={at['trained']['hallucination']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
