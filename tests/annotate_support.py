"""Test support for the annotate stage: image-shard fixtures in the download stage's layout, and
scripted engines standing in for external captioner / reader models."""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset
from PIL import Image

from pipeline.engines.base import ChatRequest, Generation, Sampling
from pipeline.nano import world
from pipeline.shards import sample_key, shard_name
from pipeline.storage import Storage


def scene_rows(n: int, seed: int = 0, shard: int = 0, fmt: str = "PNG") -> list[dict]:
    """n demo-world samples: key, image bytes, scene JSON and ground-truth MCQs."""
    rng = random.Random(seed * 1000 + shard)
    rows = []
    for i in range(n):
        scene = world.sample_scene(rng)
        rows.append({
            "key": sample_key(shard, i), "image": world.encode(world.render(scene), fmt),
            "ext": "jpg" if fmt == "JPEG" else fmt.lower(), "scene": scene.to_json(),
            "mcqs": json.dumps([q.to_dict() for q in world.pick_mcqs(scene, rng)]), "scene_id": i,
            "caption": world.caption(scene, i % 3),
        })
    return rows


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


NOT_AN_IMAGE = b"<html>404 not found</html>"


def write_shard_files(tar_path: str, parquet_path: str, rows: Sequence[dict], base_url: str = "http://example.test") -> None:
    """An img2dataset-layout shard: <key>.<ext> + .txt + .json in the tar, one parquet row per sample."""
    table = []
    with open(tar_path, "wb") as f:
        sink = webdataset.TarWriter(f, encoder=False)
        for r in rows:
            width = height = None
            try:
                width, height = Image.open(io.BytesIO(r["image"])).size
            except Exception:  # noqa: BLE001 - bad fixture images have no size
                pass
            meta = {"url": f"{base_url}/{r['key']}.{r['ext']}", "key": r["key"], "status": "success",
                    "width": width, "height": height, "sha256": hashlib.sha256(r["image"]).hexdigest(),
                    "caption": r["caption"], "scene_id": r["scene_id"], "scene": r["scene"], "mcqs": r["mcqs"]}
            sink.write({"__key__": r["key"], r["ext"]: r["image"], "txt": r["caption"].encode(),
                        "json": json.dumps(meta).encode()})
            table.append({**{k: v for k, v in meta.items()}, "error_message": None})
        sink.close()
    pq.write_table(pa.Table.from_pylist(table), parquet_path)


def commit_image_shard(storage: Storage, shard: int, rows: Sequence[dict]) -> None:
    """Write ROOT/images/<shard>.{tar,parquet} and commit them like the download stage does."""
    txn = storage.begin("download", shard)
    name = shard_name(shard)
    write_shard_files(txn.path(f"images/{name}.tar"), txn.path(f"images/{name}.parquet"), rows)
    txn.commit({"config_fingerprint": "fixture", "inputs": {}, "rows": {"total": len(rows), "ok": len(rows), "failed": 0},
                "stats": {"rows": len(rows)}})


class ScriptedCaptioner:
    """A stand-in for a captioning model: captions by a policy over the request's image; can fail on command."""

    def __init__(self, policy: Callable[[Image.Image], str], fail_calls: Sequence[int] = (),
                 fail_when: Callable[[Image.Image], bool] | None = None, model_id: str = "scripted-captioner"):
        self.policy = policy
        self.fail_calls = set(fail_calls)
        self.fail_when = fail_when
        self.batches: list[int] = []
        self.model_id = model_id

    def generate(self, requests: Sequence[ChatRequest], params: Sampling) -> list[list[Generation]]:
        self.batches.append(len(requests))
        if len(self.batches) in self.fail_calls:
            raise RuntimeError("CUDA error: device-side assert (scripted)")
        if self.fail_when and any(self.fail_when(r.images[0]) for r in requests):
            raise RuntimeError("batch contains a poisoned request (scripted)")
        out = []
        for r in requests:
            text = self.policy(r.images[0])
            reason = "length" if text.endswith("...") else "stop"
            out.append([Generation(text=text, finish_reason=reason, num_tokens=len(text.split()))] * params.n)
        return out

    def score_choices(self, requests, choices):
        raise NotImplementedError

    def close(self) -> None:
        pass


def pixel_scene_caption(img: Image.Image) -> str:
    """A caption read off the rendered pixels of a demo-world image (an oracle captioner)."""
    small = img.convert("RGB")
    bg = min(world.BACKGROUNDS, key=lambda b: _dist(small.getpixel((1, 1)), world.RGB[b]))
    return f"The image shows shapes on a {bg} background."


def _dist(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=False))


def oracle_policy(rows: Sequence[dict], template: int = 0) -> Callable[[Image.Image], str]:
    """A captioner policy that knows every fixture scene (looked up by its rendered pixels)."""
    table = {}
    for r in rows:
        scene = world.Scene.from_dict(json.loads(r["scene"]))
        table[hashlib.sha256(world.render(scene).convert("RGB").tobytes()).hexdigest()] = world.caption(scene, template)
    return lambda img: table.get(hashlib.sha256(img.convert("RGB").tobytes()).hexdigest(), world.UNINFORMATIVE_CAPTION)


class RuleReader:
    """A stand-in for the reader model: answers by the world's rule reader (parses the caption)."""

    model_id = "rule-reader"

    def __init__(self) -> None:
        self.calls: list[int] = []

    @staticmethod
    def _parse(req: ChatRequest) -> tuple[str, str, list[str]]:
        import re

        user = req.messages[-1]["content"]
        caption = re.search(r"<caption>\n(.*)\n</caption>", user, re.S).group(1)
        question = re.search(r"Question: (.*)", user).group(1)
        return caption, question, re.findall(r"^[A-F]\) (.*)$", user, re.M)

    def _choice(self, req: ChatRequest) -> int:
        caption, question, options = self._parse(req)
        idx = world.rule_reader_answer(caption, question, options[:-1])
        return len(options) - 1 if idx is None else idx

    def generate(self, requests: Sequence[ChatRequest], params: Sampling) -> list[list[Generation]]:
        self.calls.append(len(requests))
        return [[Generation(text=f" {'ABCDEF'[self._choice(r)]}.", num_tokens=2)] for r in requests]

    def score_choices(self, requests, choices):
        self.calls.append(len(requests))
        return [[0.0 if i == self._choice(r) else -5.0 for i in range(len(c))] for r, c in zip(requests, choices, strict=True)]

    def close(self) -> None:
        pass
