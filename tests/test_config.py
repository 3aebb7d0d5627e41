"""Configuration: presets, overrides, and one clear line for every bad key or value."""

from __future__ import annotations

import pytest
import torch

from bench.config import RECORD_KEYS, RunConfig, load_config
from methods.params import coerce
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
    ({"data.synthface.lowres_fraction": "1.5"}, r"lowres_fraction must be in \[0, 1\]"),
    ({"data.synthface.lowres_min_px": "32"}, r"lowres_min_px must be in \[1, image_size = 32\)"),
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


# ----------------------------------------------------------------------------------------------------
# Issue 14, items 1 and 3: one coercion, canonical method names, the run record as a preset
# ----------------------------------------------------------------------------------------------------

#: (text as typed, type, value expected), written by hand.
COERCIONS = [("off", bool, False), ("On", bool, True), ("yes", bool, True), ("0", bool, False),
             ("1e3", int, 1000), ("1_000", int, 1000), ("7", int, 7), ("0.25", float, 0.25), ("2", float, 2.0),
             ("1e-3", float, 0.001)]
#: A configuration key and a method parameter of each type.
TYPED_KEYS = {bool: ("train.amp", "method_params.dcq.shuffle_bn"),
              int: ("train.seed", "method_params.dcq.queue_size"),
              float: ("train.lr", "method_params.dcq.s")}


def _value_at(cfg: RunConfig, dotted: str):
    if dotted.startswith("method_params."):
        _, method, key = dotted.split(".")
        return cfg.method_params[method][key]
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


@pytest.mark.parametrize("text, kind, expected", COERCIONS)
def test_config_keys_and_method_params_read_values_alike(text, kind, expected):
    """One coercion for the project: the same text reads as the same value for a configuration key and a
    method parameter of that type (before issue 14, ``method_params.dcq.shuffle_bn=off`` was refused while
    ``train.amp=off`` worked). Catches a second coercion path or a missing spelling in either."""
    assert coerce(text, kind, "x") == expected and type(coerce(text, kind, "x")) is kind
    for key in TYPED_KEYS[kind]:
        value = _value_at(load_config(overrides={key: text}), key)
        assert value == expected and type(value) is kind, key


@pytest.mark.parametrize("key", ["train.amp", "method_params.dcq.shuffle_bn"])
def test_a_bad_bool_is_one_line_for_both(key):
    """A value no type reading accepts is one ConfigError line naming the key, for both kinds of key."""
    with pytest.raises(ConfigError, match=r"must be bool, got 'maybe'") as info:
        load_config(overrides={key: "maybe"})
    assert "\n" not in str(info.value) and key.split(".")[-1] in str(info.value)


@pytest.mark.parametrize("spelling", ["pm", "prototype_memory"])
@pytest.mark.parametrize("method", ["pm", "prototype_memory"])
def test_method_names_are_canonical_after_loading(spelling, method):
    """Issue 14: ``--methods pm --set method_params.prototype_memory.memory_size=512`` used to be ignored
    (the runner looked the parameters up under the alias). After loading, ``methods`` and the parameter keys
    hold the canonical name, so the method the runner builds (``method_params.get(methods[0])``) has a memory
    of 512 rows whichever spelling was used for either."""
    from methods.base import build_method
    from bench.runner import method_context
    from methods.distributed import DistContext

    cfg = load_config(overrides={"methods": method, f"method_params.{spelling}.memory_size": "512"})
    assert cfg.methods == ["prototype_memory"] and cfg.method_params == {"prototype_memory": {"memory_size": 512}}
    built = build_method(cfg.methods[0], torch.nn.Identity(), method_context(cfg, 1000, DistContext()),
                         cfg.method_params.get(cfg.methods[0]))
    assert built.memory.capacity == 512


def test_method_name_and_params_key_errors(tmp_path):
    """The same method twice (by name and alias) and a parameters key naming no method are one line each;
    parameters of a registered method that is not run are accepted (a preset for every method stays
    reusable with --methods). Catches an alias slipping past the duplicate check and a typo'd method name
    whose parameters would be silently ignored."""
    with pytest.raises(ConfigError, match=r"methods: duplicate names"):
        load_config(overrides={"methods": "pm,prototype_memory"})
    with pytest.raises(ConfigError, match=r"command line: 'method_params\.arcfce' names no method; valid: arcface"):
        load_config(overrides={"method_params.arcfce.m": "0.3"})
    preset = tmp_path / "p.yaml"
    preset.write_text("methods: [arcface]\nmethod_params:\n  pm: {s: 30}\n  prototype_memory: {s: 31}\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: 'method_params': prototype_memory\.s is set twice"):
        load_config(preset)
    cfg = load_config(overrides={"methods": "arcface", "method_params.dcq.s": "40"})
    assert cfg.method_params == {"dcq": {"s": 40.0}}


def test_resolved_config_fills_every_default_and_keeps_the_fingerprint():
    """``resolved()`` writes every parameter of every method out (what a run record saves); the fingerprint
    is over the resolved configuration, so loading it back gives the same one. Catches a fingerprint that
    changes when a default is written out explicitly (a record that would not reproduce its hash)."""
    from methods.base import METHODS

    cfg = load_config(overrides={"methods": "arcface,pm", "method_params.arcface.m": "0.3"})
    resolved = cfg.resolved()
    assert resolved.method_params["arcface"] == {**METHODS.get("arcface").defaults(), "m": 0.3}
    assert resolved.method_params["prototype_memory"] == METHODS.get("prototype_memory").defaults()
    assert resolved.fingerprint() == cfg.fingerprint()


def test_run_record_keys_are_ignored_when_loading_a_preset(tmp_path):
    """A run record's own keys (run id, group, fingerprint, ...) are accepted and ignored by preset loading,
    so config.yaml is a preset; any other unknown key still fails. Catches a record key that would make
    ``bench run --config results/<run>/config.yaml`` fail."""
    preset = tmp_path / "config.yaml"
    preset.write_text("".join(f"{key}: x\n" for key in RECORD_KEYS) + "methods: [cosface]\n")
    assert load_config(preset).methods == ["cosface"]
    preset.write_text("run_idd: x\n")
    with pytest.raises(ConfigError, match="unknown key 'run_idd'"):
        load_config(preset)


@pytest.mark.slow
def test_run_record_config_reproduces_the_run(tiny_args, tmp_path):
    """Issue 14, item 3, end to end through the CLI: a tiny ``bench run --methods pm`` with the parameter set
    under the canonical name, then ``bench run --config <its config.yaml>``. The second record's resolved
    configuration and fingerprint equal the first's (only run id and group differ), and the trained memory
    (checkpointed state) has the size that was set: catches a record that is not loadable, one that loses or
    re-nests a value, a fingerprint over something else than what was written, and parameters ignored
    because of the alias."""
    import yaml
    from typer.testing import CliRunner

    from bench.checkpoint import load_weights_only, read_manifest
    from bench.cli import app
    from bench.records import iter_records

    runner = CliRunner()
    first = runner.invoke(app, ["run", "--methods", "pm", "--set", "method_params.prototype_memory.memory_size=20",
                                "--eval", "synth-lfw", *tiny_args])
    assert first.exit_code == 0, first.output
    (record,) = iter_records(tmp_path / "results")
    run_dir = tmp_path / "results" / record["config"]["run_id"]
    (checkpoint,) = read_manifest(run_dir / "checkpoints")["files"]
    assert load_weights_only(run_dir / "checkpoints" / checkpoint)["method"]["memory.prototypes"].shape[0] == 20
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["methods"] == ["prototype_memory"] and written["method"] == "prototype_memory"
    assert written["method_params"]["prototype_memory"]["memory_size"] == 20

    # The record's config has the run's fingerprint: without --force the run is reused, not retrained.
    reused = runner.invoke(app, ["run", "--config", str(run_dir / "config.yaml")])
    assert reused.exit_code == 0 and f"reusing the complete record {run_dir}" in " ".join(reused.output.split())
    second = runner.invoke(app, ["run", "--config", str(run_dir / "config.yaml"), "--force"])
    assert second.exit_code == 0, second.output
    records = {r["config"]["run_id"]: r["config"] for r in iter_records(tmp_path / "results")}
    (again,) = [config for run_id, config in records.items() if run_id != record["config"]["run_id"]]
    identity = ("run_id", "group")
    assert {k: v for k, v in again.items() if k not in identity} == {k: v for k, v in written.items()
                                                                     if k not in identity}
    assert load_config(run_dir / "config.yaml").fingerprint() == written["config_fingerprint"]


# ----------------------------------------------------------------------------------------------------
# Issue 16, item 5: train.optimizer and the defaults that follow it
# ----------------------------------------------------------------------------------------------------

#: Written by hand from the sources: insightface arcface_torch configs/base.py and train_v2.py (SGD);
#: configs/wf42m_pfc03_40epoch_8gpu_vit_b.py and torch.optim.AdamW's defaults, which train_v2.py keeps (AdamW).
SGD_VALUES = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "betas": None, "eps": None}
ADAMW_VALUES = {"lr": 1e-3, "momentum": None, "weight_decay": 0.1, "betas": [0.9, 0.999], "eps": 1e-8}


def _optimizer_values(cfg: RunConfig) -> dict:
    return {key: getattr(cfg.train, key) for key in SGD_VALUES}


def test_optimizer_keys_take_the_chosen_optimizers_defaults(tmp_path):
    """``train.lr`` and ``train.weight_decay`` mean "the optimizer's default" unless set, in any layer.
    Catches AdamW run with SGD's lr 0.1 and weight decay 5e-4 (the dataclass defaults of the default
    optimizer), a preset's explicit lr lost when the command line switches optimizers, and the other
    optimizer's keys left in the configuration (and the run record) after a switch."""
    assert load_config().train.optimizer == "sgd" and _optimizer_values(load_config()) == SGD_VALUES
    assert _optimizer_values(load_config(overrides={"train.optimizer": "adamw"})) == ADAMW_VALUES
    explicit = load_config(overrides={"train.optimizer": "adamw", "train.lr": "3e-4", "train.betas": "0.9,0.95"})
    assert _optimizer_values(explicit) == {**ADAMW_VALUES, "lr": 3e-4, "betas": [0.9, 0.95]}
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  optimizer: adamw\n  weight_decay: 0.05\n")
    assert _optimizer_values(load_config(preset)) == {**ADAMW_VALUES, "weight_decay": 0.05}
    # back to SGD on the command line: the preset's AdamW keys go, its explicit weight decay stays
    assert _optimizer_values(load_config(preset, {"train.optimizer": "sgd"})) == {**SGD_VALUES, "weight_decay": 0.05}


@pytest.mark.parametrize("overrides, message", [
    ({"train.optimizer": "adam"}, r"train\.optimizer must be one of sgd, adamw, got 'adam'"),
    ({"train.optimizer": "adamw", "train.momentum": "0.8"},
     r"train\.momentum does not apply to optimizer adamw \(its keys: lr, weight_decay, betas, eps\)"),
    ({"train.eps": "1e-6"}, r"train\.eps does not apply to optimizer sgd \(its keys: lr, momentum, weight_decay\)"),
    ({"train.optimizer": "adamw", "train.betas": "0.9"}, r"train\.betas must be two values in \[0, 1\)"),
    ({"train.optimizer": "adamw", "train.betas": "0.9,fast"}, r"'train\.betas' must be float, got 'fast'"),
    ({"train.optimizer": "adamw", "train.lr": "0"}, r"train\.lr must be > 0"),
])
def test_bad_optimizer_settings_are_one_line(overrides, message):
    """Catches an unknown optimizer reaching the trainer, and a key of the other optimizer silently ignored
    (``train.momentum=0.8`` with AdamW would not do what it says)."""
    with pytest.raises(ConfigError, match=message) as info:
        load_config(overrides=overrides)
    assert "\n" not in str(info.value)


def test_run_record_shows_the_optimizer_values_used(tmp_path):
    """The resolved configuration a run record saves holds the values the optimizer was built with, and
    loading it back gives the same configuration and fingerprint. Catches a record that says ``lr: null``,
    one whose SGD values would come back under AdamW, and a fingerprint blind to the optimizer."""
    import yaml

    from bench.config import dump_yaml

    cfg = load_config(overrides={"train.optimizer": "adamw", "methods": "arcface"})
    written = yaml.safe_load(dump_yaml(cfg.resolved()))
    assert {key: written["train"][key] for key in ADAMW_VALUES} == ADAMW_VALUES
    record = tmp_path / "config.yaml"
    record.write_text(dump_yaml(cfg.resolved()))
    assert load_config(record).train == cfg.train and load_config(record).fingerprint() == cfg.fingerprint()
    assert cfg.fingerprint() != load_config(overrides={"methods": "arcface"}).fingerprint()
    assert load_config(overrides={"train.optimizer": "sgd"}).fingerprint() == load_config().fingerprint()


def test_sgd_records_made_before_the_optimizer_key_keep_their_fingerprint():
    """The keys added by issue 16 are left out of the fingerprint at the value every earlier run had
    (optimizer sgd, no betas or eps), so run records written before them are still found by fingerprint
    (``bench run`` reuse, ``bench reproduce``, ``bench report``'s claims). The fixture is the config.yaml of
    a real claims run of 2026-12-06 (CosFace, seed 0), with the fingerprint the code of that day wrote.
    Catches a new key that re-hashes every record."""
    from pathlib import Path

    import yaml

    record = Path(__file__).resolve().parent / "fixtures" / "config_before_issue16_cosface.yaml"
    written = yaml.safe_load(record.read_text())
    assert "optimizer" not in written["train"]  # made before the key existed
    cfg = load_config(record).for_method(written["method"]).resolved()
    assert cfg.fingerprint() == written["config_fingerprint"]
