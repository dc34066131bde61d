"""The steps every EnKF variant shares before and after its own update.

Before: inflate the prior, map it to observation space, form innovations, gate outliers and
blank out padded/rejected observations. After: relax to prior spread and assemble diagnostics.

The state-space ensemble is touched as little as possible: the updates are expressed as a
member-space operator M [P, N, N] with X_a = M X (see ``transform.member_operator``), so a
global analysis reads the prior once, for that product, and never materializes anomalies or
an inflated copy unless an observation operator needs the latter. The spread diagnostics are
computed when read (see ``AnalysisDiagnostics``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .inflation import inflate, rtps
from .observations import ObsOperator, Observations
from .outliers import innovation_gate
from .result import AnalysisDiagnostics, AnalysisResult

__all__ = ["FilterSettings", "PreparedPrior", "finish", "prepare_prior", "whiten"]


@dataclass(frozen=True, kw_only=True)
class FilterSettings:
    """Settings every filter shares.

    inflation: multiplicative prior inflation of the anomalies (covariance x inflation**2),
               applied before the update; 1 = none.
    rtps:      relaxation-to-prior-spread factor alpha in [0, 1] applied after the update,
               relative to the prior as passed in (before inflation); 0 = none.
    outlier_k: reject observations with |innovation| > outlier_k * sqrt(var(HX) + r);
               None = keep all. Rejections are reported in the diagnostics.
    """

    inflation: float = 1.0
    rtps: float = 0.0
    outlier_k: float | None = None

    def __post_init__(self) -> None:
        if self.inflation <= 0:
            raise ValueError(f"inflation must be positive, got {self.inflation}")
        if not 0.0 <= self.rtps <= 1.0:
            raise ValueError(f"rtps must lie in [0, 1], got {self.rtps}")


@dataclass(frozen=True)
class PreparedPrior:
    """The prior in the form the updates consume (P problems, N members, n state, m obs).

    X:          [P, N, n] prior members as passed in (not inflated).
    inflation:  the multiplicative factor the updates apply (see ``transform.member_operator``).
    Y:          [P, N, m] observation-space anomalies after inflation; 0 where not ``used``.
    d:          [P, m] innovations y - mean(HX); 0 where not ``used``.
    r_var:      [P, m] error variances; 1 where not ``used``.
    used:       [P, m] bool, real observations that passed the outlier gate.
    innovation, innovation_std, rejected: [P, m] for the diagnostics.
    X_inflated: [P, N, n] the inflated prior when it had to be built for ``h``, else None.
    """

    X: Tensor
    inflation: float
    Y: Tensor
    d: Tensor
    r_var: Tensor
    used: Tensor
    innovation: Tensor
    innovation_std: Tensor
    rejected: Tensor
    X_inflated: Tensor | None = None

    def inflated(self) -> Tensor:
        """[P, N, n] inflated prior members (the prior itself when inflation is 1)."""
        if self.X_inflated is not None:
            return self.X_inflated
        return inflate(self.X, self.inflation)


def prepare_prior(
    X: Tensor,
    obs: Observations,
    HX: Tensor | None,
    h: ObsOperator | None,
    settings: FilterSettings,
) -> PreparedPrior:
    """Inflate, observe, gate. X [P, N, n]; HX [P, N, m] or h: [P, N, n] -> [P, N, m].

    With ``h`` the inflated members are observed; a caller-supplied ``HX`` is taken to belong to
    the prior as passed in and its anomalies are inflated by the same factor (exact for a
    linear operator).
    """
    if X.ndim != 3:
        raise ValueError(f"X must be [P, N, n], got {tuple(X.shape)}")
    P, N, _ = X.shape
    if N < 2:
        raise ValueError("an ensemble needs at least 2 members")
    if obs.n_problems != P:
        raise ValueError(f"X holds {P} problems but the observations {obs.n_problems}")
    if (HX is None) == (h is None):
        raise ValueError("pass exactly one of HX and h")

    X_inflated = None
    if HX is None:
        assert h is not None
        if settings.inflation != 1.0:
            X_inflated = inflate(X, settings.inflation)
        HX = h(X if X_inflated is None else X_inflated)
    elif settings.inflation != 1.0:
        HX = inflate(HX, settings.inflation)
    if HX.shape != (P, N, obs.n_obs):
        raise ValueError(f"HX must be {(P, N, obs.n_obs)}, got {tuple(HX.shape)}")
    HX = HX.to(dtype=X.dtype, device=X.device)

    valid = obs.valid().to(X.device)
    y = obs.y.to(dtype=X.dtype, device=X.device)
    r_var = obs.variances().to(dtype=X.dtype, device=X.device)
    # Padded slots may hold anything (even NaN); they must not leak into sums.
    zero = torch.zeros((), dtype=X.dtype, device=X.device)
    one = torch.ones((), dtype=X.dtype, device=X.device)
    hx_mean = HX.mean(dim=1)
    Y = HX - hx_mean[:, None, :]  # may hold NaN in padded columns until masked below
    innovation = torch.where(valid, y - hx_mean, zero)
    r_var = torch.where(valid, r_var, one)
    var_hx = Y.square().sum(dim=1) / (N - 1)
    rejected, scale = innovation_gate(innovation, var_hx, r_var, valid, settings.outlier_k)
    used = valid & ~rejected
    if not bool(used.all()):
        Y = torch.where(used[:, None, :], Y, zero)
    return PreparedPrior(
        X=X,
        inflation=settings.inflation,
        Y=Y,
        d=torch.where(used, innovation, zero),
        r_var=torch.where(used, r_var, one),
        used=used,
        innovation=innovation,
        innovation_std=torch.where(valid, scale, zero),
        rejected=rejected,
        X_inflated=X_inflated,
    )


def whiten(prior: PreparedPrior, obs: Observations) -> tuple[Tensor, Tensor]:
    """Observation-space anomalies and innovations in units of the observation error.

    Returns (R^-1/2 Y [P, N, m], R^-1/2 d [P, m]); unused observations stay exactly 0. With a
    full ``R`` the Cholesky factor of R (identity on unused rows/columns, which keeps them
    decoupled) is used, otherwise the diagonal.
    """
    if obs.R is None:
        s = prior.used.to(prior.Y.dtype) * prior.r_var.rsqrt()
        return prior.Y * s[:, None, :], prior.d * s
    R = obs.R.to(dtype=prior.Y.dtype, device=prior.Y.device)
    both = prior.used[:, :, None] & prior.used[:, None, :]
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    R = torch.where(both, R, eye.expand_as(R))
    L = torch.linalg.cholesky(R)
    rhs = torch.cat([prior.Y.mT, prior.d[:, :, None]], dim=-1)  # [P, m, N + 1]
    z = torch.linalg.solve_triangular(L, rhs, upper=False)
    return z[:, :, :-1].mT, z[:, :, -1]


def finish(X_a: Tensor, prior: PreparedPrior, settings: FilterSettings) -> AnalysisResult:
    """Apply RTPS (towards the prior as passed in) and collect the diagnostics."""
    X_a = rtps(prior.X, X_a, settings.rtps)
    diagnostics = AnalysisDiagnostics(
        innovation=prior.innovation,
        innovation_std=prior.innovation_std,
        rejected=prior.rejected,
        n_rejected=prior.rejected.sum(dim=-1),
        n_used=prior.used.sum(dim=-1),
        prior_ensemble=prior.X,
        analysis_ensemble=X_a,
    )
    return AnalysisResult(X_a=X_a, diagnostics=diagnostics)
