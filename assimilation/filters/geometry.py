"""Where state entries and observations sit, for localized analyses.

A geometry splits the state into *analysis units* (one local analysis each: a grid point, or a
block of voxels sharing one transform) and finds, for a chunk of units, the observations near
enough to matter together with their distances. State layout for both geometries:
``[spatial entries, n_extra non-spatial entries]``; the non-spatial tail (e.g. log-parameters
of the tumour model) has no position and is analysed by the LETKF's ``extra`` rule.

Coordinates: ``Points`` uses whatever coordinates its positions are given in; ``VoxelGrid``
uses voxel index coordinates (voxel (i, j, k) at (i, j, k)) and measures distances in physical
units, index differences times ``spacing``. Radii are in the distance units.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LocalUnits", "Points", "VoxelGrid"]


@dataclass(frozen=True, eq=False)
class LocalUnits:
    """Analysis units of a geometry (G of them, each updating up to U state entries).

    state_idx: [G, U] long, the state entries each unit updates; -1 pads.
    centres:   [G, d] the position distances are measured from.
    cells:     [G, 3] long block coordinates (``VoxelGrid`` only).
    """

    state_idx: Tensor
    centres: Tensor
    cells: Tensor | None = None

    def __len__(self) -> int:
        return self.state_idx.shape[0]

    def chunk(self, start: int, stop: int) -> LocalUnits:
        cells = None if self.cells is None else self.cells[start:stop]
        return LocalUnits(self.state_idx[start:stop], self.centres[start:stop], cells)


@dataclass(frozen=True, eq=False)
class Points:
    """State entries at explicit positions: one local analysis per entry.

    positions: [n_s] or [n_s, d] positions of the n_s spatial entries (the first n_s of the
               state); the remaining ``n_extra`` entries are non-spatial.
    period:    domain length for periodic coordinates (a float for all axes, or one per axis;
               None = not periodic). Lorenz-96: ``Points(torch.arange(40.), period=40.)``.
    distance:  optional custom metric (centres [G, d], locations [P, m, d]) -> [P, G, m],
               used instead of the (periodic) Euclidean distance.

    Candidates are all observations (a dense [P, G, m] distance matrix per chunk of units),
    which suits the moderate sizes of 1-D problems; the LETKF then keeps those with weight.
    """

    positions: Tensor
    period: float | Sequence[float] | None = None
    n_extra: int = 0
    distance: Callable[[Tensor, Tensor], Tensor] | None = None

    @property
    def n_spatial(self) -> int:
        return self.positions.shape[0]

    @property
    def n_state(self) -> int:
        return self.n_spatial + self.n_extra

    def _pos(self) -> Tensor:
        return self.positions[:, None] if self.positions.ndim == 1 else self.positions

    def units(self, device: torch.device, dtype: torch.dtype) -> LocalUnits:
        idx = torch.arange(self.n_spatial, device=device)[:, None]
        return LocalUnits(idx, self._pos().to(device=device, dtype=dtype))

    def index_observations(self, coords: Tensor, usable: Tensor) -> tuple[Tensor, Tensor]:
        """coords [P, m, d], usable [P, m] -> the state candidates() needs."""
        return coords, usable

    def candidates(
        self, index: tuple[Tensor, Tensor], units: LocalUnits, radius: float
    ) -> tuple[Tensor, Tensor]:
        """-> (obs index [P, Gc, m], distance [P, Gc, m]); unusable observations at distance inf."""
        coords, usable = index
        P, m, _ = coords.shape
        if self.distance is not None:
            dist = self.distance(units.centres, coords)
        else:
            diff = coords[:, None, :, :] - units.centres[None, :, None, :]
            if self.period is not None:
                period = torch.as_tensor(self.period, dtype=diff.dtype, device=diff.device)
                diff = torch.remainder(diff + 0.5 * period, period) - 0.5 * period
            dist = diff.square().sum(dim=-1).sqrt()
        dist = torch.where(usable[:, None, :], dist, torch.full_like(dist, math.inf))
        idx = torch.arange(m, device=coords.device).expand(P, len(units), m)
        return idx, dist


@dataclass(frozen=True, eq=False)
class VoxelGrid:
    """A 3-D grid [X, Y, Z] whose (masked) voxels form the spatial part of the state.

    shape:   (X, Y, Z).
    mask:    [X, Y, Z] bool, the voxels in the state, in C (row-major) order; None = all.
    block:   edge length of the cubic voxel blocks that share one local analysis. The block's
             nominal centre (b * block + (block - 1) / 2 per axis, also for blocks clipped by
             the grid edge) is where distances are measured from. Blocks without a state voxel
             are skipped.
    spacing: voxel size per axis (e.g. mm); distances and radii are in these units.
    n_extra: non-spatial entries appended after the voxels (e.g. log-parameters).

    Observations are found through a cell list (cells = blocks), so the cost grows with the
    number of observations near each block, not with the total.
    """

    shape: tuple[int, int, int]
    mask: Tensor | None = None
    block: int = 4
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    n_extra: int = 0

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive sizes, got {self.shape}")
        if self.mask is not None and tuple(self.mask.shape) != tuple(self.shape):
            raise ValueError(f"mask must have shape {self.shape}")
        if self.block < 1:
            raise ValueError("block must be >= 1")

    @property
    def n_field(self) -> int:
        return math.prod(self.shape) if self.mask is None else int(self.mask.sum())

    @property
    def n_state(self) -> int:
        return self.n_field + self.n_extra

    @property
    def blocks_per_axis(self) -> tuple[int, int, int]:
        b = self.block
        return (-(-self.shape[0] // b), -(-self.shape[1] // b), -(-self.shape[2] // b))

    def voxel_to_state(self, device: torch.device | None = None) -> Tensor:
        """[X * Y * Z] long: state index of each voxel (C order), -1 outside the mask."""
        if self.mask is None:
            return torch.arange(math.prod(self.shape), device=device)
        m = self.mask.reshape(-1).to(device)
        return torch.where(m, m.long().cumsum(0) - 1, -1)

    def to_state(self, field: Tensor, extra: Tensor | None = None) -> Tensor:
        """field [..., X, Y, Z] (and extra [..., n_extra]) -> state [..., n_state]."""
        flat = field.reshape(*field.shape[:-3], -1)
        if self.mask is not None:
            flat = flat[..., self.mask.reshape(-1).to(field.device)]
        if self.n_extra:
            if extra is None or extra.shape[-1] != self.n_extra:
                raise ValueError(f"give extra [..., {self.n_extra}]")
            flat = torch.cat([flat, extra.to(flat.dtype)], dim=-1)
        return flat

    def to_field(self, state: Tensor, fill: float = 0.0) -> Tensor:
        """state [..., n_state] -> field [..., X, Y, Z] (``fill`` outside the mask)."""
        vox = state[..., : self.n_field]
        if self.mask is None:
            return vox.reshape(*state.shape[:-1], *self.shape)
        out = torch.full((*state.shape[:-1], math.prod(self.shape)), fill, dtype=state.dtype,
                         device=state.device)
        out[..., self.mask.reshape(-1).to(state.device)] = vox
        return out.reshape(*state.shape[:-1], *self.shape)

    def units(self, device: torch.device, dtype: torch.dtype) -> LocalUnits:
        b = self.block
        nb = self.blocks_per_axis
        axes = [torch.arange(k, device=device) for k in nb]
        cells = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
        offs = [torch.arange(b, device=device)] * 3
        offs = torch.stack(torch.meshgrid(*offs, indexing="ij"), dim=-1).reshape(-1, 3)
        vox = cells[:, None, :] * b + offs[None]  # [G, b^3, 3]
        size = torch.tensor(self.shape, device=device)
        inside = (vox < size).all(dim=-1)
        vox = torch.minimum(vox, size - 1)
        flat = (vox[..., 0] * self.shape[1] + vox[..., 1]) * self.shape[2] + vox[..., 2]
        sidx = torch.where(inside, self.voxel_to_state(device)[flat], -1)
        active = (sidx >= 0).any(dim=-1)
        cells = cells[active]
        centres = cells.to(dtype) * b + 0.5 * (b - 1)
        return LocalUnits(sidx[active], centres, cells)

    def _cell_offsets(self, radius: float, device: torch.device) -> Tensor:
        """[O, 3] offsets of the cells that can hold observations within ``radius`` of a block
        centre: those whose nearest point (a cell spans [o b - 1/2, o b + b - 1/2) per axis) is
        closer than ``radius``. Observations outside the grid are filed under the edge cell,
        which only moves them farther from every centre, so the search stays exhaustive."""
        b = self.block
        nb = self.blocks_per_axis
        ranges = []
        for k, h in zip(nb, self.spacing):
            reach = k - 1 if math.isinf(radius) else min(k - 1, math.ceil(radius / (b * h) + 0.5))
            ranges.append(torch.arange(-reach, reach + 1, device=device))
        offs = torch.stack(torch.meshgrid(*ranges, indexing="ij"), dim=-1).reshape(-1, 3)
        h = torch.tensor(self.spacing, dtype=torch.float64, device=device)
        gap = (offs.abs().to(torch.float64) - 0.5).clamp_min(0.0) * b * h
        return offs[gap.square().sum(dim=-1).sqrt() < radius]

    def index_observations(self, coords: Tensor, usable: Tensor) -> dict[str, Tensor]:
        """File the usable observations [P, m] at coords [P, m, 3] by cell (sorted cell list)."""
        P, m, _ = coords.shape
        b = self.block
        nb = torch.tensor(self.blocks_per_axis, device=coords.device)
        n_cells = math.prod(self.blocks_per_axis)
        cell3 = torch.floor((coords + 0.5) / b).long()
        cell3 = torch.minimum(cell3.clamp_min(0), nb - 1)
        cell = (cell3[..., 0] * nb[1] + cell3[..., 1]) * nb[2] + cell3[..., 2]
        p = torch.arange(P, device=coords.device)[:, None]
        key = torch.where(usable, p * n_cells + cell, P * n_cells).reshape(-1)
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=P * n_cells + 1)[: P * n_cells]
        starts = counts.cumsum(0) - counts
        return {"coords": coords, "order": order, "counts": counts, "starts": starts}

    def candidates(
        self, index: dict[str, Tensor], units: LocalUnits, radius: float
    ) -> tuple[Tensor, Tensor]:
        """-> (obs index [P, Gc, K], distance [P, Gc, K]) for the observations filed in the
        cells near each unit; padding at distance inf."""
        assert units.cells is not None
        coords = index["coords"]
        P, m, _ = coords.shape
        device = coords.device
        nb = torch.tensor(self.blocks_per_axis, device=device)
        n_cells = math.prod(self.blocks_per_axis)
        G = len(units)
        offs = self._cell_offsets(radius, device)
        O = offs.shape[0]
        nc = units.cells[:, None, :] + offs[None]  # [G, O, 3]
        inside = ((nc >= 0) & (nc < nb)).all(dim=-1)
        nc = torch.minimum(nc.clamp_min(0), nb - 1)
        ncf = (nc[..., 0] * nb[1] + nc[..., 1]) * nb[2] + nc[..., 2]
        key = torch.arange(P, device=device)[:, None, None] * n_cells + ncf[None]  # [P, G, O]
        lengths = torch.where(inside[None], index["counts"].take(key), 0).reshape(-1)
        starts = index["starts"].take(key).reshape(-1)
        per_unit = lengths.reshape(P * G, O).sum(dim=-1)
        K = int(per_unit.max()) if per_unit.numel() else 0
        idx = torch.zeros(P * G * K, dtype=torch.long, device=device)
        dist = torch.full((P * G * K,), math.inf, dtype=coords.dtype, device=device)
        total = int(lengths.sum())
        if total:
            # Ragged concatenation of the cells' observation runs, without a Python loop.
            run = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
            pos = torch.arange(total, device=device)
            run_shift = (starts - (lengths.cumsum(0) - lengths)).index_select(0, run)
            src = index["order"].index_select(0, pos + run_shift)  # flat p * m + j
            unit = run // O
            # Slot within the unit's row: the runs of one unit are consecutive.
            slot_shift = (per_unit.cumsum(0) - per_unit).index_select(0, unit)
            flat = unit * K + pos - slot_shift
            idx.index_copy_(0, flat, src % m)
            h = torch.tensor(self.spacing, dtype=coords.dtype, device=device)
            centre = units.centres.to(coords.dtype).repeat(P, 1).index_select(0, unit)
            d = ((coords.reshape(P * m, 3).index_select(0, src) - centre) * h).square().sum(-1).sqrt()
            dist.index_copy_(0, flat, d)
        return idx.reshape(P, G, K), dist.reshape(P, G, K)
