"""The real-model manifests: manifests/caprl-qwen3.yaml (the CapRL++ generation) against caprl.yaml."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.config import load_config


def _key_lines(node: yaml.Node, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Every key path of a composed YAML mapping -> the line its key is on."""
    out: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*path, key.value)
            out[sub] = key.start_mark.line
            out.update(_key_lines(value, sub))
    return out


def _leaves(data: object, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _leaves(value, (*path, str(key))).items()}
    return {path: data}


def test_caprl_qwen3_manifest_says_where_each_difference_comes_from():
    """manifests/caprl-qwen3.yaml validates, holds the CapRL++ settings, and every setting that differs from
    caprl.yaml carries a comment (on its line or its section's) naming its source."""
    cfg = load_config("manifests/caprl-qwen3.yaml")
    assert cfg.annotate.captioner.model.endswith("CapRL-Qwen3VL-4B")
    assert cfg.train.policy.model.endswith("Qwen3-VL-4B-Instruct")
    assert cfg.train.reward.reader.model.endswith("Qwen3-4B-Instruct-2507")
    assert cfg.train.reward.n_draws == 8 and cfg.train.reward.sampling.temperature == 0.6
    assert cfg.train.reward.sampling.max_new_tokens == 10
    assert (cfg.train.length.weight, cfg.train.length.full_tokens, cfg.train.length.zero_tokens) == (0.2, 2048, 3072)
    assert cfg.train.learning_rate == 1e-5 and cfg.train.images_per_step == 128 and cfg.train.num_generations == 8
    assert cfg.train.reward.reader.chat_template_kwargs == {"enable_thinking": False}
    assert cfg.train.audit.reward.reader.model != cfg.train.reward.reader.model
    text = Path("manifests/caprl-qwen3.yaml").read_text().splitlines()
    lines = _key_lines(yaml.compose("\n".join(text)))
    base = _leaves(yaml.safe_load(Path("manifests/caprl.yaml").read_text()))
    new = _leaves(yaml.safe_load("\n".join(text)))
    differing = [p for p in new if base.get(p, object()) != new[p]]
    assert len(differing) > 20
    silent = [".".join(p) for p in differing
              if not any("#" in text[lines[p[:i]]] for i in range(len(p), 0, -1) if p[:i] in lines)]
    assert not silent, f"settings that differ from caprl.yaml without a comment: {silent}"


def test_caprl_qwen3_manifest_renders_with_submit_dry_run(tmp_path, capsys):
    from pipeline.cli import main

    code = main(["submit", "--stage", "qa,train,annotate,evaluate", "--shards", "0-3", "--tasks", "2", "--dry-run",
                 "--manifest", "manifests/caprl-qwen3.yaml", "--root", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 0, out
    for stage in ("qa", "train", "annotate", "evaluate"):
        assert f"--stage {stage}" in out
    assert "--dependency=afterok" in out and not (tmp_path / "r").exists()
