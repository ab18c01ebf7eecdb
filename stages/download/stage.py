"""Stage `download`: a URL list -> image WebDataset shards under ROOT/images, one shard-id space.

prepare   reads and fingerprints the URL list once, records shard_size / input_fingerprint / num_rows /
          num_shards in run.json (refusing a list or shard size that would renumber an existing run) and
          cuts the list into ROOT/_inputs/00042.parquet, so each task later reads only its own slice.
run_shard fetches shard k = input rows [k*shard_size, (k+1)*shard_size) with img2dataset and writes
          images/00042.tar (ok rows) and images/00042.parquet (every row, ok or with its reason).
retry_shard  re-fetches only the failed rows of a committed shard and merges them in; ok rows are
          copied byte for byte (`python -m pipeline run --stage download --failed-only`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import split_protocol

from pipeline import shardio
from pipeline.config import DownloadConfig, RunConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.redact import redact
from pipeline.shards import MAX_SHARD, format_shard_spec, shard_name
from pipeline.stage import PER_SHARD, Resources, RunContext, ShardContext, ShardStats, Stage
from pipeline.storage import Storage, code_version, now_iso, output_timestamp
from stages.download import imageshards, urllist

if TYPE_CHECKING:  # img2dataset (and through it torch) is imported only by the functions that fetch
    from stages.download.fetch import FetchOptions

OUTPUT_DIR = "images"

INPUTS_DIR = "_inputs"
INPUTS_META = f"{INPUTS_DIR}/_meta.json"
_RESOURCE = "download.inputs"
CUT_POLL_S = 2.0
"""How often a task waiting for another task's cut of the URL list looks for it."""


class ShardRangeError(PipelineError):
    """A shard id beyond the end of the URL list."""


# -- the input cut ------------------------------------------------------------------------------

def prepare(run: RunContext) -> None:
    """Fingerprint and cut the URL list (once per list), guard run.json, refuse shards beyond the input."""
    meta = ensure_inputs(run.config, run.storage)
    run.resources[_RESOURCE] = meta
    if meta.get("unused_columns"):
        print(f"download: the URL list's column(s) {', '.join(meta['unused_columns'])} are not kept in the shards; "
              "name the ones to keep in download.save_additional_columns", file=sys.stderr)
    check_range(run.shards, meta, run.config.shard_size)


def ensure_inputs(config: RunConfig, storage: Storage) -> dict[str, Any]:
    """The input cut's metadata; reads the list and writes ROOT/_inputs only when the list or its selection changed."""
    cfg = config.download
    if not cfg.urls:
        raise ConfigError("download.urls is not set: name the URL list in the manifest or with --set download.urls=PATH")
    _check_columns(cfg)
    options = input_storage_options(config)
    # run metadata names the list without its credentials (a signed URL's token is masked): pipeline.redact
    selection = redact({"urls": cfg.urls, "format": cfg.input_format, "url_col": cfg.url_col,
                        "caption_col": cfg.caption_col, "extra": list(cfg.save_additional_columns),
                        "shard_size": config.shard_size})
    ident = redact(urllist.identity(cfg.urls, cfg.input_format, options))
    cached = storage.read_json(INPUTS_META)
    if cached and cached.get("complete") and cached.get("identity") == ident and cached.get("selection") == selection:
        storage.ensure_run_meta(_run_meta(cached), must_match=("shard_size", "input_fingerprint"))
        return cached
    urls = urllist.read_url_list(cfg.urls, cfg.input_format, cfg.url_col, cfg.caption_col,
                                 list(cfg.save_additional_columns), options)
    if urls.num_rows == 0:
        raise urllist.InputError(f"URL list {cfg.urls} has no rows")
    count = urllist.num_shards(urls.num_rows, config.shard_size)
    if count - 1 > MAX_SHARD:
        raise ConfigError(f"{urls.num_rows} rows at shard_size {config.shard_size} make {count} shards, "
                          f"more than the {MAX_SHARD + 1} shard ids; raise shard_size")
    meta = {"input_fingerprint": urls.fingerprint, "num_rows": urls.num_rows, "num_shards": count,
            "unused_columns": urls.unused,
            "shard_size": config.shard_size, "format": urls.format, "files": redact(urls.files),
            "identity": ident, "selection": selection}
    # Refuse before touching _inputs: a different list or shard size would renumber the run's shards.
    storage.ensure_run_meta(_run_meta(meta), must_match=("shard_size", "input_fingerprint"))
    return _cut_once(storage, urls.table, config, meta)


def _cut_once(storage: Storage, table: pa.Table, config: RunConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """Cut the list under a claim, so that of the many array tasks that start on a fresh root one cuts and the
    others wait for its `_meta.json` (instead of every task writing every slice at once)."""
    from pipeline.claims import ClaimHeld
    from pipeline.runner import Heartbeat

    deadline = time.monotonic() + config.claim_stale_s + 60
    while True:
        try:
            claim = storage.acquire(INPUTS_DIR, "cut", config.claim_stale_s)
        except ClaimHeld as held:
            if time.monotonic() > deadline:
                raise PipelineError(f"the URL list is being cut by {held.who} for too long; rerun when it is done "
                                    f"(or remove {storage.url(storage.claim_rel(INPUTS_DIR, 'cut'))})") from None
            time.sleep(CUT_POLL_S)
            cached = storage.read_json(INPUTS_META)
            if cached and cached.get("complete") and _same_cut(cached, meta):
                return cached
            continue
        try:
            cached = storage.read_json(INPUTS_META)
            if cached and cached.get("complete") and _same_cut(cached, meta):
                return cached  # another task cut it while we waited for the claim
            with Heartbeat(claim):
                _cut(storage, table, config.shard_size, meta["num_shards"])
                storage.write_json(INPUTS_META, {**meta, "complete": True, "cut_at": now_iso()})
            return meta
        finally:
            claim.release()


def _same_cut(cached: dict[str, Any], meta: dict[str, Any]) -> bool:
    return all(cached.get(k) == meta.get(k) for k in ("identity", "selection", "input_fingerprint", "num_shards"))


def _run_meta(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta[k] for k in ("shard_size", "input_fingerprint", "num_rows", "num_shards")}


def _check_columns(cfg: DownloadConfig) -> None:
    bad = [c for c in cfg.save_additional_columns if c in imageshards.RESERVED]
    if bad:
        raise ConfigError(f"download.save_additional_columns may not use the reserved name(s) {', '.join(bad)}; "
                          f"reserved: {', '.join(imageshards.RESERVED)}")
    if len(set(cfg.save_additional_columns)) != len(cfg.save_additional_columns):
        raise ConfigError("download.save_additional_columns lists a column twice")


def input_storage_options(config: RunConfig) -> dict[str, Any]:
    """fsspec options for the URL list: its own, or the root's when both live on the same protocol."""
    cfg = config.download
    if cfg.input_storage_options is not None:
        return cfg.input_storage_options
    same = (split_protocol(cfg.urls or "")[0] or "file") == (split_protocol(config.root)[0] or "file")
    return config.storage_options if same else {}


def _cut(storage: Storage, table: pa.Table, shard_size: int, count: int) -> None:
    """Write ROOT/_inputs/<shard>.parquet for every shard (atomic writes; parallel on object stores)."""

    def write(shard: int) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(urllist.shard_slice(table, shard, shard_size), sink)
        storage.write_bytes(f"{INPUTS_DIR}/{shard_name(shard)}.parquet", sink.getvalue().to_pybytes())

    with ThreadPoolExecutor(max_workers=1 if storage.is_local else 16) as pool:
        list(pool.map(write, range(count)))


def check_range(shards: list[int], meta: dict[str, Any], shard_size: int) -> None:
    """A clear error for shard ids past the end of the input."""
    beyond = [s for s in shards if s >= meta["num_shards"]]
    if beyond:
        raise ShardRangeError(
            f"shard(s) {format_shard_spec(beyond)} are beyond the input: {meta['num_rows']} rows at shard_size "
            f"{shard_size} make shards 0-{meta['num_shards'] - 1}"
        )


def read_input_slice(storage: Storage, shard: int) -> pa.Table:
    """Shard k's input rows (url, [caption], extras) with an `index` column first (row within the shard)."""
    with storage.open(f"{INPUTS_DIR}/{shard_name(shard)}.parquet") as f:
        table = pq.read_table(f)
    return table.add_column(0, "index", pa.array(range(table.num_rows), pa.int32()))


# -- fetching -------------------------------------------------------------------------------------

def fetch_options(cfg: DownloadConfig) -> FetchOptions:
    from stages.download.fetch import FetchOptions

    return FetchOptions(
        image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_format=cfg.encode_format, encode_quality=cfg.quality, min_image_size=cfg.min_image_size,
        max_image_area=cfg.max_image_area, max_aspect_ratio=cfg.max_aspect_ratio,
        max_decode_pixels=cfg.max_decode_pixels, extract_exif=cfg.extract_exif, timeout_s=cfg.timeout_s,
        threads=cfg.threads, processes=cfg.processes, user_agent_token=cfg.user_agent_token or None,
        disallowed_header_directives=tuple(cfg.disallowed_header_directives),
    )


def _fetch(ctx: ShardContext, rows: list[int], urls: list[str | None]) -> tuple[pa.Table, float, int]:
    """Fetch rows, then up to `retries` more passes over transient failures. (results, seconds, retried)."""
    from stages.download.fetch import TRANSIENT, fetch, shared_pool

    cfg = ctx.config.download
    opts = fetch_options(cfg)
    pool = shared_pool(cfg.processes) if cfg.processes > 1 else None
    t0 = time.perf_counter()
    results = fetch(rows, urls, opts, os.path.join(ctx.txn.staging, "fetch-0"), pool)
    retried = 0
    by_row = dict(zip(rows, urls, strict=True))
    for attempt in range(1, cfg.retries + 1):
        again = [r for r, e in zip(results.column("row").to_pylist(), results.column("error").to_pylist(),
                                   strict=True) if e in TRANSIENT]
        if not again:
            break
        time.sleep(cfg.retry_backoff_s * attempt)
        redo = fetch(again, [by_row[r] for r in again], opts, os.path.join(ctx.txn.staging, f"fetch-{attempt}"), pool)
        retried += len(again)
        keep = results.filter(pc.invert(pc.is_in(results.column("row"), pa.array(again, pa.int64()))))
        results = pa.concat_tables([keep, redo]).sort_by("row")
    return results, time.perf_counter() - t0, retried


def _provenance() -> dict[str, str]:
    return {"pipeline_version": code_version(), "downloaded_at": output_timestamp()}


def _stats(manifest: pa.Table, fetched: int, seconds: float, **extra: Any) -> ShardStats:
    statuses = manifest.column("status").to_pylist()
    ok_fetched = extra.pop("ok_fetched")
    stats = ShardStats.from_statuses(statuses, manifest.column("error").to_pylist())
    stats.bytes_out = int(pc.sum(manifest.column("bytes")).as_py() or 0)
    stats.extra = {"fetched": fetched, "fetch_seconds": round(seconds, 3),
                   "images_per_s": round(ok_fetched / seconds, 1) if seconds > 0 else None, **extra}
    return stats


def _write(ctx: ShardContext, manifest: pa.Table, samples: Iterable[imageshards.Members]) -> int:
    """Write the shard's tar (streaming the samples) and manifest into staging; returns the tar's sample count."""
    count = shardio.write_tar(ctx.output(".tar"), samples)
    shardio.write_manifest(manifest, imageshards.IMAGE_SCHEMA, ctx.output(".parquet"), allow_extra=True)
    return count


# -- the stage ------------------------------------------------------------------------------------

def run_shard(ctx: ShardContext, shard: int) -> ShardStats:
    """Fetch every row of shard k and write images/<k>.tar + images/<k>.parquet (one manifest row per input row)."""
    meta = ctx.resource(_RESOURCE, lambda: ensure_inputs(ctx.config, ctx.storage))
    check_range([shard], meta, ctx.config.shard_size)
    inputs = read_input_slice(ctx.storage, shard)
    rows = inputs.column("index").to_pylist()
    results, seconds, retried = _fetch(ctx, rows, inputs.column("url").to_pylist())
    manifest, samples = imageshards.build(shard, inputs, results, ctx.config.download.encode_format, _provenance())
    written = _write(ctx, manifest, samples)
    return _stats(manifest, len(rows), seconds, ok_fetched=written, transient_retried=retried)


def retry_shard(ctx: ShardContext, shard: int, previous_marker: dict[str, Any]) -> ShardStats:
    """Re-fetch only the failed rows of committed shard k and merge them in; ok rows stay byte-identical."""
    name = shard_name(shard)
    with ctx.storage.open(f"{OUTPUT_DIR}/{name}.parquet") as f:
        old = pq.read_table(f)
    failed = old.filter(pc.not_equal(old.column("status"), "ok"))
    columns = ["index", "url"] + (["caption"] if "caption" in old.column_names else []) + imageshards.extra_columns(old)
    inputs = failed.select(columns)
    rows = inputs.column("index").to_pylist()
    results, seconds, retried = _fetch(ctx, rows, inputs.column("url").to_pylist())
    new, samples = imageshards.build(shard, inputs, results, ctx.config.download.encode_format, _provenance())
    manifest = imageshards.merge(old, new)
    kept_count = len(old) - len(failed)
    with ctx.storage.open(f"{OUTPUT_DIR}/{name}.tar") as f:  # kept samples stream through byte for byte
        kept = ((s.key, list(s.files.items())) for s in shardio.iter_tar(f, name) if s.ok)
        written = _write(ctx, manifest, imageshards.merge_samples(kept, samples))
    return _stats(manifest, len(rows), seconds, ok_fetched=written - kept_count, transient_retried=retried,
                  recovered=written - kept_count, retry_of=previous_marker.get("committed_at"))


STAGE = Stage(
    name="download",
    output_dir=OUTPUT_DIR,
    kind=PER_SHARD,
    inputs=(),
    schema=imageshards.IMAGE_SCHEMA,
    run_shard=run_shard,
    retry_shard=retry_shard,
    prepare=prepare,
    shard_count=lambda config, storage: None,  # prepare checks the shards against the URL list itself
    resources=Resources(),
    description="URL lists -> image WebDataset shards (img2dataset)",
)
