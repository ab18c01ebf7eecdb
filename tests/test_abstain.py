"""Abstention (pipeline.abstain): unsure sentences dropped by the captioner's own token probabilities, the
engines' token log-probabilities it reads, and the annotate stage's gate."""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile

import pyarrow.parquet as pq
import pytest

from pipeline.abstain import Abstained, abstain, gate, sentences, spelling, word_probs
from pipeline.config import EngineConfig, load_config
from pipeline.engines.base import Generation, Sampling, create_engine, image_request
from pipeline.engines.common import token_pieces
from pipeline.nano import data, world
from pipeline.resources import repo_path
from pipeline.runner import run_stage
from pipeline.storage import Storage
from stages.annotate import stage as annotate
from tests.annotate_support import ScriptedCaptioner, commit_image_shard, scene_rows

SURE, UNSURE = math.log(0.99), math.log(0.4)


def toks(*pieces: str, unsure: tuple[str, ...] = ()) -> list[tuple[str, float]]:
    """Token pieces, each sure except those listed in `unsure`."""
    return [(p, UNSURE if p.strip() in unsure else SURE) for p in pieces]


def test_a_sentence_with_an_unsure_content_word_is_dropped_and_kept_aside():
    tokens = toks("A", " gray", " background", ".", " The", " top", " left", " has", " a", " red", " star", ".",
                  " The", " bottom", " right", " has", " a", " blue", " circle", ".", unsure=("star",))
    out = abstain(tokens, 0.8)
    assert out == Abstained("A gray background. The bottom right has a blue circle.",
                            ("The top left has a red star.",))
    assert abstain(tokens, 0.3).text == "".join(p for p, _ in tokens)
    assert abstain(tokens, 0.0).dropped == ()


def test_function_words_and_sentence_openers_are_a_matter_of_style():
    # "The" (the opener), "has", "a" and "there" chosen with low probability say nothing about the image
    tokens = toks("The", " top", " left", " has", " a", " red", " star", ".", " Additionally", ",", " there", " is",
                  " a", " blue", " circle", ".", unsure=("The", "has", "a", "Additionally", "there"))
    assert abstain(tokens, 0.8).dropped == ()
    # but a count or a negation is a claim
    tokens = toks("There", " are", " two", " dogs", ".", " There", " is", " no", " cat", ".", unsure=("two", "no"))
    assert abstain(tokens, 0.8).dropped == ("There are two dogs.", "There is no cat.")


def test_a_word_split_over_tokens_counts_at_its_least_sure_token():
    tokens = [("A", SURE), (" tri", SURE), ("angle", UNSURE), (" sits", SURE), (".", SURE), (" Grass", SURE),
              (" grows", SURE), (".", SURE)]
    assert abstain(tokens, 0.8) == Abstained("Grass grows.", ("A triangle sits.",))


def test_the_first_bytes_of_a_split_character_carry_the_words_probability():
    tokens = [("Un", SURE), (" ", SURE), ("", UNSURE), ("\u732b", SURE), (".", SURE), (" Two", SURE), (" dogs", SURE),
              (".", SURE)]
    assert [(w, round(p, 2)) for w, p, _, _ in word_probs(tokens)] == [
        ("Un", 0.99), ("\u732b", 0.4), ("Two", 0.99), ("dogs", 0.99)]
    assert abstain(tokens, 0.8) == Abstained("Two dogs.", ("Un \u732b.",))


def test_sentence_spans_keep_decimals_and_split_on_line_breaks():
    text = "It is 3.5 m tall. Is it? Yes!\nA list item\n\nEnd"
    parts = [text[a:b] for a, b in sentences(text)]
    assert "".join(parts) == text
    assert parts[:3] == ["It is 3.5 m tall.", " Is it?", " Yes!"]
    assert [p.strip() for p in parts[3:] if p.strip()] == ["A list item", "End"]


def test_gate_runs_only_on_pieces_that_spell_the_text():
    tokens = toks("A", " red", " star", ".", unsure=("star",))
    assert gate("A red star.", tokens, 0.8) == Abstained("", ("A red star.",))
    assert gate("A red star.", None, 0.8) == Abstained("A red star.", gated=False)
    assert gate("Another text.", tokens, 0.8).gated is False
    assert gate("A red star.", None, 0.0) == Abstained("A red star.")
    # a stop string cut inside the last piece: the pieces are cut to the text
    assert spelling(tuple(toks("A", " red", " star", ". END")), "A red star.") == (
        ("A", SURE), (" red", SURE), (" star", SURE), (".", SURE))
    assert spelling(tuple(toks("A", " blue")), "A red") is None


def test_token_pieces_spell_the_decoded_text_with_multibyte_characters():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(repo_path("models", "nano", "nano-vl"))
    text = "A café ☕ with 3.5 red stars — ünïcode."
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    pieces = token_pieces(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert pieces[-1] == ""


@pytest.fixture(scope="module")
def nano_vl():
    engine = create_engine(EngineConfig(backend="hf", model=str(repo_path("models", "nano", "nano-vl")),
                                        device="cpu", min_pixels=12544, max_pixels=12544))
    yield engine
    engine.close()


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_hf_logprobs_are_the_models_own_before_temperature(nano_vl, temperature):
    requests = [image_request("Please describe this image in detail.", world.render(s)) for s in data.eval_scenes(6)]
    n = 2 if temperature else 1
    out = nano_vl.generate(requests, Sampling(max_new_tokens=64, logprobs=True, temperature=temperature, n=n, seed=3))
    plain = nano_vl.generate(requests, Sampling(max_new_tokens=64, temperature=temperature, n=n, seed=3))
    assert [[g.text for g in gs] for gs in out] == [[g.text for g in gs] for gs in plain]  # recording changes nothing
    gens = [g for gs in out for g in gs]
    assert all(g.tokens is not None and "".join(p for p, _ in g.tokens) == g.text for g in gens)
    assert plain[0][0].tokens is None
    # the summed log-probability of a caption equals the engine scoring it as a continuation (where its text
    # tokenizes back into the same tokens: a sampled caption may not)
    scored = nano_vl.score_choices([r for r in requests for _ in range(n)], [[g.text] for g in gens])
    compared = 0
    for g, [expected] in zip(gens, scored, strict=True):
        if token_pieces(nano_vl.tokenizer, nano_vl.choice_ids(g.text)) == [p for p, _ in g.tokens]:
            assert sum(lp for _, lp in g.tokens) == pytest.approx(expected, abs=1e-3)
            compared += 1
    assert compared >= len(gens) // 3


def test_openai_logprobs_are_read_from_the_choice():
    from pipeline.engines.openai import _tokens

    choice = {"logprobs": {"content": [{"token": "A", "logprob": -0.01}, {"token": " red", "logprob": -1.2},
                                       {"token": " star", "logprob": -0.3}]}}
    assert _tokens(choice, "A red star") == (("A", -0.01), (" red", -1.2), (" star", -0.3))
    assert _tokens(choice, "Something else") is None
    assert _tokens({"logprobs": None}, "A") is None
    assert _tokens({"logprobs": {"content": [{"token": "A"}]}}, "A") is None
    assert _tokens({"logprobs": {"content": [{"token": "A", "logprob": None}]}}, "A") is None
    assert _tokens({"logprobs": {"content": [{"token": "A", "logprob": "NaN"}]}}, "A") is None
    # a character split over byte tokens: read from the tokens' bytes, it belongs to the token completing it
    split = {"logprobs": {"content": [{"token": "A", "logprob": -0.1, "bytes": [65]},
                                      {"token": "bytes:\\xe2\\x98", "logprob": -0.2, "bytes": [32, 0xE2, 0x98]},
                                      {"token": "bytes:\\x95", "logprob": -0.3, "bytes": [0x95]}]}}
    assert _tokens(split, "A \u2615") == (("A", -0.1), (" ", -0.2), ("\u2615", -0.3))
    # vLLM's report: a byte of a split character as '' with no bytes, a special token the text skips
    served = {"logprobs": {"content": [{"token": "<|vision_start|>", "logprob": -0.5, "bytes": [60, 124]},
                                       {"token": " Re", "logprob": -0.1, "bytes": [32, 82, 101]},
                                       {"token": "", "logprob": -0.2, "bytes": []},
                                       {"token": "", "logprob": -0.3, "bytes": []},
                                       {"token": "d", "logprob": -0.4, "bytes": [100]}]}}
    assert _tokens(served, " Re\ufffdd") == (("", -0.5), (" Re", -0.1), ("", -0.2), ("\ufffd", -0.3), ("d", -0.4))
    assert _tokens(served, " Rexxd") is None  # letters no piece spells are never given away


class TokenCaptioner(ScriptedCaptioner):
    """A scripted captioner over fixture scenes (known by their pixels) that returns token log-probabilities:
    every word sure except the shape of the object in the bottom right, and every shape in a scene with a star."""

    def __init__(self, rows) -> None:
        super().__init__(lambda img: "")
        self.scenes = {}
        for r in rows:
            scene = world.Scene.from_dict(json.loads(r["scene"]))
            self.scenes[hashlib.sha256(world.render(scene).convert("RGB").tobytes()).hexdigest()] = scene
        self.sampling: list[Sampling] = []

    def generate(self, requests, params):
        self.sampling.append(params)
        out = []
        for r in requests:
            scene = self.scenes[hashlib.sha256(r.images[0].convert("RGB").tobytes()).hexdigest()]
            starred = any(o.shape == "star" for o in scene.objects)
            tokens = [("On", SURE), (f" a {scene.background} background", SURE), (".", SURE)]
            for o in scene.objects:
                word = UNSURE if starred or o.position == "bottom right" else SURE
                tokens += [(f" The {o.position} has a {o.color}", SURE), (f" {o.shape}", word), (".", SURE)]
            text = "".join(p for p, _ in tokens)
            out.append([Generation(text, num_tokens=len(tokens), tokens=tuple(tokens) if params.logprobs else None)])
        return out


def annotate_scenes(tmp_path, n: int, threshold: float, logprobs: bool = True):
    """Annotate n fixture scenes with the token captioner and abstain_below=threshold: (scene rows, manifest rows,
    shard stats, the sampling the engine was asked for)."""
    rows = scene_rows(n)
    commit_image_shard(Storage(str(tmp_path)), 0, rows)
    config = load_config(None, ["annotate.captioner.backend=hf", "annotate.captioner.model=scripted",
                                "annotate.captioner.chunk_size=4", "shard_size=20",
                                f"annotate.abstain_below={threshold}"], root=str(tmp_path))
    engine = TokenCaptioner(rows)
    if not logprobs:  # a backend that gives no token probabilities
        plain = engine.generate
        engine.generate = lambda requests, params: plain(requests, Sampling())
    run_stage(config, "annotate", [0], progress=False, out=io.StringIO(),
              resources={annotate.captioner_key(config.annotate.captioner): engine})
    manifest = pq.read_table(tmp_path / "captions/00000.parquet").to_pylist()
    stats = json.loads((tmp_path / "captions/00000_stats.json").read_text())["extra"]
    return rows, manifest, stats, engine.sampling


def test_annotate_drops_unsure_sentences_and_keeps_them_in_the_manifest(tmp_path):
    rows, manifest, stats, sampling = annotate_scenes(tmp_path, 12, 0.8)
    assert sampling and all(p.logprobs for p in sampling)
    assert len(manifest) == 12
    for r, row in zip(rows, manifest, strict=True):
        scene = world.Scene.from_dict(json.loads(r["scene"]))
        starred = any(o.shape == "star" for o in scene.objects)
        unsure = [f"The {o.position} has a {o.color} {o.shape}." for o in scene.objects
                  if starred or o.position == "bottom right"]
        assert row["abstained"] == [unsure]
        assert row["status"] == "ok" and "star" not in row["caption"] and "bottom right" not in row["caption"]
        assert row["caption"].startswith(f"On a {scene.background} background.")
        assert json.loads(row["sampling"])["abstain_below"] == 0.8
    assert any(row["abstained"][0] for row in manifest) and any(not row["abstained"][0] for row in manifest)
    with tarfile.open(tmp_path / "captions/00000.tar") as tar:
        meta = {m.name: json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")}
    assert [m["abstained"] for m in meta.values()] == [r["abstained"] for r in manifest]
    assert stats["abstained_sentences"] == sum(len(r["abstained"][0]) for r in manifest) > 0
    assert stats["ungated"] == 0 and stats["abstain_below"] == 0.8


def test_annotate_without_probabilities_says_the_gate_did_not_run(tmp_path):
    _, manifest, stats, _ = annotate_scenes(tmp_path, 4, 0.8, logprobs=False)
    assert all(r["status"] == "ok" and r["abstained"] is None and "background" in r["caption"] for r in manifest)
    assert stats["ungated"] == 4


def test_the_dataset_card_says_what_the_gate_dropped(tmp_path):
    from pipeline.publish.export import export
    from pipeline.publish.rows import Selection
    from pipeline.publish.source import CommittedSource

    _, manifest, stats, _ = annotate_scenes(tmp_path / "root", 12, 0.8)
    export(CommittedSource(Storage(str(tmp_path / "root"))), "hf", str(tmp_path / "out"), Selection(),
           stream=io.StringIO())
    card = (tmp_path / "out" / "README.md").read_text()
    assert (f"abstention gate (`annotate.abstain_below` 0.8): {stats['abstained_sentences']} sentence(s)" in card
            and stats["abstained_sentences"] > 0)


def test_a_caption_with_every_sentence_dropped_is_a_failed_row_that_keeps_them(tmp_path):
    _, manifest, stats, _ = annotate_scenes(tmp_path, 3, 0.999)  # even the sure words (0.99) are below
    for r in manifest:
        assert r["status"] == "error" and r["error_reason"] == "abstained" and r["caption"] is None
        assert r["abstained"][0][0].startswith("On a ")


def test_bench_train_scores_both_sides_through_the_same_gate():
    from tools.bench_train import ABSTAIN_SWEEP, abstain_sweep, gated

    scene = world.Scene("gray", (world.SceneObject("star", "red", "top left"),
                                 world.SceneObject("circle", "blue", "bottom right")))
    sure = Generation("On a gray background. The top left has a red star.",
                      tokens=tuple(toks("On", " a", " gray", " background", ".", " The", " top", " left", " has",
                                        " a", " red", " star", ".")))
    wrong = Generation("On a gray background. The bottom right has a blue square.",
                       tokens=tuple(toks("On", " a", " gray", " background", ".", " The", " bottom", " right",
                                         " has", " a", " blue", " square", ".", unsure=("square",))))
    assert gated([sure, wrong], 0.8) == [sure.text, "On a gray background."]
    assert gated([sure, wrong], 0.0) == [sure.text, wrong.text]
    sweep = abstain_sweep([sure], [wrong], [scene], lambda text: len(text.split()))
    assert list(sweep) == [str(t) for t in ABSTAIN_SWEEP]
    assert sweep["0.0"]["after"]["hallucination"] > 0 and sweep["0.8"]["after"]["hallucination"] == 0
    assert sweep["0.8"]["before"] == sweep["0.0"]["before"]
