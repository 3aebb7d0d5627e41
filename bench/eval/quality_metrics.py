"""Evaluation of face image quality assessment (FIQA): the error-versus-discard characteristic (EDC) and
its partial area (pAUC), and Spearman's rank correlation.

Definitions (sources; facts only, nothing quoted). The text of ISO/IEC 29794-1:2024 was not available to us:
what is said of it here comes from Schlett et al., "Considerations on the Evaluation of Biometric Quality
Assessment Algorithms" (IEEE T-BIOM 2023, arXiv:2303.13294), whose EDC formulation the standard's EDC
follows, and from their reference code (``fiqat.edc``; ``dasec/quality-assessment-evaluation`` ``edc.py``),
both read for this module.

- **Pairwise quality** (:func:`pairwise_quality`): a comparison's quality is the *minimum* of its two
  images' quality scores, higher = better: the default pair-quality function of Schlett et al.'s code
  (their Sec. I.A: discarding comparisons by ascending ``min`` is discarding *samples* by ascending
  quality), and what CR-FIQA's published ERC script (``ERC/erc.py``) takes.
- **Threshold** (:func:`fmr_threshold`): fixed once, before anything is discarded, from the impostor
  (non-mated) comparisons only: a comparison is a match when its score is strictly above ``t``, and ``t``
  is the ``(m + 1)``-th highest impostor score with ``m = floor(fmr * M)`` (``M`` impostor comparisons), the
  lowest threshold at which at most ``m`` impostors match (the FMR is ``fmr`` where the scores allow it, never
  above). Schlett et al.'s EDC fixes the threshold for the whole curve (it sets the starting error);
  CR-FIQA's published ERC script instead re-derives it after each discard step over genuine and
  impostor pairs together, which mixes the FIQA's effect on both error rates, and is not what is done here.
- **FNM-EDC** (:func:`edc`): for each discard fraction ``d``, the ``k = floor(d * N)`` genuine (mated)
  comparisons of lowest pairwise quality are discarded (``N`` genuine comparisons; the fraction is over the
  *genuine* comparisons only: Schlett et al.'s code selects the mated comparisons for an FNMR curve, and its
  discard fraction is over them) and the FNMR of the ``N - k`` kept ones at the fixed threshold
  is reported. Impostor comparisons are not discarded (they only set the threshold).
- **Ties** in pairwise quality: exactly ``k`` comparisons are discarded; where the quality of the ``k``-th
  lowest is shared by a block of comparisons of which only some are discarded, the kept errors of that block
  are counted in proportion (``errors_in_block * kept_of_block / block_size``). That is the mean over all
  orders of breaking the tie, so the curve depends neither on the input order nor on anything but the
  quality ranks (ours; Schlett et al.'s code instead only reports points at quality-threshold steps, where
  no tie is split).
- **pAUC** (:meth:`EDCCurve.pauc`): the area under the EDC over ``d in [0, max_discard]`` with *stepwise*
  interpolation (each point's FNMR holds until the next point), as ``fiqat.edc.compute_edc_pauc``; on the
  default grid (steps of 0.01) that is a left Riemann sum, exact for a grid holding every ``k / N``.
  Default ``max_discard = 0.2`` (the synth-quality protocol's ``pauc_max_discard``; Schlett et al. find
  rankings more stable for higher limits, so it is a parameter). Normalisation (``normalise``):

  - ``"none"`` (default): the raw area, what ``compute_edc_pauc`` returns;
  - ``"initial"``: divided by ``FNMR(0) * max_discard``, the area of the flat curve a random quality score
    gives in expectation (the soft upper limit: randomly assigned quality leaves the FNMR where it starts):
    1 = no better than random;
  - ``"oracle"``: minus the area of the oracle curve ``max(0, (FNMR(0) - d) / (1 - d))`` (a quality score
    that ranks exactly the false non-matches lowest) sampled on the same grid: the hard lower limit. Olsen
    et al. ("Finger image quality assessment features - definitions and evaluation", IET Biometrics 2016)
    and ``fiqat``'s ``compute_edc_area_under_theoretical_best`` subtract the straight line
    ``FNMR(0) - d`` instead, a bound no curve reaches (the oracle curve lies above it for ``0 < d < FNMR(0)``);
  - ``"relative"``: ``(area - oracle) / (flat - oracle)``: 0 = oracle, 1 = random; our reading of Schlett
    et al.'s pAUC between a hard lower and a soft upper error limit (the exact formula of the paper not
    checked).
- **Spearman's rho** (:func:`spearman`): :func:`scipy.stats.spearmanr` (average ranks for ties).

Inputs are validated (shapes, NaN or infinite values, empty sets, rates outside their range); each problem
raises ``ValueError`` naming it, as :mod:`bench.eval.metrics`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

#: The default discard grid: 0, 0.01, ..., 0.95.
DEFAULT_DISCARD = np.linspace(0.0, 0.95, 96)
#: The default pAUC discard limit (module docstring).
DEFAULT_MAX_DISCARD = 0.2
PAUC_NORMALISATIONS = ("none", "initial", "oracle", "relative")
Normalisation = Literal["none", "initial", "oracle", "relative"]
#: Slack when a fraction times a count should be an integer (0.29 * 100 is 28.999999999999996 in floats).
_COUNT_SLACK = 1e-9


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------


def _scores(values: Any, what: str) -> np.ndarray:
    """A non-empty, finite 1-D float array."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array, got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{what} is empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return array


def _quality_pairs(values: Any, count: int, what: str) -> np.ndarray:
    """A finite ``(count, 2)`` float array of the two images' quality scores per comparison."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape != (count, 2):
        raise ValueError(f"{what} must have shape ({count}, 2) (one row of two qualities per comparison), "
                         f"got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return array


def _discard_grid(discard: Any) -> np.ndarray:
    """Discard fractions: a non-empty, strictly increasing 1-D array in [0, 1)."""
    grid = _scores(DEFAULT_DISCARD if discard is None else discard, "discard")
    if grid[0] < 0 or grid[-1] >= 1:
        raise ValueError(f"discard fractions must lie in [0, 1), got {grid[0]:g} .. {grid[-1]:g}")
    if np.any(np.diff(grid) <= 0):
        raise ValueError("discard fractions must be strictly increasing")
    return grid


def _count(fraction: float | np.ndarray, total: int) -> np.ndarray:
    """``floor(fraction * total)`` robust to float rounding (0.29 * 100 counts 29)."""
    return np.floor(np.asarray(fraction) * total + _COUNT_SLACK).astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------


def pairwise_quality(quality: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """The quality of each comparison: the minimum of its two images' qualities (module docstring).

    ``quality``: one score per image (higher = better); ``pairs``: ``(P, 2)`` image indices. Returns ``(P,)``.
    """
    quality = _scores(quality, "quality")
    pairs = np.asarray(pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must have shape (P, 2), got {pairs.shape}")
    if not np.issubdtype(pairs.dtype, np.integer):
        raise ValueError(f"pairs must hold integer image indices, got dtype {pairs.dtype}")
    if pairs.size and (pairs.min() < 0 or pairs.max() >= quality.shape[0]):
        raise ValueError(f"pairs index images outside 0..{quality.shape[0] - 1}")
    return np.minimum(quality[pairs[:, 0]], quality[pairs[:, 1]])


def fmr_threshold(impostor_scores: np.ndarray, fmr: float) -> float:
    """The fixed decision threshold: a comparison matches when its score is strictly above it; it is the
    ``(floor(fmr * M) + 1)``-th highest of the ``M`` impostor scores (module docstring)."""
    impostor = _scores(impostor_scores, "impostor_scores")
    if not 0.0 < fmr < 1.0:
        raise ValueError(f"fmr must be in (0, 1), got {fmr}")
    allowed = int(_count(fmr, impostor.shape[0]))
    return float(np.sort(impostor)[::-1][allowed])


def _kept_errors(quality: np.ndarray, errors: np.ndarray, discarded: np.ndarray) -> np.ndarray:
    """Errors among the comparisons kept after discarding the ``discarded`` lowest-quality ones, a tie
    block at the cut counted in proportion (module docstring: the mean over all tie orders)."""
    order = np.argsort(quality, kind="stable")
    ranked, ranked_errors = quality[order], errors[order].astype(np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(ranked_errors)])  # errors among the i lowest
    total = cumulative[-1]
    last = ranked[np.maximum(discarded - 1, 0)]                      # quality of the last discarded
    start = np.searchsorted(ranked, last, side="left")               # the tie block of that quality
    stop = np.searchsorted(ranked, last, side="right")
    block_errors = cumulative[stop] - cumulative[start]
    share = (discarded - start) / (stop - start)
    kept = total - cumulative[start] - block_errors * share
    return np.where(discarded == 0, total, kept)


# ----------------------------------------------------------------------------------------------------
# The curve
# ----------------------------------------------------------------------------------------------------


def _step_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Area under the step function holding ``y[i]`` on ``[x[i], x[i + 1])``, over ``[0, limit]``."""
    right = np.minimum(np.append(x[1:], limit), limit)
    widths = np.clip(right - x, 0.0, None)
    return float(np.sum(widths * y))


@dataclass(frozen=True, eq=False)
class EDCCurve:
    """An FNM-EDC: FNMR of the genuine comparisons kept after discarding the fraction ``discard`` of lowest
    quality, at the fixed ``threshold`` that gives FMR ``fmr`` on all impostor comparisons."""

    discard: np.ndarray
    fnmr: np.ndarray
    threshold: float
    fmr: float

    def __post_init__(self) -> None:
        for name in ("discard", "fnmr"):
            array = np.array(getattr(self, name), dtype=np.float64)
            array.setflags(write=False)
            object.__setattr__(self, name, array)
        if self.discard.shape != self.fnmr.shape or self.discard.ndim != 1:
            raise ValueError(f"discard and fnmr must be 1-D of equal length, got {self.discard.shape} and "
                             f"{self.fnmr.shape}")

    def oracle(self) -> np.ndarray:
        """The oracle curve on this grid: ``max(0, (FNMR(0) - d) / (1 - d))``, the EDC of a quality score
        that ranks exactly the false non-matches lowest (module docstring)."""
        start = self._start()
        return np.clip((start - self.discard) / (1.0 - self.discard), 0.0, None)

    def pauc(self, max_discard: float = DEFAULT_MAX_DISCARD, normalise: Normalisation = "none") -> float:
        """Partial area under the curve over ``[0, max_discard]``, stepwise, normalised as ``normalise``
        says (module docstring); lower is better. NaN where a normalisation divides by zero (FNMR(0) = 0)."""
        if normalise not in PAUC_NORMALISATIONS:
            raise ValueError(f"normalise must be one of {', '.join(PAUC_NORMALISATIONS)}, got {normalise!r}")
        if not 0.0 < max_discard <= self.discard[-1] + _COUNT_SLACK:
            raise ValueError(f"max_discard must be in (0, {self.discard[-1]:g}] (the curve's last discard "
                             f"fraction), got {max_discard}")
        start = self._start()
        area = _step_area(self.discard, self.fnmr, max_discard)
        if normalise == "none":
            return area
        flat = start * max_discard
        if normalise == "initial":
            return area / flat if flat > 0 else math.nan
        best = _step_area(self.discard, self.oracle(), max_discard)
        if normalise == "oracle":
            return area - best
        return (area - best) / (flat - best) if flat > best else math.nan

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"discard": [...], "fnmr": [...], "threshold": t, "fmr": f}``."""
        return {"discard": [float(d) for d in self.discard], "fnmr": [float(f) for f in self.fnmr],
                "threshold": float(self.threshold), "fmr": float(self.fmr)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EDCCurve:
        """The curve :meth:`as_dict` wrote."""
        return cls(np.asarray(values["discard"]), np.asarray(values["fnmr"]), float(values["threshold"]),
                   float(values["fmr"]))

    def _start(self) -> float:
        if self.discard[0] != 0.0:
            raise ValueError(f"the curve must start at discard fraction 0, starts at {self.discard[0]:g}")
        return float(self.fnmr[0])


def edc(genuine_scores: np.ndarray, impostor_scores: np.ndarray, genuine_quality_pairs: np.ndarray,
        impostor_quality_pairs: np.ndarray, fmr: float = 1e-3, discard: np.ndarray | None = None) -> EDCCurve:
    """The FNM-EDC of similarity scores (higher = same person) and per-image quality scores (higher =
    better), see the module docstring.

    ``genuine_quality_pairs`` / ``impostor_quality_pairs``: ``(N, 2)`` / ``(M, 2)``, the two images' quality
    scores of each comparison. The impostor qualities are validated but do not change an FNM-EDC: impostor
    comparisons are never discarded, they only fix the threshold (they are taken so that one call describes
    the comparison set; an FM-EDC would discard by them). ``discard``: strictly increasing fractions in
    [0, 1) (default 0, 0.01, ..., 0.95).
    """
    genuine = _scores(genuine_scores, "genuine_scores")
    threshold = fmr_threshold(impostor_scores, fmr)
    quality = _quality_pairs(genuine_quality_pairs, genuine.shape[0], "genuine_quality_pairs").min(axis=1)
    _quality_pairs(impostor_quality_pairs, np.asarray(impostor_scores).shape[0], "impostor_quality_pairs")
    grid = _discard_grid(discard)
    total = genuine.shape[0]
    discarded = np.minimum(_count(grid, total), total - 1)  # d < 1 always keeps one comparison
    errors = genuine <= threshold                            # false non-match: not strictly above
    fnmr = _kept_errors(quality, errors, discarded) / (total - discarded)
    return EDCCurve(grid, fnmr, threshold, float(fmr))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (:func:`scipy.stats.spearmanr`, average ranks for
    ties); NaN when either is constant (no ranking to correlate)."""
    x, y = _scores(x, "x"), _scores(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have equal length, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 2:
        raise ValueError("spearman needs at least two values")
    if np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.spearmanr(x, y).statistic)
