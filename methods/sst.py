"""Semi-Siamese Training (SST).

H. Du, H. Shi, Y. Liu, J. Wang, Z. Lei, D. Zeng, T. Mei, "Semi-Siamese Training for Shallow Face
Learning", ECCV 2020, arXiv:2007.08398. Code: FaceX-Zoo (JDAI-CV, ``head/SST_Prototype.py``,
``training_mode/semi-siamese_training/train.py``) and the original dituu/Semi-Siamese-Training
(``prototype.py``, ``main.py``). This module is our own implementation of what that code computes.

A *probe* network (the trained backbone) and a *gallery* network, a momentum copy of it
(:mod:`methods.momentum`, ``theta_g <- alpha theta_g + (1 - alpha) theta_p`` after each optimizer step),
whose BatchNorm layers run in train mode. Each identity of the batch gives two images ``x1, x2``::

    p1 = probe(x1), g2 = gallery(x2), p2 = probe(x2), g1 = gallery(x1)   (gallery without gradient)
    Q' = the prototype queue with the batch's g2 (resp. g1) written at the slots the batch will occupy
    logits_1 = s * margin(cos(p1, Q')), the target of sample i being its own slot ptr + i
    L = (CE(logits_1) + CE(logits_2)) / 2

so each probe feature is classified against the other image's gallery feature (its positive) and every
other prototype in the queue (negatives). Then one of ``g1``/``g2``, chosen by a fair coin each step, is
enqueued with the identities' labels at the pointer (FIFO). The queue starts full of random unit rows
without identity (FaceX-Zoo: U(-1, 1), normalised).

False negatives. The queue is not label-masked: an identity in the batch must not also have an older
prototype in the queue. The authors prevent it by sampling (FaceX-Zoo excludes the identities still in
the queue from the next epoch; dituu's ``train_sample`` reorders each epoch so that its first ``Q``
identities avoid the last ``Q`` of the previous one). FaceBench asks the sampler for it through
``BatchSpec.identity_reuse_gap = G``: an identity reappears only after ``G >= Q`` other identities have
been served, and a queue of ``Q`` rows (one per identity served, ``Q`` a multiple of the identities per
batch) then never holds an older prototype of a batch identity. The number of such pairs is logged as
``false_negatives`` (0 under the harness's sampler).

Defaults and their sources:

- ``loss_type = "am_softmax"``, ``m = 0.35``, ``s = 32``: FaceX-Zoo ``head_conf.yaml`` (SST_Prototype) and
  ``train.sh``. The original repo defaults to plain softmax with ``s = 30``; ``"arc_softmax"`` is
  ``cos(theta + m)`` without the theta + m > pi fallback, as both codebases write it.
- ``alpha = 0.999``: both codebases (``--alpha``).
- ``queue_size = 0``: derived as ``min(16384, num_classes // 2)``, rounded at construction down to a
  multiple of the global number of identities per batch. The paper uses 16,384 for shallow and deep
  MS1M-v1c (72,778 identities) and 2,560 for QMUL-SurvFace (quoted in FaceX-Zoo issue #110); the rule
  reproduces both (QMUL-SurvFace has 5,319 training identities: 2,659 rounded down to a multiple of a
  batch of 128, 256 or 512 is 2,560). Half the identities is also what the original repo's epoch
  reordering needs (its assertion ``n - Q >= Q``); FaceX-Zoo's maintainer only asks for "a multiple of the
  batch smaller than the number of classes", but its epoch exclusion then leaves ``n - Q`` identities per
  epoch. On SynthFace (1,000 identities, 64 per batch) this gives 448 rows. A set ``queue_size`` must be
  a multiple of the identities per batch (both codebases assert it) and smaller than ``num_classes``.
- The loss is the mean of both directions (FaceX-Zoo ``train.py``); the original repo sums them, which
  only doubles the gradient.

Only the probe is used at inference (``encoder()`` is the backbone).

``shuffle_bn = True``: MoCo-style shuffling BN of the gallery's input across ranks (:mod:`methods.momentum`),
as the authors run it: FaceX-Zoo's ``train.py`` calls ``shuffle_BN`` before each of the two gallery passes
of every step, on a ``DataParallel`` gallery net whose GPUs each normalise one chunk of the permuted batch.
In one process there is nothing to shuffle across and training is bit for bit that of ``shuffle_bn = False``
(tested).

Randomness (the enqueue coin, the initial queue rows, the shuffling of BN) is drawn from generators seeded
by a buffer and a step or call counter, so a resumed run draws the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import BatchSpec, LossOutput, Method, MethodContext, register_method
from methods.margins import arc_margin, cos_margin, replace_target, target_cosines, full_precision
from methods.momentum import MomentumEncoder, derived_seed
from methods.params import require
from methods.queues import (FeatureQueue, StagedWrite, checked_queue_size, gather_for_enqueue, random_unit_rows,
                            split_views)

#: The paper's prototype queue size for MS1M-v1c, the cap of the derived size.
PAPER_QUEUE_SIZE = 16384
LOSS_TYPES = ("am_softmax", "arc_softmax", "softmax")

#: Stream ids separating the random draws of different purposes under one seed.
_STREAM_QUEUE_INIT, _STREAM_ENQUEUE_COIN, _STREAM_AGENT, _STREAM_SHUFFLE_BN = 0, 1, 2, 3


def step_generator(seed: int, stream: int, step: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, stream, step): resumable randomness."""
    return torch.Generator().manual_seed(hash((seed, stream, step)) & (2**63 - 1))


def default_reuse_gap(num_classes: int, queue_size: int) -> int:
    """The identity reuse gap the sampler must honour: the queue size before rounding to the batch."""
    return queue_size if queue_size else min(PAPER_QUEUE_SIZE, num_classes // 2)


@register_method("sst")
class SST(Method):
    """Semi-Siamese Training: probe net, momentum gallery net, prototype queue (module docstring)."""

    encoder_names = ("probe",)

    def __init__(self, backbone: nn.Module, ctx: MethodContext, *, s: float = 32.0, m: float = 0.35,
                 loss_type: str = "am_softmax", alpha: float = 0.999, queue_size: int = 0,
                 shuffle_bn: bool = True) -> None:
        gap = default_reuse_gap(ctx.num_classes, queue_size)
        super().__init__(backbone, BatchSpec(views_per_class=2, identity_reuse_gap=gap))
        self.num_classes, self.embedding_size = ctx.num_classes, ctx.embedding_size
        self.s, self.m, self.loss_type, self.alpha = float(s), float(m), loss_type, float(alpha)
        self.queue_size, self.reuse_gap, self.shuffle_bn = queue_size, gap, shuffle_bn
        self.dist = ctx.dist
        # Drawn before the gallery, which draws nothing from the global generator: the same draws as before
        # the gallery's shuffling seed was derived from it.
        self.register_buffer("rng_seed", torch.randint(0, 2**62, ()))
        self.galleries = nn.ModuleList([self.new_gallery(0)])
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        capacity = self.queue_capacity(ctx, {"queue_size": queue_size})
        generator = step_generator(int(self.rng_seed), _STREAM_QUEUE_INIT, 0)
        self.queue = FeatureQueue(ctx.embedding_size, capacity,
                                  random_unit_rows(capacity, ctx.embedding_size, generator, "uniform"))
        self.staged = StagedWrite()

    def new_gallery(self, agent: int) -> MomentumEncoder:
        """Gallery network ``agent``: a momentum copy of the probe, BatchNorm in train mode (FaceX-Zoo SST
        ``train.py``), with its own shuffling seed derived from the method's."""
        return MomentumEncoder(self.backbone, self.alpha, buffers="own", train_mode="batchnorm",
                               shuffle_bn=self.shuffle_bn, dist=self.dist,
                               shuffle_seed=derived_seed(int(self.rng_seed), _STREAM_SHUFFLE_BN, agent))

    @classmethod
    def check(cls, ctx: MethodContext, p: Mapping[str, Any]) -> None:
        """Validate resolved parameters (ConfigError naming the method and the key)."""
        owner, num_classes = cls.owner(), ctx.num_classes
        require(p["s"] > 0, f"s must be > 0, got {p['s']}", owner)
        require(p["loss_type"] in LOSS_TYPES,
                f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {p['loss_type']!r}", owner)
        require(0.0 <= p["m"] < 2.0, f"m must be in [0, 2), got {p['m']}", owner)
        require(0.0 <= p["alpha"] <= 1.0, f"alpha must be in [0, 1], got {p['alpha']}", owner)
        require(p["queue_size"] >= 0, f"queue_size must be >= 0 (0 = derived), got {p['queue_size']}", owner)
        require(p["queue_size"] < num_classes,
                f"queue_size ({p['queue_size']}) must be smaller than the number of identities ({num_classes})", owner)
        require(default_reuse_gap(num_classes, p["queue_size"]) >= 1,
                f"needs at least 2 identities for a prototype queue, got {num_classes}", owner)
        cls.queue_capacity(ctx, p)

    @classmethod
    def queue_capacity(cls, ctx: MethodContext, p: Mapping[str, Any]) -> int:
        """The prototype queue size for a run of shape ``ctx`` (module docstring): a set ``queue_size`` (a
        multiple of the identities per global batch), else the reuse gap rounded down to such a multiple."""
        step = max(1, ctx.global_batch_size // 2)
        if p["queue_size"]:
            return checked_queue_size(cls.name, p["queue_size"], step, "the identities per batch")
        gap = default_reuse_gap(ctx.num_classes, p["queue_size"])
        require(gap >= step, f"the prototype queue (at most {gap} rows for {ctx.num_classes} identities) cannot "
                             f"hold one batch of {step} identities; use a smaller batch or more identities",
                cls.owner())
        return gap // step * step

    # -- hooks MASST overrides -------------------------------------------------------------------
    def active_agent(self) -> int:
        """The gallery network that encodes this step's gallery features."""
        return 0

    def agents_to_update(self, active: int) -> list[int]:
        """The gallery networks momentum-updated after this step."""
        return [active]

    # -- queue -------------------------------------------------------------------------------------
    def identities_per_step(self, batch_size: int) -> int:
        return batch_size // 2 * self.dist.world_size

    # -- loss --------------------------------------------------------------------------------------
    def target_logit(self, cos_theta: torch.Tensor) -> torch.Tensor:
        if self.loss_type == "am_softmax":
            return cos_margin(cos_theta, self.m)
        if self.loss_type == "arc_softmax":
            return arc_margin(cos_theta, self.m, guard=False)
        return cos_theta

    def direction_loss(self, probe: torch.Tensor, gallery: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """CE of ``probe`` features against the queue with ``gallery`` features written at their slots."""
        with torch.autocast(device_type=probe.device.type, enabled=False):
            prototypes = self.queue.with_rows_at_pointer(gallery)
            cosines = (F.normalize(full_precision(probe), dim=1) @ prototypes.T).clamp(-1.0, 1.0)
            logits = replace_target(cosines, targets, self.target_logit(target_cosines(cosines, targets)))
            return F.cross_entropy(self.s * logits, targets)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        pairs, identity = split_views(images, labels, 2)
        x1, x2 = pairs[:, 0], pairs[:, 1]
        gallery = self.galleries[self.active_agent()]
        # The authors' order of passes (BatchNorm statistics depend on it): p1, g2, p2, g1.
        p1 = self.backbone(x1)
        with torch.no_grad():
            g2 = F.normalize(full_precision(gallery(x2)), dim=1)
        p2 = self.backbone(x2)
        with torch.no_grad():
            g1 = F.normalize(full_precision(gallery(x1)), dim=1)
        g1_all, g2_all, identity_all = gather_for_enqueue(self.dist, g1, g2, identity)
        # This rank's samples are rows [rank * G, (rank + 1) * G) of the gathered batch.
        local = identity.shape[0]
        targets = self.queue.positions(identity_all.shape[0])[self.dist.rank * local:(self.dist.rank + 1) * local]
        loss = 0.5 * (self.direction_loss(p1, g2_all, targets) + self.direction_loss(p2, g1_all, targets))
        coin = torch.rand((), generator=step_generator(int(self.rng_seed), _STREAM_ENQUEUE_COIN, int(self.steps)))
        self.staged.stage(g1_all if float(coin) > 0.5 else g2_all, identity_all)
        return LossOutput(loss, {"false_negatives": self.false_negatives(identity)})

    def false_negatives(self, identity: torch.Tensor) -> torch.Tensor:
        """Pairs (batch identity, queue row outside the batch's slots) of the same identity: should be 0."""
        keep = torch.ones(self.queue.capacity, dtype=torch.bool, device=identity.device)
        keep[self.queue.positions(self.identities_per_step(2 * identity.shape[0]))] = False
        old = self.queue.labels[keep]
        return (old.unsqueeze(0) == identity.unsqueeze(1)).sum().float()

    def on_step_end(self) -> None:
        for agent in self.agents_to_update(self.active_agent()):
            self.galleries[agent].update(self.backbone)
        self.staged.commit(self.queue.enqueue)
        self.steps += 1

    def encoder(self, which: str | None = None) -> nn.Module:
        super().encoder(which)  # validates the name
        return self.backbone

