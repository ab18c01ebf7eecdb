"""WebDataset shards: read samples (grouped by key) from any fsspec URL, write deterministic tars.

A sample is the files sharing a key up to the first dot (`000420017.jpg`, `000420017.txt`,
`000420017.json`), stored next to each other in the tar, as img2dataset and webdataset write them.
Written tars are byte-reproducible: entries in the order given, fixed mtime, owner and mode.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
import webdataset

from pipeline.errors import PipelineError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
READ_BUFFER = 1 << 20
TAR_MTIME = 0
"""mtime of every entry we write: outputs must not depend on when they were written (an int: a float
mtime would cost a pax header per entry)."""


class InputShardError(PipelineError):
    """An input WebDataset shard that cannot be opened or read to its end."""


@dataclass
class Sample:
    """One WebDataset sample: its key and files by extension (without the dot)."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def image_ext(self) -> str | None:
        return next((e for e in IMAGE_EXTS if e in self.files), None)

    @property
    def image(self) -> bytes | None:
        ext = self.image_ext
        return self.files[ext] if ext else None

    @property
    def meta(self) -> dict[str, Any]:
        """The sample's .json (img2dataset metadata), or {} if absent or unreadable."""
        raw = self.files.get("json")
        if not raw:
            return {}
        try:
            value = json.loads(raw)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


def _split_name(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return (name[: len(name) - len(base)] + key), ext


def iter_tar(fileobj: IO[bytes], where: str = "") -> Iterator[Sample]:
    """Samples of a tar stream, in order. Raises InputShardError on a truncated or corrupt tar."""
    current: Sample | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", bufsize=READ_BUFFER) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                if not ext or key.rsplit("/", 1)[-1].startswith("_"):
                    continue
                extracted = tar.extractfile(member)
                data = extracted.read() if extracted is not None else b""
                if current is None or current.key != key:
                    if current is not None:
                        yield current
                    current = Sample(key=key)
                current.files[ext] = data
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InputShardError(f"input shard {where} is corrupt or truncated: {type(exc).__name__}: {exc}") from None
    if current is not None:
        yield current


def read_samples(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[Sample]:
    """Samples of the tar at `url` (local path or fsspec URL), streamed."""
    try:
        if "://" not in url or url.startswith("file://"):
            f: IO[bytes] = open(url.removeprefix("file://"), "rb", buffering=READ_BUFFER)
        else:
            f = fsspec.open(url, "rb", block_size=READ_BUFFER, **(storage_options or {})).open()
    except FileNotFoundError:
        raise InputShardError(f"input shard {url} does not exist") from None
    with f:
        yield from iter_tar(f, url)


class TarSink:
    """A deterministic WebDataset tar writer: `write(key, {ext: bytes})` in the order samples should appear."""

    def __init__(self, path: str):
        self._file = open(path, "wb")
        self._writer = webdataset.TarWriter(self._file, user="caprl", group="caprl", mode=0o444,
                                            encoder=False, mtime=TAR_MTIME)
        self.count = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        self._writer.write({"__key__": key, **files})
        self.count += 1

    def close(self) -> None:
        self._writer.close()
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> TarSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
