"""Configuration: presets, overrides, and one clear line for every bad key or value."""

from __future__ import annotations

import pytest

from bench.config import RunConfig, load_config
from methods.registry import ConfigError


def test_defaults_are_valid_and_fingerprint_is_stable():
    a, b = load_config(), load_config()
    assert isinstance(a, RunConfig) and a.fingerprint() == b.fingerprint()
    assert load_config(overrides={"out": "elsewhere"}).fingerprint() == a.fingerprint()
    assert load_config(overrides={"train.lr": "0.05"}).fingerprint() != a.fingerprint()


def test_preset_and_overrides_merge(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("methods: [cosface]\ntrain:\n  budget: 2048\n  lr: 0.02\n"
                      "method_params:\n  cosface: {m: 0.35}\n")
    cfg = load_config(preset, {"train.lr": "0.5", "methods": "arcface,cosface"})
    assert cfg.methods == ["arcface", "cosface"]
    assert cfg.train.budget == 2048 and cfg.train.lr == 0.5
    assert cfg.method_params == {"cosface": {"m": 0.35}}


@pytest.mark.parametrize("yaml_text, message", [
    ("train:\n  learning_rate: 0.1\n", r"p\.yaml: unknown key 'train.learning_rate'; valid: train.backbone"),
    ("train:\n  budget: lots\n", r"p\.yaml: 'train.budget' must be int, got 'lots'"),
    ("train: 3\n", r"p\.yaml: 'train' must be a mapping"),
    ("- a\n- b\n", r"p\.yaml: expected a mapping at the top level"),
    ("train: [\n", r"p\.yaml: not valid YAML"),
    ("train:\n  batch_size: 1\n", r"train\.batch_size must be >= 2, got 1"),
])
def test_bad_preset_gives_one_line_naming_file_and_key(tmp_path, yaml_text, message):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(preset)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, message", [
    ({"train.budget": "-5"}, r"train\.budget \(-5\) must be >= train\.batch_size"),
    ({"train.lr": "0"}, r"train\.lr must be > 0"),
    ({"train.device": "tpu"}, r"train\.device must be auto, cpu, cuda or cuda:N"),
    # issue 12: these passed the old prefix check ("cuda" before the colon) and failed later in torch.device
    ({"train.device": "cuda:x"}, r"train\.device must be auto, cpu, cuda or cuda:N \(N a device index\), got 'cuda:x'"),
    ({"train.device": "cuda:"}, r"got 'cuda:'"),
    ({"train.device": "cuda:0:1"}, r"got 'cuda:0:1'"),
    ({"data.synthface.label_noise": "1.5"}, r"label_noise must be in \[0, 1\)"),
    ({"train.amp": "maybe"}, r"'train\.amp' must be bool"),
    ({"trian.lr": "1"}, r"command line: unknown key 'trian'"),
    ({"methods": "arcface,arcface"}, r"duplicate names"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_missing_preset_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
