"""Image bytes -> an RGB PIL image ready for a VLM processor, or a clear per-row error."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image, ImageOps


@dataclass
class DecodedImage:
    """A decoded image (None on failure), its displayed size before resizing, and the error text."""

    image: Image.Image | None
    width: int | None = None
    height: int | None = None
    error: str | None = None


def decode_image(data: bytes, max_pixels: int | None = None) -> DecodedImage:
    """Decode fully, apply EXIF orientation, convert to RGB (alpha over white), downscale to <= max_pixels."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            img = ImageOps.exif_transpose(opened)
            width, height = img.size
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, (255, 255, 255))
                img.paste(rgba, mask=rgba.getchannel("A"))
            elif img.mode != "RGB":
                img = img.convert("RGB")
            else:
                img = img.copy()
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this row's error
        return DecodedImage(None, error=f"cannot decode image ({len(data)} bytes): {type(exc).__name__}: {exc}")
    if max_pixels and width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
    return DecodedImage(img, width, height)


def encode_image(img: Image.Image, fmt: str, quality: int = 95) -> bytes:
    """Re-encode an image (for `reencode`): jpg, png or webp."""
    buf = io.BytesIO()
    pil_fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    kwargs = {"quality": quality} if pil_fmt in ("JPEG", "WEBP") else {}
    img.save(buf, format=pil_fmt, **kwargs)
    return buf.getvalue()
