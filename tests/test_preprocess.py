"""The shared image preprocessing and the pool that runs it ahead of an engine."""

from __future__ import annotations

import io
import threading

import pytest
from PIL import Image

from pipeline.config import EngineConfig
from pipeline.engines.grid import ImageGrid
from pipeline.engines.preprocess import PREPARED, map_ahead, prepare_image, preprocess_ahead

QWEN25 = ImageGrid(patch=14, merge=2, min_pixels=3136, max_pixels=1_003_520)
QWEN3 = ImageGrid(patch=16, merge=2, min_pixels=3136, max_pixels=1_003_520)


@pytest.mark.parametrize("patch,factor", [(14, 28), (16, 32)])
@pytest.mark.parametrize("h,w", [(112, 112), (1080, 1920), (3000, 4000), (10, 10), (50, 700), (4321, 30)])
def test_fit_multiples_of_the_grid_within_budget(h, w, patch, factor):
    grid = ImageGrid(patch, 2, min_pixels=4096, max_pixels=200_704)
    assert grid.factor == factor
    th, tw = grid.fit(h, w)
    assert th % factor == 0 and tw % factor == 0
    assert 4096 <= th * tw <= 200_704
    if min(h, w) >= factor * 4:
        assert abs(th / tw - h / w) / (h / w) < 0.15
    assert grid.fit(th, tw) == (th, tw)  # a fitted size is a fixed point: the processor does not resize again


def test_tokens_follow_the_model_grid():
    """640x480 under a 1,003,520 px budget: 17 x 23 tokens of 28 px for Qwen2.5-VL, 15 x 20 of 32 px for Qwen3-VL
    (the issue's 391 estimated vs 300 real)."""
    assert QWEN25.tokens((640, 480)) == 17 * 23 == 391
    assert QWEN3.tokens((640, 480)) == 15 * 20 == 300
    assert QWEN3.patches(480, 640) == 300 * 4
    img = prepare_image(Image.new("RGB", (640, 480)), QWEN3)
    assert img.size == (640, 480) and QWEN3.tokens(img) == 300


def test_the_budget_reaches_a_processor_in_the_form_it_reads():
    from transformers import Qwen2VLImageProcessor

    proc = Qwen2VLImageProcessor(patch_size=16, merge_size=2)  # a real Qwen3-VL checkpoint's minimum: 65,536 px
    grid = ImageGrid.from_processor(proc, EngineConfig(min_pixels=3136, max_pixels=50_176))
    assert (grid.patch, grid.merge, grid.factor) == (16, 2, 32)
    assert grid.processor_kwargs() == {"size": {"shortest_edge": 3136, "longest_edge": 50_176}}
    grid.apply_to(proc)
    assert proc.size["shortest_edge"] == 3136 and proc.size["longest_edge"] == 50_176
    img = prepare_image(Image.new("RGB", (97, 41)), grid)
    out = proc(images=[img], return_tensors="pt")
    assert out["image_grid_thw"][0].tolist() == [1, img.height // 16, img.width // 16]  # not resized again
    budget = ImageGrid.from_processor(object(), EngineConfig(min_pixels=10, max_pixels=100_000))
    assert not budget.native and budget.processor_kwargs() == {} and budget.fit(41, 97) == (41, 97)


def test_prepare_image_decodes_orients_and_converts():
    img = Image.new("RGB", (300, 200), (10, 200, 30))
    img.paste((255, 0, 0), (0, 0, 50, 50))  # a red marker top-left
    sideways = img.rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    sideways.save(buf, format="JPEG", exif=exif, quality=95)
    out = prepare_image(buf.getvalue(), ImageGrid(14, 2, 3136, 10**7))
    assert out.mode == "RGB" and out.size == (308, 196)
    assert prepare_image(buf.getvalue(), ImageGrid(16, 2, 3136, 10**7)).size == (288, 192)
    r, g, b = out.getpixel((5, 5))
    assert r > 200 and g < 60
    rgba = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    assert prepare_image(rgba, QWEN25).getpixel((0, 0)) == (255, 255, 255)
    assert prepare_image(Image.new("L", (56, 56)), QWEN25).mode == "RGB"
    big = prepare_image(Image.new("RGB", (4000, 3000)), QWEN25)
    assert big.width * big.height <= 1_003_520 and QWEN25.tokens(big) == big.width * big.height // 784
    assert big.info[PREPARED] == QWEN25.key and prepare_image(big, QWEN25) is big  # prepared once
    again = prepare_image(big, QWEN3)  # another model's grid: prepared for it
    assert again is not big and again.width % 32 == 0 and again.info[PREPARED] == QWEN3.key


def test_one_resample_per_image(monkeypatch):
    calls = []
    resize = Image.Image.resize

    def counting(self, *args, **kwargs):
        calls.append(self.size)
        return resize(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", counting)
    img = prepare_image(Image.new("RGB", (640, 481)), QWEN3)
    prepare_image(img, QWEN3)
    assert len(calls) == 1
    prepare_image(Image.new("RGB", (640, 480)), QWEN3)  # already on the grid: no resample at all
    assert len(calls) == 1


def test_preprocess_ahead_keeps_order_and_reports_bad_items():
    good = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(good, format="PNG")
    items = [good.getvalue(), b"not an image", good.getvalue()] * 5
    out = list(preprocess_ahead(items, QWEN25, workers=2, ahead=3))
    assert [p.item for p in out] == items
    assert [p.ok for p in out] == [True, False, True] * 5
    assert "cannot identify image" in out[1].error
    assert out[0].value.size == (56, 56)


def test_map_ahead_runs_at_most_ahead_items_in_flight():
    started = []
    lock = threading.Lock()

    def work(x):
        with lock:
            started.append(x)
        return x * 2

    consumed = []
    for p in map_ahead(work, range(20), workers=2, ahead=4):
        consumed.append(p.value)
        with lock:
            assert len(started) <= len(consumed) + 4
    assert consumed == [2 * i for i in range(20)]
    assert [p.value for p in map_ahead(work, range(5), workers=0)] == [0, 2, 4, 6, 8]


def test_degenerate_images_are_clear_errors():
    with pytest.raises(ValueError, match="aspect ratio"):
        QWEN25.fit(5000, 10)
    with pytest.raises(ValueError, match="no pixels"):
        QWEN3.fit(0, 10)
    with pytest.raises(ValueError, match="min_pixels"):
        ImageGrid(16, 2, 5000, 4000)
