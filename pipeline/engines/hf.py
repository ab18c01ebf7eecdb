"""transformers backend: batched `generate` and batched choice scoring for any local checkpoint.

Requests are encoded one by one (chat template + prefill, images through `prepare_image` and the
model's processor), sorted by length and cut into batches bounded by `EngineConfig.batch_size`
and `max_batch_tokens`; each batch is left-padded and run in one call. Results come back in
request order. Works with any AutoModelForImageTextToText or AutoModelForCausalLM directory.
"""

from __future__ import annotations

import inspect
import io
import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from pipeline.abstain import spelling
from pipeline.config import EngineConfig
from pipeline.engines.base import ChatRequest, Generation, Sampling
from pipeline.engines.common import ModelLoadError, model_identity, template_options, text_only, token_pieces
from pipeline.engines.grid import ImageGrid
from pipeline.engines.memory import free_gpu_bytes, row_cost, rows_that_fit
from pipeline.engines.prefix import PrefixPlan, plan_prefixes
from pipeline.engines.preprocess import prepare_image

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_WIDTH_BUCKET = 64
"""With `compile`, batch widths are padded up to a multiple of this (fewer distinct shapes to compile)."""


def _out_cache(output: Any) -> Any:
    """The KV cache of a model output (named `cache` in recent transformers, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class ChosenLogprobs(LogitsProcessor):
    """Records the log-probability of every token `generate` picks, from the logits as they reach it
    (after a repetition penalty, before temperature and top-p): one [rows, vocab] distribution is held at
    a time, and the next call (whose input ends with the picked token) reads the pick's share of it."""

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None
        self.picked: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.picked.append(self.previous.gather(1, input_ids[:, -1:].to(self.previous.device)).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def result(self, new_ids: torch.Tensor) -> torch.Tensor:
        """[rows, new tokens] log-probabilities of `new_ids` (the last pick read here)."""
        if self.previous is not None and len(self.picked) < new_ids.shape[1]:
            last = new_ids[:, len(self.picked)].to(self.previous.device)
            self.picked.append(self.previous.gather(1, last[:, None]).squeeze(1))
        self.previous = None
        if not self.picked:
            return torch.zeros(new_ids.shape, dtype=torch.float32)
        out = torch.stack(self.picked, dim=1).cpu()
        return torch.nn.functional.pad(out, (0, new_ids.shape[1] - out.shape[1]))


class HFEngine:
    """The `hf` backend (see the module docstring)."""

    def __init__(self, config: EngineConfig):
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        self.config = config
        path = config.model
        if not path or not Path(path).is_dir() and not config.revision:
            raise ModelLoadError(f"hf engine: model directory not found: {path!r}")
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto"
                                   else config.device)
        try:
            model_config = AutoConfig.from_pretrained(path, revision=config.revision)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"hf engine: cannot read a model config in {path!r}: {exc}") from None
        self.is_vl = model_config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        if config.dtype == "auto":
            dtype: Any = torch.float32 if self.device.type == "cpu" else "auto"
        else:
            dtype = _DTYPES[config.dtype]
        auto_model = AutoModelForImageTextToText if self.is_vl else AutoModelForCausalLM
        self.model = auto_model.from_pretrained(path, revision=config.revision, dtype=dtype).to(self.device).eval()
        if self.is_vl:
            self.processor = AutoProcessor.from_pretrained(path, revision=config.revision)
            self.tokenizer = self.processor.tokenizer
            self.image_grid = ImageGrid.from_processor(self.processor, config)
            self.image_grid.apply_to(self.processor)  # the budget as the processor's default, set once
        else:
            self.processor = None
            self.tokenizer = AutoTokenizer.from_pretrained(path, revision=config.revision)
            self.image_grid = ImageGrid.budget_only(config)
        self._template_kwargs = template_options(self.processor or self.tokenizer, config.chat_template_kwargs or {})
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id = int(self.tokenizer.pad_token_id)
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        if self.tokenizer.eos_token_id is not None:
            eos_ids.append(self.tokenizer.eos_token_id)
        self.eos_ids = sorted({int(e) for e in eos_ids if e is not None})
        self.model_id = model_identity(path, config.revision, config.label)
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._row_cost = row_cost(self.model.config, next(self.model.parameters()).element_size())

    # -- encoding -----------------------------------------------------------------------------------
    def prompt_text(self, request: ChatRequest) -> str:
        """The chat-templated prompt with the generation prompt and the request's prefill."""
        messages = request.messages if self.is_vl else text_only(request.messages)
        template_owner = self.processor if self.processor is not None else self.tokenizer
        text = template_owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  **self._template_kwargs)
        return text + request.prefill

    def encode(self, request: ChatRequest) -> dict[str, torch.Tensor]:
        """Tensors for one request (batch dimension 1), images through the shared preprocessing."""
        text = self.prompt_text(request)
        if request.images and not self.is_vl:
            raise ValueError(f"request has {len(request.images)} image(s) but {self.model_id} is a text-only model")
        if self.is_vl and request.images:
            images = [prepare_image(im, self.image_grid) for im in request.images]
            enc = self.processor(text=[text], images=images, return_tensors="pt")
        elif self.is_vl:
            enc = self.processor(text=[text], return_tensors="pt")
        else:
            enc = self.tokenizer([text], return_tensors="pt", add_special_tokens=False)
        return dict(enc)

    def encode_many(self, requests: Sequence[ChatRequest]) -> list[dict[str, torch.Tensor]]:
        """`encode` for many requests; text-only requests are tokenized in one batched call."""
        if self.is_vl or any(r.images for r in requests):
            return [self.encode(r) for r in requests]
        ids = self.tokenizer([self.prompt_text(r) for r in requests], add_special_tokens=False)["input_ids"]
        return [{"input_ids": torch.tensor([row]), "attention_mask": torch.ones((1, len(row)), dtype=torch.long)}
                for row in ids]

    def _collate(self, encs: Sequence[dict[str, torch.Tensor]], extra: Sequence[list[int]] | None = None,
                 multiple: int = 1) -> dict[str, torch.Tensor]:
        """Left-pad per-request encodings (plus optional extra token ids per row) into one batch,
        its width rounded up to `multiple`."""
        rows = []
        for i, enc in enumerate(encs):
            ids = enc["input_ids"][0]
            add = torch.tensor(extra[i], dtype=ids.dtype) if extra else ids.new_zeros(0)
            rows.append((enc, torch.cat([ids, add]), len(add)))
        width = -(-max(len(ids) for _, ids, _ in rows) // multiple) * multiple
        batch: dict[str, torch.Tensor] = {}
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        seq_keys = [k for k, v in encs[0].items()
                    if k not in ("input_ids", "attention_mask") and v.dim() == 2 and v.shape[1] == encs[0]["input_ids"].shape[1]]
        seq = {k: torch.zeros((len(rows), width), dtype=encs[0][k].dtype) for k in seq_keys}
        for r, (enc, ids, n_add) in enumerate(rows):
            input_ids[r, width - len(ids):] = ids
            mask[r, width - len(ids):] = 1
            for k in seq_keys:
                values = enc[k][0]
                if n_add:
                    values = torch.cat([values, values.new_zeros(n_add)])
                seq[k][r, width - len(ids):] = values
        batch["input_ids"] = input_ids
        batch["attention_mask"] = mask
        batch.update(seq)
        other = {k for enc in encs for k in enc} - {"input_ids", "attention_mask", *seq_keys}
        for k in sorted(other):
            parts = [enc[k] for enc in encs if k in enc]
            batch[k] = torch.cat(parts, dim=0)
        if not self.is_vl:
            batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _batches(self, lengths: Sequence[int], per_row_extra: int = 0, rows_per_item: int = 1,
                 encs: Sequence[dict[str, torch.Tensor]] | None = None, patches: Sequence[int] | None = None,
                 budget: int | None = None) -> list[list[int]]:
        """Indices sorted by length, cut by batch_size and max_batch_tokens (padded tokens incl. new ones)
        and by the rows that fit in a memory `budget` in bytes (see `memory_budget`; `patches`: image
        patches per index, for the vision tower's share).

        With prefix sharing on and text-only `encs` (one per index), indices are sorted by their
        tokens instead, so rows that share a prefix (the draws of one caption) land in one batch.
        """
        if encs is not None and self.config.share_prefix and not self.is_vl:
            keys = [tuple(e["input_ids"][0].tolist()) for e in encs]
            order = sorted(range(len(lengths)), key=lambda i: (keys[i], i))
        else:
            order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            width = max([lengths[j] for j in current] + [lengths[i]]) + per_row_extra
            rows = (len(current) + 1) * rows_per_item
            full = len(current) + 1 > self.config.batch_size or rows * width > self.config.max_batch_tokens
            if not full and budget is not None:
                most = max([patches[j] for j in current] + [patches[i]]) if patches else 0
                full = rows > rows_that_fit(budget, self._row_cost, width - per_row_extra, per_row_extra, most)
            if current and full:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    # -- generation ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, requests: Sequence[ChatRequest], params: Sampling) -> list[list[Generation]]:
        """params.n generations per request, in request order (text after the prefill)."""
        out: list[list[Generation]] = [[] for _ in requests]
        for b, (idx, picked) in enumerate(self._encoded_batches(requests, params, self.memory_budget())):
            recorder = ChosenLogprobs() if params.logprobs else None
            new = self._generate_batch(picked, params, b, recorder)
            logprobs = recorder.result(new) if recorder is not None else None
            for k, i in enumerate(idx):
                for s in range(params.n):
                    row = k * params.n + s
                    out[i].append(self._decode(new[row].tolist(), params,
                                               None if logprobs is None else logprobs[row].tolist()))
        return out

    def memory_budget(self) -> int | None:
        """Bytes one generation batch may use: `batch_memory` x free GPU memory now; None off-GPU or at 0."""
        free = free_gpu_bytes(self.device) if self.config.batch_memory > 0 else None
        return int(free * self.config.batch_memory) if free is not None else None

    def _encoded_batches(self, requests: Sequence[ChatRequest], params: Sampling, budget: int | None
                         ) -> Iterator[tuple[list[int], list[dict[str, torch.Tensor]]]]:
        """(request indices, their encodings) per batch.

        With `encode_ahead` (auto: on a GPU), requests with images are batched by an estimate of their
        length and encoded one batch ahead in a worker thread, so the processor's CPU work overlaps the
        decoding of the batch before. Otherwise every request is encoded first and batched by its
        exact length (text: by its tokens, for prefix sharing).
        """
        if not requests:
            return
        on = self.config.encode_ahead == "on" or (self.config.encode_ahead == "auto" and self.device.type == "cuda")
        if self.is_vl and on and any(r.images for r in requests):
            text_tokens: dict[str, int] = {}  # one template + tokenizer run per distinct prompt
            sizes = [self._estimate(r, text_tokens) for r in requests]
            batches = self._batches([n for n, _ in sizes], params.max_new_tokens, params.n,
                                    patches=[p for _, p in sizes], budget=budget)
            with ThreadPoolExecutor(1, thread_name_prefix="hf-encode") as pool:
                ahead = pool.submit(self.encode_many, [requests[i] for i in batches[0]])
                for b, idx in enumerate(batches):
                    picked = ahead.result()
                    if b + 1 < len(batches):
                        ahead = pool.submit(self.encode_many, [requests[i] for i in batches[b + 1]])
                    yield idx, picked
            return
        encs = self.encode_many(requests)
        lengths = [int(e["input_ids"].shape[1]) for e in encs]
        patches = [int(e["image_grid_thw"].prod(-1).sum()) if "image_grid_thw" in e else 0 for e in encs]
        for idx in self._batches(lengths, params.max_new_tokens, params.n, encs, patches, budget):
            yield idx, [encs[i] for i in idx]

    def _estimate(self, request: ChatRequest, text_tokens: dict[str, int] | None = None) -> tuple[int, int]:
        """(prompt tokens, image patches) of a request without running the processor: the template's
        text tokens plus each image's patches on the model's grid (a header read for bytes or paths)."""
        from PIL import Image

        grid = self.image_grid
        patches = tokens = 0
        for image in request.images:
            try:
                if isinstance(image, Image.Image):
                    w, h = image.size
                else:  # reads the header only
                    with Image.open(image if isinstance(image, str) else io.BytesIO(bytes(image))) as opened:
                        w, h = opened.size
                patches += grid.patches(h, w)
                tokens += grid.tokens((w, h))
            except Exception:  # noqa: BLE001 - a bad image fails in encode, with its own error
                continue
        memo = {} if text_tokens is None else text_tokens
        key = json.dumps([request.messages, request.prefill], sort_keys=True, default=str)
        if key not in memo:
            memo[key] = len(self.tokenizer(self.prompt_text(request), add_special_tokens=False)["input_ids"])
        return memo[key] - len(request.images) + tokens, patches  # one placeholder per image in the template

    def _generate_batch(self, picked: Sequence[dict[str, torch.Tensor]], params: Sampling, b: int,
                        recorder: ChosenLogprobs | None = None) -> torch.Tensor:
        """The new token ids of one batch: params.n rows per request, in order (`recorder`: also the
        log-probability of each chosen token)."""
        plan = self._plan(picked)
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens, "repetition_penalty": params.repetition_penalty,
            "pad_token_id": self.pad_id, "eos_token_id": self.eos_ids, "do_sample": params.temperature > 0,
        }
        if hasattr(self.model.generation_config, "disable_compile"):  # transformers >= 4.50
            kwargs["disable_compile"] = not self.config.compile
        if params.temperature > 0:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if recorder is not None:
            kwargs["logits_processor"] = LogitsProcessorList([recorder])
        if plan is not None:
            batch, cache, _ = self._run_plan(picked, plan, params.n)
            kwargs[self._cache_kw] = self._static(cache, batch["input_ids"].shape[1] + params.max_new_tokens)
        else:
            batch = self._collate(picked, multiple=COMPILE_WIDTH_BUCKET if self.config.compile else 1)
            batch.pop("position_ids", None)  # generate derives positions from the attention mask
            kwargs["num_return_sequences"] = params.n
            if self.config.compile:
                kwargs["cache_implementation"] = "static"
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(params.seed * 1_000_003 + b)
            seqs = self.model.generate(**batch, **kwargs)
        return seqs[:, batch["input_ids"].shape[1]:].cpu()

    # -- shared-prefix KV reuse ---------------------------------------------------------------------
    def _plan(self, encs: Sequence[dict[str, torch.Tensor]]) -> PrefixPlan | None:
        """A shared-prefix plan for text-only rows (see pipeline.engines.prefix), or None."""
        if not self.config.share_prefix or any(set(e) - {"input_ids", "attention_mask"} for e in encs):
            return None
        return plan_prefixes([e["input_ids"][0].tolist() for e in encs])

    def _static(self, cache: Any, max_len: int) -> Any:
        """The prefix cache copied into a preallocated StaticCache (decoding then writes in place
        instead of concatenating the whole cache every step); the dynamic cache if that fails."""
        if not self.config.static_cache:
            return cache
        try:
            from transformers import StaticCache

            static = StaticCache(config=self.model.config, max_cache_len=max_len)
            for layer, src in zip(static.layers, cache.layers, strict=True):
                layer.update(src.keys, src.values)
            return static
        except (AttributeError, TypeError, ValueError, ImportError):
            return cache

    def _run_plan(self, encs: Sequence[dict[str, torch.Tensor]], plan: PrefixPlan, n: int = 1,
                  extra: Sequence[list[int]] | None = None) -> tuple[dict[str, torch.Tensor], Any, int]:
        """Compute the shared spans once; return the full rows (repeated n times), their KV cache, cache length.

        Row layout: [common prefix][group middle, left-padded][own suffix (+extra), left-padded]; padding
        is masked and positions follow the attention mask, so each row sees exactly its own prompt.
        """
        dev = self.device
        rows = [e["input_ids"][0] for e in encs]
        P = plan.shared
        cache = None
        if P:
            cache = _out_cache(self.model(input_ids=rows[0][:P][None].to(dev), use_cache=True))
        groups = plan.groups
        firsts = [plan.row_group.index(g) for g in range(groups)]
        mids = [rows[firsts[g]][P:plan.group_len[g]] for g in range(groups)]
        width = max(len(m) for m in mids)
        mid_ids = torch.full((groups, width), self.pad_id, dtype=torch.long)
        mid_mask = torch.zeros((groups, width), dtype=torch.long)
        for g, m in enumerate(mids):
            if len(m):
                mid_ids[g, width - len(m):] = m
                mid_mask[g, width - len(m):] = 1
        mid_ids, mid_mask = mid_ids.to(dev), mid_mask.to(dev)
        if width:
            mask = torch.cat([torch.ones((groups, P), dtype=torch.long, device=dev), mid_mask], dim=1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, P:]
            if cache is not None:
                cache.batch_repeat_interleave(groups)
            out = self.model(input_ids=mid_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{self._cache_kw: cache})
            cache = _out_cache(out)
        elif cache is not None:
            cache.batch_repeat_interleave(groups)
        row_group = torch.tensor(plan.row_group, device=dev).repeat_interleave(n)
        cache.reorder_cache(row_group)
        suffixes = [{"input_ids": e["input_ids"][:, plan.group_len[g]:],
                     "attention_mask": e["attention_mask"][:, plan.group_len[g]:]}
                    for e, g in zip(encs, plan.row_group, strict=True)]
        batch = self._collate(suffixes, extra)
        ids = batch["input_ids"].repeat_interleave(n, dim=0)
        smask = batch["attention_mask"].repeat_interleave(n, dim=0)
        total = len(row_group)
        full_ids = torch.cat([rows[0][:P].to(dev).expand(total, P), mid_ids[row_group], ids], dim=1)
        full_mask = torch.cat([torch.ones((total, P), dtype=torch.long, device=dev), mid_mask[row_group], smask], dim=1)
        return {"input_ids": full_ids, "attention_mask": full_mask}, cache, P + width

    def _decode(self, ids: list[int], params: Sampling, logprobs: list[float] | None = None) -> Generation:
        n = len(ids)
        eos_at = next((pos for pos, tok in enumerate(ids) if tok in self.eos_ids), None)
        if eos_at is not None:
            n, finish = eos_at + 1, "stop"
        else:
            while n and ids[n - 1] == self.pad_id:  # padding after a stop string ended this row
                n -= 1
            finish = "length" if n >= params.max_new_tokens else "stop"
        text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
        for stop in params.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        tokens = None
        if logprobs is not None:
            tokens = spelling(tuple(zip(token_pieces(self.tokenizer, ids[:n]), logprobs[:n], strict=True)), text)
        return Generation(text=text, finish_reason=finish, num_tokens=n, tokens=tokens)  # type: ignore[arg-type]

    # -- choice scoring -----------------------------------------------------------------------------
    def choice_ids(self, choice: str) -> list[int]:
        return self.tokenizer(choice, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def score_choices(self, requests: Sequence[ChatRequest], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        """Summed log-likelihood of each choice's tokens after the prompt (+prefill), batched.

        Text-only models with `share_prefix` run each prompt once (its shared prefix and caption
        span once per batch, see `_run_plan`) and then only the choices' tokens, on the prompt's
        KV cache. Otherwise a request whose choices are all single tokens costs one row (the
        next-token distribution) and each other (request, choice) pair is a left-padded row.
        """
        if len(requests) != len(choices):
            raise ValueError(f"{len(requests)} requests but {len(choices)} choice lists")
        encs = self.encode_many(requests)
        targets = [[self.choice_ids(c) for c in cands] for cands in choices]
        for i, ids in enumerate(targets):
            if any(not t for t in ids):
                raise ValueError(f"request {i}: a choice tokenizes to nothing: {list(choices[i])!r}")
        if self.config.share_prefix and not self.is_vl:
            return self._score_on_prompt_cache(encs, targets)
        return self._score_rows(encs, targets)

    def _score_rows(self, encs: Sequence[dict[str, torch.Tensor]], targets: Sequence[Sequence[list[int]]]
                    ) -> list[list[float]]:
        """One row per request (single-token choices) or per (request, choice) pair."""
        rows: list[tuple[int, list[int] | None, list[list[int]]]] = []  # (request, appended ids, targets)
        for i, ids in enumerate(targets):
            if all(len(t) == 1 for t in ids):
                rows.append((i, None, list(ids)))
            else:
                rows.extend((i, t, [t]) for t in ids)
        lengths = [int(encs[i]["input_ids"].shape[1]) + (len(add) if add else 0) for i, add, _ in rows]
        row_scores: list[list[float]] = [[] for _ in rows]
        for idx in self._batches(lengths, 0, 1):
            picked = [rows[r] for r in idx]
            batch = self._collate([encs[i] for i, _, _ in picked], [add or [] for _, add, _ in picked])
            keep = max(len(add) if add else 0 for _, add, _ in picked) + 1
            logp = torch.log_softmax(self.model(**batch, logits_to_keep=keep).logits[:, -keep:].float(), dim=-1)
            for k, (r, (_, add, cands)) in enumerate(zip(idx, picked, strict=True)):
                if add is None:  # single-token choices: the distribution after the prompt
                    row_scores[r] = [float(logp[k, -1, t[0]]) for t in cands]
                else:
                    n = len(add)
                    positions = range(keep - 1 - n, keep - 1)
                    row_scores[r] = [float(sum(logp[k, p, tok] for p, tok in zip(positions, add, strict=True)))]
        out: list[list[float]] = [[] for _ in encs]
        for (i, _, _), scores in zip(rows, row_scores, strict=True):
            out[i].extend(scores)
        return out

    def _score_on_prompt_cache(self, encs: Sequence[dict[str, torch.Tensor]],
                               targets: Sequence[Sequence[list[int]]]) -> list[list[float]]:
        """Each prompt computed once (shared spans once per batch), then all its choices on its KV cache.

        A choice's first token is scored from the prompt's last logits; the rest of a multi-token
        choice runs as a right-padded row on a copy of its prompt's cache (positions continue the
        prompt's, so every score equals that of the full row on its own).
        """
        lengths = [int(e["input_ids"].shape[1]) for e in encs]
        extra = max(len(t) for ids in targets for t in ids)
        per_prompt = max(len(ids) for ids in targets)
        out: list[list[float]] = [[] for _ in encs]
        for idx in self._batches(lengths, extra, per_prompt, encs):
            picked = [encs[i] for i in idx]
            longer = [(b, c, t) for b, i in enumerate(idx) for c, t in enumerate(targets[i]) if len(t) > 1]
            plan = self._plan(picked)
            if plan is not None:
                batch, cache, cached = self._run_plan(picked, plan, 1)
                mask = batch["attention_mask"]
                positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, cached:]
                output = self.model(input_ids=batch["input_ids"][:, cached:], attention_mask=mask,
                                    position_ids=positions, logits_to_keep=1, use_cache=bool(longer),
                                    **{self._cache_kw: cache})
            else:
                batch = self._collate(picked)
                mask = batch["attention_mask"]
                output = self.model(**batch, logits_to_keep=1, use_cache=bool(longer))
            first = torch.log_softmax(output.logits[:, -1].float(), dim=-1)
            scores = [[float(first[b, t[0]]) for t in targets[i]] for b, i in enumerate(idx)]
            if longer:
                rows = torch.tensor([b for b, _, _ in longer], device=self.device)
                cache = _out_cache(output)
                cache.reorder_cache(rows)
                width = max(len(t) for _, _, t in longer) - 1
                ids = torch.full((len(longer), width), self.pad_id, dtype=torch.long)
                tail = torch.zeros((len(longer), width), dtype=torch.long)
                for r, (_, _, t) in enumerate(longer):
                    ids[r, :len(t) - 1] = torch.tensor(t[:-1])
                    tail[r, :len(t) - 1] = 1
                ids, tail = ids.to(self.device), tail.to(self.device)
                start = mask.sum(-1)[rows]
                positions = start[:, None] + torch.arange(width, device=self.device)[None, :]
                logits = self.model(input_ids=ids, attention_mask=torch.cat([mask[rows], tail], dim=1),
                                    position_ids=positions, use_cache=True, **{self._cache_kw: cache}).logits
                logp = torch.log_softmax(logits.float(), dim=-1)
                for r, (b, c, t) in enumerate(longer):
                    scores[b][c] += float(sum(logp[r, j - 1, tok] for j, tok in enumerate(t) if j))
            for b, i in enumerate(idx):
                out[i] = scores[b]
        return out

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def describe(self) -> str:
        return json.dumps({"model_id": self.model_id, "vl": self.is_vl, "device": str(self.device)})
