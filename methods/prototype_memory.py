"""Prototype Memory (PM).

E. Smirnov, N. Garaev, V. Galyuk, E. Lukyanets, "Prototype Memory for Large-scale Face Representation
Learning", IEEE Access 10:12031-12046, 2022, arXiv:2105.02103. No public code; this is our
implementation of the method as the abstract and the issue describe it.

A limited-size memory of class prototypes (:class:`methods.queues.ClassMemory`) replaces the classifier.
Batches hold ``k`` images of each of their classes (``BatchSpec(views_per_class=k)``). With ``x_i`` the
L2-normalised embeddings and ``S_c`` the set of class ``c``'s embeddings in the batch::

    p_c      = normalize( mean_{j in S_c} x_j )                   fresh prototype of class c
    p_c^(-i) = normalize( mean_{j in S_c, j != i} x_j )           leave-one-out positive of sample i
    logits_i = s * [ margin(x_i . p_{y_i}^(-i)),  x_i . p_c (c != y_i in the batch),
                     x_i . M_r (memory rows r of classes not in the batch) ]
    L = mean_i CE(logits_i, y_i)

The positive is built without the embedding itself, so it is never trivially self-similar; memory rows
of the batch's classes are left out (those classes are represented by their fresh prototypes, and an old
prototype of one's own class must never be a negative). After the step the fresh prototypes (detached)
are written to memory (all ranks' in distributed runs, through :func:`methods.queues.gather_for_enqueue`):
a class already in memory has its prototype replaced in place (refresh, never a duplicate), a new class
takes an empty slot or else the slot of the prototype generated longest ago (ageing).

What the abstract confirms: a limited-size memory of recent class prototypes, prototypes generated on
the fly from the mini-batch's exemplar embeddings, used as classifier weights of a softmax loss,
"regularly refreshed, and oldest ones are dequeued", independent of dataset size, usable with various
losses and hard-example mining. The follow-up paper (Quality-Aware Prototype Memory, arXiv:2311.07734)
gives the averaged prototype ``normalize(mean x_j)``. Not confirmed (the paper body could not be read),
so our documented choices, each a parameter:

- ``views_per_class = 2``: images per class in a batch (the issue's default; two views also suit the
  shallow split).
- ``memory_size = 0``: derived as ``min(num_classes, 16384)``. The paper's memory size could not be
  checked; 16,384 is SST's prototype queue for MS1M-scale data. The capacity does not otherwise grow
  with the dataset; on small data the memory holds every class.
- ``loss = "cosface"``, ``s = 64``, ``m = 0.4``: a margin softmax on the positive (the abstract: "various
  loss functions"); the values are insightface's CosFace configuration, as FaceBench's ``cosface``.
  ``loss = "arcface"`` takes ``m`` in radians (``methods.margins.arc_margin``).
- ``batch_prototype_grad = True``: gradients flow through the current batch's prototypes (positive and
  batch negatives); memory rows are constants. ``False`` detaches the batch prototypes too.
- Ageing by generation time: a refreshed prototype is new again, so "oldest" means generated longest
  ago (the paper's concern is obsolescence). Refreshing in place without renewing the age would be the
  other reading.
- Hard-class mining (batches of classes whose memory prototypes are nearest neighbours) is provided as
  :meth:`PrototypeMemory.hard_class_neighbours`; composing batches from it needs a sampler that
  listens to the method, which the harness does not have yet, so it is not used by ``bench run``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import BatchSpec, LossOutput, Method, MethodContext, register_method
from methods.margins import arc_margin, cos_margin, replace_target, full_precision
from methods.params import require
from methods.queues import ClassMemory, StagedWrite, gather_for_enqueue
from methods.registry import ConfigError

#: Cap of the derived memory size (SST's prototype queue for MS1M-scale data; see the module docstring).
DEFAULT_MEMORY_CAP = 16384
LOSSES = ("cosface", "arcface")


@register_method("prototype_memory", aliases=("pm",))
class PrototypeMemory(Method):
    """Prototype Memory: in-batch prototypes, leave-one-out positives, refreshed FIFO-aged memory."""

    def __init__(self, backbone: nn.Module, ctx: MethodContext, *, views_per_class: int = 2, memory_size: int = 0,
                 loss: str = "cosface", s: float = 64.0, m: float = 0.4, batch_prototype_grad: bool = True) -> None:
        super().__init__(backbone, BatchSpec(views_per_class=views_per_class))
        self.num_classes, self.embedding_size = ctx.num_classes, ctx.embedding_size
        self.loss, self.s, self.m, self.batch_prototype_grad = loss, float(s), float(m), batch_prototype_grad
        self.dist = ctx.dist
        self.memory = ClassMemory(ctx.embedding_size, memory_size or min(ctx.num_classes, DEFAULT_MEMORY_CAP))
        self.staged = StagedWrite()

    @classmethod
    def check(cls, ctx: MethodContext, p: Mapping[str, Any]) -> None:
        owner = cls.owner()
        require(p["views_per_class"] >= 2,
                f"views_per_class must be >= 2 (leave-one-out positives), got {p['views_per_class']}", owner)
        require(p["memory_size"] >= 0, f"memory_size must be >= 0 (0 = derived), got {p['memory_size']}", owner)
        require(p["loss"] in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {p['loss']!r}", owner)
        require(p["s"] > 0, f"s must be > 0, got {p['s']}", owner)
        require(0.0 <= p["m"] < (math.pi if p["loss"] == "arcface" else 2.0),
                f"m must be in [0, pi) radians for arcface, [0, 2) for cosface; got {p['m']}", owner)

    def target_logit(self, cos_theta: torch.Tensor) -> torch.Tensor:
        if self.loss == "arcface":
            return arc_margin(cos_theta, self.m)
        return cos_margin(cos_theta, self.m)

    def prototypes(self, embeddings: torch.Tensor, labels: torch.Tensor):
        """``(classes [C], class_index [N], prototypes [C, D], leave_one_out [N, D])`` of normalised
        embeddings ``[N, D]`` (rows of one class anywhere in the batch)."""
        classes, class_index, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        if bool((counts < 2).any()):
            raise ValueError("Prototype Memory needs at least 2 images of every class in a batch "
                             "(leave-one-out positives)")
        source = embeddings if self.batch_prototype_grad else embeddings.detach()
        sums = source.new_zeros(classes.shape[0], source.shape[1]).index_add(0, class_index, source)
        prototypes = F.normalize(sums / counts.unsqueeze(1), dim=1)
        others = (sums[class_index] - source) / (counts[class_index] - 1).unsqueeze(1)
        return classes, class_index, prototypes, F.normalize(others, dim=1)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
        """``(scaled logits [N, C + memory], targets [N], classes [C], prototypes [C, D])``."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = F.normalize(full_precision(embeddings), dim=1)
            classes, targets, prototypes, leave_one_out = self.prototypes(x, labels)
            batch = (x @ prototypes.T).clamp(-1.0, 1.0)
            positive = (x * leave_one_out).sum(dim=1).clamp(-1.0, 1.0)
            batch = replace_target(batch, targets, self.target_logit(positive))
            # Memory rows of the batch's classes are stale duplicates of the fresh prototypes (and, for a
            # sample's own class, a false negative): leave them out.
            rows = self.memory.occupied() & ~torch.isin(self.memory.labels, classes)
            memory = (x @ self.memory.prototypes[rows].T).clamp(-1.0, 1.0)
            return self.s * torch.cat([batch, memory], dim=1), targets, classes, prototypes

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        logits, targets, classes, prototypes = self.logits(self.backbone(images), labels)
        if classes.shape[0] > self.memory.capacity:
            raise ConfigError(f"method '{self.name}': a batch of {classes.shape[0]} classes exceeds the memory "
                              f"size {self.memory.capacity}")
        loss = F.cross_entropy(logits, targets)
        self.staged.stage(*gather_for_enqueue(self.dist, prototypes, classes))
        return LossOutput(loss, {"memory_classes": self.memory.occupied().sum().float()})

    def on_step_end(self) -> None:
        self.staged.commit(self.memory.write)

    def hard_class_neighbours(self, labels: torch.Tensor, count: int) -> torch.Tensor:
        """For each class in ``labels``, the ``count`` classes with the nearest memory prototypes."""
        return self.memory.nearest_classes(labels, count)

