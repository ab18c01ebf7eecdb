"""Status of a run, read from ROOT alone: per stage, committed / failed / running / pending shards and rows."""

from __future__ import annotations

import sys

from pipeline.config import RunConfig
from pipeline.quality import mean_quality
from pipeline.shards import format_shard_spec
from pipeline.stage import stage_modules
from pipeline.storage import Storage


def collect_status(config: RunConfig, only: str | None = None) -> list[dict]:
    storage = Storage(config.root, config.storage_options, config.work_dir)
    storage.check_reachable(create=False)
    meta = storage.run_meta() or {}
    total = meta.get("num_shards")
    rows = []
    for stage in stage_modules(config):
        if only and stage != only:
            continue
        committed = storage.committed(stage, config.fingerprint(stage))
        markers = storage.markers(stage)
        failed = {s: f for s, f in storage.failures(stage).items() if s not in committed}
        running = {s for s in storage.claims(stage) if s not in committed}
        if not (markers or failed or running) and only is None:
            continue
        ok = sum(m.get("rows", {}).get("ok", 0) for m in committed.values())
        bad = sum(m.get("rows", {}).get("failed", 0) for m in committed.values())
        secs = sum(m.get("stats", {}).get("seconds", 0.0) for m in committed.values())
        quality = mean_quality(committed.values())
        rows.append({
            "stage": stage,
            "committed": len(committed),
            "stale": len(set(markers) - set(committed)),
            "failed": len(failed),
            "running": len(running),
            "pending": (total - len(committed) - len(failed) - len(running)) if total else None,
            "rows_ok": ok,
            "rows_failed": bad,
            "rows_per_s": round((ok + bad) / secs, 1) if secs else None,
            "quality": round(quality, 3) if quality is not None else None,
            "failed_shards": format_shard_spec(failed),
            "failure_reasons": sorted({f.get("error", "?")[:120] for f in failed.values()}),
        })
    return rows


def print_status(config: RunConfig, only: str | None = None, out=sys.stdout) -> int:
    rows = collect_status(config, only)
    if not rows:
        print(f"no stage has run under {config.root}", file=out)
        return 0
    cols = ["stage", "committed", "stale", "failed", "running", "pending", "rows_ok", "rows_failed", "rows_per_s"]
    if any(r.get("quality") is not None for r in rows):
        cols.append("quality")
    widths = {c: max(len(c), *(len(str(r[c] if r[c] is not None else "-")) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols), file=out)
    for r in rows:
        print("  ".join(str(r[c] if r[c] is not None else "-").ljust(widths[c]) for c in cols), file=out)
    for r in rows:
        for reason in r["failure_reasons"]:
            print(f"{r['stage']} failed [{r['failed_shards']}]: {reason}", file=out)
    return 0
