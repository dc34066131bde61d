"""A dataclass of per-member [B] tensors that can be moved, indexed, repeated and stacked.

Shared by the simulators' parameter sets (TumorParams, BurdenParams): each lists its tensor
fields in ``NAMES``; any other field (e.g. a growth-model name) is carried along unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

P = TypeVar("P", bound="BatchedParams")


class BatchedParams:
    NAMES: ClassVar[tuple[str, ...]]

    def _check_shapes(self) -> None:
        sizes = {getattr(self, n).shape for n in self.NAMES}
        if len(sizes) != 1 or len(next(iter(sizes))) != 1:
            raise ValueError(f"{type(self).__name__} fields must all be [B] tensors, got shapes {sizes}")

    @property
    def batch_size(self) -> int:
        return getattr(self, self.NAMES[0]).shape[0]

    @property
    def device(self) -> torch.device:
        return getattr(self, self.NAMES[0]).device

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self, self.NAMES[0]).dtype

    def _map(self: P, fn: Callable[[Tensor], Tensor]) -> P:
        return dataclasses.replace(self, **{n: fn(getattr(self, n)) for n in self.NAMES})  # type: ignore[type-var]

    def to(self: P, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> P:
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def index(self: P, idx) -> P:
        """Members selected by ``idx`` (int, slice, index or bool tensor); the batch dim is kept."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return self._map(lambda t: t[idx])

    def repeat(self: P, n: int) -> P:
        """Each member repeated ``n`` times consecutively (patients x members layout)."""
        return self._map(lambda t: t.repeat_interleave(n))

    def expand(self: P, batch: int) -> P:
        """Broadcast a batch-1 parameter set to ``batch`` members (copies)."""
        if self.batch_size == batch:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot expand a batch of {self.batch_size} to {batch}")
        return self._map(lambda t: t.expand(batch).clone())

    @classmethod
    def stack(cls: type[P], params: Sequence[P]) -> P:
        """Concatenate parameter sets along the batch (other fields must agree)."""
        first = params[0]
        others = {f.name for f in dataclasses.fields(first)} - set(cls.NAMES)  # type: ignore[arg-type]
        for name in others:
            values = {getattr(p, name) for p in params}
            if len(values) != 1:
                raise ValueError(f"cannot stack different {name} values {values}")
        return dataclasses.replace(first, **{n: torch.cat([getattr(p, n) for p in params]) for n in cls.NAMES})  # type: ignore[type-var]
