"""The one reader of a root's committed outputs, shared by everything a user runs after a run (browse, gallery,
export, the dataset card, the report).

Only units with a current `_done` marker are read: a half-written or uncommitted shard is invisible. Manifests
are scanned lazily with polars (local, or s3 through the run's storage options); samples stream from the
committed tars. `committed_markers` is the only place that asks which units are committed.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import shardio
from pipeline.errors import PipelineError
from pipeline.shards import shard_name
from pipeline.storage import Storage


class PublishError(PipelineError):
    """A user mistake in a browse / export / report request (bad expression, unknown key, nothing committed)."""


@dataclass(frozen=True)
class View:
    """How one stage's manifest is read: where it is and which columns mean what."""

    stage: str
    folder: str
    reasons: tuple[str, ...] = ()
    """columns giving a failed row's reason"""
    lengths: tuple[str, ...] = ()
    """numeric columns summarized as histograms"""
    quality: str | None = None
    models: tuple[str, ...] = ()
    """provenance columns summarized by value (model ids, prompt hashes)"""
    text: str | None = None
    """the text the gallery shows and searches"""
    ext: str | None = None
    """the column with the image's extension inside the shard's tar"""
    whole_run_file: str | None = None
    """whole-run stages: the parquet inside each unit's folder"""


VIEWS: dict[str, View] = {
    "captions": View("annotate", "captions", ("error_reason",), ("caption_tokens", "caption_chars"), "quality",
                     ("model_id", "prompt_hash", "source_license"), "caption", "image_ext"),
    "images": View("download", "images", ("error",), ("width", "height", "bytes"), None, (), "url", "format"),
    "qa": View("qa", "qa", ("error_reason", "reject_reason"), ("visual_acc", "text_acc"), None,
               ("generator_model_id", "filter_model_id"), "question"),
    "eval": View("evaluate", "eval", (), ("caption_chars",), "correct", ("captioner", "model_id"), "caption",
                 whole_run_file="answers.parquet"),
}
STAGE_OF_VIEW = {name: v.stage for name, v in VIEWS.items()}


def committed_markers(storage: Storage, stage: str) -> dict[str, dict[str, Any]]:
    """unit name -> marker of every committed unit of `stage` (marker present, outputs intact): the one call
    through which publish learns what is committed."""
    return storage.committed_units(stage)


def unit_order(unit: str) -> tuple[bool, int, str]:
    """Shards in numeric order first, then whole-run units by name."""
    return (not unit.isdigit(), int(unit) if unit.isdigit() else 0, unit)


def polars_storage_options(storage: Storage) -> dict[str, str] | None:
    """The run's fsspec options (s3fs style) as polars' object-store options; None for a local root."""
    if storage.is_local:
        return None
    opts = storage.storage_options or {}
    out: dict[str, str] = {}
    endpoint = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    if endpoint:
        out["aws_endpoint_url"] = endpoint
        if endpoint.startswith("http://"):
            out["aws_allow_http"] = "true"
    if opts.get("key"):
        out["aws_access_key_id"] = opts["key"]
    if opts.get("secret"):
        out["aws_secret_access_key"] = opts["secret"]
    if opts.get("token"):
        out["aws_session_token"] = opts["token"]
    region = (opts.get("client_kwargs") or {}).get("region_name") or opts.get("region_name")
    if region:
        out["aws_region"] = region
    if opts.get("anon"):
        out["aws_skip_signature"] = "true"
    return out


def apply_where(lf: pl.LazyFrame, where: str | None) -> pl.LazyFrame:
    """Rows matching a polars SQL expression; a bad expression is a PublishError (checked on an empty frame)."""
    if not where:
        return lf
    try:
        filtered = lf.filter(pl.sql_expr(where))
        filtered.head(0).collect()
    except Exception as exc:  # noqa: BLE001 - polars raises several error types for a bad expression
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PublishError(f"bad --where expression {where!r}: {first}") from None
    return filtered


class CommittedSource:
    """A root's committed units of one view: their markers, manifest files, one lazy frame, their samples."""

    def __init__(self, storage: Storage, view: str | View = "captions"):
        self.storage = storage
        self.view_name = view if isinstance(view, str) else view.folder
        self.view = VIEWS[view] if isinstance(view, str) else view

    # -- markers ---------------------------------------------------------------------------------
    @cached_property
    def markers(self) -> dict[str, dict[str, Any]]:
        """unit -> marker of the view's committed units, in unit order (read once)."""
        found = committed_markers(self.storage, self.view.stage)
        return {u: found[u] for u in sorted(found, key=unit_order)}

    def stage_markers(self, stage: str) -> dict[str, dict[str, Any]]:
        """unit -> marker of another stage's committed units (the card and the report read every stage)."""
        if stage == self.view.stage:
            return self.markers
        found = committed_markers(self.storage, stage)
        return {u: found[u] for u in sorted(found, key=unit_order)}

    def failures(self, stage: str) -> dict[str, dict[str, Any]]:
        """unit -> failure record of units of `stage` whose last attempt failed."""
        return self.storage.unit_failures(stage)

    def read_json(self, rel: str) -> Any | None:
        return self.storage.read_json(rel)

    # -- manifests -------------------------------------------------------------------------------
    def manifest_rel(self, unit: str) -> str | None:
        v = self.view
        if v.whole_run_file:
            return f"{v.folder}/{unit}/{v.whole_run_file}"
        return f"{v.folder}/{shard_name(int(unit))}.parquet" if unit.isdigit() else None

    def unit_files(self) -> dict[str, str]:
        """unit -> URL of its committed parquet manifest, in unit order."""
        out = {}
        for unit, marker in self.markers.items():
            rel = self.manifest_rel(unit)
            if rel and rel in marker.get("outputs", {}):
                out[unit] = self.storage.url(rel)
        return out

    def files(self) -> list[str]:
        """URLs of the parquet manifests of every committed unit, in unit order."""
        return list(self.unit_files().values())

    def _schema(self, files: list[str]) -> pl.Schema:
        """The columns of the first and the last manifest together: manifests written before a column was added
        (older shards first) read with that column null."""
        ends = [files[0]] if len(files) == 1 else [files[0], files[-1]]
        schemas = []
        for url in ends:
            with shardio.open_url(url, "rb", self.storage.storage_options) as f:
                schemas.append(pq.read_schema(f))
        unified = pa.unify_schemas(schemas, promote_options="permissive").remove_metadata()
        return pl.from_arrow(unified.empty_table()).schema

    def _scan(self, files: list[str]) -> pl.LazyFrame:
        lf = pl.scan_parquet(files, storage_options=polars_storage_options(self.storage), schema=self._schema(files),
                             missing_columns="insert", extra_columns="ignore")
        names = lf.collect_schema().names()
        v = self.view
        if v.text and "caption_chars" in v.lengths and "caption_chars" not in names and v.text in names:
            lf = lf.with_columns(pl.col(v.text).str.len_chars().alias("caption_chars"))
        return lf

    def scan(self, where: str | None = None) -> pl.LazyFrame:
        """A lazy frame over every committed manifest (with derived columns such as caption_chars), filtered by
        a `--where` expression."""
        files = self.files()
        if not files:
            raise PublishError(f"no committed {self.view.folder} manifest under {self.storage.root_url} "
                               f"(run: python -m pipeline run --stage {self.view.stage})")
        return apply_where(self._scan(files), where)

    def scan_unit(self, unit: str, where: str | None = None) -> pl.LazyFrame:
        """One committed unit's manifest (a shard's rows: memory bounded by the shard size)."""
        return apply_where(self._scan([self.unit_files()[unit]]), where)

    # -- samples ---------------------------------------------------------------------------------
    def tar_url(self, unit: str) -> str | None:
        """URL of a committed shard's tar, or None when the unit has none."""
        rel = f"{self.view.folder}/{shard_name(int(unit))}.tar" if unit.isdigit() else None
        if rel and rel in self.markers.get(unit, {}).get("outputs", {}):
            return self.storage.url(rel)
        return None

    def unit_samples(self, unit: str) -> Iterator[shardio.Sample]:
        """The samples of one committed shard's tar, streamed in order (none when it has no tar)."""
        url = self.tar_url(unit)
        if url is not None:
            yield from shardio.read_samples(url, self.storage.storage_options)

    def samples(self, keys: Iterable[str]) -> Iterator[shardio.Sample]:
        """The samples with these keys, shard by shard (each tar streamed once); missing keys are skipped."""
        by_unit: dict[str, set[str]] = defaultdict(set)
        for key in keys:
            if key and key[:5].isdigit():
                by_unit[key[:5]].add(key)
        for unit in sorted(by_unit):
            wanted = by_unit[unit]
            for sample in self.unit_samples(unit):
                if sample.key in wanted:
                    yield sample


def annotate_settings(marker: dict[str, Any]) -> dict[str, Any]:
    """The annotate section a caption shard was made with (as its marker records it)."""
    return ((marker.get("config") or {}).get("section")) or {}


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
