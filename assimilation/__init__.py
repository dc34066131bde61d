"""Data assimilation for the twins: the batched EnKF family (``filters``), the patient twin,
its observation operators, state store, forecasts and the engine that folds typed observations
into twins. No Kafka here: ``stream`` feeds the engine."""

from .engine import BatchResult, Engine, EngineConfig, PatientReport, make_filter
from .experiment import TwinResult, run_twin_experiment
from .filters import (
    ETKF,
    LETKF,
    AnalysisDiagnostics,
    AnalysisResult,
    FilterSettings,
    ObsOperator,
    Observations,
    Points,
    StochasticEnKF,
    VoxelGrid,
    etkf_transform,
    gaspari_cohn,
    inflate,
    innovation_gate,
    rtps,
    spread,
)
from .forecast import Forecast, forecast, forecast_batch, radiotherapy_course
from .observations import (
    CtdnaObservation,
    ImagingObservation,
    MarkerObservation,
    Observation,
    TreatmentEvent,
)
from .s3 import S3Backend, S3Error
from .store import RetentionPolicy, StateStore, open_backend
from .twin import PARAM_NAMES, PatientTwin, TwinConfig, advance, assimilate, init_twin
from .virtual import typed_observations

__all__ = [
    "PARAM_NAMES",
    "BatchResult",
    "CtdnaObservation",
    "Engine",
    "EngineConfig",
    "Forecast",
    "ImagingObservation",
    "MarkerObservation",
    "Observation",
    "PatientReport",
    "PatientTwin",
    "RetentionPolicy",
    "S3Backend",
    "S3Error",
    "StateStore",
    "TreatmentEvent",
    "TwinConfig",
    "advance",
    "assimilate",
    "forecast",
    "forecast_batch",
    "init_twin",
    "make_filter",
    "open_backend",
    "radiotherapy_course",
    "typed_observations",
    "ETKF",
    "LETKF",
    "AnalysisDiagnostics",
    "AnalysisResult",
    "FilterSettings",
    "ObsOperator",
    "Observations",
    "Points",
    "StochasticEnKF",
    "TwinResult",
    "VoxelGrid",
    "etkf_transform",
    "gaspari_cohn",
    "inflate",
    "innovation_gate",
    "rtps",
    "run_twin_experiment",
    "spread",
]
