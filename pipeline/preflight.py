"""Before the first unit: does every model path and endpoint a stage's engines need exist (or answer)?

A missing checkpoint folder, a hub name that cannot be found offline, or an openai server that does not answer
would otherwise fail every shard in turn (a dead server after retrying every row). `check_engines` reports the
first such problem of a stage as one PipelineError line, before anything is claimed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from pipeline.config import EngineConfig, RunConfig
from pipeline.errors import PipelineError
from pipeline.redact import url_without_credentials
from pipeline.resources import resolve_resource, stage_reference
from pipeline.stage import Stage

MODEL_FREE = ("noop", "nano-rule")
ENDPOINT_TIMEOUT_S = 10.0


class EngineUnreachable(PipelineError):
    """A model path or endpoint a stage needs is missing or does not answer."""


def check_engines(declared: Stage, config: RunConfig) -> None:
    """Raise EngineUnreachable naming the setting, for the first engine of the stage that cannot work."""
    if declared.engines is None:
        return
    checked: set[str] = set()
    for setting, cfg in declared.engines(config).items():
        ident = cfg.model_dump_json()
        if ident in checked:
            continue
        checked.add(ident)
        problem = engine_problem(setting, cfg)
        if problem:
            raise EngineUnreachable(f"stage {declared.name!r}: {problem}; nothing was run")


def engine_problem(setting: str, cfg: EngineConfig) -> str | None:
    """What keeps this engine from starting, in words, or None."""
    if cfg.backend in MODEL_FREE:
        return None
    if cfg.backend == "openai":
        return endpoint_problem(setting, cfg)
    if cfg.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        return f"{setting}: the vllm backend needs the vllm package, which this python lacks " \
               "(tools/setup_vllm_cpu.sh makes a CPU environment with it)"
    if not cfg.model:
        return f"{setting}.model is not set"
    if stage_reference(cfg.model) is not None or "://" in cfg.model:
        return None  # another stage's artifact (checked as that input) or a remote path
    path = Path(os.path.expanduser(resolve_resource(cfg.model)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"{setting}.model {cfg.model!r} is a folder without config.json, not a checkpoint"
        return None
    if path.exists():
        return f"{setting}.model {cfg.model!r} is a file, not a checkpoint folder"
    if _looks_like_path(cfg.model):
        return f"{setting}.model {cfg.model!r} does not exist (looked in {path.resolve()})"
    return _hub_problem(setting, cfg)


def endpoint_problem(setting: str, cfg: EngineConfig) -> str | None:
    """None when the server answers GET /models (any HTTP answer but 401/403 counts)."""
    import httpx

    from pipeline.engines.openai import OpenAIEngine, transport_error

    engine = OpenAIEngine(cfg)
    shown = f"{engine.endpoint}/models"
    try:
        resp = httpx.get(f"{engine.base_url}/models", params=engine.params or None,
                         headers={"Authorization": f"Bearer {engine.api_key}"},
                         timeout=min(cfg.timeout_s, ENDPOINT_TIMEOUT_S))
    except httpx.TimeoutException:
        return f"{setting}: the openai server {url_without_credentials(cfg.base_url)} did not answer GET {shown} " \
               f"within {min(cfg.timeout_s, ENDPOINT_TIMEOUT_S):g}s"
    except httpx.HTTPError as exc:
        return f"{setting}: cannot reach the openai server {url_without_credentials(cfg.base_url)} " \
               f"({transport_error(exc)})"
    if resp.status_code in (401, 403):
        return f"{setting}: the openai server refused GET {shown} (HTTP {resp.status_code}): check ${cfg.api_key_env}"
    return None


def _looks_like_path(model: str) -> bool:
    """A local path rather than a hub name ('org/name'): relative or absolute markers, or more than one '/'."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model


def _hub_problem(setting: str, cfg: EngineConfig) -> str | None:
    """A hub name: fine online (the engine downloads it); offline, it must be in the local cache."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(cfg.model, "config.json", revision=cfg.revision)
    if isinstance(found, str):
        return None
    return f"{setting}.model {cfg.model!r} is neither a local folder nor in the Hugging Face cache (the hub is " \
           "off: HF_HUB_OFFLINE)"
