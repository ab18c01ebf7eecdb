"""browse on a multi-shard ROOT (local and s3): summary = a direct polars count, --where, --sample, --show, a
bad expression; the gallery in headless Chromium (search, paging, screenshot)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline import shardio
from pipeline.cli import main
from pipeline.nano import world
from pipeline.publish.browse import browse
from pipeline.publish.gallery import write_gallery
from pipeline.publish.source import VIEWS, CommittedSource, polars_storage_options
from pipeline.publish.summary import sample_rows, summarize
from pipeline.shards import sample_key, shard_name
from pipeline.storage import Storage
from stages.annotate.stage import CAPTION_SCHEMA
from tests.browser_support import SKIP_REASON, chromium, headless_driver

SHARDS, ROWS = 3, 7
MODELS = ("models/a#sha256:1111", "models/b#sha256:2222")


def _rows(shard: int) -> list[dict]:
    rows = []
    for i in range(ROWS):
        key = sample_key(shard, i)
        n = shard * ROWS + i
        ok = i != 3
        word = "zebra" if n % 5 == 0 else "shape"
        rows.append({
            "key": key, "url": f"http://x/{n}.png", "sha256": f"{n:064x}", "width": 256, "height": 256,
            "image_ext": "png", "caption": f"A {word} caption number {n}." if ok else None,
            "captions": [f"A {word} caption number {n}."] if ok else [], "caption_tokens": 10 + 3 * n if ok else None,
            "finish_reason": "stop" if ok else None, "model": "m", "model_id": MODELS[n % 2],
            "prompt_hash": "p", "sampling": "{}", "pipeline_version": f"v{1 + shard % 2}",
            "timestamp": "2026-01-01T00:00:00Z", "status": "ok" if ok else "error",
            "error_reason": None if ok else ("decode_error" if shard % 2 else "engine_error"),
            "error": None if ok else "boom", "attempts": 1,
            "quality": (n % 4) / 4 if ok and n % 3 else None, "quality_questions": 4 if ok and n % 3 else None,
        })
    return rows


def make_root(storage: Storage) -> None:
    """SHARDS committed caption shards (tar + parquet + marker) and one uncommitted parquet (ignored)."""
    for shard in range(SHARDS):
        txn = storage.begin("annotate", shard)
        rows = _rows(shard)
        with shardio.TarWriter(txn.path(f"captions/{shard_name(shard)}.tar")) as sink:
            for r in rows:
                if r["status"] == "ok":
                    scene = world.sample_scene(__import__("random").Random(int(r["key"])))
                    sink.write(r["key"], {"png": world.encode(world.render(scene, 256)), "txt": r["caption"].encode()})
        shardio.write_manifest(rows, CAPTION_SCHEMA, txn.path(f"captions/{shard_name(shard)}.parquet"))
        txn.commit({"config_fingerprint": "test"})
    stray = _rows(SHARDS)
    local = Path(storage.work_dir or "/tmp") / "stray.parquet"
    shardio.write_manifest(stray, CAPTION_SCHEMA, str(local))
    storage.fs.put_file(str(local), storage.path(f"captions/{shard_name(SHARDS)}.parquet"))


@pytest.fixture(scope="module")
def local_root(tmp_path_factory) -> Storage:
    root = tmp_path_factory.mktemp("browse") / "root"
    storage = Storage(str(root), work_dir=str(root.parent))
    storage.check_reachable()
    make_root(storage)
    return storage


def _direct(storage: Storage) -> pl.DataFrame:
    """Every committed row, read eagerly without browse."""
    frames = []
    for shard in range(SHARDS):
        with storage.fs.open(storage.path(f"captions/{shard_name(shard)}.parquet"), "rb") as f:
            frames.append(pl.read_parquet(f.read()))
    return pl.concat(frames)


def _check_summary(storage: Storage) -> None:
    view = VIEWS["captions"]
    source = CommittedSource(storage, "captions")
    assert len(source.files()) == SHARDS  # the uncommitted shard is not read
    s = summarize(source.scan(), view)
    d = _direct(storage)
    assert s["rows"] == d.height == SHARDS * ROWS
    assert s["status"] == {"ok": d.filter(pl.col("status") == "ok").height,
                           "error": d.filter(pl.col("status") == "error").height}
    assert s["failures"] == {r: d.filter(pl.col("error_reason") == r).height for r in ("decode_error", "engine_error")}
    assert s["models"]["model_id"] == {m: d.filter(pl.col("model_id") == m).height for m in MODELS}
    assert s["pipeline_versions"] == {v: d.filter(pl.col("pipeline_version") == v).height for v in ("v1", "v2")}
    q = s["histograms"]["quality"]
    assert q["rows"] == d["quality"].drop_nulls().len() == sum(n for _, _, n in q["bins"])
    assert q["mean"] == pytest.approx(d["quality"].mean())
    t = s["histograms"]["caption_tokens"]
    assert (t["min"], t["max"]) == (d["caption_tokens"].min(), d["caption_tokens"].max())
    chars = s["histograms"]["caption_chars"]
    assert chars["rows"] == d["caption"].drop_nulls().len()


def test_summary_equals_a_direct_polars_count(local_root):
    _check_summary(local_root)


def test_where_sample_show_and_a_bad_expression(local_root, capsys):
    root = local_root.root_url
    d = _direct(local_root)
    expr = "quality < 0.5 and caption_tokens > 20"
    assert main(["browse", root, "--where", expr]) == 0
    out = capsys.readouterr().out
    expected = d.filter((pl.col("quality") < 0.5) & (pl.col("caption_tokens") > 20)).height
    assert 0 < expected < d.height and f"rows: {expected}\n" in out
    assert "\nprompt_hash: p (" in out  # the prompt's id beside the model's

    lf = CommittedSource(local_root).scan()
    a, b = sample_rows(lf, 5, seed=1), sample_rows(lf, 5, seed=1)
    assert a.height == 5 and a.equals(b) and set(a["key"]) <= set(d["key"])
    assert not sample_rows(lf, 5, seed=2).equals(a)
    assert main(["browse", root, "--sample", "4", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("key=") == 4 and "sample of 4 (seed 3)" in out

    key = sample_key(1, 2)
    assert main(["browse", root, "--show", key]) == 0
    out = capsys.readouterr().out
    assert f"key: {key}\n" in out and "caption: A " in out
    image_line = next(line for line in out.splitlines() if line.startswith("image: "))
    tar_path, member = image_line.removeprefix("image: ").split(" :: ")
    with tarfile.open(tar_path) as tf:
        assert member in tf.getnames()

    for bad in ("quality <<< 2", "no_such_column > 1"):
        assert main(["browse", root, "--where", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: bad --where expression"), err
    assert main(["browse", root, "--show", "999990000"]) == 2
    assert capsys.readouterr().err.startswith("error: no row with key")


def test_browse_on_s3(s3_server, tmp_path, capsys):
    bucket = s3_server.make_bucket("browse")
    storage = Storage(f"{bucket}/run", s3_server.storage_options, work_dir=str(tmp_path))
    storage.check_reachable()
    make_root(storage)
    assert polars_storage_options(storage)["aws_endpoint_url"] == s3_server.endpoint_url
    _check_summary(storage)
    out = io.StringIO()
    assert browse(CommittedSource(storage, "captions"), where="status = 'error'", out=out) == 0
    assert "rows: 3\n" in out.getvalue()


def test_gallery_files(local_root, tmp_path):
    folder = write_gallery(CommittedSource(local_root), tmp_path / "g", page_size=8)
    page = (folder / "index.html").read_text()
    items = json.loads(page.split("const ITEMS = ", 1)[1].split(";\n</script>", 1)[0])
    assert len(items) == SHARDS * ROWS
    thumbs = sorted((folder / "thumbs").glob("*.jpg"))
    assert len(thumbs) == sum(1 for it in items if it["status"] == "ok") == SHARDS * (ROWS - 1)
    from PIL import Image

    assert max(Image.open(thumbs[0]).size) <= 160  # resized copies of the 256-pixel originals
    assert {p.name for p in (folder / "charts").glob("*.png")} >= {"status.png", "quality.png", "caption_tokens.png"}


@pytest.mark.skipif(chromium() is None, reason=SKIP_REASON)
def test_gallery_in_headless_chromium(local_root, tmp_path):
    By = pytest.importorskip("selenium.webdriver.common.by", reason="selenium is not installed").By

    folder = write_gallery(CommittedSource(local_root), tmp_path / "g", page_size=8)
    drv = headless_driver(1200, 900, "--allow-file-access-from-files")
    try:
        drv.get((folder / "index.html").resolve().as_uri())
        items = lambda: drv.find_elements(By.CSS_SELECTOR, "#grid .item")  # noqa: E731
        total = SHARDS * ROWS
        assert len(items()) == 8
        assert drv.find_element(By.ID, "count").text == f"{total} of {total} items"
        assert drv.find_element(By.ID, "pageinfo").text == "page 1 of 3"
        first_page = [e.get_attribute("data-key") for e in items()]
        loaded = drv.execute_script(
            "return [...document.querySelectorAll('#grid img')].filter(i => i.complete && i.naturalWidth > 0).length")
        assert loaded == sum(1 for k in first_page if int(k[5:]) != 3)  # every ok row's thumbnail shows
        drv.find_element(By.ID, "next").click()
        second = [e.get_attribute("data-key") for e in items()]
        assert len(second) == 8 and not set(second) & set(first_page)
        drv.find_element(By.ID, "next").click()
        assert len(items()) == total - 16 and drv.find_element(By.ID, "next").get_attribute("disabled")
        search = drv.find_element(By.ID, "search")
        search.send_keys("zebra")
        zebras = _direct(local_root).filter(pl.col("caption").str.contains("zebra")).height
        assert 0 < zebras < 8 and len(items()) == zebras
        assert all("zebra" in e.find_element(By.CSS_SELECTOR, ".text").text for e in items())
        assert drv.find_element(By.ID, "pageinfo").text == "page 1 of 1"
        shot = tmp_path / "gallery.png"
        assert drv.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    finally:
        drv.quit()


def test_manifests_from_before_a_new_column_read_with_it_null(tmp_path):
    """Shard 0 written before the source columns existed, shard 1 after: one frame, the old rows null there."""
    storage = Storage(str(tmp_path / "root"), work_dir=str(tmp_path))
    storage.check_reachable()
    for shard in (0, 1):
        rows = _rows(shard)
        txn = storage.begin("annotate", shard)
        table = shardio.rows_table([{**r, "source_license": "cc0-1.0"} for r in rows], CAPTION_SCHEMA)
        if shard == 0:
            table = table.drop_columns(["source_license", "source_caption"])
        pq.write_table(table, txn.path(f"captions/{shard_name(shard)}.parquet"))
        txn.commit({"config_fingerprint": "test"})
    df = CommittedSource(storage).scan().collect()
    assert df.height == 2 * ROWS
    assert df.filter(pl.col("key").str.starts_with("00000"))["source_license"].null_count() == ROWS
    assert set(df.filter(pl.col("key").str.starts_with("00001"))["source_license"]) == {"cc0-1.0"}
