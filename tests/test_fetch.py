"""The guard in front of img2dataset's decoder and the classification of its error messages (no network)."""

from __future__ import annotations

import io

import pytest
from imageserver import bomb_png, image_bytes
from PIL import Image

from stages.download.fetch import GuardedResizer, classify, precheck, sniff


@pytest.mark.parametrize("fmt,kind", [("jpg", "jpeg"), ("png", "png"), ("webp", "webp")])
def test_good_images_pass(fmt, kind):
    data = image_bytes(f"any-{fmt}", fmt)
    assert sniff(data) == kind
    assert precheck(data, 1e9) is None


def test_gif_and_unknown_binary_pass_to_the_decoder():
    buf = io.BytesIO()
    Image.new("RGB", (10, 10), "red").save(buf, "GIF")
    assert precheck(buf.getvalue(), 1e9) is None
    assert precheck(bytes(range(256)) * 4, 1e9) is None  # unknown binary: the decoder decides


@pytest.mark.parametrize("body,reason", [
    (b"", "empty_body"),
    (b"<!DOCTYPE html><html><body>404</body></html>", "not_an_image"),
    (b"  \n<?xml version='1.0'?><svg/>", "not_an_image"),
    (b"Access denied. Please log in.", "not_an_image"),
    (image_bytes("t", "jpg")[:300], "decode_error"),
    (image_bytes("t", "png")[:-20], "decode_error"),
    (image_bytes("t", "webp")[:-10], "decode_error"),
    (bomb_png(), "too_large"),
    (bomb_png(12_000, 12_000), "too_large"),  # under PIL's bomb error, over our pixel limit
])
def test_bad_bodies_get_a_reason(body, reason):
    message = precheck(body, 89_478_485)
    assert message is not None and message.startswith(reason + ": ")
    assert classify(message) == reason


def test_guarded_resizer_refuses_before_decoding_and_resizes_otherwise():
    resizer = GuardedResizer(image_size=32, resize_mode="keep_ratio", resize_only_if_bigger=True,
                             encode_format="jpg", max_decode_pixels=10_000)
    out = resizer(io.BytesIO(bomb_png(200, 200)))
    assert out[0] is None and out[-1].startswith("too_large")
    img, width, height, ow, oh, err = resizer(io.BytesIO(image_bytes("ok", "png")))
    assert err is None and (ow, oh) == (64, 48) and min(width, height) == 32
    assert Image.open(io.BytesIO(img)).format == "JPEG"


@pytest.mark.parametrize("message,reason", [
    (None, None),
    ("HTTP Error 404: Not Found", "http_404"),
    ("HTTP Error 503: Service Unavailable", "http_5xx"),
    ("HTTP Error 429: Too Many Requests", "http_429"),
    ("HTTP Error 403: Forbidden", "http_4xx"),
    ("timed out", "timeout"),
    ("<urlopen error timed out>", "timeout"),
    ("The read operation timed out", "timeout"),
    ("<urlopen error [Errno 111] Connection refused>", "connection_refused"),
    ("<urlopen error [Errno -2] Name or service not known>", "dns_error"),
    ("Remote end closed connection without response", "connection_error"),
    ("unknown url type: 'ftp'", "invalid_url"),
    ("Use of image disallowed by X-Robots-Tag directive", "opted_out"),
    ("image too small", "too_small"),
    ("image area too large", "too_large"),
    ("aspect ratio too large", "bad_aspect_ratio"),
    ("Image decoding error", "decode_error"),
    ("something nobody expected", "other"),
])
def test_classify(message, reason):
    assert classify(message) == reason


def test_rows_without_a_usable_url_fail_without_a_request(tmp_path):
    from stages.download.fetch import FetchOptions, fetch

    out = fetch([0, 1, 2], [None, "", "not a url"], FetchOptions(), str(tmp_path))
    assert out.column("row").to_pylist() == [0, 1, 2]
    assert out.column("error").to_pylist() == ["invalid_url"] * 3
    assert not (tmp_path / "in").exists()  # img2dataset was never started
