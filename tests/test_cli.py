"""The command line: a tiny end-to-end run, the report, each `bench run` flag's effect, and the up-front
method checks. Bad input (one line, exit 2, nothing written) is in tests/faults/test_faults_cli.py."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.main import get_command
from typer.testing import CliRunner

from bench.checkpoint import load_weights_only, read_manifest
from bench.cli import app
from bench.config import load_config
from bench.records import iter_records
from bench.runner import check_methods
from methods.base import METHODS, MethodContext, build_method
from methods.distributed import DistContext
from methods.registry import ConfigError

runner = CliRunner()


def _invoke(args):
    return runner.invoke(app, args, catch_exceptions=False)


def _evaluate_checkpoint(run_dir: Path, data_root: Path, tmp_path: Path) -> dict[str, Any]:
    """synth-lfw metrics of the backbone in ``run_dir``'s final checkpoint, through ``bench eval`` (a second
    path: weights read back from disk, the encoder rebuilt, evaluated by another command)."""
    manifest = read_manifest(run_dir / "checkpoints")
    (file_name,) = manifest["files"]
    state = load_weights_only(run_dir / "checkpoints" / file_name)["method"]
    weights = tmp_path / f"{run_dir.name}-backbone.pth"
    torch.save({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}, weights)
    result = _invoke(["eval", "--protocol", "synth-lfw", "--checkpoint", str(weights), "--backbone", "small",
                      "--embedding-size", "32", "--input-size", "32", "--device", "cpu", "--data-root",
                      str(data_root), "--no-progress"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["synth-lfw"]


def test_run_writes_complete_records_and_prints_the_table(tmp_path, tiny_args):
    """Records, table and report of a two-method run. Each record's synth-lfw fold accuracies and accuracy
    equal those of its final checkpoint evaluated by `bench eval`: catches recorded metrics that are not
    those of the model the run trained and saved (another encoder, the weights before the last steps, a
    wrong aggregate), which the former range check 0 <= accuracy <= 1 accepted."""
    result = _invoke(["run", "--methods", "arcface,cosface", "--split", "shallow", *tiny_args])
    assert result.exit_code == 0, result.output
    records = iter_records(tmp_path / "results")
    assert [r["config"]["method"] for r in records] == ["arcface", "cosface"]
    for record in records:
        assert set(record) >= {"config", "env", "data", "train", "perf", "metrics"}
        assert record["config"]["method_params"][record["config"]["method"]]["s"] == 64.0
        assert record["data"]["split"]["recipe"]["name"] == "shallow"
        assert record["data"]["split"]["images_per_identity"]["histogram"] == {"2": 24}
        reference = _evaluate_checkpoint(tmp_path / "results" / record["config"]["run_id"], tmp_path / "data",
                                         tmp_path)
        assert record["metrics"]["synth-lfw"]["fold_accuracies"] == reference["fold_accuracies"]
        assert record["metrics"]["synth-lfw"]["accuracy"] == reference["accuracy"]
        assert record["perf"]["samples_seen"] == 128 and record["perf"]["steps"] == 4
        assert record["train"][-1]["step"] == 4
    table = result.stdout
    assert "| synthface | shallow | small      | 128      | arcface" in table
    assert "cosface" in table and "synth-lfw acc (%)" in table

    report_dir = tmp_path / "reports"
    result = _invoke(["report", "--results", str(tmp_path / "results"), "--out", str(report_dir)])
    assert result.exit_code == 0
    md = (report_dir / "results.md").read_text()
    tex = (report_dir / "results.tex").read_text()
    assert "arcface" in md and "cosface" in md
    assert "\\toprule" in tex and "\\bottomrule" in tex


def test_same_seed_gives_identical_numbers(tmp_path, tiny_args):
    for extra in ([], ["--force"]):  # --force: train again rather than reuse the first record
        assert _invoke(["run", "--methods", "cosface", *tiny_args, *extra]).exit_code == 0
    first, second = iter_records(tmp_path / "results")
    assert [e["loss"] for e in first["train"]] == [e["loss"] for e in second["train"]]
    assert first["metrics"]["synth-lfw"]["fold_accuracies"] == second["metrics"]["synth-lfw"]["fold_accuracies"]


def _files_state(results: Path) -> dict[str, int]:
    return {str(p.relative_to(results)): p.stat().st_mtime_ns for p in sorted(results.rglob("*")) if p.is_file()}


def test_a_complete_run_is_reused_and_force_retrains(tmp_path, tiny_args):
    """Issue 15, item 3. Catches: a second `bench run` of the same configuration and seed that trains again
    (a new record, or the old one rewritten), one that reuses a record of another seed or configuration, and
    a `--force` that does not retrain."""
    results = tmp_path / "results"
    assert _invoke(["run", "--methods", "cosface", *tiny_args]).exit_code == 0
    (first,) = iter_records(results)
    before = _files_state(results)
    again = _invoke(["run", "--methods", "cosface", *tiny_args])
    assert again.exit_code == 0, again.output
    assert _files_state(results) == before  # nothing written: no new record, no file of the old one touched
    assert f"reusing the complete record {results / first['run_id']}" in " ".join(again.output.split())
    shown = [line for line in again.stdout.splitlines() if line.startswith("| synthface")]
    assert len(shown) == 1 and "| cosface " in shown[0]  # the table shows the reused run
    assert f"{100 * first['metrics']['synth-lfw']['accuracy']:.2f}" in shown[0]
    # One more seed trains only that seed; another configuration trains anew.
    assert _invoke(["run", "--methods", "cosface", "--seeds", "2", *tiny_args]).exit_code == 0
    assert sorted(r["config"]["train"]["seed"] for r in iter_records(results)) == [0, 1]
    assert _invoke(["run", "--methods", "cosface", "--set", "train.lr=0.05", *tiny_args]).exit_code == 0
    assert len(iter_records(results)) == 3
    forced = _invoke(["run", "--methods", "cosface", "--force", *tiny_args])
    assert forced.exit_code == 0 and "reusing" not in forced.output
    assert len(iter_records(results)) == 4


def test_method_params_reach_the_record(tmp_path, tiny_args):
    result = _invoke(["run", "--methods", "arcface", "--set", "method_params.arcface.m=0.3", *tiny_args])
    assert result.exit_code == 0
    (record,) = iter_records(tmp_path / "results")
    assert record["config"]["method_params"]["arcface"]["m"] == 0.3


def test_list_shows_every_registry():
    result = _invoke(["list"])
    assert result.exit_code == 0
    for expected in ("methods:", "  arcface  s=64.0, m=0.5", "  cosface  s=64.0, m=0.4", "backbones:", "  r50",
                     "  small", "  mbf", "splits:", "  longtail", "protocols:", "  synth-lfw", "datasets:"):
        assert expected in result.stdout
    assert runner.invoke(app, ["list", "widgets"]).exit_code == 2


def test_report_on_missing_results_dir(tmp_path):
    result = runner.invoke(app, ["report", "--results", str(tmp_path / "none")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_errors_name_their_rank_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = runner.invoke(app, ["run", "--methods", "nope", "--no-progress"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: rank 1 of 2: unknown method 'nope'; valid: " + ", ".join(METHODS.names())


@pytest.fixture
def captured_runs(monkeypatch) -> list[dict[str, Any]]:
    """`bench run` with the runner replaced by a recorder of what the command line resolved (config and the
    runner's arguments), so each flag's effect is read from the config itself, not from help text."""
    calls: list[dict[str, Any]] = []

    def record_run(cfg, console=None, progress=True, seeds=1, force=False):
        calls.append({"cfg": cfg, "progress": progress, "seeds": seeds, "force": force})
        return []

    def record_resume(run_dir, console=None, progress=True):
        calls.append({"resume": Path(run_dir), "progress": progress})
        return None

    monkeypatch.setattr("bench.runner.run", record_run)
    monkeypatch.setattr("bench.runner.resume", record_resume)
    return calls


def _resolved(captured: list[dict[str, Any]], args: list[str]) -> dict[str, Any]:
    result = _invoke(["run", *args])
    assert result.exit_code == 0, result.output
    assert len(captured) == 1
    return captured.pop()


def _at(cfg: Any, dotted: str) -> Any:
    return functools.reduce(getattr, dotted.split("."), cfg)


#: Each configuration flag of `bench run`, a value unlike its default, and the config key it must set with the
#: value it must have there (written out by hand: the reference is this table, not bench.cli's own mapping).
FLAG_EFFECTS = [
    (["--methods", "pfc,dcq"], "methods", ["pfc", "dcq"]),
    (["-m", "sst"], "methods", ["sst"]),
    (["--split", "longtail"], "data.split.name", "longtail"),
    (["--dataset", "casia"], "data.dataset", "casia"),
    (["--backbone", "r18"], "train.backbone", "r18"),
    (["--ids", "50"], "data.split.max_identities", 50),
    (["--budget", "4096"], "train.budget", 4096),
    (["--batch-size", "64"], "train.batch_size", 64),
    (["--seed", "7"], "train.seed", 7),
    (["--device", "cuda:1"], "train.device", "cuda:1"),
    (["--eval", "lfw,ijbc"], "eval.protocols", ["lfw", "ijbc"]),
    (["--out", "elsewhere"], "out", "elsewhere"),
    (["--data-root", "cache/here"], "data.root", "cache/here"),
    (["--ckpt-every", "50"], "train.ckpt_every", 50),
    (["--set", "train.lr=0.05"], "train.lr", 0.05),
    # method parameters are read as their defaults' types when the configuration is loaded
    (["--set", "method_params.arcface.m=0.45"], "method_params", {"arcface": {"m": 0.45}}),
]


@pytest.mark.parametrize("args, key, expected", FLAG_EFFECTS, ids=[" ".join(a) for a, _, _ in FLAG_EFFECTS])
def test_each_run_flag_sets_its_config_key(captured_runs, args, key, expected):
    """The flag lands on its key with its value, and nowhere else: every other key keeps its default.
    Catches a flag mapped to the wrong key, a value lost or mistyped on the way, and one flag also changing
    another key (the old help-text check passed ``--seed`` because ``--seeds`` contains it)."""
    cfg = _resolved(captured_runs, args)["cfg"]
    assert _at(cfg, key) == expected
    changed = {k for k, v in _flatten(cfg.to_dict()).items() if _flatten(load_config().to_dict())[k] != v}
    assert changed == {k for k in _flatten(cfg.to_dict()) if k == key or k.startswith(key + ".")}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v and k != "method_params":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_seed_and_seeds_are_different_flags(captured_runs):
    """``--seeds N`` repeats the run with N seeds from ``--seed``; neither sets the other (default: 1 seed)."""
    only_seeds = _resolved(captured_runs, ["--seeds", "3"])
    assert only_seeds["seeds"] == 3 and only_seeds["cfg"].train.seed == 0
    only_seed = _resolved(captured_runs, ["--seed", "5"])
    assert only_seed["seeds"] == 1 and only_seed["cfg"].train.seed == 5
    both = _resolved(captured_runs, ["--seed", "5", "--seeds", "2"])
    assert both["seeds"] == 2 and both["cfg"].train.seed == 5


def test_progress_flag_reaches_the_runner(captured_runs):
    """``--no-progress`` turns the bars off (default on)."""
    assert _resolved(captured_runs, [])["progress"] is True
    assert _resolved(captured_runs, ["--no-progress"])["progress"] is False


def test_force_flag_reaches_the_runner(captured_runs):
    """``--force`` retrains instead of reusing complete records (default: reuse)."""
    assert _resolved(captured_runs, [])["force"] is False
    assert _resolved(captured_runs, ["--force"])["force"] is True


def test_config_preset_then_flags_override_it(captured_runs, tmp_path):
    """``--config`` (and ``-c``) loads the preset; a flag overrides the preset's value, which a ``--set``
    overrides in turn; a key only the preset sets keeps the preset's value."""
    preset = tmp_path / "preset.yaml"
    preset.write_text("train:\n  budget: 2048\n  lr: 0.02\n  seed: 3\n")
    for flag in ("--config", "-c"):
        cfg = _resolved(captured_runs, [flag, str(preset), "--budget", "4096", "--seed", "4",
                                        "--set", "train.seed=6"])["cfg"]
        assert (cfg.train.budget, cfg.train.lr, cfg.train.seed) == (4096, 0.02, 6)


def test_resume_flag_continues_the_named_run(captured_runs, tmp_path):
    """``--resume RUN_ID`` resumes ``OUT/RUN_ID`` (``--out``, default ``results``); a directory path is used
    as given; nothing is run afresh."""
    assert _resolved(captured_runs, ["--resume", "20260101-run", "--out", str(tmp_path)])["resume"] == \
        tmp_path / "20260101-run"
    assert _resolved(captured_runs, ["--resume", "20260101-run"])["resume"] == Path("results") / "20260101-run"
    assert _resolved(captured_runs, ["--resume", str(tmp_path), "--no-progress"]) == \
        {"resume": tmp_path, "progress": False}


def test_every_run_flag_has_an_effect_test():
    """Every option `bench run` accepts (read from the parsed command, exact names) is exercised above, so
    a new flag cannot go untested."""
    options = {opt for param in get_command(app).commands["run"].params
               for opt in (*param.opts, *param.secondary_opts)} - {"--help"}
    tested = {args[0] for args, _, _ in FLAG_EFFECTS} | {
        "--seeds", "--progress", "--no-progress", "--config", "-c", "--resume", "--force"}
    assert options == tested


# ----------------------------------------------------------------------------------------------------
# Up-front checks of every method (issue 13)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS.names())
def test_method_check_agrees_with_the_real_build(name):
    """check_methods builds each method on a stand-in before any data exists; it must accept exactly the
    batch sizes the method built on real sizes accepts (views per class from the real build, one rank and
    two). Catches a stand-in whose batch spec differs from the real one, in either direction."""
    views = build_method(name, torch.nn.Identity(), MethodContext(24, 32, 8)).batch_spec.views_per_class
    for world_size in (1, 2):
        dist = DistContext(world_size=world_size)
        good = load_config(overrides={"methods": name, "train.batch_size": str(4 * views * world_size)})
        check_methods(good, dist)
        if views * world_size > 1:
            bad = load_config(overrides={"methods": name, "train.batch_size": str(4 * views * world_size + 1)})
            with pytest.raises(ConfigError, match=f"method '{name}': train.batch_size"):
                check_methods(bad, dist)


def test_method_check_keeps_the_global_random_state():
    """Building the stand-ins draws seeds from torch's generator; the check must leave it as it found it,
    or every run's initialisation would depend on how many methods were checked."""
    before = torch.random.get_rng_state()
    check_methods(load_config(overrides={"methods": ",".join(METHODS.names())}), DistContext())
    assert torch.equal(torch.random.get_rng_state(), before)
