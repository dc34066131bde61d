"""Stochastic (perturbed-observation) EnKF (Burgers et al. 1998; Evensen 2003)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .observations import ObsOperator, Observations
from .prior import FilterSettings, finish, prepare_prior, whiten
from .result import AnalysisResult
from .transform import member_operator

__all__ = ["StochasticEnKF", "draw_perturbations"]


def draw_perturbations(
    used: Tensor,
    N: int,
    generator: torch.Generator | Sequence[torch.Generator],
    dtype: torch.dtype,
) -> Tensor:
    """Standard-normal draws [P, N, m] for the observations marked in ``used`` [P, m], 0 elsewhere.

    One generator draws the whole batch at once. A sequence of P generators (one per patient,
    e.g. seeded from (patient, event id)) draws each patient's perturbations from its own
    generator, only for that patient's used observations in order, so a patient's analysis does
    not depend on which other patients share the batch or on the padded length.
    """
    P, m = used.shape
    device = used.device
    if isinstance(generator, torch.Generator):
        eps = torch.randn(P, N, m, generator=generator, dtype=dtype, device=device)
        return torch.where(used[:, None, :], eps, torch.zeros((), dtype=dtype, device=device))
    if len(generator) != P:
        raise ValueError(f"need one generator per problem ({P}), got {len(generator)}")
    eps = torch.zeros(P, N, m, dtype=dtype, device=device)
    for p, g in enumerate(generator):
        cols = used[p].nonzero().squeeze(-1)
        draw = torch.randn(N, cols.numel(), generator=g, dtype=dtype, device=device)
        eps[p, :, cols] = draw
    return eps


@dataclass(frozen=True, kw_only=True)
class StochasticEnKF(FilterSettings):
    """EnKF with perturbed observations, solved in ensemble space.

    Each member is updated with its own perturbed observation y + e_j, e_j ~ N(0, R) drawn
    from the caller's generator(s). The perturbations are re-centred to zero mean over the
    members (so the analysis mean is the Kalman update of the prior mean) and, with
    ``rescale=True``, scaled so that their sample variance is exactly r per observation (for a
    full R: exactly 1 per component in the whitened space R^-1/2 e).
    The gain uses the true R: K = A^T Y (Y^T Y + (N - 1) R)^-1 in whitened form, solved through
    the N x N system (N - 1) I + Y Y^T or the m x m system (N - 1) I + Y^T Y, whichever is
    smaller. Accepts diagonal or full R. Settings: see ``FilterSettings``.
    """

    rescale: bool = False

    def analyse(
        self,
        X: Tensor,
        obs: Observations,
        HX: Tensor | None = None,
        h: ObsOperator | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> AnalysisResult:
        """X [P, N, n], obs (m observations), HX [P, N, m] or h -> AnalysisResult.

        ``generator``: one torch.Generator for the batch, or one per problem (see
        ``draw_perturbations``); required, on the ensemble's device.
        """
        if generator is None:
            raise ValueError("the stochastic EnKF needs a torch.Generator for its perturbations")
        prior = prepare_prior(X, obs, HX, h, self)
        Yw, dw = whiten(prior, obs)
        P, N, m = Yw.shape
        eps = draw_perturbations(prior.used, N, generator, X.dtype)
        eps = eps - eps.mean(dim=1, keepdim=True)
        if self.rescale:
            sd = eps.square().sum(dim=1, keepdim=True).div(N - 1).sqrt()
            eps = eps / torch.where(sd > 0, sd, torch.ones_like(sd))
        # Whitened member innovations (y + e_j - HX_j); R^-1/2 e_j is standard normal.
        delta = dw[:, None, :] + eps - Yw
        informed = prior.used.any(dim=-1)[:, None, None]
        if N <= m:
            C = Yw @ Yw.mT
            C.diagonal(dim1=-2, dim2=-1).add_(N - 1)
            # T[i, j]: weight of (inflated) prior anomaly i in the increment of member j.
            T = torch.cholesky_solve(Yw @ delta.mT, torch.linalg.cholesky(C))
            T = torch.where(informed, T, torch.zeros_like(T))
            T.diagonal(dim1=-2, dim2=-1).add_(1.0)  # members = prior + increment
            M = member_operator(T, self.inflation)
            X_a = M @ X
        else:
            G = Yw.mT @ Yw
            G.diagonal(dim1=-2, dim2=-1).add_(N - 1)
            Z = torch.cholesky_solve(delta.mT, torch.linalg.cholesky(G))  # [P, m, N]
            # Increment Z^T Yw^T A with A = inflation * (X - mean) and Yw centred over members,
            # so Yw^T A = inflation * Yw^T X: no N x N or anomaly matrix is formed.
            X_a = prior.inflated() + self.inflation * (Z.mT @ (Yw.mT @ X))
        if not bool(informed.all()):
            X_a = torch.where(informed, X_a, prior.inflated())
        return finish(X_a, prior, self)
