"""MASST: N=1 is SST exactly, agent rotation and per-agent momentum updates, exact resume."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bench.backbones import build_backbone
from methods.base import build_method
from methods.registry import ConfigError
from tests.method_helpers import EMBEDDING, IMAGE, NUM_CLASSES, harness_sgd, tiny_context, train_steps



pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name="masst", cfg=None, seed=0):
    torch.manual_seed(seed)
    backbone = build_backbone("small", embedding_size=EMBEDDING, input_size=IMAGE)
    return build_method(name, backbone, tiny_context(), cfg)


def _batches(count):
    out = []
    for step in range(count):
        generator = torch.Generator().manual_seed(step)
        labels = torch.tensor([(4 * step + i) % NUM_CLASSES for i in range(4)]).repeat_interleave(2)
        out.append((torch.randn(8, 3, IMAGE, IMAGE, generator=generator), labels))
    return out


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_one_agent_is_sst_exactly():
    batches = _batches(6)
    sst, masst = _build("sst", {"queue_size": 8}), _build("masst", {"queue_size": 8, "num_agents": 1})
    sst_losses = train_steps(sst, harness_sgd(sst), batches)
    assert sst_losses == train_steps(masst, harness_sgd(masst), batches)
    sst_state, masst_state = sst.state_dict(), masst.state_dict()
    assert sst_state.keys() == masst_state.keys()
    for name, value in sst_state.items():
        assert torch.equal(value, masst_state[name]), name
    # With one agent every rotation and update rule is SST.
    other = _build("masst", {"queue_size": 8, "num_agents": 1, "rotation": "random", "update": "all"})
    assert train_steps(other, harness_sgd(other), batches) == sst_losses


def test_sequential_rotation_updates_only_the_active_agent():
    method = _build(cfg={"queue_size": 8, "num_agents": 3, "alpha": 0.5})
    optimizer = harness_sgd(method)
    for step, (images, labels) in enumerate(_batches(7)):
        active = step % 3
        assert method.active_agent() == active
        agents = [_params(agent) for agent in method.galleries]
        with torch.no_grad():  # the gallery features of every agent, before the step
            per_agent = [(F.normalize(a(images[0::2]), dim=1), F.normalize(a(images[1::2]), dim=1))
                         for a in method.galleries]
        train_steps(method, optimizer, [(images, labels)])
        probe = _params(method.backbone)
        for index, agent in enumerate(method.galleries):
            after = _params(agent)
            if index == active:
                expected = [0.5 * a + 0.5 * p for a, p in zip(agents[index], probe)]
                assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(after, expected))
            else:
                assert all(torch.equal(x, y) for x, y in zip(after, agents[index]))
        enqueued = method.queue.ordered()[0][-4:]
        matches = [i for i, (g1, g2) in enumerate(per_agent)
                   if torch.allclose(enqueued, g1, atol=1e-5) or torch.allclose(enqueued, g2, atol=1e-5)]
        if step >= 3:  # agents differ once each has been updated: only the active one matches
            assert matches == [active]
        else:
            assert active in matches


def test_update_all_and_random_rotation():
    method = _build(cfg={"queue_size": 8, "num_agents": 3, "update": "all", "alpha": 0.5})
    optimizer = harness_sgd(method)
    for images, labels in _batches(3):
        before = [_params(agent) for agent in method.galleries]
        train_steps(method, optimizer, [(images, labels)])
        probe = _params(method.backbone)
        for agent, old in zip(method.galleries, before):
            expected = [0.5 * a + 0.5 * p for a, p in zip(old, probe)]
            assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(_params(agent), expected))
    random = _build(cfg={"num_agents": 4, "rotation": "random"})
    again = _build(cfg={"num_agents": 4, "rotation": "random"})
    sequence = []
    for step in range(16):
        random.steps.fill_(step)
        again.steps.fill_(step)
        sequence.append(random.active_agent())
        assert again.active_agent() == sequence[-1]
    assert set(sequence) <= {0, 1, 2, 3} and len(set(sequence)) > 1 and sequence != [s % 4 for s in range(16)]


def test_config_defaults_and_errors():
    method = _build()
    assert len(method.galleries) == 3 and method.rotation == "sequential" and method.update_rule == "active"
    assert method.encoder() is method.backbone and method.batch_spec.views_per_class == 2
    for bad in ({"num_agents": 0}, {"rotation": "cyclic"}, {"update": "some"}):
        with pytest.raises(ConfigError, match="method 'masst'"):
            _build(cfg=bad)


def test_resume_from_state_dict_continues_identically():
    batches = _batches(7)
    cfg = {"queue_size": 8, "num_agents": 3}
    method = _build(cfg=cfg)
    optimizer = harness_sgd(method)
    train_steps(method, optimizer, batches[:4])
    resumed = _build(cfg=cfg, seed=99)
    resumed.load_state_dict(method.state_dict())
    resumed_optimizer = harness_sgd(resumed)
    resumed_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert int(resumed.steps) == 4 and resumed.active_agent() == 1
    assert train_steps(method, optimizer, batches[4:]) == train_steps(resumed, resumed_optimizer, batches[4:])
    for name, value in method.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
