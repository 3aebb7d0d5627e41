"""Faults in what the user types (issues 12 and 13): bad flags, values, presets and devices of `bench`.

README, "Using it": errors in names or values print one line and exit 2, before anything is written where
possible, and existing records are never modified. Every test here starts from a results directory that
holds an earlier record and a data root that holds a cache file, gives one bad input, and checks:

- exit code 2, exactly one line on stderr (``error: ...``, no traceback, no usage box), nothing on stdout;
- the line names the input and the problem (the fragments of each case);
- nothing written before is lost or changed (:func:`snapshot` / :func:`assert_preserved`), and nothing new
  appeared in either directory, not even an empty results directory (:func:`tree`);
- for ``bench run``, the training set was never built (its builder is replaced by one that fails the test),
  so a check that happens only after the data is read or rendered is caught even where it writes nothing.

Breakage each group catches: the run faults, a check that moved after the results directory is created or
the data is built (issue 12: ``--device cuda:9`` left an empty results folder; issue 13: a batch size that
one method's views per class do not divide, or a missing real benchmark, was found after earlier methods
wrote records or after the training set was built); the parsing faults, typer's multi-line usage box coming
back for a value of the wrong type on any command; the preset faults, a preset error that loses the file name.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.main import get_command
from typer.testing import CliRunner, Result

from bench.cli import app
from bench.eval import PROTOCOLS
from methods.base import METHODS
from tests.faults.fault_helpers import (assert_one_error_line, assert_preserved, bench_argv, python_env,
                                       seed_earlier_record, snapshot, tree)

runner = CliRunner()



@dataclass
class Workspace:
    """A results directory with one earlier complete record and a data root with one cached file."""

    root: Path

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def seed(self) -> None:
        seed_earlier_record(self.results, {"synth-lfw": {"accuracy": 0.5}})
        (self.data / "synthface").mkdir(parents=True)
        (self.data / "synthface" / "cached.npy").write_bytes(b"pixels rendered by an earlier run")

    def state(self) -> tuple[dict[str, str], list[str] | None, dict[str, str], list[str] | None]:
        return snapshot(self.results), tree(self.results), snapshot(self.data), tree(self.data)

    def assert_untouched(self, before: tuple) -> None:
        results_files, results_tree, data_files, data_tree = before
        assert_preserved(results_files, self.results)
        assert_preserved(data_files, self.data)
        assert tree(self.results) == results_tree, "the fault created something in the results directory"
        assert tree(self.data) == data_tree, "the fault created something in the data root"


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workspace]:
    """The seeded directories; the working directory is the workspace (a default ``results/`` would show)."""
    space = Workspace(tmp_path)
    space.seed()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FACEBENCH_DATA_ROOT", raising=False)

    def must_not_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the training set was built before the bad input was rejected")

    monkeypatch.setattr("bench.runner.build_trainset", must_not_build)
    yield space


def _invoke(args: list[str]) -> Result:
    return runner.invoke(app, args, prog_name="bench")


def assert_rejected(result: Result, *fragments: str) -> str:
    """Exit 2, one ``error:`` line holding every fragment and nothing else on stderr, empty stdout."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    line = assert_one_error_line(result.stderr, *fragments)
    assert result.stderr.strip() == line, result.stderr  # no usage box or second line around it
    assert result.stdout == "", result.stdout
    return line


# ----------------------------------------------------------------------------------------------------
# bench run: names, values, devices, methods and protocols, all rejected before anything is written
# ----------------------------------------------------------------------------------------------------

RUN_FAULTS = {
    "unknown-method": (["--methods", "arcface,sphereface"],
                       ["error: unknown method 'sphereface'; valid: " + ", ".join(METHODS.names())]),
    "unknown-backbone": (["--backbone", "r9000"], ["error: unknown backbone 'r9000'; valid:"]),
    "unknown-split": (["--split", "deep"], ["error: unknown split 'deep'; valid: full, longtail, shallow"]),
    "unknown-protocol": (["--eval", "lfw2"], ["error: unknown protocol 'lfw2'; valid: " + ", ".join(PROTOCOLS.names())]),
    "unknown-dataset": (["--dataset", "ms1m"], ["error: unknown dataset 'ms1m'; valid: casia, custom, glint360k, "
                                                "ms1mv2, ms1mv3, synthface, webface12m, webface42m, webface4m"]),
    "budget-below-batch": (["--budget", "-5"], ["error: train.budget (-5) must be >= train.batch_size (32)"]),
    "budget-not-a-number": (["--budget", "abc"], ["error: bench run: Invalid value for '--budget'",
                                                  "(see 'bench run --help')"]),
    "batch-size-not-an-integer": (["--batch-size", "1.5"], ["error: bench run: Invalid value for '--batch-size'"]),
    "unknown-option": (["--seed-count", "3"], ["error: bench run: No such option: --seed-count"]),
    "option-without-value": (["--device"], ["error: Option '--device' requires an argument."]),
    "set-wrong-type": (["--set", "train.lr=fast"], ["error: command line: 'train.lr' must be float, got 'fast'"]),
    "set-not-key-value": (["--set", "nonsense"], ["error: --set expects KEY=VALUE"]),
    "set-out-of-range": (["--set", "data.synthface.label_noise=1.5"],
                         ["error: data.synthface.label_noise must be in [0, 1), got 1.5"]),
    "set-unknown-method-param": (["--set", "method_params.arcface.q=1"],
                                 ["error: method 'arcface': unknown parameter 'q'; valid: s, m"]),
    "set-method-param-wrong-type": (["--set", "method_params.arcface.m=big"],
                                    ["error: method 'arcface': parameter 'm' must be float, got 'big'"]),
    # Range checks of a method's own (from_config): DCQ's is found before ArcFace trains and writes a record.
    "second-method-param-out-of-range": (["--methods", "arcface,dcq", "--set", "method_params.dcq.s=-1"],
                                         ["error: method 'dcq': s must be > 0, got -1.0"]),
    # Issue 13: DCQ serves 2 views per class, so 127 images do not split into whole identities.
    "batch-not-divisible-by-views": (["--methods", "arcface,dcq", "--batch-size", "127"],
                                     ["error: method 'dcq': train.batch_size (127) must be a multiple of world "
                                      "size x views per class (1 x 2)"]),
    # Issue 12: malformed devices used to pass validation and fail with a traceback.
    "device-malformed-index": (["--device", "cuda:x"],
                               ["error: train.device must be auto, cpu, cuda or cuda:N (N a device index), "
                                "got 'cuda:x'"]),
    "device-empty-index": (["--device", "cuda:"], ["got 'cuda:'"]),
    "device-unknown-kind": (["--device", "gpu"], ["error: train.device must be auto, cpu, cuda or cuda:N"]),
    # Issue 12: absent here either way (no CUDA: "not available"; fewer than 10 GPUs: "does not exist").
    "device-absent": (["--device", "cuda:9"], ["error: train.device", "'cuda:9'"]),
    # Issue 13: a real benchmark's files are missing (a .bin pack, and a folder), found before any data.
    "real-benchmark-file-missing": (["--eval", "synth-lfw,lfw"],
                                    ["error: lfw: ", "data/eval/lfw.bin (from the data root) is not a file; "
                                     "set FACEBENCH_LFW=FILE"]),
    "real-benchmark-folder-missing": (["--eval", "ijbc"], ["error: ijbc: ", "is not a folder; set FACEBENCH_IJBC=DIR"]),
}


@pytest.mark.parametrize("fresh_out", [False, True], ids=["existing-results", "new-results"])
@pytest.mark.parametrize("extra, fragments", RUN_FAULTS.values(), ids=RUN_FAULTS.keys())
def test_faults_bad_run_input_is_one_line_and_writes_nothing(workspace, tiny_args, monkeypatch, extra, fragments,
                                                             fresh_out):
    """Each bad `bench run` input: one line, exit 2, the earlier record and the data cache intact, nothing new;
    with ``--out`` naming a directory that does not exist yet, it is still absent afterwards (issue 12)."""
    monkeypatch.delenv("FACEBENCH_LFW", raising=False)
    monkeypatch.delenv("FACEBENCH_IJBC", raising=False)
    fresh = workspace.root / "fresh-results"
    before = workspace.state()
    assert_rejected(_invoke(["run", *tiny_args, *(["--out", str(fresh)] if fresh_out else []), *extra]), *fragments)
    workspace.assert_untouched(before)
    assert not fresh.exists(), "an empty results directory was left behind"


def test_faults_cuda_index_out_of_range(workspace, tiny_args, monkeypatch):
    """Issue 12 on a machine with CUDA: ``cuda:9`` with one GPU names the index and the devices present
    (CUDA faked, so the test runs anywhere); the results directory is not created."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = workspace.root / "fresh-results"
    before = workspace.state()
    assert_rejected(_invoke(["run", *tiny_args, "--device", "cuda:9", "--out", str(out)]),
                    "error: train.device 'cuda:9': CUDA device 9 does not exist; this machine has 1 (cuda:0 .. cuda:0)")
    workspace.assert_untouched(before)
    assert not out.exists(), "an empty results directory was left behind"


@pytest.mark.parametrize("args", [["profile", "--classes", "10k", "--device", "cuda:x"],
                                  ["eval", "--protocol", "synth-lfw", "--features", "f.npy", "--device", "cuda:x"]],
                         ids=["profile", "eval"])
def test_faults_malformed_device_of_other_commands(workspace, args):
    """Issue 12 beyond `bench run`: a malformed ``--device`` of `bench profile` and `bench eval` is one line
    (before: a traceback from torch.device), and the profile record or synthetic benchmark is not written."""
    cwd_before = tree(workspace.root)
    before = workspace.state()
    assert_rejected(_invoke(args), "train.device must be auto, cpu, cuda or cuda:N (N a device index), got 'cuda:x'")
    workspace.assert_untouched(before)
    assert tree(workspace.root) == cwd_before


PRESET_FAULTS = {
    "not-yaml": ("train: [\n", ["not valid YAML"]),
    "unknown-key": ("train:\n  budgett: 10\n", ["unknown key 'train.budgett'; valid: train.backbone"]),
    "wrong-type": ("train:\n  budget: lots\n", ["'train.budget' must be int, got 'lots'"]),
    "not-a-mapping": ("- a\n- b\n", ["expected a mapping at the top level, got list"]),
    "section-not-a-mapping": ("train: 3\n", ["'train' must be a mapping"]),
}


@pytest.mark.parametrize("text, fragments", PRESET_FAULTS.values(), ids=PRESET_FAULTS.keys())
def test_faults_bad_preset_names_the_file(workspace, tiny_args, text, fragments):
    """A bad YAML preset: one line naming the preset file (where the value came from) and the key."""
    preset = workspace.root / "preset.yaml"
    preset.write_text(text)
    before = workspace.state()
    assert_rejected(_invoke(["run", *tiny_args, "--config", str(preset)]), f"error: {preset}: ", *fragments)
    workspace.assert_untouched(before)


def test_faults_missing_preset_file(workspace, tiny_args):
    """``--config`` naming no file: one line naming it."""
    before = workspace.state()
    assert_rejected(_invoke(["run", *tiny_args, "--config", "nope.yaml"]), "error: nope.yaml: config file not found")
    workspace.assert_untouched(before)


def test_faults_unwritable_results_dir(workspace, tiny_args):
    """``--out`` below a file: one line saying the results directory is not writable; the file is intact."""
    blocker = workspace.root / "blocker"
    blocker.write_text("a file, not a directory")
    before = workspace.state()
    assert_rejected(_invoke(["run", *tiny_args, "--out", str(blocker / "results")]),
                    f"error: results directory {blocker / 'results'} is not writable")
    assert blocker.read_text() == "a file, not a directory"
    workspace.assert_untouched(before)


# ----------------------------------------------------------------------------------------------------
# Every command: parsing errors are one line too (issue 12, item 2)
# ----------------------------------------------------------------------------------------------------

def _leaf_commands(command: object, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The command paths of every ``bench`` sub-command (a new command is covered without editing this)."""
    children = getattr(command, "commands", None)
    if children is None:
        yield path
        return
    for name, child in children.items():
        yield from _leaf_commands(child, (*path, name))


LEAF_COMMANDS = list(_leaf_commands(get_command(app)))


def test_the_command_walk_sees_every_command():
    """The walk behind the next test finds the commands the README documents (a broken walk finding none
    would make that test vacuous)."""
    assert {" ".join(path) for path in LEAF_COMMANDS} >= {
        "run", "list", "eval", "report", "profile", "check", "data pack", "data inspect", "data verify",
        "baseline save"}


@pytest.mark.parametrize("path", LEAF_COMMANDS, ids=[" ".join(p) for p in LEAF_COMMANDS])
def test_faults_unknown_option_of_every_command(workspace, path):
    """An unknown option of any command: one line naming the command, exit 2, nothing written."""
    before = workspace.state()
    cwd_before = tree(workspace.root)
    assert_rejected(_invoke([*path, "--no-such-flag"]),
                    f"error: bench {' '.join(path)}: No such option: --no-such-flag",
                    f"(see 'bench {' '.join(path)} --help')")
    workspace.assert_untouched(before)
    assert tree(workspace.root) == cwd_before


#: A value of the wrong type or out of range for a flag of each command that takes a value.
VALUE_FAULTS = {
    "run": (["run", "--seeds", "two"], "Invalid value for '--seeds'"),
    "eval": (["eval", "--protocol", "lfw", "--batch-size", "x"], "Invalid value for '--batch-size'"),
    "profile": (["profile", "--steps", "q"], "Invalid value for '--steps'"),
    "check": (["check", "--baseline", "b.json", "--max-accuracy-drop", "x"], "Invalid value for '--max-accuracy-drop'"),
    "baseline save": (["baseline", "save", "--max-memory-growth", "lots"], "Invalid value for '--max-memory-growth'"),
    "data pack": (["data", "pack", "in", "out", "--quality", "500"], "Invalid value for '--quality'"),
    "data verify": (["data", "verify", "casia", "--shards", "0"], "Invalid value for '--shards'"),
    "data inspect": (["data", "inspect"], "error: bench data inspect: Missing argument 'path'"),
    "list": (["list", "methods", "backbones"], "Got unexpected extra argument"),
    "report": (["report", "--figures=maybe"], "Option '--figures' does not take a value"),
    "reproduce": (["reproduce", "--seeds", "two"], "Invalid value for '--seeds'"),
}


@pytest.mark.parametrize("args, fragment", VALUE_FAULTS.values(), ids=VALUE_FAULTS.keys())
def test_faults_bad_flag_value_of_every_command(workspace, args, fragment):
    """A bad value for a flag of each command: typer's usage box is replaced by one line, exit 2."""
    before = workspace.state()
    cwd_before = tree(workspace.root)
    assert_rejected(_invoke(args), fragment)
    workspace.assert_untouched(before)
    assert tree(workspace.root) == cwd_before


#: Bad `bench reproduce` input (issue 15): one line, found before any run is planned or written.
REPRODUCE_FAULTS = {
    "unknown-claim": (["--claims", "sst-shallow,no-such-claim"], "error: unknown claim id(s) no-such-claim; valid: "),
    "zero-seeds": (["--seeds", "0"], "error: --seeds must be >= 1, got 0"),
    "set-wrong-type": (["--claims", "sst-shallow", "--set", "train.lr=fast"],
                       "'train.lr' must be float, got 'fast'"),
    "set-unknown-key": (["--claims", "sst-shallow", "--set", "train.speed=3"], "unknown key 'train.speed'"),
}


@pytest.mark.parametrize("extra, fragment", REPRODUCE_FAULTS.values(), ids=REPRODUCE_FAULTS.keys())
def test_faults_bad_reproduce_input_is_one_line_and_writes_nothing(workspace, extra, fragment):
    """Catches: a bad claim id, seed count or override reaching the runner (a traceback, or a results or
    reports directory left behind)."""
    out, reports = workspace.root / "claims-out", workspace.root / "claims-reports"
    before = workspace.state()
    assert_rejected(_invoke(["reproduce", "--out", str(out), "--reports", str(reports), "--no-progress", *extra]),
                    fragment)
    workspace.assert_untouched(before)
    assert not out.exists() and not reports.exists()


def test_help_stays_intact():
    """The one-line handler leaves help alone: ``--help`` exits 0 with the usage and options on stdout, and a
    bare ``bench`` prints its help, not an error line (a handler catching them would break both)."""
    result = _invoke(["run", "--help"])
    assert result.exit_code == 0 and "Usage: bench run [OPTIONS]" in result.stdout and "--budget" in result.stdout
    assert "error:" not in result.output
    bare = _invoke([])
    assert "Usage: bench [OPTIONS] COMMAND" in bare.stdout and "error:" not in bare.output


def test_faults_console_script_gives_one_line_for_a_bad_value(workspace):
    """The real entry point (``python -m bench``, as installed): ``--budget abc`` prints exactly one stderr line
    and exits 2 (before: a multi-line usage box); nothing is created in the working directory."""
    before = workspace.state()
    cwd_before = tree(workspace.root)
    proc = subprocess.run(bench_argv("run", "--budget", "abc", "--no-progress"), capture_output=True, text=True,
                          timeout=120, cwd=workspace.root, env=python_env())
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("error: bench run: Invalid value for '--budget': Input should be a valid integer, "
                                   "unable to parse string as an integer (see 'bench run --help')"), proc.stderr
    assert proc.stdout == ""
    workspace.assert_untouched(before)
    assert tree(workspace.root) == cwd_before
