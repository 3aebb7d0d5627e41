"""Method ``ri`` (methods/recognizability.py): the recognizability index and the index diversion loss against
hand-computed values, the UI centre's moving average, the perceptibility attention inside the evaluated
encoder, and the quality regressor's isolation from the backbone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from methods.recognizability import (degrade_resolution, index_diversion_loss, recognizability_index)
from tests.method_helpers import IMAGE, build_tiny, view_batch


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_recognizability_index_matches_hand_computed_values():
    r = 1 / math.sqrt(2)
    z = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]], dtype=torch.float64)   # norms differ: RI uses directions
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    u = torch.tensor([0.0, 5.0], dtype=torch.float64)
    ri = recognizability_index(z, prototypes, labels, u, kappa=10.0)
    expected = [
        (1 - 0.0) / 2 * sigmoid(10 * (1.0 - 0.0)),           # on its prototype, 90 degrees from u
        (1 - 1.0) / 2 * sigmoid(10 * (1.0 - 0.0)),           # on u: RI 0 however close to its prototype
        (1 - r) / 2 * sigmoid(10 * (-r - r)),                # 45 degrees from u, nearer two negatives
    ]
    assert ri.tolist() == pytest.approx(expected, rel=1e-12)


def test_index_diversion_loss_closed_form_and_direction():
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.2, 1.0]], dtype=torch.float64, requires_grad=True)
    u = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ri = torch.tensor([0.2, 0.9, 0.5], dtype=torch.float64, requires_grad=True)
    loss = index_diversion_loss(z, ri, u, delta=0.1)
    r = 1 / math.sqrt(2)
    # row 2 points away from u (cos -0.71 < delta): no push; rows 1 and 3 weighted by 1 - RI
    c = 1 / math.sqrt(1.04)
    assert loss.item() == pytest.approx(((1 - 0.2) * (r - 0.1) + 0 + (1 - 0.5) * (c - 0.1)) / 3, rel=1e-12)
    loss.backward()
    assert ri.grad is None or torch.all(ri.grad == 0)          # RI is held constant
    assert torch.all(z.grad[1] == 0)
    stepped = F.normalize(z.detach() - 0.1 * z.grad, dim=1) @ u
    assert stepped[0] < r and stepped[2] < c                    # pushed off the UI centre


def test_degrade_resolution_is_down_then_up():
    images = torch.rand(2, 3, 32, 32)
    down = F.interpolate(images, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    expected = F.interpolate(down, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.equal(degrade_resolution(images, 8), expected)


def test_ui_centre_comes_from_degraded_images_in_the_same_forward_pass():
    method = build_tiny("ri", {"ui_images": 3, "ui_resolution": 4})
    images, _ = view_batch([0, 1, 2, 3], seed=1)
    reference = build_tiny("ri", {"ui_images": 3, "ui_resolution": 4})
    reference.load_state_dict(method.state_dict())
    embeddings, centre = method.embed_with_ui_centre(images)
    # by hand: the first 3 images brought down to 4 px and back, embedded together with the batch
    degraded = F.interpolate(F.interpolate(images[:3], size=(4, 4), mode="bilinear", align_corners=False,
                                           antialias=True), size=(IMAGE, IMAGE), mode="bilinear", align_corners=False)
    out = reference.backbone(torch.cat([images, degraded]))
    assert torch.allclose(embeddings, out[:8], atol=1e-6)
    assert torch.allclose(centre, F.normalize(F.normalize(out[8:], dim=1).mean(0), dim=0), atol=1e-6)
    alone = build_tiny("ri", {"ui_images": 3, "ui_resolution": 4})
    alone.load_state_dict(method.state_dict())
    assert not torch.allclose(alone.backbone(images), embeddings, atol=1e-4)   # BatchNorm saw the UI images
    # the diversion loss reaches the UI images' embeddings (u is not detached)
    loss = index_diversion_loss(embeddings, torch.zeros(8), centre, delta=-1.0)
    grads = torch.autograd.grad(loss, [centre])
    assert torch.any(grads[0] != 0)


def test_perceptibility_attention_is_part_of_the_evaluated_encoder():
    with_attention, without = build_tiny("ri", seed=3), build_tiny("ri", {"attention": False}, seed=3)
    images = torch.randn(4, 3, IMAGE, IMAGE)
    for method in (with_attention, without):
        method.eval()
    assert not torch.allclose(without.encoder()(images), with_attention.encoder()(images))
    # An attention map of exactly 0 everywhere (zero kernel, saturated bias) leaves F * (1 + 0): the plain
    # backbone; so the difference above is the attention, applied to the backbone's last stage.
    with torch.no_grad():
        with_attention.attention.conv.weight.zero_()
        with_attention.attention.conv.bias.fill_(-100.0)
    assert torch.equal(without.encoder()(images), with_attention.encoder()(images))


def test_training_loss_is_the_sum_of_its_parts_and_the_regressor_does_not_train_the_backbone():
    images, labels = view_batch([0, 1, 2, 3], seed=4)
    method = build_tiny("ri", {"diversion_weight": 0.5, "regressor_weight": 2.0})
    out = method(images, labels)
    parts = out.logs
    assert out.loss.item() == pytest.approx(parts["arcface"].item() + 0.5 * parts["diversion"].item()
                                            + 2.0 * parts["regression"].item(), rel=1e-5)
    # The regression loss trains the regressor and nothing else: the backbone's gradient does not depend on
    # its weight, the regressor's is proportional to it.
    grads = {}
    for weight in (1.0, 3.0):
        other = build_tiny("ri", {"diversion_weight": 0.5, "regressor_weight": weight})
        other.load_state_dict(method.state_dict())
        other(images, labels).loss.backward()
        grads[weight] = ([p.grad.clone() for p in other.backbone.parameters() if p.grad is not None],
                         [p.grad.clone() for p in other.regressor.parameters()])
    for a, b in zip(grads[1.0][0], grads[3.0][0]):
        assert torch.allclose(a, b, atol=1e-6)
    for a, b in zip(grads[1.0][1], grads[3.0][1]):
        assert torch.any(a != 0) and torch.allclose(3.0 * a, b, atol=1e-6)


def test_quality_is_a_score_per_row_in_the_unit_interval():
    method = build_tiny("ri")
    features = torch.randn(5, 16)
    quality = method.quality(features)
    assert quality.shape == (5,) and torch.all((quality > 0) & (quality < 1))
    assert torch.allclose(method.quality(3.0 * features), quality)     # a function of the direction only
    assert build_tiny("arcface").quality(features) is None


def test_bad_parameters_are_one_line_errors():
    from methods.registry import ConfigError

    for cfg in ({"kappa": 0}, {"ui_momentum": 1.0}, {"delta": 1.0}, {"regressor_weight": 0}):
        with pytest.raises(ConfigError, match="method 'ri'"):
            build_tiny("ri", cfg)
