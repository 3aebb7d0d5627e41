"""synth-lowres and synth-quality: the generated folders read by the TinyFace / SurvFace readers, the
degradations against their definitions, and the protocols' metrics against independent recomputations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from bench.config import DataSettings, EvalSettings
from bench.eval import build_protocol, synth_degraded
from bench.eval.formats.survface import read_survface_verification
from bench.eval.formats.tinyface import read_tinyface
from bench.eval.metrics import tar_at_far
from bench.eval.synth_benchmarks import _synth
from bench.eval.synth_lowres import identification, pair_tar


class MeanColourEncoder(nn.Module):
    """A fixed, deterministic encoder: per-channel means of four image quadrants (12 dims)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 2).flatten(1) + 0.01


@pytest.fixture
def data(tmp_path, tiny_eval):
    return DataSettings(root=str(tmp_path / "data"))


def test_synth_lowres_folders_hold_native_low_resolution_probes(data):
    sizes = synth_degraded.SYNTH_LOWRES
    folder = synth_degraded.ensure_synth_lowres(data, sizes, progress=False)
    hr = read_tinyface(folder / "hr" / "tinyface")
    assert len(hr.gallery_paths) == sizes.subjects and len(hr.distractor_paths) == sizes.distractors
    assert len(hr.probe_paths) == sizes.subjects * sizes.probes_per_subject
    for r in sizes.resolutions:
        tiny = read_tinyface(folder / f"px{r:02d}" / "tinyface")
        assert {Image.open(p).size for p in tiny.probe_paths} == {(r, r)}
        assert {Image.open(p).size for p in tiny.gallery_paths} == {(32, 32)}
        np.testing.assert_array_equal(tiny.probe_ids, hr.probe_ids)
        # each LR probe is its HR probe brought down with antialiasing
        hr_probe = torch.from_numpy(np.array(Image.open(hr.probe_paths[0]))).permute(2, 0, 1)[None]
        low = torch.from_numpy(np.array(Image.open(tiny.probe_paths[0]))).permute(2, 0, 1)[None]
        expected = F.interpolate(hr_probe.float(), size=(r, r), mode="bilinear", align_corners=False,
                                 antialias=True).round().clamp(0, 255).to(torch.uint8)
        assert torch.equal(low, expected)
        for setting in ("hr-lr", "lr-lr"):
            pairs = read_survface_verification(folder / f"px{r:02d}" / setting)
            subject = np.asarray([int(p.name.split("_")[0]) for p in pairs.image_paths])
            same = subject[pairs.pairs[:, 0]] == subject[pairs.pairs[:, 1]]
            np.testing.assert_array_equal(same, pairs.issame)
            assert pairs.issame.sum() > 0 and (~pairs.issame).sum() == sizes.impostors_per_genuine * 16
            if setting == "hr-lr":
                sizes_first = {Image.open(pairs.image_paths[i]).size for i in pairs.pairs[:, 0]}
                sizes_second = {Image.open(pairs.image_paths[i]).size for i in pairs.pairs[:, 1]}
                assert sizes_first == {(32, 32)} and sizes_second == {(r, r)}


def test_identification_and_pair_tar_against_hand_computed_values():
    gallery = np.eye(3)
    distractors = np.asarray([[0.0, 0.8, 0.6]])
    probes = np.asarray([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]])
    # probe 2 (subject 1) is nearer subject 2 (0.8) and the distractor (0.96) than its own (0.6): rank 3
    rates = identification(probes, np.asarray([0, 1, 2]), gallery, np.asarray([0, 1, 2]), distractors)
    assert rates == {"rank1": pytest.approx(2 / 3), "rank5": 1.0}
    features = np.asarray([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    pairs = np.asarray([[0, 1], [0, 3], [1, 2], [2, 3]] + [[2, 2]] * 996)
    issame = np.asarray([True, True, False, False] + [False] * 996)
    scores = np.einsum("pd,pd->p", features[pairs[:, 0]], features[pairs[:, 1]])
    expected = tar_at_far(scores, issame, (1e-3, 1e-2))
    assert pair_tar(features, pairs, issame) == {"0.001": expected[1e-3], "0.01": expected[1e-2]}


def test_synth_lowres_protocol_matches_an_independent_recomputation(data):
    protocol = build_protocol("synth-lowres", data, progress=False, options=EvalSettings(flip=False), input_size=32)
    metrics = protocol.evaluate(MeanColourEncoder(), torch.device("cpu"), batch_size=64)
    folder = protocol.folder

    def embed(paths):
        images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                              for p in paths]).float()
        if images.shape[-1] != 32:
            images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False,
                                   antialias=True).round().clamp(0, 255)
        out = MeanColourEncoder()((images - 127.5) / 127.5).numpy()
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    hr = read_tinyface(folder / "hr" / "tinyface")
    gallery, distractors = embed(hr.gallery_paths), embed(hr.distractor_paths)
    for r in synth_degraded.SYNTH_LOWRES.resolutions:
        tiny = read_tinyface(folder / f"px{r:02d}" / "tinyface")
        similarity = embed(tiny.probe_paths) @ np.concatenate([gallery, distractors]).T
        own = similarity[np.arange(len(tiny.probe_ids)), np.searchsorted(hr.gallery_ids, tiny.probe_ids)]
        rank = 1 + (similarity >= own[:, None]).sum(axis=1) - 1
        assert metrics["per_resolution"][str(r)]["rank1"] == pytest.approx(np.mean(rank == 1))
        pairs = read_survface_verification(folder / f"px{r:02d}" / "lr-lr")
        feats = embed(pairs.image_paths)
        assert metrics["per_resolution"][str(r)]["lr_tar_at_far"] == pair_tar(feats, pairs.pairs, pairs.issame)
    assert metrics["summary"]["rank-1 mean"] == pytest.approx(
        np.mean([metrics["per_resolution"][str(r)]["rank1"] for r in synth_degraded.SYNTH_LOWRES.resolutions]))


def test_each_quality_nuisance_is_absent_at_strength_zero_and_resolution_is_its_definition(data):
    synth = _synth(data)
    ids, samples = torch.tensor([500001, 500002]), torch.tensor([0, 0])
    clean = synth.render_with(synth.identity_params(ids, 1), synth_degraded.Nuisance.neutral(2)).images
    for kind in ("resolution", "blur", "noise", "occlusion", "pose"):
        out = synth_degraded.degraded_render(synth, ids, samples, np.asarray([kind] * 2), np.zeros(2), np.ones(2))
        assert torch.equal(out, clean), kind
    worst = synth_degraded.degraded_render(synth, ids, samples, np.asarray(["resolution"] * 2), np.ones(2),
                                           np.ones(2))
    assert torch.equal(worst, synth_degraded.upsample(synth_degraded.downsample(clean, 4), 32))
    occluded = synth_degraded.degraded_render(synth, ids, samples, np.asarray(["occlusion"] * 2), np.ones(2),
                                              np.ones(2))
    rows = round(0.7 * 32)
    assert torch.all(occluded[:, :, 32 - rows:] == 128) and torch.equal(occluded[:, :, :32 - rows],
                                                                         clean[:, :, :32 - rows])


def test_synth_quality_oracle_scores_and_the_method_quality_path(data):
    protocol = build_protocol("synth-quality", data, progress=False, input_size=32)
    features = np.random.default_rng(0).normal(size=(protocol.images.shape[0], 8))
    truth = -protocol.strengths
    metrics = protocol.score(features, {"oracle": truth, "anti": protocol.strengths})
    assert metrics["spearman"]["oracle"]["all"] == pytest.approx(-1.0)
    assert metrics["spearman"]["anti"]["all"] == pytest.approx(1.0)
    for kind, rho in metrics["spearman"]["oracle"].items():
        assert rho == pytest.approx(-1.0), kind
    assert metrics["summary"]["pAUC oracle"] == metrics["pauc"]["oracle"]
    # A method's quality function is scored like the others: a norm-valued one equals "norm" exactly.
    encoder = MeanColourEncoder()
    out = protocol.evaluate(encoder, torch.device("cpu"), batch_size=64, quality=lambda f: f.norm(dim=1))
    assert out["scores"] == ["ri", "ers", "norm", "random"]
    assert out["pauc"]["ri"] == pytest.approx(out["pauc"]["norm"])
    assert out["edc"]["ri"]["fnmr"] == pytest.approx(out["edc"]["norm"]["fnmr"])
    without = protocol.evaluate(encoder, torch.device("cpu"), batch_size=64, quality=lambda f: None)
    assert without["scores"] == ["ers", "norm", "random"]
