"""The train stage: RL with TRL on the demo world (nano captioner snapshot + nano reader), SIGKILL and resume
to the same final step with the same data order, the result captioning in the hf engine; masked rewards;
the audit's alarm; `--load` on a good folder, a missing path, a text-only model and a folder without a
processor; `status` showing the last step; `submit --gpus 8` rendering accelerate launch."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config import EngineConfig, LengthTermConfig, RewardConfig, load_config
from pipeline.demo import DEMO_MANIFEST
from pipeline.engines.base import ChatRequest, Generation, Sampling, create_engine, image_request
from pipeline.faithful import truth_checker
from pipeline.mcq import LETTERS, MCQ
from pipeline.nano import world
from pipeline.nano.rule_reader import RuleReaderEngine, parse_turn
from pipeline.reward import CapRLReward
from pipeline.runner import run_stage
from pipeline.status import print_status
from pipeline.storage import Storage
from stages.qa import published
from stages.train.audit import TRUTH_KIND, Audit, AuditResult
from stages.train.data import TrainImage, split
from stages.train.reward_fn import CaptionReward, RewardUnavailable, length_factor
from stages.train.trainer import parse_log, per_device_batch, read_log, summarize_log

REPO = Path(__file__).resolve().parent.parent
NANO = REPO / "models" / "nano"
needs_nano = pytest.mark.skipif(not (NANO / "nano-vl-step300" / "config.json").exists(), reason="no nano models")

FAST = ["train.load=null", "train.max_steps=6", "train.save_steps=2", "train.images_per_step=2",
        "train.num_generations=2", "train.max_new_tokens=24", "train.audit.every=3", "train.audit.images=3",
        "train.reward.n_draws=2", "train.learning_rate=1e-4"]


# -- a qa-committed root from the published layout (no generator needed) -------------------------
def published_file(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        scene = world.sample_scene(rng)
        gt = [{"question": q.question, "choices": [f"{LETTERS[j]}) {o}" for j, o in enumerate(q.options)],
               "answer": q.answer} for q in world.pick_mcqs(scene, rng, k=3)]
        rows.append({"id": f"img{i:03d}", "image": {"bytes": world.encode(world.render(scene)), "path": f"{i}.png"},
                     "prompt": published.published_prompt(), "data_source": "test",
                     "reward_model": {"ground_truth": gt, "style": "rule"}})
    pq.write_table(pa.Table.from_pylist(rows, schema=published.PUBLISHED_SCHEMA), path)
    return path


def qa_root(tmp_path: Path, name: str, n: int = 12, *overrides: str):
    root = tmp_path / name
    config = load_config(DEMO_MANIFEST, ["shard_size=6", *FAST, *overrides], root=str(root))
    src = tmp_path / "published.parquet"
    if not src.exists():
        published_file(src, n)
    published.import_qa(config, Storage(str(root)), str(src))
    return config, root


def cli_args(root: Path, *overrides: str) -> list[str]:
    args = ["--manifest", str(DEMO_MANIFEST), "--root", str(root), "--set", "shard_size=6"]
    for item in (*FAST, *overrides):
        args += ["--set", item]
    return args


# -- RL end to end ------------------------------------------------------------------------------
@needs_nano
@pytest.mark.slow
def test_rl_killed_mid_run_resumes_to_the_same_final_step_and_data_order(tmp_path):
    config, root = qa_root(tmp_path, "killed")
    env = {**os.environ, "PIPELINE_TEST_TRAIN_STEP_DELAY_S": "1.0", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--stage", "train", "--no-progress",
                             *cli_args(root)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    progress = root / "checkpoints" / "_progress" / "all"
    deadline = time.time() + 300
    while time.time() < deadline and not (progress / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "_done" / "train" / "all.json").exists()

    report = run_stage(config, "train", None, progress=False, out=io.StringIO())
    assert report.exit_code == 0
    marker = json.loads((root / "_done" / "train" / "all.json").read_text())
    summary = marker["stats"]["extra"]
    assert summary["steps"] == 6 and summary["resumed_from"] in (2, 4)
    log = read_log(str(root / "checkpoints" / "all" / "train_log.jsonl"))
    steps = [r["step"] for r in log if "reward_mean" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # no step lost or repeated across the kill
    for r in log:
        if "reward_mean" in r:
            assert 0.0 <= r["reward_mean"] <= 1.0 and "zero_variance_groups" in r and "lr" in r
            assert "caption_tokens" in r and r["missing_rewards"] == 0 and r["reader_calls_per_s"] > 0
    audits = [r["audit"] for r in log if "audit" in r]
    assert [a["step"] for a in audits] == [0, 3, 6] and all(a["train_reward"] is not None for a in audits)

    # the same run without a kill trains on the same images in the same order
    config2, root2 = qa_root(tmp_path, "straight")
    assert run_stage(config2, "train", None, progress=False, out=io.StringIO()).exit_code == 0
    log2 = read_log(str(root2 / "checkpoints" / "all" / "train_log.jsonl"))
    order = [r["images"] for r in log if "images" in r]
    assert order and order == [r["images"] for r in log2 if "images" in r]

    # a plain Hugging Face folder that the hf engine loads and captions with
    folder = root / "checkpoints" / "all"
    for name in ("config.json", "model.safetensors", "processor_config.json", "chat_template.jinja",
                 "tokenizer.json", "generation_config.json"):
        assert (folder / name).exists(), name
    engine = create_engine(EngineConfig(backend="hf", model=str(folder), device="cpu", min_pixels=12544,
                                        max_pixels=12544))
    rng = random.Random(5)
    gens = engine.generate([image_request("Please describe this image in detail.",
                                          world.render(world.sample_scene(rng)))], Sampling(max_new_tokens=40))
    assert gens[0][0].text.strip()

    out = io.StringIO()
    print_status(config, "train", out=out)
    assert "train: all trained: step 6/6, reward" in out.getvalue()
    assert "audit at step 6" in out.getvalue()

    # annotate names the registered checkpoint; a retrained checkpoint makes its shards stale
    assert run_stage(config, "annotate", [0], progress=False, out=io.StringIO()).exit_code == 0
    recorded = json.loads((root / "_done" / "annotate" / "00000.json").read_text())["inputs"]
    assert "train/all" in recorded


# -- masked rewards --------------------------------------------------------------------------------
class FlakyReader:
    """Answers right, except for captions containing 'unlucky': those requests fail."""

    model_id = "flaky"

    def generate(self, requests, params: Sampling):
        out = []
        for r in requests:
            caption, _, options = parse_turn(r)
            if "unlucky" in caption:
                out.append([Generation("", "error", error="reader timed out")])
            else:
                out.append([Generation(f" {LETTERS[len(options) - 1]}", "stop", 1)])
        return out

    def score_choices(self, requests, choices):
        raise NotImplementedError

    def close(self):
        pass


def _mcqs_json() -> str:
    return json.dumps([MCQ("What color is the sky?", ("red", "blue", "green", "gray"), "B", id="q1").to_dict()])


def test_failing_reader_masks_the_caption_never_scores_it_zero():
    reward = CapRLReward(FlakyReader(), RewardConfig(mode="sample", n_draws=2, retries=1))
    fn = CaptionReward(reward, max_missing_share=0.5)
    metrics: dict[str, float] = {}
    out = fn(prompts=[None] * 4, completions=[[{"role": "assistant", "content": c}] for c in
                                              ("fine", "unlucky one", "fine too", "also fine")],
             key=["a", "a", "b", "b"], mcqs=[_mcqs_json()] * 4,
             log_metric=lambda k, v: metrics.__setitem__(k, v))
    assert out[1] is None and all(isinstance(v, float) for i, v in enumerate(out) if i != 1)
    assert metrics["missing_rewards"] == 1 and fn.totals["missing"] == 1
    with pytest.raises(RewardUnavailable, match="max_missing_share"):
        fn(prompts=[None] * 2, completions=["unlucky", "unlucky too"], key=["a", "b"], mcqs=[_mcqs_json()] * 2)


def test_trl_leaves_a_missing_reward_out_of_its_group():
    """The TRL release we depend on masks None rewards (NaN -> out of the group baseline, advantage 0)."""
    import inspect

    from trl import GRPOTrainer, RLOOTrainer

    for cls in (GRPOTrainer, RLOOTrainer):
        src = inspect.getsource(cls._generate_and_score_completions)
        assert "unscorable_mask" in src and "nan_to_num(advantages" in src


def test_length_term_and_batch_split():
    cfg = LengthTermConfig(weight=0.2, full_tokens=10, zero_tokens=20)
    assert length_factor(5, cfg) == 1.0 and length_factor(15, cfg) == 0.5 and length_factor(40, cfg) == 0.0
    from pipeline.config import TrainConfig

    assert per_device_batch(TrainConfig(images_per_step=128, num_generations=8), 8) == 128
    with pytest.raises(Exception, match="cannot be split"):
        per_device_batch(TrainConfig(images_per_step=3, num_generations=3, gradient_accumulation_steps=2), 1)


def test_repetition_and_length_terms_mix_into_the_reward():
    from pipeline.config import RepetitionTermConfig, TrainConfig

    rule = CapRLReward(RuleReaderEngine(), RewardConfig(mode="option_text"))
    plain = CaptionReward(rule)
    assert plain.mix(0.7, 500, 0.5) == 0.7  # both terms off: the utility alone
    both = CaptionReward(rule, LengthTermConfig(weight=0.2, full_tokens=10, zero_tokens=20),
                         repetition=RepetitionTermConfig(weight=0.1))
    assert both.mix(1.0, 5, 0.0) == pytest.approx(1.0)
    assert both.mix(0.5, 15, 0.25) == pytest.approx(0.7 * 0.5 + 0.2 * 0.5 + 0.1 * 0.75)
    scene = world.sample_scene(random.Random(1))
    mcqs = json.dumps([q.to_dict() for q in world.pick_mcqs(scene, random.Random(2), k=3)])
    caption = world.caption(scene)
    looped = " ".join([caption] * 3)  # the same facts, said three times
    rewards = CaptionReward(rule, repetition=RepetitionTermConfig(weight=0.2))(
        ["p", "p"], [caption, looped], key=["k", "k"], mcqs=[mcqs, mcqs])
    assert rewards[0] == pytest.approx(1.0) and rewards[1] < 0.9  # same utility, the repeats cost
    with pytest.raises(Exception, match="must be below 1"):
        TrainConfig(length=LengthTermConfig(weight=0.5), repetition=RepetitionTermConfig(weight=0.5))


def test_draws_per_image_asks_every_caption_of_an_image_the_same_questions():
    mcqs = [MCQ(f"q{i}?", ("a", "b", "c", "d"), "A", id=f"q{i}") for i in range(5)]
    per_image = CapRLReward(RuleReaderEngine(), RewardConfig(mode="option_text", draws_per="image"))
    plans = [per_image.plan(c, mcqs, "img|step3", 0) for c in ("one caption", "another caption")]
    assert plans[0] == plans[1]
    per_caption = CapRLReward(RuleReaderEngine(), RewardConfig(mode="option_text"))
    assert per_caption.plan("one caption", mcqs, "k", 0) != per_caption.plan("another caption", mcqs, "k", 0)


# -- the audit -----------------------------------------------------------------------------------------
def test_rule_reader_and_truth_coverage():
    rng = random.Random(3)
    scene = world.sample_scene(rng)
    mcqs = world.pick_mcqs(scene, rng, k=5)
    reward = CapRLReward(create_engine(EngineConfig(backend="nano-rule")), RewardConfig(mode="option_text"))
    assert [r.reward for r in reward([world.caption(scene), ""], [mcqs, mcqs])] == [1.0, 0.0]
    check = truth_checker(TRUTH_KIND)
    assert check(scene.to_json(), world.caption(scene)).coverage == 1.0  # type: ignore[union-attr]
    assert check(scene.to_json(), "").coverage < 0.5 and check("not a scene", "x") is None  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        parse_turn(ChatRequest(messages=[{"role": "user", "content": "hello"}]))


def test_alarm_when_training_reward_rises_while_audit_falls():
    from pipeline.config import AuditConfig

    audit = Audit(AuditConfig(tolerance=0.02), [], None, None, "p", 8)  # type: ignore[arg-type]
    audit.history = [AuditResult(0, 0.40, 0.50, 0.60, 20).record()]
    assert audit.alarm(AuditResult(50, 0.55, 0.52, 0.61, 20)) is None  # both rose
    assert audit.alarm(AuditResult(50, 0.41, 0.30, 0.40, 20)) is None  # the training reward did not rise
    msg = audit.alarm(AuditResult(50, 0.60, 0.45, 0.62, 20))
    assert msg and "audit_reward 0.500 -> 0.450" in msg
    assert "truth 0.600 -> 0.500" in (audit.alarm(AuditResult(60, 0.60, None, 0.50, 20)) or "")
    audit.history = [AuditResult(0, 0.40, None, 0.60, 20, hallucination=0.10).record()]
    assert audit.alarm(AuditResult(50, 0.60, None, 0.62, 20, hallucination=0.11)) is None  # within tolerance
    assert audit.alarm(AuditResult(50, 0.41, None, 0.62, 20, hallucination=0.30)) is None  # reward did not rise
    msg2 = audit.alarm(AuditResult(50, 0.60, None, 0.62, 20, hallucination=0.30))
    assert msg2 and "hallucination 0.100 -> 0.300" in msg2 and "truth" not in msg2
    line = summarize_log(parse_log(json.dumps({"step": 50, "max_steps": 100, "reward_mean": 0.6, "reward_std": 0.1,
                                     "audit": {**AuditResult(50, 0.6, 0.45, 0.62, 20).record(), "alarm": msg}})))
    assert line and line.startswith("step 50/100, reward 0.600") and "ALARM" in line


def test_held_out_split_is_stable_and_disjoint():
    ims = [TrainImage(f"k{i}", f"/x/{i}.png", ()) for i in range(20)]
    train, held = split(ims, 5)
    assert len(held) == 5 and not {i.key for i in train} & {i.key for i in held}
    assert [i.key for i in split(ims[::-1], 5)[1]] == [i.key for i in held]


# -- --load ----------------------------------------------------------------------------------------------
@needs_nano
def test_load_registers_a_good_checkpoint(tmp_path, capsys):
    root = tmp_path / "root"
    assert main(["run", "--stage", "train", "--load", str(NANO / "nano-vl"), "--root", str(root),
                 "--no-progress"]) == 0
    folder = root / "checkpoints" / "all"
    summary = json.loads((folder / "train_summary.json").read_text())
    assert summary["mode"] == "load" and summary["sample_caption"].strip()
    assert (folder / "model.safetensors").read_bytes() == (NANO / "nano-vl" / "model.safetensors").read_bytes()
    marker = json.loads((root / "_done" / "train" / "all.json").read_text())
    assert marker["artifact"] == "checkpoints/all" and "checkpoints/all/config.json" in marker["outputs"]


@needs_nano
@pytest.mark.parametrize("case, expected", [
    ("missing", "is not a checkpoint folder"),
    ("text-only", "is a text-only model"),
    ("no-processor", "processor"),
    ("not-a-model", "no readable model config"),
])
def test_load_refuses_with_one_error_line(tmp_path, capsys, case, expected):
    if case == "missing":
        path = tmp_path / "nowhere"
    elif case == "text-only":
        path = NANO / "nano-reader"
    elif case == "no-processor":
        path = tmp_path / "bare"
        shutil.copytree(NANO / "nano-vl", path)
        for name in ("processor_config.json", "preprocessor_config.json"):
            (path / name).unlink(missing_ok=True)
    else:
        path = tmp_path / "junk"
        path.mkdir()
        (path / "config.json").write_text("{}")
    code = main(["run", "--stage", "train", "--load", str(path), "--root", str(tmp_path / "root"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: train.load") and expected in err[0], err


def test_load_flag_belongs_to_train(tmp_path, capsys):
    assert main(["run", "--stage", "annotate", "--shards", "0", "--load", "x", "--root", str(tmp_path)]) == 2
    assert "belongs to the train stage" in capsys.readouterr().err


def test_submit_train_on_8_gpus_renders_accelerate_launch(tmp_path, capsys):
    assert main(["submit", "--stage", "train", "--gpus", "8", "--dry-run", "--root", str(tmp_path / "r"),
                 "--set", "train.policy.model=/models/Qwen2.5-VL-3B-Instruct"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --gres=gpu:8" in script and "#SBATCH --nodes=1" in script and "--array" not in script
    assert ('"$PYTHON" -m accelerate.commands.launch --multi_gpu --num_processes=8 --num_machines=1 '
            "--mixed_precision=no --dynamo_backend=no -m pipeline run --stage train") in script
    assert main(["submit", "--stage", "train", "--gpus", "1", "--dry-run", "--root", str(tmp_path / "r")]) == 0
    assert "accelerate" not in capsys.readouterr().out


# -- the demo -----------------------------------------------------------------------------------------
@needs_nano
@pytest.mark.slow
def test_demo_train_runs_rl_between_qa_and_annotate(tmp_path):
    import yaml

    from pipeline.demo import run_demo
    from tests.test_docs import assert_in_layout

    doc = yaml.safe_load(DEMO_MANIFEST.read_text())
    doc["train"].update({"max_steps": 2, "save_steps": 2, "images_per_step": 2, "num_generations": 2})
    doc["train"]["audit"].update({"every": 2, "images": 2})
    doc["evaluate"].update({"k": 1, "captioners": {"nano-vl": doc["evaluate"]["captioners"]["nano-vl"]}})
    doc["evaluate"]["benchmarks"][0]["limit"] = 3
    manifest = tmp_path / "demo.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    out = io.StringIO()
    code = run_demo(str(tmp_path / "root"), str(tmp_path / "data"), 0, 20, str(manifest), out=out, train=True)
    assert code == 0, out.getvalue()[-3000:]
    root = tmp_path / "root"
    train = json.loads((root / "_done" / "train" / "all.json").read_text())
    assert train["stats"]["extra"]["steps"] == 2
    summary = json.loads((root / "checkpoints" / "all" / "train_summary.json").read_text())
    assert summary["mode"] == "rl" and summary["policy"].endswith("nano-vl-step300")
    annotate = json.loads((root / "_done" / "annotate" / "00000.json").read_text())
    assert "train/all" in annotate["inputs"]
    report = json.loads((root / "eval" / "demo" / "report.json").read_text())
    assert "trained" in report["captioners"] and "nano-vl" in report["captioners"]
    assert_in_layout(root)  # every folder the demo made is in the README's storage layout


@needs_nano
@pytest.mark.slow
def test_rloo_with_kl_trains_and_logs_kl(tmp_path):
    config, root = qa_root(tmp_path, "rloo", 12, "train.algorithm=rloo", "train.beta=0.04", "train.max_steps=2",
                           "train.audit.every=0")
    assert run_stage(config, "train", None, progress=False, out=io.StringIO()).exit_code == 0
    log = [r for r in read_log(str(root / "checkpoints" / "all" / "train_log.jsonl")) if "reward_mean" in r]
    assert [r["step"] for r in log] == [1, 2] and all("kl" in r for r in log)
    assert json.loads((root / "checkpoints" / "all" / "train_summary.json").read_text())["algorithm"] == "rloo"


def test_trainer_settings_map_onto_trl():
    from pipeline.config import TrainConfig
    from stages.train.trainer import total_steps, trainer_args

    grpo = trainer_args(TrainConfig(images_per_step=4, num_generations=8, beta=0.0, num_iterations=2), "/tmp/x",
                        True, 10)
    assert type(grpo).__name__ == "GRPOConfig" and grpo.per_device_train_batch_size == 32
    assert grpo.num_iterations == 2 and grpo.loss_type == "dapo" and grpo.beta == 0.0 and grpo.max_steps == 10
    rloo = trainer_args(TrainConfig(algorithm="rloo", images_per_step=4, num_generations=4), "/tmp/x", True, 5)
    assert type(rloo).__name__ == "RLOOConfig" and rloo.num_generations == 4
    assert total_steps(TrainConfig(images_per_step=4, epochs=2, num_iterations=2), 10) == 10
    assert grpo.report_to == [] or grpo.report_to == "none"


def test_report_to_reaches_trl(monkeypatch):
    import importlib.util

    from pipeline.config import TrainConfig
    from pipeline.errors import ConfigError
    from stages.train.trainer import report_targets

    assert report_targets(TrainConfig()) == []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        report_targets(TrainConfig(report_to="tensorboard"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else None)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert report_targets(TrainConfig(report_to="wandb")) == ["wandb"]
    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.delenv("WANDB_MODE")


# -- both model generations: a tiny random policy and reader of each --------------------------------------------
GENERATIONS = {"qwen2.5": ("qwen2.5-vl", "qwen2", 56 * 56), "qwen3": ("qwen3-vl", "qwen3", 64 * 64)}
"""generation -> (policy family, reader family, the policy's pixel budget: 2 x 2 tokens on its grid)."""


@pytest.mark.parametrize("generation", list(GENERATIONS))
def test_policy_pixel_budget_reaches_its_processor(tmp_path, generation):
    """The tiny processors' own budget is one 112 / 128 px square; the policy's (a quarter of it) must win, for
    the trainer's own processor calls and for the processor saved with the checkpoint."""
    from PIL import Image

    from pipeline.config import TrainConfig
    from pipeline.engines.preprocess import prepare_image
    from pipeline.nano.random_checkpoints import build_random_vl_model
    from stages.train.trainer import load_policy

    family, _, pixels = GENERATIONS[generation]
    path = build_random_vl_model(tmp_path / family, family=family)
    cfg = TrainConfig(policy=EngineConfig(model=str(path), min_pixels=pixels, max_pixels=pixels))
    _, processor, grid = load_policy(str(path), cfg, use_cpu=True)
    assert grid.factor == {"qwen2.5-vl": 28, "qwen3-vl": 32}[family]
    image = prepare_image(Image.new("RGB", (300, 200), "red"), grid)
    assert image.width * image.height <= pixels
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
    out = processor(text=[text], images=[Image.new("RGB", (300, 200), "red")], return_tensors="pt")
    thw = out["image_grid_thw"][0].tolist()
    assert thw[1] * thw[2] * grid.patch ** 2 <= pixels  # resized to the policy's budget, not the processor's own
    processor.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "processor_config.json").read_text())["image_processor"]["size"]
    assert saved == {"shortest_edge": pixels, "longest_edge": pixels}


@pytest.mark.slow
@pytest.mark.parametrize("generation", list(GENERATIONS))
def test_a_few_grpo_steps_on_each_generation(tmp_path, generation):
    """Two GRPO steps of a tiny random policy rewarded by a tiny random reader of the same generation (Qwen2.5-VL
    with Qwen2, Qwen3-VL with Qwen3 and its chat-template option), and the result captions in the hf engine."""
    from pipeline.nano.random_checkpoints import build_random_text_model, build_random_vl_model

    family, reader_family, pixels = GENERATIONS[generation]
    policy = build_random_vl_model(tmp_path / family, family=family)
    reader = build_random_text_model(tmp_path / reader_family, family=reader_family, layers=1)
    config, root = qa_root(tmp_path, "root", 6, "train.max_steps=2", "train.audit.every=0", "train.max_new_tokens=8",
                           f"train.policy.model={policy}", f"train.policy.min_pixels={pixels}",
                           f"train.policy.max_pixels={pixels}", f"train.reward.reader.model={reader}",
                           "train.reward.mode=sample")
    assert config.train.reward.reader.chat_template_kwargs == {"enable_thinking": False}
    assert run_stage(config, "train", None, progress=False, out=io.StringIO()).exit_code == 0
    log = [r for r in read_log(str(root / "checkpoints" / "all" / "train_log.jsonl")) if "reward_mean" in r]
    assert [r["step"] for r in log] == [1, 2] and all(r["missing_rewards"] == 0 for r in log)
    folder = root / "checkpoints" / "all"
    engine = create_engine(EngineConfig(backend="hf", model=str(folder), device="cpu", min_pixels=pixels,
                                        max_pixels=pixels))
    assert engine.image_grid.factor == {"qwen2.5-vl": 28, "qwen3-vl": 32}[family]
    [[gen]] = engine.generate([image_request("Describe.", world.render(world.sample_scene(random.Random(1))))],
                              Sampling(max_new_tokens=4))
    assert gen.num_tokens == 4
