"""The evaluate stage on the demo world: nano captioners vs baselines, the caption cache, kill and rerun."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from pipeline.config import load_config
from pipeline.demo import make_heldout_benchmark
from pipeline.runner import run_stage
from pipeline.storage import Storage
from stages.evaluate import stage as evaluate_stage
from stages.evaluate.benchmarks import make_mcq

REPO = Path(__file__).resolve().parent.parent
SCENES, QUESTIONS, K = 8, 2, 2


def _vl(name: str) -> dict:
    return {"backend": "hf", "model": f"models/nano/{name}", "device": "cpu", "min_pixels": 12544, "max_pixels": 12544}


def _manifest(tmp: Path, root: Path, bench: Path, names: list[str], **evaluate) -> Path:
    demo = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    section = {**demo["evaluate"], "name": "t", "k": K, "caption_chunk": 4, "captioners": {c: _vl(c) for c in names},
               "benchmarks": [{"name": "heldout", "kind": "jsonl", "path": str(bench), "truth": "demo-scene"}],
               **evaluate}
    path = tmp / f"m{len(list(tmp.glob('m*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({"root": str(root), "shard_size": 20, "evaluate": section}))
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_heldout_benchmark(tmp_path_factory.mktemp("world"), n_scenes=SCENES, questions=QUESTIONS)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, bench):
    """One evaluate run with nano-VL and its step-300 snapshot (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("eval")
    root = tmp / "root"
    m = _manifest(tmp, root, bench, ["nano-vl", "nano-vl-step300"])
    out = io.StringIO()
    report = run_stage(load_config(m), "evaluate", None, progress=False, out=out)
    assert report.exit_code == 0, out.getvalue()
    return tmp, root, m


def test_nano_vl_beats_baselines_and_snapshot_in_one_table(first_run):
    _, root, _ = first_run
    unit = root / "eval" / "t"
    rep = json.loads((unit / "report.json").read_text())
    s = rep["captioners"]
    assert list(s) == ["nano-vl", "nano-vl-step300", "empty", "reference"]
    assert rep["k"] == K and rep["seed"] == 0 and "nano-reader" in rep["reader"]
    assert s["nano-vl"]["mean"] >= s["empty"]["mean"] + 0.3
    assert s["nano-vl"]["mean"] > s["nano-vl-step300"]["mean"] + 0.1
    assert s["nano-vl"]["best_of_k"] >= s["nano-vl"]["mean"]
    assert s["nano-vl"]["per_benchmark"]["heldout"]["questions"] == SCENES * QUESTIONS
    table = (unit / "report.md").read_text()
    for name in s:
        assert f"| {name} | {100 * s[name]['mean']:.1f} |" in table
    # faithfulness beside the reader score: the reference states the scene, the empty caption claims nothing
    f = {name: s[name]["faithfulness"] for name in s}
    assert f["reference"]["hallucination"] == 0.0 and f["reference"]["coverage"] == 1.0
    assert f["empty"]["hallucination"] is None and f["empty"]["coverage"] == 0.0 and f["empty"]["length"] == 0.0
    assert f["nano-vl"]["hallucination"] < f["nano-vl-step300"]["hallucination"]
    assert f["nano-vl"]["coverage"] > f["nano-vl-step300"]["coverage"]
    assert s["nano-vl"]["per_benchmark"]["heldout"]["faithfulness"]["captions"] == K * SCENES
    assert "| coverage | hallucination | repetition | length |" in table
    assert "| empty | " in table and table.split("| empty | ")[1].split("\n")[0].endswith("| 0.0 | n/a | 0.0 | 0.0 |")
    assert (unit / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    answers = pl.read_parquet(unit / "answers.parquet")
    # every caption of every captioner times every question, one caption per baseline
    assert answers.height == (2 * K + 2) * SCENES * QUESTIONS
    direct = answers.filter(pl.col("captioner") == "nano-vl")["correct"].mean()
    assert direct == pytest.approx(s["nano-vl"]["mean"])
    assert answers.filter(pl.col("captioner") == "empty")["caption"].unique().to_list() == [""]
    marker = Storage(str(root)).marker("evaluate", "t")
    assert marker["stats"]["extra"]["captions"] == {
        "nano-vl": {"cached": 0, "generated": SCENES}, "nano-vl-step300": {"cached": 0, "generated": SCENES}}


def test_one_more_captioner_reuses_cached_captions(first_run, bench, monkeypatch):
    tmp, root, m1 = first_run
    before = json.loads((root / "eval" / "t" / "report.json").read_text())
    m2 = _manifest(tmp, root, bench, ["nano-vl", "nano-vl-step300", "nano-vl-step600"])
    created: list[str] = []
    real = evaluate_stage.create_engine

    def counting(cfg):
        created.append(Path(cfg.model).name)
        return real(cfg)

    monkeypatch.setattr(evaluate_stage, "create_engine", counting)
    out = io.StringIO()
    report = run_stage(load_config(m2), "evaluate", None, progress=False, out=out)
    assert report.committed == [0], out.getvalue()
    assert created == ["nano-vl-step600", "nano-reader"]  # cached captioners are not even loaded
    caps = Storage(str(root)).marker("evaluate", "t")["stats"]["extra"]["captions"]
    assert caps["nano-vl"] == {"cached": SCENES, "generated": 0}
    assert caps["nano-vl-step300"] == {"cached": SCENES, "generated": 0}
    assert caps["nano-vl-step600"] == {"cached": 0, "generated": SCENES}
    after = json.loads((root / "eval" / "t" / "report.json").read_text())
    for name in ("nano-vl", "nano-vl-step300", "empty", "reference"):
        assert after["captioners"][name] == before["captioners"][name]
    # the same settings again: committed and current, skipped
    again = run_stage(load_config(m2), "evaluate", None, progress=False, out=io.StringIO())
    assert again.skipped == [0]


def test_killed_evaluate_reruns_to_the_same_report(first_run, bench, tmp_path):
    _, first_root, _ = first_run
    root = tmp_path / "root"
    m = _manifest(tmp_path, root, bench, ["nano-vl", "nano-vl-step300"])
    cmd = [sys.executable, "-m", "pipeline", "run", "--stage", "evaluate", "-m", str(m), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cache = root / "eval" / "_cache" / "captions"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(cache.glob("part-*.parquet")):
        time.sleep(0.05)
    assert proc.poll() is None, "evaluate finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    storage = Storage(str(root))
    assert storage.marker("evaluate", "t") is None
    assert not (root / "eval" / "t").exists()
    parts = list(cache.glob("part-*.parquet"))
    assert parts and all(pl.read_parquet(p).height > 0 for p in parts)  # only whole parts carry the name
    out = io.StringIO()
    assert run_stage(load_config(m), "evaluate", None, progress=False, out=out).committed == [0], out.getvalue()
    caps = storage.marker("evaluate", "t")["stats"]["extra"]["captions"]
    assert caps["nano-vl"]["cached"] >= 1
    first = (first_root / "eval" / "t")
    # first_run's report may have been replaced by the 3-captioner test: compare its answers of these two
    mine = pl.read_parquet(root / "eval" / "t" / "answers.parquet")
    ref = pl.read_parquet(first / "answers.parquet").filter(pl.col("captioner") != "nano-vl-step600")
    assert mine.equals(ref)


def test_benchmark_rows_take_letters_or_texts():
    assert make_mcq("q?", ["A) red", "B) blue", "C) green", "D) pink"], "C").options[2] == "green"
    assert make_mcq("q?", ["red", "blue", "green", "pink"], "blue").answer == "B"
    assert make_mcq("q?", ["red", "blue", "green", "pink"], "(D)").answer == "D"
    with pytest.raises(ValueError):
        make_mcq("q?", ["red", "blue", "green", "pink"], "violet")


def _commit(storage: Storage, stage: str, shard: int, files: dict[str, bytes]) -> None:
    txn = storage.begin(stage, shard)
    for rel, blob in files.items():
        Path(txn.path(rel)).write_bytes(blob)
    txn.commit({"config_fingerprint": "test"})


def test_qa_shards_and_caprl_parquet_benchmarks(tmp_path, bench):
    """Held-out qa shards (kept questions only, images from ROOT/images, recorded as inputs: a recommitted qa
    shard makes the report outdated) and a CapRL-QA-75K-layout parquet, with the baselines alone."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import shardio
    from pipeline.nano import world

    root = tmp_path / "root"
    storage = Storage(str(root))
    storage.check_reachable()
    rng = random.Random(5)
    scenes = [world.sample_scene(rng) for _ in range(3)]
    keys = [f"0000{i:05d}"[-9:] for i in range(3)]
    tar = tmp_path / "img.tar"
    shardio.write_tar(str(tar), [(k, [("png", world.encode(world.render(s))), ("txt", world.caption(s).encode())])
                                 for k, s in zip(keys, scenes, strict=True)])

    def qa_rows(keep_all: bool) -> bytes:
        rows = []
        for k, s in zip(keys, scenes, strict=True):
            for j, q in enumerate(world.pick_mcqs(s, random.Random(k), k=2)):
                rows.append({"key": k, "question_id": f"{k}-{j}", "question": q.question, "options": list(q.options),
                             "answer": q.answer, "kept": keep_all or j == 0, "status": "ok"})
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        return buf.getvalue().to_pybytes()

    _commit(storage, "download", 0, {"images/00000.tar": tar.read_bytes()})
    _commit(storage, "qa", 0, {"qa/00000.parquet": qa_rows(False)})
    published = tmp_path / "caprl.parquet"
    pq.write_table(pa.Table.from_pylist([{
        "id": f"p{i}", "image": {"bytes": world.encode(world.render(s)), "path": None},
        "reward_model": {"ground_truth": [q.to_ground_truth() for q in world.pick_mcqs(s, random.Random(i), k=2)],
                         "style": "rule"}} for i, s in enumerate(scenes)]), published)
    m = _manifest(tmp_path, root, bench, [], benchmarks=[
        {"name": "held", "kind": "qa", "shards": "0"}, {"name": "pub", "kind": "caprl_parquet", "path": str(published)}])
    report = run_stage(load_config(m), "evaluate", None, progress=False, out=io.StringIO())
    assert report.committed == [0]
    rep = json.loads((root / "eval" / "t" / "report.json").read_text())
    held = rep["captioners"]["reference"]["per_benchmark"]["held"]
    assert held["questions"] == 3 and held["images"] == 3  # kept questions only
    assert rep["captioners"]["reference"]["per_benchmark"]["pub"] is None  # no reference caption there
    assert rep["captioners"]["empty"]["per_benchmark"]["pub"]["questions"] == 6
    assert rep["captioners"]["reference"]["mean"] > rep["captioners"]["empty"]["mean"]
    marker = storage.marker("evaluate", "t")
    assert set(marker["inputs"]) == {"qa/00000", "download/00000"} and marker["shards"] == [0]
    _commit(storage, "qa", 0, {"qa/00000.parquet": qa_rows(True)})  # a recommitted qa shard: outdated
    again = run_stage(load_config(m), "evaluate", None, progress=False, out=io.StringIO())
    assert again.committed == [0]
    rep = json.loads((root / "eval" / "t" / "report.json").read_text())
    assert rep["captioners"]["reference"]["per_benchmark"]["held"]["questions"] == 6


class _Reader:
    """A reader that believes the description: it picks the option whose text the description contains."""

    model_id = "fake-reader"

    def __init__(self, fail_first: bool = False):
        self.calls = 0
        self.fail_first = fail_first

    def _pick(self, request) -> int:
        user = request.messages[-1]["content"]
        desc = user.split("Description:\n", 1)[1].split("\n\nQuestion:", 1)[0]
        options = [line[3:] for line in user.split("\n") if line[:1] in "ABCDE" and line[1:3] == ") "]
        hits = [i for i, o in enumerate(options) if o in desc]
        return hits[0] if hits else len(options) - 1

    def generate(self, requests, params):
        from pipeline.engines.base import Generation

        self.calls += 1
        if self.fail_first and self.calls == 1:
            raise RuntimeError("reader server restarting")
        assert params.temperature == 0.0
        return [[Generation(" " + "ABCDE"[self._pick(r)] + ".")] for r in requests]

    def score_choices(self, requests, choices):
        self.calls += 1
        return [[0.0 if i == self._pick(r) else -5.0 for i in range(len(c))] for r, c in zip(requests, choices, strict=True)]

    def close(self):
        pass


def test_reader_modes_and_abstain_option():
    from pipeline.mcq import MCQ
    from stages.evaluate.reader import Item, answer_all, reader_request

    q = MCQ("What color is the square?", ("red", "blue", "green", "pink"), "C")
    items = [Item("A green square.", q), Item("A red square.", q), Item("", q)]
    for mode in ("generate", "score"):
        got = answer_all(_Reader(), items, mode, abstain=True)
        assert [a.letter for a in got] == ["C", "A", "E"] and [a.correct for a in got] == [True, False, False]
    assert reader_request(items[0], abstain=False).messages[-1]["content"].endswith("D) pink")
    flaky = _Reader(fail_first=True)
    assert [a.correct for a in answer_all(flaky, items[:1], "generate", abstain=False)] == [True]
    assert flaky.calls == 2  # one retry
    with pytest.raises(RuntimeError):
        answer_all(_Reader(fail_first=True), items[:1], "generate", abstain=False, retries=0)


def test_mean_and_best_of_k_definitions():
    from stages.evaluate.report import Scored, scores

    rows = []
    # image a: 2 questions; caption 0 gets 2/2, caption 1 gets 0/2. image b: 1 question; 0/1 and 1/1.
    for ci, marks in enumerate([(True, True), (False, False)]):
        rows += [Scored("c", "b1", "a", ci, m) for m in marks]
    rows += [Scored("c", "b1", "b", 0, False), Scored("c", "b1", "b", 1, True)]
    rows += [Scored("c", "b2", "x", 0, True), Scored("c", "b2", "x", 1, True)]
    s = scores(rows, ["c", "reference"], ["b1", "b2"])["c"]
    assert s["per_benchmark"]["b1"]["mean"] == pytest.approx(3 / 6)
    assert s["per_benchmark"]["b1"]["best_of_k"] == pytest.approx(3 / 3)
    assert s["mean"] == pytest.approx((0.5 + 1.0) / 2) and s["best_of_k"] == pytest.approx(1.0)
    missing = scores(rows, ["reference"], ["b1"])["reference"]
    assert missing["mean"] is None and missing["per_benchmark"]["b1"] is None


def test_train_latest_captioner_is_an_input(tmp_path, bench):
    """'train:latest' resolves to the committed train unit's artifact and is recorded as an input: a retrained
    checkpoint makes the report outdated, and its captions are new ones (the cache is keyed by weights)."""
    root = tmp_path / "root"
    storage = Storage(str(root))
    storage.check_reachable()

    def train(name: str) -> None:
        src = REPO / "models" / "nano" / name
        _commit_unit(storage, "train", "all", "checkpoints/all",
                     {f"checkpoints/all/{p.name}": p.read_bytes() for p in src.iterdir() if p.is_file()})

    train("nano-vl-step300")
    m = _manifest(tmp_path, root, bench, [], baselines=["empty"])
    doc = yaml.safe_load(m.read_text())
    doc["evaluate"]["captioners"] = {"trained": {**_vl("x"), "model": "train:latest"}}
    m.write_text(yaml.safe_dump(doc))
    run_stage(load_config(m), "evaluate", None, progress=False, out=io.StringIO())
    marker = storage.marker("evaluate", "t")
    assert "train/all" in marker["inputs"]
    assert marker["stats"]["extra"]["captions"]["trained"] == {"cached": 0, "generated": SCENES}
    first = json.loads((root / "eval" / "t" / "report.json").read_text())["captioners"]["trained"]["mean"]
    assert run_stage(load_config(m), "evaluate", None, progress=False, out=io.StringIO()).skipped == [0]
    train("nano-vl")  # retrained
    again = run_stage(load_config(m), "evaluate", None, progress=False, out=io.StringIO())
    assert again.committed == [0]
    marker = storage.marker("evaluate", "t")
    assert marker["stats"]["extra"]["captions"]["trained"] == {"cached": 0, "generated": SCENES}
    after = json.loads((root / "eval" / "t" / "report.json").read_text())["captioners"]["trained"]["mean"]
    assert after > first + 0.1


def _commit_unit(storage: Storage, stage: str, unit: str, artifact: str, files: dict[str, bytes]) -> None:
    txn = storage.begin(stage, unit)
    for rel, blob in files.items():
        Path(txn.path(rel)).write_bytes(blob)
    txn.commit({"config_fingerprint": "test", "artifact": artifact, "shards": []})


def test_jsonl_benchmark_on_s3_with_the_runs_storage_options(s3_server, bench):
    from pipeline.config import BenchmarkConfig
    from stages.evaluate.benchmarks import load_benchmark

    bucket = s3_server.make_bucket("evalbench")
    fs = Storage(bucket, s3_server.storage_options).fs
    folder = bench.parent
    for p in [bench, *sorted((folder / "images").iterdir())]:
        fs.put_file(str(p), f"{bucket}/held/{p.relative_to(folder)}")
    storage = Storage(f"{bucket}/run", s3_server.storage_options)
    remote = load_benchmark(BenchmarkConfig(name="held", path=f"{bucket}/held/{bench.name}"), storage,
                            lambda *_: {})
    local = load_benchmark(BenchmarkConfig(name="held", path=str(bench)), Storage(str(folder)), lambda *_: {})
    assert len(remote) == SCENES and [(i.sha256, i.questions, i.reference) for i in remote] == \
        [(i.sha256, i.questions, i.reference) for i in local]


def test_unrunnable_evaluation_is_one_error_line(tmp_path, bench, capsys):
    from pipeline.cli import main

    m = _manifest(tmp_path, tmp_path / "root", bench, [], baselines=[])
    assert main(["run", "--stage", "evaluate", "-m", str(m)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: evaluate: no captioner and no baseline to evaluate (evaluate.captioners)"]


def test_a_captioner_judged_with_abstention(tmp_path, bench):
    """The same checkpoint, whole and through the abstention gate: the gated captions are the whole ones
    less their unsure sentences, and claim less that is false."""
    root = tmp_path / "root"
    both = {"whole": _vl("nano-vl-step600"), "gated": _vl("nano-vl-step600")}
    m = _manifest(tmp_path, root, bench, [], captioners=both, abstain_below={"gated": 0.9})
    out = io.StringIO()
    assert run_stage(load_config(m), "evaluate", None, progress=False, out=out).exit_code == 0, out.getvalue()
    answers = pl.read_parquet(root / "eval" / "t" / "answers.parquet")
    caps = {name: answers.filter(pl.col("captioner") == name).unique(["image_sha256", "caption_index"])
            .sort("image_sha256", "caption_index")["caption"].to_list() for name in ("whole", "gated")}
    assert len(caps["gated"]) == len(caps["whole"]) > 0
    assert all(set(split_sentences(g)) <= set(split_sentences(w)) for g, w in zip(caps["gated"], caps["whole"],
                                                                                  strict=True))
    assert sum(len(g) for g in caps["gated"]) < sum(len(w) for w in caps["whole"])
    f = json.loads((root / "eval" / "t" / "report.json").read_text())["captioners"]
    assert f["gated"]["faithfulness"]["hallucination"] < f["whole"]["faithfulness"]["hallucination"]
    bad = _manifest(tmp_path, root, bench, [], captioners=both, abstain_below={"nobody": 0.5})
    with pytest.raises(Exception, match="no captioner of that name"):
        evaluate_stage.check(load_config(bad).evaluate)


def split_sentences(text: str) -> list[str]:
    from pipeline.abstain import sentences

    return [text[a:b].strip() for a, b in sentences(text) if text[a:b].strip()]
