"""What RL trains on: the images of the qa shards that kept at least one question, with those questions.

Images come from where qa read them (the download shards, or `qa.input_pattern`) and are written once to a
local folder (a dataset of millions of images never sits in memory). A fixed share of images, the lowest
sha256 of their keys, is held out for the audit and never trained on.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipeline import shardio
from pipeline.config import RunConfig
from pipeline.engines.base import image_messages
from pipeline.engines.grid import ImageGrid
from pipeline.engines.preprocess import prepare_image
from pipeline.inputs import resolve_input
from pipeline.mcq import MCQ, qa_mcqs
from pipeline.shards import shard_name
from pipeline.storage import Storage

QA_DIR = "qa"

log = logging.getLogger("stages.train")


@dataclass(frozen=True)
class TrainImage:
    """One image with its kept questions; `truth` is the image's ground truth where it has one (demo world)."""

    key: str
    path: str
    mcqs: tuple[MCQ, ...]
    truth: str | None = None

    @property
    def order(self) -> str:
        """The image's place in the held-out split (sha256 of its key)."""
        return hashlib.sha256(self.key.encode()).hexdigest()


def mcqs_json(mcqs: Sequence[MCQ]) -> str:
    return json.dumps([q.to_dict() for q in mcqs], sort_keys=True)


def collect(config: RunConfig, storage: Storage, shards: Sequence[int], folder: str,
            require: Callable[[str, int], Any]) -> list[TrainImage]:
    """Every image of `shards` with a kept question, written under `folder` (reused when already there).
    `require(stage, shard)` records each qa shard (and the image shard's upstream) as an input."""
    os.makedirs(folder, exist_ok=True)
    out: list[TrainImage] = []
    for shard in shards:
        require(QA_DIR, shard)
        rows = shardio.read_manifest(storage.url(QA_DIR, f"{shard_name(shard)}.parquet"), storage.storage_options)
        kept = qa_mcqs(rows)
        if not kept:
            continue
        src = resolve_input(config, storage, shard, pattern=config.qa.input_pattern,
                            pattern_options=config.qa.input_storage_options, setting="qa.input_pattern")
        if src.upstream_stage:
            require(src.upstream_stage, shard)
        sidecar = src.sidecar_rows()
        with src.open() as f:
            for sample in shardio.iter_tar(f, src.tar_url):
                questions = kept.get(sample.key)
                if not sample.ok or not questions or sample.image is None:
                    continue
                if not readable_image(sample.image):
                    log.warning("train: %s in %s is not a readable image; left out", sample.key, src.tar_url)
                    continue
                digest = hashlib.sha256(sample.image).hexdigest()
                path = os.path.join(folder, f"{digest}.{sample.image_ext}")
                if not os.path.exists(path):
                    tmp = f"{path}.part-{os.getpid()}"
                    with open(tmp, "wb") as g:
                        g.write(sample.image)
                    os.replace(tmp, path)
                meta = {**sidecar.get(sample.key, {}), **sample.meta}
                truth = meta.get("scene")
                out.append(TrainImage(sample.key, path, tuple(questions), truth if isinstance(truth, str) else None))
    return out


def readable_image(blob: bytes) -> bool:
    """Whether the bytes open as an image with a size (a cheap header check; qa decoded it already)."""
    try:
        with Image.open(io.BytesIO(blob)) as im:
            return im.width > 0 and im.height > 0
    except Exception:  # noqa: BLE001 - any decoder complaint means: not usable
        return False


def split(images: Sequence[TrainImage], held_out: int) -> tuple[list[TrainImage], list[TrainImage]]:
    """(train, held-out): the `held_out` images with the lowest key hash are held out (stable as data grows)."""
    ranked = sorted(images, key=lambda im: im.order)
    held = ranked[:held_out]
    chosen = {im.key for im in held}
    return [im for im in images if im.key not in chosen], held


def prompt_dataset(images: Sequence[TrainImage], prompt: str, grid: ImageGrid) -> Any:
    """TRL's view of the training images (a `datasets.Dataset`): a conversational prompt, the image (read and
    resized to the policy's grid when a row is read, so no image sits in memory), and the reward's columns
    (key, mcqs, truth)."""
    import datasets

    table = datasets.Dataset.from_dict({
        "prompt": [image_messages(prompt)] * len(images), "image": [im.path for im in images],
        "key": [im.key for im in images], "mcqs": [mcqs_json(im.mcqs) for im in images],
        "truth": [im.truth for im in images]})

    def load(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return {**batch, "image": [prepare_image(p, grid) for p in batch["image"]]}

    return table.with_transform(load)


def dataset_digest(images: Sequence[TrainImage]) -> str:
    """A digest of what is trained on (keys, image files, questions): part of a resumable run's identity."""
    h = hashlib.sha256()
    for im in images:
        h.update(f"{im.key}|{os.path.basename(im.path)}|{mcqs_json(im.mcqs)}\n".encode())
    return h.hexdigest()[:16]
