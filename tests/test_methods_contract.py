"""Contract tests over every registered method (as timm tests every model in its registry)."""

from __future__ import annotations

import pytest
import torch

from bench.backbones import build_backbone
from methods.base import METHODS, LossOutput, Method, build_method

NUM_CLASSES, EMBEDDING, IMAGE = 12, 16, 16


def _build(name: str) -> Method:
    torch.manual_seed(0)
    backbone = build_backbone("small", embedding_size=EMBEDDING, input_size=IMAGE)
    return build_method(name, backbone, NUM_CLASSES, EMBEDDING)


def _batch(method: Method, batch_size: int = 8):
    views = method.batch_spec.views_per_class
    labels = torch.arange(batch_size // views).repeat_interleave(views) % NUM_CLASSES
    images = torch.randn(labels.shape[0], 3, IMAGE, IMAGE)
    return images, labels


@pytest.mark.parametrize("name", METHODS.names())
def test_forward_backward_reaches_every_parameter(name):
    method = _build(name)
    images, labels = _batch(method)
    out = method(images, labels)
    assert isinstance(out, LossOutput) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grouped = [p for group in method.param_groups() for p in group["params"]]
    assert len({id(p) for p in grouped}) == len(grouped)  # each parameter in one group only
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in grouped}
    for parameter in trainable:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
    method.on_step_end()


@pytest.mark.parametrize("name", METHODS.names())
def test_state_dict_round_trip_and_encoder(name):
    method = _build(name)
    images, labels = _batch(method)
    method(images, labels).loss.backward()
    method.on_step_end()
    clone = _build(name)
    clone.load_state_dict(method.state_dict())
    method.eval(), clone.eval()
    for which in method.encoder_names:
        with torch.no_grad():
            assert torch.equal(method.encoder(which)(images), clone.encoder(which)(images))
        assert method.encoder(which)(images).shape == (images.shape[0], EMBEDDING)


@pytest.mark.parametrize("name", METHODS.names())
def test_defaults_are_documented_parameters(name):
    method_cls = METHODS.get(name)
    defaults = method_cls.defaults()
    assert method_cls.resolve_params() == defaults
    assert method_cls.__doc__, f"{name} has no docstring"
