"""Does RL visibly learn? The train stage on the demo world, held-out captions before and after.

    python tools/bench_train.py [--preset demo|faithful] [--scenes 400] [--heldout 200] [--steps 800]
                                [--work /tmp/bench_train] [--set train.learning_rate=5e-5 ...]
                                [--checkpoint <trained folder>]

1. Renders `--scenes` demo-world scenes, serves them on 127.0.0.1 and runs `download` and `qa` (nano-VL writes
   MCQs, nano-filter gates them) with manifests/demo.yaml.
2. Runs the `train` stage (RL from the manifest's train.policy, an under-trained snapshot) for `--steps` steps.
3. On `--heldout` scenes that training never saw (the nano eval's held-out stream, minus any scene equal to a
   training scene), captions greedily with the starting checkpoint and with the trained one (the hf engine,
   as annotate would) and scores both: the training reward (same reader and settings as in training, draws
   keyed by scene, so both sides see the same questions; a `wrong_penalty` is left out, so `reward` is the plain
   CapRL utility in every run and the negatively marked one is reported beside it as `marked`), the audit reward (the demo's rule reader), and the
   attribute accuracy against the scene truth (`truth`); and the faithfulness metrics of pipeline.faithful:
   coverage and hallucination (the demo world's claim parser, pipeline/nano/claims.py), repetition (share of
   captions with a word 4-gram said 3+ times) and length (policy tokens). Questions: 5 ground-truth MCQs per
   held-out scene. The training log's audits that raised the reward-hacking alarm are counted. The captions
   before and after are kept in <work>/bench_<train.name>.json (to rescore them).
4. With `annotate.abstain_below` set (the abstention gate of pipeline.abstain), both sides' captions are scored
   as annotate writes them: each sentence holding a word the captioner wrote below that probability dropped;
   the whole captions' figures follow as `without_abstention`. Either way the JSON's `abstain_sweep` gives
   coverage and hallucination on both sides at several thresholds.
`--checkpoint` scores a checkpoint trained before (its train_log.jsonl gives the alarms) instead of training.
Last line: reward_gain=<after - before> stderr=<standard error of the paired difference> truth_gain=<...>
halluc_before=<...> halluc_after=<...> repeat_after=<...>
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.abstain import gate
from pipeline.config import EngineConfig, RewardConfig, RunConfig, changed_settings, load_config
from pipeline.demo import URL_LIST, make_demo_data, serve_directory, write_url_list
from pipeline.engines.base import Generation, Sampling, create_engine, image_request
from pipeline.faithful import FactCheck, caption_metrics
from pipeline.nano import claims, world
from pipeline.nano import data as nano_data
from pipeline.resources import repo_path, resolve_model
from pipeline.reward import CapRLReward
from pipeline.runner import run_stage
from pipeline.storage import Storage

MANIFEST = repo_path("manifests", "demo.yaml")
LEVERS = [
    "qa.absent.per_image=1", "qa.filter.model=models/nano/nano-filter-absent",
    "train.reward.reader.model=models/nano/nano-reader-absent", "train.reward.absent_abstain=true",
    "train.audit.reward.absent_abstain=true", "train.repetition.weight=0.15", "train.length.weight=0.1",
    "train.length.full_tokens=48", "train.length.zero_tokens=96", "train.reward.wrong_penalty=1.0",
]
"""the faithfulness levers of docs/train.md: absent-thing questions (one per image, with the -absent filter and
reader), the repetition and length terms, negative marking at 1.0"""
F1 = ["train.policy.model=models/nano/nano-vl-brief", *LEVERS, "train.learning_rate=2e-5"]
PRESETS = {
    "demo": [],
    "faithful-f1": F1,
    "faithful": [*F1, "train.reward.wrong_penalty=3.0", "train.beta=0.05", "annotate.abstain_below=0.995"],
}
"""--preset: demo = the manifest as it is (RL from nano-vl-step300, no lever); faithful-f1 = run F1 of docs/train.md
(issue 29: from nano-vl-brief, a captioner that sees but says little, every faithfulness lever, lr 2e-5);
faithful = run F6: F1 with marking 3.0 and a KL term to the start (F4), its captions scored as annotate writes
them with the abstention gate at 0.995 (the threshold tools/calibrate_abstain.py chose for F4's checkpoint on
2,706 validation scenes)"""


ABSTAIN_SWEEP = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)
"""Thresholds of the abstention sweep in the JSON (`abstain_sweep`)."""


def heldout(n: int, seen: set[str]) -> list[world.Scene]:
    scenes = [s for s in nano_data.eval_scenes(n + 50) if s.to_json() not in seen]
    return scenes[:n]


def captions(model: str, policy: EngineConfig, prompt: str, scenes: list[world.Scene], max_new_tokens: int
             ) -> list[Generation]:
    """Greedy captions with their token log-probabilities (recording them does not change the text)."""
    engine = create_engine(policy.model_copy(update={"model": model, "backend": "hf"}))
    try:
        reqs = [image_request(prompt, world.render(s)) for s in scenes]
        return [g[0] for g in engine.generate(reqs, Sampling(max_new_tokens=max_new_tokens, logprobs=True))]
    finally:
        engine.close()


def gated(gens: list[Generation], min_prob: float) -> list[str]:
    """The captions as annotate writes them with `abstain_below=min_prob` (pipeline.abstain; an all-dropped
    caption is empty here, a failed row there)."""
    return [gate(g.text, g.tokens, min_prob).text for g in gens]


def abstain_sweep(before: list[Generation], after: list[Generation], scenes: list[world.Scene],
                  count_tokens: Any) -> dict[str, dict[str, Any]]:
    """Coverage and hallucination before and after at several abstention thresholds (0: off), to choose one."""
    out = {}
    for t in ABSTAIN_SWEEP:
        sides = {}
        for side, gens in (("before", before), ("after", after)):
            caps = gated(gens, t)
            m = faithfulness(caps, fact_checks(caps, scenes), count_tokens)
            sides[side] = {"coverage": m["coverage"], "hallucination": m["hallucination"],
                           "empty": sum(1 for c in caps if not c)}
        out[str(t)] = sides
    return out


def score(caps: list[str], scenes: list[world.Scene], reward: CapRLReward, audit: CapRLReward,
          wrong_penalty: float = 0.0) -> dict[str, list[float]]:
    rng = random.Random(20261128)
    mcqs = [world.pick_mcqs(s, rng, k=5) for s in scenes]
    keys = [f"bench|{i}" for i in range(len(scenes))]
    results = reward(caps, mcqs, keys=keys)
    train = [r.reward for r in results]
    aud = [r.reward for r in audit(caps, mcqs, keys=keys)]
    truth = [world.caption_accuracy(s, c)["attribute_accuracy"] for s, c in zip(scenes, caps, strict=True)]
    if any(v is None for v in train + aud):
        raise RuntimeError("a held-out reward is missing")
    out = {"reward": train, "audit": aud, "truth": truth}
    if wrong_penalty:
        out["marked"] = [statistics.fmean(d.score(wrong_penalty) for d in r.draws) for r in results]  # type: ignore[misc]
    return out  # type: ignore[return-value]


def fact_checks(caps: list[str], scenes: list[world.Scene]) -> list[FactCheck]:
    """Each held-out caption's claims checked against its scene."""
    return [claims.check_scene(s, c) for s, c in zip(scenes, caps, strict=True)]


def faithfulness(caps: list[str], checks: list[FactCheck], count_tokens: Any) -> dict[str, float | None]:
    """Mean coverage, hallucination, repetition and length (tokens) of held-out captions."""
    metrics = caption_metrics(caps, checks, count_tokens)
    return {k: (round(v, 4) if v is not None else None) for k, v in metrics.to_dict().items() if k != "captions"}


def halluc_change(before: list[FactCheck], after: list[FactCheck]) -> dict[str, float | int]:
    """The paired change of per-caption hallucination over the scenes whose captions make a claim before and
    after (the metric's mean leaves a claimless caption out, so its two sides can differ in which captions count)."""
    pairs = [(b.hallucination, a.hallucination) for b, a in zip(before, after, strict=True)
             if b.hallucination is not None and a.hallucination is not None]
    change, err = paired([b for b, _ in pairs], [a for _, a in pairs])
    return {"pairs": len(pairs), "change": round(change, 4), "stderr": round(err, 4)}


def reusable_qa(storage: Storage, config: RunConfig, shards: list[int], work: Path) -> bool:
    """Whether `work` already holds this run's qa output (a rerun reuses it). Exits, naming the settings, when
    it holds qa output made with other qa settings (e.g. a demo --work given to --preset faithful)."""
    committed = storage.committed("qa")
    if not set(shards) <= set(committed):
        return False
    changes = sorted({c for s in shards for c in changed_settings(committed[s].get("config"), config, "qa")})
    if changes:
        raise SystemExit(f"{work} holds qa output made with other settings (changed: "
                         f"{', '.join('qa.' + c for c in changes[:6])}); give this run its own --work")
    return True


def alarms(log_file: Path) -> tuple[int, int]:
    """(audits that raised the reward-hacking alarm, audits) in a train_log.jsonl."""
    audits = [row["audit"] for row in map(json.loads, log_file.read_text().splitlines()) if row.get("audit")]
    return sum(1 for a in audits if a.get("alarm")), len(audits)


def paired(before: list[float], after: list[float]) -> tuple[float, float]:
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=400)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--work", default=None,
                    help="data and run folder (default /tmp/bench_train, /tmp/bench_train_<preset> for a preset other "
                         "than demo); a rerun reuses its qa output, so runs with other qa settings need their own")
    ap.add_argument("--preset", choices=list(PRESETS), default="demo",
                    help="named settings applied before --set (faithful: docs/train.md, issue 29's run)")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--checkpoint", default=None,
                    help="score this trained checkpoint folder instead of training (e.g. at another abstain_below)")
    ap.add_argument("--data-only", action="store_true",
                    help="stop once download and qa are committed (prepare --work for runs that follow)")
    args = ap.parse_args(argv)
    t0 = time.time()
    work = Path(args.work or "/tmp/bench_train" + ("" if args.preset == "demo" else f"_{args.preset}"))
    data_dir = work / "data"
    if not (data_dir / URL_LIST).exists():
        make_demo_data(data_dir, n_images=args.scenes)
    config = load_config(MANIFEST, overrides=[
        f"root={work / 'root'}", f"download.urls={data_dir / URL_LIST}", "shard_size=50", "train.load=null",
        f"train.max_steps={args.steps}", *PRESETS[args.preset], *args.overrides])
    shards = list(range(-(-args.scenes // config.shard_size)))
    storage = Storage(config.root, config.storage_options, config.work_dir)
    if not reusable_qa(storage, config, shards, work):  # a rerun on the same --work reuses the qa output
        with serve_directory(data_dir, 0) as base_url:
            write_url_list(data_dir, base_url)
            for stage in ("download", "qa"):
                if run_stage(config, stage, shards, progress=False).exit_code:
                    return 1
    t_data = time.time() - t0
    if args.data_only:
        print(f"data ready under {work} in {t_data / 60:.1f} minutes")
        return 0
    import pyarrow.parquet as pq

    seen = set(pq.read_table(data_dir / "world.parquet", columns=["scene"]).column("scene").to_pylist())
    scenes = heldout(args.heldout, seen)
    cfg = config.train
    penalty = cfg.reward.wrong_penalty
    reward_cfg: RewardConfig = cfg.reward.model_copy(update={"reader": resolve_model(cfg.reward.reader),
                                                              "wrong_penalty": 0.0})
    reward = CapRLReward.from_config(reward_cfg)
    audit = CapRLReward.from_config(RewardConfig(reader=EngineConfig(backend="nano-rule"), mode="option_text",
                                                 n_draws=reward_cfg.n_draws))
    start = resolve_model(cfg.policy).model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(start)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    abstain_below = config.annotate.abstain_below
    before_gens = captions(start, cfg.policy, cfg.prompt, scenes, cfg.max_new_tokens)
    before_caps = gated(before_gens, abstain_below)
    before = score(before_caps, scenes, reward, audit, penalty)
    before_checks = fact_checks(before_caps, scenes)
    faithful_before = faithfulness(before_caps, before_checks, count_tokens)
    print(f"before: {json.dumps(faithful_before)}", flush=True)

    t1 = time.time()
    if args.checkpoint:
        trained = args.checkpoint
    else:
        shutil.rmtree(work / "root" / "checkpoints" / "_progress" / cfg.name, ignore_errors=True)  # never resume
        if run_stage(config, "train", None, force=True).exit_code:  # a benchmark always trains afresh
            return 1
        trained = storage.path("checkpoints", cfg.name)
    t_train = time.time() - t1
    after_gens = captions(trained, cfg.policy, cfg.prompt, scenes, cfg.max_new_tokens)
    after_caps = gated(after_gens, abstain_below)
    after = score(after_caps, scenes, reward, audit, penalty)
    summary = json.loads(Path(trained, "train_summary.json").read_text())
    out = {"scenes_train": args.scenes, "heldout": len(scenes), "steps": summary["steps"],
           "train_minutes": None if args.checkpoint else round(t_train / 60, 1), "checkpoint": args.checkpoint, "data_minutes": round(t_data / 60, 1),
           "total_minutes": round((time.time() - t0) / 60, 1), "preset": args.preset, "overrides": args.overrides,
           "examples_after": after_caps[:3]}
    out["alarms"], out["audits"] = alarms(Path(trained, "train_log.jsonl"))
    after_checks = fact_checks(after_caps, scenes)
    out["faithfulness"] = {"before": faithful_before,
                           "after": faithfulness(after_caps, after_checks, count_tokens),
                           "halluc_change": halluc_change(before_checks, after_checks)}
    out["abstain_below"] = abstain_below
    out["abstain_sweep"] = abstain_sweep(before_gens, after_gens, scenes, count_tokens)
    if abstain_below:  # the same run's captions whole: what RL alone did
        raw_before, raw_after = [g.text for g in before_gens], [g.text for g in after_gens]
        raw_checks = fact_checks(raw_before, scenes), fact_checks(raw_after, scenes)
        raw_b, raw_a = score(raw_before, scenes, reward, audit), score(raw_after, scenes, reward, audit)
        gain, err = paired(raw_b["reward"], raw_a["reward"])
        out["without_abstention"] = {
            "reward_gain": round(gain, 4), "stderr": round(err, 4),
            "truth_gain": round(statistics.fmean(raw_a["truth"]) - statistics.fmean(raw_b["truth"]), 4),
            "before": faithfulness(raw_before, raw_checks[0], count_tokens),
            "after": faithfulness(raw_after, raw_checks[1], count_tokens),
            "halluc_change": halluc_change(*raw_checks)}
    saved = f"bench_{Path(args.checkpoint).name}_rescored.json" if args.checkpoint else f"bench_{cfg.name}.json"
    Path(work, saved).write_text(json.dumps(
        {"scenes": [s.to_json() for s in scenes], "before": before_caps, "after": after_caps,
         "abstain_below": abstain_below, "before_whole": [g.text for g in before_gens],
         "after_whole": [g.text for g in after_gens], "before_tokens": [g.tokens for g in before_gens],
         "after_tokens": [g.tokens for g in after_gens]}))
    for name in before:
        gain, err = paired(before[name], after[name])
        out[name] = {"before": round(statistics.fmean(before[name]), 4), "after": round(statistics.fmean(after[name]), 4),
                     "gain": round(gain, 4), "stderr": round(err, 4)}
    print(json.dumps(out, indent=2))
    if abstain_below:
        w = out["without_abstention"]
        print(f"without abstention: reward_gain={w['reward_gain']:.4f} stderr={w['stderr']:.4f} "
              f"truth_gain={w['truth_gain']:.4f} halluc_before={w['before']['hallucination']} "
              f"halluc_after={w['after']['hallucination']} repeat_after={w['after']['repetition']}")
    r, t = out["reward"], out["truth"]
    f_before, f_after = out["faithfulness"]["before"], out["faithfulness"]["after"]
    print(f"reward_gain={r['gain']:.4f} stderr={r['stderr']:.4f} truth_gain={t['gain']:.4f} "
          f"halluc_before={f_before['hallucination']} halluc_after={f_after['hallucination']} "
          f"repeat_after={f_after['repetition']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
