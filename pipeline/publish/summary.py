"""Aggregates over a lazy manifest frame (counts, histograms, a seeded sample), shared by browse, the gallery
and the report: everything is computed by polars without materializing the rows."""

from __future__ import annotations

import math
import random
from typing import Any

import polars as pl

from pipeline.publish.source import View


def counts(lf: pl.LazyFrame, column: str, where: pl.Expr | None = None) -> dict[str, int]:
    """value -> rows, most frequent first."""
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
    found = dict(zip(df["bin"].to_list(), df["n"].to_list(), strict=True))

    def upper(i: int) -> float:
        if integer:
            return min(hi, lo + (i + 1) * width - 1)
        return lo + (i + 1) * width if hi > lo else hi

    return {"min": lo, "max": hi, "mean": float(stats["mean"]), "rows": int(stats["rows"]),
            "bins": [(lo + i * width, upper(i), int(found.get(i, 0))) for i in range(n_bins)]}


def summarize(lf: pl.LazyFrame, view: View) -> dict[str, Any]:
    """Row counts by status and failure reason, histograms, models and pipeline versions: aggregates only."""
    names = set(lf.collect_schema().names())
    out: dict[str, Any] = {"rows": int(lf.select(pl.len()).collect().item())}
    out["status"] = counts(lf, "status") if "status" in names else {}
    failed = pl.col("status") != "ok" if "status" in names else None
    out["failures"] = {}
    for col in view.reasons:
        if col in names and failed is not None:
            out["failures"].update(counts(lf, col, failed & pl.col(col).is_not_null()))
    if "kept" in names:
        out["kept"] = counts(lf.with_columns(pl.col("kept").cast(pl.Utf8)), "kept")
    out["histograms"] = {}
    for col in (*view.lengths, *([view.quality] if view.quality else [])):
        if col in names:
            h = histogram(lf, col)
            if h is not None:
                out["histograms"][col] = h
    out["models"] = {col: counts(lf, col, pl.col(col).is_not_null()) for col in view.models if col in names}
    out["models"] = {col: c for col, c in out["models"].items() if c}
    out["pipeline_versions"] = counts(lf, "pipeline_version", pl.col("pipeline_version").is_not_null()) \
        if "pipeline_version" in names else {}
    return out


def sample_rows(lf: pl.LazyFrame, n: int, seed: int = 0) -> pl.DataFrame:
    """n rows chosen uniformly with a seed (row numbers first, then only those rows are read), in row order."""
    total = int(lf.select(pl.len()).collect().item())
    picks = sorted(random.Random(seed).sample(range(total), min(n, total)))
    return lf.with_row_index("_row").filter(pl.col("_row").is_in(picks)).drop("_row").collect()
