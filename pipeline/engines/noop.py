"""An engine that returns a fixed text instantly: measures pipeline overhead, drives mechanics tests."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.config import EngineConfig
from pipeline.engines.base import ChatRequest, Generation, Sampling
from pipeline.engines.grid import ImageGrid


class NoopEngine:
    def __init__(self, config: EngineConfig):
        self.text = config.noop_text
        self.model_id = f"noop:{self.text[:32]}"
        self.image_grid = ImageGrid.budget_only(config)

    def generate(self, requests: Sequence[ChatRequest], params: Sampling) -> list[list[Generation]]:
        gen = Generation(text=self.text, finish_reason="stop", num_tokens=len(self.text.split()))
        return [[gen] * params.n for _ in requests]

    def score_choices(self, requests: Sequence[ChatRequest], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        return [[0.0] * len(c) for c in choices]

    def close(self) -> None:
        pass
