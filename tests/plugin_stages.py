"""Two small plugin stages for the scheduling tests, registered through a manifest's `stages:` mapping.

- `fetch` (like download): reads the URL list in `extra.fetch.urls`, fetches the rows of its shard over
  HTTP and writes `fetched/<shard>.tar` (<key>.png + <key>.json) and `fetched/<shard>.parquet` (one row
  per input row, status ok/error). A shard listed in `extra.hold.shards` waits while the file
  `extra.hold.file` exists (at most 120 s): a deterministic "slow shard" to cancel mid-way.
  `extra.hold` is not fetch's config section, so it does not change the fingerprint.
- `digest` (like annotate): reads the download stage's image tar of the same shard and writes
  `digests/<shard>.parquet` with each image's size and mean colour. A corrupt input tar fails the shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.shards import sample_key, shard_name
from pipeline.stage import Input, ShardContext, ShardStats, Stage


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _hold(ctx: ShardContext, shard: int) -> None:
    hold = ctx.config.extra.get("hold") or {}
    if shard not in hold.get("shards", []):
        return
    deadline = time.monotonic() + 120
    while os.path.exists(hold["file"]) and time.monotonic() < deadline:
        time.sleep(0.05)


def fetch_shard(ctx: ShardContext, shard: int) -> ShardStats:
    """Fetch the URLs of one shard into a tar + a per-row parquet."""
    section = ctx.config.extra.get("fetch") or {}
    size = ctx.config.shard_size
    rows = pq.read_table(section["urls"]).to_pylist()[shard * size : (shard + 1) * size]
    if not rows:
        raise ValueError(f"shard {shard_name(shard)} is past the end of the URL list ({section['urls']})")
    out_rows, statuses, reasons = [], [], []
    with tarfile.open(ctx.output(".tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, row in enumerate(rows):
            key = sample_key(shard, i)
            _hold(ctx, shard)
            try:
                with urllib.request.urlopen(row["url"], timeout=10) as resp:
                    data = resp.read()
                status, error = "ok", None
            except urllib.error.HTTPError as exc:
                data, status, error = b"", "error", f"http {exc.code}"
            except OSError as exc:
                data, status, error = b"", "error", f"{type(exc).__name__}"
            meta = {"key": key, "url": row["url"], "status": status, "scene_id": row.get("scene_id")}
            if status == "ok":
                meta["sha256"] = hashlib.sha256(data).hexdigest()
                _add(tar, f"{key}.png", data)
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
            out_rows.append({**meta, "error": error, "sha256": meta.get("sha256")})
            statuses.append(status)
            reasons.append(error)
    pq.write_table(pa.Table.from_pylist(out_rows), ctx.output(".parquet"))
    return ShardStats.from_statuses(statuses, reasons)


def digest_shard(ctx: ShardContext, shard: int) -> ShardStats:
    """Size and mean colour of every image in fetch's shard."""
    marker = ctx.require_input("download")
    tar_rel = next(rel for rel in marker["outputs"] if rel.endswith(".tar"))
    out = []
    with ctx.storage.open(tar_rel) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.name.endswith((".png", ".jpg", ".webp")):
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            img = Image.open(io.BytesIO(data)).convert("RGB")
            mean = [round(float(v), 3) for v in np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(axis=0)]
            out.append({"key": member.name.rsplit(".", 1)[0], "status": "ok", "width": img.width, "height": img.height,
                        "mean_rgb": json.dumps(mean)})
    pq.write_table(pa.Table.from_pylist(out), ctx.output(".parquet"))
    return ShardStats(rows=len(out), ok=len(out))


fetch = Stage(name="fetch", output_dir="fetched", run_shard=fetch_shard)
digest = Stage(name="digest", output_dir="digests", inputs=(Input("download"),), run_shard=digest_shard)

STAGES = {"fetch": "tests.plugin_stages:fetch", "digest": "tests.plugin_stages:digest"}
"""The manifest `stages:` mapping that registers both."""
