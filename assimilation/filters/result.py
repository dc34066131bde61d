"""What every analysis returns: the analysis ensemble and what happened to the observations."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from torch import Tensor

from .inflation import spread

__all__ = ["AnalysisDiagnostics", "AnalysisResult"]


@dataclass(frozen=True)
class AnalysisDiagnostics:
    """Per-problem record of one analysis (P problems, m padded observations).

    innovation:      [P, m] y - mean(HX) of the prior; 0 at padded entries.
    innovation_std:  [P, m] sqrt(var(HX) + r) of the (inflated) prior, the outlier gate's scale.
    rejected:        [P, m] bool, real observations refused by the outlier gate.
    n_rejected:      [P] number of rejected observations.
    n_used:          [P] number of observations that entered the analysis.
    spread_prior:    [P] sqrt(mean over state entries of the member variance) of the prior as
                     passed in (before inflation).
    spread_analysis: [P] the same for the analysis ensemble (after RTPS).

    The two spreads cost a pass over each ensemble (as much as a global update itself), so they
    are computed on first access and then kept; until then the diagnostics hold references to
    the prior and analysis ensembles.
    """

    innovation: Tensor
    innovation_std: Tensor
    rejected: Tensor
    n_rejected: Tensor
    n_used: Tensor
    prior_ensemble: Tensor = field(repr=False, compare=False)
    analysis_ensemble: Tensor = field(repr=False, compare=False)

    @cached_property
    def spread_prior(self) -> Tensor:
        return spread(self.prior_ensemble)

    @cached_property
    def spread_analysis(self) -> Tensor:
        return spread(self.analysis_ensemble)


@dataclass(frozen=True)
class AnalysisResult:
    """X_a: [P, N, n] analysis ensemble; diagnostics: see ``AnalysisDiagnostics``."""

    X_a: Tensor
    diagnostics: AnalysisDiagnostics
