"""Helpers shared by the model backends: checkpoint identity, message flattening, token pieces."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


class ModelLoadError(PipelineError):
    """The engine's model directory is missing or not a loadable checkpoint."""


def weights_hash(path: str | Path) -> str:
    """sha256 over config.json and the weight files of a checkpoint directory (first 16 hex digits)."""
    root = Path(path)
    files = sorted([*root.glob("*.safetensors"), *root.glob("*.bin"), *root.glob("config.json")])
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def model_identity(path: str, revision: str | None, label: str | None = None) -> str:
    """Provenance string: name@revision, or name#sha256:<hash of the weights> for a local directory, where
    name is the model as configured (`label`), not the path it resolved to: the same model gives the same
    id from any working directory."""
    name = label or path
    if revision:
        return f"{name}@{revision}"
    if Path(path).is_dir():
        return f"{name}#sha256:{weights_hash(path)}"
    return name


def text_only(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with list contents flattened to strings (for text-only chat templates)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        out.append({**m, "content": content})
    return out


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded string, decoded incrementally with a few tokens of context
    (so tokenizers that drop a word's leading space when it is decoded alone still spell the string; a
    character split over byte tokens belongs to the token that completes it; special tokens add nothing)."""
    pieces: list[str] = []
    prefix, read = 0, 0
    for k in range(len(ids)):
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=True)
        after = tokenizer.decode(ids[prefix:k + 1], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            pieces.append(after[len(before):])
            prefix, read = read, k + 1
        else:
            pieces.append("")
    return pieces


def template_options(owner: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The chat-template options that `owner`'s template (a tokenizer's or a processor's) names. An option a
    template never reads changes nothing, and a processor takes one it does not know for its own `__call__`
    and warns on every prompt (transformers >= 5.25), e.g. the readers' default `enable_thinking` with a model
    that has no thinking mode."""
    template = getattr(owner, "chat_template", None)
    if not options or template is None:
        return dict(options)
    text = " ".join(map(str, template.values())) if isinstance(template, dict) else str(template)
    return {name: value for name, value in options.items() if name in text}
