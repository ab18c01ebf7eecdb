"""The image grid a vision-language model works on: patch size x merge size, and the pixel budget.

Qwen2.5-VL cuts an image into 14 px patches and merges 2 x 2 of them into one token (a 28 px grid);
Qwen3-VL uses 16 px patches (a 32 px grid). An image whose sides are multiples of the grid and whose
area is within the budget passes through the model's processor unchanged, so resizing it once to
`ImageGrid.fit` is the only resample it gets. `ImageGrid.from_processor` is the one reader of a
processor's patch and merge sizes; engines expose the result as `image_grid`, and stages take it
from there (or, before a model is loaded, from `load_grid`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import EngineConfig


@dataclass(frozen=True)
class ImageGrid:
    """Patch size, merge size and the [min_pixels, max_pixels] budget of one model's images.

    patch = merge = 1 means "no grid": only the pixel budget applies (text-only engines, servers whose
    processor is unknown, models without a Qwen-style grid); their processor keeps its own sizing.
    """

    patch: int
    merge: int
    min_pixels: int
    max_pixels: int

    def __post_init__(self) -> None:
        if self.patch < 1 or self.merge < 1:
            raise ValueError(f"image grid: patch {self.patch} and merge {self.merge} must be >= 1")
        if not 1 <= self.min_pixels <= self.max_pixels:
            raise ValueError(f"image grid: need 1 <= min_pixels ({self.min_pixels}) <= max_pixels ({self.max_pixels})")

    @property
    def factor(self) -> int:
        """Side of one visual token in pixels (patch x merge): 28 for Qwen2.5-VL, 32 for Qwen3-VL."""
        return self.patch * self.merge

    @property
    def native(self) -> bool:
        """Whether this is a model's own grid (not the budget-only stand-in)."""
        return self.factor > 1

    @property
    def key(self) -> tuple[int, int, int]:
        """What a prepared image is marked with: (min_pixels, max_pixels, factor)."""
        return self.min_pixels, self.max_pixels, self.factor

    def fit(self, height: int, width: int) -> tuple[int, int]:
        """Target (height, width): multiples of `factor`, area within the budget, aspect ratio kept (the
        arithmetic of the Qwen processors' `smart_resize`, so a fitted image is not resized again)."""
        if height <= 0 or width <= 0:
            raise ValueError(f"image has no pixels ({width}x{height})")
        if max(height, width) / min(height, width) > 200:
            raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is too extreme")
        f = self.factor
        h = max(f, round(height / f) * f)
        w = max(f, round(width / f) * f)
        if h * w > self.max_pixels:
            scale = math.sqrt(height * width / self.max_pixels)
            h = max(f, math.floor(height / scale / f) * f)
            w = max(f, math.floor(width / scale / f) * f)
        elif h * w < self.min_pixels:
            scale = math.sqrt(self.min_pixels / (height * width))
            h = math.ceil(height * scale / f) * f
            w = math.ceil(width * scale / f) * f
        return h, w

    def patches(self, height: int, width: int) -> int:
        """Vision-tower patches of an image of this size after `fit`."""
        h, w = self.fit(height, width)
        return (h // self.patch) * (w // self.patch)

    def tokens(self, image: Any) -> int:
        """Visual tokens the model spends on `image` (a PIL image or a (width, height) size), after `fit`."""
        width, height = image if isinstance(image, tuple) else image.size
        return self.patches(height, width) // (self.merge * self.merge)

    def processor_kwargs(self) -> dict[str, Any]:
        """The budget in the form the Qwen image processors read (`size` with shortest/longest edge in pixels);
        empty without a native grid."""
        if not self.native:
            return {}
        return {"size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}}

    def apply_to(self, processor: Any) -> None:
        """Set this budget as the default of `processor` (a processor or an image processor), so every call
        that does not pass one (a trainer's, say) resizes to it."""
        image_processor = getattr(processor, "image_processor", processor)
        kwargs = self.processor_kwargs()
        if kwargs and image_processor is not None and hasattr(image_processor, "size"):
            image_processor.size = dict(kwargs["size"])

    @classmethod
    def budget_only(cls, config: EngineConfig) -> ImageGrid:
        """No grid, only the engine config's pixel budget."""
        return cls(1, 1, config.min_pixels, config.max_pixels)

    @classmethod
    def from_processor(cls, processor: Any, config: EngineConfig) -> ImageGrid:
        """The grid of a model's processor (or image processor) with the engine config's pixel budget; budget
        only when the processor has no patch/merge sizes."""
        image_processor = getattr(processor, "image_processor", processor)
        patch = getattr(image_processor, "patch_size", None)
        merge = getattr(image_processor, "merge_size", None)
        if not isinstance(patch, int) or not isinstance(merge, int):
            return cls.budget_only(config)
        return cls(patch, merge, config.min_pixels, config.max_pixels)


def load_grid(config: EngineConfig) -> ImageGrid:
    """The grid of the model an engine config names, read from its image processor's settings without
    loading weights: `processor` if set, else `model` for the local backends (hf, vllm) and for openai when
    it is a folder (a served name is no hub name: it is never looked up). Budget only for text-only and
    model-less backends, or when no image processor is found."""
    source = config.processor
    if not source and (config.backend in ("hf", "vllm") or config.backend == "openai" and Path(config.model).is_dir()):
        source = config.model
    if not source:
        return ImageGrid.budget_only(config)
    from transformers import AutoImageProcessor

    # A folder or a hub name already in the local cache is read offline; only an `org/name` hub id that is not
    # cached yet is looked up online (a bare word such as a test's stand-in name never reaches the hub client).
    attempts = [True] + ([False] if "/" in source and not Path(source).exists() else [])
    for local_only in attempts:
        try:
            image_processor = AutoImageProcessor.from_pretrained(source, revision=config.revision,
                                                                 local_files_only=local_only)
        except (OSError, ValueError, KeyError, TypeError):  # text-only model, not cached, or no such model
            continue
        return ImageGrid.from_processor(image_processor, config)
    return ImageGrid.budget_only(config)
