"""The shared image preprocessing and the pool that runs it ahead of an engine."""

from __future__ import annotations

import io
import threading

import pytest
from PIL import Image

from pipeline.engines.preprocess import fit_pixels, image_tokens, map_ahead, prepare_image, preprocess_ahead


@pytest.mark.parametrize("h,w", [(112, 112), (1080, 1920), (3000, 4000), (10, 10), (50, 700), (4321, 30)])
def test_fit_pixels_multiples_of_28_within_budget(h, w):
    th, tw = fit_pixels(h, w, min_pixels=3136, max_pixels=200_704)
    assert th % 28 == 0 and tw % 28 == 0
    assert 3136 <= th * tw <= 200_704
    if min(h, w) >= 28 * 4:
        assert abs(th / tw - h / w) / (h / w) < 0.15


def test_prepare_image_decodes_orients_and_converts():
    img = Image.new("RGB", (300, 200), (10, 200, 30))
    img.paste((255, 0, 0), (0, 0, 50, 50))  # a red marker top-left
    sideways = img.rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    sideways.save(buf, format="JPEG", exif=exif, quality=95)
    out = prepare_image(buf.getvalue(), min_pixels=3136, max_pixels=10**7)
    assert out.mode == "RGB" and out.size == (308, 196)
    r, g, b = out.getpixel((5, 5))
    assert r > 200 and g < 60
    rgba = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    assert prepare_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert prepare_image(Image.new("L", (56, 56))).mode == "RGB"
    big = prepare_image(Image.new("RGB", (4000, 3000)), max_pixels=1_003_520)
    assert big.width * big.height <= 1_003_520 and image_tokens(big) == big.width * big.height // 784


def test_preprocess_ahead_keeps_order_and_reports_bad_items():
    good = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(good, format="PNG")
    items = [good.getvalue(), b"not an image", good.getvalue()] * 5
    out = list(preprocess_ahead(items, workers=2, ahead=3))
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
        fit_pixels(5000, 10, 3136, 200_704)
    with pytest.raises(ValueError, match="no pixels"):
        fit_pixels(0, 10, 3136, 200_704)
