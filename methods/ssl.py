"""Contrastive self-supervised learning: InfoNCE (SimCLR's NT-Xent) and the cross-correlation loss (Barlow Twins).

W. Huang, M. Yi, X. Zhao, Z. Jiang, "Towards the Generalization of Contrastive Self-Supervised Learning",
ICLR 2023, arXiv:2111.00743: the downstream error of a contrastively learned encoder is bounded through
three factors, the alignment of positive samples, the divergence of class centres, and the concentration of
the augmented data; InfoNCE and the cross-correlation loss provably achieve the first two, and downstream
accuracy follows the concentration that the augmentation gives (their experiments train SimCLR and Barlow
Twins under augmentations of varying strength). This module trains the two losses on a face backbone
from two random views of every image (:func:`methods.augment.augment`, one ``strength`` knob for the whole
pipeline, so the third factor can be varied). **Labels are ignored**: both methods are self-supervised.

**InfoNCE** (method ``infonce``), in SimCLR's form, NT-Xent (T. Chen, S. Kornblith, M. Norouzi, G. Hinton,
"A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020, arXiv:2002.05709, Sec.
2.1, Eq. 1 and Algorithm 1). The ``2N`` projections ``z`` of the two views of ``N`` images, with
``sim(u, v) = u.v / (|u| |v|)`` and ``k(a)`` the other view of anchor ``a``'s image::

    l(a) = -log( exp(sim(z_a, z_k(a)) / t) / sum_{b != a} exp(sim(z_a, z_b) / t) ),  L = mean over the 2N anchors

(the ``2(N - 1)`` other views of the batch are the negatives; :func:`info_nce_loss`). Temperature ``t = 0.5``:
SimCLR's CIFAR-10 setting (its CIFAR-10 experiments, Appendix B.9, and the CIFAR-10 command of the authors'
repository; 0.1 is its ImageNet setting), the small-image setting closest to 32 px faces; Huang et al. train
SimCLR on CIFAR-10. (The appendix text itself could not be read from this project's sources; the value is
the one the SimCLR authors' CIFAR-10 configuration uses.) Projection head ``g(h) = W2 relu(W1 h)`` (SimCLR Sec.
2.1: one hidden layer), output 128-d (SimCLR's); hidden width 256 is ours (SimCLR: 2048, the width of its
ResNet-50 representation; scaled down for a 128-d face embedding). Both views pass the backbone in one
forward (SimCLR's code concatenates the views along the batch, so BatchNorm normalises them together).

**Barlow Twins** (method ``barlow``): J. Zbontar, L. Jing, I. Misra, Y. LeCun, S. Deny, "Barlow Twins:
Self-Supervised Learning via Redundancy Reduction", ICML 2021, arXiv:2103.03230, Eq. 1-2::

    L = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2,
    C_ij = (1 / N) sum_b zhat1_bi zhat2_bj,

with ``zhat`` each view's projections standardised per dimension over the batch. The official code
standardises with ``BatchNorm1d(affine=False)`` in training mode: the *biased* batch variance (divided by
``N``) and ``eps = 1e-5`` inside the square root; :func:`barlow_twins_loss` does the same (``eps`` a keyword,
for the closed-form tests). ``lambda = 5e-3`` (the paper, Sec. 2 and its ImageNet setting). Projector: three
linear layers without bias, BatchNorm and ReLU after the first two (the paper's ``8192-8192-8192``); widths
512-512-512 are ours, scaled down from the paper's 8192 for a 128-d embedding (lambda was tuned for 8192
dimensions and is kept, not re-tuned). The two views pass the backbone in two forwards (the official code
embeds ``y1`` and ``y2`` separately).

**Views and resumption.** Each forward draws the two views from a CPU generator seeded by
``derived_seed(rng_seed, steps)`` (:func:`methods.momentum.derived_seed`): ``rng_seed`` is drawn from torch's
global generator when the method is built, ``steps`` counts optimizer steps (:meth:`on_step_end`); both are
buffers, so a checkpoint resumes with the same views. Augmentation ``strength = 0.5`` is ours (it gives
SimCLR's CIFAR-10 colour distortion, s = 0.5, which Huang et al.'s code uses: [0.4, 0.4, 0.4, 0.1]).

**Evaluation** uses the backbone (the default encoder): SSL papers evaluate the representation before the
projector (SimCLR Sec. 4.2: the layer before the projection head is the better representation; Barlow
Twins evaluates the ResNet-50 output, not the projector's). The methods run in one process (the losses would need the
embeddings, or ``C``, gathered over ranks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.augment import augment
from methods.base import LossOutput, Method, MethodContext, register_method
from methods.momentum import derived_seed
from methods.params import require

#: BatchNorm1d's default eps, which the official Barlow Twins code standardises with.
BATCHNORM_EPS = 1e-5


def info_nce_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of two views ``[N, D]`` (row ``i`` of ``z1`` and of ``z2``: the same image), the mean over the
    ``2N`` anchors of ``-log(exp(sim_pos / t) / sum_{b != anchor} exp(sim_b / t))`` (module docstring)."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.t()) / temperature
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, positives)


def standardise(z: torch.Tensor, eps: float = BATCHNORM_EPS) -> torch.Tensor:
    """Each column of ``z`` ``[N, D]`` centred and divided by ``sqrt(biased batch variance + eps)``
    (``BatchNorm1d(affine=False)`` in training mode)."""
    centred = z - z.mean(dim=0, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(dim=0, keepdim=True) + eps)


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, eps: float = BATCHNORM_EPS) -> torch.Tensor:
    """Barlow Twins' ``C`` ``[D, D]``: ``standardise(z1)^T standardise(z2) / N``."""
    return standardise(z1, eps).t() @ standardise(z2, eps) / z1.shape[0]


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float, eps: float = BATCHNORM_EPS) -> torch.Tensor:
    """``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2`` of two views ``[N, D]`` (module docstring)."""
    c = cross_correlation(z1, z2, eps)
    diagonal = torch.diagonal(c)
    invariance = (1.0 - diagonal).pow(2).sum()
    redundancy = c.pow(2).sum() - diagonal.pow(2).sum()
    return invariance + lambd * redundancy


class TwoViewMethod(Method):
    """A backbone, a projector and a loss over the projections of two random views of each image; labels
    are ignored. Subclasses build the projector and define :meth:`view_loss`."""

    #: Whether both views pass the backbone in one forward (BatchNorm over both) or in one forward each.
    joint_forward = True

    def __init__(self, backbone: nn.Module, ctx: MethodContext, projector: nn.Module, strength: float) -> None:
        super().__init__(backbone)
        self.projector = projector
        self.strength = float(strength)
        # Seeds the views; buffers, so that a resumed run draws the same views (module docstring).
        self.register_buffer("rng_seed", torch.randint(0, 2**62, ()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @classmethod
    def check_common(cls, ctx: MethodContext, p: Mapping[str, Any]) -> None:
        owner = cls.owner()
        require(not ctx.dist.is_distributed, "runs in one process (the loss would need the embeddings of every "
                                             "rank gathered)", owner)
        require(ctx.local_batch_size >= 2, f"needs batches of at least 2 images, got {ctx.local_batch_size}", owner)
        require(0.0 <= p["strength"] <= 1.0, f"strength must be in [0, 1], got {p['strength']}", owner)
        require(p["hidden_size"] >= 1, f"hidden_size must be >= 1, got {p['hidden_size']}", owner)
        require(p["projection_size"] >= 1, f"projection_size must be >= 1, got {p['projection_size']}", owner)

    def view_generator(self) -> torch.Generator:
        """The generator of this step's views: a function of ``rng_seed`` and ``steps`` only."""
        return torch.Generator().manual_seed(derived_seed(int(self.rng_seed), int(self.steps)))

    def make_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's two random views of ``images`` (the same on every call until :meth:`on_step_end`)."""
        generator = self.view_generator()
        first = augment(images, self.strength, generator)
        return first, augment(images, self.strength, generator)

    def project(self, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projections of the two views ``[N, P]`` each."""
        if self.joint_forward:
            return self.projector(self.backbone(torch.cat([first, second]))).chunk(2)
        return self.projector(self.backbone(first)), self.projector(self.backbone(second))

    def view_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        del labels  # self-supervised: the loss never sees the labels
        z1, z2 = self.project(*self.make_views(images))
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z1, z2 = z1.float(), z2.float()
            loss = self.view_loss(z1, z2)
            alignment = F.cosine_similarity(z1.detach(), z2.detach(), dim=1).mean()
        return LossOutput(loss, {self.name: loss.detach(), "alignment": alignment})

    def on_step_end(self) -> None:
        self.steps += 1


@register_method("infonce")
class InfoNCE(TwoViewMethod):
    """SimCLR's NT-Xent over two augmented views of each image, on a projection head (module docstring)."""

    #: The hidden width and the augmentation strength are ours (module docstring).
    unconfirmed_defaults = ("strength", "hidden_size")

    def __init__(self, backbone: nn.Module, ctx: MethodContext, *, temperature: float = 0.5, strength: float = 0.5,
                 hidden_size: int = 256, projection_size: int = 128) -> None:
        # temperature: SimCLR Appendix B.9 (CIFAR-10); projection_size: SimCLR's 128; the rest: ours.
        projector = nn.Sequential(nn.Linear(ctx.embedding_size, hidden_size), nn.ReLU(inplace=True),
                                  nn.Linear(hidden_size, projection_size))
        super().__init__(backbone, ctx, projector, strength)
        self.temperature = float(temperature)

    @classmethod
    def check(cls, ctx: MethodContext, p: Mapping[str, Any]) -> None:
        cls.check_common(ctx, p)
        require(p["temperature"] > 0, f"temperature must be > 0, got {p['temperature']}", cls.owner())

    def view_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return info_nce_loss(z1, z2, self.temperature)


@register_method("barlow", aliases=("barlow_twins",))
class BarlowTwins(TwoViewMethod):
    """Barlow Twins' cross-correlation loss over two augmented views of each image (module docstring)."""

    #: The projector's widths and the augmentation strength are ours (module docstring).
    unconfirmed_defaults = ("strength", "hidden_size", "projection_size")
    joint_forward = False

    def __init__(self, backbone: nn.Module, ctx: MethodContext, *, lambd: float = 5e-3, strength: float = 0.5,
                 hidden_size: int = 512, projection_size: int = 512) -> None:
        # lambd: Barlow Twins Sec. 2; the projector's widths (paper: 8192) and strength: ours.
        projector = nn.Sequential(
            nn.Linear(ctx.embedding_size, hidden_size, bias=False), nn.BatchNorm1d(hidden_size), nn.ReLU(inplace=True),
            nn.Linear(hidden_size, hidden_size, bias=False), nn.BatchNorm1d(hidden_size), nn.ReLU(inplace=True),
            nn.Linear(hidden_size, projection_size, bias=False))
        super().__init__(backbone, ctx, projector, strength)
        self.lambd = float(lambd)

    @classmethod
    def check(cls, ctx: MethodContext, p: Mapping[str, Any]) -> None:
        cls.check_common(ctx, p)
        require(p["lambd"] >= 0, f"lambd must be >= 0, got {p['lambd']}", cls.owner())

    def view_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return barlow_twins_loss(z1, z2, self.lambd)
