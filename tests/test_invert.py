"""``bench invert`` (ArcFace's feature inversion, :mod:`bench.invert`): the BN-statistics prior against a hand
computation, the identity term's closed form, the optimisation on a tiny ``small`` backbone, and the command
on a run directory laid out as the runner writes it."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from bench.backbones import build_backbone
from bench.checkpoint import Checkpointer, rng_state
from bench.cli import app
from bench.config import load_config
from bench.invert import (BatchNormStatistics, InversionSettings, bn_statistics_loss, embed, identity_loss,
                          identity_rank1, invert, learning_rate, random_view, total_variation, zoom_rotate)
from methods.distributed import DistContext

runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are tiny: one thread is faster, and on a loaded 2-core machine two threads wait on
    each other for seconds per step."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _one_bn_model(mean, var) -> nn.Module:
    bn = nn.BatchNorm2d(len(mean))
    bn.running_mean.copy_(torch.tensor(mean))
    bn.running_var.copy_(torch.tensor(var))
    return nn.Sequential(bn).eval()


def test_bn_statistics_loss_equals_a_hand_computation():
    model = _one_bn_model([0.5, -1.0], [2.0, 0.25])
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [1.0, -1.0]]],
                      [[[0.0, -2.0], [5.0, 1.0]], [[2.0, 2.0], [-2.0, 0.0]]]])  # [B=2, C=2, 2, 2]
    # Channel 0 values: 1 2 3 4 0 -2 5 1 -> mean 14/8 = 1.75, biased var = E[x^2] - mean^2 = 60/8 - 3.0625
    # Channel 1 values: 0 0 1 -1 2 2 -2 0 -> mean 2/8 = 0.25, biased var = 14/8 - 0.0625
    mean = [1.75, 0.25]
    var = [60 / 8 - 1.75 ** 2, 14 / 8 - 0.25 ** 2]
    expected = (math.hypot(mean[0] - 0.5, mean[1] + 1.0) + math.hypot(var[0] - 2.0, var[1] - 0.25))
    assert bn_statistics_loss(model, x).item() == pytest.approx(expected, rel=1e-6)
    # The running statistics are read, never updated.
    assert model[0].running_mean.tolist() == [0.5, -1.0]


def test_bn_statistics_loss_is_zero_for_a_batch_with_the_running_statistics():
    model = _one_bn_model([0.5, -1.0], [4.0, 0.25])
    # Per channel +-sd around the mean, in equal numbers: mean and biased variance exactly the running ones.
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0]).reshape(2, 1, 1, 2)
    x = torch.cat([0.5 + 2.0 * signs, -1.0 + 0.5 * signs], dim=1)
    assert bn_statistics_loss(model, x).item() == pytest.approx(0.0, abs=1e-7)
    # And it is differentiable in the images.
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    bn_statistics_loss(model, y).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_first_bn_multiplier_weighs_only_the_first_layer_reached():
    first = _one_bn_model([0.0], [1.0])[0]
    second = _one_bn_model([1.0], [4.0])[0]
    model = nn.Sequential(first, nn.Conv2d(1, 1, 1, bias=False), second).eval()
    nn.init.constant_(model[1].weight, 2.0)
    x = torch.tensor([[[[1.0, 3.0]]]])  # mean 2, var 1 -> first: |2 - 0| + |1 - 1| = 2
    # After the 1x1 conv (x2): values 2, 6 -> mean 4, var 4 -> second: |4 - 1| + |4 - 4| = 3
    with BatchNormStatistics(model) as stats:
        model(x)
    # (The first BN divides by sqrt(1 + eps), eps = 1e-5: the second layer's mean is 4 (1 - 5e-6).)
    assert stats.loss().item() == pytest.approx(5.0, abs=1e-4)
    assert stats.loss(10.0).item() == pytest.approx(10 * 2.0 + 3.0, abs=1e-4)


def test_learning_rate_is_deepinversions_warmup_then_cosine():
    settings = InversionSettings(steps=10, warmup=2, lr=1.0)
    # Warm-up: lr (step + 1) / warmup; then (1 + cos(pi (step - 2) / 8)) / 2.
    expected = [0.5, 1.0, 1.0, (1 + math.cos(math.pi / 8)) / 2, (1 + math.cos(math.pi / 4)) / 2]
    assert [learning_rate(step, settings) for step in range(5)] == pytest.approx(expected)
    assert learning_rate(6, settings) == pytest.approx(0.5)
    assert learning_rate(0, InversionSettings(steps=10, warmup=0, lr=0.3)) == pytest.approx(0.3)


def test_zoom_rotate_against_hand_built_images():
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(zoom_rotate(image, 1.0, 0.0), image, atol=1e-6)
    left = torch.zeros(1, 1, 8, 8)
    left[..., 0] = 1.0  # the left column, turned 90 degrees counter-clockwise, is the bottom row
    turned = zoom_rotate(left, 1.0, 90.0)
    assert torch.allclose(turned[0, 0, -1], torch.ones(8), atol=1e-5) and turned[0, 0, :-1].abs().max() < 1e-5
    square = torch.zeros(1, 1, 8, 8)
    square[..., 3:5, 3:5] = 1.0  # a centred 2x2 square, zoomed 2x, covers 4x the area (bilinear keeps mass)
    zoomed = zoom_rotate(square, 2.0, 0.0)
    assert zoomed.sum().item() == pytest.approx(16.0) and zoomed[0, 0, 3:5, 3:5].min().item() == 1.0


def test_random_view_draws_its_transforms_from_the_generator():
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    off = InversionSettings(jitter=0, flip=False, scale=0.0, rotate_deg=0.0)
    assert torch.equal(random_view(image, off, torch.Generator().manual_seed(0)), image)
    flips = InversionSettings(jitter=0, flip=True, scale=0.0, rotate_deg=0.0)
    generator = torch.Generator().manual_seed(1)
    views = [random_view(image, flips, generator) for _ in range(20)]
    flipped = sum(torch.equal(v, torch.flip(image, dims=(3,))) for v in views)
    assert 0 < flipped < 20 and all(torch.equal(v, image) or torch.equal(v, torch.flip(image, dims=(3,)))
                                    for v in views)
    rolls = InversionSettings(jitter=2, flip=False, scale=0.0, rotate_deg=0.0)
    view = random_view(image, rolls, torch.Generator().manual_seed(3))
    assert any(torch.equal(view, torch.roll(image, (dy, dx), (2, 3))) for dy in range(-2, 3) for dx in range(-2, 3))
    full = InversionSettings()
    assert torch.equal(random_view(image, full, torch.Generator().manual_seed(4)),
                       random_view(image, full, torch.Generator().manual_seed(4)))


def test_settings_out_of_range_are_refused():
    for bad in ({"scale": 1.0}, {"steps": -1}, {"lr": 0.0}, {"betas": (0.5, 1.0)}, {"rotate_deg": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            InversionSettings(**bad)


def test_identity_loss_closed_form():
    embeddings = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # cos = 3/5 and 0 -> mean(1 - cos) = (0.4 + 1) / 2
    assert identity_loss(embeddings, targets).item() == pytest.approx(0.7)
    assert identity_loss(targets, targets).item() == pytest.approx(0.0, abs=1e-7)


def test_total_variation_of_a_constant_image_is_zero():
    assert total_variation(torch.full((2, 3, 4, 4), 0.3)).item() == 0.0
    step = torch.zeros(1, 1, 2, 2)
    step[..., 1] = 1.0  # a vertical edge: horizontal diffs 2 x 1, both diagonals 1 each, vertical 0
    assert total_variation(step).item() == pytest.approx(math.sqrt(2) + 1 + 1)


def _tiny_small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_backbone("small", embedding_size=16, input_size=16).eval()


def test_invert_reduces_the_identity_loss_and_is_deterministic():
    model = _tiny_small()
    targets = torch.nn.functional.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    settings = InversionSettings(steps=20, warmup=2)
    start = invert(model, targets, 16, InversionSettings(steps=0), seed=0)
    generated = invert(model, targets, 16, settings, seed=0)
    assert generated.dtype == torch.uint8 and generated.shape == (3, 3, 16, 16)
    before = identity_loss(embed(model, start), targets).item()
    after = identity_loss(embed(model, generated), targets).item()
    assert after < before - 0.05, (before, after)
    assert torch.equal(generated, invert(model, targets, 16, settings, seed=0))
    assert not torch.equal(generated, invert(model, targets, 16, settings, seed=1))
    # The model is left as it was: eval mode, parameters trainable again.
    assert not model.training and all(p.requires_grad for n, p in model.named_parameters()
                                      if n != "features.weight")


def test_identity_rank1_against_a_gallery():
    model = _tiny_small()
    images = torch.randint(0, 256, (6, 3, 16, 16), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    labels = torch.tensor([7, 7, 8, 8, 9, 9])
    # Probes that are gallery images themselves, labelled by their own identity, score 1; and mislabelled, 0.
    probes = images[[0, 2, 4]]
    gallery = images[[0, 0, 2, 2, 4, 4]]  # each identity's mean embedding is its probe's
    assert identity_rank1(model, probes, gallery, labels, torch.tensor([7, 8, 9])) == 1.0
    assert identity_rank1(model, probes, images[[0, 2, 4]], torch.tensor([7, 8, 9]), torch.tensor([8, 9, 7])) == 0.0


def _fake_run(tmp_path, name: str = "arcface-synthface-full-s0-x", model_seed: int = 0):
    """A run directory as the runner writes it: config.yaml and a checkpoint saved by bench.checkpoint's
    Checkpointer (the method state holds the backbone under ``backbone.``), for a random ``small`` at 16 px."""
    run_dir = tmp_path / "results" / name
    cfg = load_config(None, {"train.embedding_size": 16, "data.synthface.image_size": 16})
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "method": "arcface", "run_id": run_dir.name},
                                                        sort_keys=False))
    model = _tiny_small(model_seed)
    method_state = {**{f"backbone.{k}": v for k, v in model.state_dict().items()}, "head.weight": torch.zeros(4, 16)}
    assert Checkpointer(run_dir / "checkpoints", DistContext()).save(
        5, {"method": method_state, "trainer": {"step": 5}, "rng": rng_state(), "curation": None})
    return run_dir


def test_cli_writes_the_grid_and_the_record(tmp_path):
    run_dir = _fake_run(tmp_path)
    out = tmp_path / "inv"
    result = runner.invoke(app, ["invert", "--run", str(run_dir), "--identities", "2", "--steps", "3",
                                 "--distractors", "3", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "rank-1" in result.stdout and len(result.stdout.strip().splitlines()) == 1
    record = json.loads((out / "inversion.json").read_text())
    assert 0.0 <= record["identity_rank1"] <= 1.0 and len(record["cosine_to_target"]) == 2
    assert record["steps"] == 3 and record["seed"] == 0 and record["model"]["step"] == 5
    assert record["identities"] == [700_000, 700_001]
    assert "verifier" not in record and record["settings"]["steps"] == 3 and record["settings"]["flip"] is True
    from PIL import Image

    with Image.open(out / "inversion.png") as grid:  # 2 pairs side by side, 16 px enlarged 7x to 112 px
        assert grid.size == (2 + 4 * (112 + 2), 2 + 112 + 2)
    # The checkpoint file itself works too (its run directory gives the configuration).
    checkpoint = next((run_dir / "checkpoints").glob("step*-rank0.pt"))
    result = runner.invoke(app, ["invert", "--checkpoint", str(checkpoint), "--identities", "1", "--steps", "1",
                                 "--distractors", "0", "--device", "cpu", "--out", str(tmp_path / "inv2")])
    assert result.exit_code == 0, result.output


def test_cli_verifier_scores_the_generated_images_with_a_second_model(tmp_path):
    run_dir = _fake_run(tmp_path)
    other = _fake_run(tmp_path, "arcface-synthface-full-s1-y", model_seed=1)
    args = ["invert", "--run", str(run_dir), "--identities", "3", "--steps", "4", "--distractors", "2",
            "--device", "cpu", "--no-flip", "--rotate", "0"]
    result = runner.invoke(app, [*args, "--verifier", str(run_dir), "--out", str(tmp_path / "same")])
    assert result.exit_code == 0, result.output
    same = json.loads((tmp_path / "same" / "inversion.json").read_text())
    # The model as its own verifier scores exactly as the generating model (the same images, the same gallery).
    assert same["verifier"]["identity_rank1"] == same["identity_rank1"]
    assert same["verifier"]["real_image_rank1"] == same["reference"]["real_image_rank1"]
    assert same["settings"]["flip"] is False and same["settings"]["rotate_deg"] == 0.0
    result = runner.invoke(app, [*args, "--verifier", str(other), "--out", str(tmp_path / "other")])
    assert result.exit_code == 0, result.output
    assert "verifier small: rank-1" in result.stdout
    record = json.loads((tmp_path / "other" / "inversion.json").read_text())
    assert record["verifier"]["model"]["checkpoint"].startswith(str(other))
    # The same generated images (same seed, same generating model) as in the first call.
    assert record["cosine_to_target"] == same["cosine_to_target"]


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_cli_errors_are_one_line(tmp_path):
    line = _one_line_error(runner.invoke(app, ["invert", "--run", str(tmp_path / "nope")]))
    assert "error:" in line and "run directory not found" in line
    line = _one_line_error(runner.invoke(app, ["invert", "--checkpoint", str(tmp_path / "missing.pt")]))
    assert "checkpoint not found" in line
    line = _one_line_error(runner.invoke(app, ["invert"]))
    assert "exactly one of --checkpoint" in line
    run_dir = _fake_run(tmp_path)
    line = _one_line_error(runner.invoke(app, ["invert", "--run", str(run_dir), "--embedding-size", "32",
                                               "--device", "cpu"]))
    assert "does not match backbone 'small'" in line
    line = _one_line_error(runner.invoke(app, ["invert", "--run", str(run_dir), "--scale", "1.5", "--device", "cpu"]))
    assert "--scale" in line and "out of range" in line
    line = _one_line_error(runner.invoke(app, ["invert", "--run", str(run_dir), "--verifier", str(tmp_path / "no"),
                                               "--device", "cpu"]))
    assert "run directory not found" in line


def test_cli_help_states_the_settings_defaults():
    """The flags' help texts name the defaults without importing torch at startup; they must be the
    dataclass's."""
    import re
    from dataclasses import fields

    import typer.main

    command = typer.main.get_command(app).commands["invert"]
    helps = {param.name: param.help or "" for param in command.params}
    names = {"steps": "steps", "lr": "lr", "bn_weight": "bn_weight", "first_bn_multiplier": "first_bn_multiplier",
             "tv_weight": "tv_weight", "jitter": "jitter", "scale": "scale", "rotate_deg": "rotate"}
    defaults = {f.name: f.default for f in fields(InversionSettings)}
    for field, param in names.items():
        stated = re.search(r"default ([0-9.e-]+)\)", helps[param])
        assert stated is not None, (param, helps[param])
        assert float(stated.group(1)) == pytest.approx(float(defaults[field])), (param, helps[param])
    assert "default on" in helps["flip"] and defaults["flip"] is True
