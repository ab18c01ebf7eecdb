"""The download stage end to end against a local image server: outcomes, determinism, kills, S3, retries."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from imageserver import EXPECTED, ImageServer
from PIL import Image

from pipeline import cli, shardio
from pipeline.config import load_config
from pipeline.errors import ConfigError, RunDriftError
from pipeline.runner import run_stage
from pipeline.shards import sample_key
from pipeline.storage import Storage
from stages.download.stage import ShardRangeError

REPO = Path(__file__).resolve().parent.parent
ROUTES = list(EXPECTED)
SHARD_SIZE = 8


def write_list(path: Path, server: ImageServer, routes: list[str]) -> Path:
    """A parquet URL list with a caption and two extra columns (one of them JSON, like the demo's mcqs)."""
    pq.write_table(pa.table({
        "link": [server.url(r) for r in routes],
        "text": [f"caption of {r}" for r in routes],
        "item": list(range(len(routes))),
        "meta": [json.dumps({"route": r}) for r in routes],
    }), path)
    return path


def overrides(urls: Path | str, **extra: object) -> list[str]:
    base = {"download.urls": str(urls), "download.url_col": "link", "download.caption_col": "text",
            "download.save_additional_columns": "[item, meta]", "download.timeout_s": 1,
            "download.retries": 0, "download.threads": 4, "shard_size": SHARD_SIZE}
    base.update({k: v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def config(root: Path | str, urls: Path | str, **extra: object):
    return load_config(None, overrides(urls, **extra), root=str(root))


def manifest(root: Path | str, shard: int, fs=None) -> pa.Table:
    fs = fs or fsspec.filesystem("file")
    with fs.open(f"{root}/images/{shard:05d}.parquet", "rb") as f:
        return pq.read_table(f)


def tar_samples(root: Path | str, shard: int, fs=None) -> dict[str, dict[str, bytes]]:
    fs = fs or fsspec.filesystem("file")
    with fs.open(f"{root}/images/{shard:05d}.tar", "rb") as f:
        return {s.key: dict(s.files) for s in shardio.iter_tar(f)}


def all_rows(root, shards, fs=None) -> list[dict]:
    return [row for s in shards for row in manifest(root, s, fs).to_pylist()]


def test_every_outcome_is_recorded(tmp_path, image_server):
    urls = write_list(tmp_path / "urls.parquet", image_server, ROUTES)
    cfg = config(tmp_path / "run", urls, **{"download.retries": 1, "download.retry_backoff_s": 0})
    report = run_stage(cfg, "download", [0, 1], progress=False)
    assert report.committed == [0, 1] and not report.failed

    rows = all_rows(tmp_path / "run", [0, 1])
    assert len(rows) == len(ROUTES)  # one manifest row per input row, nothing dropped
    for i, (route, row) in enumerate(zip(ROUTES, rows, strict=True)):
        assert row["key"] == sample_key(i // SHARD_SIZE, i % SHARD_SIZE)
        assert row["url"] == image_server.url(route)
        assert row["caption"] == f"caption of {route}" and row["item"] == i
        assert row["pipeline_version"] and row["downloaded_at"]
        expected = EXPECTED[route]
        assert (row["status"], row["error"]) == (("ok", None) if expected is None else ("error", expected)), row
        if expected is not None:
            assert row["error_message"] and row["bytes"] is None

    # transient failures got exactly one more attempt; permanent ones did not
    assert image_server.hits["/flaky.jpg"] == 2 and image_server.hits["/slow.jpg"] == 2
    assert image_server.hits["/404"] == 1 and image_server.hits["/html.jpg"] == 1

    samples = {**tar_samples(tmp_path / "run", 0), **tar_samples(tmp_path / "run", 1)}
    ok_rows = [r for r in rows if r["status"] == "ok"]
    assert sorted(samples) == [r["key"] for r in ok_rows]
    for r in ok_rows:
        members = samples[r["key"]]
        assert set(members) == {"jpg", "txt", "json"}
        img = Image.open(io.BytesIO(members["jpg"]))
        assert img.format == "JPEG" and img.size == (r["width"], r["height"]) == (64, 48)
        assert len(members["jpg"]) == r["bytes"]
        assert members["txt"].decode() == r["caption"]
        meta = json.loads(members["json"])
        assert meta["url"] == r["url"] and meta["sha256"] == r["sha256"] and meta["meta"] == r["meta"]

    stats = json.loads((tmp_path / "run" / "images" / "00000_stats.json").read_text())
    assert stats["rows"] == SHARD_SIZE and stats["ok"] == 4
    assert stats["errors"] == {"http_404": 1, "http_5xx": 1, "timeout": 1, "not_an_image": 1}
    assert stats["bytes_out"] == sum(r["bytes"] for r in ok_rows[:4]) and stats["extra"]["images_per_s"] > 0

    again = run_stage(cfg, "download", [0, 1], progress=False)
    assert again.skipped == [0, 1] and not again.committed


def test_reruns_are_byte_identical_and_guarded(tmp_path, image_server):
    routes = ["img/a.jpg", "img/b.png", "404", "img/c.webp", "redirect.jpg"]
    urls = write_list(tmp_path / "urls.parquet", image_server, routes)
    tars = []
    for name in ("one", "two"):
        run_stage(config(tmp_path / name, urls), "download", [0], progress=False)
        tars.append((tmp_path / name / "images" / "00000.tar").read_bytes())
    assert tars[0] == tars[1]
    moved = tmp_path / "moved.parquet"
    moved.write_bytes(urls.read_bytes())  # same content elsewhere: committed shards stay valid
    assert run_stage(config(tmp_path / "one", moved), "download", [0], progress=False).skipped == [0]

    with pytest.raises(ShardRangeError, match=r"beyond the input: 5 rows at shard_size 8 make shards 0-0"):
        run_stage(config(tmp_path / "one", urls), "download", [0, 3], progress=False)
    other = write_list(tmp_path / "other.parquet", image_server, routes[:3])
    with pytest.raises(RunDriftError, match="input_fingerprint"):
        run_stage(config(tmp_path / "one", other), "download", [0], progress=False)
    with pytest.raises(RunDriftError, match="shard_size"):
        run_stage(config(tmp_path / "one", urls, shard_size=4), "download", [0], progress=False)
    with pytest.raises(ConfigError, match="reserved"):
        run_stage(config(tmp_path / "three", urls, **{"download.save_additional_columns": "[status]"}),
                  "download", [0], progress=False)


def test_failed_only_redoes_just_the_failed_rows(tmp_path, image_server, capsys):
    routes = ["img/a.jpg", "flaky.jpg", "404", "img/b.png", "flaky.jpg"]
    urls = write_list(tmp_path / "urls.parquet", image_server, routes)
    root = tmp_path / "run"
    args = ["run", "--stage", "download", "--shards", "0", "--root", str(root), "--no-progress"]
    sets = [a for o in overrides(urls) for a in ("--set", o)]
    assert cli.main(args + sets) == 0
    before_rows = manifest(root, 0).to_pylist()
    before_tar = tar_samples(root, 0)
    assert [r["error"] for r in before_rows] == [None, "http_5xx", "http_404", None, "http_5xx"]
    hits = dict(image_server.hits)

    image_server.flaky_ok = True
    assert cli.main(args + sets + ["--failed-only"]) == 0
    assert "1 with failed rows redone" in capsys.readouterr().out
    after_rows = manifest(root, 0).to_pylist()
    after_tar = tar_samples(root, 0)
    assert [r["error"] for r in after_rows] == [None, None, "http_404", None, None]
    for old in before_rows:  # ok rows kept as they were, provenance included
        if old["status"] == "ok":
            assert after_rows[old["index"]] == old
            assert after_tar[old["key"]] == before_tar[old["key"]]
    assert sorted(after_tar) == [r["key"] for r in after_rows if r["status"] == "ok"]
    # only the failed URLs were requested again
    assert image_server.hits["/img/a.jpg"] == hits["/img/a.jpg"] == 1
    assert image_server.hits["/404"] == 2 and image_server.hits["/flaky.jpg"] == 4
    marker = Storage(str(root)).marker("download", 0)
    assert marker["rows"] == {"total": 5, "ok": 4, "failed": 1} and marker["retries"] == 1

    # a committed shard without failures after the retry: nothing more to do but the 404
    assert cli.main(args + sets + ["--failed-only"]) == 0
    assert image_server.hits["/img/a.jpg"] == 1 and image_server.hits["/404"] == 3


def _run_cli(root: Path, urls: Path, **extra) -> subprocess.Popen:
    sets = [a for o in overrides(urls, **extra) for a in ("--set", o)]
    cmd = [sys.executable, "-m", "pipeline", "run", "--stage", "download", "--shards", "0-1",
           "--root", str(root), "--no-progress", *sets]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_kill_mid_shard_then_rerun_equals_clean_run(tmp_path, image_server):
    routes = ["img/a.jpg", "hold/x.jpg", "img/b.png", "404", "hold/y.jpg", "img/c.webp", "truncated.jpg",
              "img/d.jpg", "img/e.png", "redirect.jpg"]
    urls = write_list(tmp_path / "urls.parquet", image_server, routes)
    root = tmp_path / "killed"
    proc = _run_cli(root, urls)
    deadline = time.time() + 120
    try:
        while image_server.hits["/hold/x.jpg"] + image_server.hits["/hold/y.jpg"] == 0:
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.time() < deadline, "the stage never reached the held URL"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    storage = Storage(str(root))
    assert storage.marker("download", 0) is None and storage.marker("download", 1) is None
    assert not storage.committed("download")

    image_server.release.set()
    rerun = _run_cli(root, urls)
    try:
        out = rerun.communicate(timeout=180)[0].decode()
    finally:
        rerun.kill()
    assert rerun.returncode == 0, out
    run_stage(config(tmp_path / "clean", urls), "download", [0, 1], progress=False)
    for shard in (0, 1):
        assert (root / "images" / f"{shard:05d}.tar").read_bytes() == \
            (tmp_path / "clean" / "images" / f"{shard:05d}.tar").read_bytes()
        killed, clean = manifest(root, shard), manifest(tmp_path / "clean", shard)
        drop = ["downloaded_at", "pipeline_version"]
        assert killed.drop_columns(drop).equals(clean.drop_columns(drop))
    assert not list((root / "_tmp" / "download").iterdir())  # stale staging cleared by the rerun


def test_s3_root_and_s3_list_with_a_worker_pool(tmp_path, image_server, s3_server):
    bucket = s3_server.make_bucket("download-test")
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    routes = ["img/a.jpg", "img/b.png", "404", "img/c.webp", "html.jpg", "img/d.jpg", "flaky.jpg",
              "img/e.jpg", "img/f.png", "redirect.jpg", "img/g.webp"]
    with fs.open(f"{bucket}/lists/urls.jsonl", "w") as f:
        for i, r in enumerate(routes):
            f.write(json.dumps({"link": image_server.url(r), "text": r, "item": i, "meta": {"r": r}}) + "\n")
    root = f"{bucket}/run"
    cfg = load_config(None, overrides(f"{bucket}/lists/urls.jsonl", **{"download.processes": 2}), root=root)
    cfg.storage_options = s3_server.storage_options
    report = run_stage(cfg, "download", [0, 1], progress=False)
    assert report.committed == [0, 1], report.failed
    rows = all_rows(root, [0, 1], fs)
    assert [r["error"] for r in rows] == [EXPECTED.get(r) for r in routes], [(r["url"], r["error_message"]) for r in rows]
    assert json.loads(rows[0]["meta"]) == {"r": "img/a.jpg"}
    samples = tar_samples(root, 0, fs)
    assert sorted(samples) == [r["key"] for r in rows[:SHARD_SIZE] if r["status"] == "ok"]
    assert fs.exists(f"{root}/_done/download/00001.json") and fs.exists(f"{root}/_inputs/00001.parquet")
    assert Storage(root, s3_server.storage_options).committed("download", cfg.fingerprint("download")).keys() == {0, 1}

    image_server.flaky_ok = True
    retry = run_stage(cfg, "download", [0, 1], failed_only=True, progress=False)
    assert retry.retried == [0] and retry.skipped == [1]
    rows = all_rows(root, [0, 1], fs)
    assert rows[6]["status"] == "ok" and sorted(tar_samples(root, 0, fs)) == [
        r["key"] for r in rows[:SHARD_SIZE] if r["status"] == "ok"]


def test_sigterm_stops_a_shard_with_requests_in_flight(tmp_path, image_server):
    """Preemption while img2dataset's feeder is blocked (more URLs than 2 x threads, all held): exit 75, nothing
    committed, no hang (img2dataset alone would wait forever in its thread pool's shutdown)."""
    routes = [f"hold/{i}.jpg" for i in range(12)]
    urls = write_list(tmp_path / "urls.parquet", image_server, routes)
    proc = _run_cli(tmp_path / "run", urls, **{"download.threads": 2})
    deadline = time.time() + 120
    try:
        while sum(n for path, n in image_server.hits.items() if path.startswith("/hold/")) < 2:
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.time() < deadline, "the stage never reached the held URLs"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        proc.kill()  # a no-op unless it hung (the failure this test is about)
    assert proc.returncode == 75, out
    assert "stopped by signal 15" in out
    assert Storage(str(tmp_path / "run")).marker("download", 0) is None


def test_many_tasks_starting_together_cut_the_url_list_once(tmp_path, monkeypatch):
    """A fresh download array: one task cuts ROOT/_inputs under a claim, the others wait for its _meta.json."""
    import threading

    from stages.download import stage as download

    urls = tmp_path / "urls.csv"
    urls.write_text("url\n" + "".join(f"http://127.0.0.1:9/{i}.png\n" for i in range(50)))
    cfg = load_config(None, root=str(tmp_path / "root"), shard_size=10, extra={})
    cfg = cfg.model_copy(update={"download": cfg.download.model_copy(update={"urls": str(urls)})})
    cuts = []
    real_cut = download._cut

    def slow_cut(*a, **kw):
        cuts.append(threading.get_ident())
        time.sleep(0.5)
        return real_cut(*a, **kw)

    monkeypatch.setattr(download, "_cut", slow_cut)
    monkeypatch.setattr(download, "CUT_POLL_S", 0.05)
    metas: list = []
    threads = [threading.Thread(target=lambda: metas.append(download.ensure_inputs(cfg, Storage(cfg.root))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cuts) == 1 and len(metas) == 4
    assert {m["num_shards"] for m in metas} == {5}
    storage = Storage(cfg.root)
    assert sorted(storage.fs.ls(storage.path("_inputs"), detail=False))[-1].endswith("_meta.json")
    assert not storage.exists("_running/_inputs/cut.json")  # the claim is given back
