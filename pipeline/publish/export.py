"""export: a root's committed captions with their images, in the formats trainers and the Hub load.

    python -m pipeline export [ROOT] --format hf|llava|sharegpt|webdataset --out DIR_OR_URL
                              [--where EXPR] [--limit N] [--shards SPEC] [--no-dedup]

Rows: every ok row of the committed caption manifests (the `--where` expression language of browse), shard by
shard in key order, each with the image stored in its caption tar; an image whose bytes' sha256 was exported
already is skipped (`--no-dedup` keeps it). Memory is bounded: one shard's manifest rows and one output batch
at a time (a shard has at most shard_size rows), plus 16 bytes per exported image for the dedup set.

Formats (every one gets README.md, the dataset card, and export.json):
- hf: data/train-NNNNN.parquet with the image bytes embedded (an `image` struct {bytes, path} that the
  parquet's Hugging Face feature metadata declares an Image, so `load_dataset(DIR)` decodes it), the caption,
  the prompt and the provenance and source columns; files roll over at --max-file-mb. Parquet rather than
  WebDataset tars: the Hub's viewer and `load_dataset` read it with typed columns (quality, licence) that a
  `--where` on the loaded dataset can use, and one file holds many rows without a per-sample member.
- llava: llava.json, a list of {id, image, conversations: [{from: human, value: "<image>\\n" + prompt},
  {from: gpt, value: caption}], meta}; images under images/<shard>/<key>.<ext>.
- sharegpt: sharegpt.json, a list of {messages: [{role: user, content: "<image>" + prompt}, {role: assistant,
  content: caption}], images: [path], meta} (LLaMA-Factory's multimodal sharegpt layout); images as llava.
- webdataset: NNNNN.tar of --samples-per-tar samples (<key>.<ext>, <key>.txt, <key>.json).

Atomic: files are written to DIR.partial (local) or uploaded under URL.partial/ (object stores) and moved into
place at the end, export.json last; a local move is one rename, so a killed export leaves no DIR at all, and on
an object store DIR has no export.json and no README.md until every data file is in place. A rerun clears a
killed export's leftovers and starts over; an existing complete export is replaced only with --force.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import shardio
from pipeline.publish.card import dataset_card
from pipeline.publish.rows import Record, Selection, Tally, records
from pipeline.publish.source import CommittedSource, PublishError
from pipeline.storage import code_version, now_iso

MARKER = "export.json"
CARD = "README.md"


# -- the output folder --------------------------------------------------------------------------------
class Staging:
    """The export folder in progress. Writers get a local path per file (`local(rel)`) and call `done(rel)`
    when it is complete; `finish()` moves everything into place, the marker last."""

    def __init__(self, out: str, storage_options: dict[str, Any] | None, force: bool, work_dir: str | None):
        self.out = out.rstrip("/")
        self.remote = not shardio.is_local_url(self.out)
        self.fs, self.path = shardio.url_fs(self.out, storage_options)
        self.partial = self.path + ".partial"
        self.files: dict[str, int] = {}
        self._prepare(force)
        self.work = tempfile.mkdtemp(prefix="caprl-export-", dir=work_dir) if self.remote else self.partial
        os.makedirs(self.work, exist_ok=True)

    def _prepare(self, force: bool) -> None:
        """Clear a killed export's leftovers; refuse to overwrite a complete export or a foreign folder."""
        self.fs.invalidate_cache()
        leftover = self.fs.exists(self.partial)
        if self.fs.exists(f"{self.path}/{MARKER}"):
            if not force:
                raise PublishError(f"{self.out} is a complete export already; pass --force to replace it")
        elif self._nonempty(self.path) and not force and not (leftover and self.remote):
            # locally a killed export never leaves DIR (one rename); on an object store, DIR beside a leftover
            # .partial/ is a move cut short
            raise PublishError(f"{self.out} exists and is not an export of this command; choose another --out "
                               "(or --force to replace it)")
        if leftover:
            self._remove(self.partial)

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()

    def _nonempty(self, path: str) -> bool:
        try:
            return bool(self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return False

    def local(self, rel: str) -> str:
        path = os.path.join(self.work, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def done(self, rel: str) -> None:
        """A file is complete: count it, and on an object store upload it under .partial/ and free the disk."""
        local = os.path.join(self.work, rel)
        self.files[rel] = os.path.getsize(local)
        if self.remote:
            self.fs.put_file(local, f"{self.partial}/{rel}")
            os.remove(local)

    def write_bytes(self, rel: str, data: bytes) -> None:
        with open(self.local(rel), "wb") as f:
            f.write(data)
        self.done(rel)

    def finish(self, marker: dict[str, Any]) -> None:
        """Move every file into place (an existing export is replaced), the card and the marker last."""
        marker = {**marker, "files": dict(sorted(self.files.items()))}
        self.write_bytes(MARKER, json.dumps(marker, indent=2, sort_keys=True, default=str).encode())
        if not self.remote:
            old = f"{self.path}.replaced"
            if os.path.lexists(self.path):
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.path, old)
            os.replace(self.partial, self.path)
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            if self.fs.exists(self.path):
                self._remove(self.path)
            last = [r for r in (CARD, MARKER) if r in self.files]
            for rel in [r for r in sorted(self.files) if r not in last] + last:
                self.fs.mv(f"{self.partial}/{rel}", f"{self.path}/{rel}")
            self._remove(self.partial)
        finally:
            shutil.rmtree(self.work, ignore_errors=True)

    def abort(self) -> None:
        """After an error (not a kill): drop what this attempt wrote."""
        shutil.rmtree(self.work, ignore_errors=True)
        if self.remote:
            self._remove(self.partial)


# -- formats -------------------------------------------------------------------------------------------
class _RollingFiles:
    """A writer of numbered files: the open one (`writer`, at `rel`) is closed and published by `_roll`."""

    staging: Staging
    writer: Any = None
    rel = ""
    index = 0

    def _roll(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.staging.done(self.rel)
            self.index += 1


class HFParquet(_RollingFiles):
    """data/train-NNNNN.parquet with embedded images and Hugging Face feature metadata."""

    name = "hf"
    data_files = "data/train-*.parquet"
    COLUMNS = pa.schema([
        pa.field("key", pa.string()),
        pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
        pa.field("caption", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("url", pa.string()), pa.field("sha256", pa.string()),
        pa.field("width", pa.int32()), pa.field("height", pa.int32()),
        pa.field("caption_tokens", pa.int32()), pa.field("finish_reason", pa.string()),
        pa.field("quality", pa.float64()), pa.field("model_id", pa.string()), pa.field("prompt_hash", pa.string()),
        pa.field("sampling", pa.string()), pa.field("pipeline_version", pa.string()),
        pa.field("source_license", pa.string()), pa.field("source_caption", pa.string()),
    ])

    def __init__(self, staging: Staging, max_file_mb: float = 256, rows_per_group: int = 256, **_: Any):
        self.staging, self.max_bytes, self.group = staging, max_file_mb * (1 << 20), rows_per_group
        self.schema = self.COLUMNS.with_metadata({b"huggingface": json.dumps({"info": {"features": _features(
            self.COLUMNS)}}).encode()})
        self.batch: list[dict[str, Any]] = []
        self.batch_bytes = 0

    def write(self, rec: Record) -> None:
        row = {**rec.meta(), "image": {"bytes": rec.image, "path": f"{rec.key}.{rec.ext}"}, "caption": rec.caption,
               "prompt": rec.prompt}
        self.batch.append(row)
        self.batch_bytes += len(rec.image)
        if len(self.batch) >= self.group or self.batch_bytes >= 64 << 20:
            self._flush()

    def _flush(self) -> None:
        if not self.batch:
            return
        if self.writer is None:
            self.rel = f"data/train-{self.index:05d}.parquet"
            self.writer = pq.ParquetWriter(self.staging.local(self.rel), self.schema, compression="zstd")
        self.writer.write_table(pa.Table.from_pylist(self.batch, schema=self.schema))
        self.batch, self.batch_bytes = [], 0
        if os.path.getsize(self.staging.local(self.rel)) >= self.max_bytes:
            self._roll()


    def close(self) -> None:
        self._flush()
        self._roll()


def _features(schema: pa.Schema) -> dict[str, Any]:
    """The `datasets` feature declaration of the export columns (image as an Image feature)."""
    names = {pa.string(): "string", pa.int32(): "int32", pa.float64(): "float64"}
    return {f.name: {"_type": "Image"} if f.name == "image" else {"dtype": names[f.type], "_type": "Value"}
            for f in schema}


class ConversationJSON:
    """A JSON list of conversations (streamed, one entry at a time) and the images beside it."""

    name = "llava"
    data_files = None

    def __init__(self, staging: Staging, **_: Any):
        self.staging = staging
        self.rel = f"{self.name}.json"
        self.file = open(staging.local(self.rel), "w", encoding="utf-8")
        self.file.write("[")
        self.count = 0

    def entry(self, rec: Record, image: str) -> dict[str, Any]:
        return {"id": rec.key, "image": image, "conversations": [
            {"from": "human", "value": f"<image>\n{rec.prompt}"}, {"from": "gpt", "value": rec.caption}],
            "meta": rec.meta()}

    def write(self, rec: Record) -> None:
        image = f"images/{rec.key[:5]}/{rec.key}.{rec.ext}"
        self.staging.write_bytes(image, rec.image)
        self.file.write(("\n" if self.count == 0 else ",\n") + json.dumps(self.entry(rec, image), ensure_ascii=False))
        self.count += 1

    def close(self) -> None:
        self.file.write("\n]\n")
        self.file.close()
        self.staging.done(self.rel)


class ShareGPT(ConversationJSON):
    name = "sharegpt"

    def entry(self, rec: Record, image: str) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": f"<image>{rec.prompt}"},
                             {"role": "assistant", "content": rec.caption}], "images": [image], "meta": rec.meta()}


class WebDatasetTars(_RollingFiles):
    """NNNNN.tar of `samples_per_tar` samples each: <key>.<ext>, <key>.txt, <key>.json."""

    name = "webdataset"
    data_files = "*.tar"

    def __init__(self, staging: Staging, samples_per_tar: int = 1000, **_: Any):
        self.staging, self.per = staging, samples_per_tar

    def write(self, rec: Record) -> None:
        if self.writer is None:
            self.rel = f"{self.index:05d}.tar"
            self.writer = shardio.TarWriter(self.staging.local(self.rel))
        meta = {**rec.meta(), "prompt": rec.prompt}
        self.writer.write(rec.key, {rec.ext: rec.image, "txt": rec.caption.encode(),
                                    "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()})
        if self.writer.count >= self.per:
            self._roll()


    def close(self) -> None:
        self._roll()


FORMATS: dict[str, type] = {c.name: c for c in (HFParquet, ConversationJSON, ShareGPT, WebDatasetTars)}


def export(source: CommittedSource, fmt: str, out: str, sel: Selection, force: bool = False,
           options: dict[str, Any] | None = None, stream: TextIO | None = None) -> dict[str, Any]:
    """Write the selected rows in `fmt` to `out` (local path or URL) atomically; returns the export marker."""
    if fmt not in FORMATS:
        raise PublishError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    stream = stream or sys.stderr
    remote_opts = source.storage.storage_options if not shardio.is_local_url(out) else None
    staging = Staging(out, remote_opts, force, source.storage.work_dir)
    tally = Tally()
    try:
        writer = FORMATS[fmt](staging, **(options or {}))
        for rec in records(source, sel, tally):
            writer.write(rec)
        writer.close()
        if tally.rows == 0:
            raise PublishError(f"no committed caption row matches (where {sel.where!r}); nothing exported")
        card, warnings = dataset_card(source, tally, sel, fmt, FORMATS[fmt].data_files)
        for w in warnings:
            print(f"warning: {w}", file=stream)
        staging.write_bytes(CARD, card.encode())
        marker = {"format": fmt, "rows": tally.rows, "matched": tally.matched, "duplicates": tally.duplicates,
                  "missing_image": tally.missing_image, "selection": sel.describe(),
                  "source": source.storage.root_url, "code_version": code_version(), "created_at": now_iso()}
        staging.finish(marker)
    except BaseException:
        staging.abort()
        raise
    return marker
