"""SynthFace's default difficulty is calibrated (issue: the spine), and this test is the calibration.

At the default budget, with the default backbone and recipe (seed 0):
- ArcFace on the ``full`` split reaches 0.85-0.97 synth-lfw accuracy (room above for better methods);
- the ``shallow`` split (2 images per identity) scores at least 3 points lower, and the ``longtail``
  split lies between the two (it has more images than ``shallow``, fewer than ``full``);
- an untrained backbone scores at most 0.75.
Measured values are in the README ("Calibration").
"""

from __future__ import annotations

import pytest
import torch

from bench.backbones import build_backbone
from bench.config import load_config
from bench.eval.verification import SynthLFW
from bench.runner import run
from bench.train import seed_everything


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("calibration-data")


def _accuracy(split: str, data_root, out) -> float:
    cfg = load_config(overrides={"methods": "arcface", "data.split.name": split, "data.root": str(data_root),
                                 "out": str(out), "train.device": "cpu", "eval.protocols": "synth-lfw"})
    (result,) = run(cfg, progress=False)
    return result.metrics["synth-lfw"]["accuracy"]


@pytest.mark.slow
def test_default_difficulty_is_calibrated(data_root, tmp_path):
    full = _accuracy("full", data_root, tmp_path / "results")
    longtail = _accuracy("longtail", data_root, tmp_path / "results")
    shallow = _accuracy("shallow", data_root, tmp_path / "results")
    print(f"\ncalibration: arcface full {full:.4f}, longtail {longtail:.4f}, shallow {shallow:.4f}")
    assert 0.85 <= full <= 0.97
    assert shallow <= full - 0.03
    assert shallow < longtail < full


@pytest.mark.slow
def test_untrained_backbone_is_near_chance(data_root):
    cfg = load_config(overrides={"data.root": str(data_root)})
    protocol = SynthLFW(cfg.data, progress=False)
    seed_everything(0)
    backbone = build_backbone(cfg.train.backbone, embedding_size=cfg.train.embedding_size,
                              input_size=cfg.data.synthface.image_size)
    accuracy = protocol.evaluate(backbone, torch.device("cpu"), cfg.eval.batch_size)["accuracy"]
    print(f"\ncalibration: untrained {accuracy:.4f}")
    assert accuracy <= 0.75
