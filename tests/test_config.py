import json

import pytest

from pipeline.config import RunConfig, load_config
from pipeline.errors import ConfigError


def test_demo_manifest_loads():
    cfg = load_config("manifests/demo.yaml")
    assert cfg.shard_size == 20 and cfg.download.image_size == 112


def test_unknown_keys_are_errors(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text("root: /x\ndownload:\n  image_sise: 3\n")
    with pytest.raises(ConfigError, match=r"download\.image_sise: unknown key"):
        load_config(m)


def test_overrides_and_fields():
    cfg = load_config("manifests/demo.yaml", ["annotate.captioner.batch_size=7", "shard_size=5"], root="/r")
    assert cfg.annotate.captioner.batch_size == 7 and cfg.shard_size == 5 and cfg.root == "/r"
    with pytest.raises(ConfigError, match="bad override"):
        load_config(None, ["nokey"])
    with pytest.raises(ConfigError, match="shard_size"):
        load_config(None, ["shard_size=0"])


def test_missing_and_bad_manifest(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_fingerprint_ignores_runtime_fields():
    a = RunConfig()
    b = RunConfig.model_validate({"annotate": {"captioner": {"batch_size": 3, "preprocess_workers": 9}}})
    c = RunConfig.model_validate({"annotate": {"prompt": "Describe."}})
    assert a.fingerprint("annotate") == b.fingerprint("annotate")
    assert a.fingerprint("annotate") != c.fingerprint("annotate")
    assert a.fingerprint("download") == c.fingerprint("download")
    assert a.fingerprint("annotate") != RunConfig(shard_size=10).fingerprint("annotate")


def test_real_model_manifest_validates():
    cfg = load_config("manifests/caprl.yaml")
    assert cfg.annotate.captioner.backend == "vllm" and cfg.annotate.reward.reader.backend == "openai"
    assert cfg.annotate.sampling.max_new_tokens == 2048 and cfg.annotate.reward.n_draws == 8


def test_engine_encode_ahead_reads_a_bare_yaml_on_off():
    for text, expected in (("on", "on"), ("off", "off"), ("auto", "auto")):
        config = load_config(None, [f"annotate.captioner.encode_ahead={text}"])
        assert config.annotate.captioner.encode_ahead == expected
    with pytest.raises(ConfigError):
        load_config(None, ["annotate.captioner.encode_ahead=sometimes"])


def test_a_setting_added_by_a_later_version_is_no_change_at_its_default():
    """A marker written before a setting existed records no value for it: read by this version, the recorded
    settings take its default, so an upgrade neither refuses nor redoes committed units; a real difference
    (or a new setting away from its default) still counts."""
    from pipeline.config import changed_settings, same_settings

    cfg = load_config(None, root="/tmp/x")
    recorded = cfg.semantic("annotate")
    older = json.loads(json.dumps(recorded))
    del older["section"]["captioner"]["chat_template_kwargs"]  # not known to the version that wrote it
    del older["section"]["reward"]["reader"]["chat_template_kwargs"]
    marker = {"config_fingerprint": "written-by-an-older-version", "config": older}
    assert changed_settings(older, cfg, "annotate") == []
    assert same_settings(marker, cfg.fingerprint("annotate"), cfg, "annotate")
    changed = load_config(None, ["annotate.prompt=Describe it."], root="/tmp/x")
    assert changed_settings(older, changed, "annotate") == ["prompt"]
    thinking = load_config(None, ["annotate.reward.reader.chat_template_kwargs={enable_thinking: true}"], root="/tmp/x")
    assert changed_settings(older, thinking, "annotate") == ["reward.reader.chat_template_kwargs.enable_thinking"]
    assert changed_settings(None, cfg, "annotate") == ["settings (not recorded)"]
