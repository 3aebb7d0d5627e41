"""Momentum (exponential moving average) copies of an encoder: DCQ's weight generator, SST's gallery
network, MASST's gallery agents.

Update rule (MoCo: He et al., "Momentum Contrast for Unsupervised Visual Representation Learning",
CVPR 2020, arXiv:1911.05722, Eq. 2; bilylee/DCQ ``dcq.py::_momentum_update_key_encoder``; FaceX-Zoo
``semi-siamese_training/train.py::moving_average`` and dituu/Semi-Siamese-Training ``main.py``)::

    theta_copy <- m * theta_copy + (1 - m) * theta_source        for every parameter

The copy starts equal to the source and never receives gradients (``requires_grad=False``), so it is
in no optimizer group.

Buffers (BatchNorm running statistics) are a choice the papers do not discuss, and the two codebases
differ:

- ``buffers="own"``: the copy's buffers change only through its own forward passes in train mode.
  This is what the PyTorch codebases do (MoCo, FaceX-Zoo and dituu SST average ``.parameters()`` only).
- ``buffers="ema"``: floating-point buffers are averaged with the same rule as the parameters, after
  which the copy's own forward passes still update them. This reproduces bilylee/DCQ (PaddlePaddle),
  whose ``parameters()`` include BatchNorm's ``_mean`` and ``_variance`` (created with
  ``create_parameter(trainable=False)``), so its key encoder averages them too. Integer buffers
  (``num_batches_tracked``) are left to the copy.

Train-time mode of the copy: ``train_mode="all"`` puts the whole copy in train mode with the method
(DCQ: its trainer calls ``model.train()`` on both encoders); ``train_mode="batchnorm"`` keeps the copy in
eval mode except its BatchNorm layers (SST: ``gallery_net.eval().apply(train_BN)``), which only matters
for dropout. In eval mode the copy is entirely in eval mode.

Shuffling BN (MoCo, Sec. 3.3, ``_batch_shuffle_ddp``). With several ranks, each rank's BatchNorm sees
only its own slice of the batch; a copy in train mode then normalises a key with the statistics of the
very samples its query shares a rank with, a signal the query can cheat on. With ``shuffle_bn=True`` the
copy's input is gathered from every rank, permuted with one permutation shared by all ranks, each rank
encodes its slice of the permuted batch, and the keys are gathered and un-permuted
(:func:`shuffled_forward`). The authors of the methods using a copy run it this way: bilylee/DCQ
``dcq.py`` calls ``_batch_shuffle_ddp`` on every key batch and trains on 4 GPUs (``--distributed``,
``train_scripts/*.sh``); FaceX-Zoo's SST ``train.py`` calls ``shuffle_BN`` before every gallery pass of its
``DataParallel`` gallery net, whose GPUs each normalise one chunk of the permuted batch.

In one process there is nothing to shuffle across (one BatchNorm sees the whole batch, in any order), so
the option changes nothing there, bit for bit (no permutation is drawn). With several ranks, the
permutation of a call comes from a generator seeded by ``shuffle_seed`` (given by the owner, derived from
its own seed so that the global random stream is not touched; else drawn at construction) plus a count of
train-mode calls: buffers, so a resumed run draws the same, and no communication is needed. The count
advances in one process too, so the state is the same whatever the number of ranks.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from methods.distributed import DistContext, all_gather

BUFFER_RULES = ("own", "ema")
TRAIN_MODES = ("all", "batchnorm")


@torch.no_grad()
def momentum_update_(target: nn.Module, source: nn.Module, momentum: float, buffers: str = "own") -> None:
    """In place: ``target <- momentum * target + (1 - momentum) * source`` over the parameters (and the
    floating-point buffers when ``buffers="ema"``). ``target`` and ``source`` must have the same layout."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if buffers not in BUFFER_RULES:
        raise ValueError(f"buffers must be one of {BUFFER_RULES}, got {buffers!r}")
    targets, sources = list(target.parameters()), list(source.parameters())
    if buffers == "ema":
        targets += [b for b in target.buffers() if b.is_floating_point()]
        sources += [b for b in source.buffers() if b.is_floating_point()]
    if len(targets) != len(sources) or any(t.shape != s.shape for t, s in zip(targets, sources)):
        raise ValueError("momentum_update_: target and source modules differ in layout")
    if targets:
        torch._foreach_mul_(targets, momentum)
        torch._foreach_add_(targets, sources, alpha=1.0 - momentum)


def derived_seed(seed: int, *stream: int) -> int:
    """A seed for one purpose (``stream``, e.g. the shuffling of one gallery agent) from an owner's seed,
    without drawing from torch's global generator, so that adding a purpose moves no other random draw.
    Python's hash of a tuple of ints is the same in every process (no hash randomisation for ints)."""
    return hash((seed, *stream)) & (2**62 - 1)


@torch.no_grad()
def shuffled_forward(encoder: nn.Module, images: torch.Tensor, dist: DistContext,
                     generator: torch.Generator) -> torch.Tensor:
    """``encoder(images)`` with BatchNorm statistics of a random mix of every rank's images (MoCo Sec. 3.3).

    Every rank passes equally many images and the same ``generator`` state; returns this rank's keys in
    the order of ``images``. No gradient (the keys of a momentum copy are constants).
    """
    local = images.shape[0]
    everything = all_gather(images, dist)
    order = torch.randperm(everything.shape[0], generator=generator).to(images.device)
    mine = slice(dist.rank * local, (dist.rank + 1) * local)
    keys = all_gather(encoder(everything[order[mine]]), dist)  # keys[j] is the key of everything[order[j]]
    return keys[torch.argsort(order)][mine]


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


class MomentumEncoder(nn.Module):
    """A frozen copy of ``source`` updated by :func:`momentum_update_`; ``forward`` runs the copy."""

    def __init__(self, source: nn.Module, momentum: float, buffers: str = "own", train_mode: str = "all",
                 shuffle_bn: bool = False, dist: DistContext | None = None,
                 shuffle_seed: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if buffers not in BUFFER_RULES:
            raise ValueError(f"buffers must be one of {BUFFER_RULES}, got {buffers!r}")
        if train_mode not in TRAIN_MODES:
            raise ValueError(f"train_mode must be one of {TRAIN_MODES}, got {train_mode!r}")
        self.momentum, self.buffer_rule, self.train_mode = float(momentum), buffers, train_mode
        self.shuffle_bn, self.dist = bool(shuffle_bn), dist or DistContext()
        if self.shuffle_bn:
            # The same seed on every rank: the owner derives it from its own seeded state (DCQ, SST), else it
            # is drawn here (the model is built under the same torch seed on every rank).
            seed = torch.randint(0, 2**62, ()) if shuffle_seed is None else torch.tensor(int(shuffle_seed))
            self.register_buffer("shuffle_seed", seed)
            self.register_buffer("shuffle_calls", torch.zeros((), dtype=torch.long))
        self.encoder = copy.deepcopy(source)
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)
            parameter.grad = None
        self.train(source.training)

    def train(self, mode: bool = True) -> MomentumEncoder:
        self.training = mode
        if mode and self.train_mode == "batchnorm":
            self.encoder.eval()
            for module in self.encoder.modules():
                if _is_batchnorm(module):
                    module.train()
        else:
            self.encoder.train(mode)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not (self.shuffle_bn and self.training):
            return self.encoder(images)
        if not self.dist.is_distributed:
            # One BatchNorm sees the whole batch: nothing to shuffle across. The call is still counted (on the
            # device, no host read), so that a checkpoint's state does not depend on the number of ranks.
            self.shuffle_calls += 1
            return self.encoder(images)
        generator = torch.Generator().manual_seed(int(self.shuffle_seed) + int(self.shuffle_calls))
        self.shuffle_calls += 1
        return shuffled_forward(self.encoder, images, self.dist, generator)

    def update(self, source: nn.Module) -> None:
        """One momentum step towards ``source`` (call after the optimizer step)."""
        momentum_update_(self.encoder, source, self.momentum, self.buffer_rule)

    def extra_repr(self) -> str:
        return (f"momentum={self.momentum}, buffers={self.buffer_rule}, train_mode={self.train_mode}, "
                f"shuffle_bn={self.shuffle_bn}")
