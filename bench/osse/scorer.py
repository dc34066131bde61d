"""Forecast scores: pure functions of numbers and masks, no I/O.

Relative errors are taken against the truth on a floored scale: a value below a quantity's
``floor`` (the smallest one a clinic can tell from zero: a volume too small to measure, a
ctDNA fraction below the assay's limit of detection) counts as the floor, for the forecast and
for the truth alike, so that "both below the limit" is no error and a vanishing truth does not
make every error infinite.

    rel = (max(forecast, floor) - max(truth, floor)) / max(truth, floor)

Per group (forecaster, quantity, horizon): MdARE = median |rel|, bias = median rel, within15 =
share with |rel| <= 0.15, coverage = share of truths inside the 95 % interval, CRPS (units of
the quantity) of the forecast distribution, Dice and centre-of-mass distance (mm) of the
predicted region where there is one.

A forecast published as three quantiles (2.5 %, 50 %, 97.5 %) is read as the split normal
through them (``split_normal_quantiles``) and its CRPS integrated over dense quantile levels
(``crps_quantiles``); an ensemble's CRPS is exact (``crps_ensemble``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

Z975 = 1.959963984540054  # the standard normal's 97.5 % quantile
#: Quantile levels of the CRPS integral: midpoints of K equal bins of (0, 1).
CRPS_LEVELS = (np.arange(399) + 0.5) / 399.0


def relative_error(forecast: float, truth: float, floor: float) -> float:
    t = max(float(truth), floor)
    return (max(float(forecast), floor) - t) / t


def mdare(rel: Sequence[float]) -> float:
    """Median absolute relative error (NaN for no values)."""
    return float(np.median(np.abs(rel))) if len(rel) else math.nan


def bias(rel: Sequence[float]) -> float:
    """Median signed relative error: > 0 over-forecasts."""
    return float(np.median(rel)) if len(rel) else math.nan


def within(rel: Sequence[float], tolerance: float = 0.15) -> float:
    """Share of forecasts within ``tolerance`` of the truth (relative)."""
    return float(np.mean(np.abs(rel) <= tolerance)) if len(rel) else math.nan


def coverage(lo: Sequence[float], hi: Sequence[float], truth: Sequence[float]) -> float:
    """Share of truths inside [lo, hi] (inclusive)."""
    lo, hi, truth = (np.asarray(x, dtype=np.float64) for x in (lo, hi, truth))
    return float(np.mean((lo <= truth) & (truth <= hi))) if truth.size else math.nan


def _phi(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _Phi(z: np.ndarray) -> np.ndarray:
    # torch (a dependency of the service, unlike scipy) has the vectorised normal functions
    return torch.special.ndtr(torch.as_tensor(z, dtype=torch.float64)).numpy()


def _ndtri(p: np.ndarray) -> np.ndarray:
    return torch.special.ndtri(torch.as_tensor(p, dtype=torch.float64)).numpy()


def crps_gaussian(mu: float, sigma: float, y: float) -> float:
    """Closed-form CRPS of N(mu, sigma²) at y (Gneiting & Raftery 2007):
    sigma [z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi)], z = (y - mu) / sigma."""
    z = np.asarray((y - mu) / sigma, dtype=np.float64)
    return float(sigma * (z * (2.0 * _Phi(z) - 1.0) + 2.0 * _phi(z) - 1.0 / math.sqrt(math.pi)))


def crps_ensemble(members: Sequence[float], y: float) -> float:
    """CRPS of the members' empirical distribution at y: E|X - y| - E|X - X'| / 2 (exact;
    O(N log N) through the sorted members)."""
    x = np.sort(np.asarray(members, dtype=np.float64))
    n = x.size
    if n == 0:
        return math.nan
    first = np.mean(np.abs(x - y))
    # sum_{i,j} |x_i - x_j| = 2 sum_i (2 i - n + 1) x_i for sorted x (i from 0)
    spread = 2.0 * np.sum((2.0 * np.arange(n) - n + 1.0) * x) / (n * n)
    return float(first - 0.5 * spread)


def crps_quantiles(levels: Sequence[float], values: Sequence[float], y: float) -> float:
    """CRPS from quantiles: 2 * mean over ``levels`` of the pinball loss of each quantile at y,
    the midpoint rule of CRPS = 2 ∫_0^1 QS_tau dtau (exact in the limit of dense, evenly spaced
    levels)."""
    tau = np.asarray(levels, dtype=np.float64)
    q = np.asarray(values, dtype=np.float64)
    loss = (np.where(y < q, 1.0, 0.0) - tau) * (q - y)
    return float(2.0 * np.mean(loss))


def split_normal_quantiles(lo: float, median: float, hi: float, levels: Sequence[float] = CRPS_LEVELS,
                           coverage_level: float = 0.95) -> np.ndarray:
    """Quantiles at ``levels`` of the split normal whose median is ``median`` and whose
    (1 - c)/2 and (1 + c)/2 quantiles are lo and hi (c = ``coverage_level``): a Gaussian when
    the interval is symmetric, a point mass when it has no width."""
    z = _ndtri(np.asarray(levels, dtype=np.float64))
    zc = float(_ndtri(np.asarray(0.5 + coverage_level / 2.0)))
    upper, lower = (hi - median) / zc, (median - lo) / zc
    return median + np.where(z >= 0.0, z * upper, z * lower)


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """2 |A ∩ B| / (|A| + |B|) of two boolean masks; 1 when both are empty."""
    a, b = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def center_of_mass(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray | None:
    """Centroid (mm, voxel centres at (i + 1/2) h) of a boolean mask, or None when empty."""
    idx = np.argwhere(np.asarray(mask, dtype=bool))
    return None if len(idx) == 0 else (idx.mean(axis=0) + 0.5) * np.asarray(spacing, dtype=np.float64)


def com_distance(predicted: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """Distance (mm) between the two masks' centroids; NaN when either is empty."""
    a, b = center_of_mass(predicted, spacing), center_of_mass(truth, spacing)
    return math.nan if a is None or b is None else float(np.linalg.norm(a - b))


def saturated(median_ml: float, truth_ml: float, organ_ml: float, share: float = 0.5) -> bool:
    """A forecast fills the organ (at least ``share`` of it) where the truth does not."""
    return median_ml >= share * organ_ml and truth_ml < share * organ_ml


# -- scored samples and their summary ------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """One forecast of one quantity at one horizon, against the truth.

    lo/hi: the 95 % interval (None: a point forecast); members: the ensemble when known;
    dice/com_mm: of the predicted region, when the forecaster gives one."""

    forecaster: str
    quantity: str
    horizon: float
    patient: str
    cut: int
    truth: float
    median: float
    floor: float
    lo: float | None = None
    hi: float | None = None
    dice: float | None = None
    com_mm: float | None = None

    @property
    def rel(self) -> float:
        return relative_error(self.median, self.truth, self.floor)

    def floored(self, x: float) -> float:
        return max(float(x), self.floor)

    def crps(self) -> float:
        y = self.floored(self.truth)
        if self.lo is None or self.hi is None:
            return abs(self.floored(self.median) - y)
        q = split_normal_quantiles(self.floored(self.lo), self.floored(self.median), self.floored(self.hi))
        return crps_quantiles(CRPS_LEVELS, q, y)

    @property
    def covered(self) -> bool | None:
        if self.lo is None or self.hi is None:
            return None
        return self.floored(self.lo) <= self.floored(self.truth) <= self.floored(self.hi)


@dataclass
class Summary:
    """Scores of one (forecaster, quantity, horizon) group; horizon None pools all horizons.
    crps is the mean (the usual score, and what one wild interval dominates), crps_median its
    median."""

    forecaster: str
    quantity: str
    horizon: float | None
    n: int
    mdare: float
    bias: float
    within15: float
    coverage: float
    crps: float
    crps_median: float
    dice: float
    com_mm: float
    extra: dict = field(default_factory=dict)


def summarize(samples: Iterable[Scored]) -> list[Summary]:
    """One Summary per (forecaster, quantity, horizon) and per (forecaster, quantity) over all
    horizons, sorted. Coverage, Dice and CoM are NaN where no sample has them; Dice is the mean
    and the CoM distance the median of the finite ones."""
    groups: dict[tuple, list[Scored]] = defaultdict(list)
    for s in samples:
        groups[(s.forecaster, s.quantity, s.horizon)].append(s)
        groups[(s.forecaster, s.quantity, None)].append(s)
    out = []
    for (f, q, h), items in groups.items():
        rel = [s.rel for s in items]
        cov = [s.covered for s in items if s.covered is not None]
        dices = [s.dice for s in items if s.dice is not None and math.isfinite(s.dice)]
        coms = [s.com_mm for s in items if s.com_mm is not None and math.isfinite(s.com_mm)]
        crps = [s.crps() for s in items]
        out.append(Summary(
            forecaster=f, quantity=q, horizon=h, n=len(items), mdare=mdare(rel), bias=bias(rel),
            within15=within(rel), coverage=float(np.mean(cov)) if cov else math.nan,
            crps=float(np.mean(crps)), crps_median=float(np.median(crps)), dice=float(np.mean(dices)) if dices else math.nan,
            com_mm=float(np.median(coms)) if coms else math.nan,
        ))
    return sorted(out, key=lambda r: (r.forecaster, r.quantity, math.inf if r.horizon is None else r.horizon))


def log_ratio_band(persisted: Sequence[float], truths: Sequence[float], floor: float,
                   coverage_level: float = 0.95) -> tuple[float, float]:
    """The (1 - c)/2 and (1 + c)/2 quantiles of log(truth / persisted) on the floored scale:
    multiplied onto a persisted value they give persistence an empirical interval (fitted on
    the tuning seeds only). (0, 0) without data."""
    p = np.maximum(np.asarray(persisted, dtype=np.float64), floor)
    t = np.maximum(np.asarray(truths, dtype=np.float64), floor)
    if p.size == 0:
        return 0.0, 0.0
    r = np.log(t / p)
    a = (1.0 - coverage_level) / 2.0
    return float(np.quantile(r, a)), float(np.quantile(r, 1.0 - a))
