"""Submission records under ROOT/logs, whichever executor wrote them: one listing, then concurrent reads.

A SLURM submission has a folder `logs/<stage>-<time>/` with `submission.json` (plus its script and task logs);
a Ray submission writes `logs/<stage>-<time>.submit.json` beside its plan, as SLURM submissions of earlier
versions did. A record without an `executor` field is SLURM's (written before there were others).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pipeline.markers import read_blobs
from pipeline.storage import LOGS_DIR, Storage

if TYPE_CHECKING:
    from pipeline.config import RunConfig

RECORD_NAME = "submission.json"
SUBMISSION_SUFFIX = ".submit.json"
DEFAULT_EXECUTOR = "slurm"


def executor_of(record: dict[str, Any]) -> str:
    """The executor a submission record belongs to."""
    return str(record.get("executor") or DEFAULT_EXECUTOR)


def submissions(storage: Storage, stage: str | None = None) -> list[dict[str, Any]]:
    """Recorded submissions under ROOT/logs (oldest first), optionally of one stage."""
    logs = storage.path(LOGS_DIR)
    storage.fs.invalidate_cache(logs)
    try:
        entries = storage.fs.ls(logs, detail=True)
    except FileNotFoundError:
        return []
    paths = []
    for info in entries:
        path = str(info["name"]).rstrip("/")
        base = path.rsplit("/", 1)[-1]
        if stage is not None and not base.startswith(f"{stage}-"):
            continue
        if info.get("type") == "directory":
            paths.append(f"{path}/{RECORD_NAME}")
        elif base.endswith(SUBMISSION_SUFFIX):
            paths.append(path)
    records = []
    for blob in read_blobs(storage.fs, paths).values():
        try:
            record = json.loads(blob) if blob is not None else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and (stage is None or record.get("stage") == stage):
            records.append(record)
    return sorted(records, key=lambda r: r.get("submitted_at", ""))


def last_submission(config: RunConfig, stage: str) -> dict[str, Any] | None:
    """The newest submission record of `stage` under ROOT/logs, or None."""
    records = submissions(Storage(config.root, config.storage_options, config.work_dir), stage)
    return records[-1] if records else None
