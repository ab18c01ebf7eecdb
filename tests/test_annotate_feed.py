"""The annotate stage's feed: reading and decoding run in a feeder thread, ahead of the engine."""

from __future__ import annotations

import io
import threading
import time

import pytest
from PIL import Image

from pipeline.engines.base import Sampling
from pipeline.engines.grid import ImageGrid
from stages.annotate.captioning import CaptionJob, FeedConfig, caption_images, in_background
from tests.annotate_support import ScriptedCaptioner

GRID = ImageGrid(patch=14, merge=2, min_pixels=3136, max_pixels=200_704)
"""A Qwen2.5-VL-style grid for the stand-in captioner."""


def _png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), (shade, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_in_background_keeps_order_and_stays_within_depth():
    produced: list[int] = []

    def source():
        for i in range(50):
            produced.append(i)
            yield i

    seen = []
    for item in in_background(source(), depth=4):
        time.sleep(0.002)
        seen.append(item)
        assert len(produced) - len(seen) <= 4 + 1  # the queue plus the one item the feeder holds
    assert seen == list(range(50))


def test_in_background_raises_the_sources_error_after_the_items_before_it():
    def source():
        yield 1
        yield 2
        raise OSError("input tar unreadable")

    seen = []
    with pytest.raises(OSError, match="input tar unreadable"):
        for item in in_background(source(), depth=8):
            seen.append(item)
    assert seen == [1, 2]


def test_in_background_stops_and_closes_its_source_when_the_consumer_stops():
    closed = threading.Event()
    produced: list[int] = []

    def source():
        try:
            for i in range(10_000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    feed = in_background(source(), depth=2)
    assert next(feed) == 0
    feed.close()  # joins the feeder
    assert closed.is_set()
    assert len(produced) < 10
    assert not any(t.name == "caption-feed" for t in threading.enumerate())


def test_the_engine_starts_before_the_input_is_read_and_results_match_inline():
    pulled = [0]

    def jobs():
        for i in range(96):
            time.sleep(0.005)  # a slow input: reading it all takes ~0.5 s
            pulled[0] += 1
            yield CaptionJob(key=f"{i:09d}", data=_png(i))

    pulled_at_first_call: list[int] = []
    engine = ScriptedCaptioner(lambda img: f"red {img.getpixel((0, 0))[0]}")
    generate = engine.generate

    def spy(requests, params):
        pulled_at_first_call.append(pulled[0])
        return generate(requests, params)

    engine.generate = spy  # type: ignore[method-assign]
    cfg = FeedConfig(prompt="Describe.", sampling=Sampling(), grid=GRID, chunk_size=64, workers=2)
    threaded = [(r.key, r.status, r.caption, r.sha256) for r in caption_images(engine, jobs(), cfg)]
    assert pulled_at_first_call[0] < 96  # the old feed read two chunks (the whole input) first
    assert engine.batches == [8, 16, 32, 40]  # the same chunk ramp as before

    pulled[0] = 0
    inline = [(r.key, r.status, r.caption, r.sha256)
              for r in caption_images(ScriptedCaptioner(engine.policy), jobs(), FeedConfig(
                  prompt="Describe.", sampling=Sampling(), grid=GRID, chunk_size=64, workers=0))]
    assert threaded == inline
    assert [k for k, *_ in threaded] == [f"{i:09d}" for i in range(96)]
