"""k captions per image per captioner, through a cache keyed by what a caption depends on.

The engine gets chunks of `chunk` images (n = k captions each): a benchmark's images sorted by sha256 and cut
in order, so a chunk's make-up depends only on the benchmark, and its sampling seed is the run's seed mixed
with the chunk's image hashes. A caption set is therefore a pure function of (captioner model id, prompt, k,
sampling, pixel budget, seed, abstention threshold, chunk, image): the same whether or not the cache held part of it, and the same
after a kill and rerun. The cache is a folder of parquet parts (local or any fsspec URL), one per finished
chunk, each written under a temporary name and then moved into place: a killed run leaves only whole parts,
and a rerun, a report with one more captioner or another reader, reuses every caption already made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.abstain import gate
from pipeline.config import EngineConfig, SamplingConfig
from pipeline.engines.base import Engine, Generation, Sampling, image_request
from pipeline.engines.grid import ImageGrid
from pipeline.engines.preprocess import prepare_image

log = logging.getLogger("stages.evaluate.captions")

_PART = pa.schema([pa.field("key", pa.string()), pa.field("captions", pa.list_(pa.string())),
                   pa.field("model_id", pa.string()), pa.field("image_sha256", pa.string())])


@dataclass(frozen=True)
class CaptionSpec:
    """Everything a cached caption set depends on, besides its chunk and image."""

    model_id: str
    prompt: str
    k: int
    sampling: SamplingConfig
    min_pixels: int
    max_pixels: int
    seed: int
    abstain_below: float = 0.0
    """Captions as annotate writes them with this abstention threshold (pipeline.abstain); 0: whole."""

    def key(self, chunk: str, image_sha256: str) -> str:
        fields = {"model": self.model_id, "prompt": self.prompt, "k": self.k,
                  "sampling": self.sampling.model_dump(), "pixels": [self.min_pixels, self.max_pixels],
                  "seed": self.seed, "chunk": chunk, "image": image_sha256}
        if self.abstain_below:
            fields["abstain_below"] = self.abstain_below
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def chunk_seed(self, chunk: str) -> int:
        """The sampling seed of one chunk: the run's seed mixed with the chunk's digest."""
        return int.from_bytes(hashlib.sha256(f"{self.seed}|{chunk}".encode()).digest()[:4], "big")


def chunks(images: Sequence[tuple[str, bytes]], size: int) -> list[list[tuple[str, bytes]]]:
    """Distinct images sorted by sha256, cut in order into chunks of `size`."""
    unique = sorted(dict(images).items())
    return [unique[i:i + size] for i in range(0, len(unique), size)]


def chunk_digest(chunk: Sequence[tuple[str, bytes]]) -> str:
    return hashlib.sha256("|".join(sha for sha, _ in chunk).encode()).hexdigest()[:16]


class CaptionCache:
    """Caption sets by key: every part of a folder loaded at start; `flush` adds one new part."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.fs, self.root = fsspec.core.url_to_fs(url.rstrip("/"), **(storage_options or {}))
        self._data: dict[str, list[str]] = {}
        self._new: list[dict[str, Any]] = []
        self.hits = 0
        """caption sets read back (counted per image)"""
        self.misses = 0
        """caption sets not found (counted per image: a chunk with one miss is generated whole)"""
        if self.fs.exists(self.root):
            for part in sorted(self.fs.glob(f"{self.root}/part-*.parquet")):
                with self.fs.open(part, "rb") as f:
                    table = pq.read_table(f)
                for key, caps in zip(table.column("key").to_pylist(), table.column("captions").to_pylist(),
                                     strict=True):
                    self._data[key] = caps

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> list[str] | None:
        value = self._data.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, captions: list[str], model_id: str, image_sha256: str) -> None:
        self._data[key] = captions
        self._new.append({"key": key, "captions": captions, "model_id": model_id, "image_sha256": image_sha256})

    def flush(self) -> None:
        """Write the entries added since the last flush as one part (temporary name, then moved)."""
        if not self._new:
            return
        self.fs.makedirs(self.root, exist_ok=True)
        name = uuid.uuid4().hex
        tmp, final = f"{self.root}/_tmp-{name}.parquet", f"{self.root}/part-{name}.parquet"
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(pa.Table.from_pylist(self._new, schema=_PART), f)
        self.fs.mv(tmp, final)
        self._new = []


def spec_for(engine: Engine, cfg: EngineConfig, prompt: str, k: int, sampling: SamplingConfig,
             seed: int) -> CaptionSpec:
    return CaptionSpec(model_id=engine.model_id, prompt=prompt, k=k, sampling=sampling,
                       min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, seed=seed)


def _gated(spec: CaptionSpec, generation: Generation, sha: str) -> str:
    """The caption with the abstention gate applied (raises when the gate cannot run: a report of whole captions
    under a threshold's name would be wrong)."""
    result = gate(generation.text, generation.tokens, spec.abstain_below)
    if not result.gated:
        raise RuntimeError(f"captioner {spec.model_id} returned no token probabilities for image {sha[:12]}: "
                           "evaluate.abstain_below needs an engine that gives them (hf, vllm, openai with logprobs)")
    return result.text


def caption_all(engine: Callable[[], Engine], spec: CaptionSpec, images: Sequence[tuple[str, bytes]],
                cache: CaptionCache, chunk: int = 64) -> dict[str, list[str]]:
    """k captions for every (sha256, bytes) image of one benchmark: a chunk whose captions are all cached is
    read back, any other chunk is generated whole (one engine call) and cached. Returns sha256 -> captions.
    Raises if the engine fails on an image: an evaluation with missing captions would be wrong, not partial."""
    out: dict[str, list[str]] = {}
    params = replace(Sampling.from_config(spec.sampling), n=spec.k, logprobs=spec.abstain_below > 0)
    for part in chunks(images, chunk):
        digest = chunk_digest(part)
        keys = [spec.key(digest, sha) for sha, _ in part]
        found = [cache.get(key) for key in keys]
        if all(f is not None for f in found):
            out.update({sha: f for (sha, _), f in zip(part, found, strict=True)})  # type: ignore[misc]
            continue
        captioner = engine()
        grid = getattr(captioner, "image_grid", None) or ImageGrid(1, 1, spec.min_pixels, spec.max_pixels)
        requests = [image_request(spec.prompt, prepare_image(data, grid)) for _, data in part]
        results = captioner.generate(requests, replace(params, seed=spec.chunk_seed(digest)))
        if len(results) != len(part):
            raise RuntimeError(f"captioner {spec.model_id} returned {len(results)} results for {len(part)} images")
        for (sha, _), key, gens in zip(part, keys, results, strict=True):
            bad = [g for g in gens if g.finish_reason == "error"]
            if bad or len(gens) != spec.k:
                raise RuntimeError(f"captioner {spec.model_id} failed on image {sha[:12]}: "
                                   f"{bad[0].error if bad else f'{len(gens)} of {spec.k} captions'}")
            out[sha] = [_gated(spec, g, sha) for g in gens]
            cache.put(key, out[sha], spec.model_id, sha)
        cache.flush()
    return out
