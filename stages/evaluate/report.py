"""Scores and the report: mean accuracy over the k captions and best-of-k, per benchmark and overall.

Definitions (per captioner, per benchmark):
- mean: the fraction of right answers over every (question, caption) pair: each question is answered once
  from each of its image's k captions;
- best_of_k: for each image, the best of its k captions (the one whose answers to that image's questions
  are right most often), averaged over images weighted by their question counts; an oracle pick.
Overall: the unweighted mean over benchmarks (as the Prism average is). A captioner with no caption for a
benchmark (a reference baseline where the benchmark has none) shows n/a there and is averaged over the rest.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Scored:
    """One reader answer, reduced to what the scores need."""

    captioner: str
    benchmark: str
    image_id: str
    caption_index: int
    correct: bool


def scores(rows: Sequence[Scored], captioners: Sequence[str], benchmarks: Sequence[str]) -> dict[str, Any]:
    """{captioner: {"mean", "best_of_k", "per_benchmark": {bench: {"mean", "best_of_k", "questions"}}}}."""
    cells: dict[tuple[str, str], dict[str, dict[int, list[bool]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        cells[(r.captioner, r.benchmark)][r.image_id][r.caption_index].append(r.correct)
    out: dict[str, Any] = {}
    for cap in captioners:
        per: dict[str, Any] = {}
        for bench in benchmarks:
            images = cells.get((cap, bench))
            if not images:
                per[bench] = None
                continue
            right = total = best = questions = 0
            for by_caption in images.values():
                n_q = len(next(iter(by_caption.values())))
                right += sum(sum(v) for v in by_caption.values())
                total += sum(len(v) for v in by_caption.values())
                best += max(sum(v) for v in by_caption.values())
                questions += n_q
            per[bench] = {"mean": right / total, "best_of_k": best / questions, "questions": questions,
                          "images": len(images)}
        present = [v for v in per.values() if v is not None]
        out[cap] = {
            "mean": sum(v["mean"] for v in present) / len(present) if present else None,
            "best_of_k": sum(v["best_of_k"] for v in present) / len(present) if present else None,
            "per_benchmark": per,
        }
    return out


def faithfulness(per_benchmark: dict[str, Any]) -> dict[str, Any]:
    """Overall faithfulness metrics: the unweighted mean over benchmarks of each (those where it is known)."""
    out: dict[str, Any] = {}
    for metric in METRICS:
        vals = [m[metric] for m in per_benchmark.values() if m and m.get(metric) is not None]
        out[metric] = sum(vals) / len(vals) if vals else None
    return out


METRICS = ("coverage", "hallucination", "repetition", "length")
"""pipeline.faithful's metrics, as the report's columns: coverage / hallucination / repetition in %, length in words."""


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _metric_cells(s: dict[str, Any]) -> list[str]:
    f = s.get("faithfulness") or {}
    length = f.get("length")
    return [_pct(f.get("coverage")), _pct(f.get("hallucination")), _pct(f.get("repetition")),
            "n/a" if length is None else f"{length:.1f}"]


def markdown(report: dict[str, Any]) -> str:
    """The table: one row per captioner, mean and best-of-k per benchmark and overall (accuracy in %)."""
    benches = report["benchmarks"]
    k = report["k"]
    head = ["captioner", *[f"{b} mean" for b in benches], *[f"{b} best-of-{k}" for b in benches],
            "overall mean", f"overall best-of-{k}", "coverage", "hallucination", "repetition", "length"]
    lines = [f"# Evaluation `{report['name']}`", "",
             f"Reader `{report['reader']}` ({report['answer_mode']}), k = {k} captions per image "
             f"(temperature {report['sampling']['temperature']}), seed {report['seed']}. Accuracy in %. "
             "Faithfulness over every caption (pipeline.faithful), mean over benchmarks: coverage and "
             "hallucination in % where a benchmark has truth, repetition = % of captions with a word 4-gram "
             "said 3+ times, length in words.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in report["captioners"].items():
        per = s["per_benchmark"]
        cells = [name, *[_pct(per[b]["mean"] if per[b] else None) for b in benches],
                 *[_pct(per[b]["best_of_k"] if per[b] else None) for b in benches],
                 _pct(s["mean"]), _pct(s["best_of_k"]), *_metric_cells(s)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    judge = report.get("judge")
    if judge:
        lines += [f"Judge `{judge['model']}` ({judge['captions_per_image']} caption(s) per image; scores in %; "
                  "failed answers are left out and counted):", "",
                  "| captioner | factuality | coverage | hallucination | judged | failed |", "|---|---|---|---|---|---|"]
        for name, j in judge["captioners"].items():
            lines.append(f"| {name} | {_pct(j['factuality'])} | {_pct(j['coverage'])} | {_pct(j['hallucination'])} "
                         f"| {j['judged']} | {j['failed']} |")
        lines.append("")
    for b in benches:
        sizes = next((s["per_benchmark"][b] for s in report["captioners"].values() if s["per_benchmark"][b]), None)
        if sizes:
            lines.append(f"- `{b}`: {sizes['images']} images, {sizes['questions']} questions")
    return "\n".join(lines) + "\n"


def write_json(report: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def bar_chart(report: dict[str, Any], path: str) -> None:
    """A PNG bar chart: mean and best-of-k overall accuracy per captioner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["captioners"])
    mean = [100 * (report["captioners"][n]["mean"] or 0.0) for n in names]
    best = [100 * (report["captioners"][n]["best_of_k"] or 0.0) for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 1), 3.2), dpi=100)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], mean, width=0.4, label="mean")
    ax.bar([x + 0.2 for x in xs], best, width=0.4, label=f"best-of-{report['k']}")
    ax.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"evaluate {report['name']}: reader accuracy from captions", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
