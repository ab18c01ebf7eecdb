"""URL lists in every supported format, local files and folders: columns, order, fingerprints, errors."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.download import urllist
from stages.download.urllist import InputError, read_url_list

ROWS = [
    {"url": "http://h/a.jpg", "text": "a cat", "id": 1, "tags": "x"},
    {"url": "http://h/b.jpg", "text": "a dog, sitting", "id": 2, "tags": "y"},
    {"url": "http://h/c.jpg", "text": "", "id": 3, "tags": "z"},
]


def _write(path, fmt: str) -> None:
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        lines = [sep.join(ROWS[0])] + [sep.join(f'"{v}"' if sep in str(v) else str(v) for v in r.values()) for r in ROWS]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "txt":
        path.write_text("".join(r["url"] + "\n" for r in ROWS) + "\n")


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_columns_and_order(tmp_path, fmt):
    path = tmp_path / f"list.{fmt}"
    _write(path, fmt)
    lst = read_url_list(str(path), url_col="url", caption_col="text", extra_cols=["id", "tags"])
    assert lst.format == fmt
    assert lst.table.column_names == ["url", "caption", "id", "tags"]
    assert lst.table.column("url").to_pylist() == [r["url"] for r in ROWS]
    assert lst.table.column("id").to_pylist() == [1, 2, 3]
    caps = lst.table.column("caption").to_pylist()
    assert caps[:2] == ["a cat", "a dog, sitting"] and caps[2] in ("", None)
    assert len(lst.fingerprint) == 64


def test_txt_and_gzip(tmp_path):
    path = tmp_path / "list.txt"
    _write(path, "txt")
    plain = read_url_list(str(path))
    assert plain.table.column_names == ["url"] and plain.num_rows == 3
    gz = tmp_path / "list.txt.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    zipped = read_url_list(str(gz))
    assert zipped.table.equals(plain.table)
    with pytest.raises(InputError, match="plain text"):
        read_url_list(str(path), caption_col="text")


def test_folder_is_read_in_name_order(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "b.txt").write_text("http://h/2\n")
    (tmp_path / "lists" / "a.txt").write_text("http://h/0\nhttp://h/1\n")
    (tmp_path / "lists" / "_SUCCESS").write_text("")
    lst = read_url_list(str(tmp_path / "lists"))
    assert lst.table.column("url").to_pylist() == ["http://h/0", "http://h/1", "http://h/2"]


def test_fingerprint_follows_content(tmp_path):
    path = tmp_path / "list.jsonl"
    _write(path, "jsonl")
    first = read_url_list(str(path)).fingerprint
    assert read_url_list(str(path)).fingerprint == first
    path.write_text(path.read_text() + json.dumps({"url": "http://h/d.jpg"}) + "\n")
    assert read_url_list(str(path)).fingerprint != first


def test_clear_errors(tmp_path):
    path = tmp_path / "list.csv"
    _write(path, "csv")
    with pytest.raises(InputError, match=r"no column\(s\) 'URL'.*columns are: url, text, id, tags"):
        read_url_list(str(path), url_col="URL")
    with pytest.raises(InputError, match="not found"):
        read_url_list(str(tmp_path / "missing.csv"))
    with pytest.raises(InputError, match="cannot tell the format"):
        urllist.detect_format("urls.bin")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"url": "http://h/a"}\nnot json\n')
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        read_url_list(str(bad))


def test_shard_slices():
    table = pa.table({"url": [f"u{i}" for i in range(25)]})
    assert urllist.num_shards(25, 10) == 3
    assert urllist.shard_slice(table, 2, 10).column("url").to_pylist() == ["u20", "u21", "u22", "u23", "u24"]
