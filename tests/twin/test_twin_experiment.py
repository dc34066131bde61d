"""Twin experiment: virtual patients whose truth is known, observed for 200 days (MRI every
6-10 weeks, LDH and ctDNA every 2-4 weeks, standard-of-care treatment), assimilated by a
16-member twin. Does assimilation learn the growth parameters D and rho and improve the forecast?

Design (assimilation.experiment.PRESENTING_COHORT / PRESENTING_TWIN): 32³ voxels of 2.5 mm
(a synthetic brain ~72 mm across). Each tumour grows untreated from a 2-4 mm seed to 5-15 mL
visible before the diagnostic study, so that its edge has the shape of its own natural history.
The twin grows its members the same way, from a seed at the study's densest part to the study's
visible volume, and analyses the study's radial profile against them (Swanson's two radii: the
edge's width scales with sqrt(D/rho), its speed with sqrt(D rho)) three times with tripled error
variances (multiple data assimilation); then the treatment course is assimilated as before
(ETKF, voxel stage localized). Truth parameters come from the twin's own prior (D median
0.1 mm²/day, rho 0.05/day).

Why this design: on the earlier one (16³ voxels of 5 mm, a Gaussian blob seeded at day 0, no
presentation) D was not learnt: D error ratios 1.06 / 2.51 / 1.30 over seeds 7 / 8 / 9. The
diffusion length sqrt(D/rho) ~ 1.4 mm is far below a 5 mm voxel, the blob's edge is the seed's
and not a front's, the twin's initial edge is a guess, and radiotherapy leaves the tumour faint
(often invisible) at every later MRI, so the later studies hold little on D. Presentation is the
main lever, resolution the second (bench.identify --design presenting --grid ...).

Measured when this test was written (N = 16, patients 0-3; ``python -m bench.identify
--patients 4 --seeds 7 8 9 10 11 12 13 14``): mean |log error| prior -> assimilated, ratio per
seed, D: 0.42 (seed 7: 0.212 -> 0.089), 0.76, 0.67, 0.37, 0.45, 0.28, 0.72, 0.10 (mean 0.47);
rho: 0.20 (seed 7: 0.326 -> 0.067), 0.25, 0.46, 0.21, 0.49, 0.25, 0.22, 0.14 (mean 0.28). The
remaining log D error is about ±0.1-0.2 per patient without a visible bias (mean signed error
-0.04 over the 32 patients); on seeds whose truths sit near the prior median (seed 8) the ratio
is necessarily closer to 1. 90-day visible-volume forecast |error| (remaining course as
planned), seed 7: 5.9 mL against 59 mL for the prior twin given only its treatments, truth
inside the 95 % interval 4/4 (seeds 7-14: 1.4-5.9 mL against 16-60 mL). The thresholds below
hold on every one of those seeds for rho, and on all but seeds 8 and 13 for D at 0.7 (all under
0.8), while a twin that learns nothing on D stays near 1.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from assimilation.experiment import PRESENTING_COHORT, PRESENTING_TWIN
from assimilation.filters.etkf import ETKF
from assimilation.forecast import forecast
from assimilation.observations import ImagingObservation, TreatmentEvent
from assimilation.twin import PARAM_NAMES, advance, assimilate, init_twin
from models.virtual_patient import generate_patient
from twin_support import DAY0, typed_observations

N = 16
SEED, PATIENTS = 7, 4
GROWTH = [PARAM_NAMES.index("D"), PARAM_NAMES.index("rho")]


@pytest.fixture(scope="module")
def experiment():
    rows = []
    config = PRESENTING_TWIN
    for i in range(PATIENTS):
        p = generate_patient(i, SEED, PRESENTING_COHORT)
        events = typed_observations(p, planned=True)
        first = next(o for o in events if isinstance(o, ImagingObservation))
        # The prior: the same draws before any data (the presentation analysis is assimilation).
        prior = init_twin(p.pseudonym, first, N, config=replace(config, presentation=False))
        start = init_twin(p.pseudonym, first, N, config=config)
        twin, report = assimilate(start, events, ETKF(), config=config)
        assert report.analyses
        blind, _ = assimilate(prior, [o for o in events if isinstance(o, TreatmentEvent)], ETKF(), config=config)
        blind = advance(blind, twin.clock, config=config)
        truth = torch.tensor([math.log(p.params[n]) for n in PARAM_NAMES])
        day = (twin.time - DAY0).total_seconds() / 86400.0 + 90.0
        true_volume = float(np.interp(day, p.truth_times.numpy(), p.truth_volume_ml.numpy()))
        rows.append({
            "err_prior": (prior.log_params.mean(0) - truth).abs()[GROWTH],
            "err_post": (twin.log_params.mean(0) - truth).abs()[GROWTH],
            "vol_assim": forecast(twin, (90.0,), config=config).quantity("volume_ml")[0],
            "vol_blind": forecast(blind, (90.0,), config=config).quantity("volume_ml")[0],
            "vol_true": true_volume,
        })
    return rows


def test_assimilation_reduces_the_error_of_the_growth_parameters(experiment):
    prior = torch.stack([r["err_prior"] for r in experiment]).mean(0)  # [D, rho]
    post = torch.stack([r["err_post"] for r in experiment]).mean(0)
    ratio = post / prior
    print(f"\nmean |log error| prior D {prior[0]:.3f} rho {prior[1]:.3f};"
          f" assimilated D {post[0]:.3f} rho {post[1]:.3f};"
          f" ratios D {ratio[0]:.2f} rho {ratio[1]:.2f}, both {post.sum() / prior.sum():.2f}")
    assert float(ratio[0]) < 0.7, "D is learnt from the presenting tumour's edge and the growth under treatment"
    assert float(ratio[1]) < 0.5, "rho is learnt from the burden's growth"


def test_assimilation_improves_the_90_day_volume_forecast(experiment):
    err_assim = np.mean([abs(float(r["vol_assim"][1]) - r["vol_true"]) for r in experiment])
    err_blind = np.mean([abs(float(r["vol_blind"][1]) - r["vol_true"]) for r in experiment])
    inside = sum(float(r["vol_assim"][0]) <= r["vol_true"] <= float(r["vol_assim"][2]) for r in experiment)
    print(f"\n90-day volume |error|: assimilated {err_assim:.2f} mL, blind {err_blind:.2f} mL;"
          f" truth inside the assimilated 95 % interval for {inside}/{len(experiment)}")
    assert err_assim < 0.5 * err_blind
