"""The ``synth-geometry`` protocol (bench/eval/synth_geometry.py) and its report section
(bench/report/geometry_report.py).

Shows: each metric against an independent computation on hand-built unit vectors (alignment of identical
views is 0; orthogonal centres have cosine 0 and distance sqrt 2; two antipodal points have uniformity
log(exp(-2 * 4)) = -8; augmented distances are the closest view pair; the (sigma, delta) main-part estimates
against a brute force over ``itertools.combinations`` and hand-picked distance sets; the pooled-pair share
and quantile by hand); an end-to-end ``evaluate`` on a toy SynthFace set (``tiny_eval``: 4 identities x 3
images x 2 views) with a deterministic pooling encoder (keys, ranges, views independent of the batch size,
identity augmentation -> view alignment 0) and a constant encoder (alignment 0, centre cosine 1, uniformity
0, sigma 1, delta 0); one-line errors; and the report's "Representation geometry" section: mean and std over
seeds beside synth-lfw accuracy, present only when records have synth-geometry.
"""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest
import torch
from torch import nn

from bench.config import DataSettings
from bench.errors import ConfigError, DataError
from bench.eval import PROTOCOLS, build_protocol
from bench.eval import synth_geometry as sg
from bench.report.geometry_report import geometry_section
from bench.report.writer import write_report
from tests.report_records import write_record

SQRT2 = math.sqrt(2.0)


def _unit(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------------
# Metrics on hand-built features
# ----------------------------------------------------------------------------------------------------


def test_alignment_is_zero_for_identical_views_and_the_mean_squared_distance_otherwise():
    views = _unit([[1, 0, 0], [0, 1, 0], [0.6, 0.8, 0]])
    assert sg.alignment(views, views) == 0.0
    other = _unit([[0, 1, 0], [0, 1, 0], [-0.6, -0.8, 0]])
    # squared distances: 2 (orthogonal), 0 (equal), 4 (antipodal)
    assert sg.alignment(views, other) == pytest.approx((2 + 0 + 4) / 3)
    assert sg.alignment(views, other, alpha=1) == pytest.approx((SQRT2 + 0 + 2) / 3)


def test_identity_alignment_averages_the_pairs_of_each_identity():
    features = _unit([[1, 0], [0, 1], [1, 0], [1, 0], [-1, 0]])
    identities = np.array([7, 7, 9, 9, 9])
    # identity 7: one pair, d^2 = 2; identity 9: pairs d^2 = 0, 4, 4 -> mean over the 4 pairs
    assert sg.identity_alignment(features, identities) == pytest.approx((2 + 0 + 4 + 4) / 4)


def test_orthogonal_centres_have_cosine_zero_and_distance_sqrt2():
    features = _unit([[1, 0.1, 0], [1, -0.1, 0], [0, 1, 0.2], [0, 1, -0.2]])
    identities = np.array([0, 0, 1, 1])
    out = sg.centre_divergence(features, identities)
    assert out["centre_cosine_mean"] == pytest.approx(0.0, abs=1e-12)
    assert out["centre_cosine_max"] == pytest.approx(0.0, abs=1e-12)
    assert out["min_centre_distance"] == pytest.approx(SQRT2)


def test_centre_statistics_of_three_identities_by_hand():
    # centres (already unit): e1, e2 and (e1 + e2) / sqrt 2
    features = _unit([[1, 0], [0, 1], [1, 1]])
    out = sg.centre_divergence(features, np.array([0, 1, 2]))
    cosines = [0.0, 1 / SQRT2, 1 / SQRT2]
    assert out["centre_cosine_mean"] == pytest.approx(sum(cosines) / 3)
    assert out["centre_cosine_max"] == pytest.approx(1 / SQRT2)
    assert out["min_centre_distance"] == pytest.approx(math.sqrt(2 - 2 / SQRT2))


def test_centre_inner_max_uses_the_unnormalised_mean_of_the_views():
    features = _unit([[1, 0], [0, 1]])
    views = np.array([[[1.0, 0.0], [0.0, 1.0]],    # identity 0: view mean (0.5, 0.5)
                      [[1.0, 0.0], [1.0, 0.0]]])   # identity 1: view mean (1, 0)
    out = sg.centre_divergence(features, np.array([0, 1]), views)
    assert out["centre_inner_max"] == pytest.approx(0.5)


def test_uniformity_of_antipodal_points_is_minus_eight_and_matches_a_loop():
    assert sg.uniformity(_unit([[1, 0], [-1, 0]])) == pytest.approx(math.log(math.exp(-2 * 4)))
    assert sg.uniformity(_unit([[0, 1], [0, 1], [0, 1]])) == pytest.approx(0.0)
    rng = np.random.default_rng(3)
    points = _unit(rng.normal(size=(6, 4)))
    terms = [math.exp(-2 * sum((a - b) ** 2 for a, b in zip(points[i], points[j])))
             for i, j in itertools.combinations(range(6), 2)]
    assert sg.uniformity(points) == pytest.approx(math.log(sum(terms) / len(terms)))


def test_augmented_distance_is_the_closest_pair_of_views():
    views = np.array([[[1.0, 0.0], [0.0, 1.0]],
                      [[-1.0, 0.0], [0.0, 1.0]],      # shares the view (0, 1) with image 0
                      [[-1.0, 0.0], [0.0, -1.0]]])
    d = sg.augmented_distances(views)
    assert d[0, 1] == pytest.approx(0.0) and d[1, 0] == pytest.approx(0.0)
    assert d[0, 2] == pytest.approx(SQRT2)            # the closest of 2, sqrt 2, sqrt 2, 2
    assert d[1, 2] == pytest.approx(0.0, abs=1e-12)   # (-1, 0) in both
    assert np.all(np.diag(d) == 0.0)
    assert np.allclose(d, d.T)


def _brute_main_part(distances: np.ndarray, delta: float | None = None, share: float | None = None) -> float:
    """Largest share of points pairwise within delta, or smallest diameter of >= share of them."""
    n = distances.shape[0]
    best = 0.0 if delta is not None else math.inf
    for size in range(1, n + 1):
        for subset in itertools.combinations(range(n), size):
            diameter = max((distances[i, j] for i, j in itertools.combinations(subset, 2)), default=0.0)
            if delta is not None and diameter <= delta:
                best = max(best, size / n)
            if share is not None and size >= share * n - 1e-9:
                best = min(best, diameter)
    return best


def test_main_part_on_a_hand_built_distance_set():
    # points 0, 1, 2 within 0.3 of each other (0.1, 0.2, 0.3), point 3 at 1.0 from all
    d = np.array([[0.0, 0.1, 0.2, 1.0],
                  [0.1, 0.0, 0.3, 1.0],
                  [0.2, 0.3, 0.0, 1.0],
                  [1.0, 1.0, 1.0, 0.0]])
    assert sg.main_part_share(d, 0.05) == 0.25          # a single point
    assert sg.main_part_share(d, 0.15) == 0.5           # {0, 1}
    assert sg.main_part_share(d, 0.5) == 0.75           # {0, 1, 2}
    assert sg.main_part_share(d, 1.0) == 1.0
    assert sg.main_part_diameter(d, 0.5) == pytest.approx(0.1)    # 2 points: the closest pair
    assert sg.main_part_diameter(d, 0.75) == pytest.approx(0.3)   # 3 points: {0, 1, 2}
    assert sg.main_part_diameter(d, 0.9) == pytest.approx(1.0)    # ceil(3.6) = 4: all


def test_main_part_matches_a_brute_force_on_random_distances():
    rng = np.random.default_rng(0)
    for n in (2, 5, 7):
        points = rng.normal(size=(n, 3))
        d = np.linalg.norm(points[:, None] - points[None], axis=2)
        for delta in (0.3, 1.0, 2.5):
            assert sg.main_part_share(d, delta) == pytest.approx(_brute_main_part(d, delta=delta))
        for share in (0.5, 0.75, 0.9):
            assert sg.main_part_diameter(d, share) == pytest.approx(_brute_main_part(d, share=share))


def test_concentration_averages_identities_keeps_the_worst_and_pools_pairs():
    a = np.array([[0.0, 0.4], [0.4, 0.0]])
    b = np.array([[0.0, 0.9, 0.2], [0.9, 0.0, 0.6], [0.2, 0.6, 0.0]])
    out = sg.concentration([a, b], delta_grid=(0.5,), sigma_grid=(0.5, 1.0))
    # sigma at 0.5: a -> 1 (both), b -> 2/3 ({0, 2})
    assert out["sigma_at_delta"]["0.5"] == pytest.approx((1 + 2 / 3) / 2)
    assert out["sigma_at_delta_worst"]["0.5"] == pytest.approx(2 / 3)
    # delta at 0.5 share: a needs 1 point -> 0; b needs ceil(1.5) = 2 -> 0.2; at 1.0: a 0.4, b 0.9
    assert out["delta_at_sigma"]["0.5"] == pytest.approx(0.1)
    assert out["delta_at_sigma_worst"]["1"] == pytest.approx(0.9)
    assert out["delta_at_sigma"]["1"] == pytest.approx((0.4 + 0.9) / 2)
    # pooled pairs 0.4, 0.9, 0.2, 0.6: within 0.5 -> 2 of 4; the 0.5-quantile (inverted cdf) -> 0.4
    assert out["pairs"]["within_delta"]["0.5"] == 0.5
    assert out["pairs"]["quantile"]["0.5"] == pytest.approx(0.4)
    assert out["pairs"]["quantile"]["1"] == pytest.approx(0.9)
    assert out["pairs"]["count"] == 4


def test_geometry_metrics_summary_names_the_headline_numbers():
    rng = np.random.default_rng(1)
    clean = rng.normal(size=(6, 5))
    views = clean[:, None, :] + 0.1 * rng.normal(size=(6, 3, 5))
    out = sg.geometry_metrics(clean, views, np.array([0, 0, 0, 1, 1, 1]))
    assert list(out["summary"]) == ["align views", "align identity", "centre cos mean", "centre cos max",
                                    "concentration sigma@0.8", "concentration delta@0.9", "uniformity"]
    units = _unit(views.reshape(-1, 5)).reshape(views.shape)
    assert out["alignment_views"] == pytest.approx(float(np.mean(np.sum((units[:, 0] - units[:, 1]) ** 2, 1))))
    # no summary name may be taken for a results-table metric (accuracy, TAR@FAR, rank-N)
    assert not any(" acc" in k or "TAR@" in k or " rank-" in k for k in out["summary"])


# ----------------------------------------------------------------------------------------------------
# The protocol end to end
# ----------------------------------------------------------------------------------------------------


class PoolEncoder(nn.Module):
    """Average of each colour channel over the 4 image quadrants: 12 features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


class ConstantEncoder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(x.shape[0], 4)


@pytest.fixture
def protocol(tmp_path, tiny_eval, one_thread):
    return build_protocol("synth-geometry", DataSettings(root=str(tmp_path)), progress=False)


def test_registered_and_shrunk_by_tiny_eval(protocol):
    assert PROTOCOLS.get("synth-geometry") is sg.SynthGeometry
    assert protocol.images.shape == (12, 3, 32, 32) and protocol.images.dtype == torch.uint8
    assert np.array_equal(protocol.identities, sg.GEOMETRY_OFFSET + np.repeat(np.arange(4), 3))


def test_evaluate_reports_every_metric_in_range_and_the_same_views_at_any_batch_size(protocol):
    cpu = torch.device("cpu")
    out = protocol.evaluate(PoolEncoder(), cpu, batch_size=5)
    assert {"alignment_views", "alignment_identity", "divergence", "concentration", "uniformity", "summary",
            "counts", "conventions"} <= set(out)
    assert out["counts"] == {"identities": 4, "images_per_identity": 3, "images": 12, "views": 24}
    assert 0.0 < out["alignment_views"] <= 4.0 and 0.0 < out["alignment_identity"] <= 4.0
    assert -8.0 <= out["uniformity"] <= 0.0
    divergence = out["divergence"]
    assert -1.0 <= divergence["centre_cosine_mean"] <= divergence["centre_cosine_max"] <= 1.0
    assert divergence["min_centre_distance"] == pytest.approx(math.sqrt(2 - 2 * divergence["centre_cosine_max"]))
    concentration = out["concentration"]
    for share in concentration["sigma_at_delta"].values():
        assert 1 / 3 <= share <= 1.0
    assert list(concentration["sigma_at_delta"]) == ["0.5", "0.8", "1"]
    assert list(concentration["delta_at_sigma"]) == ["0.5", "0.75", "0.9"]
    assert concentration["pairs"]["count"] == 4 * 3
    assert out["summary"]["concentration sigma@0.8"] == concentration["sigma_at_delta"]["0.8"]
    again = protocol.evaluate(PoolEncoder(), cpu, batch_size=64)
    assert again["summary"] == pytest.approx(out["summary"], rel=1e-6)
    assert again["concentration"]["pairs"]["quantile"] == pytest.approx(out["concentration"]["pairs"]["quantile"])


def test_identity_augmentation_aligns_views_perfectly(protocol):
    out = protocol.evaluate(PoolEncoder(), torch.device("cpu"), batch_size=8,
                            augmenter=lambda images, strength, generator=None: images)
    assert out["alignment_views"] == pytest.approx(0.0, abs=1e-12)
    # every view is the clean image, so an augmented distance is the clean embeddings' distance
    clean = sg.l2_normalise(PoolEncoder()(sg.normalise(protocol.images)).double().numpy())
    same = sorted(float(np.linalg.norm(clean[i] - clean[j])) for i, j in itertools.combinations(range(12), 2)
                  if protocol.identities[i] == protocol.identities[j])
    pairs = out["concentration"]["pairs"]
    for delta in (0.5, 0.8, 1.0):
        assert pairs["within_delta"][f"{delta:g}"] == pytest.approx(sum(d <= delta for d in same) / len(same))
    for share in (0.5, 0.75, 0.9):  # the smallest distance with at least that share of the pairs at or below it
        assert pairs["quantile"][f"{share:g}"] == pytest.approx(same[math.ceil(share * len(same)) - 1])


def test_a_constant_encoder_collapses_everything(protocol):
    out = protocol.evaluate(ConstantEncoder(), torch.device("cpu"), batch_size=8)
    assert out["alignment_views"] == pytest.approx(0.0, abs=1e-12)
    assert out["alignment_identity"] == pytest.approx(0.0, abs=1e-12)
    assert out["divergence"]["centre_cosine_mean"] == pytest.approx(1.0)
    assert out["divergence"]["centre_cosine_max"] == pytest.approx(1.0)
    assert out["divergence"]["min_centre_distance"] == pytest.approx(0.0, abs=1e-6)
    assert out["uniformity"] == pytest.approx(0.0, abs=1e-12)
    assert all(v == 1.0 for v in out["concentration"]["sigma_at_delta"].values())
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in out["concentration"]["delta_at_sigma"].values())


def test_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="SynthFace only"):
        sg.SynthGeometry(DataSettings(dataset="casia", root=str(tmp_path)))
    with pytest.raises(ConfigError, match="images_per_identity"):
        sg.check_sizes(sg.SynthGeometrySizes(images_per_identity=17))
    with pytest.raises(ConfigError, match="draws"):
        sg.check_sizes(sg.SynthGeometrySizes(draws=1))


def test_score_features_is_not_supported(protocol):
    with pytest.raises(DataError, match="not supported"):
        protocol.score_features(np.zeros((12, 4)))


# ----------------------------------------------------------------------------------------------------
# The report section
# ----------------------------------------------------------------------------------------------------


def _geometry(align: float, cos: float) -> dict:
    return {"alignment_views": align, "summary": {"align views": align, "align identity": 2 * align,
                                                  "centre cos mean": cos, "centre cos max": cos + 0.1,
                                                  "concentration sigma@0.8": 0.5, "concentration delta@0.9": 1.2,
                                                  "uniformity": -3.0}}


def test_report_section_tabulates_geometry_beside_synth_lfw_accuracy(tmp_path):
    results = tmp_path / "results"
    runs = [("arcface", 0, 0.90, 0.30, 0.20), ("arcface", 1, 0.92, 0.34, 0.24), ("cosface", 0, 0.95, 0.10, 0.05)]
    for k, (method, seed, accuracy, align, cos) in enumerate(runs):
        write_record(results, f"run{k}", method, seed, accuracy, 0.5,
                     extra_metrics={"synth-geometry": _geometry(align, cos)})
    from bench.records import iter_records

    md, tex = geometry_section(iter_records(results))
    assert md.startswith("## Representation geometry")
    lines = {line.split("|")[3].strip(): line for line in md.splitlines() if line.startswith("| small")}
    arc = [c.strip() for c in lines["arcface"].split("|")]
    # accuracy in percent, mean ± sample std over the 2 seeds, then align views
    assert arc[5].startswith(f"91.00 ± {100 * statistics.stdev([0.90, 0.92]):.2f}")
    assert arc[6].startswith(f"0.320 ± {statistics.stdev([0.30, 0.34]):.3f}")
    assert arc[4] == "2"
    cos = [c.strip() for c in lines["cosface"].split("|")]
    assert cos[5] == "95.00"  # one seed: no spread over seeds
    assert cos[6] == "0.100"
    assert "\\begin{tabular}" in tex and "concentration sigma@0.8" in tex

    write_report(results, tmp_path / "report", figures=False)
    assert "## Representation geometry" in (tmp_path / "report" / "results.md").read_text()


def test_report_has_no_geometry_section_without_synth_geometry(tmp_path):
    results = tmp_path / "results"
    write_record(results, "run0", "arcface", 0, 0.9, 0.5)
    from bench.records import iter_records

    assert geometry_section(iter_records(results)) == ("", "")
    write_report(results, tmp_path / "report", figures=False)
    assert "Representation geometry" not in (tmp_path / "report" / "results.md").read_text()
