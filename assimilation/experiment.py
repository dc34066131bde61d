"""Twin experiments: a known truth, synthetic observations of it, and a filter cycling on them.

Generic over the forward model and the observation operator (tensor functions), so the same
runner validates a filter on Lorenz-96 and on the tumour model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from models.grid import Grid
from models.virtual_patient import CohortConfig

from .filters.observations import ObsOperator, Observations
from .filters.result import AnalysisResult
from .twin import TwinConfig

__all__ = ["PRESENTING_COHORT", "PRESENTING_TWIN", "Analyser", "TwinResult", "run_twin_experiment"]

#: The virtual-patient design in which the twin can learn D (bench.identify, tests/twin): 32³
#: voxels of 2.5 mm (the synthetic brain is ~72 mm across, as on 16³ × 5 mm), 200 days observed,
#: and tumours that present: grown untreated from a 2-4 mm seed to 5-15 mL visible before the
#: diagnostic study, so that their edge has the shape of their own natural history. With a
#: freshly seeded blob at day 0 the twin does not learn D (its initial edge is a guess, and
#: radiotherapy leaves the tumour faint at the later MRIs); on 5 mm voxels it learns less (the
#: diffusion length sqrt(D/rho) ~ 1.4 mm is far below a voxel).
PRESENTING_COHORT = CohortConfig(grid=Grid((32, 32, 32), (2.5, 2.5, 2.5)), observe_days=200.0,
                                 truth_margin_days=100.0, seed_radius_mm=(2.0, 4.0),
                                 presentation_volume_ml=(5.0, 15.0))

#: The twin for it: members grown to the diagnostic study and analysed against its profile.
PRESENTING_TWIN = TwinConfig(presentation=True)


class Analyser(Protocol):
    def analyse(
        self,
        X: Tensor,
        obs: Observations,
        HX: Tensor | None = None,
        h: ObsOperator | None = None,
        generator: torch.Generator | None = None,
    ) -> AnalysisResult: ...


@dataclass(frozen=True)
class TwinResult:
    """rmse, spread: [K, P] per cycle; time_mean_rmse, time_mean_spread: [P] over cycles >= spin_up.

    rmse = sqrt(mean over state entries of (analysis mean - truth)^2); spread as in
    ``AnalysisDiagnostics``; n_rejected: [K, P].
    """

    rmse: Tensor
    spread: Tensor
    n_rejected: Tensor
    time_mean_rmse: Tensor
    time_mean_spread: Tensor


def run_twin_experiment(
    step: Callable[[Tensor], Tensor],
    h: ObsOperator,
    analyser: Analyser,
    truth0: Tensor,
    X0: Tensor,
    r_var: Tensor,
    n_cycles: int,
    spin_up: int,
    obs_generator: torch.Generator,
    filter_generator: torch.Generator | None = None,
    steps_per_cycle: int = 1,
    locations: Tensor | None = None,
) -> TwinResult:
    """Cycle ``analyser`` on synthetic observations of a model truth.

    step:      model propagator [..., n] -> [..., n] (applied to [P, n] and [P, N, n]).
    h:         observation operator [P, N, n] -> [P, N, m] (applied to the truth as N = 1).
    truth0:    [P, n] initial truth; X0: [P, N, n] initial ensemble.
    r_var:     [P, m] observation-error variances used both to perturb and to analyse.
    Each cycle advances truth and ensemble ``steps_per_cycle`` steps, observes the truth with
    Gaussian noise drawn from ``obs_generator`` and analyses. Cycles before ``spin_up`` are
    excluded from the time means.
    """
    if not 0 <= spin_up < n_cycles:
        raise ValueError("need 0 <= spin_up < n_cycles")
    truth, X = truth0, X0
    rmse, spread, rejected = [], [], []
    for _ in range(n_cycles):
        for _ in range(steps_per_cycle):
            truth = step(truth)
            X = step(X)
        clean = h(truth[:, None, :])[:, 0, :]
        noise = torch.randn(clean.shape, generator=obs_generator, dtype=clean.dtype,
                            device=clean.device)
        obs = Observations(y=clean + r_var.sqrt() * noise, r_var=r_var, locations=locations)
        result = analyser.analyse(X, obs, h=h, generator=filter_generator)
        X = result.X_a
        rmse.append((X.mean(dim=1) - truth).square().mean(dim=-1).sqrt())
        spread.append(result.diagnostics.spread_analysis)
        rejected.append(result.diagnostics.n_rejected)
    rmse_t = torch.stack(rmse)
    spread_t = torch.stack(spread)
    return TwinResult(
        rmse=rmse_t,
        spread=spread_t,
        n_rejected=torch.stack(rejected),
        time_mean_rmse=rmse_t[spin_up:].mean(dim=0),
        time_mean_spread=spread_t[spin_up:].mean(dim=0),
    )
