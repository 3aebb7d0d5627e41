"""Shared fixtures: a tiny SynthFace configuration that trains and evaluates in seconds on CPU."""

from __future__ import annotations

import pytest
import torch

TINY_SETS = [
    "data.synthface.num_identities=24", "data.synthface.images_per_identity=4",
    "train.embedding_size=32", "train.log_every=2",
]


@pytest.fixture(autouse=True)
def _two_threads():
    """Tests run with the CI machine's 2 threads, whatever the host has."""
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _restore_deterministic_switch():
    """A test that trains with ``train.deterministic=true`` in this process must not leave torch's global
    deterministic-algorithms switch on for the tests after it (other kernels, other rounding: the
    calibration test's numbers moved by points when it leaked)."""
    previous = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture
def tiny_eval(monkeypatch):
    """The synthetic protocols at toy sizes (the real protocols and formats, far fewer images):
    synth-lfw with 10 folds of 4 + 4 pairs from 40 identities; synth-ijbc with 8 subjects x 3 templates;
    synth-megaface with 4 people x 3 images and 10 / 40 distractors; synth-lowres with 8 subjects at 8 and 16 px;
    synth-quality with 12 subjects x 3 images; synth-geometry with 4 identities x 3 images x 2 views."""
    from bench.eval import synth_benchmarks
    from bench.eval.verification import SynthLFW

    monkeypatch.setattr(SynthLFW, "num_identities", 40)
    monkeypatch.setattr(SynthLFW, "pairs_per_kind", 4)
    monkeypatch.setattr(synth_benchmarks, "SYNTH_IJBC",
                        synth_benchmarks.SynthIJBCSizes(subjects=8, templates_per_subject=2))
    monkeypatch.setattr(synth_benchmarks, "SYNTH_MEGAFACE",
                        synth_benchmarks.SynthMegaFaceSizes(identities=4, images_per_identity=3,
                                                            distractor_sizes=(10, 40), probe_noise=0.2,
                                                            distractor_noise=0.1))
    from bench.eval import synth_degraded

    monkeypatch.setattr(synth_degraded, "SYNTH_LOWRES",
                        synth_degraded.SynthLowResSizes(subjects=8, distractors=10, resolutions=(8, 16),
                                                        impostors_per_genuine=3))
    monkeypatch.setattr(synth_degraded, "SYNTH_QUALITY",
                        synth_degraded.SynthQualitySizes(subjects=12, images_per_subject=3, impostor_pairs=200,
                                                         ui_images=6))
    from bench.eval import synth_geometry

    monkeypatch.setattr(synth_geometry, "SYNTH_GEOMETRY",
                        synth_geometry.SynthGeometrySizes(identities=4, images_per_identity=3, draws=2))


@pytest.fixture
def tiny_args(tmp_path, tiny_eval):
    """Command-line arguments of a tiny `bench run` writing under tmp_path."""
    args = ["--budget", "128", "--batch-size", "32", "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "results"), "--data-root", str(tmp_path / "data")]
    for item in TINY_SETS:
        args += ["--set", item]
    return args


@pytest.fixture
def one_thread():
    """These models are tiny: one thread is faster, and robust to a loaded 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def float64_default():
    """float64 as torch's default dtype for the test (closed-form comparisons)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
