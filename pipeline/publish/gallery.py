"""A static HTML gallery of browsed rows: thumbnails, text, quality, provenance, paging, a search box, charts.

DIR/index.html opens from the file system in any browser (no server, no network): the rows are embedded as
JSON in the page, thumbnails are resized JPEG copies under DIR/thumbs/, the summary charts PNGs under
DIR/charts/. Searching filters by the row's text (the caption) and returns to the first page.
"""

from __future__ import annotations

import html
import io
import json
import shutil
from pathlib import Path
from typing import Any

import polars as pl
from PIL import Image

from pipeline.publish.charts import bar_png
from pipeline.publish.source import CommittedSource, View
from pipeline.publish.summary import sample_rows, summarize

THUMB = 160
PAGE_SIZE = 24
PROVENANCE = ("model_id", "prompt_hash", "captioner", "generator_model_id", "pipeline_version", "timestamp", "url",
              "sha256", "image_sha256", "source_license", "source_caption", "finish_reason", "caption_tokens",
              "error_reason", "error")


def write_gallery(source: CommittedSource, out_dir: Path, where: str | None = None, sample: int | None = None,
                  seed: int = 0, limit: int = 1000, page_size: int = PAGE_SIZE, report: str | None = None) -> Path:
    """Write the gallery of the view's committed rows (filtered by `where`, a seeded `sample` of them, else the
    first `limit`) into out_dir; `report` is the link to the run's report page. Returns out_dir."""
    lf = source.scan(where)
    df = sample_rows(lf, sample, seed) if sample else lf.head(limit).collect()
    out = Path(out_dir)
    for sub in ("thumbs", "charts"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True, exist_ok=True)
    thumbs = _thumbnails(source, df, out / "thumbs")
    charts = _charts(summarize(lf, source.view), out / "charts")
    items = [_item(row, source.view, thumbs) for row in df.iter_rows(named=True)]
    title = f"{source.view_name}: {len(items)} rows from {source.storage.root_url}" + (f" where {where}" if where else "")
    (out / "index.html").write_text(_page(title, items, charts, page_size, report), encoding="utf-8")
    return out


def _thumbnails(source: CommittedSource, df: pl.DataFrame, folder: Path) -> dict[str, str]:
    """key -> relative thumbnail path, for rows whose image is in a committed tar of the view's folder."""
    if not source.view.ext or "key" not in df.columns:
        return {}
    done: dict[str, str] = {}
    for sample in source.samples(df["key"].to_list()):
        if not sample.image:
            continue
        try:
            img = Image.open(io.BytesIO(sample.image))
            img.thumbnail((THUMB, THUMB))
            img.convert("RGB").save(folder / f"{sample.key}.jpg", "JPEG", quality=85)
        except Exception:  # noqa: BLE001 - an undecodable image gets no thumbnail
            continue
        done[sample.key] = f"thumbs/{sample.key}.jpg"
    return done


def _charts(summary: dict[str, Any], folder: Path) -> list[str]:
    """PNG bar charts of the summary: rows by status, then one histogram per summarized column."""
    made = []

    def save(name: str, labels: list[str], values: list[int], title: str) -> None:
        (folder / f"{name}.png").write_bytes(bar_png(labels, values, title))
        made.append(f"charts/{name}.png")

    if summary["status"]:
        save("status", list(summary["status"]), list(summary["status"].values()), "rows by status")
    for col, h in summary["histograms"].items():
        labels = [f"{lo:.3g}" for lo, _, _ in h["bins"]]
        save(col, labels, [n for _, _, n in h["bins"]], f"{col} ({h['rows']} values)")
    return made


def _item(row: dict[str, Any], view: View, thumbs: dict[str, str]) -> dict[str, Any]:
    key = row.get("key") or row.get("image_id") or ""
    quality = row.get(view.quality) if view.quality else None
    return {
        "key": str(key),
        "text": "" if not view.text or row.get(view.text) is None else str(row[view.text]),
        "quality": None if quality is None else float(quality),
        "status": row.get("status"),
        "thumb": thumbs.get(str(key)),
        "prov": {k: str(row[k]) for k in PROVENANCE if row.get(k) is not None},
    }


_CSS = """
body{font-family:system-ui,sans-serif;margin:1em;background:#fafafa;color:#222}
h1{font-size:1.2em} #bar{display:flex;gap:1em;align-items:center;margin:.5em 0}
#search{width:22em;padding:.3em} .charts img{height:160px;margin-right:.5em;border:1px solid #ddd}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:.8em}
.item{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.5em}
.item img{display:block;max-width:160px;max-height:160px;margin:auto;outline:1px solid #ccc}
.item .text{font-size:.85em;margin:.4em 0} .item .meta{font-size:.75em;color:#555}
.item.error{border-color:#c33} details{font-size:.7em;color:#555;word-break:break-all}
"""

_JS = """
const state = {query: "", page: 0};
function matches(it) { return !state.query || it.text.toLowerCase().includes(state.query); }
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; }
function render() {
  const shown = ITEMS.filter(matches);
  const pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
  state.page = Math.min(state.page, pages - 1);
  const grid = document.getElementById("grid"); grid.replaceChildren();
  for (const it of shown.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE)) {
    const card = el("div", "item" + (it.status && it.status !== "ok" ? " error" : ""));
    card.dataset.key = it.key;
    if (it.thumb) { const img = el("img"); img.src = it.thumb; img.alt = it.key; card.appendChild(img); }
    card.appendChild(el("div", "text", it.text));
    const q = it.quality === null ? "" : "  quality " + it.quality.toFixed(3);
    card.appendChild(el("div", "meta", it.key + "  " + (it.status || "") + q));
    const det = el("details"); det.appendChild(el("summary", "", "provenance"));
    for (const [k, v] of Object.entries(it.prov)) det.appendChild(el("div", "", k + ": " + v));
    card.appendChild(det); grid.appendChild(card);
  }
  document.getElementById("count").textContent = shown.length + " of " + ITEMS.length + " items";
  document.getElementById("pageinfo").textContent = "page " + (state.page + 1) + " of " + pages;
  document.getElementById("prev").disabled = state.page === 0;
  document.getElementById("next").disabled = state.page >= pages - 1;
}
document.getElementById("search").addEventListener("input", e => {
  state.query = e.target.value.trim().toLowerCase(); state.page = 0; render(); });
document.getElementById("prev").addEventListener("click", () => { state.page -= 1; render(); });
document.getElementById("next").addEventListener("click", () => { state.page += 1; render(); });
render();
"""


def _page(title: str, items: list[dict[str, Any]], charts: list[str], page_size: int, report: str | None) -> str:
    data = json.dumps(items, ensure_ascii=False).replace("</", "<\\/")
    imgs = "".join(f'<img src="{html.escape(c)}" alt="{html.escape(c)}">' for c in charts)
    link = f'<p><a id="report" href="{html.escape(report)}">the run\'s report: progress, throughput, failures, ' \
           f'training curves</a></p>' if report else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
{link}
<div class="charts">{imgs}</div>
<div id="bar"><input id="search" type="search" placeholder="search captions"><span id="count"></span>
<button id="prev">&laquo; prev</button><span id="pageinfo"></span><button id="next">next &raquo;</button></div>
<div id="grid"></div>
<script>const PAGE_SIZE = {int(page_size)};
const ITEMS = {data};
</script>
<script>{_JS}</script>
</body></html>
"""
