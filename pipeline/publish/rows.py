"""The rows an export writes: the selection (`--where`, limit, shards, dedup), each row with its image and
prompt (`records`, streamed shard by shard), and the tally of what was written (for the card and export.json).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from pipeline.publish.source import CommittedSource, annotate_settings

ROW_DELAY_ENV = "PIPELINE_TEST_EXPORT_ROW_DELAY_S"
"""Test hook: seconds to sleep after each exported row (gives a test time to kill an export mid-way)."""

PROVENANCE = ("url", "sha256", "width", "height", "caption_tokens", "finish_reason", "quality", "model_id",
              "prompt_hash", "sampling", "pipeline_version", "source_license", "source_caption")
"""Manifest columns carried into every format (the hf columns, the json `meta` of the others)."""


@dataclass
class Selection:
    """Which committed rows to export."""

    where: str | None = None
    limit: int | None = None
    shards: list[int] | None = None
    dedup: bool = True

    def describe(self) -> dict[str, Any]:
        return {"where": self.where, "limit": self.limit, "shards": self.shards, "dedup_sha256": self.dedup}


@dataclass
class Record:
    """One exported row: its manifest row, image bytes and extension, and the prompt that captioned it."""

    key: str
    row: dict[str, Any]
    image: bytes
    ext: str
    prompt: str | None

    @property
    def caption(self) -> str:
        return self.row["caption"]

    def meta(self) -> dict[str, Any]:
        return {"key": self.key, **{k: self.row.get(k) for k in PROVENANCE}}


@dataclass
class Tally:
    """What was exported (for the card and export.json): counts and bounded distributions."""

    rows: int = 0
    matched: int = 0
    duplicates: int = 0
    missing_image: int = 0
    licenses: Counter[str] = field(default_factory=Counter)
    chars: Counter[int] = field(default_factory=Counter)
    tokens: Counter[int] = field(default_factory=Counter)
    quality_sum: float = 0.0
    quality_n: int = 0
    models: Counter[str] = field(default_factory=Counter)
    prompts: dict[str, str] = field(default_factory=dict)
    shards: set[str] = field(default_factory=set)

    def add(self, rec: Record) -> None:
        self.rows += 1
        self.licenses[rec.row.get("source_license") or "unknown"] += 1
        self.chars[len(rec.caption)] += 1
        if rec.row.get("caption_tokens") is not None:
            self.tokens[int(rec.row["caption_tokens"])] += 1
        if rec.row.get("quality") is not None:
            self.quality_sum += float(rec.row["quality"])
            self.quality_n += 1
        self.models[str(rec.row.get("model_id"))] += 1
        if rec.prompt is not None:
            self.prompts[str(rec.row.get("prompt_hash"))] = rec.prompt
        self.shards.add(rec.key[:5])


# -- rows -----------------------------------------------------------------------------------------
def _prompts(source: CommittedSource) -> dict[str, str | None]:
    """unit -> the captioning prompt its recorded settings name (rows carry only its hash)."""
    return {unit: annotate_settings(m).get("prompt") for unit, m in source.markers.items()}


def records(source: CommittedSource, sel: Selection, tally: Tally) -> Iterator[Record]:
    """The selected rows with their images, shard by shard (one shard's rows in memory at a time)."""
    source.scan(sel.where)  # a bad expression or an empty root fails here, before anything is written
    prompts = _prompts(source)
    seen: set[bytes] = set()
    delay = float(os.environ.get(ROW_DELAY_ENV) or 0)
    wanted = None if sel.shards is None else {f"{s:05d}" for s in sel.shards}
    ok = (pl.col("status") == "ok") & pl.col("caption").is_not_null()
    for unit in source.unit_files():
        if wanted is not None and unit not in wanted:
            continue
        rows = {r["key"]: r for r in source.scan_unit(unit, sel.where).filter(ok).collect().iter_rows(named=True)}
        tally.matched += len(rows)
        found = 0
        for sample in source.unit_samples(unit):
            row = rows.get(sample.key)
            if row is None or not sample.image:
                continue
            found += 1
            digest = hashlib.sha256(sample.image).digest()[:16]
            if sel.dedup and digest in seen:
                tally.duplicates += 1
                continue
            seen.add(digest)
            rec = Record(sample.key, row, sample.image, sample.image_ext or "jpg", prompts.get(unit))
            tally.add(rec)
            yield rec
            if delay:
                time.sleep(delay)
            if sel.limit is not None and tally.rows >= sel.limit:
                return
        tally.missing_image += len(rows) - found
