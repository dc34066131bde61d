"""Local ETKF (Hunt, Kostelich & Szunyogh 2007) with Gaspari-Cohn R-localization."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .geometry import Points, VoxelGrid
from .localization import compact_local, gaspari_cohn
from .observations import ObsOperator, Observations
from .prior import FilterSettings, PreparedPrior, finish, prepare_prior
from .result import AnalysisResult
from .transform import etkf_transform, member_operator

__all__ = ["LETKF"]


@dataclass(frozen=True, kw_only=True)
class LETKF(FilterSettings):
    """LETKF: one ETKF per analysis unit of ``geometry``, all of them batched.

    geometry:   ``Points`` (one local analysis per entry; 1-D/periodic for Lorenz-96) or
                ``VoxelGrid`` (one per voxel block, e.g. 4^3 voxels sharing a transform).
    radius:     distance at which the Gaspari-Cohn weight reaches zero (= 2c, c the GC
                half-width); ``math.inf`` disables localization (then LETKF == ETKF).
    min_weight: observations with a GC weight <= this are dropped from a local analysis.
    extra:      what happens to the non-spatial tail of the state (``geometry.n_extra``
                entries, e.g. log-parameters): "global" gives it one ETKF analysis with every
                used observation, their precision multiplied by ``extra_obs_weight`` (< 1
                tempers the many image voxels that would otherwise collapse the parameter
                spread); "prior" leaves it as the (inflated) prior.
    chunk:      analysis units per batched step; bounds memory (P * chunk * N * K floats).

    R-localization: within a local analysis each observation's error variance is divided by its
    GC weight, so the local transform is the ETKF's with precision w / r. This needs a diagonal
    R; a full ``Observations.R`` is refused. Observation locations come from
    ``Observations.locations`` in the geometry's coordinates. Units without an observation of
    positive weight keep their (inflated) prior members exactly.
    """

    geometry: Points | VoxelGrid
    radius: float
    min_weight: float = 1e-6
    extra: Literal["global", "prior"] = "global"
    extra_obs_weight: float = 1.0
    chunk: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.radius > 0:
            raise ValueError(f"radius must be positive, got {self.radius}")
        if self.extra not in ("global", "prior"):
            raise ValueError(f"extra must be 'global' or 'prior', got {self.extra!r}")
        if self.chunk < 1:
            raise ValueError("chunk must be >= 1")

    def analyse(
        self,
        X: Tensor,
        obs: Observations,
        HX: Tensor | None = None,
        h: ObsOperator | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> AnalysisResult:
        """X [P, N, n] with n = geometry.n_state, obs with locations, HX [P, N, m] or h.

        ``generator`` is accepted for a uniform filter interface and not used.
        """
        if obs.R is not None:
            raise ValueError("the LETKF localizes a diagonal R; give Observations.r_var")
        if X.shape[-1] != self.geometry.n_state:
            raise ValueError(f"state has {X.shape[-1]} entries, geometry {self.geometry.n_state}")
        prior = prepare_prior(X, obs, HX, h, self)
        X_inf = prior.inflated()
        X_a = X_inf.clone()  # our own buffer; entries no analysis touches keep the prior
        self._local_analyses(prior, obs, X_inf, X_a)
        if self.geometry.n_extra and self.extra == "global":
            self._extra_analysis(prior, X_inf, X_a)
        return finish(X_a, prior, self)

    def _local_analyses(
        self, prior: PreparedPrior, obs: Observations, X_inf: Tensor, X_a: Tensor
    ) -> None:
        """Write the local analyses of all spatial units into ``X_a`` (our own buffer)."""
        P, N, _ = prior.X.shape
        m = prior.d.shape[-1]
        dev, dt = prior.X.device, prior.X.dtype
        coords = obs.coords().to(device=dev, dtype=dt)
        units = self.geometry.units(dev, dt)
        index = self.geometry.index_observations(coords, prior.used)
        # Whiten once, then one gather per chunk fetches anomalies and innovation together.
        s = prior.used.to(dt) * prior.r_var.rsqrt()
        table = torch.cat([prior.Y.mT, prior.d[:, :, None]], dim=-1) * s[:, :, None]
        table = table.reshape(P * m, N + 1)
        offset = torch.arange(P, device=dev)[:, None, None] * m
        for start in range(0, len(units), self.chunk):
            part = units.chunk(start, start + self.chunk)
            idx, dist = self.geometry.candidates(index, part, self.radius)
            idx, w = compact_local(idx, gaspari_cohn(dist, self.radius), self.min_weight)
            local = table.index_select(0, (idx + offset).reshape(-1)).reshape(*idx.shape, N + 1)
            local = local * w.sqrt()[..., None]  # R-localization: precision w / r
            T = etkf_transform(local[..., :N].mT, local[..., N])  # [P, Gc, N, N]
            sidx = part.state_idx
            ok = sidx >= 0
            sc = sidx.clamp_min(0)
            flat = sc.reshape(-1)
            X_l = prior.X.index_select(2, flat).reshape(P, N, *sc.shape).permute(0, 2, 1, 3)
            X_l = member_operator(T, prior.inflation) @ X_l  # [P, Gc, N, U]
            informed = (w > 0).any(dim=-1)
            if not bool(informed.all()):
                keep = X_inf.index_select(2, flat).reshape(P, N, *sc.shape).permute(0, 2, 1, 3)
                X_l = torch.where(informed[:, :, None, None], X_l, keep)
            X_a[:, :, sidx[ok]] = X_l.permute(0, 2, 1, 3)[:, :, ok]

    def _extra_analysis(self, prior: PreparedPrior, X_inf: Tensor, X_a: Tensor) -> None:
        """Global ETKF for the non-spatial tail, with tempered observation precision."""
        n_extra = self.geometry.n_extra
        s = (self.extra_obs_weight * prior.used.to(prior.Y.dtype) / prior.r_var).sqrt()
        T = etkf_transform(prior.Y * s[:, None, :], prior.d * s)
        tail = member_operator(T, prior.inflation) @ prior.X[:, :, -n_extra:]
        informed = prior.used.any(dim=-1)[:, None, None] & (self.extra_obs_weight > 0)
        X_a[:, :, -n_extra:] = torch.where(informed, tail, X_inf[:, :, -n_extra:])
