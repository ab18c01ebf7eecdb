"""The shard I/O module: hostile input tars, deterministic writing, manifests through declared schemas."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import shardio
from pipeline.config import load_config
from pipeline.runner import run_stage
from tests.annotate_support import scene_rows


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def hostile_tar(path: Path) -> list[str]:
    """A shard with two good samples around every kind of hostile member; returns the good keys."""
    good = scene_rows(2)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "000000000.png", good[0]["image"])
        _add(tar, "000000000.json", b'{"url": "u0"}')
        _add(tar, "../../escape.png", good[1]["image"])
        _add(tar, "/abs/escape2.png", good[1]["image"])
        _add(tar, "sub/../../up.png", good[1]["image"])
        _add(tar, "link.png", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "hard.png", kind=tarfile.LNKTYPE, link="000000000.png")
        _add(tar, "fifo.png", kind=tarfile.FIFOTYPE)
        _add(tar, "dev.png", kind=tarfile.CHRTYPE)
        _add(tar, "new\nline.png", good[1]["image"])
        _add(tar, "back\\slash.png", good[1]["image"])
        _add(tar, "000000005.tar.png", good[1]["image"])  # dotted: key 000000005, extension tar.png
        _add(tar, "000000006.png", good[1]["image"])
    return ["000000000", "000000006"]


def test_reader_never_turns_a_hostile_member_into_a_key(tmp_path):
    path = tmp_path / "h.tar"
    hostile_tar(path)
    samples = list(shardio.read_samples(str(path)))
    reasons = [s.error_reason for s in samples]
    assert reasons.count(shardio.ERR_UNSAFE) == 9
    for s in samples:
        assert shardio.safe_key(s.key), s.key
        if not s.ok:
            assert s.files == {} and re.fullmatch(r"unsafe-\d{6}", s.key)
    ok = {s.key: s for s in samples if s.ok}
    assert set(ok) == {"000000000", "000000005", "000000006"}
    assert set(ok["000000005"].files) == {"tar.png"} and ok["000000005"].image is None
    assert "'../../escape.png'" in next(s.error for s in samples if s.error and "escape.png" in s.error)


def test_truncated_and_repeated_keys_are_rows_not_crashes(tmp_path):
    rows = scene_rows(3)
    path = tmp_path / "t.tar"
    with shardio.TarWriter(str(path)) as w:
        for r in rows:
            w.write(r["key"], {"png": r["image"], "txt": b"x"})
        w.write(rows[0]["key"], {"json": b"{}"})  # the first key again, after others
    samples = list(shardio.read_samples(str(path)))
    assert [s.error_reason for s in samples] == [None, None, None, shardio.ERR_DUPLICATE]
    blob = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(blob[: len(blob) // 2])
    samples = list(shardio.read_samples(str(cut)))
    assert samples[-1].error_reason == shardio.ERR_TRUNCATED and all(s.ok for s in samples[:-1])
    with pytest.raises(shardio.InputShardError):
        list(shardio.read_samples(str(tmp_path / "missing.tar")))


def test_writer_is_deterministic_and_refuses_unsafe_names(tmp_path):
    rows = scene_rows(2)
    for name in ("a.tar", "b.tar"):
        with shardio.TarWriter(str(tmp_path / name)) as w:
            for r in rows:
                w.write(r["key"], {"png": r["image"], "txt": b"caption"})
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        m = tar.getmembers()[0]
        assert (m.mtime, m.mode, m.uid, m.uname) == (shardio.TAR_MTIME, shardio.TAR_MODE, 0, "")
    with shardio.TarWriter(str(tmp_path / "c.tar")) as w:
        for key in ("../x", "/abs", "a\nb", ""):
            with pytest.raises(ValueError, match="unsafe key"):
                w.write(key, {"png": b"x"})
        with pytest.raises(ValueError, match="extension"):
            w.write("k", {"a/b": b"x"})


def test_manifest_through_declared_schema(tmp_path):
    schema = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("n", pa.int32())])
    shardio.write_manifest([{"key": "a", "n": 1}, {"key": "b"}], schema, str(tmp_path / "m.parquet"))
    assert pq.read_table(tmp_path / "m.parquet").schema.equals(schema)
    with pytest.raises(shardio.SchemaError, match="does not declare"):
        shardio.write_manifest([{"key": "a", "nn": 1}], schema, str(tmp_path / "x.parquet"))
    with pytest.raises(shardio.SchemaError):
        shardio.write_manifest([{"key": None}], schema, str(tmp_path / "x.parquet"))
    table = pa.table({"key": ["a"], "n": pa.array([1], pa.int64()), "extra": [1.5]})
    with pytest.raises(shardio.SchemaError, match="undeclared"):
        shardio.write_manifest(table, schema, str(tmp_path / "x.parquet"))
    shardio.write_manifest(table, schema, str(tmp_path / "y.parquet"), allow_extra=True)
    assert pq.read_table(tmp_path / "y.parquet").column_names == ["key", "n", "extra"]


def test_annotate_over_a_hostile_shard_records_rows_and_writes_nothing_outside(tmp_path):
    src = tmp_path / "in" / "deep"
    src.mkdir(parents=True)
    good = hostile_tar(src / "p-00000.tar")
    root = tmp_path / "in" / "deep" / "run"
    config = load_config(None, ["annotate.captioner.backend=noop", "shard_size=20",
                                f"annotate.input_pattern={src}/p-{{shard:05d}}.tar"], root=str(root))
    before = {p for p in tmp_path.rglob("*")}
    out = io.StringIO()
    report = run_stage(config, "annotate", [0], progress=False, out=out)
    assert report.committed == [0], out.getvalue()
    assert "Traceback" not in out.getvalue()
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(p.is_relative_to(root) for p in created), sorted(map(str, created))
    assert not any(p.name.startswith(("escape", "up")) for p in tmp_path.rglob("*"))
    rows = pq.read_table(root / "captions" / "00000.parquet").to_pylist()
    unsafe = [r for r in rows if r["error_reason"] == "unsafe_member"]
    assert len(unsafe) == 9 and all(re.fullmatch(r"unsafe-\d{6}", r["key"]) for r in unsafe)
    assert [r["key"] for r in rows if r["status"] == "ok"] == good
    with tarfile.open(root / "captions" / "00000.tar") as tar:
        names = tar.getnames()
    assert names and all(re.fullmatch(r"[0-9]{9}\.(png|txt|json)", n) for n in names), names
