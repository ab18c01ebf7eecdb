"""Image bytes -> an engine-ready PIL image, or the reason it cannot be one."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from PIL import Image

from pipeline.engines.grid import ImageGrid
from pipeline.engines.preprocess import prepare_image


@dataclass
class LoadedImage:
    """A prepared image (None on failure), the sha256 of its bytes, and the error text."""

    image: Image.Image | None
    sha256: str | None = None
    error: str | None = None


def load_image(data: bytes | None, grid: ImageGrid) -> LoadedImage:
    """Decode (EXIF-upright, RGB) and resize to the engine's image grid with the engines' `prepare_image`."""
    if data is None:
        return LoadedImage(None, error="sample has no image file")
    digest = hashlib.sha256(data).hexdigest()
    try:
        return LoadedImage(prepare_image(data, grid), digest)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this image's error
        return LoadedImage(None, digest, f"cannot decode image ({len(data)} bytes): {type(exc).__name__}: {exc}")
