"""`python -m pipeline verify`: check every committed output against the sha256 its marker recorded.

`status` and `run` trust a marker when its outputs have the recorded sizes (one listing, cheap); a flipped
byte keeps the size. `verify` reads every output (in parallel, on any fsspec root), reports the units
whose bytes differ, and with `repair` marks them FAILED (the word `status` then shows): their marker is removed
and a failure record says which file was corrupt, so the next `run` redoes them.
"""

from __future__ import annotations

import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import RunConfig
from pipeline.markers import cat_one
from pipeline.stage import stage_modules
from pipeline.storage import Storage, now_iso, task_identity


@dataclass
class VerifyReport:
    checked_units: int = 0
    checked_files: int = 0
    corrupt: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    """(stage, unit) -> 'rel: why' for every bad output."""
    repaired: list[tuple[str, str]] = field(default_factory=list)


WHOLE_READ_LIMIT = 256 << 20
"""Outputs up to this size are read with one request (`cat_file`); larger ones are streamed."""


def _digest(storage: Storage, rel: str, expected_size: int | None = None) -> tuple[int, str] | None:
    if expected_size is not None and expected_size <= WHOLE_READ_LIMIT:
        try:
            blob = cat_one(storage.fs, storage.path(rel))
        except FileNotFoundError:
            return None
        return len(blob), hashlib.sha256(blob).hexdigest()
    h = hashlib.sha256()
    size = 0
    try:
        with storage.open(rel, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
                size += len(block)
    except FileNotFoundError:
        return None
    return size, h.hexdigest()


def _check(storage: Storage, rel: str, info: dict[str, Any]) -> str | None:
    """Why an output does not match its marker entry, or None."""
    got = _digest(storage, rel, info.get("size"))
    if got is None:
        return f"{rel}: missing"
    size, sha = got
    if size != info.get("size"):
        return f"{rel}: {size} bytes, the marker records {info.get('size')}"
    if info.get("sha256") and sha != info["sha256"]:
        return f"{rel}: sha256 {sha[:12]}..., the marker records {info['sha256'][:12]}..."
    return None


def verify(config: RunConfig, stages: list[str] | None = None, units: set[str] | None = None,
           repair: bool = False, workers: int = 16) -> VerifyReport:
    """Check the committed outputs of `stages` (default all registered) restricted to `units` (unit names)."""
    storage = Storage(config.root, config.storage_options, config.work_dir)
    storage.check_reachable(create=False)
    report = VerifyReport()
    jobs: list[tuple[str, str, str, dict[str, Any]]] = []
    for stage in stages or list(stage_modules(config)):
        markers = storage.unit_markers(stage) if units is None else storage.done.get_many(stage, sorted(units))
        for unit, marker in sorted(markers.items()):
            report.checked_units += 1
            jobs += [(stage, unit, rel, info) for rel, info in marker.get("outputs", {}).items()]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda j: _check(storage, j[2], j[3]), jobs))
    report.checked_files = len(jobs)
    for (stage, unit, _rel, _info), problem in zip(jobs, results, strict=True):
        if problem:
            report.corrupt.setdefault((stage, unit), []).append(problem)
    if repair:
        for (stage, unit), problems in report.corrupt.items():
            storage.remove(storage.marker_rel(stage, unit))
            storage.record_failure(stage, unit, {
                "stage": stage, "unit": unit, "error": "corrupt output: " + "; ".join(problems),
                "error_type": "CorruptOutput", "failed_at": now_iso(), **task_identity(),
            })
            report.repaired.append((stage, unit))
    return report


def print_report(report: VerifyReport, repair: bool, out=None) -> int:
    """Print one line per corrupt unit and a summary; exit code 0 if nothing is (left) corrupt, else 1."""
    out = out or sys.stdout
    for (stage, unit), problems in sorted(report.corrupt.items()):
        state = "CORRUPT, now FAILED (the next run redoes it)" if repair else "CORRUPT"
        print(f"{stage} {unit}: {state}: " + "; ".join(problems), file=out)
    print(f"verified {report.checked_files} file(s) of {report.checked_units} committed unit(s): "
          f"{len(report.corrupt)} corrupt" + (f", {len(report.repaired)} marked FAILED" if repair else ""), file=out)
    return 0 if not report.corrupt or repair else 1
