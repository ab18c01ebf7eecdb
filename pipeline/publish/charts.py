"""Charts as PNG bytes (matplotlib, Agg backend): bars, histograms from `summary.histogram`, lines over time or
steps. The gallery writes them as files, the report inlines them; labels are sized for normal zoom."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata={"Software": None})
    _pyplot().close(fig)
    return buf.getvalue()


def bar_png(labels: Sequence[str], values: Sequence[float], title: str, size: tuple[float, float] = (4, 2.6),
            dpi: int = 90, ylabel: str | None = None, horizontal: bool = False) -> bytes:
    """One bar per label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    if horizontal:
        ax.barh(range(len(values)), values, color=COLORS[0])
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.invert_yaxis()
    else:
        ax.bar(range(len(values)), values, color=COLORS[0])
        ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=7 if size[0] < 5 else 8)
    if ylabel:
        (ax.set_xlabel if horizontal else ax.set_ylabel)(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9 if size[0] < 5 else 11)
    return _png(fig)


def histogram_png(h: dict[str, Any], title: str, xlabel: str, size: tuple[float, float] = (6, 3.2),
                  dpi: int = 100) -> bytes:
    """A histogram from `summary.histogram` output (bars at their bin edges)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    lefts = [lo for lo, _, _ in h["bins"]]
    widths = [max(hi - lo, 1e-9) if hi > lo else 1.0 for lo, hi, _ in h["bins"]]
    if len(h["bins"]) > 1 and all(float(lo).is_integer() for lo in lefts):
        widths = [w + 1 if float(w).is_integer() else w for w in widths]  # whole-number bins [lo, hi]
    ax.bar(lefts, [n for _, _, n in h["bins"]], width=widths, align="edge", color=COLORS[0], edgecolor="white")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("rows", fontsize=9)
    ax.set_title(f"{title} ({h['rows']} values, mean {h['mean']:.3g})", fontsize=11)
    return _png(fig)


def lines_png(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str, ylabel: str,
              size: tuple[float, float] = (6, 3.2), dpi: int = 100, steps: bool = False, dates: bool = False) -> bytes:
    """One line per named series of (x, y) points; `steps` draws cumulative step lines, `dates` x as datetimes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    for i, (name, (xs, ys)) in enumerate(series.items()):
        kw = {"color": COLORS[i % len(COLORS)], "label": name}
        if steps:
            ax.step(xs, ys, where="post", **kw)
        else:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, **kw)
    from matplotlib.ticker import MaxNLocator

    if steps:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if dates:
        import matplotlib.dates as mdates

        locator = mdates.AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _png(fig)
