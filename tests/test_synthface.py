"""SynthFace: determinism, shapes, landmark geometry, twins, config validation and chunked rendering.

Geometry is checked against independent references: an SVD-based Umeyama fit in numpy for the alignment,
a plain rotation for roll, and the rendered pixels themselves (where a recoloured iris or lip shows up)
for the landmarks under full nuisance.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from bench.data.synthface import (
    ARCFACE_TEMPLATE_112,
    FACIAL_HAIR_TYPES,
    HAIR_STYLES,
    MAX_MARKS,
    TWIN_PERTURBATION,
    Nuisance,
    Rendered,
    SynthFace,
    SynthFaceConfig,
    canonical_landmarks,
    hash32,
)
from methods.registry import ConfigError

@pytest.fixture(autouse=True)
def _one_thread():
    """Render single-threaded: results do not depend on threads (checked by
    ``test_thread_count_does_not_change_pixels``), and on a loaded 2-core machine every two-thread op
    waits for the busy core, which made this file take minutes instead of seconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


CATEGORICAL = ("hair_style", "facial_hair_type", "mark_count", *(f"mark{k}_kind" for k in range(MAX_MARKS)))


def column(name: str) -> int:
    return SynthFace.PARAM_NAMES.index(name)


def continuous_columns() -> list[int]:
    return [i for i, name in enumerate(SynthFace.PARAM_NAMES) if name not in CATEGORICAL]


def umeyama_numpy(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Similarity (2 x 3) mapping src [K, 2] onto dst [K, 2]: Umeyama (1991) with an SVD, as in
    skimage / insightface, written independently of the renderer's complex-number closed form."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(sigma) @ sign) / (s ** 2).sum(1).mean()
    return np.hstack([scale * rotation, (mu_d - scale * rotation @ mu_s)[:, None]])


def clean(n: int) -> Nuisance:
    return Nuisance.neutral(n)


# ---------------------------------------------------------------------------------------------- hash


def test_hash32_matches_reference_lowbias32() -> None:
    """The split-multiply int64 implementation equals plain Python lowbias32 arithmetic."""

    def reference(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF]
    assert hash32(torch.tensor(values)).tolist() == [reference(v) for v in values]


# ------------------------------------------------------------------------------------- determinism


_FRESH_PROCESS_RENDER = """
import hashlib, sys, torch
from bench.data.synthface import SynthFace, SynthFaceConfig
torch.set_num_threads(2)
ids, samples = torch.arange(16).flip(0), (torch.arange(16) % 5).flip(0)  # another order, another batch
rendered = SynthFace(SynthFaceConfig(seed=3, image_size=32, nuisance=1.5)).render(ids, samples)
for k in range(15, -1, -1):  # back in the parent's order
    print(hashlib.sha256(rendered.images[k].numpy().tobytes() + rendered.landmarks[k].numpy().tobytes()).hexdigest())
"""


def test_a_fresh_process_renders_the_same_bytes() -> None:
    """Determinism across processes: a new interpreter (its own hash seed, thread pool, allocator and no
    cached state), rendering the same images in reverse order and two threads, gives the same bytes.

    Catches pixels that depend on anything but (seed, identity, sample, namespace): global torch or
    Python RNG state, ``hash()`` of strings, caches filled by an earlier call, batch position or threads.
    """
    import hashlib
    import os
    import subprocess
    import sys

    torch.manual_seed(12345)  # a global RNG state the child does not share: must not matter
    rendered = SynthFace(SynthFaceConfig(seed=3, image_size=32, nuisance=1.5)).render(torch.arange(16),
                                                                                     torch.arange(16) % 5)
    here = [hashlib.sha256(rendered.images[k].numpy().tobytes() + rendered.landmarks[k].numpy().tobytes()).hexdigest()
            for k in range(16)]
    child = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_RENDER], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONHASHSEED": "random"}, check=True)
    assert child.stdout.split() == here


@pytest.mark.parametrize("size, nuisance", [(32, 1.0), (48, 1.5), (17, 1.0)])
def test_batch_invariance_is_bitwise(size: int, nuisance: float) -> None:
    """An image does not depend on its batch: rendering 96 together equals rendering in other chunks
    and each alone, bit for bit (all layers occur: glasses, masks, marks, blur, noise, JPEG)."""
    synth = SynthFace(SynthFaceConfig(seed=1, image_size=size, nuisance=nuisance, twin_fraction=0.3))
    ids = torch.arange(96) * 7 % 53
    samples = torch.arange(96) % 9
    whole = synth.render(ids, samples)
    for chunk in (1, 5, 31):
        parts = [synth.render(ids[i:i + chunk], samples[i:i + chunk]) for i in range(0, 96, chunk)]
        assert torch.equal(torch.cat([p.images for p in parts]), whole.images), f"chunk {chunk}"
        assert torch.equal(torch.cat([p.landmarks for p in parts]), whole.landmarks), f"chunk {chunk}"
    # Reversed order: the position inside the batch does not matter either.
    reverse = synth.render(ids.flip(0), samples.flip(0))
    assert torch.equal(reverse.images.flip(0), whole.images)


def test_thread_count_does_not_change_pixels() -> None:
    synth = SynthFace(SynthFaceConfig(seed=4, image_size=32, nuisance=1.5))
    ids, samples = torch.arange(256) % 41, torch.arange(256) % 5
    single = synth.render(ids, samples)
    torch.set_num_threads(2)
    double = synth.render(ids, samples)
    assert torch.equal(single.images, double.images) and torch.equal(single.landmarks, double.landmarks)


def test_seed_namespace_identity_and_sample_change_the_output() -> None:
    config = SynthFaceConfig(seed=0, image_size=32)
    base = SynthFace(config).render(torch.tensor([4]), torch.tensor([2])).images
    others = [
        SynthFace(replace(config, seed=1)).render(torch.tensor([4]), torch.tensor([2])).images,
        SynthFace(config).render(torch.tensor([4]), torch.tensor([2]), namespace=1).images,
        SynthFace(config).render(torch.tensor([5]), torch.tensor([2])).images,
        SynthFace(config).render(torch.tensor([4]), torch.tensor([3])).images,
    ]
    for other in others:
        assert (other.int() - base.int()).abs().float().mean() > 1.0


def test_namespaces_are_unrelated_people() -> None:
    synth = SynthFace(SynthFaceConfig())
    ids = torch.arange(200)
    train, held_out = synth.identity_params(ids, 0), synth.identity_params(ids, 1)
    cont = continuous_columns()
    # Independent uniforms differ by 1/3 on average; the same person would differ by 0.
    assert (train[:, cont] - held_out[:, cont]).abs().mean() > 0.25


def test_clean_images_are_the_same_for_every_sample() -> None:
    synth = SynthFace(SynthFaceConfig(image_size=32, nuisance=0.0))
    rendered = synth.render(torch.tensor([7, 7, 7]), torch.tensor([0, 1, 99]))
    assert torch.equal(rendered.images[0], rendered.images[1]) and torch.equal(rendered.images[0], rendered.images[2])


# ------------------------------------------------------------------------------------ shape, dtype


@pytest.mark.parametrize("size", [16, 32, 48, 64, 112])
def test_shapes_and_dtypes(size: int) -> None:
    synth = SynthFace(SynthFaceConfig(image_size=size))
    rendered = synth.render(torch.arange(3), torch.zeros(3, dtype=torch.long))
    assert isinstance(rendered, Rendered)
    assert rendered.images.shape == (3, 3, size, size) and rendered.images.dtype == torch.uint8
    assert rendered.landmarks.shape == (3, 5, 2) and rendered.landmarks.dtype == torch.float32
    params = synth.identity_params(torch.arange(3))
    assert params.shape == (3, SynthFace.NUM_PARAMS) == (3, len(SynthFace.PARAM_NAMES))
    assert params.dtype == torch.float32
    assert synth.twin_of(torch.arange(3)).dtype == torch.int64
    empty = synth.render(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert empty.images.shape == (0, 3, size, size) and empty.landmarks.shape == (0, 5, 2)


def test_parameter_ranges_and_categories() -> None:
    params = SynthFace(SynthFaceConfig()).identity_params(torch.arange(5000))
    cont = continuous_columns()
    assert params[:, cont].min() >= 0 and params[:, cont].max() <= 1
    for name, count in (("hair_style", len(HAIR_STYLES)), ("facial_hair_type", len(FACIAL_HAIR_TYPES)),
                        ("mark_count", MAX_MARKS + 1)):
        values = params[:, column(name)]
        assert torch.equal(values, values.round())
        assert set(values.long().unique().tolist()) == set(range(count)), name
    # Every continuous parameter is spread over its range (uniform: std ~ 0.29).
    assert (params[:, cont].std(0) > 0.25).all()


# ---------------------------------------------------------------------------------------- landmarks


def test_mean_identity_sits_exactly_on_the_template() -> None:
    params = SynthFace(SynthFaceConfig()).identity_params(torch.arange(4)).clone()
    for name in ("eye_spacing", "eye_height", "nose_length", "mouth_width", "mouth_height"):
        params[:, column(name)] = 0.5
    for size in (112, 32):
        rendered = SynthFace(SynthFaceConfig(image_size=size)).render_with(params, clean(4))
        expected = ARCFACE_TEMPLATE_112 * size / 112
        torch.testing.assert_close(rendered.landmarks, expected.expand(4, 5, 2), atol=1e-4, rtol=0)


def test_clean_landmarks_are_the_umeyama_alignment_of_the_identity() -> None:
    """nuisance = 0: landmarks = the least-squares similarity of the identity's landmarks onto the template,
    applied to them (checked with an independent SVD fit); the shape residual is small."""
    synth = SynthFace(SynthFaceConfig(image_size=112, nuisance=0.0))
    ids = torch.arange(64)
    rendered = synth.render(ids, torch.zeros(64, dtype=torch.long))
    canonical = canonical_landmarks(synth.identity_params(ids)).numpy()
    template = ARCFACE_TEMPLATE_112.double().numpy()
    for i in range(64):
        affine = umeyama_numpy(canonical[i], template)
        expected = canonical[i] @ affine[:, :2].T + affine[:, 2]
        np.testing.assert_allclose(rendered.landmarks[i].numpy(), expected, atol=1e-3)
    residual = (rendered.landmarks.double() - ARCFACE_TEMPLATE_112.double()).norm(dim=2).mean(1)
    assert residual.mean() < 3.0 and residual.max() < 5.0


def test_clean_landmarks_scale_with_image_size() -> None:
    ids, samples = torch.arange(8), torch.zeros(8, dtype=torch.long)
    big = SynthFace(SynthFaceConfig(image_size=112, nuisance=0.0)).render(ids, samples).landmarks
    small = SynthFace(SynthFaceConfig(image_size=32, nuisance=0.0)).render(ids, samples).landmarks
    torch.testing.assert_close(small, big * 32 / 112, atol=1e-4, rtol=0)


@pytest.mark.parametrize("roll_deg", [-12.0, 7.0, 20.0])
def test_roll_rotates_landmarks_rigidly(roll_deg: float) -> None:
    """Only roll: the landmarks are the clean ones turned by exactly the roll angle, without scaling."""
    synth = SynthFace(SynthFaceConfig(image_size=112))
    params = synth.identity_params(torch.arange(5))
    upright = synth.render_with(params, clean(5)).landmarks.double().numpy()
    rolled_nuisance = replace(clean(5), roll=torch.full((5,), math.radians(roll_deg), dtype=torch.float64))
    rolled = synth.render_with(params, rolled_nuisance).landmarks.double().numpy()
    for i in range(5):
        affine = umeyama_numpy(upright[i], rolled[i])
        angle = math.degrees(math.atan2(affine[1, 0], affine[0, 0]))
        assert angle == pytest.approx(roll_deg, abs=1e-3)
        assert np.hypot(affine[0, 0], affine[1, 0]) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(upright[i] @ affine[:, :2].T + affine[:, 2], rolled[i], atol=1e-3)


def _diff_mask(a: torch.Tensor, b: torch.Tensor, threshold: int) -> torch.Tensor:
    """Pixels whose RGB values differ by more than ``threshold`` grey levels in total."""
    return (a.int() - b.int()).abs().sum(0) > threshold


def test_landmarks_follow_the_drawn_features_under_nuisance() -> None:
    """At nuisance 1 (pose, misalignment, expression, light), recolouring the irises or the lips changes
    pixels exactly around the landmarks: the iris centroid is within 2 px (at 112) of each eye landmark,
    and the lips' extreme points along the mouth are within 2 px of the corner landmarks (any visible
    change counts there, since the lips taper to a point at the corners)."""
    synth = SynthFace(SynthFaceConfig(image_size=112, nuisance=1.0))
    ids, samples = torch.arange(24), torch.arange(24) % 4
    params = synth.identity_params(ids)
    nuisance = synth.sample_nuisance(ids, samples)
    zeros = torch.zeros(24, dtype=torch.float64)
    # Keep geometry nuisance; remove what hides or smears the features (tests of those are elsewhere).
    nuisance = replace(nuisance, blink=zeros, glasses=zeros, mask=zeros, blur_sigma=zeros, noise_std=zeros,
                       jpeg_quality=torch.zeros(24, dtype=torch.int64), mouth_open=zeros)
    assert nuisance.yaw.abs().max() > math.radians(10) and nuisance.roll.abs().max() > math.radians(5)
    base = synth.render_with(params, nuisance)
    for name, threshold in (("iris_colour", 24), ("lip_colour", 2)):
        a, b = params.clone(), params.clone()
        a[:, column(name)], b[:, column(name)] = 0.0, 1.0
        first, second = synth.render_with(a, nuisance), synth.render_with(b, nuisance)
        torch.testing.assert_close(first.landmarks, base.landmarks)
        for i in range(24):
            changed = _diff_mask(first.images[i], second.images[i], threshold)
            ys, xs = changed.nonzero(as_tuple=True)
            points = torch.stack([xs, ys], 1).double()
            marks = base.landmarks[i].double()
            if name == "iris_colour":
                for eye in (0, 1):
                    near = (points - marks[eye]).norm(dim=1) < 8
                    assert near.sum() > 5, f"identity {i}: no iris drawn near eye {eye}"
                    centroid = points[near].mean(0)
                    assert (centroid - marks[eye]).norm() < 2.0, f"identity {i} eye {eye}"
            else:
                axis = marks[4] - marks[3]
                axis = axis / axis.norm()
                middle = (marks[3] + marks[4]) / 2
                near = (points - middle).norm(dim=1) < (marks[4] - marks[3]).norm() / 2 + 6
                along = (points[near] - middle) @ axis
                assert along.min() == pytest.approx(float((marks[3] - middle) @ axis), abs=2.0), f"identity {i}"
                assert along.max() == pytest.approx(float((marks[4] - middle) @ axis), abs=2.0), f"identity {i}"


def test_darkest_pixels_near_clean_eyes_are_the_pupils() -> None:
    synth = SynthFace(SynthFaceConfig(image_size=112, nuisance=0.0))
    rendered = synth.render(torch.arange(8), torch.zeros(8, dtype=torch.long))
    for image, marks in zip(rendered.images, rendered.landmarks):
        grey = image.float().mean(0)
        for eye in (0, 1):
            x, y = marks[eye].round().long().tolist()
            patch = grey[y - 4:y + 5, x - 4:x + 5]
            dy, dx = divmod(int(patch.argmin()), patch.shape[1])
            assert abs(dx - 4) <= 2 and abs(dy - 4) <= 2


# ------------------------------------------------------------------------------------------ twins


def test_no_twins_without_twin_fraction() -> None:
    synth = SynthFace(SynthFaceConfig(twin_fraction=0.0))
    assert (synth.twin_of(torch.arange(5000)) == -1).all()


@pytest.mark.parametrize("fraction", [0.1, 0.3, 1.0])
def test_twin_fraction_is_about_right_and_symmetric(fraction: float) -> None:
    synth = SynthFace(SynthFaceConfig(twin_fraction=fraction))
    ids = torch.arange(20000)
    twins = synth.twin_of(ids)
    has_twin = twins >= 0
    assert has_twin.double().mean().item() == pytest.approx(fraction, abs=0.015)
    assert torch.equal(twins[has_twin], ids[has_twin] ^ 1)
    assert torch.equal(synth.twin_of(twins[has_twin]), ids[has_twin])


def test_twin_parameters_are_close_and_non_twins_are_not() -> None:
    synth = SynthFace(SynthFaceConfig(twin_fraction=0.5))
    ids = torch.arange(0, 4000, 2)
    twin = synth.twin_of(ids) >= 0
    first, second = synth.identity_params(ids), synth.identity_params(ids + 1)
    cont = continuous_columns()
    categorical = [column(name) for name in CATEGORICAL]
    difference = (first - second).abs()
    assert difference[twin][:, cont].max() <= TWIN_PERTURBATION + 1e-6
    assert difference[twin][:, cont].mean(1).max() < 0.1
    assert (difference[twin][:, categorical] == 0).all()
    assert (difference[twin][:, cont].mean(1) > 0.01).all(), "twins must still be different people"
    # Non-twin neighbours are independent draws: mean |difference| of uniforms is 1/3.
    assert difference[~twin][:, cont].mean(1).mean() == pytest.approx(1 / 3, abs=0.03)
    assert (difference[~twin][:, cont].mean(1) > 0.12).all()


def test_twin_images_look_alike_more_than_strangers() -> None:
    synth = SynthFace(SynthFaceConfig(image_size=32, nuisance=0.0, twin_fraction=1.0))
    ids = torch.arange(40)
    images = synth.render(ids, torch.zeros(40, dtype=torch.long)).images.float()
    twin_distance = (images[0::2] - images[1::2]).abs().mean()
    stranger_distance = (images[0::2] - images[1::2].roll(1, 0)).abs().mean()
    assert twin_distance < 0.6 * stranger_distance


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("field, value", [
    ("image_size", 8), ("image_size", 32.0), ("image_size", 4096), ("nuisance", -0.1), ("nuisance", 10.0),
    ("twin_fraction", 1.5), ("twin_fraction", -0.01), ("seed", -1), ("seed", "zero"),
])
def test_config_validation(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"SynthFaceConfig\.{field}=.*allowed") as error:
        SynthFaceConfig(**{field: value})
    assert "\n" not in str(error.value)


def test_render_argument_validation() -> None:
    synth = SynthFace(SynthFaceConfig(image_size=16))
    with pytest.raises(ConfigError, match="same length"):
        synth.render(torch.arange(3), torch.arange(2))
    with pytest.raises(ConfigError, match="integer"):
        synth.render(torch.ones(2), torch.arange(2))
    with pytest.raises(ConfigError, match=">= 0"):
        synth.render(torch.tensor([-1]), torch.tensor([0]))
    with pytest.raises(ConfigError, match="nuisance"):
        synth.render(torch.arange(2), torch.arange(2), nuisance=-1.0)


# ---------------------------------------------------------------------------------------- chunking


def test_render_many_equals_render() -> None:
    synth = SynthFace(SynthFaceConfig(image_size=24, twin_fraction=0.2))
    ids, samples = torch.arange(23) % 9, torch.arange(23)
    whole = synth.render(ids, samples)
    many = synth.render_many(ids, samples, batch_size=5, progress=False)
    assert torch.equal(many.images, whole.images) and torch.equal(many.landmarks, whole.landmarks)
    with pytest.raises(ConfigError, match="batch_size"):
        synth.render_many(ids, samples, batch_size=0, progress=False)


def test_render_with_the_nuisance_override_matches_the_config() -> None:
    ids, samples = torch.arange(6), torch.arange(6)
    configured = SynthFace(SynthFaceConfig(image_size=24, nuisance=0.5)).render(ids, samples)
    overridden = SynthFace(SynthFaceConfig(image_size=24, nuisance=1.0)).render(ids, samples, nuisance=0.5)
    assert torch.equal(configured.images, overridden.images)


def test_nuisance_zero_is_clean() -> None:
    nuisance = SynthFace(SynthFaceConfig()).sample_nuisance(torch.arange(50), torch.arange(50), nuisance=0.0)
    neutral = Nuisance.neutral(50)
    for name in ("yaw", "pitch", "roll", "smile", "mouth_open", "blink", "brow_raise", "glasses", "mask",
                 "blur_sigma", "noise_std", "jpeg_quality", "misalign_scale_log", "misalign_shift",
                 "misalign_rotation", "background", "light_direction", "light_gain", "ambient"):
        torch.testing.assert_close(getattr(nuisance, name), getattr(neutral, name), msg=name)


@pytest.mark.parametrize("size", [16, 32, 112])
def test_windowed_layers_equal_full_frame_drawing(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small layers are drawn only in the window their support can reach (the union over the batch);
    drawing them over the whole frame instead must give the same bytes, also at strong nuisance."""
    import bench.data.synthface as synthface

    synth = SynthFace(SynthFaceConfig(seed=2, image_size=size, nuisance=2.0))
    ids = torch.arange(48 if size == 112 else 160)
    samples = ids % 3
    windowed = synth.render(ids, samples)
    monkeypatch.setattr(synthface._Raster, "window", lambda self, group, centre, reach: (slice(None), slice(None)))
    full = synth.render(ids, samples)
    assert torch.equal(windowed.images, full.images)
