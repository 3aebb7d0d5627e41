"""Methods ``infonce`` and ``barlow`` (methods/ssl.py) and their augmentation (methods/augment.py): the two losses
against closed forms on hand-built embeddings and against plainer loop computations, the augmentation's
identity, reproducibility and ranges, and the methods' indifference to labels and exact resumption."""

from __future__ import annotations

import math

import pytest
import torch

from methods.augment import AugmentationStrength, apply_augmentation, augment, crop_theta
from methods.base import MethodContext, build_method
from methods.distributed import DistContext
from methods.registry import ConfigError
from methods.ssl import barlow_twins_loss, cross_correlation, info_nce_loss
from tests.method_helpers import BATCH, EMBEDDING, IMAGE, assert_state_dict_resumes_identically, build_tiny, \
    view_batch

#: A small projector, so the tests stay fast and the harness's SGD at lr 0.1 stays finite.
SMALL = {"hidden_size": 32, "projection_size": 16}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# InfoNCE (NT-Xent)
# ----------------------------------------------------------------------------------------------------

def nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR's Eq. 1 with loops: the 2N views v_0..v_{2N-1} (view 1 of image i is v_i, view 2 is v_{N+i});
    for each anchor a, -log(exp(s(a, pos(a)) / t) / sum_{k != a} exp(s(a, k) / t)) with s the cosine; the mean."""
    views = [row / row.norm() for row in torch.cat([z1, z2]).double()]
    n = z1.shape[0]
    total = 0.0
    for a in range(2 * n):
        positive = (a + n) % (2 * n)
        cos = [float(views[a] @ views[k]) for k in range(2 * n)]
        denominator = sum(math.exp(cos[k] / t) for k in range(2 * n) if k != a)
        total += -math.log(math.exp(cos[positive] / t) / denominator)
    return total / (2 * n)


def test_info_nce_two_orthogonal_images_with_identical_views():
    # Two images, unit embeddings e1 and e2, both views equal. Every anchor has its copy at cosine 1 and the
    # two views of the other image at cosine 0: l = -log(e^{1/t} / (e^{1/t} + e^0 + e^0)) = log(1 + 2 e^{-1/t}).
    z = torch.eye(2, dtype=torch.float64)
    for t in (0.1, 0.5, 1.0):
        expected = math.log(1.0 + 2.0 * math.exp(-1.0 / t))
        assert info_nce_loss(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-12)
        assert nt_xent_by_hand(z, z, t) == pytest.approx(expected, rel=1e-12)


def test_info_nce_aligned_views_and_orthogonal_negatives():
    # N images with orthonormal embeddings (rows of a random orthogonal matrix), views perfectly aligned (the
    # second view scaled: the loss uses directions): each anchor has 2N - 2 negatives at cosine 0, so
    # l = log(1 + (2N - 2) e^{-1/t}); the loss falls towards 0 as t shrinks.
    n, t = 5, 0.5
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=generator(0)))
    z1 = q[:n]
    assert info_nce_loss(z1, 3.0 * z1, t).item() == pytest.approx(math.log(1 + (2 * n - 2) * math.exp(-1 / t)),
                                                                  rel=1e-12)
    assert info_nce_loss(z1, z1, 0.05).item() < 1e-6


def test_info_nce_matches_the_loop_and_is_symmetric_in_the_views():
    z1 = torch.randn(6, 4, dtype=torch.float64, generator=generator(1))
    z2 = torch.randn(6, 4, dtype=torch.float64, generator=generator(2))
    loss = info_nce_loss(z1, z2, 0.5).item()
    assert loss == pytest.approx(nt_xent_by_hand(z1, z2, 0.5), rel=1e-12)
    assert info_nce_loss(z2, z1, 0.5).item() == pytest.approx(loss, rel=1e-12)
    # the same images in another order: the same loss (each image's positive follows it)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    assert info_nce_loss(z1[order], z2[order], 0.5).item() == pytest.approx(loss, rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# Barlow Twins
# ----------------------------------------------------------------------------------------------------

#: Three columns over a batch of 4: mean 0, biased variance 1, pairwise orthogonal.
A = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
B = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
D = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)


def test_barlow_twins_is_zero_for_identical_standardised_decorrelated_views():
    z = torch.stack([A, B, D], dim=1)
    assert barlow_twins_loss(z, z.clone(), 5e-3, eps=0.0).item() == 0.0
    # standardisation over the batch: any per-dimension scale and shift gives the same C = I
    shifted = z * torch.tensor([2.0, 0.5, 7.0], dtype=torch.float64) + torch.tensor([3.0, -1.0, 0.0],
                                                                                   dtype=torch.float64)
    assert barlow_twins_loss(shifted, z, 5e-3, eps=0.0).item() == pytest.approx(0.0, abs=1e-24)


def test_barlow_twins_known_off_diagonal_correlation():
    # Both views [a, c a + sqrt(1 - c^2) b]: standardised columns with correlation c, so C = [[1, c], [c, 1]]
    # and the loss is 0 (diagonal) + lambd * (c^2 + c^2).
    c, lambd = 0.6, 5e-3
    z = torch.stack([A, c * A + math.sqrt(1 - c * c) * B], dim=1)
    assert torch.allclose(cross_correlation(z, z, eps=0.0), torch.tensor([[1.0, c], [c, 1.0]], dtype=torch.float64))
    assert barlow_twins_loss(z, z, lambd, eps=0.0).item() == pytest.approx(lambd * 2 * c * c, rel=1e-12)


def test_barlow_twins_with_on_and_off_diagonal_terms():
    # View 1 [a, b]; view 2 [(a + b) / sqrt 2 standardised, (b + d) / sqrt 2 standardised] = [u, s] with
    # u = [r, 0, 0, -r], s = [r, -r, 0, 0], r = sqrt 2. C_ij = mean_b z1_bi z2_bj:
    # C_11 = mean(a u) = r/2, C_12 = mean(a s) = 0, C_21 = mean(b u) = r/2, C_22 = mean(b s) = r/2.
    r, lambd = math.sqrt(2.0), 0.1
    z1 = torch.stack([A, B], dim=1)
    z2 = torch.stack([A + B, B + D], dim=1)                      # standardised inside the loss
    expected_c = torch.tensor([[r / 2, 0.0], [r / 2, r / 2]], dtype=torch.float64)
    assert torch.allclose(cross_correlation(z1, z2, eps=0.0), expected_c, atol=1e-15)
    expected = 2 * (1 - r / 2) ** 2 + lambd * (r / 2) ** 2
    assert barlow_twins_loss(z1, z2, lambd, eps=0.0).item() == pytest.approx(expected, rel=1e-12)


def test_barlow_twins_standardises_as_the_official_batchnorm():
    """The official code: C = BatchNorm1d(affine=False)(z1)^T BatchNorm1d(affine=False)(z2) / N in training
    mode, i.e. the biased batch variance with eps = 1e-5; on-diagonal (C_ii - 1)^2 plus lambd times the
    squared off-diagonal entries. Checked with loops over a BatchNorm layer, and against the unbiased variance."""
    z1 = torch.randn(10, 5, dtype=torch.float64, generator=generator(3))
    z2 = torch.randn(10, 5, dtype=torch.float64, generator=generator(4)) * 3 + 1
    bn = torch.nn.BatchNorm1d(5, affine=False).double().train()
    c = bn(z1).t() @ bn(z2) / 10
    expected = sum((1 - c[i, i].item()) ** 2 for i in range(5)) + 5e-3 * sum(
        c[i, j].item() ** 2 for i in range(5) for j in range(5) if i != j)
    assert barlow_twins_loss(z1, z2, 5e-3).item() == pytest.approx(expected, rel=1e-10)
    unbiased = ((z1 - z1.mean(0)) / z1.std(0)).t() @ ((z2 - z2.mean(0)) / z2.std(0)) / 10
    assert not torch.allclose(cross_correlation(z1, z2), unbiased, rtol=1e-3)


def test_barlow_twins_is_symmetric_in_the_views():
    z1 = torch.randn(8, 4, dtype=torch.float64, generator=generator(5))
    z2 = torch.randn(8, 4, dtype=torch.float64, generator=generator(6))
    assert barlow_twins_loss(z1, z2, 5e-3).item() == pytest.approx(barlow_twins_loss(z2, z1, 5e-3).item(), rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------------

def images(count: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=generator(seed)) * 2 - 1


def test_strength_zero_returns_the_images_unchanged():
    x = images()
    assert torch.equal(augment(x, 0.0, generator(0)), x)
    assert torch.equal(apply_augmentation(x, AugmentationStrength()), x)


def test_the_same_seed_gives_the_same_views_and_images_get_their_own_parameters():
    x = images()
    first = augment(x, 1.0, generator(7))
    assert torch.equal(first, augment(x, 1.0, generator(7)))
    assert not torch.equal(first, augment(x, 1.0, generator(8)))
    # one generator, two calls: two different views (SimCLR's two draws of t ~ T)
    g = generator(7)
    assert not torch.equal(augment(x, 1.0, g), augment(x, 1.0, g))
    # the same image six times: six different views
    same = x[:1].expand(6, -1, -1, -1).contiguous()
    views = augment(same, 1.0, generator(9))
    assert all(not torch.equal(views[0], views[i]) for i in range(1, 6))


def test_flip_only_flips():
    x = images()
    assert torch.equal(apply_augmentation(x, AugmentationStrength(flip_p=1.0), generator(0)), x.flip(-1))
    half = apply_augmentation(x, AugmentationStrength(flip_p=0.5), generator(1))
    assert all(torch.equal(half[i], x[i]) or torch.equal(half[i], x[i].flip(-1)) for i in range(6))


def test_crops_stay_inside_the_image_and_outputs_stay_in_range():
    u = torch.rand(2000, 4, dtype=torch.float64, generator=generator(2))
    amounts = AugmentationStrength.scaled(1.0)
    theta = crop_theta(u, amounts)
    width, height, cx, cy = theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2]
    assert torch.all(cx.abs() + width <= 1 + 1e-12) and torch.all(cy.abs() + height <= 1 + 1e-12)
    assert width.min() < 0.6 and (width / height).max() > 1.2          # the ranges are used
    # a side cut to the image loses at most a factor sqrt(4/3) of the drawn area
    assert torch.all(width * height >= amounts.min_area / math.sqrt(4 / 3) - 1e-12)
    x = images(count=32)
    out = augment(x, 1.0, generator(3))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert out.min() >= -1 - 1e-5 and out.max() <= 1 + 1e-5


def test_crop_only_of_a_constant_image_and_blur_only_keep_it_constant():
    x = torch.full((3, 3, 16, 16), 0.25)
    crop = AugmentationStrength(min_area=0.2, max_log_aspect=0.3)
    assert torch.allclose(apply_augmentation(x, crop, generator(0)), x, atol=1e-6)
    blur = AugmentationStrength(blur_p=1.0, max_sigma=1.5)
    assert torch.allclose(apply_augmentation(x, blur, generator(0)), x, atol=1e-6)
    impulse = torch.zeros(8, 3, 16, 16)
    impulse[..., 8, 8] = 1.0
    blurred = apply_augmentation(impulse, blur, generator(0))
    # each image its own sigma in (0, 0.75] px at 16 px: some peaks spread, none loses mass away from the border
    assert blurred[..., 8, 8].min() < 0.5 and blurred[..., 8, 8].max() <= 1.0
    assert blurred.sum(dim=(1, 2, 3)).tolist() == pytest.approx([3.0] * 8, rel=1e-5)


def test_grayscale_only_gives_equal_channels_and_jitter_changes_colours():
    x = images()
    gray = apply_augmentation(x, AugmentationStrength(grayscale_p=1.0), generator(0))
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    jitter = AugmentationStrength(jitter_p=1.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    jittered = apply_augmentation(x, jitter, generator(0))
    assert not torch.allclose(jittered, x, atol=1e-3) and jittered.abs().max() <= 1 + 1e-5


def test_strength_out_of_range_is_refused():
    with pytest.raises(ValueError, match="strength"):
        augment(images(), 1.5)


# ----------------------------------------------------------------------------------------------------
# The methods
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["infonce", "barlow"])
def test_labels_do_not_change_the_loss(name, one_thread):
    method = build_tiny(name, SMALL)
    x, labels = view_batch([0, 1, 2, 3], seed=1)
    first = method(x, labels).loss
    second = method(x, torch.randint(0, 12, labels.shape, generator=generator(0))).loss
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", ["infonce", "barlow"])
def test_views_depend_on_the_step_only(name, one_thread):
    method = build_tiny(name, SMALL)
    x, _ = view_batch([0, 1, 2, 3], seed=1)
    v1, v2 = method.make_views(x)
    assert not torch.equal(v1, v2)
    again = method.make_views(x)
    assert torch.equal(again[0], v1) and torch.equal(again[1], v2)
    method.on_step_end()
    assert int(method.steps) == 1 and not torch.equal(method.make_views(x)[0], v1)


def test_the_forward_is_the_loss_of_the_projected_views(one_thread):
    method = build_tiny("infonce", {**SMALL, "temperature": 0.2})
    reference = build_tiny("infonce", {**SMALL, "temperature": 0.2}, seed=5)
    reference.load_state_dict(method.state_dict())
    x, labels = view_batch([0, 1, 2, 3], seed=2)
    v1, v2 = reference.make_views(x)
    z = reference.projector(reference.backbone(torch.cat([v1, v2])))      # one forward of both views
    assert torch.allclose(method(x, labels).loss, info_nce_loss(z[:8], z[8:], 0.2), atol=1e-6)
    barlow = build_tiny("barlow", SMALL)
    twin = build_tiny("barlow", SMALL, seed=5)
    twin.load_state_dict(barlow.state_dict())
    v1, v2 = twin.make_views(x)
    expected = barlow_twins_loss(twin.projector(twin.backbone(v1)), twin.projector(twin.backbone(v2)), 5e-3)
    assert torch.allclose(barlow(x, labels).loss, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["infonce", "barlow"])
def test_state_dict_resumes_identically(name, one_thread):
    batches = [view_batch([0, 1, 2, 3], seed=seed) for seed in range(5)]
    assert_state_dict_resumes_identically(lambda seed: build_tiny(name, SMALL, seed=seed), batches)


@pytest.mark.parametrize("name", ["infonce", "barlow"])
def test_a_checkpoint_of_another_projector_size_is_refused(name, one_thread):
    saved = build_tiny(name, {"hidden_size": 8, "projection_size": 8}).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_tiny(name, {"hidden_size": 8, "projection_size": 4}).load_state_dict(saved)


@pytest.mark.parametrize("name, cfg, message", [
    ("infonce", {"temperature": 0.0}, "temperature must be > 0"),
    ("infonce", {"strength": 1.5}, r"strength must be in \[0, 1\]"),
    ("barlow", {"lambd": -1.0}, "lambd must be >= 0"),
    ("barlow", {"projection_size": 0}, "projection_size must be >= 1"),
])
def test_bad_parameters_are_one_line_config_errors(name, cfg, message):
    with pytest.raises(ConfigError, match=f"method '{name}': {message}"):
        build_tiny(name, cfg)


@pytest.mark.parametrize("name", ["infonce", "barlow_twins"])
def test_distributed_runs_are_refused_and_the_encoder_is_the_backbone(name, one_thread):
    from bench.backbones import build_backbone

    backbone = build_backbone("small", embedding_size=EMBEDDING, input_size=IMAGE)
    with pytest.raises(ConfigError, match="runs in one process"):
        build_method(name, backbone, MethodContext(12, EMBEDDING, BATCH, dist=DistContext(rank=0, world_size=2)))
    method = build_tiny(name, SMALL)
    assert method.encoder() is method.backbone and method.encoder_names == ("backbone",)
