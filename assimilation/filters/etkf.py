"""Ensemble transform Kalman filter with the symmetric square root."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .observations import ObsOperator, Observations
from .prior import FilterSettings, finish, prepare_prior, whiten
from .result import AnalysisResult
from .transform import etkf_transform, member_operator

__all__ = ["ETKF"]


@dataclass(frozen=True, kw_only=True)
class ETKF(FilterSettings):
    """Global ETKF (Bishop et al. 2001; Hunt et al. 2007), deterministic.

    For a linear observation operator and an ensemble whose sample mean and covariance equal the
    prior's (possible when N > n), the analysis mean and sample covariance equal the Kalman
    filter's exactly. Accepts diagonal or full R. Settings: see ``FilterSettings``.
    """

    def analyse(
        self,
        X: Tensor,
        obs: Observations,
        HX: Tensor | None = None,
        h: ObsOperator | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> AnalysisResult:
        """X [P, N, n], obs (m observations), HX [P, N, m] or h -> AnalysisResult.

        ``generator`` is accepted for a uniform filter interface and not used.
        """
        prior = prepare_prior(X, obs, HX, h, self)
        Yw, dw = whiten(prior, obs)
        T = etkf_transform(Yw, dw)
        informed = prior.used.any(dim=-1)
        # With nothing to assimilate the transform is the identity (up to rounding): use it
        # exactly, so a problem without observations keeps its (inflated) prior.
        eye = torch.eye(T.shape[-1], dtype=T.dtype, device=T.device)
        T = torch.where(informed[:, None, None], T, eye)
        M = member_operator(T, self.inflation)
        X_a = M @ X
        if not bool(informed.all()):
            X_a = torch.where(informed[:, None, None], X_a, prior.inflated())
        return finish(X_a, prior, self)
