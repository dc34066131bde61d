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
    "mixture_quantiles",
    "model_error_rate",
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
    In the log space of the quantity (``log_space``): innovation (observed minus the members'
    mean), spread_var (the members' variance), r_var (the observation's error variance), and
    dt_days, the prediction's lead time (days since the quantity was last observed, or since
    the twin's first study): what ``model_error_rate`` learns from.
    """

    quantity: str
    t_days: float
    event_id: str
    pit: float
    innovation: float = 0.0
    spread_var: float = 0.0
    r_var: float = 0.0
    dt_days: float = 0.0

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
              event_ids: Sequence[str], dt_days: float = 0.0) -> list[PredictiveCheck]:
    """One check per observation of a block with one patient, in the quantity's log space:
    hx [1, N, m], y, r_var [1, m]."""
    values = pit(hx[0], y[0], r_var[0]).tolist()
    h = hx[0].to(torch.float64)
    d = (y[0].to(torch.float64) - h.mean(0)).tolist()
    s2 = h.var(0, unbiased=True).tolist() if h.shape[0] > 1 else [0.0] * len(d)
    r = r_var[0].to(torch.float64).tolist()
    return [PredictiveCheck(q, float(t_days), e, float(v), float(di), float(si), float(ri), float(dt_days))
            for q, e, v, di, si, ri in zip(quantities, event_ids, values, d, s2, r)]


# Log-space offsets: volumes (mL) are compared as log(V + c) so that a tumour that vanishes
# does not make the log diverge; the marker and ctDNA operators already work in log space.
VOLUME_LOG_OFFSET_ML = 0.5


def model_error_rate(checks: Iterable[PredictiveCheck], prior_rate: float, prior_days: float) -> float:
    """The growth rate q (log-space variance per day) of the error the twin's model makes.

    Between analyses the truth drifts from every member in ways the model cannot represent;
    if that error grows like a random walk, an innovation over dt days has
    E[d²] = s² + r + q·dt (s² the members' spread, r the observation's error variance). The
    moment estimate from the checks is shrunk to ``prior_rate`` with the weight of
    ``prior_days`` of predictions (a few checks cannot tell q alone):

        q = max(0, (Σ (d² − s² − r) + prior_rate · prior_days) / (Σ dt + prior_days)).
    """
    excess, days = prior_rate * prior_days, prior_days
    for c in checks:
        if c.dt_days > 0:
            excess += c.innovation ** 2 - c.spread_var - c.r_var
            days += c.dt_days
    return max(0.0, excess / days) if days > 0 else 0.0


def mixture_quantiles(centres: Tensor, var: Tensor, qs: Sequence[float], iterations: int = 60) -> Tensor:
    """Quantiles of the equal-weight Gaussian mixture (1/N) Σ_i N(centres_i, var).

    centres [..., N]; var [...] (> 0 where it matters: with 0 the mixture is the members'
    point masses, whose quantiles are steps); returns [..., len(qs)]. Bisection on the mixture
    CDF over [min − 8σ, max + 8σ]: monotone, exact to 2^-iterations of the range.
    Used to dress an ensemble forecast with the model error it cannot carry (Roulston & Smith
    2003; Wang & Bishop 2005)."""
    c = centres.to(torch.float64)
    sd = var.to(torch.float64).clamp_min(0.0).sqrt()[..., None]  # [..., 1]
    lo = c.min(-1, keepdim=True).values - 8.0 * sd - 1e-9
    hi = c.max(-1, keepdim=True).values + 8.0 * sd + 1e-9
    q = torch.tensor(list(qs), dtype=torch.float64, device=c.device)
    shape = (*c.shape[:-1], q.numel())
    lo, hi = lo.expand(shape).clone(), hi.expand(shape).clone()
    safe = sd.clamp_min(1e-300)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        z = (mid[..., :, None] - c[..., None, :]) / safe[..., None]
        cdf = torch.where(sd[..., None] > 0, torch.special.ndtr(z), (z >= 0).to(torch.float64)).mean(-1)
        below = cdf < q
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)
