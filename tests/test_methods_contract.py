"""Contract tests over every registered method (as timm tests every model in its registry)."""

from __future__ import annotations

import pytest
import torch

from bench.backbones import build_backbone
from methods.base import METHODS, LossOutput, Method, build_method
from methods.registry import ConfigError
from tests.method_helpers import EMBEDDING, IMAGE, NUM_CLASSES, tiny_context


def _build(name: str, cfg: dict | None = None) -> Method:
    torch.manual_seed(0)
    backbone = build_backbone("small", embedding_size=EMBEDDING, input_size=IMAGE)
    return build_method(name, backbone, tiny_context(), cfg)


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


@pytest.mark.parametrize("name", METHODS.names())
def test_all_state_is_allocated_at_construction(name):
    """Issue 14, item 1: a method sizes all of its state from the run's context in ``__init__``. The state
    dict of a fresh method has exactly the entries and shapes it has after a training step; catches lazy
    allocation in ``forward`` (an empty queue or memory before the first step)."""
    method = _build(name)
    fresh = _shapes(method.state_dict())
    images, labels = _batch(method)
    method(images, labels).loss.backward()
    method.on_step_end()
    assert _shapes(method.state_dict()) == fresh


def _shapes(state: dict) -> dict:
    """Each entry's shape (tensors) or type (extra state, e.g. Partial FC's)."""
    return {key: tuple(value.shape) if torch.is_tensor(value) else type(value) for key, value in state.items()}


@pytest.mark.parametrize("name", METHODS.names())
def test_parameters_are_resolved_by_the_base_class_only(name):
    """The template method: resolving and checking parameters happens in ``Method.from_config`` alone (no
    per-method override), and the defaults are read from one place (``defaults()`` equals the constructor's
    keyword defaults, so the two cannot drift). Catches a method re-implementing ``from_config``."""
    method_cls = METHODS.get(name)
    assert all("from_config" not in vars(klass) for klass in method_cls.__mro__ if klass is not Method)
    with pytest.raises(ConfigError, match=f"method '{name}': unknown parameter 'no_such_parameter'"):
        _build(name, {"no_such_parameter": 1})


@pytest.mark.parametrize("name, cfg, other", [("dcq", {"queue_size": 8}, {"queue_size": 4}),
                                              ("sst", {"queue_size": 8}, {"queue_size": 4}),
                                              ("prototype_memory", {"memory_size": 6}, {"memory_size": 5})])
def test_a_checkpoint_of_another_size_is_refused_not_resized(name, cfg, other):
    """No resize-on-load: a state dict whose queue or memory has another capacity than the method was built
    with is refused (the run's shape decides the capacity, and a checkpoint of the same run always fits).
    Catches a revived ``_ResizableBuffers``, which would silently adopt the checkpoint's size."""
    saved = _build(name, cfg).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        _build(name, other).load_state_dict(saved)
