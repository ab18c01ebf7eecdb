"""Feed images to a captioning engine at throughput: decode ahead in a pool, big chunks in, per-row results out.

The path of one image: bytes -> decode (worker pool, ahead of the engine: EXIF transpose, then the
engines' shared prepare_image: RGB, resized once to the captioner's image grid) -> ChatRequest in a chunk of `chunk_size` -> engine.generate
-> CaptionResult (status ok/error with a reason). With decode workers, reading the jobs and decoding them
run in a feeder thread (`in_background`): the engine starts on the first chunk as soon as it is decoded,
and the input is read and decoded on while the engine works, never in the gaps between its calls. Rows whose generation failed (engine exception,
error generation, empty or truncated caption) are retried once in smaller batches at the end.
Nothing here raises for a bad row; only the engine's absence of results for a whole chunk is
turned into per-row errors.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from PIL import Image

from pipeline.abstain import gate
from pipeline.engines.base import Engine, Generation, Sampling, image_request
from pipeline.engines.grid import ImageGrid
from pipeline.engines.preprocess import map_ahead
from pipeline.errors import PipelineError
from stages.annotate.imageprep import DecodedImage, decode_image

log = logging.getLogger("stages.annotate.captioning")

RAMP = 8
"""The first chunk is chunk_size / RAMP, doubling up to chunk_size: the engine never waits for a whole
chunk to be decoded before its first batch."""
FEED_POLL_S = 0.05
"""How often a blocked feeder thread checks whether its consumer stopped."""
ERR_DECODE = "decode_error"
ERR_NO_IMAGE = "no_image"
ERR_ENGINE = "engine_error"
ERR_EMPTY = "empty_caption"
ERR_TRUNCATED = "truncated"
ERR_ABSTAINED = "abstained"
_UNGATED_WARNED: list[bool] = []
"""Set once this process has warned that the engine gave no token probabilities for the abstention gate."""


T = TypeVar("T")


class EngineUnavailable(PipelineError):
    """The engine failed on every request of a shard: an infrastructure problem, not bad rows."""


@dataclass
class CaptionJob:
    """One image to caption: its key and encoded bytes (None when the sample has no image file)."""

    key: str
    data: bytes | None


@dataclass
class CaptionResult:
    """The outcome for one image."""

    key: str
    sha256: str | None = None
    """Of the image bytes (hashed in the decode worker)."""
    width: int | None = None
    height: int | None = None
    generations: list[Generation] = field(default_factory=list)
    status: str = "ok"
    reason: str | None = None
    """Short error class (decode_error, engine_error, empty_caption, truncated, abstained, no_image)."""
    error: str | None = None
    """Full error text."""
    attempts: int = 1
    abstained: list[tuple[str, ...]] | None = None
    """With abstention on: the sentences dropped from each generation (None: the gate did not run)."""

    @property
    def caption(self) -> str:
        return self.generations[0].text.strip() if self.generations else ""

    @property
    def captions(self) -> list[str]:
        return [g.text.strip() for g in self.generations]


@dataclass
class FeedConfig:
    """How to drive the engine."""

    prompt: str
    sampling: Sampling
    grid: ImageGrid
    """The captioner's image grid: images are resized to it once, in the decode pool."""
    chunk_size: int = 4096
    workers: int = 2
    truncated_is_error: bool = False
    abstain_below: float = 0.0
    """Drop the sentences the captioner was unsure of (pipeline.abstain); needs sampling.logprobs."""
    retry: bool = True
    retry_batch_size: int = 4


def _abstain(gens: list[Generation], min_prob: float) -> tuple[list[Generation], list[tuple[str, ...]] | None]:
    """The generations with their unsure sentences dropped, and the sentences dropped from each (None when
    a generation came without token probabilities: the gate could not run, the captions stay whole)."""
    if min_prob <= 0:
        return gens, None
    kept, dropped = [], []
    for g in gens:
        if g.finish_reason == "error" or g.error:
            kept.append(g)
            dropped.append(())
            continue
        result = gate(g.text, g.tokens, min_prob)
        if not result.gated:
            if not _UNGATED_WARNED:
                _UNGATED_WARNED.append(True)
                log.warning("abstain_below is set but the engine returned no token probabilities that spell the "
                            "caption: the caption is kept whole (counted as `ungated` in the shard's stats)")
            return [replace(x, tokens=None) for x in gens], None
        kept.append(replace(g, text=result.text, tokens=None))
        dropped.append(result.dropped)
    return kept, dropped


def _judge(gens: list[Generation], truncated_is_error: bool,
           abstained: list[tuple[str, ...]] | None = None) -> tuple[str | None, str | None]:
    """(reason, error text) for a row's generations, or (None, None) if they are acceptable."""
    for i, g in enumerate(gens):
        which = f"caption {i}: " if len(gens) > 1 else ""
        if g.finish_reason == "error" or g.error:
            return ERR_ENGINE, f"{which}{g.error or 'engine returned an error'}"
        if abstained and abstained[i] and not g.text.strip():
            return ERR_ABSTAINED, f"{which}every sentence held a word below abstain_below ({len(abstained[i])} dropped)"
        if not g.text.strip():
            return ERR_EMPTY, f"{which}empty caption"
        if truncated_is_error and g.finish_reason == "length":
            return ERR_TRUNCATED, f"{which}caption cut at max_new_tokens ({g.num_tokens} tokens)"
    return None, None


def _run_engine(engine: Engine, images: Sequence[Image.Image], cfg: FeedConfig) -> list[list[Generation]] | str:
    """engine.generate over a batch, or the error text if it raised or returned the wrong shape."""
    requests = [image_request(cfg.prompt, im) for im in images]
    try:
        out = engine.generate(requests, cfg.sampling)
    except Exception as exc:  # noqa: BLE001 - an engine failure becomes per-row errors, retried later
        log.warning("engine failed on a batch of %d: %s", len(requests), exc)
        return f"{type(exc).__name__}: {exc}"
    if len(out) != len(requests):
        return f"engine returned {len(out)} results for {len(requests)} requests"
    return [list(g) for g in out]


def in_background(items: Iterable[T], depth: int) -> Iterator[T]:
    """Iterate `items` in a feeder thread, at most `depth` items ahead of the consumer, in order.

    An exception raised by `items` is raised here, in the consumer, after the items before it. When the
    consumer stops early (break, an exception, a signal's `Preempted`), the feeder stops at its next item,
    closes `items` (so a pool inside it shuts down) and is joined before this generator returns.
    """
    buffer: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=FEED_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def feed() -> None:
        source = iter(items)
        try:
            for item in source:
                if not put(("item", item)):
                    return
            put(("end", None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(("error", exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=feed, name="caption-feed", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = buffer.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


def caption_images(engine: Engine | Callable[[], Engine], jobs: Iterable[CaptionJob],
                   cfg: FeedConfig) -> Iterator[CaptionResult]:
    """Caption every job; yields one CaptionResult per job (retried rows come last, after the main pass).

    `engine` may be a factory, called once when the first chunk is ready (rows that never reach the
    engine, such as undecodable images, do not load a model). With `cfg.workers` > 0, `jobs` is consumed
    in a feeder thread (see `in_background`); with 0 everything runs inline in the caller's thread.
    """
    loaded: list[Engine] = []

    def get_engine() -> Engine:
        if not loaded:
            loaded.append(engine() if callable(engine) and not isinstance(engine, Engine) else engine)
        return loaded[0]

    retry_queue: list[tuple[CaptionResult, bytes]] = []  # encoded bytes, not pixels: a dead engine must not fill memory
    attempted: list[int] = [0, 0]
    last_error: list[str] = [""]  # rows that reached the engine, rows that ended with an engine error

    def decode(job: CaptionJob) -> tuple[str | None, DecodedImage]:
        digest = hashlib.sha256(job.data).hexdigest() if job.data is not None else None
        return digest, decode_image(job.data, cfg.grid)

    def finish(chunk: list[tuple[CaptionResult, Image.Image, bytes]], attempt: int) -> Iterator[CaptionResult]:
        outcome = _run_engine(get_engine(), [im for _, im, _ in chunk], cfg)
        for i, (res, _, data) in enumerate(chunk):
            res.attempts = attempt
            if isinstance(outcome, str):
                res.generations, res.reason, res.error = [], ERR_ENGINE, outcome
                last_error[0] = outcome
            else:
                res.generations, res.abstained = _abstain(outcome[i], cfg.abstain_below)
                res.reason, res.error = _judge(res.generations, cfg.truncated_is_error, res.abstained)
            res.status = "ok" if res.reason is None else "error"
            if res.status == "error" and cfg.retry and attempt == 1:
                retry_queue.append((res, data))
            else:
                attempted[0] += 1
                attempted[1] += res.reason == ERR_ENGINE
                yield res

    chunk: list[tuple[CaptionResult, Image.Image, bytes]] = []
    target = max(1, cfg.chunk_size // RAMP)  # a small first chunk: the engine starts while the pool decodes on
    if cfg.workers > 0:  # read + decode in a feeder thread, up to two chunks ahead of the engine
        decoded = in_background(map_ahead(decode, jobs, workers=cfg.workers), depth=2 * cfg.chunk_size)
    else:
        decoded = map_ahead(decode, jobs, workers=0)
    with closing(decoded):  # stops and joins the feeder when this generator is closed early
        for prepared in decoded:
            job = prepared.item
            digest, dec = prepared.value if prepared.value is not None else (None, None)
            res = CaptionResult(key=job.key, sha256=digest)
            if dec is None or dec.image is None:
                res.status, res.error = "error", (dec.error if dec is not None else prepared.error)
                res.reason = ERR_NO_IMAGE if job.data is None else ERR_DECODE
                yield res
                continue
            res.width, res.height = dec.width, dec.height
            chunk.append((res, dec.image, job.data))
            if len(chunk) >= target:
                yield from finish(chunk, 1)
                chunk, target = [], min(cfg.chunk_size, target * 2)
    if chunk:
        yield from finish(chunk, 1)
    while retry_queue:
        batch, retry_queue[:] = retry_queue[: cfg.retry_batch_size], retry_queue[cfg.retry_batch_size :]
        redo = [(res, decode_image(data, cfg.grid).image, data) for res, data in batch]
        yield from finish(redo, 2)  # type: ignore[arg-type]
    if attempted[0] >= 2 and attempted[0] == attempted[1]:  # one poisoned image alone is a bad row
        raise EngineUnavailable(f"the captioning engine failed on every one of {attempted[0]} images "
                                f"(last error: {last_error[0]}); the shard is not committed")


def summarize(results: Iterable[CaptionResult]) -> dict[str, Any]:
    """Counts for stats: rows, ok, retried, finish reasons, generated tokens; with abstention, the sentences
    dropped (`abstained_sentences`) and the ok rows the gate could not run on (`ungated`)."""
    out: dict[str, Any] = {"rows": 0, "ok": 0, "retried": 0, "retried_ok": 0, "length": 0, "tokens": 0}
    for r in results:
        out["rows"] += 1
        out["ok"] += r.status == "ok"
        out["retried"] += r.attempts > 1
        out["retried_ok"] += r.attempts > 1 and r.status == "ok"
        out["length"] += sum(g.finish_reason == "length" for g in r.generations)
        out["tokens"] += sum(g.num_tokens for g in r.generations)
        if r.abstained is not None:
            out["abstained_sentences"] = out.get("abstained_sentences", 0) + sum(len(d) for d in r.abstained)
        elif r.generations and r.status == "ok":
            out["ungated"] = out.get("ungated", 0) + 1
    return out
