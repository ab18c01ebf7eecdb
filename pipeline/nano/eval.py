"""Evaluate the nano models on 200 held-out scenes and print the quality targets.

    python -m pipeline.nano.eval [--models models/nano] [--scenes 200] [--write-manifest]

Captioner (caption_accuracy) and MCQ generation (pipeline.mcq.parse_generator_output + correctness
against the scene) of nano-VL, the gate filter (nano-filter) with / without the image, reader from
ground-truth and uninformative captions, and the CapRL reward (8 draws with replacement, fresh shuffle + CANNOT_ANSWER
per draw, option_text answers) of ground-truth, empty, under-trained and nano-VL captions.
Last line: nano_min_margin=<reward(gt) - reward(empty)>.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from pipeline.config import RewardConfig
from pipeline.mcq import (
    CANNOT_ANSWER,
    CAPTION_PROMPT,
    MCQ,
    NONE_OF_THE_ABOVE,
    QA_GENERATION_PROMPT,
    READER_PREFILL,
    ShuffledMCQ,
    filter_messages,
    parse_generator_output,
    shuffle_options,
)
from pipeline.nano import data, world
from pipeline.nano.infer import NanoReader, NanoReaderEngine, NanoVL
from pipeline.resources import repo_path
from pipeline.reward import compute_rewards

DEFAULT_MODELS = repo_path("models", "nano")
VL_NAME = "nano-vl"
FILTER_NAME = "nano-filter"
READER_NAME = "nano-reader"
UNDERTRAINED = tuple(data.SNAPSHOTS)  # the under-trained captioner snapshots
REWARD_DRAWS = 8

TARGETS = {
    "caption_attribute_accuracy": (">=", 0.95), "caption_exact": (">=", 0.9),
    "qagen_parse_5": (">=", 0.95), "qagen_correct": (">=", 0.9),
    "filter_with_image": (">=", 0.9),
    "reader_gt_accuracy": (">=", 0.85), "reader_cannot_uninformative": (">=", 0.9),
    "reward_gt": (">=", 0.85), "reward_empty": ("<=", 0.3),
}


def eval_mcqs(scenes: Sequence[world.Scene], k: int = 5) -> list[list[MCQ]]:
    """The held-out questions: k per scene from their own RNG stream."""
    rng = random.Random(data.EVAL_MCQ_SEED)
    return [world.pick_mcqs(s, rng, k=k) for s in scenes]


def mcq_correct(scene: world.Scene, q: MCQ) -> bool:
    """A generated MCQ is correct when the scene's answer to its question is its keyed option (and unique)."""
    truth = world.answer_from_scene(world.scene_facts(scene), q.question)
    opts = [o.strip().lower() for o in q.options]
    return truth is not None and q.answer_text.strip().lower() == truth and opts.count(truth) == 1


def eval_captioner(vl: NanoVL, scenes: Sequence[world.Scene]) -> tuple[dict[str, float], list[str]]:
    caps = vl.generate(data.image_messages(CAPTION_PROMPT), [world.render(s) for s in scenes], max_new_tokens=96)
    accs = [world.caption_accuracy(s, c) for s, c in zip(scenes, caps, strict=True)]
    return {"caption_attribute_accuracy": sum(a["attribute_accuracy"] for a in accs) / len(accs),
            "caption_exact": sum(a["exact"] for a in accs) / len(accs)}, caps


_BLOCK_Q = re.compile(r"^\*\*\d+\.\s*(?P<q>.+?)\*\*\s*$", re.M)
_BLOCK_A = re.compile(r"^Answer:\s*[A-F]\)\s*(?P<a>.+?)\s*$", re.M)


def answer_texts(text: str) -> list[tuple[str, str]]:
    """(question, text after 'Answer: X)') per block: what the generator says is right, letter aside."""
    out = []
    for block in text.split("---"):
        q, a = _BLOCK_Q.search(block), _BLOCK_A.search(block)
        if q and a:
            out.append((q.group("q").strip(), a.group("a").strip()))
    return out


def eval_qagen(vl: NanoVL, scenes: Sequence[world.Scene]) -> dict[str, float]:
    """Parse rate into 5 valid MCQs, correctness of the parsed ones, and (diagnostic) how often the
    written answer text is right regardless of its letter."""
    outs = vl.generate(data.image_messages(QA_GENERATION_PROMPT), [world.render(s) for s in scenes],
                       max_new_tokens=320)
    five = correct = total = blocks = text_right = 0
    for scene, text in zip(scenes, outs, strict=True):
        mcqs, rejected = parse_generator_output(text)
        five += len(mcqs) == 5 and not rejected
        total += len(mcqs) + len(rejected)
        correct += sum(mcq_correct(scene, q) for q in mcqs)
        pairs = answer_texts(text)
        blocks += len(pairs)
        facts = world.scene_facts(scene)
        text_right += sum(world.answer_from_scene(facts, q) == a.lower() for q, a in pairs)
    return {"qagen_parse_5": five / len(scenes), "qagen_correct": correct / max(1, total),
            "qagen_blocks_per_output": blocks / len(scenes), "qagen_answer_text_correct": text_right / max(1, blocks)}


def filter_requests(scenes: Sequence[world.Scene], mcqs: Sequence[Sequence[MCQ]], rng: random.Random,
                    with_image: bool) -> tuple[list[tuple[list[dict], Image.Image | None, str]], list[ShuffledMCQ],
                                               list[world.Scene]]:
    """The gate's queries for every held-out question (fresh shuffle; with the image, NONE_OF_THE_ABOVE
    added), the shown MCQs and each one's scene."""
    reqs, shown_all, owners = [], [], []
    for scene, qs in zip(scenes, mcqs, strict=True):
        img = world.render(scene) if with_image else None
        for q in qs:
            shown = shuffle_options(q, rng, extra_option=NONE_OF_THE_ABOVE if with_image else None)
            reqs.append((filter_messages(shown, with_image), img, READER_PREFILL))
            shown_all.append(shown)
            owners.append(scene)
    return reqs, shown_all, owners


def filter_picks(vl: NanoVL, reqs: Sequence[tuple[list[dict], Image.Image | None, str]],
                 shown: Sequence[ShuffledMCQ]) -> list[int]:
    """The option the filter scores highest (' ' + option text after the pre-fill) for each query."""
    scores = vl.score(reqs, [[" " + o for o in s.options] for s in shown])
    return [max(range(len(sc)), key=sc.__getitem__) for sc in scores]


def accuracy_by_type(picks: Sequence[int], shown: Sequence[ShuffledMCQ]) -> tuple[float, dict[str, float]]:
    """Overall accuracy of the picked option indices, and per question type (sorted)."""
    by_type: dict[str, list[bool]] = defaultdict(list)
    for p, s in zip(picks, shown, strict=True):
        by_type[s.mcq.qtype].append(s.options[p] == s.mcq.answer_text)
    return sum(sum(v) for v in by_type.values()) / len(picks), {t: sum(v) / len(v) for t, v in sorted(by_type.items())}


def eval_filter(vl: NanoVL, scenes: Sequence[world.Scene], mcqs: Sequence[Sequence[MCQ]]) -> dict[str, float]:
    """Accuracy with and without the image, and with the image per question type."""
    rng = random.Random(data.EVAL_MCQ_SEED + 1)
    out = {}
    for with_image in (True, False):
        reqs, shown_all, _ = filter_requests(scenes, mcqs, rng, with_image)
        overall, per_type = accuracy_by_type(filter_picks(vl, reqs, shown_all), shown_all)
        name = "filter_with_image" if with_image else "filter_without_image"
        out[name] = overall
        if with_image:
            out.update({f"{name}_{t}": a for t, a in per_type.items()})
    out.update(eval_filter_leaks(vl, scenes))
    return out


def eval_filter_leaks(vl: NanoVL, scenes: Sequence[world.Scene]) -> dict[str, float]:
    """Without the image, how often the filter picks the leaked answer of a question that gives it away
    (data.leaky_mcq: stated in the question, or the only option of the asked kind); one per scene and kind.
    Chance is 0.25; a filter that sees the leak answers 1.0 and the gate rejects the question as leaky."""
    rng = random.Random(data.EVAL_MCQ_SEED + 3)
    out = {}
    for kind in data.LEAK_KINDS:
        leaky = [[data.leaky_mcq(s, rng, kind)] for s in scenes]
        reqs, shown_all, _ = filter_requests(scenes, leaky, rng, False)
        out[f"filter_without_image_{kind}"] = accuracy_by_type(filter_picks(vl, reqs, shown_all), shown_all)[0]
    return out


def eval_reader(reader: NanoReader, scenes: Sequence[world.Scene]) -> dict[str, float]:
    rng = random.Random(data.EVAL_MCQ_SEED + 2)
    items = []
    for i, scene in enumerate(scenes):
        cap = world.caption(scene, i % 3)
        for q in world.scene_mcqs(scene, rng):
            items.append((cap, shuffle_options(q, rng, extra_option=CANNOT_ANSWER)))
    overall, per_type = accuracy_by_type(reader.answer(items), [s for _, s in items])
    res = {"reader_gt_accuracy": overall} | {f"reader_gt_{t}": a for t, a in per_type.items()}
    unin = [(world.UNINFORMATIVE_CAPTION, s) for _, s in items[:: max(1, len(items) // 400)]]
    picks = reader.answer(unin)
    res["reader_cannot_uninformative"] = sum(s.options[p] == CANNOT_ANSWER for (_, s), p in zip(unin, picks, strict=True)) / len(unin)
    return res


def caprl_reward(reader: NanoReaderEngine, captions: Sequence[str], mcqs: Sequence[Sequence[MCQ]],
                 seed: int = 0, draws: int = REWARD_DRAWS) -> list[float]:
    """pipeline.reward (8 draws with replacement, fresh shuffle + CANNOT_ANSWER per draw) in option_text mode."""
    cfg = RewardConfig(mode="option_text", n_draws=draws, seed=seed, few_shot=True)
    results = compute_rewards(captions, mcqs, reader, cfg)
    missing = [r.reason for r in results if r.reward is None]
    if missing:
        raise RuntimeError(f"{len(missing)} rewards missing, first: {missing[0]}")
    return [float(r.reward) for r in results]  # type: ignore[arg-type]


def eval_absent_reader(reader: NanoReaderEngine, scenes: Sequence[world.Scene], seed: int = 0) -> dict[str, float]:
    """The reward on the absent-thing questions about each scene's empty quadrants (absent_abstain on), for
    the scene's true caption (`absent_honest`, 1 is right) and for one that invents a shape in every empty
    quadrant (`absent_invented`, 0 is right)."""
    rng = random.Random(data.EVAL_MCQ_SEED + 3)
    caps, mcqs = [], []
    for i, scene in enumerate(s for s in scenes if len(s.objects) < len(world.POSITIONS)):
        empty = [p for p in world.POSITIONS if scene.at(p) is None]
        caps += [world.caption(scene, i % 3), data.invented_caption(scene, rng, positions=empty, template=i % 3)]
        mcqs += [[data.absent_mcq(scene, p) for p in empty]] * 2
    cfg = RewardConfig(mode="option_text", n_draws=REWARD_DRAWS, seed=seed, few_shot=True, absent_abstain=True)
    rewards = [float(r.reward) for r in compute_rewards(caps, mcqs, reader, cfg)]  # type: ignore[arg-type]
    return {"absent_honest": sum(rewards[0::2]) / len(rewards[0::2]),
            "absent_invented": sum(rewards[1::2]) / len(rewards[1::2])}


def _fmt(name: str, value: float) -> str:
    target = TARGETS.get(name)
    if target is None:
        return f"{name:34s} {value:.3f}"
    op, bound = target
    ok = value >= bound if op == ">=" else value <= bound
    return f"{name:34s} {value:.3f}   target {op} {bound}  {'OK' if ok else 'MISSED'}"


def _print(msg: str) -> None:
    print(msg, flush=True)


SECTIONS = ("models", "gate")


def run(models: Path, n_scenes: int, log: Callable[[str], None] = _print, device: str = "cpu",
        sections: Sequence[str] = SECTIONS) -> dict[str, float]:
    """Every metric on the first n_scenes held-out scenes, printed as it is measured: section "models"
    (nano-VL's captions and MCQs, the reader, the rewards, the snapshots), section "gate" (nano-filter)."""
    scenes = data.eval_scenes(n_scenes)
    mcqs = eval_mcqs(scenes)
    res: dict[str, float] = {}
    t0 = time.time()

    def add(part: dict[str, float]) -> None:
        res.update(part)
        for k, v in part.items():
            log(_fmt(k, v))

    if "models" in sections:
        vl = NanoVL(models / VL_NAME, device=device)
        r, vl_caps = eval_captioner(vl, scenes)
        add(r)
        add(eval_qagen(vl, scenes))
        reader = NanoReaderEngine(models / READER_NAME, device=device)
        add(eval_reader(reader, scenes))
        gt = [world.caption(s, i % 3) for i, s in enumerate(scenes)]
        add({"reward_gt": sum(caprl_reward(reader, gt, mcqs)) / len(scenes),
             "reward_empty": sum(caprl_reward(reader, [""] * len(scenes), mcqs)) / len(scenes),
             "reward_uninformative": sum(caprl_reward(reader, [world.UNINFORMATIVE_CAPTION] * len(scenes), mcqs))
             / len(scenes),
             "reward_nano_vl": sum(caprl_reward(reader, vl_caps, mcqs)) / len(scenes)})
        for name in UNDERTRAINED:
            if (models / name).exists():
                acc, caps = eval_captioner(NanoVL(models / name, device=device), scenes)
                add({f"{name}_caption_exact": acc["caption_exact"],
                     f"{name}_caption_attribute_accuracy": acc["caption_attribute_accuracy"],
                     f"reward_{name}": sum(caprl_reward(reader, caps, mcqs)) / len(scenes)})
    if "gate" in sections:
        add(eval_filter(NanoVL(models / FILTER_NAME, device=device), scenes, mcqs))
    res["eval_seconds"] = round(time.time() - t0, 1)
    return res


def write_manifest(models: Path, res: dict[str, float], n_scenes: int) -> None:
    """Store the eval numbers in models/MANIFEST.json (key "eval")."""
    path = models / "MANIFEST.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest["eval"] = {k: round(v, 4) for k, v in res.items()} | {"scenes": n_scenes}
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def report(res: dict[str, float]) -> None:
    """The eval's time and its last line, nano_min_margin=<reward(gt) - reward(empty)>."""
    print(_fmt("eval_seconds", res["eval_seconds"]), flush=True)
    print(f"nano_min_margin={res['reward_gt'] - res['reward_empty']:.4f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.nano.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=str(DEFAULT_MODELS))
    ap.add_argument("--scenes", type=int, default=data.N_EVAL_SCENES)
    ap.add_argument("--write-manifest", action="store_true", help="store the numbers in MANIFEST.json")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    models = Path(args.models)
    missing = [n for n in (VL_NAME, FILTER_NAME, READER_NAME) if not (models / n / "config.json").is_file()]
    if missing:
        ap.error(f"no {' / '.join(missing)} model folder under {models}")
    res = run(models, args.scenes, device=args.device)
    if args.write_manifest:
        write_manifest(models, res, args.scenes)
    report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
