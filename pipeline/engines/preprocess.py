"""Image preprocessing shared by every engine and stage, and a worker pool that runs it ahead of a model.

`prepare_image` is THE one function: decode bytes, apply the EXIF orientation, convert to RGB
(alpha composited on white), and resize once to the model's image grid (`ImageGrid.fit`: sides that
are multiples of patch x merge, 28 px for Qwen2.5-VL and 32 px for Qwen3-VL, area within the pixel
budget, aspect ratio kept).

`preprocess_ahead` maps it over an iterator in a thread or process pool, a bounded number of
items ahead of the consumer, yielding results in input order with a per-item error instead of an
exception, so one broken image never stops a shard.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

from PIL import Image, ImageOps

from pipeline.engines.grid import ImageGrid

T = TypeVar("T")
R = TypeVar("R")

PREPARED = "caprl_prepared"
"""Key in a prepared image's `info`: the grid key (min_pixels, max_pixels, factor) it was prepared for. An
engine handed an image prepared for its own grid uses it as it is, so an image is decoded, turned upright and
resized once (in the stage's worker pool), never again inside the engine or its processor."""


def prepare_image(source: bytes | bytearray | memoryview | Image.Image | str, grid: ImageGrid,
                  upright: bool = False) -> Image.Image:
    """Decoded, upright, RGB image resized to `grid.fit` (see the module docstring). `source`: bytes, a PIL
    image or a path. `upright`: the image is already EXIF-transposed (skip that step)."""
    if isinstance(source, Image.Image) and source.info.get(PREPARED) == grid.key:
        return source
    if isinstance(source, bytes | bytearray | memoryview):
        img = Image.open(io.BytesIO(bytes(source)))
    elif isinstance(source, str):
        img = Image.open(source)
    else:
        img = source
    img.load()
    if not upright:
        img = ImageOps.exif_transpose(img) or img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        img = background
    elif img.mode != "RGB":
        img = img.convert("RGB")
    h, w = grid.fit(img.height, img.width)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    elif img is source:
        img = img.copy()  # never mark the caller's own image
    img.info[PREPARED] = grid.key
    return img


@dataclass
class Prepared(Generic[T]):
    """One item from `preprocess_ahead`: the input item, the result (None on error) and the error text."""

    item: T
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _safe(fn: Callable[[Any], Any], arg: Any) -> tuple[Any, str | None]:
    try:
        return fn(arg), None
    except Exception as exc:  # noqa: BLE001 - a bad item becomes a per-row error
        return None, f"{type(exc).__name__}: {exc}"


def map_ahead(fn: Callable[[T], R], items: Iterable[T], workers: int = 2, ahead: int | None = None,
              processes: bool = False) -> Iterator[Prepared[T]]:
    """fn over items in a pool, at most `ahead` items in flight, results in input order.

    workers=0 runs inline (no pool). Exceptions become `Prepared.error`; the iterator never raises
    for a bad item. Use processes=True for CPU-heavy work when fn and items pickle.
    """
    if workers <= 0:
        for item in items:
            value, error = _safe(fn, item)
            yield Prepared(item, value, error)
        return
    ahead = ahead or 4 * workers
    pool: Executor = ProcessPoolExecutor(workers) if processes else ThreadPoolExecutor(workers, "preprocess")
    queue: deque[tuple[T, Future]] = deque()
    try:
        iterator = iter(items)
        for item in iterator:
            queue.append((item, pool.submit(_safe, fn, item)))
            if len(queue) >= ahead:
                done_item, fut = queue.popleft()
                value, error = fut.result()
                yield Prepared(done_item, value, error)
        while queue:
            done_item, fut = queue.popleft()
            value, error = fut.result()
            yield Prepared(done_item, value, error)
    finally:
        for _, fut in queue:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def preprocess_ahead(items: Iterable[T], grid: ImageGrid, get_source: Callable[[T], Any] | None = None,
                     workers: int = 2, ahead: int | None = None, processes: bool = False) -> Iterator[Prepared[T]]:
    """`prepare_image` over items (or over get_source(item)) in a worker pool running ahead of the consumer."""
    fn = partial(_prepare_from, get_source, grid)
    return map_ahead(fn, items, workers=workers, ahead=ahead, processes=processes)


def _prepare_from(get_source: Callable[[Any], Any] | None, grid: ImageGrid, item: Any) -> Image.Image:
    source = get_source(item) if get_source is not None else item
    return prepare_image(source, grid)
