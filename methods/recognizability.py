"""Recognizability Index (RI): recognizability-aware embedding learning and face quality estimation.

J. C. L. Chai, T.-S. Ng, C.-Y. Low, J. Park, A. B. J. Teoh, "Recognizability Embedding Enhancement for
Very Low-Resolution Face Recognition and Quality Estimation", CVPR 2023, arXiv:2304.10066. It builds on the
"unrecognizable identity" (UI) cluster of S. Deng, Y. Xiong, M. Wang, W. Xia, S. Soatto, "Harnessing
Unrecognizable Faces for Improving Face Recognition", WACV 2023, arXiv:2106.04112: embeddings of
unrecognizable faces, whatever made them so (blur, low resolution, occlusion), gather in one cluster, and
the distance to its centre (their embedding recognizability score, ERS) measures recognizability.

**What could be confirmed, and what is ours.** The method sections of both papers could not be read from
this project's sources (only the abstracts, the introductions and secondary summaries were reachable; see
the README, "Recognizability Index"). The abstract of Chai et al. fixes the *structure*, which this module
follows:

(a) RI is computed from two criteria: (i) the proximity of an embedding to the UI cluster centre and (ii)
    its closeness to its positive and negative class prototypes;
(b) an *index diversion* loss pushes hard-to-recognize embeddings (low RI) away from the UI cluster;
(c) a *perceptibility attention* attends to the most recognizable face regions;
(d) the model is trained end to end and serves both recognition and quality estimation.

Every functional form below is therefore ours, written to satisfy (a)-(d), and no equation number of the
paper is cited because none could be checked. With ``z`` the L2-normalised embedding, ``w_j`` the
normalised prototype (class centre of the margin head) of class ``j``, ``y`` the label and ``u`` the unit
UI centre:

- ``P(z) = (1 - cos(z, u)) / 2`` in [0, 1] (criterion i; Deng et al.'s ERS is ``1 - cos(z, u)``);
- ``K(z) = sigmoid(kappa * (cos(z, w_y) - max_{j != y} cos(z, w_j)))`` in (0, 1) (criterion ii: positive
  prototype against the hardest negative one, the quantity CR-FIQA also uses);
- ``RI(z) = P(z) * K(z)`` (:func:`recognizability_index`);
- index diversion ``L_ID = mean_i (1 - RI_i) * max(0, cos(z_i, u) - delta)`` with ``RI_i`` held constant
  (:func:`index_diversion_loss`): the lower an embedding's RI, the harder it is pushed off the UI centre;
  embeddings already at angle ``>= arccos(delta)`` from it are left alone;
- the recognition loss is ArcFace's (the paper's margin head; ``s = 64``, ``m = 0.5``, see
  :mod:`methods.arcface`); the total is ``L_arc + lambda_ID * L_ID + lambda_Q * L_Q``;
- quality at inference, where no label exists: a regressor ``q(z)`` (two linear layers, sigmoid output)
  trained on ``z`` held constant with ``L_Q = smooth_l1(q(z), RI(z))`` (:class:`RIRegressor`); its output
  is the method's quality score (:meth:`RecognizabilityMethod.quality`);
- the UI centre ``u``: Deng et al. average the embeddings of unrecognizable faces. Here each step appends
  ``ui_images`` of the batch's images degraded to ``ui_resolution`` px (antialiased downsampling, then
  bilinear upsampling back to the input size) to the batch, embeds them in the same training-mode forward
  pass (so BatchNorm normalises both together; they are not in the margin loss), and ``u`` is the
  normalised mean of their unit embeddings (:meth:`RecognizabilityMethod.embed_with_ui_centre`). The
  diversion loss's gradient reaches ``u`` too, so it separates recognizable faces from the unrecognizable
  cluster rather than shifting every embedding (ours; a first version kept ``u`` as a moving average of an
  inference-mode pass without gradient, a target that moved with the embedding layer's shared bias);
- perceptibility attention: a CBAM-style spatial attention map (S. Woo et al., ECCV 2018: a ``7 x 7``
  convolution over the channel-wise mean and max of a feature map, then a sigmoid) applied residually,
  ``F * (1 + a)`` (F. Wang et al., "Residual Attention Network", CVPR 2017), to the backbone's last spatial
  feature map (:class:`PerceptibilityAttention`), installed as a forward hook on that layer so that the
  backbone evaluated by the harness includes it. (ours: with the plain ``F * a`` the map saturated at 0
  early in training together with the diversion loss, every feature died and the embeddings collapsed onto
  the embedding layer's bias; the residual form cannot switch the features off.)

All of ``kappa``, ``delta``, ``lambda_ID``, ``lambda_Q``, ``ui_resolution``, ``ui_images``, ``regressor_hidden``
and ``attention`` are listed in :attr:`RecognizabilityMethod.unconfirmed_defaults`.
The method runs in one process (the UI centre would differ between ranks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.arcface import ArcFace
from methods.base import LossOutput, Method, MethodContext, register_method
from methods.params import require
from methods.registry import ConfigError

#: Kernel of the spatial attention's convolution (CBAM, Woo et al. 2018, Sec. 3.2).
ATTENTION_KERNEL = 7


def recognizability_index(z: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, ui_centre: torch.Tensor,
                          kappa: float) -> torch.Tensor:
    """``RI = (1 - cos(z, u)) / 2 * sigmoid(kappa * (cos(z, w_y) - max_{j != y} cos(z, w_j)))`` per row (module
    docstring; ours). ``z`` ``[B, D]`` and ``prototypes`` ``[C, D]`` need not be normalised; ``u`` ``[D]``."""
    z = F.normalize(z, dim=1)
    cosines = z @ F.normalize(prototypes, dim=1).t()
    positive = cosines.gather(1, labels.view(-1, 1)).squeeze(1)
    hardest_negative = cosines.scatter(1, labels.view(-1, 1), float("-inf")).amax(dim=1)
    closeness = torch.sigmoid(kappa * (positive - hardest_negative))
    proximity = (1.0 - z @ F.normalize(ui_centre, dim=0)) / 2.0
    return proximity * closeness


def index_diversion_loss(z: torch.Tensor, ri: torch.Tensor, ui_centre: torch.Tensor, delta: float) -> torch.Tensor:
    """``mean_i (1 - RI_i) * max(0, cos(z_i, u) - delta)``, ``RI`` held constant (module docstring; ours)."""
    cos_ui = F.normalize(z, dim=1) @ F.normalize(ui_centre, dim=0)
    return ((1.0 - ri.detach()) * F.relu(cos_ui - delta)).mean()


def degrade_resolution(images: torch.Tensor, pixels: int) -> torch.Tensor:
    """``images`` ``[B, C, H, W]`` brought down to ``pixels`` on the long side with antialiasing, then back to
    ``H x W`` (bilinear): the detail of a ``pixels``-px face at the input size."""
    height, width = images.shape[-2:]
    scale = pixels / max(height, width)
    small = (max(1, round(height * scale)), max(1, round(width * scale)))
    down = F.interpolate(images, size=small, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(down, size=(height, width), mode="bilinear", align_corners=False)


class PerceptibilityAttention(nn.Module):
    """Residual spatial attention ``F * (1 + sigmoid(conv7x7([mean_c F; max_c F])))`` over a feature map
    ``[B, C, h, w]`` (CBAM's spatial map, applied as in the Residual Attention Network; ours, module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, ATTENTION_KERNEL, padding=ATTENTION_KERNEL // 2, bias=True)

    def attention_map(self, features: torch.Tensor) -> torch.Tensor:
        """The attention ``[B, 1, h, w]`` in (0, 1)."""
        pooled = torch.cat([features.mean(dim=1, keepdim=True), features.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features * (1.0 + self.attention_map(features))


def last_spatial_layer(backbone: nn.Module) -> nn.Module:
    """The backbone's module whose output is its last spatial feature map: the last residual stage of an
    IResNet (``stage_names``), the last of MobileFaceNet's ``layers``. A ConfigError for other backbones."""
    stages = getattr(backbone, "stage_names", None)
    if stages:
        return getattr(backbone, stages[-1])
    layers = getattr(backbone, "layers", None)
    if isinstance(layers, nn.Sequential) and len(layers):
        return layers[-1]
    raise ConfigError(f"method 'ri': perceptibility attention needs a backbone with a last spatial stage "
                      f"(IResNet stage_names or MobileFaceNet layers); {type(backbone).__name__} has neither "
                      f"(set method_params.ri.attention=false)")


class RIRegressor(nn.Module):
    """Quality regressor ``q(z) = sigmoid(W2 prelu(W1 z))`` on the normalised embedding (ours, module docstring)."""

    def __init__(self, embedding_size: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embedding_size, hidden), nn.PReLU(hidden), nn.Linear(hidden, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(F.normalize(embeddings, dim=1))).squeeze(1)


@register_method("ri", aliases=("recognizability",))
class RecognizabilityMethod(Method):
    """ArcFace with the recognizability index, index diversion, perceptibility attention and an RI regressor."""

    #: Every functional form and constant beyond ArcFace's is ours (module docstring).
    unconfirmed_defaults = ("kappa", "delta", "diversion_weight", "regressor_weight", "regressor_hidden",
                            "ui_resolution", "ui_images", "attention")

    def __init__(self, backbone: nn.Module, ctx: MethodContext, *, s: float = 64.0, m: float = 0.5,
                 kappa: float = 10.0, delta: float = 0.0, diversion_weight: float = 1.0,
                 regressor_weight: float = 1.0, regressor_hidden: int = 64, ui_resolution: int = 4,
                 ui_images: int = 16, attention: bool = True) -> None:
        super().__init__(backbone)
        # s, m: ArcFace's (methods.arcface); the rest: ours (module docstring).
        self.head = ArcFace(ctx.embedding_size, ctx.num_classes, s=s, m=m)
        self.kappa, self.delta = float(kappa), float(delta)
        self.diversion_weight, self.regressor_weight = float(diversion_weight), float(regressor_weight)
        self.ui_resolution, self.ui_images = int(ui_resolution), int(ui_images)
        self.regressor = RIRegressor(ctx.embedding_size, int(regressor_hidden))
        self.attention = PerceptibilityAttention() if attention else None
        # A stand-in backbone without parameters (nn.Identity: the harness's configuration check, and `bench
        # profile`, which times heads on embeddings) has no feature map to attend to.
        if self.attention is not None and any(True for _ in backbone.parameters()):
            # A forward hook, so that the backbone the harness evaluates (self.encoder()) includes it.
            last_spatial_layer(backbone).register_forward_hook(self._attend)

    def _attend(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return self.attention(output)

    @classmethod
    def check(cls, ctx: MethodContext, p: Mapping[str, Any]) -> None:
        owner = cls.owner()
        require(not ctx.dist.is_distributed, "runs in one process (each rank would keep its own UI centre)", owner)
        require(p["s"] > 0, f"s must be > 0, got {p['s']}", owner)
        require(p["kappa"] > 0, f"kappa must be > 0, got {p['kappa']}", owner)
        require(-1.0 <= p["delta"] < 1.0, f"delta must be a cosine in [-1, 1), got {p['delta']}", owner)
        require(p["diversion_weight"] >= 0, f"diversion_weight must be >= 0, got {p['diversion_weight']}", owner)
        require(p["regressor_weight"] > 0, f"regressor_weight must be > 0 (the quality regressor must learn), "
                                           f"got {p['regressor_weight']}", owner)
        require(p["regressor_hidden"] >= 1, f"regressor_hidden must be >= 1, got {p['regressor_hidden']}", owner)
        require(p["ui_resolution"] >= 1, f"ui_resolution must be >= 1 px, got {p['ui_resolution']}", owner)
        require(p["ui_images"] >= 1, f"ui_images must be >= 1, got {p['ui_images']}", owner)

    def embed_with_ui_centre(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``[B, D]`` of ``images`` and the UI centre ``u`` ``[D]``: the normalised mean unit embedding
        of the first ``ui_images`` of them degraded to ``ui_resolution`` px, from one forward pass of both
        (module docstring)."""
        degraded = degrade_resolution(images[:self.ui_images], self.ui_resolution)
        out = self.backbone(torch.cat([images, degraded]))
        embeddings, unrecognizable = out[:images.shape[0]], out[images.shape[0]:]
        return embeddings, F.normalize(F.normalize(unrecognizable.float(), dim=1).mean(dim=0), dim=0)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        embeddings, ui_centre = self.embed_with_ui_centre(images)
        margin_loss = self.head(embeddings, labels)
        ri = recognizability_index(embeddings.float(), self.head.weight, labels, ui_centre.detach(), self.kappa)
        diversion = index_diversion_loss(embeddings.float(), ri, ui_centre, self.delta)
        regression = F.smooth_l1_loss(self.regressor(embeddings.detach().float()), ri.detach())
        loss = margin_loss + self.diversion_weight * diversion + self.regressor_weight * regression
        return LossOutput(loss, {"arcface": margin_loss.detach(), "diversion": diversion.detach(),
                                 "regression": regression.detach(), "ri": ri.detach().mean()})

    @torch.no_grad()
    def quality(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted RI of encoder features ``[N, D]`` (higher = more recognizable)."""
        was_training = self.regressor.training
        self.regressor.eval()
        try:
            return self.regressor(features.float())
        finally:
            self.regressor.train(was_training)
