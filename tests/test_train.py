"""Training-loop pieces: LR schedule closed form, device resolution, determinism of a short run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.config import TrainSettings
from bench.distributed import resolve_device
from bench.train import lr_factor
from methods.registry import ConfigError


def test_lr_factor_warmup_then_polynomial_decay():
    # 10 warm-up steps of 100, power 2: step s < 10 -> (s+1)/10; then (1 - (s-10)/90)^2
    assert lr_factor(0, 10, 100, 2.0) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 2.0) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 2.0) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 2.0) == pytest.approx((1 - 45 / 90) ** 2)
    assert lr_factor(100, 10, 100, 2.0) == 0.0
    assert lr_factor(40, 0, 100, 1.0) == pytest.approx(0.6)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_train_settings_defaults_are_the_insightface_recipe():
    """SGD (insightface configs/base.py, train_v2.py) by default; AdamW's own defaults when it is chosen in
    code (configs/wf42m_pfc03_40epoch_8gpu_vit_b.py, torch's betas and eps). Values written by hand."""
    settings = TrainSettings()
    assert settings.optimizer == "sgd"
    assert (settings.momentum, settings.weight_decay, settings.grad_clip_norm) == (0.9, 5e-4, 5.0)
    assert np.isclose(settings.lr, 0.1) and settings.betas is None and settings.eps is None
    adamw = TrainSettings(optimizer="adamw")
    assert (adamw.lr, adamw.weight_decay, adamw.betas, adamw.eps, adamw.momentum) == (1e-3, 0.1, [0.9, 0.999],
                                                                                      1e-8, None)


def test_build_optimizer_follows_the_settings():
    """Catches a builder that hard-codes SGD or drops a setting: the optimizer class and every group's
    hyperparameters are the settings'. SGD's are unchanged by issue 16 (momentum 0.9, weight decay 5e-4)."""
    from bench.train import build_optimizer
    from tests.method_helpers import build_tiny

    method = build_tiny("arcface")
    sgd = build_optimizer(method, TrainSettings())
    assert type(sgd) is torch.optim.SGD
    assert all((g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (0.1, 0.9, 5e-4, False)
               for g in sgd.param_groups)
    adamw = build_optimizer(method, TrainSettings(optimizer="adamw", lr=2e-3, betas=[0.8, 0.99]))
    assert type(adamw) is torch.optim.AdamW
    assert all((g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (2e-3, (0.8, 0.99), 1e-8, 0.1)
               for g in adamw.param_groups)


def test_seed_everything_sets_the_deterministic_switch_both_ways():
    """torch's deterministic-algorithms switch is process-global: a run with ``train.deterministic=false``
    after one with ``true`` in the same process must train with the default kernels again. Catches a
    ``seed_everything`` that only ever turns the switch on (it leaked into later in-process runs and
    moved the calibration run's accuracy by points)."""
    from bench.train import seed_everything

    seed_everything(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    seed_everything(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()
