"""Where a stage's image shard k comes from: the committed download shard, or a WebDataset URL pattern.

A pattern maps shard ids onto URLs in one of two ways:
- a brace range, as webdataset and img2dataset write them: `s3://bucket/{00000..00999}.tar`;
  shard k is the k-th URL of the expansion;
- a template with a `{shard}` field: `/data/part-{shard:05d}.tar`; shard k is the formatted URL.
An img2dataset-style sidecar parquet next to the tar (same name, .parquet) is read when present.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import IO, Any

from braceexpand import braceexpand

from pipeline import shardio
from pipeline.config import RunConfig
from pipeline.errors import ConfigError, MissingInputError
from pipeline.shards import shard_name
from pipeline.storage import Storage

IMAGES_DIR = "images"


@dataclass
class InputShard:
    """One input WebDataset shard: its tar, optional sidecar parquet, and the upstream stage to require."""

    tar_url: str
    parquet_url: str | None
    storage_options: dict[str, Any] = field(default_factory=dict)
    upstream_stage: str | None = None

    @property
    def is_local(self) -> bool:
        return shardio.is_local_url(self.tar_url)

    def open(self) -> IO[bytes]:
        try:
            return shardio.open_url(self.tar_url, "rb", self.storage_options)
        except FileNotFoundError:
            raise MissingInputError(f"input shard {self.tar_url} does not exist") from None

    def sidecar_rows(self) -> dict[str, dict[str, Any]]:
        """key -> row of the sidecar parquet ({} when there is none or it has no key column)."""
        if not self.parquet_url:
            return {}
        rows = shardio.read_optional_manifest(self.parquet_url, self.storage_options) or []
        return {str(r["key"]): r for r in rows if r.get("key") is not None}


@lru_cache(maxsize=8)
def expand_pattern(pattern: str) -> tuple[str, ...]:
    """All URLs of a brace pattern, in order."""
    return tuple(braceexpand(pattern))


def pattern_url(pattern: str, shard: int, setting: str = "annotate.input_pattern") -> str:
    """The URL of shard `shard` under a pattern (see the module docstring)."""
    if "{shard" in pattern:
        try:
            return pattern.format(shard=shard)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"{setting} {pattern!r} cannot be formatted with shard={shard}: {exc}") from None
    urls = expand_pattern(pattern)
    if len(urls) == 1 and "{" not in pattern:
        raise ConfigError(
            f"{setting} {pattern!r} names one file; use a brace range like "
            "'s3://bucket/{00000..00099}.tar' or a '{shard:05d}' template"
        )
    if shard >= len(urls):
        raise ConfigError(
            f"shard {shard} is outside {setting} {pattern!r}, which expands to {len(urls)} shard(s) (0-{len(urls) - 1})"
        )
    return urls[shard]


def pattern_shard_count(pattern: str | None, storage: Storage) -> int | None:
    """How many shards a stage reading images has: the run's num_shards from run.json without a pattern;
    None with one (the stage's prepare checks the pattern's range itself, naming the pattern)."""
    if pattern:
        return None
    count = (storage.run_meta() or {}).get("num_shards")
    return count if isinstance(count, int) else None


def _sidecar(url: str) -> str | None:
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if url.endswith(suffix):
            return url[: -len(suffix)] + ".parquet"
    return None


def resolve_input(config: RunConfig, storage: Storage, shard: int, pattern: str | None = None,
                  pattern_options: dict[str, Any] | None = None, setting: str = "annotate.input_pattern") -> InputShard:
    """The image shard that feeds `shard` of a stage reading images: the shard under `pattern` (default
    annotate.input_pattern) when set, else the committed download shard."""
    if pattern is None and setting == "annotate.input_pattern":
        pattern, pattern_options = config.annotate.input_pattern, config.annotate.input_storage_options
    if pattern:
        url = pattern_url(pattern, shard, setting)
        options = pattern_options or (config.storage_options if "://" in url else {})
        return InputShard(tar_url=url, parquet_url=_sidecar(url), storage_options=dict(options))
    name = shard_name(shard)
    return InputShard(
        tar_url=storage.url(IMAGES_DIR, f"{name}.tar"),
        parquet_url=storage.url(IMAGES_DIR, f"{name}.parquet"),
        storage_options=dict(storage.storage_options),
        upstream_stage="download",
    )
