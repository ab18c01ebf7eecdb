"""The CapRL utility reward: a text-only reader answers MCQs about an image from its caption alone.

For each caption, N questions are drawn with replacement from that image's MCQs; every draw shows
the options in a fresh order with CANNOT_ANSWER appended last; the reward is the mean correctness
over the N draws. All reader prompts for a batch of captions go to the engine in ONE call. With
`wrong_penalty` > 0 (negative marking) a wrong answer scores -penalty, "cannot answer" 0 and a right one 1,
so stating a guess pays only when it is right often enough.

A reader failure (an engine exception, or a per-request error) is retried, and if it persists the
caption's reward is *missing* (`reward=None` with a reason), never 0: a trainer masks it. A cache
keyed by (caption hash, question id, permutation, reader id) makes runs replayable.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipeline.config import RewardConfig
from pipeline.engines.base import ChatRequest, Engine, Sampling, create_engine
from pipeline.mcq import (
    CANNOT_ANSWER,
    LETTERS,
    MCQ,
    READER_PREFILL,
    ReasoningPreamble,
    ShuffledMCQ,
    parse_answer_letter,
    reader_messages,
    shuffle_options,
)


@dataclass(frozen=True)
class DrawRecord:
    """One question shown to the reader for one caption."""

    caption_index: int
    draw: int
    question_id: str
    permutation: tuple[int, ...]
    shown_answer: str
    reader_answer: str | None
    """The letter the reader chose (None: unparseable or failed)."""
    correct: float | None
    """1/0 (sample, option_text), the right answer's probability (letter_prob, option_text+expected),
    None when the reader failed."""
    prob: float | None = None
    raw: str = ""
    cached: bool = False
    error: str | None = None
    abstained: float | None = None
    """1/0 whether the reader said "cannot answer" (or gave no parseable answer) where that is not the right
    answer (its probability under letter_prob / expected); None for cache entries written before it existed."""

    def score(self, wrong_penalty: float = 0.0) -> float | None:
        """The draw's reward: `correct`, minus `wrong_penalty` times the chance the answer was wrong (neither
        right nor an abstention)."""
        if self.correct is None:
            return None
        if not wrong_penalty:
            return float(self.correct)
        if self.abstained is None:
            raise ValueError("a draw without its abstention cannot be negatively marked")
        return float(self.correct) - wrong_penalty * max(0.0, 1.0 - float(self.correct) - self.abstained)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["permutation"] = list(self.permutation)
        return d


@dataclass
class RewardResult:
    """A caption's reward (None = missing, see `reason`) and the draws it came from."""

    reward: float | None
    draws: list[DrawRecord] = field(default_factory=list)
    reason: str | None = None
    unparsed: int = 0

    @property
    def missing(self) -> bool:
        return self.reward is None


@dataclass
class _Pending:
    caption_index: int
    draw: int
    caption: str
    shown: ShuffledMCQ
    key: str
    record: DrawRecord | None = None
    error: str | None = None


def caption_hash(caption: str) -> str:
    return hashlib.sha256(caption.encode()).hexdigest()[:32]


class RewardCache:
    """Reader answers by (caption hash, question id, permutation, reader id, occurrence).

    In memory, plus an optional fsspec directory of parquet parts: `flush()` writes the entries added
    since the last flush as one new part, and a new cache on the same directory loads them all.
    Only successful answers are stored, so failures are always re-asked.
    """

    def __init__(self, path: str | None = None, storage_options: dict[str, Any] | None = None):
        self.path = path.rstrip("/") if path else None
        self.storage_options = storage_options or {}
        self._data: dict[str, dict[str, Any]] = {}
        self._new: dict[str, dict[str, Any]] = {}
        self.hits = 0
        self.misses = 0
        if self.path:
            self._load()

    @staticmethod
    def key(caption: str, question_id: str, permutation: Sequence[int], reader_id: str, occurrence: int = 0) -> str:
        perm = ",".join(str(i) for i in permutation)
        return f"{caption_hash(caption)}|{question_id}|{perm}|{reader_id}|{occurrence}"

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> dict[str, Any] | None:
        value = self._data.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: dict[str, Any]) -> None:
        self._data[key] = value
        self._new[key] = value

    def _fs(self) -> tuple[Any, str]:
        from pipeline.shardio import url_fs

        return url_fs(self.path, self.storage_options)

    def _load(self) -> None:
        import pyarrow.parquet as pq

        fs, root = self._fs()
        if not fs.exists(root):
            return
        for part in sorted(fs.glob(f"{root}/part-*.parquet")):
            with fs.open(part, "rb") as f:
                table = pq.read_table(f)
            for key, value in zip(table.column("key").to_pylist(), table.column("value").to_pylist(), strict=True):
                self._data[key] = json.loads(value)

    def flush(self) -> str | None:
        """Write the entries added since the last flush as one new parquet part; returns its path."""
        if not self.path or not self._new:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, root = self._fs()
        fs.makedirs(root, exist_ok=True)
        table = pa.table({"key": list(self._new), "value": [json.dumps(v) for v in self._new.values()]})
        name = f"{root}/part-{uuid.uuid4().hex}.parquet"
        tmp = f"{root}/_tmp-{uuid.uuid4().hex}.parquet"
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        fs.mv(tmp, name)
        self._new.clear()
        return name


def _softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


class CapRLReward:
    """Scores captions with a reader engine; see the module docstring for the rules."""

    def __init__(self, reader: Engine, config: RewardConfig | None = None, cache: RewardCache | None = None):
        self.reader = reader
        self.config = config or RewardConfig()
        self.cache = cache
        self.last_stats: dict[str, int] = {}

    @classmethod
    def from_config(cls, config: RewardConfig, reader: Engine | None = None) -> CapRLReward:
        """Build the reader engine (unless given) and the on-disk cache named in the config."""
        cache = RewardCache(config.cache) if config.cache else RewardCache()
        return cls(reader or create_engine(config.reader), config, cache)

    @property
    def reader_id(self) -> str:
        """Reader model + answer mode + decoding + prompt version: what a cached answer depends on."""
        cfg = self.config
        probe = reader_messages("x", shuffle_options(MCQ("q", ("a", "b", "c", "d"), "A"), random.Random(0),
                                                     CANNOT_ANSWER), few_shot=cfg.few_shot)
        prompt = hashlib.sha256((json.dumps(probe) + READER_PREFILL).encode()).hexdigest()[:12]
        decode = ""
        if cfg.mode == "sample":
            s = cfg.sampling
            decode = f"t{s.temperature}-p{s.top_p}-m{s.max_new_tokens}-r{s.repetition_penalty}-s{s.seed}"
        elif cfg.mode == "option_text" and cfg.expected:
            decode = "expected"
        return f"{self.reader.model_id}|{cfg.mode}|{decode}|{prompt}"

    # -- planning -----------------------------------------------------------------------------------
    def plan(self, caption: str, mcqs: Sequence[MCQ], key: str, seed: int) -> list[ShuffledMCQ]:
        """The N draws (with replacement, fresh shuffle each) for one caption: a function of the seed,
        the caption's key and text, and the MCQ ids (not of the text under `draws_per: image`)."""
        text = caption_hash(caption) if self.config.draws_per == "caption" else "*"
        blob = f"{seed}|{key}|{text}|{','.join(q.id for q in mcqs)}"
        rng = random.Random(int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big"))
        draws = []
        for _ in range(self.config.n_draws):
            q = mcqs[rng.randrange(len(mcqs))]
            draws.append(shuffle_options(q, rng, extra_option=CANNOT_ANSWER))
        return draws

    def __call__(self, captions: Sequence[str], mcqs: Sequence[Sequence[MCQ]],
                 keys: Sequence[str] | None = None, seed: int | None = None) -> list[RewardResult]:
        """Rewards for many captions (mcqs[i] = the MCQs of caption i's image), one batched reader call."""
        if len(captions) != len(mcqs):
            raise ValueError(f"{len(captions)} captions but {len(mcqs)} MCQ lists")
        if keys is not None and len(keys) != len(captions):
            raise ValueError(f"{len(captions)} captions but {len(keys)} keys")
        seed = self.config.seed if seed is None else seed
        reader_id = self.reader_id
        results: list[RewardResult] = []
        pending: list[_Pending] = []
        cached = 0
        for i, (caption, qs) in enumerate(zip(captions, mcqs, strict=True)):
            result = RewardResult(reward=None)
            results.append(result)
            if not qs:
                result.reason = "no MCQs for this image"
                continue
            seen: dict[tuple[str, tuple[int, ...]], int] = {}
            for d, shown in enumerate(self.plan(caption, qs, keys[i] if keys else str(i), seed)):
                ident = (shown.mcq.id, shown.permutation)
                occurrence = seen.get(ident, 0)
                seen[ident] = occurrence + 1
                ckey = RewardCache.key(caption, shown.mcq.id, shown.permutation, reader_id, occurrence)
                item = _Pending(i, d, caption, shown, ckey)
                hit = self.cache.get(ckey) if self.cache is not None else None
                if hit is not None and self.config.wrong_penalty and hit.get("abstained") is None:
                    hit = None  # written before abstentions were kept: ask again rather than guess the mark
                if hit is not None:
                    item.record = self._record(item, hit.get("answer"), hit.get("correct"), hit.get("prob"),
                                               hit.get("raw", ""), cached=True, abstained=hit.get("abstained"))
                    cached += 1
                pending.append(item)
        todo = [p for p in pending if p.record is None]
        calls = 0
        for attempt in range(self.config.retries + 1):
            if not todo:
                break
            calls += 1
            self._ask(todo, seed, attempt)
            todo = [p for p in todo if p.record is None]
        for p in pending:
            if p.record is None:
                p.record = DrawRecord(p.caption_index, p.draw, p.shown.mcq.id, p.shown.permutation,
                                      p.shown.answer, None, None, error=p.error or "reader gave no answer")
            results[p.caption_index].draws.append(p.record)
        for result in results:
            if result.reason is not None:
                continue
            failed = [d for d in result.draws if d.correct is None]
            result.unparsed = sum(1 for d in result.draws if d.correct is not None and d.reader_answer is None)
            if failed:
                result.reason = f"reader failed on {len(failed)}/{len(result.draws)} draws: {failed[0].error}"
            else:
                scores = [d.score(self.config.wrong_penalty) for d in result.draws]
                result.reward = sum(scores) / len(scores)  # type: ignore[arg-type]
        self.last_stats = {"captions": len(captions), "draws": len(pending), "cached": cached,
                           "reader_calls": calls, "missing": sum(r.missing for r in results),
                           "unparsed": sum(r.unparsed for r in results)}
        return results

    # -- asking the reader --------------------------------------------------------------------------
    def _ask(self, items: list[_Pending], seed: int, attempt: int) -> None:
        """One batched engine call for all items; fills item.record on success, item.error otherwise."""
        cfg = self.config
        requests = [ChatRequest(messages=reader_messages(p.caption, p.shown, few_shot=cfg.few_shot),
                                prefill=READER_PREFILL) for p in items]
        try:
            if cfg.mode == "sample":
                params = replace(Sampling.from_config(cfg.sampling), n=1,
                                 seed=cfg.sampling.seed + seed + 1_000_003 * attempt)
                outs = self.reader.generate(requests, params)
                if len(outs) != len(items):
                    raise RuntimeError(f"reader returned {len(outs)} results for {len(items)} requests")
                for p, gens in zip(items, outs, strict=True):
                    self._take_generation(p, gens)
            else:
                if cfg.mode == "letter_prob":
                    choices = [[" " + letter for letter in p.shown.letters] for p in items]
                else:
                    choices = [[" " + o for o in p.shown.options] for p in items]
                scores = self.reader.score_choices(requests, choices)
                if len(scores) != len(items):
                    raise RuntimeError(f"reader returned {len(scores)} score lists for {len(items)} requests")
                for p, row, cands in zip(items, scores, choices, strict=True):
                    self._take_scores(p, row, len(cands))
        except Exception as exc:  # noqa: BLE001 - any reader failure masks the draw, never scores it 0
            for p in items:
                p.error = f"{type(exc).__name__}: {exc}"

    def _take_generation(self, p: _Pending, gens: Sequence[Any]) -> None:
        if not gens:
            p.error = "reader returned no generation"
            return
        gen = gens[0]
        if gen.finish_reason == "error":
            p.error = gen.error or "reader error"
            return
        try:
            answer = parse_answer_letter(gen.text, len(p.shown.options))
        except ReasoningPreamble as exc:  # a misconfigured reader: the draw failed, it is not scored 0
            p.error = str(exc)
            return
        right = self._right(p)
        abstained = float(answer is None or (answer == self._abstain_letter(p) and answer not in right))
        self._finish(p, answer, 1.0 if answer in right else 0.0, None, gen.text, abstained)

    def _right(self, p: _Pending) -> tuple[str, ...]:
        """The letters that count as right: the keyed one, and for an absent-thing question under
        `absent_abstain` also "cannot answer" (shown last)."""
        if self.config.absent_abstain and p.shown.mcq.qtype == "absent":
            return (p.shown.answer, self._abstain_letter(p))
        return (p.shown.answer,)

    @staticmethod
    def _abstain_letter(p: _Pending) -> str:
        """The letter of "cannot answer" (always shown last)."""
        return LETTERS[len(p.shown.options) - 1]

    def _take_scores(self, p: _Pending, row: Sequence[float], n: int) -> None:
        if len(row) != n or not all(math.isfinite(s) for s in row):
            p.error = f"reader scores invalid: {list(row)!r}"
            return
        probs = _softmax(row)
        right = [LETTERS.index(letter) for letter in self._right(p)]
        best = max(range(n), key=probs.__getitem__)
        prob = sum(probs[i] for i in right)
        abstain = n - 1 if self._abstain_letter(p) not in self._right(p) else None
        if self.config.mode == "letter_prob" or self.config.expected:
            correct = prob
            abstained = probs[abstain] if abstain is not None else 0.0
        else:
            correct = 1.0 if best in right else 0.0
            abstained = float(best == abstain)
        self._finish(p, LETTERS[best], correct, prob, "", abstained)

    def _finish(self, p: _Pending, answer: str | None, correct: float, prob: float | None, raw: str,
                abstained: float) -> None:
        p.record = self._record(p, answer, correct, prob, raw, cached=False, abstained=abstained)
        if self.cache is not None:
            self.cache.put(p.key, {"answer": answer, "correct": correct, "prob": prob, "raw": raw,
                                   "abstained": abstained})

    @staticmethod
    def _record(p: _Pending, answer: str | None, correct: float | None, prob: float | None, raw: str,
                cached: bool, abstained: float | None = None) -> DrawRecord:
        return DrawRecord(p.caption_index, p.draw, p.shown.mcq.id, p.shown.permutation, p.shown.answer,
                          answer, correct, prob, raw, cached, abstained=abstained)


def compute_rewards(captions: Sequence[str], mcqs: Sequence[Sequence[MCQ]], reader: Engine,
                    config: RewardConfig | None = None, cache: RewardCache | None = None,
                    keys: Sequence[str] | None = None) -> list[RewardResult]:
    """Functional form of CapRLReward for one batch."""
    return CapRLReward(reader, config, cache)(captions, mcqs, keys=keys)
