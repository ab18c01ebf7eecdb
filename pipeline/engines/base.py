"""The engine interface every backend implements, and the factory that builds one from an EngineConfig."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from PIL import Image

from pipeline.config import EngineConfig, SamplingConfig


@dataclass
class ChatRequest:
    """OpenAI-style chat messages plus the PIL images they refer to (in order of appearance).

    A message's content is a string, or a list of parts {"type": "text", "text": ...} / {"type": "image"}.
    `prefill` starts the assistant turn (e.g. "The answer is"); generation continues after it.
    """

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    prefill: str = ""


def image_messages(prompt: str) -> list[dict[str, Any]]:
    """One user turn: an image, then the prompt (captioning, MCQ generation)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def image_request(prompt: str, image: Image.Image) -> ChatRequest:
    """The request for one image under `prompt` (see image_messages)."""
    return ChatRequest(messages=image_messages(prompt), images=[image])


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0
    n: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    """Return each generated token's text and the log-probability the model gave it (Generation.tokens):
    the model's own distribution, before temperature and top-p (see pipeline.abstain)."""

    @classmethod
    def from_config(cls, cfg: SamplingConfig, **overrides: Any) -> Sampling:
        return cls(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                   repetition_penalty=cfg.repetition_penalty, n=cfg.n, seed=cfg.seed, **overrides)


@dataclass(frozen=True)
class Generation:
    """One sampled continuation."""

    text: str
    finish_reason: Literal["stop", "length", "error"] = "stop"
    num_tokens: int = 0
    error: str | None = None
    tokens: tuple[tuple[str, float], ...] | None = None
    """With Sampling(logprobs=True): (text piece, log-probability) per token, the pieces spelling `text`."""


@runtime_checkable
class Engine(Protocol):
    """A model backend. Backends that take images also expose `image_grid` (a pipeline.engines.grid.ImageGrid:
    the model's patch x merge grid and the configured pixel budget), which stages resize images to, once."""

    model_id: str
    """Provenance: model path or name plus revision/content hash."""

    def generate(self, requests: Sequence[ChatRequest], params: Sampling) -> list[list[Generation]]:
        """params.n generations per request, in request order."""
        ...

    def score_choices(self, requests: Sequence[ChatRequest], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        """Summed log-likelihood of each candidate continuation after each request's prompt (+prefill)."""
        ...

    def close(self) -> None: ...


BACKENDS: dict[str, str] = {
    "hf": "pipeline.engines.hf:HFEngine",
    "vllm": "pipeline.engines.vllm:VLLMEngine",
    "openai": "pipeline.engines.openai:OpenAIEngine",
    "noop": "pipeline.engines.noop:NoopEngine",
    "nano-rule": "pipeline.nano.rule_reader:RuleReaderEngine",
}


def create_engine(config: EngineConfig) -> Engine:
    """Build the backend named by config.backend."""
    module_name, _, cls_name = BACKENDS[config.backend].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(config)
