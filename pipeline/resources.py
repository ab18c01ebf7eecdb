"""Where the repository's own resources are (models/, manifests/): the one place that knows the checkout layout."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import EngineConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout (or installed tree) that holds pipeline/, stages/, models/ and manifests/."""


def repo_path(*parts: str) -> Path:
    """A path inside the repository, e.g. repo_path("models", "nano") or repo_path("manifests/demo.yaml")."""
    return REPO_ROOT.joinpath(*parts)


def resolve_resource(path: str) -> str:
    """`path` as given when it exists (or is a URL / hub name), else the same relative path inside the
    repository when that exists, so the demo manifest's `models/nano/...` works from any working directory."""
    if not path or "://" in path or Path(path).is_absolute() or Path(path).exists():
        return path
    in_repo = REPO_ROOT / path
    return str(in_repo) if in_repo.exists() else path


def stage_reference(model: str) -> tuple[str, str] | None:
    """(stage, unit) when a model names a whole-run stage's artifact: 'train:latest' (the unit 'all') or
    'train:<unit>'; None for a path or hub name."""
    stage, sep, unit = model.partition(":")
    if not sep or "/" in stage or not stage.isidentifier() or "//" in unit:
        return None
    return stage, "all" if unit in ("", "latest") else unit


def resolve_model(cfg: EngineConfig) -> EngineConfig:
    """The engine config with its model path resolved by `resolve_resource`."""
    model = resolve_resource(cfg.model)
    return cfg if model == cfg.model else cfg.model_copy(update={"model": model, "label": cfg.label or cfg.model})
