"""Judging the qa stage on the demo world: image shards with ground truth and planted questions, and the
gate's numbers against the scenes' truth (used by tools/eval_qa_gate.py and tests/test_qa.py).

Planted questions, per scene:
- `stated`: the answer is written in the question ("What color is the red circle?");
- `options_only`: only one option is of the asked kind ("What color is the background?" with one colour
  and three shapes), so the options alone give the answer away;
- `wrong_key`: a true ground-truth question whose answer letter points at a wrong option;
- `truth`: the ground-truth question unchanged (a control: how much a perfect generator would keep).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import shardio
from pipeline.mcq import LETTERS, MCQ
from pipeline.nano import world
from pipeline.shards import sample_key, shard_name
from pipeline.storage import Storage

PLANTED = ("stated", "options_only", "wrong_key", "truth")


def planted_questions(scene: world.Scene, rng: random.Random) -> dict[str, list[MCQ]]:
    """The planted questions of one scene, by kind (see the module docstring)."""
    out: dict[str, list[MCQ]] = {k: [] for k in PLANTED}
    unique = [o for o in scene.objects if sum(p.color == o.color and p.shape == o.shape for p in scene.objects) == 1]
    for o in unique[:1]:
        colors = [c for c in world.COLORS if c != o.color]
        rng.shuffle(colors)
        options = [o.color, *colors[:3]]
        rng.shuffle(options)
        out["stated"].append(MCQ(f"What color is the {o.color} {o.shape}?", tuple(options),
                                 LETTERS[options.index(o.color)], source="planted", qtype="stated"))
    shapes = list(world.SHAPES)
    rng.shuffle(shapes)
    options = [scene.background, *shapes[:3]]
    rng.shuffle(options)
    out["options_only"].append(MCQ("What color is the background?", tuple(options),
                                   LETTERS[options.index(scene.background)], source="planted", qtype="options_only"))
    truth = world.pick_mcqs(scene, rng, k=2)
    out["truth"].append(truth[0])
    q = truth[1]
    wrong = LETTERS[(q.answer_index + rng.randrange(1, len(q.options))) % len(q.options)]
    out["wrong_key"].append(MCQ(q.question, q.options, wrong, source="planted", qtype="wrong_key"))
    return out


def mcq_json(mcqs: Sequence[MCQ]) -> str:
    return json.dumps([{"question": q.question, "options": list(q.options), "answer": q.answer, "qtype": q.qtype}
                       for q in mcqs])


def write_image_shard(storage: Storage, shard: int, scenes: Sequence[world.Scene],
                      mcqs: Sequence[Sequence[MCQ]] | None = None, images: Sequence[bytes] | None = None) -> list[str]:
    """Commit ROOT/images/<shard>.{tar,parquet} in the download layout: <key>.png + .json (url, scene, and
    `mcqs` when given); `images` replaces rendered bytes (e.g. a broken image). Returns the keys."""
    txn = storage.begin("download", shard)
    name = shard_name(shard)
    keys, rows, samples = [], [], []
    for i, scene in enumerate(scenes):
        key = sample_key(shard, i)
        data = images[i] if images is not None else world.encode(world.render(scene))
        meta: dict[str, Any] = {"key": key, "url": f"demo://{key}.png", "status": "success", "scene": scene.to_json(),
                                "sha256": hashlib.sha256(data).hexdigest()}
        if mcqs is not None:
            meta["mcqs"] = mcq_json(mcqs[i])
        samples.append((key, [("png", data), ("json", json.dumps(meta, sort_keys=True).encode())]))
        rows.append({**meta, "error_message": None})
        keys.append(key)
    shardio.write_tar(txn.path(f"images/{name}.tar"), samples)
    pq.write_table(pa.Table.from_pylist(rows), txn.path(f"images/{name}.parquet"))
    txn.commit({"config_fingerprint": "demo-world", "inputs": {},
                "rows": {"total": len(rows), "ok": len(rows), "failed": 0}, "stats": {"rows": len(rows)}})
    return keys


def row_correct(scene: world.Scene, row: dict[str, Any]) -> bool:
    """Whether a qa row's keyed option is the scene's answer (and the only option that is)."""
    truth = world.answer_from_scene(world.scene_facts(scene), row["question"])
    opts = [o.strip().lower() for o in row["options"]]
    return truth is not None and opts[LETTERS.index(row["answer"])] == truth and opts.count(truth) == 1


def generated_report(rows: Sequence[dict[str, Any]], scenes: dict[str, world.Scene]) -> dict[str, float]:
    """Keep rate and correctness of generated questions against the scenes."""
    parsed = [r for r in rows if r["question"] is not None]
    kept = [r for r in parsed if r["kept"]]
    return {
        "parsed": len(parsed), "kept": len(kept),
        "keep_rate": len(kept) / max(1, len(parsed)),
        "parsed_correct": sum(row_correct(scenes[r["key"]], r) for r in parsed) / max(1, len(parsed)),
        "kept_correct": sum(row_correct(scenes[r["key"]], r) for r in kept) / max(1, len(kept)),
        "wrong_parsed_rejected": _rejected([r for r in parsed if not row_correct(scenes[r["key"]], r)]),
    }


def planted_report(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Rejection rate per planted kind (truth: keep rate instead), with the reasons' counts."""
    out: dict[str, float] = {}
    for kind in PLANTED:
        got = [r for r in rows if r["qtype"] == kind or (kind == "truth" and r["qtype"] in world.QTYPES)]
        if not got:
            continue
        if kind == "truth":
            out["truth_kept"] = sum(r["kept"] for r in got) / len(got)
        else:
            out[f"{kind}_rejected"] = _rejected(got)
        out[f"{kind}_n"] = len(got)
    return out


def absent_report(rows: Sequence[dict[str, Any]], scenes: dict[str, world.Scene]) -> dict[str, float]:
    """The gate on absent-thing questions about quadrants (qtype 'absent'): how many of those about an empty
    quadrant it keeps, and how many about an occupied one (a false "there is no shape" key) it lets through."""
    got = [r for r in rows if r["qtype"] == "absent" and r["question"] is not None]
    empty = [r for r in got if scenes[r["key"]].at(quadrant(r["question"])) is None]
    occupied = [r for r in got if r not in empty]
    return {"absent_n": len(got), "absent_empty_n": len(empty),
            "absent_kept_when_empty": sum(r["kept"] for r in empty) / max(1, len(empty)),
            "absent_kept_when_occupied": sum(r["kept"] for r in occupied) / max(1, len(occupied))}


def quadrant(question: str) -> str:
    """The quadrant a demo-world question ends with ("What shape is in the top left?" -> "top left")."""
    return next(p for p in world.POSITIONS if question.rstrip("?").endswith(p))


def _rejected(rows: Sequence[dict[str, Any]]) -> float:
    return sum(not r["kept"] for r in rows) / len(rows) if rows else float("nan")
