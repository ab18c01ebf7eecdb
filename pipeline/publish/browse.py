"""browse: look at a run's dataset through the parquet manifests of its committed units, lazily (polars).

    python -m pipeline browse ROOT [--stage captions|images|qa|eval] [--where EXPR] [--sample N] [--show KEY]
                                   [--html DIR]

Reads through `CommittedSource` (only committed units, local or any object store polars reaches). Everything is
a lazy scan: the summary collects aggregates only, `--sample N` picks N row numbers first and fetches only those
rows. The gallery (`--html`) is `pipeline.publish.gallery`, called by the CLI beside this.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import polars as pl

from pipeline.publish.source import CommittedSource, PublishError, View
from pipeline.publish.summary import sample_rows, summarize


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
def show_row(source: CommittedSource, lf: pl.LazyFrame, key: str) -> tuple[dict[str, Any], str | None]:
    """One row by key, whole, and where its image is ('<tar URL> :: <member>'; None when not in a tar)."""
    view = source.view
    column = "key" if "key" in lf.collect_schema().names() else "image_id"
    df = lf.filter(pl.col(column) == key).head(1).collect()
    if df.height == 0:
        raise PublishError(f"no row with {column} {key!r} in the committed {view.folder} manifests")
    row = df.row(0, named=True)
    where = None
    tar = source.tar_url(key[:5]) if view.ext and column == "key" and key[:5].isdigit() else None
    if tar is not None:
        where = f"{tar} :: {key}.{row.get(view.ext) or 'jpg'}"
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


def browse(source: CommittedSource, where: str | None = None, sample: int | None = None, seed: int = 0,
           show: str | None = None, out: TextIO | None = None) -> int:
    """The browse command: prints to `out`; returns the exit code (errors raise PublishError)."""
    out = out or sys.stdout
    view = source.view
    lf = source.scan(where)
    if show is not None:
        row, image = show_row(source, lf, show)
        for k, v in row.items():
            print(f"{k}: {v}", file=out)
        if image:
            print(f"image: {image}", file=out)
        return 0
    title = (f"{source.view_name} ({view.stage}): {len(source.files())} committed manifest(s) under "
             f"{source.storage.root_url}" + (f", where {where}" if where else ""))
    print(format_summary(summarize(lf, view), title), file=out)
    if sample:
        print(f"\nsample of {sample} (seed {seed}):", file=out)
        print(format_rows(sample_rows(lf, sample, seed), view), file=out)
    elif where:
        print("\nfirst rows:", file=out)
        print(format_rows(lf.head(10).collect(), view), file=out)
    return 0
