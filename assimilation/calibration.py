"""Calibration a user can see: does a twin's predictive distribution cover what it observes next?

Before each analysis the twin has a prediction of every scalar it is about to observe (the
visible volume of a study, a marker level, a ctDNA fraction): its members' predictions HX_i
plus the observation noise of variance r. The probability integral transform (PIT) of the
observed y under that mixture,

    PIT = (1/N) Σ_i Φ((y − HX_i) / √r),

is uniform on [0, 1] when the twin is calibrated (Gneiting, Balabdaoui & Raftery 2007); the
observation lies inside the central 95 % predictive interval when 0.025 ≤ PIT ≤ 0.975. The
checks are exact, deterministic functions of the prior ensemble (no draws), computed in the
space the operator works in (log for markers and ctDNA), where PIT is invariant anyway.

A twin is flagged when its intervals stop covering its own observations: at least
``min_checks`` checks, and a one-sided binomial test of the coverage against the nominal 95 %
at level ``alpha`` (too few inside to be chance).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "NOMINAL",
    "PIT_BINS",
    "Calibration",
    "PredictiveCheck",
    "binomial_cdf",
    "pit",
    "summarize",
]

NOMINAL = 0.95
PIT_BINS = 10


@dataclass(frozen=True)
class PredictiveCheck:
    """One observation against the twin's prediction of it, made before it was analysed.

    quantity: what was observed ("tumor_volume_ml", "marker:<LOINC>", "ctdna_tumor_fraction").
    t_days:   when (twin days); event_id: the observation's.
    pit:      P(prediction ≤ observation) under the predictive mixture, in [0, 1].
    """

    quantity: str
    t_days: float
    event_id: str
    pit: float

    @property
    def inside(self) -> bool:
        """Whether the observation lies in the central 95 % predictive interval."""
        lo = (1.0 - NOMINAL) / 2.0
        return lo <= self.pit <= 1.0 - lo


def pit(hx: Tensor, y: Tensor, r_var: Tensor) -> Tensor:
    """PIT of observations under an ensemble-plus-noise mixture.

    hx [..., N, m] member predictions, y [..., m] observed, r_var [..., m] noise variances
    (> 0). Returns [..., m] in [0, 1], computed in float64."""
    sd = r_var.to(torch.float64).clamp_min(1e-30).sqrt()
    z = (y.to(torch.float64)[..., None, :] - hx.to(torch.float64)) / sd[..., None, :]
    return torch.special.ndtr(z).mean(dim=-2)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X ≤ k) for X ~ Binomial(n, p), summed exactly in log space."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
             + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


@dataclass(frozen=True)
class Calibration:
    """Running calibration of a set of checks (one patient, one quantity, or a cohort).

    n: checks; inside: how many fell inside the 95 % interval; histogram: PIT counts in
    ``PIT_BINS`` equal bins of [0, 1]; flagged: the coverage is too low to be chance."""

    n: int
    inside: int
    histogram: tuple[int, ...]
    flagged: bool

    @property
    def coverage(self) -> float:
        return self.inside / self.n if self.n else math.nan

    def to_json(self) -> dict:
        return {"checks": self.n, "inside_95": self.inside,
                "coverage_95": None if self.n == 0 else round(self.coverage, 4),
                "pit_histogram": list(self.histogram), "flagged": self.flagged}


def summarize(checks: Iterable[PredictiveCheck], *, min_checks: int = 5, alpha: float = 0.01) -> Calibration:
    """Coverage, PIT histogram and flag of ``checks``."""
    hist = [0] * PIT_BINS
    n = inside = 0
    for c in checks:
        n += 1
        inside += int(c.inside)
        hist[min(PIT_BINS - 1, max(0, int(c.pit * PIT_BINS)))] += 1
    flagged = n >= min_checks and binomial_cdf(inside, n, NOMINAL) < alpha
    return Calibration(n, inside, tuple(hist), flagged)


def checks_of(quantities: Sequence[str], hx: Tensor, y: Tensor, r_var: Tensor, t_days: float,
              event_ids: Sequence[str]) -> list[PredictiveCheck]:
    """One check per observation of a block with one patient: hx [1, N, m], y, r_var [1, m]."""
    values = pit(hx[0], y[0], r_var[0]).tolist()
    return [PredictiveCheck(q, float(t_days), e, float(v)) for q, e, v in zip(quantities, event_ids, values)]
