"""Where a gate filter's answers go wrong (nano-filter by default, or nano-VL): per-type accuracy, what
the wrong position answers pick, where the last text layer looks when it answers, and what the image
tokens' residuals carry.

    python -m pipeline.nano.diagnose [--model models/nano/nano-filter] [--scenes 200]

- filter: the eval's with-image accuracy per question type; for "Where is the <colour> <shape>?" the
  kind of each wrong pick (an empty quadrant, another object sharing the shape or the colour, another
  object, none of the above);
- attention: per question type and last-layer head, the attention weight at the answer position on the
  asked object's quadrant (`data.answer_region`) and on the whole image;
- probes: linear probes on each text layer's residual at the image tokens (fit on the first 3/4 of the
  scenes, tested on the rest): the token's quadrant, and the shape / colour of the object in it.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.mcq import CAPTION_PROMPT, MCQ, NONE_OF_THE_ABOVE
from pipeline.nano import data, world
from pipeline.nano.encode import image_token_labels, prompt_text, quadrant_tokens
from pipeline.nano.eval import (
    DEFAULT_MODELS,
    FILTER_NAME,
    accuracy_by_type,
    eval_mcqs,
    filter_picks,
    filter_requests,
)
from pipeline.nano.infer import NanoVL


def position_error_kind(scene: world.Scene, mcq: MCQ, picked: str) -> str:
    """What a wrong answer to "Where is the <colour> <shape>?" points at."""
    if picked == NONE_OF_THE_ABOVE:
        return "none of the above"
    color, shape = str(mcq.meta["key"]).split(" ", 1)
    there = next((o for o in scene.objects if o.position == picked), None)
    if there is None:
        return "empty quadrant"
    if there.shape == shape:
        return "object of the same shape"
    if there.color == color:
        return "object of the same colour"
    return "other object"


def filter_breakdown(vl: NanoVL, scenes: Sequence[world.Scene], mcqs: Sequence[Sequence[MCQ]]
                     ) -> tuple[dict[str, float], Counter]:
    """With-image accuracy per type (the eval's queries) and the kinds of the wrong position answers."""
    reqs, shown, owners = filter_requests(scenes, mcqs, random.Random(data.EVAL_MCQ_SEED + 1), True)
    picks = filter_picks(vl, reqs, shown)
    kinds = Counter(position_error_kind(scene, s.mcq, s.options[p]) for p, s, scene in zip(picks, shown, owners, strict=True)
                    if s.mcq.qtype == "position_of" and s.options[p] != s.mcq.answer_text)
    return accuracy_by_type(picks, shown)[1], kinds


@torch.no_grad()
def answer_attention(vl: NanoVL, scenes: Sequence[world.Scene], mcqs: Sequence[Sequence[MCQ]],
                     batch: int = 25) -> dict[tuple[str, int], tuple[float, float]]:
    """(question type, last-layer head) -> mean attention weight of the answer position (the one that
    predicts the first answer token) on the asked object's quadrant and on all image tokens."""
    reqs, shown, owners = filter_requests(scenes, mcqs, random.Random(data.EVAL_MCQ_SEED + 1), True)
    items = [(r, s.mcq, data.answer_region(sc, s.mcq)) for r, s, sc in zip(reqs, shown, owners, strict=True)]
    items = [it for it in items if it[2] is not None]
    before = vl.model.config._attn_implementation
    vl.model.set_attn_implementation("eager")  # the only implementation that returns attention weights
    sums: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    try:
        for i in range(0, len(items), batch):
            chunk = items[i: i + batch]
            inputs = vl._inputs([prompt_text(vl.tok, m, pre) for (m, _, pre), _, _ in chunk],
                                [img for (_, img, _), _, _ in chunk])
            att = vl.model(**inputs, output_attentions=True).attentions[-1][:, :, -1]  # [B, heads, T]
            for row, (_, mcq, region) in enumerate(chunk):
                pads = (inputs["input_ids"][row] == vl.model.config.image_token_id).nonzero().flatten()
                obj = pads[quadrant_tokens(region)]
                for head in range(att.shape[1]):
                    acc = sums[(mcq.qtype, head)]
                    acc[0] += att[row, head, obj].sum().item()
                    acc[1] += att[row, head, pads].sum().item()
                    acc[2] += 1
    finally:
        vl.model.set_attn_implementation(before)
    return {k: (v[0] / v[2], v[1] / v[2]) for k, v in sorted(sums.items())}


def _probe_accuracy(x: torch.Tensor, y: torch.Tensor, n_train: int, steps: int = 300) -> float:
    """Test accuracy of a softmax probe (standardised features, small L2) fit on the first n_train rows."""
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0) + 1e-5
    x = (x - mu) / sd
    classes = int(y.max()) + 1
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:n_train] @ w + b, y[:n_train]) + 1e-3 * w.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((x[n_train:] @ w + b).argmax(-1) == y[n_train:]).float().mean().item()


@torch.no_grad()
def _residuals(vl: NanoVL, scenes: Sequence[world.Scene]) -> list[torch.Tensor]:
    prompt = prompt_text(vl.tok, data.image_messages(CAPTION_PROMPT))
    inputs = vl._inputs([prompt] * len(scenes), [world.render(s) for s in scenes])
    hidden = vl.model(**inputs, output_hidden_states=True).hidden_states
    mask = inputs["input_ids"] == vl.model.config.image_token_id
    return [h[mask].view(len(scenes), -1, h.shape[-1]) for h in hidden]


def image_probes(vl: NanoVL, scenes: Sequence[world.Scene]) -> list[dict[str, float]]:
    """Per residual (0: the vision tower's output, then after each text layer): test accuracy of linear
    probes for each image token's quadrant (all tokens) and its object's shape and colour (occupied
    tokens), under the caption prompt; scenes split 3:1 into fit and test."""
    torch.manual_seed(0)
    labels = [image_token_labels(s) for s in scenes]
    y = {k: torch.tensor([lab[k] for lab in labels]) for k in ("position", "shape", "color")}
    occupied = y["shape"] != len(world.SHAPES)
    cut = len(scenes) * 3 // 4
    out = []
    with torch.enable_grad():
        for h in _residuals(vl, scenes):
            row = {}
            for name, keep in (("position", torch.ones_like(occupied)), ("shape", occupied), ("color", occupied)):
                n_train = int(keep[:cut].sum())
                row[name] = _probe_accuracy(h[keep].float(), y[name][keep], n_train)
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.nano.diagnose", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODELS / FILTER_NAME))
    ap.add_argument("--scenes", type=int, default=data.N_EVAL_SCENES)
    args = ap.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        ap.error(f"no model folder (with config.json) at {args.model}")
    vl = NanoVL(Path(args.model))
    scenes = data.eval_scenes(args.scenes)
    mcqs = eval_mcqs(scenes)
    acc, kinds = filter_breakdown(vl, scenes, mcqs)
    print("filter with the image, per type: " + ", ".join(f"{t} {a:.3f}" for t, a in acc.items()))
    print("wrong position answers pick: " + (", ".join(f"{k} {n}" for k, n in kinds.most_common()) or "-"))
    print("answer-position attention, last text layer (asked object / whole image):")
    for (qtype, head), (obj, img) in answer_attention(vl, scenes, mcqs).items():
        print(f"  {qtype:15s} head {head}: {obj:.3f} / {img:.3f}")
    print("linear probes on the image tokens' residual (quadrant / object shape / object colour):")
    for layer, row in enumerate(image_probes(vl, scenes)):
        where = "vision output" if layer == 0 else f"after text layer {layer}"
        print(f"  {where:20s} {row['position']:.3f} / {row['shape']:.3f} / {row['color']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
