"""The qa stage: generation + the visual-dependency gate on the demo world with the committed nano models,
planted leaky / wrong-key questions through gate-only mode, malformed generator output, broken inputs,
determinism, and the export / import round trip of the published CapRL-QA layout."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import shardio
from pipeline.config import RunConfig, load_config
from pipeline.demo import DEMO_MANIFEST
from pipeline.engines.base import ChatRequest, Generation, Sampling
from pipeline.errors import PipelineError
from pipeline.mcq import MCQ, NONE_OF_THE_ABOVE, format_generator_output
from pipeline.nano import qa_eval, world
from pipeline.resources import resolve_model
from pipeline.runner import run_stage
from pipeline.status import gate_summary
from pipeline.storage import Storage
from stages.qa import gate, published
from stages.qa.gate import GateItem, GateSettings, pick_from_text, run_gate, shown_options
from stages.qa.questions import answer_in_question, from_stored
from stages.qa.stage import QA_SCHEMA, engine_key

N_IMAGES = 8
NANO = Path(__file__).resolve().parent.parent / "models" / "nano"
needs_nano = pytest.mark.skipif(not (NANO / "nano-filter" / "config.json").exists(), reason="no nano models")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scenes(n: int, seed: int) -> list[world.Scene]:
    rng = random.Random(seed)
    return [world.sample_scene(rng) for _ in range(n)]


def config_for(root: Path, *overrides: str) -> RunConfig:
    return load_config(DEMO_MANIFEST, [f"shard_size={N_IMAGES}", *overrides], root=str(root))


def run_qa(config: RunConfig, shards: Sequence[int] = (0,), resources: dict | None = None, force: bool = False):
    out = io.StringIO()
    report = run_stage(config, "qa", list(shards), force=force, progress=False, out=out, resources=resources)
    assert report.exit_code == 0, out.getvalue()
    return report


def qa_rows(root: Path, shard: int = 0) -> list[dict]:
    return shardio.read_manifest(str(root / "qa" / f"{shard:05d}.parquet"))


def qa_stats(root: Path, shard: int = 0) -> dict:
    return json.loads((root / "qa" / f"{shard:05d}_stats.json").read_text())


# -- the demo world, end to end -------------------------------------------------------------------
@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, dict[str, world.Scene]]:
    """One shard of 8 demo scenes through the qa stage (nano-VL generates, nano-filter gates)."""
    if not (NANO / "nano-filter" / "config.json").exists():
        pytest.skip("no nano models")
    root = tmp_path_factory.mktemp("qa-run")
    world_scenes = scenes(N_IMAGES, seed=11)
    keys = qa_eval.write_image_shard(Storage(str(root)), 0, world_scenes)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOURCE_DATE_EPOCH", "1700000000")
        torch.set_num_threads(1)
        run_qa(config_for(root))
    return root, dict(zip(keys, world_scenes, strict=True))


@needs_nano
def test_demo_world_generate_and_gate(generated):
    root, truth = generated
    rows = qa_rows(root)
    assert pq.read_schema(root / "qa" / "00000.parquet").names == QA_SCHEMA.names
    assert {r["key"] for r in rows} == set(truth)
    questions = [r for r in rows if r["question"] is not None]
    assert len(questions) >= 5 * N_IMAGES - 2  # nano-VL writes 5 parseable MCQs for nearly every scene
    kept = [r for r in questions if r["kept"]]
    report = qa_eval.generated_report(rows, truth)
    assert report["kept_correct"] == 1.0 and report["keep_rate"] >= 0.4, report
    for r in questions:
        assert len(r["visual_answers"]) == 4 and len(r["text_answers"]) == 4
        assert r["generator_model_id"].startswith(str(resolve_model(config_for(root).qa.generator).model))
        assert "#sha256:" in r["filter_model_id"] and r["filter_prompt_hash"] and r["generator_prompt_hash"]
        assert json.loads(r["generator_sampling"])["repetition_penalty"] == 1.05
        if r["kept"]:
            assert r["visual_acc"] == 1.0 and r["text_acc"] == 0.0 and r["reject_reason"] is None
        else:
            assert r["reject_reason"] in ("not_visual", "leaky", "answer_in_question", "duplicate")
    stats = qa_stats(root)
    extra = stats["extra"]
    assert extra["images"] == N_IMAGES and extra["kept"] == len(kept) and extra["parsed"] == len(questions)
    assert sum(extra["answer_letters_before"].values()) == len(questions)
    assert sum(extra["answer_letters_after"].values()) == len(kept)
    assert sum(extra["kept_per_image_hist"].values()) == N_IMAGES
    assert 0.0 <= extra["leak_rate"] <= 1.0
    marker = json.loads((root / "_done" / "qa" / "00000.json").read_text())
    assert "download/00000" in marker["inputs"]
    assert gate_summary([marker]).startswith(f"{len(kept)} of {len(questions)} parsed questions kept")


@needs_nano
def test_rerun_gives_identical_bytes(generated, monkeypatch):
    root, _ = generated
    before = (root / "qa" / "00000.parquet").read_bytes()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    report = run_qa(config_for(root))
    assert report.skipped == [0]  # committed and current
    run_qa(config_for(root), force=True)
    assert (root / "qa" / "00000.parquet").read_bytes() == before


@needs_nano
def test_planted_questions_are_rejected(tmp_path):
    """Gate-only mode over planted questions: the answer stated in the question, the answer given away by
    the options, a wrong answer key; the untouched ground-truth question as a control."""
    world_scenes = scenes(N_IMAGES, seed=5)
    rng = random.Random(5)
    planted = [qa_eval.planted_questions(s, rng) for s in world_scenes]
    qa_eval.write_image_shard(Storage(str(tmp_path)), 0, world_scenes,
                              [[q for k in qa_eval.PLANTED for q in p[k]] for p in planted])
    run_qa(config_for(tmp_path, "qa.generate=false"))
    rows = qa_rows(tmp_path)
    by_kind = {k: [r for r in rows if r["qtype"] == k] for k in ("stated", "options_only", "wrong_key")}
    assert all(len(v) >= N_IMAGES - 1 for v in by_kind.values())
    assert not any(r["kept"] for v in by_kind.values() for r in v)
    assert {r["reject_reason"] for r in by_kind["stated"]} == {"answer_in_question"}
    assert {r["reject_reason"] for r in by_kind["options_only"]} <= {"not_visual", "leaky"}
    assert {r["reject_reason"] for r in by_kind["wrong_key"]} <= {"not_visual", "leaky"}
    truth = [r for r in rows if r["qtype"] in world.QTYPES]
    assert any(r["kept"] for r in truth)
    assert all(r["source"] == "imported" and r["generator_model"] is None for r in rows)
    # without the answer-in-question rule the filter's text-only arm sees both leaks itself (nano-filter is
    # trained on leaky text-only queries, docs/nano.md): every such question is answered right without the
    # image, so it is rejected as leaky (or as not_visual, which the gate checks first)
    off = tmp_path / "no-rule"
    qa_eval.write_image_shard(Storage(str(off)), 0, world_scenes,
                              [[q for k in qa_eval.PLANTED for q in p[k]] for p in planted])
    run_qa(config_for(off, "qa.generate=false", "qa.answer_in_question=false"))
    rows = qa_rows(off)
    for kind in ("stated", "options_only"):
        got = [r for r in rows if r["qtype"] == kind]
        assert got and all(r["text_acc"] > 0 and not r["kept"] for r in got), kind
        assert {r["reject_reason"] for r in got} <= {"not_visual", "leaky"}


# -- scripted engines: malformed output, broken inputs ---------------------------------------------
class ScriptedFilter:
    """A filter that knows the right answers: right with the image, wrong without it."""

    model_id = "scripted-filter"

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.calls: list[int] = []

    def _options(self, req: ChatRequest) -> tuple[str, list[str]]:
        user = req.messages[-1]["content"]
        text = user if isinstance(user, str) else user[-1]["text"]
        question = re.search(r"Question: (.*)", text).group(1)
        return question, re.findall(r"^[A-F]\) (.*)$", text, re.M)

    def _pick(self, req: ChatRequest) -> int:
        question, options = self._options(req)
        right = options.index(self.answers[question])
        return right if req.images else (right + 1) % len(options)

    def generate(self, requests: Sequence[ChatRequest], params: Sampling) -> list[list[Generation]]:
        self.calls.append(len(requests))
        return [[Generation(text=f" {'ABCDEF'[self._pick(r)]}")] for r in requests]

    def score_choices(self, requests, choices):
        self.calls.append(len(requests))
        return [[0.0 if i == self._pick(r) else -3.0 for i in range(len(c))] for r, c in zip(requests, choices, strict=True)]

    def close(self) -> None:
        pass


GOOD = [MCQ("What color is the background?", ("white", "black", "gray", "blue"), "C"),
        MCQ("How many shapes are in the image?", ("one", "two", "three", "four"), "B")]
MALFORMED = "**3. What shape is in the top left?**\n- A) circle\n- B) square\nAnswer: A) circle\n"


def scripted_config(root: Path, noop_text: str, *overrides: str) -> tuple[RunConfig, dict, ScriptedFilter]:
    config = config_for(root, "qa.generator.backend=noop", f"qa.generator.noop_text={json.dumps(noop_text)}",
                        "qa.filter.backend=noop", "qa.filter.model=scripted", "qa.filter_mode=generate",
                        "qa.text_pooling=false", *overrides)
    filt = ScriptedFilter({q.question: q.answer_text for q in GOOD})
    return config, {engine_key("model", resolve_model(config.qa.filter)): filt}, filt


def test_malformed_generator_output_and_broken_image(tmp_path):
    text = "Here are the questions.\n\n" + format_generator_output(GOOD) + "\n---\n\n" + MALFORMED
    world_scenes = scenes(4, seed=3)
    images = [world.encode(world.render(s)) for s in world_scenes]
    images[2] = b"<html>not an image</html>"
    qa_eval.write_image_shard(Storage(str(tmp_path)), 0, world_scenes, images=images)
    config, resources, filt = scripted_config(tmp_path, text)
    run_qa(config, resources=resources)
    rows = qa_rows(tmp_path)
    broken = [r for r in rows if r["key"] == "000000002"]
    assert len(broken) == 1 and broken[0]["status"] == "error" and broken[0]["error_reason"] == "decode_error"
    assert broken[0]["sha256"] == hashlib.sha256(images[2]).hexdigest() and not broken[0]["kept"]
    for key in ("000000000", "000000001", "000000003"):
        mine = [r for r in rows if r["key"] == key]
        assert [r["question_index"] for r in mine] == [0, 1, 2]
        assert [r["kept"] for r in mine] == [True, True, False]
        bad = mine[2]
        assert bad["status"] == "error" and bad["reject_reason"] == "parse_error" and "2 options" in bad["error"]
        assert bad["raw"] == text and bad["question"] is None
    assert filt.calls == [3 * 2 * 4, 3 * 2 * 4]  # one engine call per arm for the whole shard
    stats = qa_stats(tmp_path)
    extra = stats["extra"]
    assert (extra["images"], extra["images_ok"], extra["parsed"], extra["kept"]) == (4, 3, 6, 6)
    assert extra["rejected"] == {"parse_error": 3} and stats["errors"] == {"decode_error": 1, "parse_error": 3}


class FailingOnce(ScriptedFilter):
    """A filter whose first call dies (a CUDA error, a killed server)."""

    def generate(self, requests, params):
        if not self.calls:
            self.calls.append(-1)
            raise RuntimeError("CUDA error: device-side assert (scripted)")
        return super().generate(requests, params)


def test_failed_shard_leaves_nothing_and_rerun_commits_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    text = format_generator_output(GOOD)
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        qa_eval.write_image_shard(Storage(str(root)), 0, scenes(3, seed=4))
    config, resources, _ = scripted_config(roots[0], text)
    key = next(iter(resources))
    resources[key] = FailingOnce(resources[key].answers)
    out = io.StringIO()
    report = run_stage(config, "qa", [0], progress=False, out=out, resources=resources)
    assert report.failed and "CUDA error" in out.getvalue()
    assert not (roots[0] / "qa" / "00000.parquet").exists()
    assert not (roots[0] / "_done" / "qa" / "00000.json").exists()
    assert (roots[0] / "_failed" / "qa" / "00000.json").exists()
    run_qa(config, resources=resources)  # the rerun (same process, same engines)
    clean_config, clean_resources, _ = scripted_config(roots[1], text)
    run_qa(clean_config, resources=clean_resources)
    assert (roots[0] / "qa" / "00000.parquet").read_bytes() == (roots[1] / "qa" / "00000.parquet").read_bytes()
    assert not (roots[0] / "_failed" / "qa" / "00000.json").exists()


@pytest.mark.parametrize("text, reason", [("I cannot write questions about this image.", "no_questions"),
                                          (MALFORMED, "parse_error")])
def test_all_unparseable_shard_is_committed(tmp_path, text, reason):
    qa_eval.write_image_shard(Storage(str(tmp_path)), 0, scenes(3, seed=1))
    config, resources, filt = scripted_config(tmp_path, text)
    run_qa(config, resources=resources)
    rows = qa_rows(tmp_path)
    assert len(rows) == 3 and {r["reject_reason"] for r in rows} == {reason}
    assert all(r["status"] == "error" and not r["kept"] and r["raw"] == text for r in rows)
    assert filt.calls == []
    assert qa_stats(tmp_path)["extra"]["kept"] == 0


def test_empty_shard_is_committed(tmp_path):
    qa_eval.write_image_shard(Storage(str(tmp_path)), 0, [])
    config, resources, _ = scripted_config(tmp_path, "unused")
    run_qa(config, resources=resources)
    assert qa_rows(tmp_path) == [] and (tmp_path / "_done" / "qa" / "00000.json").exists()
    assert qa_stats(tmp_path)["extra"]["images"] == 0


def test_gate_only_without_stored_questions(tmp_path):
    qa_eval.write_image_shard(Storage(str(tmp_path)), 0, scenes(2, seed=2))
    config, resources, _ = scripted_config(tmp_path, "unused", "qa.generate=false")
    run_qa(config, resources=resources)
    assert [r["reject_reason"] for r in qa_rows(tmp_path)] == ["no_questions", "no_questions"]


# -- the gate's pieces ------------------------------------------------------------------------------
def test_shuffles_are_seeded_per_key_question_rotation():
    q = MCQ("What color is the background?", ("white", "black", "gray", "blue"), "C")
    item = GateItem("000000001", q, None)  # type: ignore[arg-type]
    settings = GateSettings(rotations=6)
    first = shown_options(item, gate.VISUAL, settings)
    assert first == shown_options(item, gate.VISUAL, settings)
    assert len({s.permutation for s in first}) > 1
    assert all(s.options[-1] == NONE_OF_THE_ABOVE and s.options[list(s.permutation).index(2)] == "gray" for s in first)
    other = shown_options(GateItem("000000002", q, None), gate.VISUAL, settings)  # type: ignore[arg-type]
    assert [s.permutation for s in other] != [s.permutation for s in first]
    assert all(len(s.options) == 4 for s in shown_options(item, gate.TEXT, settings))


def test_answer_parsing_and_leak_rules():
    shown = shown_options(GateItem("k", GOOD[0], None), gate.TEXT, GateSettings(rotations=1))[0]  # type: ignore[arg-type]
    assert pick_from_text(" C.", shown) == 2
    assert pick_from_text(f" {shown.options[1]}.", shown) == 1
    assert pick_from_text(" maybe", shown) is None
    assert answer_in_question(MCQ("What color is the red circle?", ("red", "blue", "green", "pink"), "A"))
    assert not answer_in_question(MCQ("Is the red circle left of the blue one?", ("red", "blue", "yes", "no"), "A"))
    assert not answer_in_question(GOOD[0])
    parsed = from_stored(json.dumps([{"question": "Q?", "choices": ["A) x", "B) y"], "answer": "B"},
                                     {"question": "Q2?", "options": ["x"], "answer": "A"}, "junk"]))
    assert parsed[0].mcq.answer_text == "y" and parsed[1].mcq is None and parsed[2].reason


def test_stored_choices_in_either_published_style():
    """CapRL-QA-75K letters choices "A) text", CapRL++'s question sets "A. text"; both read the same, an answer may
    carry its text, and letters out of order or an answer contradicting its text are per-question errors."""
    paren = {"question": "Q?", "choices": ["A) red", "B) St. Louis", "C) 3.5 m", "D) blue"], "answer": "B"}
    dot = {"question": "Q?", "choices": ["A. red", "B. St. Louis", "C. 3.5 m", "D. blue"], "answer": "B. St. Louis"}
    a, b = (from_stored([q])[0].mcq for q in (paren, dot))
    assert a == b and a.options == ("red", "St. Louis", "3.5 m", "blue") and a.answer == "B"
    assert published.ground_truth({"question": "Q?", "options": list(a.options), "answer": "B"}, "dot")["choices"] == \
        dot["choices"]
    bad = from_stored([{**dot, "choices": ["B. red", "A. St. Louis", "C. 3.5 m", "D. blue"]},
                       {**dot, "answer": "B. red"}, {**dot, "choices": ["A. red", "St. Louis", "C. x", "D. y"]}])
    assert [c.mcq for c in bad] == [None] * 3
    assert "not ABCD in order" in bad[0].reason and "contradicts" in bad[1].reason and "A?CD" in bad[2].reason


def test_pooled_text_arm_picks_once():
    filt = ScriptedFilter({GOOD[0].question: GOOD[0].answer_text})
    settings = GateSettings(mode="score", text_pooling=True)
    [v] = run_gate(filt, [GateItem("k", GOOD[0], object())], settings)  # type: ignore[arg-type]
    assert v.visual_acc == 1.0 and v.text_acc == 0.0 and v.kept and len(set(v.text_picks)) == 1


class NanScores(ScriptedFilter):
    """A filter engine that fails (NaN scores) on every query without an image."""

    def score_choices(self, requests, choices):
        good = super().score_choices(requests, choices)
        return [row if r.images else [float("nan")] * len(row) for r, row in zip(requests, good, strict=True)]


def test_a_failed_filter_query_is_an_error_not_a_wrong_answer(tmp_path):
    qa_eval.write_image_shard(Storage(str(tmp_path)), 0, scenes(2, seed=6))
    config, resources, _ = scripted_config(tmp_path, format_generator_output(GOOD), "qa.filter_mode=score")
    key = next(iter(resources))
    resources[key] = NanScores(resources[key].answers)
    run_qa(config, resources=resources)
    rows = qa_rows(tmp_path)
    assert len(rows) == 4 and not any(r["kept"] for r in rows)
    assert {(r["status"], r["error_reason"], r["reject_reason"]) for r in rows} == {("error", "filter_error", "filter_error")}


# -- the published layout ---------------------------------------------------------------------------
@needs_nano
def test_export_import_round_trip(generated, tmp_path):
    root, _ = generated
    config = config_for(root)
    out = tmp_path / "qa75k.parquet"
    n = published.export_qa(config, Storage(str(root)), str(out))
    table = pq.read_table(out)
    assert table.schema.equals(published.PUBLISHED_SCHEMA)
    for name in ("id", "image", "prompt", "data_source", "reward_model"):
        assert table.schema.field(name).type.equals(published.PUBLISHED_SCHEMA.field(name).type)
    kept = [r for r in qa_rows(root) if r["kept"]]
    assert n == len({r["key"] for r in kept}) == table.num_rows

    remote = f"memory://qa-round-trip-{tmp_path.name}/qa75k.parquet"  # any fsspec URL, as s3:// would be
    with shardio.open_url(remote, "wb") as f:
        f.write(out.read_bytes())
    new_root = tmp_path / "imported"
    shards = published.import_qa(load_config(DEMO_MANIFEST, ["shard_size=3"], root=str(new_root)),
                                 Storage(str(new_root)), remote)
    assert shards == list(range(-(-n // 3)))
    imported = [r for s in shards for r in qa_rows(new_root, s)]
    assert all(r["kept"] and r["status"] == "ok" for r in imported)

    def content(rows, sha_of):
        return sorted((sha_of(r), r["question"], r["options"][ord(r["answer"]) - 65]) for r in rows)

    original_sha = {r["key"]: r["sha256"] for r in kept}
    assert content(imported, lambda r: r["sha256"]) == content(kept, lambda r: original_sha[r["key"]])
    for s in shards:
        for sample in shardio.read_samples(str(new_root / "images" / f"{s:05d}.tar")):
            assert hashlib.sha256(sample.image).hexdigest() == sample.meta["sha256"]
            assert json.loads(sample.meta["mcqs"])
    assert json.loads((new_root / "run.json").read_text())["shard_size"] == 3
    # the imported shards are committed: export reads them back, and gate-only mode re-gates them
    again = tmp_path / "again.parquet"
    assert published.export_qa(config, Storage(str(new_root)), str(again)) == n
    assert pq.read_table(again).column("reward_model").to_pylist() == table.column("reward_model").to_pylist()
    # CapRL++'s choice style "A. text": written by --style dot, read back to the same questions
    dotted = tmp_path / "dotted.parquet"
    assert published.export_qa(config, Storage(str(root)), str(dotted), style="dot") == n
    gt = [q for r in pq.read_table(dotted).column("reward_model").to_pylist() for q in r["ground_truth"]]
    assert gt and all(c[:3] in ("A. ", "B. ", "C. ", "D. ") for q in gt for c in q["choices"])
    dot_root = tmp_path / "dot-imported"
    dot_shards = published.import_qa(load_config(DEMO_MANIFEST, ["shard_size=3"], root=str(dot_root)),
                                     Storage(str(dot_root)), str(dotted))
    from_dots = [r for s in dot_shards for r in qa_rows(dot_root, s)]
    assert content(from_dots, lambda r: r["sha256"]) == content(imported, lambda r: r["sha256"])
    run_qa(load_config(DEMO_MANIFEST, ["shard_size=3", "qa.generate=false"], root=str(new_root)), shards)
    regated = [r for s in shards for r in qa_rows(new_root, s)]
    assert content(regated, lambda r: r["sha256"]) == content(imported, lambda r: r["sha256"])
    assert all(r["visual_acc"] is not None for r in regated) and any(r["kept"] for r in regated)


def test_import_refuses_missing_files_and_committed_shards(tmp_path):
    data = world.encode(world.render(scenes(1, seed=9)[0]))
    row = {"id": "7", "image": {"bytes": data, "path": "7.png"}, "prompt": published.published_prompt(),
           "data_source": "x", "reward_model": {"ground_truth": [published.ground_truth(
               {"question": GOOD[0].question, "options": list(GOOD[0].options), "answer": "C"})], "style": "rule"}}
    src = tmp_path / "one.parquet"
    pq.write_table(pa.Table.from_pylist([row, {**row, "id": "8", "reward_model": {"ground_truth": [], "style": "rule"}}],
                                        schema=published.PUBLISHED_SCHEMA), src)
    config = load_config(DEMO_MANIFEST, ["shard_size=5"], root=str(tmp_path / "root"))
    with pytest.raises(PipelineError, match="does not exist"):
        published.import_qa(config, Storage(config.root), str(tmp_path / "missing.parquet"))
    assert published.import_qa(config, Storage(config.root), str(src)) == [0]
    rows = qa_rows(tmp_path / "root")
    assert [(r["key"], r["kept"], r["reject_reason"]) for r in rows] == [
        ("000000000", True, None), ("000000001", False, "no_questions")]
    assert rows[0]["options"] == list(GOOD[0].options) and rows[0]["answer"] == "C"
    with pytest.raises(PipelineError, match="already has committed shards"):
        published.import_qa(config, Storage(config.root), str(src))


def test_foreign_webdataset_shards_through_input_pattern(tmp_path):
    """qa.input_pattern: any WebDataset shards (here a '{shard:05d}' template outside ROOT); no download input."""
    foreign = tmp_path / "foreign"
    qa_eval.write_image_shard(Storage(str(foreign)), 3, scenes(2, seed=8))
    root = tmp_path / "root"
    config, resources, _ = scripted_config(root, format_generator_output(GOOD),
                                           f"qa.input_pattern={foreign}/images/{{shard:05d}}.tar")
    run_qa(config, shards=[3], resources=resources)
    rows = qa_rows(root, 3)
    assert [r["kept"] for r in rows] == [True, True, True, True]
    assert {r["url"] for r in rows} == {"demo://000030000.png", "demo://000030001.png"}
    marker = json.loads((root / "_done" / "qa" / "00003.json").read_text())
    assert marker["inputs"] == {}
    assert qa_stats(root, 3)["extra"]["input"].endswith("foreign/images/00003.tar")
