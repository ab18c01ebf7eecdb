"""A plugin stage for runner/commit tests: writes a deterministic tar + parquet per shard, row by row.

Registered through the manifest (`stages: {synth: tests.stages_for_tests}`), exactly as a user plugin is.
Settings in `extra.synth`: rows (per shard), delay (seconds per row), bad_input_dir (a shard fails while
a file named after it exists there: planted bad input that can be fixed without changing the config).
"""

from __future__ import annotations

import io
import random
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.nano import world
from pipeline.shards import sample_key
from pipeline.stage import ShardContext, ShardStats, Stage


def run_shard(ctx: ShardContext, shard: int) -> ShardStats:
    opts = ctx.config.extra.get("synth", {})
    rows, delay = int(opts.get("rows", 8)), float(opts.get("delay", 0.0))
    bad = opts.get("bad_input_dir")
    if bad and (Path(bad) / str(shard)).exists():
        raise RuntimeError(f"planted failure in shard {shard}")
    rng = random.Random(shard)
    records = []
    with tarfile.open(ctx.output(".tar"), "w") as tar:
        for i in range(rows):
            key = sample_key(shard, i)
            scene = world.sample_scene(rng)
            png = world.encode(world.render(scene, 32))
            for name, blob in ((f"{key}.png", png), (f"{key}.txt", world.caption(scene).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(blob), 0
                tar.addfile(info, io.BytesIO(blob))
            records.append({"key": key, "status": "ok", "error": None, "caption": world.caption(scene)})
            if delay:
                time.sleep(delay)
    pq.write_table(pa.Table.from_pylist(records), ctx.output(".parquet"))
    return ShardStats(rows=rows, ok=rows)


STAGE = Stage(name="synth", output_dir="synth", run_shard=run_shard, description="synthetic rows for runner tests")
