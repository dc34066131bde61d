"""The in-memory seen-filter: no false negatives ever, false positives within the bound as it
grows past its first capacity."""

from __future__ import annotations

import random
import uuid

import pytest

from stream.seen import SeenFilter


def _ids(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


def test_every_added_id_is_found_across_growth() -> None:
    seen = SeenFilter(capacity=1000)
    ids = _ids(20_000, 1)
    for i, e in enumerate(ids):
        seen.add(e)
        if i % 997 == 0:  # visible at once, in the filter it went to and after more growth
            assert e in seen
    assert all(e in seen for e in ids)
    assert len(seen) == len(ids)
    assert len(seen._filters) >= 4  # it did grow: 1000, 2000, 4000, 8000, 16000


@pytest.mark.parametrize("error", [1e-2, 1e-3])
def test_the_false_positive_rate_stays_within_the_bound(error: float) -> None:
    seen = SeenFilter(_ids(30_000, 2), capacity=2000, error=error)
    others = _ids(100_000, 3)
    rate = sum(e in seen for e in others) / len(others)
    # The filters are sized for error/2 in all: 100k probes keep the sampling error well under the gap.
    assert rate < error, rate
    # and memory stays near the information-theoretic size (1.44 log2(1/e) bits per id)
    assert seen.nbytes < 30_000 * 2.0 * 1.44 * -__import__("math").log2(error) / 8


def test_non_strings_and_empty_filters_are_not_found() -> None:
    seen = SeenFilter()
    assert "00000000-0000-4000-8000-000000000000" not in seen
    assert 42 not in seen
    with pytest.raises(ValueError):
        SeenFilter(capacity=0)
