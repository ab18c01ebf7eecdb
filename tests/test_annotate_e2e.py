"""End to end: demo world -> download stage -> annotate stage (hf engine on a real checkpoint directory),
on local and s3:// storage, read back by webdataset, Hugging Face datasets, DuckDB and polars."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.demo import DEMO_MANIFEST, URL_LIST, make_demo_data, serve_directory, write_url_list
from pipeline.nano import world
from pipeline.runner import run_stage
from pipeline.status import print_status
from pipeline.storage import Storage
from stages.annotate import quality
from tests.annotate_support import RuleReader

pytestmark = pytest.mark.slow

N_IMAGES = 24
SHARD_SIZE = 12
NANO_DIR = Path(__file__).resolve().parent.parent / "models" / "nano"


def nano_captioner() -> Path | None:
    """The trained nano captioner checkpoint, when this checkout has one."""
    candidate = NANO_DIR / "nano-vl"
    return candidate if (candidate / "config.json").exists() else None


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory) -> Path:
    found = nano_captioner()
    if found is not None:
        return found
    from pipeline.nano.random_checkpoints import build_random_vl_model

    return build_random_vl_model(tmp_path_factory.mktemp("models") / "random-vl", seed=0)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("demo_data"), n_images=N_IMAGES, seed=0)


def _run_pipeline(root: str, data: Path, captioner: Path, storage_options: dict | None = None,
                  quality_fraction: float = 0.0):
    overrides = [f"shard_size={SHARD_SIZE}", f"download.urls={data / URL_LIST}",
                 f"annotate.captioner.model={captioner}", "annotate.captioner.backend=hf",
                 "annotate.captioner.chunk_size=8", f"annotate.quality.fraction={quality_fraction}",
                 "annotate.sampling.temperature=0", "annotate.sampling.max_new_tokens=64"]
    config = load_config(DEMO_MANIFEST, overrides, root=root)
    if storage_options:
        config.storage_options = storage_options
    # the quality monitor's reader: the world's rule reader standing in for a reader model
    resources = {quality.reader_key(config.annotate.reward): RuleReader()}
    out = io.StringIO()
    with serve_directory(data) as base_url:
        write_url_list(data, base_url)
        for stage in ("download", "annotate"):
            report = run_stage(config, stage, [0, 1], progress=False, out=out, resources=resources)
            assert report.exit_code == 0, out.getvalue()
    return config


def _check_manifest_rows(rows: list[dict], data: Path) -> None:
    import pyarrow.parquet as pq

    truth = {r["scene_id"]: world.Scene.from_dict(json.loads(r["scene"]))
             for r in pq.read_table(data / "world.parquet").to_pylist()}
    assert len(rows) == N_IMAGES and len({r["key"] for r in rows}) == N_IMAGES
    assert all(r["status"] == "ok" and r["caption"] for r in rows)
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
    assert all(r["model_id"].endswith(tuple("0123456789abcdef")) and "#sha256:" in r["model_id"] for r in rows)
    if nano_captioner() is not None:
        # the trained nano captioner describes the scene (attribute accuracy 0.999, exact 0.995 on 200
        # held-out scenes; stating only background and count scores ~0.36, a random-weight model ~0)
        scenes = [truth[int(r["key"][:5]) * SHARD_SIZE + int(r["key"][5:])] for r in rows]
        stated = [world.parse_caption(r["caption"]) for r in rows]
        bg = sum(st["background"] == s.background for st, s in zip(stated, scenes, strict=True)) / len(rows)
        count = sum(st["count"] == len(s.objects) for st, s in zip(stated, scenes, strict=True)) / len(rows)
        acc = sum(world.caption_accuracy(s, r["caption"])["attribute_accuracy"]
                  for s, r in zip(scenes, rows, strict=True)) / len(rows)
        assert bg >= 0.95 and count >= 0.95 and acc >= 0.95, f"nano captioner: bg {bg:.2f} count {count:.2f} attr {acc:.2f}"


def test_local_end_to_end_read_back_by_real_clients(tmp_path, demo_data, captioner_dir):
    root = tmp_path / "run"
    config = _run_pipeline(str(root), demo_data, captioner_dir, quality_fraction=1.0)
    tars = sorted(str(p) for p in (root / "captions").glob("*.tar"))
    parquets = sorted(str(p) for p in (root / "captions").glob("*.parquet"))
    assert len(tars) == len(parquets) == 2

    import webdataset as wds

    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "txt", "json"))
    assert len(samples) == N_IMAGES
    key, img, txt, meta = samples[0]
    assert img.size == (world.IMAGE_SIZE, world.IMAGE_SIZE) and txt and meta["key"] == key and meta["source"]["scene"]

    import datasets

    cache = str(tmp_path / "hf-cache")  # a fresh cache: never rows of an earlier run at the same paths
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train", cache_dir=cache)
    assert len(ds) == N_IMAGES and set(ds.column_names) >= {"__key__", "png", "txt", "json"}
    assert ds[0]["txt"] == txt
    man = datasets.load_dataset("parquet", data_files={"train": parquets}, split="train", cache_dir=cache)
    assert len(man) == N_IMAGES and man[0]["caption"] == txt

    import duckdb
    import polars as pl

    glob = str(root / "captions" / "*.parquet")
    query = f"select count(*) filter (where status = 'ok'), sum(caption_tokens) from '{glob}'"
    ok, tokens = duckdb.connect().execute(query).fetchall()[0]
    assert ok == N_IMAGES and tokens > 0
    frame = pl.read_parquet(glob)
    assert frame.height == N_IMAGES and frame["key"].n_unique() == N_IMAGES
    _check_manifest_rows(frame.to_dicts(), demo_data)

    # the quality monitor found the demo MCQs carried through the download stage's image shards
    assert frame["quality"].null_count() == 0 and set(frame["quality_questions"].to_list()) == {5}
    extra = Storage(str(root)).marker("annotate", 0)["stats"]["extra"]
    assert extra["quality_source"] == "images" and extra["quality_scored"] == SHARD_SIZE
    if nano_captioner() is not None:
        assert frame["quality"].mean() >= 0.9  # rule reader on (near-exact) nano captions; "An image." scores 0
    out = io.StringIO()
    print_status(config, out=out)
    assert "quality" in out.getvalue().splitlines()[0]


def test_s3_end_to_end(s3_server, tmp_path, demo_data, captioner_dir):
    bucket = s3_server.make_bucket("annotate-e2e")
    root = f"{bucket}/run"
    config = _run_pipeline(root, demo_data, captioner_dir, s3_server.storage_options)
    storage = Storage(root, s3_server.storage_options)
    assert sorted(storage.committed("annotate", config.fingerprint("annotate"))) == [0, 1]

    import datasets

    opts = s3_server.storage_options
    cache = str(tmp_path / "hf-cache")  # a fresh cache: never rows of an earlier run at the same URLs
    tars = [storage.url("captions", f"{s:05d}.tar") for s in (0, 1)]
    parquets = [storage.url("captions", f"{s:05d}.parquet") for s in (0, 1)]
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train", storage_options=opts,
                              cache_dir=cache)
    man = datasets.load_dataset("parquet", data_files={"train": parquets}, split="train", storage_options=opts,
                               cache_dir=cache)
    assert len(ds) == len(man) == N_IMAGES
    assert sorted(ds["__key__"]) == sorted(man["key"])
    _check_manifest_rows(man.to_list(), demo_data)
