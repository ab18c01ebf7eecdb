"""publish: export (hf, llava, sharegpt, webdataset) from and to local and s3 roots, the dataset card checked
against the root, a SIGKILLed export, the source columns in the manifest, the report page in headless
Chromium, and the gallery's link to it. One small real root (tests/publish_support.py) serves every test."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.publish.card import license_header
from pipeline.publish.export import MARKER, export
from pipeline.publish.gallery import write_gallery
from pipeline.publish.report import REPORT_REL, charts, report_link, write_report
from pipeline.publish.rows import ROW_DELAY_ENV, Selection
from pipeline.publish.source import CommittedSource
from pipeline.storage import Storage
from tests.browser_support import SKIP_REASON, chromium, headless_driver
from tests.publish_support import DUPLICATES, EVAL_NAME, PROMPT, URL_ROWS, build_root

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("publish")
    config = build_root(base)
    storage = Storage(config.root, config.storage_options, config.work_dir)
    return config, storage


@pytest.fixture(scope="module")
def captions(built) -> pl.DataFrame:
    """Every committed caption row, read directly (not through publish)."""
    _, storage = built
    return pl.read_parquet(storage.path("captions/*.parquet"))


def _load(folder: str, tmp_path: Path, **kw):
    import datasets

    return datasets.load_dataset(folder, split="train", cache_dir=str(tmp_path / "hf-cache"), **kw)


def _expected(captions: pl.DataFrame, where: pl.Expr | None = None, dedup: bool = True) -> pl.DataFrame:
    rows = captions.filter(pl.col("status") == "ok")
    rows = rows.filter(where) if where is not None else rows
    return rows.unique(subset="sha256", keep="first", maintain_order=True) if dedup else rows


def test_manifest_carries_the_source_columns(built, captions):
    _, storage = built
    images = pl.read_parquet(storage.path("images/*.parquet")).filter(pl.col("status") == "ok")
    by_key = {r["key"]: r for r in images.iter_rows(named=True)}
    assert captions.height == images.height
    for row in captions.iter_rows(named=True):
        src = by_key[row["key"]]
        assert row["source_license"] == src["license"] and row["source_caption"] == src["caption"]
    assert captions["source_license"].null_count() > 0 and captions["source_license"].n_unique() == 3


def test_hf_export_loads_where_and_dedup_change_the_count(built, captions, tmp_path):
    _, storage = built
    root = storage.root_url
    out = tmp_path / "hf"
    assert main(["export", root, "--format", "hf", "--out", str(out)]) == 0
    ds = _load(str(out), tmp_path)
    expected = _expected(captions)
    assert len(ds) == expected.height == captions.filter(pl.col("status") == "ok").height - DUPLICATES
    by_key = {r["key"]: r for r in captions.iter_rows(named=True)}
    for row in ds:
        assert isinstance(row["image"], Image.Image) and row["image"].size == (row["width"], row["height"])
        assert row["caption"] == by_key[row["key"]]["caption"] and row["prompt"] == PROMPT
        assert row["source_license"] == by_key[row["key"]]["source_license"]
    assert sorted(ds["key"]) == sorted(expected["key"])

    where = "source_license is not null and caption_chars > 40"  # keeps scene 0 and its two copies
    expr = pl.col("source_license").is_not_null() & (pl.col("caption").str.len_chars() > 40)
    for extra, dedup in (([], True), (["--no-dedup"], False)):
        out2 = tmp_path / f"hf-where-{dedup}"
        assert main(["export", root, "--format", "hf", "--out", str(out2), "--where", where, *extra]) == 0
        want = _expected(captions, expr, dedup)
        assert 0 < want.height < expected.height
        assert sorted(_load(str(out2), tmp_path)["key"]) == sorted(want["key"])
    assert _expected(captions, expr, False).height - _expected(captions, expr, True).height == DUPLICATES

    out3 = tmp_path / "hf-limit"
    assert main(["export", root, "--format", "hf", "--out", str(out3), "--limit", "5", "--shards", "1-2"]) == 0
    assert _load(str(out3), tmp_path)["key"] == [k for k in expected["key"].to_list() if k[:5] in ("00001", "00002")][:5]


def test_card_numbers_match_the_root(built, captions, tmp_path):
    from huggingface_hub import DatasetCard

    _, storage = built
    out = tmp_path / "carded"
    where = "source_license is not null"
    marker = export(CommittedSource(storage), "hf", str(out), Selection(where=where), stream=io.StringIO())
    card = DatasetCard.load(out / "README.md")
    data = card.data.to_dict()
    images = pl.read_parquet(storage.path("images/*.parquet"))
    exported = _load(str(out), tmp_path)
    f = data["caprl"]
    assert f["urls"] == images.height == URL_ROWS
    assert f["images_kept"] == images.filter(pl.col("status") == "ok").height
    assert f["images_dropped"] == dict(Counter(images.filter(pl.col("status") != "ok")["error"].to_list())) == {"http_404": 1}
    assert f["captions_rows"] == captions.height and f["captions_ok"] == captions.filter(pl.col("status") == "ok").height
    assert f["captions_failed"] == {}
    assert f["exported_rows"] == len(exported) == marker["rows"]
    assert f["matched_rows"] == captions.filter(pl.col("source_license").is_not_null()).height
    assert f["duplicates_dropped"] == f["matched_rows"] - len(exported)
    assert f["licenses"] == dict(Counter(exported["source_license"]))
    lengths = sorted(len(c) for c in exported["caption"])
    assert (f["caption_chars"]["min"], f["caption_chars"]["max"]) == (lengths[0], lengths[-1])
    assert f["caption_chars"]["median"] == lengths[(len(lengths) - 1) // 2]
    assert f["caption_chars"]["mean"] == round(sum(lengths) / len(lengths), 2)
    scored = [q for q in exported["quality"] if q is not None]
    assert f["quality_mean"] == round(sum(scored) / len(scored), 4)
    assert f["filters"]["where"] == where
    # the Hub's fields: a mixed-licence export is 'other' with per-licence counts in the body
    assert data["license"] == "other" and data["task_categories"] == ["image-to-text"]
    assert data["size_categories"] == ["n<1K"]
    assert data["configs"][0]["data_files"][0]["path"] == "data/train-*.parquet"
    text = card.text
    for lic, n in f["licenses"].items():
        assert f"| {lic} | {n} |" in text
    assert f"URLs: {URL_ROWS} in" in text and "dropped: http_404 1" in text
    assert f"```text\n{PROMPT}\n```" in text and "scripted-captioner" in text
    report = storage.read_json(f"eval/{EVAL_NAME}/report.json")
    for name, c in report["captioners"].items():
        assert f"| {name} | {c['mean']:.4f} | {c['best_of_k']:.4f} |" in text
    assert "where `source_license is not null`" in text
    assert marker["code_version"] in text


def test_license_header_cases():
    assert license_header(Counter({"cc-by-4.0": 3})) == ({"license": "cc-by-4.0"}, [])
    assert license_header(Counter({"CC BY 4.0": 3}))[0] == {"license": "cc-by-4.0"}
    assert license_header(Counter({"Custom terms": 2}))[0] == {"license": "other", "license_name": "Custom terms"}
    head, warnings = license_header(Counter({"unknown": 4}))
    assert head == {"license": "unknown"} and len(warnings) == 1 and "source licence" in warnings[0]


def test_llava_and_sharegpt_json(built, captions, tmp_path):
    from stages.annotate.stage import prompt_hash

    _, storage = built
    source = CommittedSource(storage)
    recorded = {m["config"]["section"]["prompt"] for m in source.markers.values()}
    assert recorded == {PROMPT}
    expected = _expected(captions)
    by_key = {r["key"]: r for r in captions.iter_rows(named=True)}
    for fmt in ("llava", "sharegpt"):
        out = tmp_path / fmt
        assert main(["export", storage.root_url, "--format", fmt, "--out", str(out)]) == 0
        entries = json.loads((out / f"{fmt}.json").read_text())
        assert isinstance(entries, list) and len(entries) == expected.height
        for e in entries:
            if fmt == "llava":
                assert set(e) == {"id", "image", "conversations", "meta"} and e["id"] == e["meta"]["key"]
                human, gpt = e["conversations"]
                assert human["from"] == "human" and gpt["from"] == "gpt"
                assert human["value"].startswith("<image>\n")
                prompt, caption, image = human["value"].removeprefix("<image>\n"), gpt["value"], e["image"]
            else:
                assert set(e) == {"messages", "images", "meta"} and len(e["images"]) == 1
                user, assistant = e["messages"]
                assert user["role"] == "user" and assistant["role"] == "assistant"
                assert user["content"].startswith("<image>") and user["content"].count("<image>") == 1
                prompt, caption, image = user["content"].removeprefix("<image>"), assistant["content"], e["images"][0]
            row = by_key[e["meta"]["key"]]
            assert prompt in recorded and prompt_hash(prompt) == row["prompt_hash"] == e["meta"]["prompt_hash"]
            assert caption == row["caption"] and e["meta"]["source_license"] == row["source_license"]
            assert not Path(image).is_absolute() and (out / image).is_file()
            with Image.open(out / image) as im:
                im.load()
                assert im.size == (row["width"], row["height"])
        assert (out / "README.md").exists() and json.loads((out / MARKER).read_text())["rows"] == len(entries)


def test_webdataset_reshards(built, captions, tmp_path):
    _, storage = built
    out = tmp_path / "wds"
    assert main(["export", storage.root_url, "--format", "webdataset", "--out", str(out), "--samples-per-tar", "7"]) == 0
    expected = _expected(captions)
    tars = sorted(out.glob("*.tar"))
    assert len(tars) == -(-expected.height // 7)
    keys = []
    for t in tars:
        with tarfile.open(t) as tf:
            names = tf.getnames()
        assert len(names) == 3 * len({n.split(".")[0] for n in names}) <= 21
        keys += [n.split(".")[0] for n in names if n.endswith(".txt")]
    assert keys == expected["key"].to_list()
    assert _load(str(out), tmp_path).num_rows == expected.height


def test_bad_requests_are_one_line_and_write_nothing(built, tmp_path, capsys):
    _, storage = built
    out = tmp_path / "bad"
    for args in (["--where", "no_such_column > 1"], ["--where", "quality > 2"]):
        assert main(["export", storage.root_url, "--format", "hf", "--out", str(out), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert not out.exists() and not Path(f"{out}.partial").exists()
    good = tmp_path / "good"
    assert main(["export", storage.root_url, "--format", "hf", "--out", str(good), "--limit", "1"]) == 0
    assert main(["export", storage.root_url, "--format", "hf", "--out", str(good), "--limit", "2"]) == 2
    assert "complete export already" in capsys.readouterr().err
    assert main(["export", storage.root_url, "--format", "hf", "--out", str(good), "--limit", "2", "--force"]) == 0
    assert json.loads((good / MARKER).read_text())["rows"] == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    Path(f"{foreign}.partial").mkdir()  # even beside a leftover: locally a killed export never leaves DIR
    assert main(["export", storage.root_url, "--format", "hf", "--out", str(foreign)]) == 2
    assert "is not an export" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep me"


def _kill_mid_export(root: str, fmt: str, out: str, partial_has, tmp_path: Path, extra: list[str] = ()) -> None:
    """Start an export in a subprocess with a per-row delay; SIGKILL it once `partial_has()` says rows were written."""
    env = {**os.environ, ROW_DELAY_ENV: "0.25", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "export", root, "--format", fmt, "--out", out,
                             *extra], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while not partial_has():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "the export wrote nothing within 60 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_killed_export_leaves_nothing_complete_and_rerun_completes(built, captions, tmp_path):
    _, storage = built
    out = tmp_path / "killed"
    partial = Path(f"{out}.partial")
    _kill_mid_export(storage.root_url, "llava", str(out),
                     lambda: len(list(partial.glob("images/*/*"))) >= 3, tmp_path)
    assert partial.exists() and not out.exists()  # the half export is only the .partial folder
    assert 3 <= len(list(partial.glob("images/*/*"))) < _expected(captions).height
    assert main(["export", storage.root_url, "--format", "llava", "--out", str(out)]) == 0
    assert not partial.exists()
    assert len(json.loads((out / "llava.json").read_text())) == _expected(captions).height


def test_export_from_and_to_s3_and_a_killed_s3_export(built, captions, s3_server, tmp_path):
    import fsspec

    _, local = built
    bucket = s3_server.make_bucket("publish")
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    fs.put(local.root + "/", f"{bucket.removeprefix('s3://')}/run/", recursive=True)
    storage = Storage(f"{bucket}/run", s3_server.storage_options, work_dir=str(tmp_path))
    source = CommittedSource(storage)
    assert len(source.files()) == len(CommittedSource(local).files())

    out = f"{bucket}/exports/hf"
    marker = export(source, "hf", out, Selection(where="quality > 0"), stream=io.StringIO())
    want = _expected(captions, pl.col("quality") > 0)
    assert marker["rows"] == want.height
    import datasets

    ds = datasets.load_dataset("parquet", data_files=f"{out}/data/*.parquet", split="train",
                               storage_options=s3_server.storage_options, cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(ds["key"]) == sorted(want["key"]) and isinstance(ds[0]["image"], Image.Image)
    from huggingface_hub import DatasetCard

    with fs.open(f"{out}/README.md", "r") as f:
        assert DatasetCard(f.read()).data.to_dict()["caprl"]["exported_rows"] == want.height

    killed = f"{bucket}/exports/killed"
    manifest = tmp_path / "s3.yaml"
    manifest.write_text(json.dumps({"storage_options": s3_server.storage_options}))
    fs.invalidate_cache()
    _kill_mid_export(storage.root_url, "webdataset", killed,
                     lambda: fs.invalidate_cache() or len(fs.glob(f"{killed}.partial/*.tar")) >= 1, tmp_path,
                     ["--manifest", str(manifest), "--samples-per-tar", "2"])
    fs.invalidate_cache()
    assert not fs.exists(f"{killed}/{MARKER}") and not fs.exists(f"{killed}/README.md") and not fs.glob(f"{killed}/*")
    assert main(["export", storage.root_url, "--manifest", str(manifest), "--format", "webdataset", "--out", killed,
                 "--samples-per-tar", "2"]) == 0
    fs.invalidate_cache()
    assert not fs.exists(f"{killed}.partial")
    with fs.open(f"{killed}/{MARKER}", "r") as f:
        assert json.load(f)["rows"] == _expected(captions).height


def test_report_charts_and_gallery_link(built, tmp_path):
    _, storage = built
    source = CommittedSource(storage)
    made = {c.name: c for c in charts(source)}
    assert set(made) == {"progress", "throughput", "failures", "hist-caption_tokens", "hist-caption_chars",
                         "hist-quality", "train"}
    assert all(c.points > 0 and c.png.startswith(b"\x89PNG") for c in made.values())
    page = write_report(source)
    assert page == storage.path(REPORT_REL)
    text = Path(page).read_text()
    assert "http://" not in text.replace('http-equiv', '') and "https://" not in text and "<script" not in text
    gallery = Path(storage.path("gallery-test"))
    write_gallery(source, gallery, report=report_link(storage, gallery))
    href = (gallery / "index.html").read_text().split('id="report" href="', 1)[1].split('"', 1)[0]
    assert (gallery / href).resolve() == Path(page).resolve()


@pytest.mark.skipif(chromium() is None, reason=SKIP_REASON)
def test_report_in_headless_chromium(built, tmp_path):
    By = pytest.importorskip("selenium.webdriver.common.by", reason="selenium is not installed").By

    _, storage = built
    page = Path(write_report(CommittedSource(storage), str(tmp_path / "report.html")))
    drv = headless_driver(1400, 1000)
    try:
        drv.get(page.as_uri())
        figures = drv.find_elements(By.CSS_SELECTOR, "figure.chart")
        names = {f.get_attribute("data-chart") for f in figures}
        assert names == {"progress", "throughput", "failures", "hist-caption_tokens", "hist-caption_chars",
                         "hist-quality", "train"}
        assert all(int(f.get_attribute("data-points")) > 0 for f in figures)
        # every chart image decoded, at a readable size, and is more than a blank canvas
        stats = drv.execute_script("""
            return [...document.querySelectorAll('figure.chart img')].map(img => {
              const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
              const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
              const d = ctx.getImageData(0, 0, c.width, c.height).data; let ink = 0, colour = 0;
              for (let i = 0; i < d.length; i += 4) {
                if (d[i] < 200 || d[i+1] < 200 || d[i+2] < 200) ink++;
                if (Math.abs(d[i] - d[i+2]) > 40) colour++;
              }
              return [img.naturalWidth, img.clientWidth, ink / (d.length / 4), colour];
            });""")
        assert len(stats) == len(figures)
        for natural, shown, ink, colour in stats:
            assert natural >= 400 and shown >= 400 and ink > 0.01 and colour > 50, stats
        # nothing but the page itself was requested: no resource entries, and the policy forbids any
        assert drv.execute_script("return performance.getEntriesByType('resource').length") == 0
        assert drv.execute_script("return document.querySelector('meta[http-equiv=\"Content-Security-Policy\"]')"
                                  ".content").startswith("default-src 'none'")
        shot = tmp_path / "report.png"
        assert drv.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        drv.quit()


def test_image_digests_are_of_the_exported_bytes(built, tmp_path):
    """Dedup compares the bytes written: equal sha256 in the manifest means equal bytes in the tar."""
    _, storage = built
    out = tmp_path / "nodedup"
    export(CommittedSource(storage), "hf", str(out), Selection(dedup=False), stream=io.StringIO())
    table = pq.read_table(next((out / "data").glob("*.parquet"))).to_pylist()
    for row in table:
        assert hashlib.sha256(row["image"]["bytes"]).hexdigest() == row["sha256"]


def test_card_lineage_of_a_trained_captioner(built):
    """A captioner named 'train:latest' brings the train unit's lineage into the card's facts."""
    from pipeline.publish.card import _lineage

    _, storage = built
    train = CommittedSource(storage).stage_markers("train")
    assert _lineage(train, [{"model": "scripted-captioner"}]) is None
    (item,) = _lineage(train, [{"model": "train:latest"}])
    assert item["unit"] == "all" and item["mode"] == "rl" and item["steps"] == 6
    assert item["policy"] == "models/nano/nano-vl-step300" and item["algorithm"] == "grpo"


def test_report_watch_rewrites_the_page(built, tmp_path, monkeypatch):
    import pipeline.publish.report as report

    _, storage = built
    pages = []

    def stop(seconds):
        pages.append((tmp_path / "w.html").read_text())
        if len(pages) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(report.time, "sleep", stop)
    assert main(["report", storage.root_url, "--out", str(tmp_path / "w.html"), "--watch", "7"]) == 130
    assert len(pages) == 2 and all('<meta http-equiv="refresh" content="7">' in p for p in pages)
