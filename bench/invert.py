"""``bench invert``: ArcFace's feature inversion, faces generated from embeddings with the BN prior.

Paper: Deng, Guo, Yang, Xue, Kotsia, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face
Recognition", TPAMI 2022 (the journal version, arXiv:1801.07698 v4). Its abstract: "without training any
additional generator or discriminator, the pre-trained ArcFace model can generate identity-preserved face
images for both subjects inside and outside the training data only by using the network gradient and Batch
Normalization (BN) priors". The BN prior is DeepInversion's feature-distribution regulariser (Yin et al.,
"Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020, arXiv:1912.08795):

    R_feature(x) = sum over BN layers l of ||mu_l(x) - running_mean_l||_2 + ||sigma^2_l(x) - running_var_l||_2

where mu_l(x) and sigma^2_l(x) are the per-channel mean and (biased) variance of layer l's input over the
generated batch (batch, height and width). The image x, in the model's normalised input space ([-1, 1], the
convention of :func:`bench.data.loader.normalise`), starts from noise and is optimised by Adam to minimise

    L(x) = L_id(v(x)) + bn_weight * R_feature(v(x)) + tv_weight * R_TV(x) [+ l2_weight * ||x||],

where v(x) is a random view of the batch drawn afresh at each step (shift, flip, zoom, rotation), and the
first BN layer's term of R_feature is weighted by ``first_bn_multiplier``; x is clamped to [-1, 1] after
each step. The model stays in ``eval`` mode throughout: its BN layers normalise with their running
statistics (which therefore never change), and forward hooks on every ``nn.BatchNorm2d`` read the batch
statistics of their inputs for R_feature. :class:`InversionSettings` holds every setting with its source.

What is confirmed and what is ours:
- Confirmed (ArcFace v4 abstract): a trained ArcFace model, its gradient and its BN statistics as the only
  priors; no generator, no discriminator. The ArcFace paper's own weights and schedule could not be read.
- Confirmed (DeepInversion, NVlabs/DeepInversion ``deepinversion.py``, ``imagenet_inversion.py``,
  ``utils/utils.py``, ``cifar10/``): R_feature's form above (L2 norms, not squared; biased variance;
  BatchNorm2d inputs) and its extra factor on the first BN layer (``first_bn_multiplier``, 10), R_TV's form
  (the sum of the L2 norms of the image differences in four directions), the L2 image prior, Adam on the
  input from Gaussian noise with betas (0.5, 0.9), the learning rate warmed up linearly for 100 steps and
  then cosine-decayed (``lr_cosine_policy``), a random shift (``torch.roll``) of up to 2 px at 32 px (its
  CIFAR-10 jitter) and a random horizontal flip per step, a clamp of the image to the valid range, the
  CIFAR-10 learning rate 0.05 and the ImageNet example's R_feature weight 0.01.
- Ours: the identity term L_id = mean over identities of 1 - cos(f(x_k), t_k) (ArcFace compares features by
  cosine; DeepInversion's is a classifier's cross-entropy), the random zoom (+-10 %) and rotation (+-10
  degrees) of the view (the "transformation robustness" of Olah et al., "Feature Visualization", Distill
  2017), the TV weight (0.01), the step count (1,000), the initial noise N(0, 0.5^2) clamped to [-1, 1],
  and TV computed on x rather than on its shifted view (no seam). The BatchNorm1d ``features`` layer of
  IResNet is not part of the prior (DeepInversion uses BatchNorm2d layers only).

How the settings were chosen (ours; 8 held-out identities, seed 0, rank-1 against 58 gallery identities,
"verifier" = the rank-1 under a second, independently trained model). On the ``small`` ArcFace model of the
default run (synth-lfw 93.1 %), the first version (300 steps, BN weight 0.001, TV 0.001, shift only, Adam
betas (0.9, 0.999), constant lr) reached cosine 0.96 and rank-1 1.0, but its images were coloured textures
with no face layout; DeepInversion's flips, betas and schedule with TV 0.01 and the zoom/rotation gave
face-shaped layouts (cosine 0.91, rank-1 1.0, verifier 0.875). On an IResNet-18 (synth-lfw 95.4 %), from
these defaults (cosine 0.83, rank-1 0.875, verifier 0.75): BN weight 0.03 lost identity (cosine 0.67,
rank-1 0.625), TV 0.03 blurred (rank-1 0.75), TV 0.003 kept more noise and lost the verifier (0.5), 2,000
steps or lr 0.1 changed little, and first-layer factor 1 instead of 10 looked alike. Tried and dropped on
the ``small`` model: a Fourier-space (1/f) parameterisation of the image (speckled results) and optimising
a 16 px image upsampled to 32 px (more blurred).

:func:`identity_rank1` scores the result: rank-1 identification of the generated images against a gallery
of real images (each identity's gallery features averaged and normalised, cosine similarity).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.checkpoint import PAYLOAD_KEYS, bare_state_dict, read_manifest
from bench.data.loader import normalise
from bench.errors import BenchError, DataError

@dataclass(frozen=True)
class InversionSettings:
    """The optimisation of :func:`invert`. Each default names its source; see the module docstring for how
    the ones marked "ours" were chosen."""

    #: Adam steps. Ours: DeepInversion runs 2,000 (its ``setting_id`` 1) on 224 px images; at 32 px the
    #: identity term converges within a few hundred and the priors keep shaping the image until ~1,000.
    steps: int = 1000
    #: Peak learning rate on the image in [-1, 1]: DeepInversion's CIFAR-10 "paper parameters" (di_lr 0.05).
    lr: float = 0.05
    #: Linear warm-up steps before the cosine decay: DeepInversion's ``lr_cosine_policy(lr, 100, iterations)``.
    warmup: int = 100
    #: Adam's betas: DeepInversion's ImageNet settings 0 and 1 (``betas=[0.5, 0.9]``).
    betas: tuple[float, float] = (0.5, 0.9)
    #: Weight of R_feature: DeepInversion's ImageNet README example (``--r_feature=0.01``).
    bn_weight: float = 0.01
    #: Extra factor on the first BatchNorm layer's term: DeepInversion's ``first_bn_multiplier`` default, 10.
    first_bn_multiplier: float = 10.0
    #: Weight of the TV-L2 prior. Ours (a sweep, module docstring): 10x DeepInversion's CIFAR-10 README value
    #: (di_var_scale 0.001), since at 32 px every pixel is a large part of a feature.
    tv_weight: float = 0.01
    #: Weight of DeepInversion's L2 prior on the image (mean over images of the L2 norm). DeepInversion's
    #: ImageNet default is 1e-5; ours 0, since the clamp to [-1, 1] already bounds the image.
    l2_weight: float = 0.0
    #: Random shift (torch.roll) by up to this many pixels per axis before each forward: DeepInversion's
    #: CIFAR-10 jitter (lim_0 = lim_1 = 2).
    jitter: int = 2
    #: Random horizontal flip of the view with probability 1/2: DeepInversion's ``--do_flip``.
    flip: bool = True
    #: Random zoom of the view by a factor in [1 - scale, 1 + scale]. Ours, after the "transformation
    #: robustness" of Olah, Mordvintsev and Schubert, "Feature Visualization", Distill 2017: an image whose
    #: identity survives small zooms and rotations cannot rely on single-pixel patterns.
    scale: float = 0.1
    #: Random rotation of the view by up to this many degrees (ours, same source as ``scale``).
    rotate_deg: float = 10.0

    def __post_init__(self) -> None:
        checks = {"steps": self.steps >= 0, "lr": self.lr > 0, "warmup": self.warmup >= 0,
                  "bn_weight": self.bn_weight >= 0, "first_bn_multiplier": self.first_bn_multiplier >= 0,
                  "tv_weight": self.tv_weight >= 0, "l2_weight": self.l2_weight >= 0, "jitter": self.jitter >= 0,
                  "scale": 0 <= self.scale < 1, "rotate_deg": 0 <= self.rotate_deg <= 180,
                  "betas": all(0 <= b < 1 for b in self.betas)}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"inversion setting {bad[0]} out of range: {getattr(self, bad[0])!r}")


#: Standard deviation of the initial Gaussian noise in [-1, 1] space, before clamping (ours).
INIT_NOISE_STD = 0.5

#: SynthFace evaluation-namespace identities used by ``bench invert`` (no generator uses [700,000, 1,000,000)).
INVERT_TARGET_OFFSET = 700_000
INVERT_DISTRACTOR_OFFSET = 710_000


def learning_rate(step: int, settings: InversionSettings) -> float:
    """DeepInversion's ``lr_cosine_policy``: ``lr (step + 1) / warmup`` for the first ``warmup`` steps, then
    ``lr (1 + cos(pi (step - warmup) / (steps - warmup))) / 2``."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    span = max(settings.steps - settings.warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - settings.warmup) / span)) * settings.lr


def zoom_rotate(images: Tensor, zoom: float, degrees: float) -> Tensor:
    """``images`` enlarged by ``zoom`` about the centre and rotated by ``degrees`` (counter-clockwise as
    displayed, row 0 at the top), bilinear, reflected at the border; ``zoom = 1, degrees = 0`` is the
    identity."""
    angle = math.radians(degrees)
    # affine_grid maps output to input coordinates (x right, y down, so a matrix that turns clockwise in
    # maths axes turns counter-clockwise on screen): output pixel p shows input pixel theta p, theta = R / zoom.
    theta = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0],
                          [math.sin(angle), math.cos(angle), 0.0]], dtype=images.dtype) / zoom
    grid = F.affine_grid(theta.to(images.device).expand(images.shape[0], 2, 3), list(images.shape),
                         align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_view(images: Tensor, settings: InversionSettings, generator: torch.Generator) -> Tensor:
    """The view of ``images`` the model sees at one step: one random roll (up to ``jitter`` px per axis), a
    horizontal flip with probability 1/2 (``flip``), then one zoom and rotation (``scale``, ``rotate_deg``;
    bilinear, reflected at the border), the same for the whole batch, drawn from ``generator``. With
    ``jitter = 0``, ``flip = False``, ``scale = 0`` and ``rotate_deg = 0`` it is ``images`` itself."""
    view = images
    if settings.jitter:
        dy, dx = (int(v) for v in torch.randint(-settings.jitter, settings.jitter + 1, (2,), generator=generator))
        view = torch.roll(view, shifts=(dy, dx), dims=(2, 3))
    if settings.flip and bool(torch.rand((), generator=generator) < 0.5):
        view = torch.flip(view, dims=(3,))
    if settings.scale or settings.rotate_deg:
        zoom = 1.0 + (float(torch.rand((), generator=generator)) * 2.0 - 1.0) * settings.scale
        degrees = (float(torch.rand((), generator=generator)) * 2.0 - 1.0) * settings.rotate_deg
        view = zoom_rotate(view, zoom, degrees)
    return view


class BatchNormStatistics:
    """Forward hooks on every ``nn.BatchNorm2d`` of ``model`` that collect, per forward, DeepInversion's
    term ``||mu(x) - running_mean||_2 + ||var(x) - running_var||_2`` of the layer's input batch.

    Use as a context manager around the forward: ``with BatchNormStatistics(model) as stats: model(x)``;
    then :meth:`loss` is the sum over the layers reached. Layers without running statistics are skipped."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)
                       and m.running_mean is not None and m.running_var is not None]
        self.terms: list[Tensor] = []
        self._handles: list[Any] = []

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
        x = inputs[0].float()
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self.terms.append(torch.linalg.vector_norm(mean - module.running_mean.float())
                          + torch.linalg.vector_norm(var - module.running_var.float()))

    def __enter__(self) -> BatchNormStatistics:
        self.terms = []
        self._handles = [layer.register_forward_hook(self._hook) for layer in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def loss(self, first_multiplier: float = 1.0) -> Tensor:
        """The sum of the collected terms, the first layer's (the first BatchNorm2d the forward reached)
        multiplied by ``first_multiplier`` (DeepInversion's ``first_bn_multiplier``); 0 when the forward
        reached no BatchNorm2d."""
        if not self.terms:
            return torch.zeros(())
        return self.terms[0] * first_multiplier + sum(self.terms[1:], torch.zeros(()))


def bn_statistics_loss(model: nn.Module, images: Tensor) -> Tensor:
    """R_feature of ``images`` (normalised, ``[B, 3, S, S]``) under ``model``: one forward with the hooks of
    :class:`BatchNormStatistics`. Differentiable in ``images``; the model's running statistics are read,
    never updated (call it on a model in ``eval`` mode)."""
    with BatchNormStatistics(model) as stats:
        model(images)
    return stats.loss()


def identity_loss(embeddings: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of ``1 - cos(embeddings[k], targets[k])`` (ArcFace features are compared by cosine)."""
    return (1.0 - F.cosine_similarity(embeddings.float(), targets.float(), dim=1)).mean()


def total_variation(images: Tensor) -> Tensor:
    """DeepInversion's TV-L2 prior: the sum of the L2 norms of the differences between neighbouring pixels in
    four directions (horizontal, vertical, and both diagonals), over the whole batch."""
    horizontal = images[:, :, :, :-1] - images[:, :, :, 1:]
    vertical = images[:, :, :-1, :] - images[:, :, 1:, :]
    diagonal = images[:, :, 1:, :-1] - images[:, :, :-1, 1:]
    anti_diagonal = images[:, :, :-1, :-1] - images[:, :, 1:, 1:]
    return sum(torch.linalg.vector_norm(d) for d in (horizontal, vertical, diagonal, anti_diagonal))


def to_uint8(images: Tensor) -> Tensor:
    """Normalised images in [-1, 1] -> uint8 [0, 255] (the inverse of :func:`bench.data.loader.normalise`)."""
    return ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def embed(model: nn.Module, images_uint8: Tensor, device: torch.device | str = "cpu",
          batch_size: int = 256) -> Tensor:
    """Unit embeddings ``[N, D]`` (float32, CPU) of uint8 images ``[N, 3, S, S]`` under ``model`` (eval mode)."""
    model.eval()
    out = [F.normalize(model(normalise(images_uint8[i:i + batch_size].to(device))).float(), dim=1).cpu()
           for i in range(0, images_uint8.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


def invert(model: nn.Module, targets: Tensor, image_size: int,
           settings: InversionSettings = InversionSettings(), seed: int = 0,
           device: torch.device | str = "cpu") -> Tensor:
    """Images whose embeddings match ``targets`` (``[K, D]``, unit rows): uint8 ``[K, 3, S, S]``.

    One batch of ``K`` images, initialised from seeded Gaussian noise, optimised jointly (the BN prior is a
    statistic of the batch) by Adam (``settings.betas``, learning rate :func:`learning_rate` at each step)
    for ``settings.steps`` steps on

        L_id(view) + bn_weight * R_feature(view) + tv_weight * R_TV(x) + l2_weight * mean_k ||x_k||_2,

    where ``view`` is :func:`random_view` of the batch (drawn from the same seeded generator) and
    R_feature weighs the first BatchNorm layer by ``first_bn_multiplier``; the images are clamped to
    [-1, 1] after each step. The model is put in ``eval`` mode and its parameters are not changed (their
    ``requires_grad`` flags are restored). Deterministic for a seed on the CPU.
    """
    device = torch.device(device)
    model.eval()
    targets = F.normalize(targets.detach().float(), dim=1).to(device)
    generator = torch.Generator().manual_seed(int(seed))
    start = torch.randn(targets.shape[0], 3, image_size, image_size, generator=generator) * INIT_NOISE_STD
    x = start.clamp(-1.0, 1.0).to(device).requires_grad_(True)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam([x], lr=settings.lr, betas=settings.betas, eps=1e-8)
    try:
        with BatchNormStatistics(model) as stats:
            for step in range(settings.steps):
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, settings)
                optimizer.zero_grad(set_to_none=True)
                stats.terms = []
                loss = identity_loss(model(random_view(x, settings, generator)), targets)
                if settings.bn_weight:
                    loss = loss + settings.bn_weight * stats.loss(settings.first_bn_multiplier).to(device)
                if settings.tv_weight:
                    loss = loss + settings.tv_weight * total_variation(x)
                if settings.l2_weight:
                    loss = loss + settings.l2_weight * torch.linalg.vector_norm(x.flatten(1), dim=1).mean()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    x.clamp_(-1.0, 1.0)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return to_uint8(x).cpu()


def identity_rank1(model: nn.Module, generated_images: Tensor, gallery_images: Tensor, gallery_labels: Tensor,
                   target_labels: Tensor, device: torch.device | str = "cpu") -> float:
    """Rank-1 identification rate of ``generated_images`` (uint8 ``[K, 3, S, S]``, whose true identities are
    ``target_labels``) against a gallery of real images (uint8, ``gallery_labels``): each gallery identity is
    the normalised mean of its images' unit embeddings, and a probe is right when its most cosine-similar
    gallery identity is its own."""
    gallery = embed(model, gallery_images, device)
    labels = torch.as_tensor(gallery_labels).long()
    identities = torch.unique(labels)
    centres = torch.stack([gallery[labels == i].mean(dim=0) for i in identities])
    centres = F.normalize(centres, dim=1)
    probes = embed(model, generated_images, device)
    predicted = identities[(probes @ centres.T).argmax(dim=1)]
    return float((predicted == torch.as_tensor(target_labels).long()).float().mean())


# ------------------------------------------------------------------------------------------------------
# Loading a trained backbone and SynthFace targets (what ``bench invert`` runs on)
# ------------------------------------------------------------------------------------------------------


@dataclass
class LoadedBackbone:
    model: nn.Module
    backbone: str
    embedding_size: int
    input_size: int
    #: The checkpoint file read (for the record).
    source: Path
    #: The training step of a FaceBench checkpoint (None for a bare state dict).
    step: int | None = None


def newest_checkpoint_file(run_dir: Path) -> tuple[Path, int]:
    """The rank-0 file of the newest complete checkpoint of a run directory, and its step (the backbone is
    replicated on every rank). One-line BenchError when the directory holds none."""
    manifest = read_manifest(Path(run_dir) / "checkpoints")
    if manifest is None:
        raise BenchError(f"{run_dir}: the run has no checkpoint (no checkpoints/checkpoint.json)")
    return Path(run_dir) / "checkpoints" / manifest["files"][0], int(manifest["step"])


def backbone_state(payload: dict[str, Any], path: Path) -> dict[str, Tensor]:
    """The backbone's state dict inside a FaceBench checkpoint payload: the method's ``backbone.*`` entries,
    prefix (and any ``module.`` prefix) removed."""
    method_state = payload.get("method")
    if not isinstance(method_state, dict):
        raise DataError(f"{path}: a FaceBench checkpoint without a method state")
    state = {}
    for key, value in method_state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.startswith("backbone."):
            state[key[len("backbone."):]] = value
    if not state:
        raise DataError(f"{path}: the checkpoint's method state holds no 'backbone.*' entries")
    return state


def _read_weights(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of ``path``; a missing or unreadable file is one DataError line."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a directory, not a checkpoint file (give a run directory with --run)") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = " ".join(str(exc).split()).split(". ")[0][:160]
        raise DataError(f"{path}: not a weights-only torch checkpoint ({first})") from None


def load_backbone(checkpoint: Path, backbone: str, embedding_size: int, input_size: int) -> LoadedBackbone:
    """A backbone with the weights of ``checkpoint``: a FaceBench checkpoint file (the method state's
    ``backbone.*`` entries) or a bare backbone state dict (optionally nested under ``state_dict``,
    ``backbone`` or ``model``, keys optionally prefixed ``module.``, as ``bench eval`` reads them).
    Weights-only loading and ``strict`` matching: a file that does not fit is one DataError line."""
    from bench.backbones import build_backbone

    checkpoint = Path(checkpoint)
    payload = _read_weights(checkpoint)
    step = None
    if isinstance(payload, dict) and all(key in payload for key in PAYLOAD_KEYS):
        state, step = backbone_state(payload, checkpoint), int(payload["step"])
    else:
        state = bare_state_dict(payload, checkpoint)
    model = build_backbone(backbone, embedding_size=embedding_size, input_size=input_size)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line), lines[-1] if lines else repr(exc))
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        raise DataError(f"{checkpoint}: does not match backbone '{backbone}' (embedding {embedding_size}, "
                        f"input {input_size}): {detail}") from None
    return LoadedBackbone(model.eval(), backbone, embedding_size, input_size, checkpoint, step)


@dataclass
class SynthTargets:
    """Real SynthFace images for an inversion: per target identity, ``M`` images whose mean embedding is the
    target and a gallery of other images (plus distractor identities) for :func:`identity_rank1`."""

    identities: Tensor        # [K] SynthFace identity ids (evaluation namespace)
    target_images: Tensor     # [K, M, 3, S, S] uint8
    gallery_images: Tensor    # [G, 3, S, S] uint8
    gallery_labels: Tensor    # [G] identity ids


def render_synth_targets(synthface_settings: Any, image_size: int, identities: int, images_per_target: int = 5,
                         gallery_per_identity: int = 5, distractors: int = 50) -> SynthTargets:
    """Render held-out SynthFace identities of the evaluation namespace (ids from
    :data:`INVERT_TARGET_OFFSET`; distractors from :data:`INVERT_DISTRACTOR_OFFSET`): samples
    ``[0, M)`` of each target identity make its target, samples ``[M, M + G)`` its gallery images, and every
    distractor identity has ``G`` gallery images."""
    from bench.data.synth_trainset import EVAL_NAMESPACE, synthface_config
    from bench.data.synthface import SynthFace

    synth = SynthFace(replace(synthface_config(synthface_settings), image_size=image_size))
    ids = torch.arange(identities) + INVERT_TARGET_OFFSET
    m, g = images_per_target, gallery_per_identity
    target_ids = ids.repeat_interleave(m)
    target_samples = torch.arange(m).repeat(identities)
    targets = synth.render_many(target_ids, target_samples, EVAL_NAMESPACE, progress=False).images
    distractor_ids = torch.arange(distractors) + INVERT_DISTRACTOR_OFFSET
    gallery_ids = torch.cat([ids.repeat_interleave(g), distractor_ids.repeat_interleave(g)])
    gallery_samples = torch.cat([torch.arange(m, m + g).repeat(identities), torch.arange(g).repeat(distractors)])
    gallery = synth.render_many(gallery_ids, gallery_samples, EVAL_NAMESPACE, progress=False).images
    return SynthTargets(ids, targets.reshape(identities, m, *targets.shape[1:]), gallery, gallery_ids)


def target_embeddings(model: nn.Module, target_images: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """Per identity, the normalised mean of the unit embeddings of its ``M`` images: ``[K, D]``."""
    k, m = target_images.shape[:2]
    features = embed(model, target_images.reshape(k * m, *target_images.shape[2:]), device)
    return F.normalize(features.reshape(k, m, -1).mean(dim=1), dim=1)


def save_grid(real: Tensor, generated: Tensor, path: Path, display_size: int = 112, pairs_per_row: int = 4) -> None:
    """A PNG grid with, for each identity, a real image beside its generated one; images smaller than
    ``display_size`` are enlarged by an integer factor with nearest-neighbour sampling."""
    from torchvision.utils import save_image

    factor = max(1, math.ceil(display_size / real.shape[-1]))
    pairs = torch.stack([real, generated], dim=1).reshape(-1, *real.shape[1:]).float().div(255.0)
    if factor > 1:
        pairs = F.interpolate(pairs, scale_factor=factor, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(pairs, path, nrow=2 * min(pairs_per_row, real.shape[0]), padding=2, pad_value=1.0)


def _model_record(loaded: LoadedBackbone) -> dict[str, Any]:
    return {"checkpoint": str(loaded.source), "step": loaded.step, "backbone": loaded.backbone,
            "embedding_size": loaded.embedding_size, "input_size": loaded.input_size}


def run_inversion(loaded: LoadedBackbone, synthface_settings: Any, identities: int, settings: InversionSettings,
                  seed: int, device: torch.device, images_per_target: int = 5, gallery_per_identity: int = 5,
                  distractors: int = 50, verifier: LoadedBackbone | None = None
                  ) -> tuple[dict[str, Any], Tensor, Tensor]:
    """Render the targets, invert them and score the result: (the JSON record, real images ``[K, 3, S, S]``
    (each identity's first target image), generated images ``[K, 3, S, S]``).

    The generated images are scored by rank-1 against real gallery images under the model that generated
    them and, when ``verifier`` is given, under that second, independently trained model (DeepInversion's
    "verifier" check): the optimisation targets the first model's embedding directly, so only the second
    tells identity the images carry from patterns that fool one network. Both come with two references: one
    real held-out image per identity (one of its target images) and the initial noise (steps = 0)."""
    if verifier is not None and verifier.input_size != loaded.input_size:
        raise BenchError(f"{verifier.source}: the verifier takes {verifier.input_size} px images, the inverted "
                         f"model {loaded.input_size} px")
    started = time.perf_counter()
    model = loaded.model.to(device).eval()
    synth = render_synth_targets(synthface_settings, loaded.input_size, identities, images_per_target,
                                 gallery_per_identity, distractors)
    rendered = time.perf_counter()
    targets = target_embeddings(model, synth.target_images, device)
    generated = invert(model, targets, loaded.input_size, settings, seed=seed, device=device)
    inverted = time.perf_counter()
    cosines = (embed(model, generated, device) * targets).sum(dim=1)
    real = synth.target_images[:, 0]
    real_cosines = (embed(model, real, device) * targets).sum(dim=1)
    noise = invert(model, targets, loaded.input_size, replace(settings, steps=0), seed=seed, device=device)

    def rank1(scorer: nn.Module, images: Tensor) -> float:
        return identity_rank1(scorer, images, synth.gallery_images, synth.gallery_labels, synth.identities, device)

    record: dict[str, Any] = {
        "identity_rank1": rank1(model, generated),
        "cosine_to_target": [round(float(c), 6) for c in cosines],
        "mean_cosine_to_target": float(cosines.mean()),
        "reference": {
            "real_image_rank1": rank1(model, real),
            "real_image_mean_cosine_to_target": float(real_cosines.mean()),
            "noise_rank1": rank1(model, noise),
            "chance_rank1": 1.0 / (identities + distractors),
        },
    }
    if verifier is not None:
        checker = verifier.model.to(device).eval()
        record["verifier"] = {"identity_rank1": rank1(checker, generated), "real_image_rank1": rank1(checker, real),
                              "noise_rank1": rank1(checker, noise), "model": _model_record(verifier)}
    record.update({
        "identities": [int(i) for i in synth.identities],
        "gallery": {"images_per_identity": gallery_per_identity, "distractor_identities": distractors,
                    "target_images_per_identity": images_per_target, "namespace": "synthface evaluation"},
        "steps": settings.steps, "settings": {**asdict(settings), "betas": list(settings.betas)},
        "seed": seed, "device": str(device),
        "model": _model_record(loaded),
        "time_s": {"render": rendered - started, "invert": inverted - rendered,
                   "total": time.perf_counter() - started},
    })
    return record, real, generated
