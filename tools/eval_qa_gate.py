"""The qa stage on the demo world, judged against the scenes' truth (numbers recorded in docs/qa.md).

    python tools/eval_qa_gate.py [--scenes 200] [--root DIR] [--parts 0,1,2] [--set qa.key=value ...]

Shard 0: nano-VL generates MCQs for N scenes and nano-filter gates them (the demo manifest's qa section):
keep rate of parsed questions, and how many kept questions are right against the scene. Shard 1: gate-only
(`qa.generate=false`) over planted questions on N other scenes: answer stated in the question, answer given
away by the options, wrong answer key, and the untouched ground-truth question (control). Shard 2: gate-only
absent-thing questions (manifests/demo.yaml's qa.absent, every quadrant of N more scenes asked "What shape is in
the <quadrant>?" with "There is no shape in the <quadrant>." keyed): kept when the quadrant is empty / occupied.
Give the gate a filter trained on absence with `--set qa.filter.model=models/nano/nano-filter-absent`.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time

import torch

from pipeline import shardio
from pipeline.config import load_config
from pipeline.demo import DEMO_MANIFEST
from pipeline.nano import qa_eval, world
from pipeline.runner import run_stage
from pipeline.storage import Storage

SEED = 2026


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--root", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parts", default="0,1,2", help="which shards to gate (0 generated, 1 planted, 2 absent)")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = args.root or tempfile.mkdtemp(prefix="qa-eval-")
    rng = random.Random(SEED)
    scenes = [[world.sample_scene(rng) for _ in range(args.scenes)] for _ in range(2)]
    planted = [qa_eval.planted_questions(s, rng) for s in scenes[1]]
    storage = Storage(root)
    storage.ensure_run_meta({"shard_size": args.scenes})
    absent_rng = random.Random(SEED + 2)  # its own stream: shards 0 and 1 stay as recorded
    scenes.append([world.sample_scene(absent_rng) for _ in range(args.scenes)])
    parts = {p.strip() for p in args.parts.split(",")}
    if not parts <= {"0", "1", "2"}:
        ap.error(f"--parts: shards 0, 1 and 2 exist, not {args.parts}")
    parts = {int(p) for p in parts}
    questions = [None, [[q for k in qa_eval.PLANTED for q in p[k]] for p in planted], [[] for _ in scenes[2]]]
    keys = {shard: qa_eval.write_image_shard(storage, shard, scenes[shard], questions[shard])
            for shard in sorted(parts)}  # the scenes of every part are drawn, so each part is the same alone
    base = [f"shard_size={args.scenes}", *args.overrides]
    res: dict[str, float] = {}
    absent = ["qa.generate=false", f"qa.absent.per_image={len(world.POSITIONS)}"]
    for shard, extra in ((0, []), (1, ["qa.generate=false"]), (2, absent)):
        if shard not in parts:
            continue
        config = load_config(DEMO_MANIFEST, base + extra, root=root)
        t0 = time.time()
        out = io.StringIO()
        report = run_stage(config, "qa", [shard], force=True, progress=False, out=out)
        if report.exit_code:
            print(out.getvalue(), file=sys.stderr)
            return 1
        rows = shardio.read_manifest(storage.url("qa", f"{shard:05d}.parquet"))
        if shard == 0:
            res.update(qa_eval.generated_report(rows, dict(zip(keys[0], scenes[0], strict=True))))
            stats = json.loads(storage.fs.cat_file(storage.path("qa/00000_stats.json")))["extra"]
            res.update({"leak_rate": stats["leak_rate"], "kept_per_image": stats["kept_per_image"]})
            print("answer letters before / after the gate:", stats["answer_letters_before"], stats["answer_letters_after"])
            print("rejected:", stats["rejected"])
        elif shard == 1:
            res.update(qa_eval.planted_report(rows))
        else:
            res.update(qa_eval.absent_report(rows, dict(zip(keys[2], scenes[2], strict=True))))
        res[f"seconds_shard{shard}"] = round(time.time() - t0, 1)
    for k, v in res.items():
        print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}")
    headline = ("kept_correct", "keep_rate", "stated_rejected", "options_only_rejected", "wrong_key_rejected",
                "absent_kept_when_empty", "absent_kept_when_occupied")
    print("qa_gate " + " ".join(f"{k}={res.get(k, float('nan')):.4f}" for k in headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
