"""Prototype Memory (PM).

E. Smirnov, N. Garaev, V. Galyuk, E. Lukyanets, "Prototype Memory for Large-scale Face Representation
Learning", IEEE Access 10:12031-12046, 2022, arXiv:2105.02103. No public code; this is our
implementation. Of the paper, only the title page and abstract could be read (the stored copies of
ar5iv, arXiv and DOAJ stop there), so every detail below the abstract's level is our choice, made a
parameter and listed as unconfirmed at the end.

A limited-size memory of class prototypes (:class:`methods.queues.ClassMemory`) replaces the classifier.
Batches hold ``k`` images of each of their classes (``BatchSpec(views_per_class=k)``). With ``x_i`` the
L2-normalised embeddings and ``S_c`` the set of class ``c``'s embeddings in the batch::

    (1) p_c      = normalize( mean_{j in S_c} x_j )              fresh prototype of class c
    (2) p_c^(-i) = normalize( mean_{j in S_c, j != i} x_j )      leave-one-out prototype of sample i
    (3) q_i      = p_{y_i}^(-i)  if leave_one_out  else  p_{y_i}  the positive of sample i
    (4) logits_i = s * [ margin(x_i . q_i),  x_i . p_c (c != y_i in the batch),
                         x_i . M_r (memory rows r of classes not in the batch) ]
    (5) L = mean_i CE(logits_i, y_i)

Memory rows of the batch's classes are left out of (4): those classes are represented by their fresh
prototypes, and an old prototype of one's own class must never be a negative. After the step the fresh
prototypes (1), detached, are written to memory (all ranks' in distributed runs, through
:func:`methods.queues.gather_for_enqueue`): a class already in memory has its prototype replaced in place
(refresh, never a duplicate), a new class takes an empty slot or else the slot of the prototype generated
longest ago (ageing).

What the sources confirm:

- the abstract (ar5iv 2105.02103; DOAJ, IEEE Access 10:12031): a limited-size memory of recent class
  prototypes; new prototypes generated on the fly from the exemplar embeddings of the current mini-batch,
  enqueued and used as the classifier weights of a softmax loss; prototypes regularly refreshed, the
  oldest dequeued and disposed of; cost independent of the dataset size; usable with various loss
  functions and hard example mining algorithms;
- the follow-up paper (Quality-Aware Prototype Memory, arXiv:2311.07734, abstract): PM's prototype averages,
  with equal weights, all the images of the person present in the mini-batch; that is (1);
- the authors' batch-composition mining ("Doppelganger Mining for Face Representation Learning", ICCV
  Workshops 2017, abstract; "Hard Example Mining with Auxiliary Embeddings", CVPR Workshops 2018, abstract
  and introduction): for each identity, keep the identities most similar to it and sample similar-looking
  identities together into a mini-batch, at negligible extra cost; it works at the class level. Our
  mining (``hard_mining_neighbours``) does this with the memory's prototypes as the similarity.

Defaults and their sources:

- ``views_per_class = 2``: ours: the fewest images per class that give each sample a positive other than
  itself (also the shallow split's 2 images per identity).
- ``memory_size = 0``: derived as ``max(B, round(memory_fraction * num_classes))``, ``B = global batch size //
  views_per_class`` the classes per batch; a set ``memory_size`` overrides it and must hold at least ``B``
  classes (each step writes the prototypes of all of its classes). ``memory_fraction = 0.1``: ours. The
  paper's memory size could not be read; its point is a memory much smaller than the number of
  identities (abstract: limited size, independent of the dataset size). 0.1 is the class budget of
  FaceBench's other sampled-class methods (DCQ's ``queue_fraction``, its paper's "10% of classes"; Partial
  FC's ``sample_rate``), so they are compared at equal budgets. SynthFace's shallow split (1,000
  identities, batch 128 of 2 views): 100 slots for 64 classes per batch. The floor of one batch keeps tiny
  runs valid. A fraction grows with the dataset (200,000 rows at 2M classes): for a cost independent of
  the dataset's size, as the abstract has it, set ``memory_size``.
- ``loss = "cosface"``, ``s = 64``, ``m = 0.4``: ours: a margin softmax on the positive (the abstract:
  "various loss functions"); the values are insightface's CosFace configuration, as FaceBench's
  ``cosface``. ``loss = "arcface"`` takes ``m`` in radians (``methods.margins.arc_margin``).
- ``batch_prototype_grad = True``: ours: gradients flow through the current batch's prototypes (positive
  and batch negatives); memory rows are constants. ``False`` detaches the batch prototypes too.
- ``leave_one_out = True``: ours: the positive (3) is built without the sample, so it is never trivially
  self-similar. ``False``: the plain class prototype (1), the sample included (with ``k = 2`` its own
  embedding is half of it). Either way ``views_per_class >= 2``: with one image the plain prototype is the
  sample itself (positive cosine 1, no pull towards the class) and the leave-one-out one does not exist.
- ``hard_mining_neighbours = 0`` (off): ours. ``n >= 1`` asks the harness's sampler for
  ``BatchSpec(hard_class_neighbours=n)``: each anchor identity of a batch is followed by the ``n`` classes
  whose memory prototypes are nearest to its own (:meth:`PrototypeMemory.nearest_classes`: cosine over
  the occupied slots, the anchor's own excluded); ``n = 1`` gives the doppelganger pairs of the 2017
  paper. Off by default because the abstract names mining as something PM can be combined with, not as
  part of it: plain PM is the benchmark's entry, and the claim ``pm-mining`` compares the two.
- Ageing by generation time: ours: a refreshed prototype is new again, so "oldest" means generated
  longest ago (the abstract's concern is obsolescence). Refreshing in place without renewing the age
  would be the other reading.

Unconfirmed (the paper's body could not be read): the memory size (``memory_fraction``), the images per
class, the leave-one-out positive, the margin loss and its ``s``, ``m``, the gradient through the batch's
prototypes, leaving the batch classes' memory rows out, ageing by the last write, and the mining's
similarity (memory prototypes) and number of neighbours.
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

LOSSES = ("cosface", "arcface")


@register_method("prototype_memory", aliases=("pm",))
class PrototypeMemory(Method):
    """Prototype Memory: in-batch prototypes, leave-one-out positives, refreshed FIFO-aged memory."""

    #: No public code and the paper's body could not be read: these are ours (module docstring).
    unconfirmed_defaults = ("views_per_class", "memory_fraction", "loss", "s", "m", "batch_prototype_grad",
                            "leave_one_out", "hard_mining_neighbours")

    def __init__(self, backbone: nn.Module, ctx: MethodContext, *, views_per_class: int = 2, memory_size: int = 0,
                 memory_fraction: float = 0.1, loss: str = "cosface", s: float = 64.0, m: float = 0.4,
                 batch_prototype_grad: bool = True, leave_one_out: bool = True,
                 hard_mining_neighbours: int = 0) -> None:
        super().__init__(backbone, BatchSpec(views_per_class=views_per_class,
                                             hard_class_neighbours=hard_mining_neighbours))
        self.num_classes, self.embedding_size = ctx.num_classes, ctx.embedding_size
        self.loss, self.s, self.m, self.batch_prototype_grad = loss, float(s), float(m), batch_prototype_grad
        self.leave_one_out = leave_one_out
        self.dist = ctx.dist
        capacity = self.memory_capacity(ctx, {"views_per_class": views_per_class, "memory_size": memory_size,
                                              "memory_fraction": memory_fraction})
        self.memory = ClassMemory(ctx.embedding_size, capacity)
        self.staged = StagedWrite()

    @classmethod
    def check(cls, ctx: MethodContext, p: Mapping[str, Any]) -> None:
        owner = cls.owner()
        require(p["views_per_class"] >= 2,
                f"views_per_class must be >= 2 (a positive prototype from another image of the class), "
                f"got {p['views_per_class']}", owner)
        require(p["memory_size"] >= 0, f"memory_size must be >= 0 (0 = derived), got {p['memory_size']}", owner)
        require(0.0 < p["memory_fraction"] <= 1.0,
                f"memory_fraction must be in (0, 1], got {p['memory_fraction']}", owner)
        require(p["loss"] in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {p['loss']!r}", owner)
        require(p["s"] > 0, f"s must be > 0, got {p['s']}", owner)
        require(0.0 <= p["m"] < (math.pi if p["loss"] == "arcface" else 2.0),
                f"m must be in [0, pi) radians for arcface, [0, 2) for cosface; got {p['m']}", owner)
        per_batch = cls.classes_per_batch(ctx, p["views_per_class"])
        capacity = cls.memory_capacity(ctx, p)
        require(capacity >= per_batch,
                f"memory_size ({capacity}) must hold one batch of classes: global batch {ctx.global_batch_size} "
                f"// views_per_class {p['views_per_class']} = {per_batch}", owner)
        neighbours = p["hard_mining_neighbours"]
        require(0 <= neighbours < per_batch,
                f"hard_mining_neighbours must be in [0, {per_batch - 1}] (an anchor and its neighbours share a "
                f"batch of {per_batch} classes), got {neighbours}", owner)

    @staticmethod
    def classes_per_batch(ctx: MethodContext, views_per_class: int) -> int:
        """Classes in one global batch: ``global_batch_size // views_per_class`` (at least 1)."""
        return max(1, ctx.global_batch_size // views_per_class)

    @classmethod
    def memory_capacity(cls, ctx: MethodContext, p: Mapping[str, Any]) -> int:
        """The memory's slots for a run of shape ``ctx`` (module docstring): a set ``memory_size``, else
        ``memory_fraction`` of the classes (rounded), at least one batch of classes."""
        if p["memory_size"]:
            return p["memory_size"]
        return max(cls.classes_per_batch(ctx, p["views_per_class"]), round(p["memory_fraction"] * ctx.num_classes))

    def target_logit(self, cos_theta: torch.Tensor) -> torch.Tensor:
        if self.loss == "arcface":
            return arc_margin(cos_theta, self.m)
        return cos_margin(cos_theta, self.m)

    def prototypes(self, embeddings: torch.Tensor, labels: torch.Tensor):
        """``(classes [C], class_index [N], prototypes [C, D], positives [N, D])`` of normalised embeddings
        ``[N, D]`` (rows of one class anywhere in the batch): the class prototypes (1) and each sample's
        positive (3), its leave-one-out prototype (2) or its class prototype."""
        classes, class_index, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        source = embeddings if self.batch_prototype_grad else embeddings.detach()
        sums = source.new_zeros(classes.shape[0], source.shape[1]).index_add(0, class_index, source)
        prototypes = F.normalize(sums / counts.unsqueeze(1), dim=1)
        if not self.leave_one_out:
            return classes, class_index, prototypes, prototypes[class_index]
        if bool((counts < 2).any()):
            raise ValueError("Prototype Memory needs at least 2 images of every class in a batch "
                             "(leave-one-out positives)")
        others = (sums[class_index] - source) / (counts[class_index] - 1).unsqueeze(1)
        return classes, class_index, prototypes, F.normalize(others, dim=1)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
        """``(scaled logits [N, C + memory], targets [N], classes [C], prototypes [C, D])``."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = F.normalize(full_precision(embeddings), dim=1)
            classes, targets, prototypes, positives = self.prototypes(x, labels)
            batch = (x @ prototypes.T).clamp(-1.0, 1.0)
            positive = (x * positives).sum(dim=1).clamp(-1.0, 1.0)
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

    def nearest_classes(self, classes: torch.Tensor, count: int) -> torch.Tensor:
        """For each class id in ``classes`` ``[A]``, the ``count`` classes whose memory prototypes are nearest
        (cosine) to its own, nearest first ``[A, count]``; -1 where the class has no prototype in memory yet
        or fewer than ``count`` others are stored. A CPU int64 tensor whatever the memory's device (the
        harness's sampler composes batches on CPU); one ``[A, capacity]`` product."""
        return self.memory.nearest_classes(classes, count).to(device="cpu", dtype=torch.long)
