"""Batched ensemble Kalman filters: stochastic EnKF, ETKF, LETKF, inflation, outlier gating.

Every filter is a small frozen dataclass of settings with one method,
``analyse(X [P, N, n], obs, HX=None, h=None, generator=None) -> AnalysisResult``, over the
shared problem description ``Observations``.
"""

from .enkf import StochasticEnKF, draw_perturbations
from .etkf import ETKF
from .geometry import LocalUnits, Points, VoxelGrid
from .inflation import inflate, rtps, spread
from .letkf import LETKF
from .localization import compact_local, gaspari_cohn
from .observations import ObsOperator, Observations
from .outliers import innovation_gate
from .prior import FilterSettings
from .result import AnalysisDiagnostics, AnalysisResult
from .transform import etkf_transform, member_operator

__all__ = [
    "ETKF",
    "LETKF",
    "AnalysisDiagnostics",
    "AnalysisResult",
    "FilterSettings",
    "LocalUnits",
    "ObsOperator",
    "Observations",
    "Points",
    "StochasticEnKF",
    "VoxelGrid",
    "compact_local",
    "draw_perturbations",
    "etkf_transform",
    "member_operator",
    "gaspari_cohn",
    "inflate",
    "innovation_gate",
    "rtps",
    "spread",
]
