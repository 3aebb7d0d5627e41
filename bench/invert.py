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

    L(x) = L_id(x) + bn_weight * R_feature(x) + tv_weight * R_TV(x),

clamped to [-1, 1] after each step. The model stays in ``eval`` mode throughout: its BN layers normalise with
their running statistics (which therefore never change), and forward hooks on every ``nn.BatchNorm2d`` read
the batch statistics of their inputs for R_feature.

What is confirmed and what is ours:
- Confirmed (ArcFace v4 abstract): a trained ArcFace model, its gradient and its BN statistics as the only
  priors; no generator, no discriminator.
- Confirmed (DeepInversion, NVlabs/DeepInversion): R_feature's form above (L2 norms, not squared; biased
  variance; BatchNorm2d inputs), R_TV's form (the sum of the L2 norms of the image differences in four
  directions: horizontal, vertical and both diagonals), Adam on the input from Gaussian noise, a random
  shift (jitter, ``torch.roll``) of up to 2 px per step at 32 px (:data:`DEFAULT_JITTER`), its CIFAR-10 (32 px)
  "paper parameters" learning rate 0.05 (:data:`DEFAULT_LR`) and its README's TV weight 1e-3 for "better
  reconstructed images" (:data:`DEFAULT_TV_WEIGHT`; the paper setting is 2.5e-5). It runs 2,000 iterations
  on batches of 256; a few hundred steps on one image per identity are ours.
- Ours: the identity term L_id = mean over identities of 1 - cos(f(x_k), t_k) (ArcFace compares features by
  cosine; the ArcFace paper's own identity term for subjects outside the training data is not quoted here),
  the BN weight :data:`DEFAULT_BN_WEIGHT` (DeepInversion's CIFAR value, 10, goes with a classifier's
  cross-entropy), the initial noise N(0, 0.5^2) clamped to [-1, 1], and
  :data:`DEFAULT_STEPS`. The BatchNorm1d ``features`` layer of IResNet is not part of the prior (DeepInversion
  uses BatchNorm2d layers only).

How the BN weight was chosen (ours): on an ArcFace ``small`` model trained on SynthFace for 40,000 samples
(32 px), 8 held-out identities, 300 steps. With 0.001 (TV 1e-3, jitter 2) R_feature and R_TV of the 8
generated images end near those of a batch of 8 real held-out faces (224 vs 387, 90 vs 111), the cosine to
the targets is 0.97 and rank-1 0.75; with 0.01 (TV 2.5e-5, no jitter) cosine 0.86 and rank-1 0.25; with 0.1
or more the prior wins (cosine <= 0.42, rank-1 0). At that scale the generated images match their targets
but are coloured textures, not recognisable faces.

:func:`identity_rank1` scores the result: rank-1 identification of the generated images against a gallery
of real images (each identity's gallery features averaged and normalised, cosine similarity).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.checkpoint import PAYLOAD_KEYS, bare_state_dict, read_manifest
from bench.data.loader import normalise
from bench.errors import BenchError, DataError

#: Adam's learning rate on the image in [-1, 1]: DeepInversion's CIFAR-10 "paper parameters" (di_lr 0.05).
DEFAULT_LR = 0.05
#: Weight of R_feature. Ours (see the module docstring): DeepInversion's CIFAR-10 weight is 10 next to a
#: cross-entropy; next to a cosine distance in [0, 2] that weight drowns the identity term.
DEFAULT_BN_WEIGHT = 0.001
#: Weight of the TV-L2 prior: DeepInversion's CIFAR-10 README setting for "better reconstructed images"
#: (di_var_scale 0.001; its paper setting is 2.5e-5).
DEFAULT_TV_WEIGHT = 1e-3
#: Random shift (torch.roll) of the image by up to this many pixels per axis before each forward:
#: DeepInversion's CIFAR-10 jitter (lim_0 = lim_1 = 2).
DEFAULT_JITTER = 2
#: Optimisation steps (ours: DeepInversion runs 2,000; a few hundred suffice at 32 px for one image per id).
DEFAULT_STEPS = 300
#: Standard deviation of the initial Gaussian noise in [-1, 1] space, before clamping (ours).
INIT_NOISE_STD = 0.5

#: SynthFace evaluation-namespace identities used by ``bench invert`` (no generator uses [700,000, 1,000,000)).
INVERT_TARGET_OFFSET = 700_000
INVERT_DISTRACTOR_OFFSET = 710_000


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

    def loss(self) -> Tensor:
        """The sum of the collected terms (0 when the forward reached no BatchNorm2d)."""
        if not self.terms:
            return torch.zeros(())
        return torch.stack(self.terms).sum()


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


def invert(model: nn.Module, targets: Tensor, image_size: int, steps: int = DEFAULT_STEPS,
           lr: float = DEFAULT_LR, bn_weight: float = DEFAULT_BN_WEIGHT, tv_weight: float = DEFAULT_TV_WEIGHT,
           seed: int = 0, device: torch.device | str = "cpu", jitter: int = DEFAULT_JITTER) -> Tensor:
    """Images whose embeddings match ``targets`` (``[K, D]``, unit rows): uint8 ``[K, 3, S, S]``.

    One batch of ``K`` images, initialised from seeded Gaussian noise, optimised jointly (the BN prior is a
    statistic of the batch) by Adam for ``steps`` steps on ``L_id + bn_weight * R_feature + tv_weight * R_TV``
    (module docstring), each step on the batch rolled by a random shift of up to ``jitter`` pixels (the same
    seeded generator), clamped to [-1, 1] after each step. The model is put in ``eval`` mode and its
    parameters are not changed (their ``requires_grad`` flags are restored). Deterministic for a seed on
    the CPU.
    """
    if steps < 0 or jitter < 0:
        raise ValueError(f"steps and jitter must be >= 0, got {steps} and {jitter}")
    device = torch.device(device)
    model.eval()
    targets = F.normalize(targets.detach().float(), dim=1).to(device)
    generator = torch.Generator().manual_seed(int(seed))
    start = torch.randn(targets.shape[0], 3, image_size, image_size, generator=generator) * INIT_NOISE_STD
    x = start.clamp(-1.0, 1.0).to(device).requires_grad_(True)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam([x], lr=lr)
    try:
        with BatchNormStatistics(model) as stats:
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                stats.terms = []
                view = x
                if jitter:
                    dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=generator))
                    view = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
                loss = identity_loss(model(view), targets)
                if bn_weight:
                    loss = loss + bn_weight * stats.loss().to(device)
                if tv_weight:
                    loss = loss + tv_weight * total_variation(x)
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


def run_inversion(loaded: LoadedBackbone, synthface_settings: Any, identities: int, steps: int, seed: int,
                  device: torch.device, lr: float = DEFAULT_LR, bn_weight: float = DEFAULT_BN_WEIGHT,
                  tv_weight: float = DEFAULT_TV_WEIGHT, jitter: int = DEFAULT_JITTER, images_per_target: int = 5,
                  gallery_per_identity: int = 5, distractors: int = 50) -> tuple[dict[str, Any], Tensor, Tensor]:
    """Render the targets, invert them and score the result: (the JSON record, real images ``[K, 3, S, S]``
    (each identity's first target image), generated images ``[K, 3, S, S]``)."""
    started = time.perf_counter()
    model = loaded.model.to(device).eval()
    synth = render_synth_targets(synthface_settings, loaded.input_size, identities, images_per_target,
                                 gallery_per_identity, distractors)
    rendered = time.perf_counter()
    targets = target_embeddings(model, synth.target_images, device)
    generated = invert(model, targets, loaded.input_size, steps=steps, lr=lr, bn_weight=bn_weight,
                       tv_weight=tv_weight, seed=seed, device=device, jitter=jitter)
    inverted = time.perf_counter()
    cosines = (embed(model, generated, device) * targets).sum(dim=1)
    real = synth.target_images[:, 0]
    # References: the same scoring of one real held-out image per identity (one of its target images), and of
    # the initial noise (steps = 0).
    real_cosines = (embed(model, real, device) * targets).sum(dim=1)
    noise = invert(model, targets, loaded.input_size, steps=0, seed=seed, device=device)
    record = {
        "identity_rank1": identity_rank1(model, generated, synth.gallery_images, synth.gallery_labels,
                                         synth.identities, device),
        "cosine_to_target": [round(float(c), 6) for c in cosines],
        "mean_cosine_to_target": float(cosines.mean()),
        "reference": {
            "real_image_rank1": identity_rank1(model, real, synth.gallery_images, synth.gallery_labels,
                                               synth.identities, device),
            "real_image_mean_cosine_to_target": float(real_cosines.mean()),
            "noise_rank1": identity_rank1(model, noise, synth.gallery_images, synth.gallery_labels,
                                          synth.identities, device),
            "chance_rank1": 1.0 / (identities + distractors),
        },
        "identities": [int(i) for i in synth.identities],
        "gallery": {"images_per_identity": gallery_per_identity, "distractor_identities": distractors,
                    "target_images_per_identity": images_per_target, "namespace": "synthface evaluation"},
        "steps": steps, "lr": lr, "weights": {"identity": 1.0, "bn": bn_weight, "tv": tv_weight},
        "jitter": jitter,
        "seed": seed, "device": str(device),
        "model": {"checkpoint": str(loaded.source), "step": loaded.step, "backbone": loaded.backbone,
                  "embedding_size": loaded.embedding_size, "input_size": loaded.input_size},
        "time_s": {"render": rendered - started, "invert": inverted - rendered,
                   "total": time.perf_counter() - started},
    }
    return record, real, generated
