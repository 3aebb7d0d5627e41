"""Dynamic Class Queue (DCQ).

B. Li, T. Xi, G. Zhang, H. Feng, J. Han, J. Liu, E. Ding, W. Liu, "Dynamic Class Queue for Large Scale
Face Recognition In the Wild", CVPR 2021, arXiv:2105.11113. Authors' code: github.com/bilylee/DCQ
(PaddlePaddle; ``dcq.py``, ``train.py``, ``data_proc/sampler.py``, ``train_scripts/*.sh``), itself based
on MoCo. This module is our own PyTorch implementation of what that code computes.

Two encoders: the *query encoder* (the trained backbone) and the *weight generator*, a momentum copy of it
(:mod:`methods.momentum`). Each batch element is an identity with a query image and ``K`` reference
images of the same identity. With ``q`` the normalised query embedding, ``w`` the class weight generated
from the references (``K = 1``: ``w = normalize(g(x_ref))``; ``K > 1``: the normalised mean of the ``K``
normalised reference embeddings) and ``Q`` the queue of earlier weights with their labels::

    logit_pos = s * (q . w - m)                     (CosFace margin, methods.margins.cos_margin)
    logit_j   = s * (q . Q_j)    for queue rows j whose label differs from the sample's
    logit_j   = -inf             for queue rows of the sample's own identity (never a negative)
    L = mean over the batch of  -log softmax(logits)[pos]

The current batch's weights are not negatives for each other in the step that generates them (as in the
authors' code); after the loss they are enqueued FIFO with their labels (all ranks' in distributed runs,
through :func:`methods.queues.gather_for_enqueue`), overwriting the oldest rows. The queue starts full of
random unit rows without identity (``randn`` then ``normalize``, as the authors).

Defaults and their sources:

- ``s = 50``, ``m = 0.3``: ``train_scripts/train_dcq_ir*_q8192_ms1mv2.sh`` (``--scale 50 --margin 0.3``).
- ``momentum = 0.999``: ``train.py`` ``--dcq-momentum`` and the scripts.
- ``queue_size = 0``: derived at construction as ``queue_fraction * num_classes`` rounded *down* to a
  multiple of the global number of weights per step (batch elements x ranks), and at least one step's
  worth. ``queue_fraction = 0.1``: the paper's finding (abstract: "10% of classes are sufficient"); with
  MS1MV2's 85,742 identities and the authors' 512 weights per step this gives their 8,192
  (``--queue-size 8192``). On small data it degenerates to one step's weights (SynthFace 1,000 identities,
  64 weights per step: 64 rows). A set ``queue_size`` must be a multiple of the weights per step, as the
  authors assert in ``_dequeue_and_enqueue``.
- ``shots = 1``: the authors' code generates each weight from one reference image; ``K``-shot averaging
  is the paper's "few-shot" wording and is our option (``views_per_class = 1 + shots``).
- ``key_with_replacement = True``: the authors' sampler draws the reference image *with replacement*
  among the identity's images, so it may be the query image itself (then only the random flip differs);
  identities with one image reuse it. Their default ``--sampling-base image`` iterates over images and
  does not make identities unique in a batch; FaceBench's class-balanced sampler serves one identity per
  batch element, i.e. their ``category`` mode.
- ``momentum_buffers = "ema"``: PaddlePaddle counts BatchNorm's running mean and variance among
  ``parameters()``, so the authors' momentum update averages them too (see :mod:`methods.momentum`);
  ``"own"`` is the PyTorch/MoCo behaviour.

Order of updates. The authors update the weight generator at the start of each forward, before the keys
are computed; FaceBench does it in :meth:`DCQ.on_step_end`, after the optimizer step. The sequence of
weight generators that produce keys is identical (the authors' first update is a no-op, both encoders
being equal); only the final weight generator has had one more update. The enqueue also happens in
``on_step_end``, with the keys computed in ``forward``, which is the authors' order.

Evaluation: the authors evaluate the weight generator (``forward(is_train=False)`` uses ``encoder_k``),
so ``encoder()`` defaults to ``"momentum"``; ``encoder("query")`` gives the trained backbone.

``shuffle_bn = True``: MoCo's shuffling BN of the key batch across ranks (:mod:`methods.momentum`), as the
authors run it: ``dcq.py`` calls ``_batch_shuffle_ddp`` / ``_batch_unshuffle_ddp`` around every key
encoding, and their scripts train on 4 GPUs (``CUDA_VISIBLE_DEVICES=0,1,2,3``, ``--distributed``, 128 per
GPU). In one process there is nothing to shuffle across and training is bit for bit that of
``shuffle_bn = False`` (tested); ``False`` keeps each rank's BatchNorm statistics to its own keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import BatchSpec, LossOutput, Method, MethodContext, register_method
from methods.margins import cos_margin, full_precision
from methods.momentum import BUFFER_RULES, MomentumEncoder, derived_seed
from methods.params import require
from methods.queues import (FeatureQueue, StagedWrite, checked_queue_size, gather_for_enqueue, mask_same_label,
                            random_unit_rows, split_views)


#: Stream id of the shuffling-BN permutations under the method's seed (the queue's rows use the seed itself).
_STREAM_SHUFFLE_BN = 1


@register_method("dcq")
class DCQ(Method):
    """Dynamic Class Queue: momentum weight generator + label-masked class-weight queue (module docstring)."""

    encoder_names = ("momentum", "query")

    def __init__(self, backbone: nn.Module, ctx: MethodContext, *, s: float = 50.0, m: float = 0.3,
                 momentum: float = 0.999, queue_size: int = 0, queue_fraction: float = 0.1, shots: int = 1,
                 key_with_replacement: bool = True, momentum_buffers: str = "ema", shuffle_bn: bool = True) -> None:
        super().__init__(backbone, BatchSpec(views_per_class=1 + shots, views_with_replacement=key_with_replacement))
        self.num_classes, self.embedding_size = ctx.num_classes, ctx.embedding_size
        self.s, self.m, self.shots = float(s), float(m), shots
        self.queue_size, self.queue_fraction = queue_size, float(queue_fraction)
        self.dist = ctx.dist
        # Seeds the queue's random initial rows and the shuffling of BN; a buffer, so a resumed run has the same.
        self.register_buffer("rng_seed", torch.randint(0, 2**62, ()))
        self.weight_generator = MomentumEncoder(backbone, momentum, buffers=momentum_buffers, train_mode="all",
                                                shuffle_bn=shuffle_bn, dist=self.dist,
                                                shuffle_seed=derived_seed(int(self.rng_seed), _STREAM_SHUFFLE_BN))
        capacity = self.queue_capacity(ctx, {"queue_size": queue_size, "queue_fraction": queue_fraction,
                                             "shots": shots})
        generator = torch.Generator().manual_seed(int(self.rng_seed))
        self.queue = FeatureQueue(ctx.embedding_size, capacity,
                                  random_unit_rows(capacity, ctx.embedding_size, generator, "normal"))
        self.staged = StagedWrite()

    @classmethod
    def check(cls, ctx: MethodContext, p: Mapping[str, Any]) -> None:
        owner = cls.owner()
        require(p["s"] > 0, f"s must be > 0, got {p['s']}", owner)
        require(0.0 <= p["m"] < 2.0, f"m must be in [0, 2), got {p['m']}", owner)
        require(0.0 <= p["momentum"] <= 1.0, f"momentum must be in [0, 1], got {p['momentum']}", owner)
        require(p["queue_size"] >= 0, f"queue_size must be >= 0 (0 = derived), got {p['queue_size']}", owner)
        require(0.0 < p["queue_fraction"] <= 1.0, f"queue_fraction must be in (0, 1], got {p['queue_fraction']}",
                owner)
        require(p["shots"] >= 1, f"shots must be >= 1, got {p['shots']}", owner)
        require(p["momentum_buffers"] in BUFFER_RULES,
                f"momentum_buffers must be one of {', '.join(BUFFER_RULES)}, got {p['momentum_buffers']!r}", owner)
        cls.queue_capacity(ctx, p)

    @classmethod
    def queue_capacity(cls, ctx: MethodContext, p: Mapping[str, Any]) -> int:
        """The queue size for a run of shape ``ctx`` (module docstring): a set ``queue_size`` (a multiple of
        the weights enqueued per step, one per identity of the global batch), else ``queue_fraction`` of
        the classes rounded down to such a multiple, at least one step's weights."""
        step = max(1, ctx.global_batch_size // (1 + p["shots"]))
        if p["queue_size"]:
            return checked_queue_size(cls.name, p["queue_size"], step, "the weights enqueued per step")
        return max(step, int(p["queue_fraction"] * ctx.num_classes) // step * step)

    def generate_weights(self, references: torch.Tensor) -> torch.Tensor:
        """Class weights ``[G, D]`` (unit rows) from reference images ``[G, K, ...]``, without gradient."""
        groups, shots = references.shape[:2]
        with torch.no_grad():
            keys = F.normalize(full_precision(self.weight_generator(references.flatten(0, 1))), dim=1)
            if shots > 1:
                keys = F.normalize(keys.view(groups, shots, -1).mean(dim=1), dim=1)
        return keys

    def logits(self, queries: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits ``[G, 1 + queue rows]``: column 0 the margin positive, then the masked queue."""
        with torch.autocast(device_type=queries.device.type, enabled=False):
            q = F.normalize(full_precision(queries), dim=1)
            positive = (q * weights).sum(dim=1).clamp(-1.0, 1.0)
            rows, row_labels = self.queue.live()
            negatives = mask_same_label((q @ rows.T).clamp(-1.0, 1.0), labels, row_labels)
            return self.s * torch.cat([cos_margin(positive, self.m).unsqueeze(1), negatives], dim=1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        grouped, identity = split_views(images, labels, 1 + self.shots)
        weights = self.generate_weights(grouped[:, 1:])
        queries = self.backbone(grouped[:, 0])
        logits = self.logits(queries, weights, identity)
        loss = F.cross_entropy(logits, torch.zeros_like(identity))
        self.staged.stage(*gather_for_enqueue(self.dist, weights, identity))
        return LossOutput(loss, {"positive_cos": logits[:, 0].detach().mean() / self.s + self.m})

    def on_step_end(self) -> None:
        self.weight_generator.update(self.backbone)
        self.staged.commit(self.queue.enqueue)

    def encoder(self, which: str | None = None) -> nn.Module:
        which = which or self.encoder_names[0]
        if which == "momentum":
            return self.weight_generator
        return super().encoder(which)

