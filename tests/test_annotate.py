"""The annotate stage's mechanics on image-shard fixtures: outputs, bad rows, retries, inputs, quality."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.nano import world
from pipeline.runner import run_stage
from pipeline.shards import sample_key
from pipeline.status import print_status
from pipeline.storage import Storage
from stages.annotate import quality
from stages.annotate import stage as annotate
from tests.annotate_support import (
    NOT_AN_IMAGE,
    RuleReader,
    ScriptedCaptioner,
    commit_image_shard,
    oracle_policy,
    pixel_scene_caption,
    scene_rows,
    truncated,
    write_shard_files,
)


def _config(root, *overrides: str):
    base = ["annotate.captioner.backend=noop", "annotate.captioner.chunk_size=4", "shard_size=20"]
    return load_config(None, base + list(overrides), root=str(root))


def _run(config, shards=(0,), resources=None, **kw):
    out = io.StringIO()
    report = run_stage(config, "annotate", list(shards), progress=False, out=out, resources=resources, **kw)
    return report, out.getvalue()


def _tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture
def shard_rows():
    rows = scene_rows(10)
    rows[3]["image"] = truncated(rows[3]["image"])
    rows[7]["image"] = NOT_AN_IMAGE
    return rows


@pytest.mark.parametrize("hold_mb", [2048, 0])  # input bytes held in memory, or the tar read twice
def test_noop_run_writes_tar_and_manifest_with_bad_rows_recorded(tmp_path, shard_rows, hold_mb):
    storage = Storage(str(tmp_path))
    commit_image_shard(storage, 0, shard_rows)
    report, out = _run(_config(tmp_path, f"annotate.hold_images_mb={hold_mb}"))
    assert report.committed == [0], out

    rows = pq.read_table(tmp_path / "captions/00000.parquet").to_pylist()
    assert [r["key"] for r in rows] == [sample_key(0, i) for i in range(10)]
    bad = {r["key"]: r for r in rows if r["status"] != "ok"}
    assert set(bad) == {sample_key(0, 3), sample_key(0, 7)}
    assert all(r["error_reason"] == "decode_error" and "cannot decode" in r["error"] for r in bad.values())
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["caption"] == "A placeholder caption." and r["finish_reason"] == "stop" for r in ok)
    assert all(r["width"] == r["height"] == world.IMAGE_SIZE for r in ok)
    assert {r["model_id"] for r in rows} == {"noop:A placeholder caption."}
    assert {r["prompt_hash"] for r in rows} == {annotate.prompt_hash("Please describe this image in detail.")}
    assert json.loads(ok[0]["sampling"])["temperature"] == 1.0

    members = _tar_members(tmp_path / "captions/00000.tar")
    assert len(members) == 3 * 8  # ok rows only: image + txt + json
    for src in shard_rows:
        if src["key"] in bad:
            assert f"{src['key']}.png" not in members
            continue
        assert members[f"{src['key']}.png"] == src["image"]  # original bytes
        meta = json.loads(members[f"{src['key']}.json"])
        assert meta["sha256"] == hashlib.sha256(src["image"]).hexdigest()
        assert meta["source"]["scene"] == src["scene"] and meta["url"].endswith(".png")
        assert members[f"{src['key']}.txt"] == b"A placeholder caption."

    marker = storage.marker("annotate", 0)
    assert marker["rows"] == {"total": 10, "ok": 8, "failed": 2}
    assert marker["stats"]["errors"] == {"decode_error": 2}
    assert "download/00000" in marker["inputs"]


def test_missing_upstream_shard_is_a_clear_error(tmp_path):
    from pipeline.errors import MissingInputError

    with pytest.raises(MissingInputError, match="run: python -m pipeline run --stage download --shards 0"):
        _run(_config(tmp_path))  # refused before any work (the CLI prints it as one error line)


def test_engine_failure_on_a_chunk_is_retried_in_smaller_batches(tmp_path):
    storage = Storage(str(tmp_path))
    commit_image_shard(storage, 0, scene_rows(10))
    config = _config(tmp_path, "annotate.captioner.backend=hf", "annotate.captioner.model=scripted",
                     "annotate.retry_batch_size=2")
    engine = ScriptedCaptioner(pixel_scene_caption, fail_calls=[3])
    report, out = _run(config, resources={annotate.captioner_key(config.annotate.captioner): engine})
    assert report.committed == [0], out
    rows = pq.read_table(tmp_path / "captions/00000.parquet").to_pylist()
    assert all(r["status"] == "ok" for r in rows)
    # chunks ramp up 1, 2, 4, then chunk_size (4); chunk 3 failed, its 4 rows redone in batches of 2
    assert engine.batches == [1, 2, 4, 3, 2, 2]
    assert [r["attempts"] for r in rows] == [1] * 3 + [2] * 4 + [1] * 3
    assert storage.marker("annotate", 0)["stats"]["extra"]["retried_ok"] == 4


def test_a_poisoned_request_fails_alone_after_the_retry(tmp_path):
    storage = Storage(str(tmp_path))
    rows_in = scene_rows(8)
    commit_image_shard(storage, 0, rows_in)
    poison = world.Scene.from_dict(json.loads(rows_in[5]["scene"])).background
    config = _config(tmp_path, "annotate.captioner.backend=hf", "annotate.captioner.model=scripted",
                     "annotate.retry_batch_size=1")

    def is_poison(img) -> bool:
        return pixel_scene_caption(img).endswith(f"{poison} background.")

    engine = ScriptedCaptioner(pixel_scene_caption, fail_when=is_poison)
    report, _ = _run(config, resources={annotate.captioner_key(config.annotate.captioner): engine})
    rows = pq.read_table(tmp_path / "captions/00000.parquet").to_pylist()
    expect_bad = {r["key"] for r in rows_in if world.Scene.from_dict(json.loads(r["scene"])).background == poison}
    assert {r["key"] for r in rows if r["status"] != "ok"} == expect_bad
    assert all(r["error_reason"] == "engine_error" and "poisoned" in r["error"] for r in rows if r["status"] != "ok")
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["caption"].endswith("background.") for r in ok)


@pytest.mark.parametrize("as_error", [False, True])
def test_empty_and_truncated_captions(tmp_path, as_error):
    storage = Storage(str(tmp_path))
    commit_image_shard(storage, 0, scene_rows(6))
    config = _config(tmp_path, "annotate.captioner.backend=hf", "annotate.captioner.model=scripted",
                     f"annotate.truncated_is_error={as_error}")
    texts = iter(["A caption.", "   ", "A caption cut off...", "A caption.", "A caption.", "A caption."] + ["x"] * 10)
    engine = ScriptedCaptioner(lambda img: next(texts))
    _run(config, resources={annotate.captioner_key(config.annotate.captioner): engine})
    rows = {r["key"][-1]: r for r in pq.read_table(tmp_path / "captions/00000.parquet").to_pylist()}
    # rows 1 (empty) and, when configured, 2 (length) fail once, then are retried: the script now says "x"
    assert rows["1"]["attempts"] == 2 and rows["1"]["caption"] == "x"
    if as_error:
        assert rows["2"]["attempts"] == 2 and rows["2"]["caption"] == "x"
    else:
        assert rows["2"]["attempts"] == 1 and rows["2"]["finish_reason"] == "length"
    assert all(r["status"] == "ok" for r in rows.values())


def test_failed_rows_stay_failed_without_retry(tmp_path):
    storage = Storage(str(tmp_path))
    commit_image_shard(storage, 0, scene_rows(3))
    config = _config(tmp_path, "annotate.captioner.backend=hf", "annotate.captioner.model=scripted",
                     "annotate.retry_failed_rows=false")
    engine = ScriptedCaptioner(lambda img: "")
    report, _ = _run(config, resources={annotate.captioner_key(config.annotate.captioner): engine})
    assert report.committed == [0]
    rows = pq.read_table(tmp_path / "captions/00000.parquet").to_pylist()
    assert [r["error_reason"] for r in rows] == ["empty_caption"] * 3
    assert _tar_members(tmp_path / "captions/00000.tar") == {}


def test_input_pattern_brace_range_and_template(tmp_path):
    src = tmp_path / "wds"
    src.mkdir()
    for shard in range(3):
        write_shard_files(str(src / f"part-{shard:05d}.tar"), str(src / f"part-{shard:05d}.parquet"),
                          scene_rows(4, shard=shard))
    for pattern in (str(src / "part-{00000..00002}.tar"), str(src / "part-{shard:05d}.tar")):
        root = tmp_path / ("run" + str(len(pattern)))
        report, out = _run(_config(root, f"annotate.input_pattern={pattern}"), shards=[0, 1, 2])
        assert report.committed == [0, 1, 2], out
        keys = pq.read_table(root / "captions/00002.parquet").column("key").to_pylist()
        assert keys == [sample_key(2, i) for i in range(4)]
        assert Storage(str(root)).marker("annotate", 1)["inputs"] == {}

    with pytest.raises(ConfigError, match=r"expands to 3 shard\(s\)"):  # refused before any work
        _run(_config(tmp_path / "x", f"annotate.input_pattern={src}/part-{{00000..00002}}.tar"), shards=[0, 5])


def test_reencode_writes_the_requested_format(tmp_path):
    storage = Storage(str(tmp_path))
    commit_image_shard(storage, 0, scene_rows(2))
    _run(_config(tmp_path, "annotate.reencode=jpg"))
    members = _tar_members(tmp_path / "captions/00000.tar")
    img = members[f"{sample_key(0, 0)}.jpg"]
    assert img[:3] == b"\xff\xd8\xff"
    assert pq.read_table(tmp_path / "captions/00000.parquet").column("image_ext").to_pylist() == ["jpg", "jpg"]


def test_retry_shard_redoes_failed_rows_and_keeps_ok_rows_byte_identical(tmp_path):
    storage = Storage(str(tmp_path))
    commit_image_shard(storage, 0, scene_rows(6))
    config = _config(tmp_path, "annotate.captioner.backend=hf", "annotate.captioner.model=scripted",
                     "annotate.retry_failed_rows=false")
    key = annotate.captioner_key(config.annotate.captioner)
    flaky = ScriptedCaptioner(pixel_scene_caption, fail_calls=[1, 2])  # chunks 1 and 2 (rows 0-2) fail
    _run(config, resources={key: flaky})
    first = pq.read_table(tmp_path / "captions/00000.parquet").to_pylist()
    assert [r["status"] for r in first] == ["error"] * 3 + ["ok"] * 3
    before = _tar_members(tmp_path / "captions/00000.tar")

    healthy = ScriptedCaptioner(pixel_scene_caption)
    report, out = _run(config, resources={key: healthy}, failed_only=True)
    assert report.retried == [0], out
    assert sum(healthy.batches) == 3  # only the 3 failed rows went to the engine
    stats = storage.marker("annotate", 0)["stats"]
    assert stats["ok"] == 6 and stats["extra"]["kept_from_previous"] == 3
    again = pq.read_table(tmp_path / "captions/00000.parquet").to_pylist()
    assert again[3:] == first[3:]
    after = _tar_members(tmp_path / "captions/00000.tar")
    for name, blob in before.items():
        assert after[name] == blob
    assert len(after) == 18


def _quality_run(tmp_path, rows_in, captions_template: int | None, fraction: float, *extra: str):
    storage = Storage(str(tmp_path))
    commit_image_shard(storage, 0, rows_in)
    config = _config(tmp_path, "annotate.captioner.backend=hf", "annotate.captioner.model=scripted",
                     f"annotate.quality.fraction={fraction}", "annotate.reward.reader.backend=hf",
                     "annotate.reward.reader.model=rule", "annotate.reward.mode=sample", *extra)
    policy = oracle_policy(rows_in) if captions_template is not None else (lambda img: world.UNINFORMATIVE_CAPTION)
    reader = RuleReader()
    resources = {annotate.captioner_key(config.annotate.captioner): ScriptedCaptioner(policy),
                 quality.reader_key(config.annotate.reward): reader}
    report, out = _run(config, resources=resources)
    assert report.committed == [0], out
    return config, storage, pq.read_table(tmp_path / "captions/00000.parquet").to_pylist(), reader


def test_quality_monitor_scores_captions_with_the_reward(tmp_path):
    rows_in = scene_rows(12)
    config, storage, rows, reader = _quality_run(tmp_path / "good", rows_in, 0, 1.0)
    assert [r["quality"] for r in rows] == [1.0] * 12
    assert all(r["quality_questions"] == 5 for r in rows)
    assert reader.calls == [12 * 8]  # one batched reader call for the shard, N=8 draws each
    extra = storage.marker("annotate", 0)["stats"]["extra"]
    assert extra["quality_scored"] == 12 and extra["quality_mean"] == 1.0 and extra["quality_source"] == "images"
    out = io.StringIO()
    print_status(config, out=out)
    lines = out.getvalue().splitlines()
    line = next(ln for ln in lines if ln.startswith("annotate"))
    assert lines[0].split()[-1] == "quality" and float(line.split()[-1]) == 1.0

    _, _, bad_rows, _ = _quality_run(tmp_path / "bad", rows_in, None, 1.0)
    assert [r["quality"] for r in bad_rows] == [0.0] * 12  # "An image." answers nothing


def test_quality_monitor_uses_the_reward_cache(tmp_path):
    rows_in = scene_rows(6)
    cache = tmp_path / "reward-cache"
    _, _, first, reader = _quality_run(tmp_path / "a", rows_in, 0, 1.0, f"annotate.reward.cache={cache}")
    assert reader.calls == [6 * 8] and list(cache.glob("part-*.parquet"))
    # Another root, same captions and questions: every reader answer is replayed from the cache.
    _, _, again, reader2 = _quality_run(tmp_path / "b", rows_in, 0, 1.0, f"annotate.reward.cache={cache}")
    assert reader2.calls == [] and [r["quality"] for r in again] == [r["quality"] for r in first]


def test_quality_monitor_scores_a_deterministic_fraction(tmp_path):
    rows_in = scene_rows(20)
    _, storage, rows, _ = _quality_run(tmp_path, rows_in, 0, 0.5)
    scored = {r["key"] for r in rows if r["quality"] is not None}
    assert scored == {r["key"] for r in rows if quality.selected(r["key"], 0.5)}
    assert 3 <= len(scored) <= 17
    assert storage.marker("annotate", 0)["stats"]["extra"]["quality_scored"] == len(scored)


def test_n_captions_per_image(tmp_path):
    storage = Storage(str(tmp_path))
    commit_image_shard(storage, 0, scene_rows(3))
    config = _config(tmp_path, "annotate.captioner.backend=hf", "annotate.captioner.model=scripted", "annotate.sampling.n=3",
                     "annotate.sampling.temperature=1")
    with pytest.raises(ConfigError, match="needs temperature > 0"):
        _run(_config(tmp_path, "annotate.sampling.n=3", "annotate.sampling.temperature=0"))
    texts = iter(f"caption {i}" for i in range(100))
    engine = ScriptedCaptioner(lambda img: next(texts))
    engine.generate = _distinct_n(engine.generate, texts)
    _run(config, resources={annotate.captioner_key(config.annotate.captioner): engine})
    rows = pq.read_table(tmp_path / "captions/00000.parquet").to_pylist()
    assert all(len(r["captions"]) == 3 and r["caption"] == r["captions"][0] for r in rows)
    assert len({c for r in rows for c in r["captions"]}) == 9
    meta = json.loads(_tar_members(tmp_path / "captions/00000.tar")[f"{sample_key(0, 1)}.json"])
    assert meta["captions"] == rows[1]["captions"]


def _distinct_n(generate, texts):
    """Wrap a scripted engine so each of the n generations per request gets its own text."""
    from pipeline.engines.base import Generation

    def wrapped(requests, params):
        generate(requests, params)
        return [[Generation(text=next(texts), num_tokens=2) for _ in range(params.n)] for _ in requests]

    return wrapped


def test_quality_monitor_reads_committed_qa_stage_mcqs(tmp_path):
    import pyarrow as pa

    rows_in = scene_rows(6)
    storage = Storage(str(tmp_path))
    commit_image_shard(storage, 0, rows_in)
    txn = storage.begin("qa", 0)
    qa_rows = []
    for r in rows_in:
        for i, q in enumerate(json.loads(r["mcqs"])):
            qa_rows.append({"key": r["key"], "mcq": json.dumps(q), "kept": i < 2, "status": "ok"})
    pq.write_table(pa.Table.from_pylist(qa_rows), txn.path("qa/00000.parquet"))
    txn.commit({"config_fingerprint": "fixture", "inputs": {}, "rows": {"total": len(qa_rows)}})

    config = _config(tmp_path, "annotate.captioner.backend=hf", "annotate.captioner.model=scripted",
                     "annotate.quality.fraction=1", "annotate.reward.reader.backend=hf", "annotate.reward.reader.model=rule")
    resources = {annotate.captioner_key(config.annotate.captioner): ScriptedCaptioner(oracle_policy(rows_in)),
                 quality.reader_key(config.annotate.reward): RuleReader()}
    report, out = _run(config, resources=resources)
    assert report.committed == [0], out
    rows = pq.read_table(tmp_path / "captions/00000.parquet").to_pylist()
    assert [r["quality_questions"] for r in rows] == [2] * 6  # only the gate's kept questions
    marker = storage.marker("annotate", 0)
    assert marker["stats"]["extra"]["quality_source"] == "qa" and "qa/00000" in marker["inputs"]


def test_input_pattern_on_s3_with_local_root(tmp_path, s3_server):
    import fsspec

    bucket = s3_server.make_bucket("wds-input")
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    for shard in range(2):
        tar, par = tmp_path / f"{shard:05d}.tar", tmp_path / f"{shard:05d}.parquet"
        rows_in = scene_rows(3, shard=shard)
        rows_in[1]["image"] = NOT_AN_IMAGE
        write_shard_files(str(tar), str(par), rows_in)
        fs.put_file(str(tar), f"{bucket}/laion/{shard:05d}.tar")
    root = tmp_path / "run"
    config = _config(root, f"annotate.input_pattern={bucket}/laion/{{00000..00001}}.tar")
    config.annotate.input_storage_options = s3_server.storage_options
    report, out = _run(config, shards=[0, 1])
    assert report.committed == [0, 1], out
    rows = pq.read_table(root / "captions/00001.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[0]["url"].startswith("http://example.test/") and rows[1]["error_reason"] == "decode_error"


def test_an_engine_that_fails_everything_fails_the_shard_instead_of_committing(tmp_path):
    storage = Storage(str(tmp_path))
    commit_image_shard(storage, 0, scene_rows(5))
    config = _config(tmp_path, "annotate.captioner.backend=hf", "annotate.captioner.model=scripted")
    dead = ScriptedCaptioner(pixel_scene_caption, fail_calls=range(1, 100))
    report, out = _run(config, resources={annotate.captioner_key(config.annotate.captioner): dead})
    assert report.failed and "failed on every one of 5 images" in out and "device-side assert" in out
    assert storage.marker("annotate", 0) is None


def test_samples_without_images_and_a_truncated_input_tar(tmp_path):
    from pipeline.shardio import TarWriter

    src = tmp_path / "wds"
    src.mkdir()
    good = scene_rows(2)
    with TarWriter(str(src / "p-00000.tar")) as sink:
        sink.write(good[0]["key"], {"png": good[0]["image"], "json": b'{"url": "u0"}'})
        sink.write(sample_key(0, 1), {"txt": b"alt text only", "json": b'{"url": "u1"}'})
        sink.write(good[1]["key"].replace("0001", "0002"), {"png": good[1]["image"]})
    blob = (src / "p-00000.tar").read_bytes()
    (src / "p-00001.tar").write_bytes(blob[: len(blob) // 2 + 100])  # cut mid-member
    config = _config(tmp_path / "run", f"annotate.input_pattern={src}/p-{{shard:05d}}.tar")
    report, out = _run(config, shards=[0, 1])
    assert report.committed == [0, 1], out  # a truncated input is a failed row, not a crashed shard
    rows = pq.read_table(tmp_path / "run/captions/00000.parquet").to_pylist()
    assert [(r["status"], r["error_reason"], r["url"]) for r in rows] == [
        ("ok", None, "u0"), ("error", "no_image", "u1"), ("ok", None, None)]
    cut = pq.read_table(tmp_path / "run/captions/00001.parquet").to_pylist()
    assert cut[-1]["status"] == "error" and cut[-1]["error_reason"] == "truncated_input"
    assert "truncated or corrupt" in cut[-1]["error"]
    assert [r["key"] for r in cut[:-1]] == [r["key"] for r in rows[: len(cut) - 1]]
