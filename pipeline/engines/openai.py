"""openai backend: any OpenAI-compatible HTTP server (`vllm serve`, SGLang, ...).

Requests run concurrently (at most `EngineConfig.concurrency` in flight) with a per-request
timeout and retries with exponential backoff on connection errors, timeouts, 408/429 and 5xx.
A request that still fails becomes `Generation(finish_reason="error", error=...)`: one bad
request never fails the batch. Images are sent as base64 data URLs after the shared
preprocessing, resized to the served model's grid when `processor` (or `model`) names its folder,
else only to the pixel budget. `chat_template_kwargs` travel in the request body (a vLLM/SGLang
extension; sent only when set). A prefill is sent as a final assistant message with `continue_final_message`
(the vLLM/SGLang extension), or, with `openai_prefill="instruct"`, as an instruction for servers
without it. `score_choices` uses vLLM's `/tokenize` and `prompt_logprobs` extensions (text only).
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import io
import math
import os
import random
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx

from pipeline.abstain import align, spelling
from pipeline.config import EngineConfig
from pipeline.engines.base import ChatRequest, Generation, Sampling
from pipeline.engines.grid import ImageGrid, load_grid
from pipeline.engines.preprocess import prepare_image
from pipeline.errors import clip
from pipeline.redact import redact_text, url_without_credentials

T = TypeVar("T")
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class RequestFailed(Exception):
    """One HTTP request failed for good (after retries, or with a non-retryable status)."""


def transport_error(exc: BaseException) -> str:
    """A connection error in words: httpx's own text is often empty, the cause (errno, reason) is not."""
    text = str(exc).strip()
    cause = exc.__cause__ or exc.__context__
    while not text and cause is not None:
        text = str(cause).strip()
        cause = cause.__cause__ or cause.__context__
    return f"{type(exc).__name__}: {redact_text(text) or 'no detail given'}"


def image_data_url(image: Any, grid: ImageGrid) -> str:
    """A prepared image as a data URL (PNG for small images, JPEG q95 otherwise)."""
    img = prepare_image(image, grid)
    buf = io.BytesIO()
    if img.width * img.height <= 448 * 448:
        img.save(buf, format="PNG")
        mime = "image/png"
    else:
        img.save(buf, format="JPEG", quality=95)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def _run(coro_factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, also when an event loop is already running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_factory())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro_factory())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _tokens(choice: dict[str, Any], text: str) -> tuple[tuple[str, float], ...] | None:
    """(piece, log-probability) per token of a chat choice asked for `logprobs`: the pieces from each token's
    `bytes` when the server gives them and they spell the text, else its `token` strings fitted to the text
    (`pipeline.abstain.align`: vLLM reports a byte of a split character as '' and names special tokens the
    text skips); None when absent, not a number, or when nothing fits."""
    content = (choice.get("logprobs") or {}).get("content") or []
    try:
        logprobs = [float(t["logprob"]) for t in content]
        if content and all(isinstance(t.get("bytes"), list) for t in content):
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # invalid bytes -> U+FFFD, as servers do
            pieces = [decoder.decode(bytes(t["bytes"]), final=k == len(content) - 1) for k, t in enumerate(content)]
        else:
            pieces = [str(t["token"]) for t in content]
    except (KeyError, TypeError, ValueError):
        return None
    if not content or any(math.isnan(lp) for lp in logprobs):  # an unknown probability must not read as sure
        return None
    return spelling(tuple(zip(pieces, logprobs, strict=True)), text) or \
        align(tuple(zip((str(t.get("token", "")) for t in content), logprobs, strict=True)), text)


class OpenAIEngine:
    """The `openai` backend (see the module docstring)."""

    def __init__(self, config: EngineConfig):
        self.config = config
        parts = urlsplit(config.base_url.strip())
        self.base_url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        """Where requests go (user info kept: httpx sends it as basic auth); its query travels as parameters."""
        self.params = dict(parse_qsl(parts.query, keep_blank_values=True))
        self.endpoint = url_without_credentials(self.base_url)
        """The server as it may be printed and recorded: no credentials, no query."""
        self.api_key = os.environ.get(config.api_key_env, "EMPTY")
        self._model = config.model or None
        self.model_id = f"openai:{self.endpoint}/{config.model or '?'}" + (f"@{config.revision}" if config.revision else "")
        self.stats = {"requests": 0, "retries": 0, "errors": 0}
        self._grid: ImageGrid | None = None

    @property
    def image_grid(self) -> ImageGrid:
        """The served model's grid (read once, when first needed: text-only readers never read it)."""
        if self._grid is None:
            self._grid = load_grid(self.config)
        return self._grid

    # -- HTTP plumbing ------------------------------------------------------------------------------
    def _client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.config.concurrency, max_keepalive_connections=self.config.concurrency)
        return httpx.AsyncClient(timeout=httpx.Timeout(self.config.timeout_s), limits=limits,
                                 headers={"Authorization": f"Bearer {self.api_key}"})

    async def _call(self, client: httpx.AsyncClient, method: str, path: str, body: dict | None = None,
                    server_root: bool = False) -> dict:
        """One request with retries and exponential backoff (base `retry_backoff_s`, x2, jitter, cap 30 s).

        server_root: the path hangs off the server root, not the /v1 API (vLLM's /tokenize).
        """
        base = self.base_url.removesuffix("/v1") if server_root else self.base_url
        url = base + path
        shown = (self.endpoint.removesuffix("/v1") if server_root else self.endpoint) + path
        last = ""
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self.stats["retries"] += 1
                delay = min(30.0, self.config.retry_backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random())
                await asyncio.sleep(delay)
            self.stats["requests"] += 1
            try:
                resp = await client.request(method, url, json=body, params=self.params or None)
            except httpx.TimeoutException as exc:
                last = f"timeout after {self.config.timeout_s:g}s ({type(exc).__name__})"
                continue
            except httpx.TransportError as exc:
                last = f"cannot reach {shown}: {transport_error(exc)}"
                continue
            if resp.status_code == 200:
                try:
                    return resp.json()
                except ValueError:
                    last = f"invalid JSON from {shown}"
                    continue
            last = f"HTTP {resp.status_code} from {shown}: {clip(redact_text(resp.text), 300)}"
            if resp.status_code not in _RETRY_STATUS:
                break
        raise RequestFailed(f"{method} {path} failed after {attempt + 1} attempt(s): {last}")

    async def _model_name(self, client: httpx.AsyncClient) -> str:
        if self._model is None:
            data = await self._call(client, "GET", "/models")
            models = data.get("data") or []
            if not models:
                raise RequestFailed(f"{self.endpoint}/models lists no model")
            self._model = models[0]["id"]
            self.model_id = f"openai:{self.endpoint}/{self._model}"
        return self._model

    # -- message conversion -------------------------------------------------------------------------
    def messages(self, request: ChatRequest) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """OpenAI messages (images as data URLs, prefill applied) and the extra body fields it needs."""
        images = iter(request.images)
        out: list[dict[str, Any]] = []
        for m in request.messages:
            content = m.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") == "image":
                        try:
                            img = next(images)
                        except StopIteration:
                            raise ValueError("message has more image parts than the request has images") from None
                        url = image_data_url(img, self.image_grid)
                        parts.append({"type": "image_url", "image_url": {"url": url}})
                    else:
                        parts.append(part)
                content = parts
            out.append({**m, "content": content})
        extra: dict[str, Any] = {}
        if self.config.chat_template_kwargs:
            extra["chat_template_kwargs"] = dict(self.config.chat_template_kwargs)
        if request.prefill:
            if self.config.openai_prefill == "continue":
                out.append({"role": "assistant", "content": request.prefill})
                extra.update(continue_final_message=True, add_generation_prompt=False)
            else:
                note = f'\n\nBegin your reply with "{request.prefill}".'
                last = out[-1]
                if isinstance(last["content"], list):
                    last["content"] = [*last["content"], {"type": "text", "text": note}]
                else:
                    last["content"] = f"{last['content']}{note}"
        return out, extra

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, requests: Sequence[ChatRequest], params: Sampling) -> list[list[Generation]]:
        """params.n generations per request; failures become finish_reason='error' generations."""
        return _run(lambda: self._generate_all(requests, params))

    async def _generate_all(self, requests: Sequence[ChatRequest], params: Sampling) -> list[list[Generation]]:
        sem = asyncio.Semaphore(self.config.concurrency)
        async with self._client() as client:
            try:
                model = await self._model_name(client)
            except RequestFailed as exc:
                return [[self._error(str(exc))] * params.n for _ in requests]

            async def one(i: int, req: ChatRequest) -> list[Generation]:
                async with sem:
                    try:
                        return await self._generate_one(client, model, req, params, i)
                    except RequestFailed as exc:
                        return [self._error(str(exc))] * params.n
                    except Exception as exc:  # noqa: BLE001 - a malformed answer fails one request only
                        return [self._error(f"{type(exc).__name__}: {exc}")] * params.n

            return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))

    def _error(self, message: str) -> Generation:
        self.stats["errors"] += 1
        return Generation(text="", finish_reason="error", error=message)

    async def _generate_one(self, client: httpx.AsyncClient, model: str, req: ChatRequest, params: Sampling,
                            index: int) -> list[Generation]:
        messages, extra = self.messages(req)
        body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "top_p": params.top_p, "n": params.n,
                                "seed": params.seed + index, **extra}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        if params.logprobs:
            body["logprobs"] = True
        data = await self._call(client, "POST", "/chat/completions", body)
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        total = (data.get("usage") or {}).get("completion_tokens", 0)
        out = []
        for c in choices:
            text = (c.get("message") or {}).get("content") or ""
            if req.prefill and self.config.openai_prefill == "instruct" and text.startswith(req.prefill):
                text = text[len(req.prefill):]
            finish = "length" if c.get("finish_reason") == "length" else "stop"
            out.append(Generation(text=text, finish_reason=finish, num_tokens=total // max(1, len(choices)),
                                  tokens=_tokens(c, text) if params.logprobs else None))
        if len(out) != params.n:
            raise RequestFailed(f"server returned {len(out)} choices, expected {params.n}")
        return out

    # -- choice scoring (vLLM extensions) -----------------------------------------------------------
    def score_choices(self, requests: Sequence[ChatRequest], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        """Summed log-likelihood of each choice after the templated prompt + prefill.

        Uses vLLM's /tokenize (chat template) and the completions endpoint with token-id prompts and
        `prompt_logprobs`. A request that fails gets NaN scores (callers treat them as a failure).
        """
        if len(requests) != len(choices):
            raise ValueError(f"{len(requests)} requests but {len(choices)} choice lists")
        if any(r.images for r in requests):
            raise ValueError("openai score_choices supports text-only requests")
        return _run(lambda: self._score_all(requests, choices))

    async def _score_all(self, requests: Sequence[ChatRequest], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        sem = asyncio.Semaphore(self.config.concurrency)
        choice_ids: dict[str, list[int]] = {}
        async with self._client() as client:
            try:
                model = await self._model_name(client)
            except RequestFailed:
                return [[math.nan] * len(c) for c in choices]

            async def tokenize_choice(text: str) -> None:
                async with sem:
                    data = await self._call(client, "POST", "/tokenize",
                                            {"model": model, "prompt": text, "add_special_tokens": False},
                                            server_root=True)
                    choice_ids[text] = data["tokens"]

            try:
                await asyncio.gather(*(tokenize_choice(t) for t in {c for cs in choices for c in cs}))
            except (RequestFailed, KeyError, TypeError):
                self.stats["errors"] += 1
                return [[math.nan] * len(c) for c in choices]

            async def one(req: ChatRequest, cands: Sequence[str]) -> list[float]:
                async with sem:
                    try:
                        return await self._score_one(client, model, req, [choice_ids[c] for c in cands])
                    except Exception:  # noqa: BLE001 - NaN marks this request as failed
                        self.stats["errors"] += 1
                        return [math.nan] * len(cands)

            return list(await asyncio.gather(*(one(r, c) for r, c in zip(requests, choices, strict=True))))

    async def _score_one(self, client: httpx.AsyncClient, model: str, req: ChatRequest,
                         cands: list[list[int]]) -> list[float]:
        messages, extra = self.messages(ChatRequest(messages=req.messages, prefill=req.prefill))
        body = {"model": model, "messages": messages, "add_special_tokens": False, **extra}
        if "continue_final_message" not in extra:
            body["add_generation_prompt"] = True
        prefix = (await self._call(client, "POST", "/tokenize", body, server_root=True))["tokens"]
        prompts = [prefix + ids for ids in cands]
        data = await self._call(client, "POST", "/completions", {
            "model": model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0})
        by_index = sorted(data["choices"], key=lambda c: c.get("index", 0))
        scores = []
        for ids, choice in zip(cands, by_index, strict=True):
            entries = choice["prompt_logprobs"][len(prefix):]
            total = 0.0
            for tok, entry in zip(ids, entries, strict=True):
                total += float(entry[str(tok)]["logprob"])
            scores.append(total)
        return scores

    def close(self) -> None:
        pass
