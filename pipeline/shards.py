"""Shard ids, shard specs ('0-999', '3,7,10-12'), shard names (00042) and sample keys (000420017)."""

from __future__ import annotations

from collections.abc import Iterable

from pipeline.errors import ShardSpecError

MAX_SHARD = 99_999
"""Shard ids are written with 5 digits."""
MAX_ROWS_PER_SHARD = 10_000
"""Sample keys give the row index within its shard 4 digits."""


def parse_shard_spec(spec: str) -> list[int]:
    """Parse a spec like '0-999', '3,7,10-12' or '5' into sorted shard ids.

    Rejects negatives, reversed ranges, duplicates/overlaps, empty parts and ids above MAX_SHARD.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ShardSpecError("empty shard spec: expected e.g. '0-999', '3,7,10-12' or '5'")
    seen: set[int] = set()
    out: list[int] = []
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            raise ShardSpecError(f"bad shard spec {spec!r}: empty part between commas")
        if part.startswith("-"):
            raise ShardSpecError(f"bad shard spec {spec!r}: negative shard id in {part!r}")
        lo_s, sep, hi_s = part.partition("-")
        lo = _parse_id(lo_s, spec)
        hi = _parse_id(hi_s, spec) if sep else lo
        if hi < lo:
            raise ShardSpecError(f"bad shard spec {spec!r}: reversed range {part!r} (did you mean {hi}-{lo}?)")
        for shard in range(lo, hi + 1):
            if shard in seen:
                raise ShardSpecError(f"bad shard spec {spec!r}: shard {shard} is listed twice")
            seen.add(shard)
            out.append(shard)
    return sorted(out)


def _parse_id(text: str, spec: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()):
        raise ShardSpecError(f"bad shard spec {spec!r}: {text!r} is not a non-negative integer")
    value = int(text)
    if value > MAX_SHARD:
        raise ShardSpecError(f"bad shard spec {spec!r}: shard {value} exceeds the maximum {MAX_SHARD}")
    return value


def format_shard_spec(shards: Iterable[int]) -> str:
    """The shortest spec for a set of shard ids: [0,1,2,5] -> '0-2,5' (inverse of parse_shard_spec)."""
    ids = sorted(set(shards))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def shard_name(shard: int) -> str:
    """The 5-digit file stem of a shard: 42 -> '00042'."""
    if not 0 <= shard <= MAX_SHARD:
        raise ValueError(f"shard id {shard} outside 0..{MAX_SHARD}")
    return f"{shard:05d}"


def sample_key(shard: int, index: int) -> str:
    """The 9-digit key of row `index` in `shard` (img2dataset convention, no dots): (42, 17) -> '000420017'."""
    if not 0 <= index < MAX_ROWS_PER_SHARD:
        raise ValueError(f"row index {index} outside 0..{MAX_ROWS_PER_SHARD - 1}")
    return shard_name(shard) + f"{index:04d}"


def parse_sample_key(key: str) -> tuple[int, int]:
    """Inverse of sample_key: '000420017' -> (42, 17)."""
    if len(key) != 9 or not key.isdigit():
        raise ValueError(f"bad sample key {key!r}: expected 9 digits")
    return int(key[:5]), int(key[5:])


def slice_for_task(shards: list[int], num_tasks: int, task: int) -> list[int]:
    """The contiguous slice of `shards` that array task `task` of `num_tasks` runs (balanced sizes)."""
    if num_tasks < 1 or not 0 <= task < num_tasks:
        raise ValueError(f"task {task} outside 0..{num_tasks - 1}")
    base, extra = divmod(len(shards), num_tasks)
    start = task * base + min(task, extra)
    return shards[start : start + base + (1 if task < extra else 0)]
