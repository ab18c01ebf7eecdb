"""Image bytes -> (original size, engine-ready image) for one row, or a clear per-row error; re-encoding."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps

from pipeline.engines.grid import ImageGrid
from pipeline.engines.preprocess import prepare_image


@dataclass
class DecodedImage:
    """A prepared image (None on failure), the displayed size of the original, and the error text."""

    image: Image.Image | None
    width: int | None = None
    height: int | None = None
    error: str | None = None


def open_upright(data: bytes) -> Image.Image:
    """Decode fully and apply the EXIF orientation (raises on a broken image)."""
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        return ImageOps.exif_transpose(opened) or opened.copy()


def decode_image(data: bytes | None, grid: ImageGrid) -> DecodedImage:
    """Decode and turn upright once, record the upright size, then the engines' shared `prepare_image` (RGB,
    resized to the captioner's grid); the result is marked prepared, so the engine uses it as it is."""
    if data is None:
        return DecodedImage(None, error="sample has no image file")
    try:
        img = open_upright(data)
        width, height = img.size
        return DecodedImage(prepare_image(img, grid, upright=True), width, height)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this row's error
        return DecodedImage(None, error=f"cannot decode image ({len(data)} bytes): {type(exc).__name__}: {exc}")


def encode_image(data: bytes, fmt: str, quality: int = 95) -> bytes:
    """Re-encode original image bytes (upright, RGB, full size) as jpg, png or webp (for `reencode`)."""
    img = open_upright(data)
    if img.mode != "RGB":
        img = img.convert("RGB")
    buf = io.BytesIO()
    pil_fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    kwargs = {"quality": quality} if pil_fmt in ("JPEG", "WEBP") else {}
    img.save(buf, format=pil_fmt, **kwargs)
    return buf.getvalue()
