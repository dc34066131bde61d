"""The observation side of an analysis: one batch of observations for P problems (patients).

Patients rarely have the same number of observations, so a batch is padded to a common m and
``mask`` marks the real entries; padded entries never influence an analysis whatever they hold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ObsOperator", "Observations"]

ObsOperator = Callable[[Tensor], Tensor]
"""Maps an ensemble [P, N, n] to its predicted observations [P, N, m]."""


@dataclass(frozen=True)
class Observations:
    """Observations of P problems, padded to a common length m.

    y:         [P, m] observed values.
    r_var:     [P, m] observation-error variances (diagonal R). Required unless ``R`` is given.
    R:         [P, m, m] full observation-error covariance; overrides ``r_var`` where both are
               given (its diagonal is then used wherever a variance is needed, e.g. by the
               outlier gate). Padded rows/columns are ignored.
    mask:      [P, m] bool, True for a real observation. ``None`` means all real.
    locations: [P, m, d] (or [P, m] for d = 1) positions for localization, in the coordinates of
               the geometry the localized filter is given (grid index units for ``VoxelGrid``).
    """

    y: Tensor
    r_var: Tensor | None = None
    R: Tensor | None = None
    mask: Tensor | None = None
    locations: Tensor | None = None

    def __post_init__(self) -> None:
        if self.y.ndim != 2:
            raise ValueError(f"y must be [P, m], got {tuple(self.y.shape)}")
        P, m = self.y.shape
        if self.r_var is None and self.R is None:
            raise ValueError("give r_var [P, m] or R [P, m, m]")
        if self.r_var is not None and tuple(self.r_var.shape) != (P, m):
            raise ValueError(f"r_var must be {(P, m)}, got {tuple(self.r_var.shape)}")
        if self.R is not None and tuple(self.R.shape) != (P, m, m):
            raise ValueError(f"R must be {(P, m, m)}, got {tuple(self.R.shape)}")
        if self.mask is not None:
            if tuple(self.mask.shape) != (P, m) or self.mask.dtype != torch.bool:
                raise ValueError(f"mask must be a bool tensor of shape {(P, m)}")
        if self.locations is not None and tuple(self.locations.shape[:2]) != (P, m):
            raise ValueError(f"locations must be [P, m, d] with P, m = {(P, m)}")

    @property
    def n_problems(self) -> int:
        return self.y.shape[0]

    @property
    def n_obs(self) -> int:
        return self.y.shape[1]

    def valid(self) -> Tensor:
        """[P, m] bool: True for real (unpadded) observations."""
        if self.mask is None:
            return torch.ones(self.y.shape, dtype=torch.bool, device=self.y.device)
        return self.mask

    def variances(self) -> Tensor:
        """[P, m] error variances (the diagonal of ``R`` when a full ``R`` is given)."""
        if self.R is not None:
            return torch.diagonal(self.R, dim1=-2, dim2=-1)
        assert self.r_var is not None
        return self.r_var

    def coords(self) -> Tensor:
        """[P, m, d] locations (a trailing axis of size 1 is added for 1-D locations)."""
        if self.locations is None:
            raise ValueError("this filter needs Observations.locations")
        return self.locations[..., None] if self.locations.ndim == 2 else self.locations

    @classmethod
    def pad(
        cls,
        y: Sequence[Tensor],
        r_var: Sequence[Tensor],
        locations: Sequence[Tensor] | None = None,
    ) -> Observations:
        """Batch per-patient observations of different lengths m_p into one padded batch.

        y[p], r_var[p]: [m_p]; locations[p]: [m_p] or [m_p, d]. Padding holds y = 0,
        r_var = 1, location 0 and mask False.
        """
        if not y:
            raise ValueError("need at least one patient")
        if len(y) != len(r_var) or (locations is not None and len(locations) != len(y)):
            raise ValueError("y, r_var and locations need one entry per patient")
        m = max((int(v.shape[0]) for v in y), default=0)
        ref = y[0]
        P = len(y)
        Y = torch.zeros(P, m, dtype=ref.dtype, device=ref.device)
        Rv = torch.ones(P, m, dtype=ref.dtype, device=ref.device)
        M = torch.zeros(P, m, dtype=torch.bool, device=ref.device)
        L = None
        if locations is not None:
            tail = tuple(locations[0].shape[1:])
            L = torch.zeros((P, m, *tail), dtype=locations[0].dtype, device=ref.device)
        for p in range(P):
            k = int(y[p].shape[0])
            Y[p, :k] = y[p]
            Rv[p, :k] = r_var[p]
            M[p, :k] = True
            if L is not None and locations is not None:
                L[p, :k] = locations[p]
        return cls(y=Y, r_var=Rv, mask=M, locations=L)
