"""report: one self-contained HTML page per root with the run's charts (matplotlib PNGs inlined as data URIs;
no script, no style sheet and no image is fetched: the page's Content-Security-Policy forbids any request).

    python -m pipeline report [ROOT] [--out FILE] [--watch SECONDS]

Charts, each drawn only when the root has data for it:
- units committed (and failed) over time, per stage, from the markers' `committed_at` and failure records;
- images/s (download) and captions/s (annotate) per shard, from the markers' stats;
- failed rows by reason, per stage;
- caption length (characters, tokens) and quality histograms of the committed caption manifests;
- when `train` ran RL: the reward and the audit's rewards and truth by step (train_log.jsonl).
Written to ROOT/report/index.html by default (local roots), or to --out; the gallery links to it.
"""

from __future__ import annotations

import base64
import html
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from pipeline.publish.charts import bar_png, histogram_png, lines_png
from pipeline.publish.source import CommittedSource, PublishError
from pipeline.publish.summary import summarize
from pipeline.stage import STAGE_ORDER
from pipeline.storage import Storage

REPORT_REL = "report/index.html"
TRAIN_LOG = "train_log.jsonl"
TRAIN_CURVES = ("reward_mean", "audit.train_reward", "audit.audit_reward", "audit.truth")
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass
class Chart:
    """One chart of the page: a name (its anchor), a title, PNG bytes and how many data points it shows."""

    name: str
    title: str
    png: bytes
    points: int
    note: str = ""


def report_link(storage: Storage, from_dir: Path) -> str | None:
    """The relative link from a local folder to the root's report page, when the page exists."""
    if not storage.is_local or not os.path.exists(storage.path(REPORT_REL)):
        return None
    return os.path.relpath(storage.path(REPORT_REL), from_dir)


def _when(stamp: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")) if stamp else None
    except ValueError:
        return None


def progress_chart(source: CommittedSource) -> Chart | None:
    """Cumulative committed (and failed) units over time, one line per stage."""
    series: dict[str, tuple[list[datetime], list[int]]] = {}
    for stage in STAGE_ORDER:
        for what, records, field in (("committed", source.stage_markers(stage), "committed_at"),
                                     ("failed", source.failures(stage), "failed_at")):
            times = sorted(t for t in (_when(r.get(field)) for r in records.values()) if t is not None)
            if times:
                series[f"{stage} {what}"] = (times, list(range(1, len(times) + 1)))
    if not series:
        return None
    points = sum(len(xs) for xs, _ in series.values())
    return Chart("progress", "units committed and failed over time", lines_png(
        series, "units committed / failed over time (cumulative)", "time (UTC)", "units", steps=True, dates=True),
        points)


def throughput_chart(source: CommittedSource) -> Chart | None:
    """Rows per second of each committed shard: images/s of download, captions/s of annotate."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for stage, label in (("download", "images/s (download)"), ("annotate", "captions/s (annotate)")):
        xs, ys = [], []
        for unit, m in source.stage_markers(stage).items():
            stats = m.get("stats") or {}
            rows = stats.get("ok", 0) if stage == "annotate" else stats.get("rows", 0)
            if unit.isdigit() and stats.get("seconds"):
                xs.append(float(int(unit)))
                ys.append(rows / float(stats["seconds"]))
        if xs:
            series[label] = (xs, ys)
    if not series:
        return None
    return Chart("throughput", "throughput per shard",
                 lines_png(series, "throughput per shard", "shard", "rows per second"),
                 sum(len(xs) for xs, _ in series.values()))


def failures_chart(source: CommittedSource) -> Chart | None:
    """Failed rows of the committed units by stage and reason (from the markers' stats)."""
    reasons: Counter[str] = Counter()
    for stage in STAGE_ORDER:
        for m in source.stage_markers(stage).values():
            for reason, n in ((m.get("stats") or {}).get("errors") or {}).items():
                reasons[f"{stage}: {reason}"] += int(n)
    for stage in STAGE_ORDER:
        for rec in source.failures(stage).values():
            reasons[f"{stage}: unit failed ({rec.get('error_type') or 'error'})"] += 1
    if not reasons:
        return None
    top = reasons.most_common(15)
    return Chart("failures", "failed rows by reason", bar_png(
        [k for k, _ in top], [v for _, v in top], "failed rows (and failed units) by reason", size=(7, max(2.6, 0.8 + 0.35 * len(top))),
        dpi=100, ylabel="rows", horizontal=True), len(top))


def caption_charts(source: CommittedSource) -> list[Chart]:
    """Histograms of caption length and quality over the committed caption manifests (ok rows)."""
    if not source.files():
        return []
    summary = summarize(source.scan("status = 'ok'"), source.view)
    labels = {"caption_chars": ("caption length", "characters"), "caption_tokens": ("caption length", "tokens"),
              "quality": ("caption quality (CapRL reward)", "reward")}
    out = []
    for col, h in summary["histograms"].items():
        title, unit = labels.get(col, (col, col))
        out.append(Chart(f"hist-{col}", f"{title} ({unit})", histogram_png(h, f"{title} ({unit})", unit),
                         sum(n for _, _, n in h["bins"])))
    return out


def train_log(source: CommittedSource) -> list[dict[str, Any]]:
    """The records of the committed train unit's log (RL runs only; a registered checkpoint has none)."""
    for unit, m in source.stage_markers("train").items():
        rel = f"{m.get('artifact') or f'checkpoints/{unit}'}/{TRAIN_LOG}"
        if rel in m.get("outputs", {}):
            with source.storage.open(rel, "rb") as f:
                return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    return []


def train_chart(source: CommittedSource) -> Chart | None:
    """The training reward and the audits (train reward, audit reward, truth) by step."""
    records = train_log(source)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for name in TRAIN_CURVES:
        xs, ys = [], []
        for r in records:
            value = r.get("audit", {}).get(name.split(".", 1)[1]) if name.startswith("audit.") else r.get(name)
            if isinstance(value, int | float):
                xs.append(float(r["step"]))
                ys.append(float(value))
        if xs:
            series[name.replace("audit.", "audit ")] = (xs, ys)
    if not series:
        return None
    return Chart("train", "training curves", lines_png(series, "reward and audit by step", "step", "value"),
                 sum(len(xs) for xs, _ in series.values()),
                 note="hallucination is not a recorded audit metric; truth is the audit captions' attribute accuracy")


CHARTS: tuple[Callable[[CommittedSource], Chart | list[Chart] | None], ...] = (
    progress_chart, throughput_chart, failures_chart, caption_charts, train_chart)


def charts(source: CommittedSource) -> list[Chart]:
    out: list[Chart] = []
    for make in CHARTS:
        made = make(source)
        out.extend(made if isinstance(made, list) else [made] if made is not None else [])
    return out


def counts_table(source: CommittedSource) -> list[tuple[str, int, int, int]]:
    """(stage, committed units, failed units, ok rows) per stage that has any."""
    rows = []
    for stage in STAGE_ORDER:
        done, failed = source.stage_markers(stage), source.failures(stage)
        if done or failed:
            ok = sum(int((m.get("rows") or {}).get("ok", 0)) for m in done.values())
            rows.append((stage, len(done), len(failed), ok))
    return rows


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222;max-width:1400px}
h1{font-size:1.4em} table{border-collapse:collapse;margin:.5em 0 1em} td,th{border:1px solid #ccc;padding:.25em .6em}
#charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:1em}
figure.chart{background:#fff;border:1px solid #ddd;border-radius:6px;margin:0;padding:.6em}
figure.chart img{max-width:100%} figcaption{font-size:.9em;color:#444}
"""


def render(source: CommittedSource, made: list[Chart], refresh: int | None = None) -> str:
    """The page: a counts table, then one figure per chart (PNG as a data URI)."""
    root = source.storage.root_url
    rows = "".join(f"<tr><td>{html.escape(s)}</td><td>{d}</td><td>{f}</td><td>{ok}</td></tr>"
                   for s, d, f, ok in counts_table(source))
    figures = []
    for c in made:
        data = base64.b64encode(c.png).decode()
        note = f"<br>{html.escape(c.note)}" if c.note else ""
        figures.append(f'<figure class="chart" id="{c.name}" data-chart="{c.name}" data-points="{c.points}">'
                       f'<img alt="{html.escape(c.title)}" src="data:image/png;base64,{data}">'
                       f'<figcaption>{html.escape(c.title)} ({c.points} data points){note}</figcaption></figure>')
    stamp = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    meta_refresh = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">{meta_refresh}
<title>report: {html.escape(root)}</title><style>{_CSS}</style></head>
<body>
<h1>Run report: {html.escape(root)}</h1>
<p>Made {html.escape(stamp)} from the committed markers and manifests{' (refreshes every ' + str(refresh) + ' s)' if refresh else ''}.</p>
<table><tr><th>stage</th><th>committed units</th><th>failed units</th><th>ok rows</th></tr>{rows}</table>
<div id="charts">{''.join(figures)}</div>
</body></html>
"""


def write_report(source: CommittedSource, out: str | None = None, refresh: int | None = None) -> str:
    """Write the page (atomically) to `out` (a local path or URL) or ROOT/report/index.html; returns where."""
    made = charts(source)
    if not made:
        raise PublishError(f"nothing committed under {source.storage.root_url} to report on yet")
    page = render(source, made, refresh).encode()
    if out is None:
        source.storage.write_bytes(REPORT_REL, page)
        return source.storage.url(REPORT_REL)
    if "://" in out and not out.startswith("file://"):
        from pipeline.shardio import url_fs

        fs, path = url_fs(out, source.storage.storage_options)
        fs.pipe_file(path, page)
        return out
    path = Path(out.removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(page)
    os.replace(tmp, path)
    return str(path)


def watch(make_source: Callable[[], CommittedSource], out: str | None, every: float, stream: TextIO) -> int:
    """Rewrite the page every `every` seconds (the page reloads itself as often) until interrupted."""
    while True:
        try:
            where = write_report(make_source(), out, refresh=max(1, int(every)))
            print(f"report: {where} ({time.strftime('%H:%M:%S')})", file=stream, flush=True)
        except PublishError as exc:
            print(f"report: {exc}", file=stream, flush=True)
        time.sleep(every)

