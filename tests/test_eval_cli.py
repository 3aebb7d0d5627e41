"""``bench eval`` (checkpoint or precomputed features, one-line errors) and the new headline columns of
``bench run``'s table, on the tiny synthetic benchmarks."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bench.backbones import build_backbone
from bench.cli import app
from bench.records import iter_records

runner = CliRunner()


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
    """One data root for the module: the tiny synthetic benchmarks are generated once and reused."""
    return tmp_path_factory.mktemp("shared-data")


def _eval_args(root, *extra):
    return ["eval", "--backbone", "small", "--embedding-size", "32", "--input-size", "32", "--device", "cpu",
            "--no-progress", "--data-root", str(root), *extra]


def _features_by_hand(model: torch.nn.Module, pack: Path) -> tuple[np.ndarray, np.ndarray]:
    """Flip-test features of a ``.bin``'s images and its pair flags, computed apart from bench.eval: the
    pack read by the standard library's unpickler and Pillow, ``(x / 255 - 0.5) / 0.5``, ``f(x) + f(flip x)``."""
    import io

    from data_formats import ref_read_bin
    from PIL import Image

    entries, issame = ref_read_bin(pack.read_bytes())
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(entry)).convert("RGB")) for entry in entries])
    batch = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    model.eval()
    with torch.no_grad():
        return (model(batch) + model(batch.flip(-1))).numpy(), np.asarray(issame)


def test_eval_checkpoint_on_synthetic_protocols(tmp_path, shared_root, tiny_eval):
    """``bench eval --checkpoint`` gives the numbers of the checkpoint's own features computed by hand.

    Catches: the checkpoint not loaded (fresh weights), images decoded, normalised or flipped differently
    from insightface's recipe, features in another order than the pack's pairs; a 0..1 range check did not.
    """
    from bench.eval.verification import verification_metrics

    checkpoint = tmp_path / "backbone.pth"
    torch.manual_seed(5)
    model = build_backbone("small", embedding_size=32, input_size=32)
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "metrics.json"
    result = runner.invoke(app, _eval_args(shared_root, "--protocol", "synth-lfw,synth-ijbc", "--checkpoint",
                                           str(checkpoint), "--out", str(out)))
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert set(metrics) == {"synth-lfw", "synth-ijbc"}
    expected = verification_metrics(*_features_by_hand(model, Path(metrics["synth-lfw"]["file"])))
    assert metrics["synth-lfw"]["fold_accuracies"] == expected["fold_accuracies"]
    assert metrics["synth-lfw"]["accuracy"] == expected["accuracy"] and 0.5 < expected["accuracy"] < 1.0
    assert metrics["synth-ijbc"]["1:1"]["num_genuine"] == 8
    assert metrics["synth-lfw"]["model"]["backbone"] == "small"
    assert json.loads(out.read_text()) == metrics


def test_eval_precomputed_features(tmp_path, shared_root, tiny_eval):
    features = tmp_path / "features.npy"
    np.save(features, np.random.default_rng(0).normal(size=(160, 8)))
    result = runner.invoke(app, _eval_args(shared_root, "--protocol", "synth-lfw", "--features", str(features),
                                           "--set", "eval.tar_read_off=at_most"))
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["synth-lfw"]
    assert metrics["conventions"]["tar_read_off"].startswith("largest TPR with FPR <= target")
    assert metrics["conventions"]["embedding"].startswith("normalise(features supplied by the user")


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_eval_errors_are_one_line(tmp_path, shared_root, tiny_eval):
    line = _one_line_error(runner.invoke(app, _eval_args(shared_root, "-p", "synth-lfw")))
    assert "exactly one of --checkpoint" in line
    features = tmp_path / "f.npy"
    np.save(features, np.zeros((4, 2)))
    line = _one_line_error(runner.invoke(app, _eval_args(shared_root, "-p", "synth-lfw,synth-ijbc", "--features",
                                                         str(features))))
    assert "--features holds the features of one protocol" in line
    line = _one_line_error(runner.invoke(app, _eval_args(shared_root, "-p", "synth-lfw", "--features", str(features))))
    assert "expected features [160, D]" in line
    assert "unknown protocol 'ijbd'" in _one_line_error(
        runner.invoke(app, _eval_args(shared_root, "-p", "ijbd", "--features", str(features))))
    assert "only eval.* and data.* keys" in _one_line_error(
        runner.invoke(app, _eval_args(shared_root, "-p", "synth-lfw", "--features", str(features),
                                      "--set", "train.lr=1")))


def test_eval_refuses_code_in_a_checkpoint_and_mismatched_weights(tmp_path, shared_root, tiny_eval):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"conv1.weight": Exploit()}, protocol=2))
    line = _one_line_error(runner.invoke(app, _eval_args(shared_root, "-p", "synth-lfw", "--checkpoint", str(evil))))
    assert "not a weights-only torch checkpoint" in line and not marker.exists()
    other = tmp_path / "r18.pth"
    torch.save(build_backbone("small", embedding_size=16, input_size=32).state_dict(), other)
    line = _one_line_error(runner.invoke(app, _eval_args(shared_root, "-p", "synth-lfw", "--checkpoint", str(other))))
    assert "does not match backbone 'small'" in line


def test_run_table_shows_the_new_headline_metrics(tmp_path, shared_root, tiny_args):
    result = runner.invoke(app, ["run", "--methods", "arcface", *tiny_args, "--data-root", str(shared_root)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[0]
    for column in ("synth-lfw acc (%)", "synth-ijbc TAR (%) @FAR=1e-4", "synth-ijbc TAR (%) @FAR=1e-5",
                   "synth-ijbc rank-1 (%)", "synth-megaface rank-1 (%) refined"):
        assert column in header
    (record,) = iter_records(tmp_path / "results")
    metrics = record["metrics"]
    assert set(metrics) == {"synth-lfw", "synth-ijbc", "synth-megaface"}
    assert all("conventions" in m for m in metrics.values())
    assert metrics["synth-ijbc"]["conventions"]["mode"].startswith("N1D1F2")
    assert set(metrics["synth-megaface"]) >= {"raw", "refined"}
