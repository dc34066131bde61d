"""Virtual patients that present: a tumour grown untreated from a small seed to a drawn visible
volume before day 0 (models.virtual_patient.CohortConfig.presentation_volume_ml)."""

from __future__ import annotations

import torch

from models.grid import Grid
from models.observables import tumor_volume
from models.virtual_patient import CohortConfig, generate_patient

CONFIG = CohortConfig(grid=Grid((16, 16, 16), (5.0, 5.0, 5.0)), observe_days=20.0, truth_margin_days=1.0,
                      seed_radius_mm=(2.0, 4.0), presentation_volume_ml=(5.0, 15.0))


def test_a_presenting_tumour_starts_at_its_drawn_volume():
    for i in range(3):
        p = generate_patient(i, 7, CONFIG)
        volume = float(tumor_volume(p.u0[None], CONFIG.grid.voxel_volume_ml)[0])
        # A 2-4 mm seed shows well under 1 mL; the natural history stops on the first day past
        # the drawn volume (a day's growth is far below doubling).
        assert 5.0 <= volume <= 2 * 15.0
        assert float(p.u0[p.tissue == 0].abs().sum()) == 0.0
        # Day 0 is the diagnostic study: the first MRI sees the grown tumour.
        first = next(o for o in p.observations if o.kind == "imaging")
        assert first.value >= 0.5 * volume


def test_presentation_is_deterministic_and_leaves_the_default_cohort_unchanged():
    a, b = generate_patient(1, 7, CONFIG), generate_patient(1, 7, CONFIG)
    assert torch.equal(a.u0, b.u0) and a.params == b.params
    plain = CohortConfig(grid=CONFIG.grid, observe_days=20.0, truth_margin_days=1.0)
    p = generate_patient(1, 7, plain)
    # Without presentation day 0 is the seeded blob itself (peak 0.9 by construction).
    assert abs(float(p.u0.max()) - plain.seed_peak) < 0.05
