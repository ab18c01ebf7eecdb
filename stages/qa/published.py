"""The published CapRL-QA layout (CapRL-QA-75K, verl style): export kept questions to it, import it.

One row per image:
    id            string
    image         struct{bytes: binary, path: string}
    prompt        list<struct{content: string, role: string}>: one user turn, "<image>" + CAPTION_PROMPT
    data_source   string
    reward_model  struct{ground_truth: list<struct{question, choices: list<string>, answer}>, style: string}
with choices lettered "A) ..." (CapRL-QA-75K; `--style dot` writes CapRL++'s "A. ...", and the import reads
either), answer a letter. `export_qa` writes the kept questions of every committed qa
shard with their images; `import_qa` cuts such a file (local or any fsspec URL) into committed image shards
(download layout, questions in each sample's json under `mcqs`) and committed qa shards of the run's
shard-id space, so `train` can start from a published set and `qa.generate: false` can re-gate it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import shardio
from pipeline.config import RunConfig
from pipeline.errors import PipelineError
from pipeline.inputs import resolve_input
from pipeline.mcq import CAPTION_PROMPT, lettered_choices
from pipeline.shards import sample_key, shard_name
from pipeline.stage import ShardStats, marker_digest
from pipeline.storage import Storage, code_version
from stages.qa.questions import stored_mcq
from stages.qa.stage import OUTPUT_DIR, QA_SCHEMA

IMAGE_PLACEHOLDER = "<image>"
DATA_SOURCE = "caprl-pipeline"
REWARD_STYLE = "rule"

GROUND_TRUTH = pa.struct([
    pa.field("question", pa.string()),
    pa.field("choices", pa.list_(pa.string())),
    pa.field("answer", pa.string()),
])
PUBLISHED_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
    pa.field("prompt", pa.list_(pa.struct([pa.field("content", pa.string()), pa.field("role", pa.string())]))),
    pa.field("data_source", pa.string()),
    pa.field("reward_model", pa.struct([pa.field("ground_truth", pa.list_(GROUND_TRUTH)),
                                        pa.field("style", pa.string())])),
])
"""The published row layout, field for field (see the module docstring)."""

IMAGES_DIR = "images"


# -- export -----------------------------------------------------------------------------------
def ground_truth(row: dict[str, Any], style: str = "paren") -> dict[str, Any]:
    """A qa row as a published question: choices lettered in `style` (pipeline.mcq.CHOICE_STYLES), answer letter."""
    return {"question": row["question"], "choices": lettered_choices(row["options"], style), "answer": row["answer"]}


def published_prompt() -> list[dict[str, str]]:
    return [{"content": IMAGE_PLACEHOLDER + CAPTION_PROMPT, "role": "user"}]


def export_batches(config: RunConfig, storage: Storage, data_source: str = DATA_SOURCE, style: str = "paren"
                   ) -> Iterator[list[dict[str, Any]]]:
    """Published rows, one list per committed qa shard with kept questions (shard, then key order)."""
    for shard in sorted(storage.committed(OUTPUT_DIR)):
        rows = shardio.read_manifest(storage.url(OUTPUT_DIR, f"{shard_name(shard)}.parquet"), storage.storage_options)
        kept: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r["kept"] and r["status"] == "ok":
                kept.setdefault(r["key"], []).append(r)
        if not kept:
            continue
        src = resolve_input(config, storage, shard, pattern=config.qa.input_pattern,
                            pattern_options=config.qa.input_storage_options, setting="qa.input_pattern")
        batch = []
        for sample in shardio.read_samples(src.tar_url, src.storage_options):
            if sample.key not in kept or sample.image is None:
                continue
            questions = sorted(kept.pop(sample.key), key=lambda r: r["question_index"])
            batch.append({
                "id": sample.key,
                "image": {"bytes": sample.image, "path": f"{sample.key}.{sample.image_ext}"},
                "prompt": published_prompt(),
                "data_source": data_source,
                "reward_model": {"ground_truth": [ground_truth(q, style) for q in questions], "style": REWARD_STYLE},
            })
        if kept:
            raise PipelineError(f"qa shard {shard_name(shard)} keeps questions for {len(kept)} image(s) missing "
                                f"from {src.tar_url}, e.g. {next(iter(kept))}")
        yield batch


def export_qa(config: RunConfig, storage: Storage, out: str, data_source: str = DATA_SOURCE,
              storage_options: dict[str, Any] | None = None, style: str = "paren") -> int:
    """Write the published layout to `out` (local path or fsspec URL), one row group per qa shard (only one
    shard's images in memory at a time), choices lettered in `style`; returns the number of rows. A local `out`'s
    folder is created."""
    lettered_choices([], style)  # an unknown style fails before anything is written
    n = 0
    try:
        if shardio.is_local_url(out):
            Path(out.removeprefix("file://")).parent.mkdir(parents=True, exist_ok=True)
        sink = shardio.open_url(out, "wb", storage_options)
    except OSError as exc:
        raise PipelineError(f"cannot write --out {out}: {exc.strerror or exc}") from None
    with sink as f, pq.ParquetWriter(f, PUBLISHED_SCHEMA, compression="zstd") as writer:
        for batch in export_batches(config, storage, data_source, style):
            writer.write_table(pa.Table.from_pylist(batch, schema=PUBLISHED_SCHEMA))
            n += len(batch)
    return n


# -- import -----------------------------------------------------------------------------------
def check_published(schema: pa.Schema) -> None:
    """Refuse a file that lacks the published fields the import needs."""
    for name in ("image", "reward_model"):
        if name not in schema.names:
            raise PipelineError(f"not a CapRL-QA layout: no column {name!r} (has {', '.join(schema.names)})")


def _image_ext(data: bytes, path: str | None) -> str:
    if path and "." in path:
        ext = path.rsplit(".", 1)[1].lower()
        if ext in shardio.IMAGE_EXTS:
            return ext
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
    except Exception:  # noqa: BLE001 - unreadable bytes keep a neutral extension; qa reports them
        fmt = ""
    return {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "gif", "bmp": "bmp", "tiff": "tif"}.get(fmt, "jpg")


def import_qa(config: RunConfig, storage: Storage, source: str, storage_options: dict[str, Any] | None = None,
              out=None) -> list[int]:
    """Cut a published file into committed image + qa shards of `config.shard_size` rows; returns the shards."""
    try:
        with shardio.open_url(source, "rb", storage_options) as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        raise PipelineError(f"{source} does not exist") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise PipelineError(f"cannot read {source} as parquet: {exc}") from None
    check_published(table.schema)
    storage.check_reachable()
    storage.ensure_run_meta({"shard_size": config.shard_size})
    count = -(-table.num_rows // config.shard_size)
    taken = sorted(s for stage in ("download", OUTPUT_DIR) for s in storage.committed(stage) if s < count)
    if taken:
        raise PipelineError(f"{storage.root_url} already has committed shards among 0-{count - 1} "
                            f"(e.g. {shard_name(taken[0])}); import into a fresh --root")
    fingerprint = "imported:" + hashlib.sha256(f"{source}|{table.num_rows}".encode()).hexdigest()[:16]
    size = config.shard_size
    shards = []
    for shard, start in enumerate(range(0, table.num_rows, size)):
        rows = table.slice(start, size).to_pylist()
        download_marker = _commit_images(config, storage, shard, rows, source)
        stats = _commit_qa(storage, shard, rows, download_marker, fingerprint, source)
        shards.append(shard)
        if out is not None:
            print(f"import-qa {shard_name(shard)}: {len(rows)} images, {stats.extra['kept']} questions", file=out)
    return shards


def _questions(row: dict[str, Any]) -> list[Any]:
    rm = row.get("reward_model") or {}
    gt = rm.get("ground_truth") if isinstance(rm, dict) else None
    if isinstance(gt, str):
        gt = json.loads(gt)
    return list(gt or [])


def _commit_images(config: RunConfig, storage: Storage, shard: int, rows: list[dict[str, Any]],
                   source: str) -> dict[str, Any]:
    txn = storage.begin("download", shard)
    name = shard_name(shard)
    samples, meta_rows = [], []
    for i, row in enumerate(rows):
        key = sample_key(shard, i)
        image = row.get("image") or {}
        data = image.get("bytes") if isinstance(image, dict) else image
        data = bytes(data or b"")
        ext = _image_ext(data, image.get("path") if isinstance(image, dict) else None)
        meta = {"key": key, "id": None if row.get("id") is None else str(row["id"]), "url": None,
                "status": "success", "sha256": hashlib.sha256(data).hexdigest(), "source": source,
                "data_source": row.get("data_source"),
                "mcqs": json.dumps(_questions(row), sort_keys=True, default=str)}
        samples.append((key, [(ext, data), ("json", json.dumps(meta, sort_keys=True).encode())]))
        meta_rows.append({**meta, "error_message": None})
    shardio.write_tar(txn.path(f"{IMAGES_DIR}/{name}.tar"), samples)
    pq.write_table(pa.Table.from_pylist(meta_rows), txn.path(f"{IMAGES_DIR}/{name}.parquet"), compression="zstd")
    with open(txn.path(f"{IMAGES_DIR}/{name}_stats.json"), "w") as f:
        json.dump({"stage": "download", "unit": name, "rows": len(rows), "imported_from": source}, f, sort_keys=True)
    return txn.commit({"config_fingerprint": config.fingerprint("download"), "config": config.semantic("download"),
                       "inputs": {}, "imported_from": source,
                       "rows": {"total": len(rows), "ok": len(rows), "failed": 0},
                       "stats": {"rows": len(rows), "ok": len(rows), "errors": {}}})


def _commit_qa(storage: Storage, shard: int, rows: list[dict[str, Any]], download_marker: dict[str, Any],
               fingerprint: str, source: str) -> ShardStats:
    txn = storage.begin(OUTPUT_DIR, shard)
    name = shard_name(shard)
    out = []
    for i, row in enumerate(rows):
        key = sample_key(shard, i)
        image = row.get("image") or {}
        data = bytes((image.get("bytes") if isinstance(image, dict) else image) or b"")
        base = {"key": key, "url": None, "sha256": hashlib.sha256(data).hexdigest(), "source": "imported",
                "pipeline_version": code_version()}
        questions = _questions(row)
        if not questions:
            out.append({**base, "kept": False, "reject_reason": "no_questions", "status": "error",
                        "error_reason": "no_questions", "error": "the published row has no ground_truth"})
        for j, item in enumerate(questions):
            try:
                q = stored_mcq(item, "imported")
            except (KeyError, TypeError, ValueError) as exc:
                out.append({**base, "question_index": j, "raw": json.dumps(item, default=str, sort_keys=True),
                            "kept": False, "reject_reason": "parse_error", "status": "error",
                            "error_reason": "parse_error", "error": str(exc)})
                continue
            out.append({**base, "question_index": j, "question_id": q.id, "question": q.question,
                        "options": list(q.options), "answer": q.answer, "qtype": q.qtype or None,
                        "kept": True, "status": "ok"})
    shardio.write_manifest(out, QA_SCHEMA, txn.path(f"{OUTPUT_DIR}/{name}.parquet"))
    stats = ShardStats.from_statuses([r["status"] for r in out], [r.get("error_reason") for r in out])
    stats.extra = {"images": len(rows), "kept": sum(r["kept"] for r in out), "imported_from": source}
    with open(txn.path(f"{OUTPUT_DIR}/{name}_stats.json"), "w") as f:
        json.dump({"stage": OUTPUT_DIR, "unit": name, **stats.to_dict()}, f, indent=2, sort_keys=True)
    txn.commit({"config_fingerprint": fingerprint, "inputs": {f"download/{name}": marker_digest(download_marker)},
                "imported_from": source, "rows": {"total": stats.rows, "ok": stats.ok, "failed": stats.failed},
                "stats": stats.to_dict()})
    return stats
