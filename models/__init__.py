"""Tumour growth simulators in PyTorch: pure functions of batched tensors ([B, ...])."""

from .burden import BurdenParams, BurdenResult, BurdenSeries, growth_flow, simulate_burden
from .device import DEFAULT_DTYPE, resolve_device
from .diffusion import DiffusionOperator
from .grid import Grid, gaussian_blob
from .observables import (VISIBLE_THRESHOLD, center_of_mass, ctdna_fraction, marker_level,
                          soft_segmentation, tumor_burden, tumor_volume)
from .priors import LogNormal, TumorPrior
from .reaction_diffusion import SimResult, TumorParams, choose_scheme, simulate, stable_dt
from .tissue import GRAY, OUTSIDE, TISSUE_WEIGHT, WHITE, diffusion_weight, synthetic_brain
from .treatment import (BatchPlan, Schedule, Segment, chemo_exposure, chemo_step_survival,
                        lq_survival, plan_batch,
                        plan_steps, rt_log_kill)

__all__ = [
    "BatchPlan", "BurdenParams", "BurdenResult", "BurdenSeries", "DEFAULT_DTYPE",
    "DiffusionOperator", "GRAY", "Grid", "OUTSIDE", "Schedule", "Segment", "SimResult",
    "TISSUE_WEIGHT", "TumorParams", "WHITE", "chemo_exposure", "chemo_step_survival", "diffusion_weight",
    "gaussian_blob", "growth_flow", "lq_survival", "plan_batch", "plan_steps", "resolve_device",
    "rt_log_kill", "simulate", "simulate_burden", "stable_dt", "synthetic_brain",
    "choose_scheme", "LogNormal", "TumorPrior", "VISIBLE_THRESHOLD", "center_of_mass",
    "ctdna_fraction", "marker_level", "soft_segmentation", "tumor_burden", "tumor_volume",
    "choose_scheme", "LogNormal", "TumorPrior", "VISIBLE_THRESHOLD", "center_of_mass",
    "ctdna_fraction", "marker_level", "soft_segmentation", "tumor_burden", "tumor_volume",
]
