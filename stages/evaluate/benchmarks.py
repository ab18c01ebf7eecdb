"""Benchmarks: images with multiple-choice questions, read from a JSONL, a CapRL-QA-layout parquet, or this
run's committed qa shards.

Every source becomes a list of `BenchImage`: the image bytes (and their sha256, the caption cache's key),
an optional reference caption, and the image's questions as `MCQ`s with their options in the benchmark's
order (Prism shows them as given).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline import shardio
from pipeline.config import BenchmarkConfig
from pipeline.errors import ConfigError
from pipeline.mcq import LETTERS, MCQ
from pipeline.shards import parse_shard_spec, shard_name
from pipeline.storage import Storage

_LETTERED = re.compile(r"^\s*\(?([A-F])[).:]\s+")


@dataclass
class BenchImage:
    """One benchmark image and its questions."""

    benchmark: str
    image_id: str
    data: bytes
    questions: list[MCQ] = field(default_factory=list)
    reference: str | None = None
    truth: str | None = None
    """the image's ground truth where the benchmark has one (BenchmarkConfig.truth names its kind)"""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def strip_letter(option: str) -> str:
    """'B) a red square' -> 'a red square' (options given with their letters)."""
    return _LETTERED.sub("", option, count=1).strip()


def make_mcq(question: str, options: list[str], answer: str, qid: str = "") -> MCQ:
    """An MCQ from a benchmark row; `answer` is a letter ('C', 'C)', '(C)') or the right option's text."""
    opts = [strip_letter(str(o)) for o in options]
    ans = str(answer).strip()
    m = re.fullmatch(r"\(?([A-F])\)?[).]?(?:\s.*)?", ans)
    if m and LETTERS.index(m.group(1)) < len(opts):
        letter = m.group(1)
    else:
        low = [o.casefold() for o in opts]
        if strip_letter(ans).casefold() not in low:
            raise ValueError(f"answer {answer!r} is neither an option letter nor an option's text")
        letter = LETTERS[low.index(strip_letter(ans).casefold())]
    return MCQ(question=str(question).strip(), options=tuple(opts), answer=letter, id=qid)


def load_benchmark(cfg: BenchmarkConfig, storage: Storage,
                   record_input: Callable[[str, int], dict[str, Any]]) -> list[BenchImage]:
    """The images of one benchmark, in a stable order. `record_input(stage, shard)` records (and checks)
    a committed input shard of this run (qa benchmarks). A file on the root's object store without its own
    storage_options is read with the run's."""
    if cfg.path and not cfg.storage_options and _protocol(cfg.path) == _protocol(storage.root_url):
        cfg = cfg.model_copy(update={"storage_options": dict(storage.storage_options)})
    if cfg.kind == "jsonl":
        images = _from_jsonl(cfg)
    elif cfg.kind == "caprl_parquet":
        images = _from_caprl_parquet(cfg)
    else:
        images = _from_qa(cfg, storage, record_input)
    images = [im for im in images if im.questions]
    return images[: cfg.limit] if cfg.limit else images


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def _options(cfg: BenchmarkConfig) -> dict[str, Any]:
    return cfg.storage_options


def _from_jsonl(cfg: BenchmarkConfig) -> list[BenchImage]:
    """Rows {image, question, options, answer[, reference][, id]}; `image` is a path relative to the
    JSONL's folder, or a URL. Rows about the same image are grouped under it."""
    assert cfg.path is not None
    base = posixpath.dirname(cfg.path)
    by_image: dict[str, BenchImage] = {}
    with shardio.open_url(cfg.path, "rb", _options(cfg)) as f:
        lines = f.read().decode("utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ref = str(row["image"])
            mcq = make_mcq(row["question"], list(row["options"]), row["answer"], str(row.get("id", "")))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"benchmark {cfg.name}: {cfg.path} line {n}: {exc}") from None
        if ref not in by_image:
            url = ref if "://" in ref or ref.startswith("/") else posixpath.join(base, ref)
            with shardio.open_url(url, "rb", _options(cfg)) as img:
                by_image[ref] = BenchImage(cfg.name, ref, img.read(), reference=row.get("reference"),
                                           truth=_truth(row.get("truth")))
        by_image[ref].questions.append(mcq)
    return list(by_image.values())


def _from_caprl_parquet(cfg: BenchmarkConfig) -> list[BenchImage]:
    """The CapRL-QA-75K layout: id, image {bytes}, reward_model.ground_truth [{question, choices, answer}]."""
    assert cfg.path is not None
    table = shardio.read_table(cfg.path, _options(cfg))
    out = []
    for row in table.to_pylist():
        image = row.get("image")
        data = image.get("bytes") if isinstance(image, dict) else image
        if not data:
            continue
        truth = (row.get("reward_model") or {}).get("ground_truth") or []
        if isinstance(truth, str):
            truth = json.loads(truth)
        bench = BenchImage(cfg.name, str(row.get("id")), bytes(data))
        for i, q in enumerate(truth):
            bench.questions.append(make_mcq(q["question"], list(q["choices"]), q["answer"], f"{row.get('id')}-{i}"))
        out.append(bench)
    return out


def _from_qa(cfg: BenchmarkConfig, storage: Storage, record_input: Callable[[str, int], dict[str, Any]]
             ) -> list[BenchImage]:
    """Kept questions of committed qa shards; images (and the download caption as reference) from the
    committed image shards of the same numbers."""
    assert cfg.shards is not None
    out = []
    for shard in parse_shard_spec(cfg.shards):
        record_input("qa", shard)
        record_input("download", shard)
        rows = shardio.read_manifest(storage.url(f"qa/{shard_name(shard)}.parquet"), storage.storage_options)
        questions: dict[str, list[MCQ]] = {}
        for r in rows:
            if r.get("status") == "ok" and r.get("kept"):
                questions.setdefault(r["key"], []).append(
                    make_mcq(r["question"], list(r["options"]), r["answer"], r.get("question_id") or ""))
        for sample in shardio.read_samples(storage.url(f"images/{shard_name(shard)}.tar"), storage.storage_options):
            if sample.ok and sample.key in questions and sample.image:
                txt = sample.files.get("txt")
                out.append(BenchImage(cfg.name, sample.key, sample.image, questions[sample.key],
                                      reference=txt.decode("utf-8", "replace") if txt else None,
                                      truth=_truth(sample.meta.get("scene"))))
    return out


def _truth(value: Any) -> str | None:
    """A truth value as the checker's string (JSON for a mapping); None when absent."""
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def qa_shards(cfg: BenchmarkConfig) -> list[int]:
    """The qa shards a benchmark reads (none for file benchmarks)."""
    return parse_shard_spec(cfg.shards) if cfg.kind == "qa" and cfg.shards else []
