"""Plugin stages for the stage-contract tests, declared as any user plugin declares itself.

- `notes` (per-shard, like qa): writes notes/<shard>.parquet with `extra.notes.text` per row of synth's shard.
- `consumer` (per-shard, like annotate): reads synth shard k (required) and notes shard k (optional, like
  annotate's quality monitor reading qa), writes consumed/<shard>.parquet.
- `summary` (whole-run, like train / evaluate): reads every given synth shard, writes summaries/<unit>/
  (a JSON summary and a parquet table); `extra.summary.delay` seconds pass between its two files, so a
  SIGKILL can land while it is half-written.
- `user` (per-shard, like annotate with `captioner.model: train:latest`): reads the committed summary
  folder through `ctx.input_folder`, writes used/<shard>.parquet.
"""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import shardio
from pipeline.shards import shard_name
from pipeline.stage import PER_SHARD, WHOLE_RUN, Input, Resources, ShardContext, ShardStats, Stage

NOTES_SCHEMA = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("note", pa.string()),
                          pa.field("status", pa.string(), nullable=False)])
CONSUMED_SCHEMA = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("note", pa.string()),
                             pa.field("status", pa.string(), nullable=False)])


def _synth_rows(ctx: ShardContext, shard: int) -> list[dict]:
    ctx.require_input("synth", shard)
    return shardio.read_manifest(ctx.storage.url("synth", f"{shard_name(shard)}.parquet"))


def notes_shard(ctx: ShardContext, shard: int) -> ShardStats:
    text = (ctx.config.extra.get("notes") or {}).get("text", "note")
    rows = [{"key": r["key"], "note": f"{text}:{r['key']}", "status": "ok"} for r in _synth_rows(ctx, shard)]
    shardio.write_manifest(rows, NOTES_SCHEMA, ctx.output(".parquet"))
    return ShardStats(rows=len(rows), ok=len(rows))


def consumer_shard(ctx: ShardContext, shard: int) -> ShardStats:
    rows = _synth_rows(ctx, shard)
    notes = {}
    if ctx.optional_input("notes") is not None:
        notes = {r["key"]: r["note"] for r in shardio.read_manifest(ctx.storage.url("notes", f"{shard_name(shard)}.parquet"))}
    out = [{"key": r["key"], "note": notes.get(r["key"]), "status": "ok"} for r in rows]
    shardio.write_manifest(out, CONSUMED_SCHEMA, ctx.output(".parquet"))
    return ShardStats(rows=len(out), ok=len(out))


def summary_run(ctx: ShardContext, shards: list[int]) -> ShardStats:
    delay = float((ctx.config.extra.get("summary") or {}).get("delay", 0.0))
    keys = [r["key"] for s in shards for r in _synth_rows(ctx, s)]
    with open(ctx.output_file("summary.json"), "w") as f:
        json.dump({"shards": shards, "rows": len(keys)}, f, sort_keys=True)
    time.sleep(delay)
    pq.write_table(pa.table({"key": keys}), ctx.output_file("keys.parquet"))
    time.sleep(delay)
    return ShardStats(rows=len(keys), ok=len(keys))


def user_shard(ctx: ShardContext, shard: int) -> ShardStats:
    folder = ctx.input_folder("summary", "all")
    with open(f"{folder}/summary.json") as f:
        summary = json.load(f)
    rows = [{"key": r["key"], "note": f"summary of {summary['rows']} rows", "status": "ok"} for r in _synth_rows(ctx, shard)]
    shardio.write_manifest(rows, CONSUMED_SCHEMA, ctx.output(".parquet"))
    return ShardStats(rows=len(rows), ok=len(rows))


notes = Stage(name="notes", output_dir="notes", kind=PER_SHARD, inputs=(Input("synth"),), schema=NOTES_SCHEMA,
              run_shard=notes_shard)
consumer = Stage(name="consumer", output_dir="consumed", inputs=(Input("synth"), Input("notes", required=False)),
                 schema=CONSUMED_SCHEMA, run_shard=consumer_shard)
summary = Stage(name="summary", output_dir="summaries", kind=WHOLE_RUN, inputs=(Input("synth"),),
                run_whole=summary_run, resources=Resources(gpus=2))
user = Stage(name="user", output_dir="used", inputs=(Input("synth"), Input("summary")), schema=CONSUMED_SCHEMA,
             run_shard=user_shard)

STAGES = {"synth": "tests.stages_for_tests", "notes": "tests.contract_stages:notes",
          "consumer": "tests.contract_stages:consumer", "summary": "tests.contract_stages:summary",
          "user": "tests.contract_stages:user"}
"""The manifest `stages:` mapping that registers them (with the runner tests' synth stage)."""
