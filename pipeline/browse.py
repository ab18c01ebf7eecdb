"""browse: look at a run's dataset through the parquet manifests of its committed units, lazily (polars).

    python -m pipeline browse ROOT [--stage captions|images|qa|eval] [--where EXPR] [--sample N] [--show KEY]
                                   [--html DIR]

Only units with a current `_done` marker are read (a half-written or uncommitted shard is invisible), local
or on any object store polars reaches (s3 through the run's storage options). Everything is a lazy scan:
the summary collects aggregates only, `--sample N` picks N row numbers first and fetches only those rows.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.errors import PipelineError
from pipeline.shards import shard_name
from pipeline.storage import Storage


@dataclass(frozen=True)
class View:
    """How one stage's manifest is browsed: where it is and which columns mean what."""

    stage: str
    folder: str
    reasons: tuple[str, ...] = ()
    """columns giving a failed row's reason"""
    lengths: tuple[str, ...] = ()
    """numeric columns summarized as histograms"""
    quality: str | None = None
    models: tuple[str, ...] = ()
    text: str | None = None
    """the text the gallery shows and searches"""
    ext: str | None = None
    """the column with the image's extension inside the shard's tar"""
    whole_run_file: str | None = None
    """whole-run stages: the parquet inside each unit's folder"""


VIEWS: dict[str, View] = {
    "captions": View("annotate", "captions", ("error_reason",), ("caption_tokens", "caption_chars"), "quality",
                     ("model_id",), "caption", "image_ext"),
    "images": View("download", "images", ("error",), ("width", "height", "bytes"), None, (), "url", "format"),
    "qa": View("qa", "qa", ("error_reason", "reject_reason"), ("visual_acc", "text_acc"), None,
               ("generator_model_id", "filter_model_id"), "question"),
    "eval": View("evaluate", "eval", (), ("caption_chars",), "correct", ("captioner", "model_id"), "caption",
                 whole_run_file="answers.parquet"),
}


class BrowseError(PipelineError):
    """A user mistake in a browse request (bad expression, unknown key, nothing committed)."""


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


def committed_files(storage: Storage, view: View) -> list[str]:
    """URLs of the parquet manifests of every committed unit of the view's stage, in unit order."""
    units = storage.committed_units(view.stage)
    rels = []
    for unit in sorted(units, key=lambda u: (not u.isdigit(), int(u) if u.isdigit() else 0, u)):
        rel = (f"{view.folder}/{unit}/{view.whole_run_file}" if view.whole_run_file
               else f"{view.folder}/{shard_name(int(unit))}.parquet" if unit.isdigit() else None)
        if rel and rel in units[unit].get("outputs", {}):
            rels.append(rel)
    return [storage.url(rel) for rel in rels]


def scan(storage: Storage, view: View) -> pl.LazyFrame:
    """A lazy frame over every committed manifest of the view (with derived columns such as caption_chars)."""
    files = committed_files(storage, view)
    if not files:
        raise BrowseError(f"no committed {view.folder} manifest under {storage.root_url} "
                          f"(run: python -m pipeline run --stage {view.stage})")
    lf = pl.scan_parquet(files, storage_options=polars_storage_options(storage))
    names = lf.collect_schema().names()
    if view.text and "caption_chars" in view.lengths and "caption_chars" not in names and view.text in names:
        lf = lf.with_columns(pl.col(view.text).str.len_chars().alias("caption_chars"))
    return lf


def apply_where(lf: pl.LazyFrame, where: str | None) -> pl.LazyFrame:
    """Rows matching a polars SQL expression; a bad expression is a BrowseError (checked on an empty frame)."""
    if not where:
        return lf
    try:
        filtered = lf.filter(pl.sql_expr(where))
        filtered.head(0).collect()
    except Exception as exc:  # noqa: BLE001 - polars raises several error types for a bad expression
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BrowseError(f"bad --where expression {where!r}: {first}") from None
    return filtered


# -- summary ---------------------------------------------------------------------------------------
def _counts(lf: pl.LazyFrame, column: str, where: pl.Expr | None = None) -> dict[str, int]:
    q = lf if where is None else lf.filter(where)
    df = q.group_by(column).agg(pl.len().alias("n")).sort(["n", column], descending=[True, False]).collect()
    return {str(k): int(n) for k, n in zip(df[column].to_list(), df["n"].to_list(), strict=True)}


def histogram(lf: pl.LazyFrame, column: str, bins: int = 10) -> dict[str, Any] | None:
    """Equal-width bins of a numeric (or boolean) column, nulls left out: {min, max, mean, rows, bins: [(lo, hi, n)]}."""
    x = pl.col(column).cast(pl.Float64)
    stats = lf.select(x.min().alias("lo"), x.max().alias("hi"), x.mean().alias("mean"),
                      x.count().alias("rows")).collect().row(0, named=True)
    if not stats["rows"]:
        return None
    lo, hi = float(stats["lo"]), float(stats["hi"])
    integer = lf.collect_schema()[column].is_integer()
    if integer:  # whole-number bins [lo, lo + width - 1]
        width = float(max(1, math.ceil((hi - lo + 1) / bins)))
        n_bins = int((hi - lo) // width) + 1
    else:
        width = (hi - lo) / bins if hi > lo else 1.0
        n_bins = bins if hi > lo else 1
    idx = ((x - lo) / width).floor().clip(0, n_bins - 1).cast(pl.Int32).alias("bin")
    df = lf.select(idx).drop_nulls().group_by("bin").agg(pl.len().alias("n")).collect()
    counts = dict(zip(df["bin"].to_list(), df["n"].to_list(), strict=True))

    def upper(i: int) -> float:
        if integer:
            return min(hi, lo + (i + 1) * width - 1)
        return lo + (i + 1) * width if hi > lo else hi

    return {"min": lo, "max": hi, "mean": float(stats["mean"]), "rows": int(stats["rows"]),
            "bins": [(lo + i * width, upper(i), int(counts.get(i, 0))) for i in range(n_bins)]}


def summarize(lf: pl.LazyFrame, view: View) -> dict[str, Any]:
    """Row counts by status and failure reason, histograms, models and pipeline versions: aggregates only."""
    names = set(lf.collect_schema().names())
    out: dict[str, Any] = {"rows": int(lf.select(pl.len()).collect().item())}
    out["status"] = _counts(lf, "status") if "status" in names else {}
    failed = pl.col("status") != "ok" if "status" in names else None
    out["failures"] = {}
    for col in view.reasons:
        if col in names and failed is not None:
            out["failures"].update({k: v for k, v in _counts(lf, col, failed & pl.col(col).is_not_null()).items()})
    if "kept" in names:
        out["kept"] = _counts(lf.with_columns(pl.col("kept").cast(pl.Utf8)), "kept")
    out["histograms"] = {}
    for col in (*view.lengths, *([view.quality] if view.quality else [])):
        if col in names:
            h = histogram(lf, col)
            if h is not None:
                out["histograms"][col] = h
    out["models"] = {col: _counts(lf, col, pl.col(col).is_not_null()) for col in view.models if col in names}
    out["pipeline_versions"] = _counts(lf, "pipeline_version", pl.col("pipeline_version").is_not_null()) \
        if "pipeline_version" in names else {}
    return out


def _num(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.3g}"


def format_summary(s: dict[str, Any], title: str, width: int = 30) -> str:
    """The summary as compact text: counts, then one text histogram per column."""
    lines = [title, f"rows: {s['rows']}"]
    if s["status"]:
        lines.append("status: " + ", ".join(f"{k} {v}" for k, v in s["status"].items()))
    if s["failures"]:
        lines.append("failure reasons: " + ", ".join(f"{k} {v}" for k, v in s["failures"].items()))
    if s.get("kept"):
        lines.append("kept: " + ", ".join(f"{k} {v}" for k, v in s["kept"].items()))
    for col, h in s["histograms"].items():
        lines.append(f"{col}: {h['rows']} values, min {_num(h['min'])}, mean {_num(h['mean'])}, max {_num(h['max'])}")
        top = max(n for _, _, n in h["bins"]) or 1
        for lo, hi, n in h["bins"]:
            bar = "#" * max(1 if n else 0, round(width * n / top))
            lines.append(f"  {_num(lo):>8} - {_num(hi):<8} {bar} {n}")
    for col, counts in s["models"].items():
        lines.append(f"{col}: " + ", ".join(f"{k} ({v})" for k, v in counts.items()))
    if s["pipeline_versions"]:
        lines.append("pipeline versions: " + ", ".join(f"{k} ({v})" for k, v in s["pipeline_versions"].items()))
    return "\n".join(lines)


# -- rows -------------------------------------------------------------------------------------------
def sample_rows(lf: pl.LazyFrame, n: int, seed: int = 0) -> pl.DataFrame:
    """n rows chosen uniformly with a seed (row numbers first, then only those rows are read), in row order."""
    total = int(lf.select(pl.len()).collect().item())
    picks = sorted(random.Random(seed).sample(range(total), min(n, total)))
    return (lf.with_row_index("_row").filter(pl.col("_row").is_in(picks)).drop("_row").collect())


def show_row(storage: Storage, lf: pl.LazyFrame, view: View, key: str) -> tuple[dict[str, Any], str | None]:
    """One row by key, whole, and where its image is ('<tar URL> :: <member>'; None when not in a tar)."""
    column = "key" if "key" in lf.collect_schema().names() else "image_id"
    df = lf.filter(pl.col(column) == key).head(1).collect()
    if df.height == 0:
        raise BrowseError(f"no row with {column} {key!r} in the committed {view.folder} manifests")
    row = df.row(0, named=True)
    where = None
    if view.ext and column == "key" and key[:5].isdigit():
        ext = row.get(view.ext) or "jpg"
        where = f"{storage.url(f'{view.folder}/{key[:5]}.tar')} :: {key}.{ext}"
    return row, where


def _short(value: Any, limit: int = 70) -> str:
    text = str(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_rows(df: pl.DataFrame, view: View) -> str:
    """A few compact lines per row: key, status, quality and the start of its text."""
    cols = [c for c in ("key", "image_id", "captioner", "status", view.quality, view.text) if c and c in df.columns]
    lines = []
    for row in df.select(cols).iter_rows(named=True):
        lines.append("  ".join(f"{c}={_short(row[c])}" for c in cols))
    return "\n".join(lines)


def browse(storage: Storage, stage: str = "captions", where: str | None = None, sample: int | None = None,
           seed: int = 0, show: str | None = None, html: str | None = None, out=None) -> int:
    """The browse command: prints to `out`; returns the exit code (errors raise BrowseError)."""
    out = out or sys.stdout
    view = VIEWS[stage]
    lf = apply_where(scan(storage, view), where)
    if show is not None:
        row, image = show_row(storage, lf, view, show)
        for k, v in row.items():
            print(f"{k}: {v}", file=out)
        if image:
            print(f"image: {image}", file=out)
        return 0
    n_files = len(committed_files(storage, view))
    title = f"{stage} ({view.stage}): {n_files} committed manifest(s) under {storage.root_url}" + (
        f", where {where}" if where else "")
    print(format_summary(summarize(lf, view), title), file=out)
    if sample:
        print(f"\nsample of {sample} (seed {seed}):", file=out)
        print(format_rows(sample_rows(lf, sample, seed), view), file=out)
    elif where:
        print("\nfirst rows:", file=out)
        print(format_rows(lf.head(10).collect(), view), file=out)
    if html:
        from pipeline.gallery import write_gallery  # gallery imports this module

        folder = write_gallery(storage, stage, Path(html), where=where, sample=sample, seed=seed)
        print(f"\ngallery: {folder / 'index.html'}", file=out)
    return 0


def stage_choices() -> Sequence[str]:
    return tuple(VIEWS)
