"""The patient twin: an ensemble of tumour density fields and log-parameters, its clock, the
treatments it knows of and the events it has applied; and the pure functions that move it.

    init_twin(patient, first imaging, N, prior)  -> twin at the study's time (clock 0); with
                                                    ``TwinConfig.presentation`` also ``present``:
                                                    members grown to the diagnostic study and
                                                    their parameters analysed against its profile
    advance(twin, t)                             -> members simulated to t with known treatments
    assimilate(twin, observations, analyser)     -> (twin, report): advance + EnKF analysis per
                                                    observation time, idempotent on event_id

Nothing here modifies a tensor it was given or keeps state between calls: every function
returns a new ``PatientTwin`` (``dataclasses.replace``), and every random draw comes from a
generator seeded from (patient, purpose, event id) through ``models.virtual_patient.hash_seed``.

State vector of an analysis, per member: [u on the brain mask (C order), log-parameters], the
log-parameters in the order of ``PARAM_NAMES``. Times are days since the twin's ``epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from models.grid import Grid
from models.observables import VISIBLE_THRESHOLD, tumor_volume
from models.priors import LogNormal, TumorPrior
from models.reaction_diffusion import TumorParams, simulate
from models.tissue import diffusion_weight
from models.treatment import Schedule
from models.virtual_patient import hash_seed

from .filters.etkf import ETKF
from .filters.geometry import VoxelGrid
from .filters.inflation import inflate, rtps, spread
from .filters.letkf import LETKF
from .filters.observations import Observations
from .filters.result import AnalysisResult
from .observations import (
    CtdnaObservation,
    ImagingObservation,
    MarkerObservation,
    ObservationBase,
    TreatmentEvent,
    as_tensor,
)
from .calibration import VOLUME_LOG_OFFSET_ML, PredictiveCheck, checks_of, pit
from .operators import (
    CompactImaging,
    NoiseModel,
    ObsBlock,
    VoxelSelection,
    censor_block,
    compact_imaging,
    concat_blocks,
    ctdna_operator,
    density_operator,
    density_sum_operator,
    estimate_map_noise,
    marker_operator,
    profile_operator,
    segmentation_operator,
    smooth_study,
    volume_operator,
)

__all__ = [
    "MODEL_VERSION",
    "PARAM_NAMES",
    "AnalysisRecord",
    "Analyser",
    "AssimilationReport",
    "PatientTwin",
    "TreatmentRecord",
    "TwinConfig",
    "advance",
    "assimilate",
    "compact",
    "days_since",
    "describe_filter",
    "effective_treatments",
    "init_twin",
    "is_late",
    "log_bounds",
    "member_params",
    "present",
    "presentation_seed",
    "schedule_for",
]

#: Identifies the forward model a twin's members were propagated with (stored with snapshots).
MODEL_VERSION = "reaction-diffusion-3d/imex/1"

#: Log-parameters carried in the state, in state order (names as in models.priors.TumorPrior).
# Predictive checks a twin keeps (per-patient calibration over roughly its last few years).
MAX_CHECKS = 500

PARAM_NAMES: tuple[str, ...] = ("D", "rho", "alpha", "k_chemo", "marker_shedding", "ctdna_shedding")

#: A planned treatment is superseded by a delivered one of the same kind this close (days).
SUPERSEDE_DAYS = 0.5


class Analyser(Protocol):
    """What the twin needs of a filter (assimilation.filters: StochasticEnKF, ETKF, LETKF)."""

    def analyse(self, X: Tensor, obs: Observations, HX: Tensor | None = None, h=None,
                generator: torch.Generator | None = None) -> AnalysisResult: ...


@dataclass(frozen=True)
class TreatmentRecord:
    """A treatment the twin knows of. t: days since the twin's epoch; dose in Gy (radiotherapy)
    or mg/m² (chemotherapy); planned: scheduled but not (yet) reported delivered."""

    event_id: str
    t: float
    kind: str
    dose: float
    unit: str
    drug: str | None = None
    planned: bool = False


@dataclass(frozen=True)
class TwinConfig:
    """How twins are propagated and analysed.

    dt_days, scheme:   simulator step (days) and scheme ("auto": explicit where its stability
                       sub-steps are cheaper than an IMEX solve, else "imex", which is
                       unconditionally stable; see models.choose_scheme).
    noise, selection:  observation-error model and image voxel selection (see operators).
    param_inflation:   multiplicative inflation of the log-parameter anomalies before each
                       analysis (the parameters have no model noise to keep their spread).
    param_rtps:        relaxation of the log-parameter analysis spread to the prior spread.
    init_log_sd:       log-amplitude of the smooth multiplicative perturbation of the initial
                       density members.
    init_tail:         upper bound of the random weight of a smoothed (sub-visible) copy of
                       the observed tumour added to each initial member: the infiltration
                       below the imaging threshold that no study shows.
    marker_code, marker_unit: the LOINC code whose shedding the state carries (the prior's
                       marker_baseline belongs to it) and its canonical unit; other codes are
                       recorded, not analysed.
    presentation:      the first study shows an untreated tumour at diagnosis (its natural
                       history has shaped its edge; the engine drops it for a patient with a
                       delivered treatment before that study): ``init_twin`` grows every member from a
                       small seed at the study's centre to the study's visible volume with the
                       member's own parameters, then analyses the parameters against the study's
                       profile and the grown fields against its voxels (``present``).
    presentation_seed_mm, presentation_max_days: sd (mm) of the Gaussian seed (peak 0.9), and
                       the longest natural history tried (days).
    presentation_iterations: analyses of the diagnostic study (multiple data assimilation).
    presentation_shells: voxel-thick shells of the diagnostic study's radial profile
                       (``operators.profile_operator``) that inform the parameters at presentation.
    profile_shells:    the same for every later density study; 0 (default) leaves the
                       parameters to its volume and burden: after radiotherapy the profile is
                       faint, and in the virtual cohort it added nothing the volume and burden
                       did not already give (on 5 mm voxels it moved D away from the truth).
    localization_radius_mm, localization_block: the voxel stage of an analysis runs as an
                       LETKF with Gaspari-Cohn localization of this radius (mm) over blocks of
                       this many voxels per edge, with the given filter's inflation / RTPS /
                       outlier settings; None runs it with the given filter, unlocalized.
    model_error_prior, model_error_prior_days: the error the model makes between analyses,
                       as a log-space variance per day per quantity ("tumor_volume_ml" also
                       serves the burden, "marker" every marker), learnt per twin from its own
                       predictive checks (``calibration.model_error_rate``) with this prior,
                       weighted as this many days of predictions; forecasts are dressed with it
                       (their intervals widen with the horizon as the model's error grows).
                       ``model_error_max_rate`` caps the learnt rate (log-variance per day; 0.02
                       is a log-sd of 1.9, a factor ~7, at 180 days): a few surprising checks
                       must not make a forecast's interval span orders of magnitude.
    """

    dt_days: float = 1.0
    scheme: str = "auto"
    noise: NoiseModel = field(default_factory=NoiseModel)
    selection: VoxelSelection = field(default_factory=VoxelSelection)
    param_inflation: float = 1.0
    param_rtps: float = 0.5
    init_log_sd: float = 0.3
    init_tail: float = 0.5
    marker_code: str = "2532-0"
    marker_unit: str = "U/L"
    presentation: bool = False
    presentation_seed_mm: float = 1.5
    presentation_iterations: int = 3
    presentation_max_days: float = 2000.0
    presentation_shells: int = 8
    profile_shells: int = 0
    localization_radius_mm: float | None = 20.0
    localization_block: int = 2
    model_error_prior: tuple[tuple[str, float], ...] = (("tumor_volume_ml", 0.0), ("marker", 0.0),
                                                         ("ctdna_tumor_fraction", 0.0))
    model_error_prior_days: float = 90.0
    model_error_max_rate: float = 0.02
    model_version: str = MODEL_VERSION


@dataclass(frozen=True)
class PatientTwin:
    """One patient's ensemble (N members) and bookkeeping.

    epoch:       aware datetime, time zero of the twin (its first study).
    grid:        voxel geometry (mm); tissue [X, Y, Z] int64 labels (models.tissue).
    u:           [N, X, Y, Z] tumour density (fraction of capacity), 0 outside the brain.
    log_params:  [N, len(PARAM_NAMES)] natural logs of the parameters (units: TumorPrior).
    clock:       days since epoch of the state (the last analysis or advance).
    treatments:  known treatments, sorted by (t, event_id).
    applied:     event ids in the order they were applied (idempotency record).
    origin_event_id: the imaging study the twin was started from; started_at its time (days).
    last_analysis: days of the latest analysis (None before the first).
    data_time:   the latest recorded_at (else event time) of the events applied: how fresh the
                 data behind the twin are, in the clinic's record, not the wall clock.
    checks:      the predictive checks of its analyses, oldest first (the last ``MAX_CHECKS``):
                 how each observation fell in the twin's prediction of it (``calibration``).
    """

    patient_id: str
    epoch: datetime
    grid: Grid
    tissue: Tensor
    u: Tensor
    log_params: Tensor
    clock: float
    prior: TumorPrior
    origin_event_id: str
    started_at: float = 0.0
    last_analysis: float | None = None
    treatments: tuple[TreatmentRecord, ...] = ()
    applied: tuple[str, ...] = ()
    marker_code: str = "2532-0"
    marker_unit: str = "U/L"
    model_version: str = MODEL_VERSION
    filter_version: str = ""
    n_analyses: int = 0
    checks: tuple[PredictiveCheck, ...] = ()
    data_time: datetime | None = None

    @property
    def n_members(self) -> int:
        return int(self.u.shape[0])

    @property
    def brain(self) -> Tensor:
        """[X, Y, Z] bool: voxels where tumour can live (the state's mask)."""
        return self.tissue > 0

    @property
    def time(self) -> datetime:
        """The clock as an aware datetime."""
        return self.epoch + timedelta(days=self.clock)

    def days(self, moment: datetime) -> float:
        return days_since(self.epoch, moment)

    def has_applied(self, event_id: str) -> bool:
        return event_id in self.applied

    def params(self) -> dict[str, Tensor]:
        """Member parameters [N] by name (exp of the log-parameters)."""
        return {n: self.log_params[:, i].exp() for i, n in enumerate(PARAM_NAMES)}


@dataclass(frozen=True)
class AnalysisRecord:
    """One analysis: when, which events, how many observations were used / rejected, the
    normalized innovation rms (≈1 when the ensemble and noise model are consistent), the
    log-parameter spread before and after, and the predictive check of each scalar observed
    (made before the analysis)."""

    t_days: float
    event_ids: tuple[str, ...]
    n_obs: int
    n_used: int
    n_rejected: int
    normalized_innovation_rms: float
    param_spread_prior: float
    param_spread_analysis: float
    checks: tuple[PredictiveCheck, ...] = ()


@dataclass(frozen=True)
class AssimilationReport:
    """applied: ids applied by this call; skipped: ids already applied before (or repeated);
    ignored: id -> reason for events recorded but not analysed; analyses: one per time."""

    applied: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    ignored: dict[str, str] = field(default_factory=dict)
    analyses: tuple[AnalysisRecord, ...] = ()


def days_since(epoch: datetime, moment: datetime) -> float:
    """(moment - epoch) in days; both aware."""
    return (moment - epoch).total_seconds() / 86400.0


def log_bounds(prior: TumorPrior, dtype: torch.dtype = torch.float32, device=None) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds [k] of the log-parameters (the prior's truncation)."""
    lo, hi = [], []
    for name in PARAM_NAMES:
        d: LogNormal = getattr(prior, name)
        lo.append(math.log(d.lower) if d.lower > 0 else -math.inf)
        hi.append(math.log(d.upper) if math.isfinite(d.upper) else math.inf)
    return (torch.tensor(lo, dtype=dtype, device=device), torch.tensor(hi, dtype=dtype, device=device))


# --- initial ensemble -------------------------------------------------------------------------

def _blur(x: Tensor, brain: Tensor, passes: int = 1) -> Tensor:
    """Binomial [1, 2, 1]/4 smoothing per axis inside the brain (renormalized at its edge).
    x [B, X, Y, Z] -> same shape."""
    k1 = torch.tensor([0.25, 0.5, 0.25], dtype=x.dtype, device=x.device)
    kernel = (k1[:, None, None] * k1[None, :, None] * k1[None, None, :])[None, None]
    m = brain.to(x.dtype)[None, None]
    norm = F.conv3d(m, kernel, padding=1)
    y = x[:, None] * m
    for _ in range(passes):
        y = F.conv3d(y, kernel, padding=1) / norm.clamp_min(1e-6) * m
    return y[:, 0]


def _smooth_noise(n: int, shape: Sequence[int], g: torch.Generator, dtype, device) -> Tensor:
    """n smooth standard-normal-ish fields [n, X, Y, Z]: coarse noise, trilinearly upsampled
    (correlation length about a quarter of the grid)."""
    coarse = [max(2, s // 4) for s in shape]
    z = torch.randn((n, 1, *coarse), generator=g, dtype=torch.float64)
    up = F.interpolate(z, size=tuple(shape), mode="trilinear", align_corners=True)[:, 0]
    # Interpolation shrinks the variance between the coarse nodes; restore unit sd.
    up = up / up.flatten(1).std(dim=1).clamp_min(1e-6)[:, None, None, None]
    return up.to(dtype=dtype, device=device)


def _observed_density(imaging: ImagingObservation, brain: Tensor, dtype, noise: NoiseModel) -> Tensor:
    """A denoised density map [X, Y, Z] from the study, so that background noise is not
    mistaken for tumour and left to grow. The map's noise (offset b, sd σ) is read off its own
    background (``operators.estimate_map_noise``; σ never below the configured one); the
    map less b keeps its values of at least twice the configured sd, within one voxel of where
    its smoothed version is clearly (~4 smoothed-noise σ) above the noise, and, when the study has a segmentation,
    within two voxels of it. On the virtual cohort this keeps the burden of the true field
    within ~15 %, where the raw map holds ~10 times too much (positive clamped noise
    everywhere). A study with only a segmentation gives 0.5 (a middle guess above the
    visibility threshold) on its mask."""
    seg = None
    if imaging.segmentation is not None:
        seg = (as_tensor(imaging.segmentation).to(device=brain.device) > 0.5) & brain
    if imaging.density is not None:
        raw = as_tensor(imaging.density).to(device=brain.device, dtype=dtype)
        found = estimate_map_noise(raw, brain, seg)
        sd, offset = noise.density_sd, noise.density_offset
        if found is not None:
            sd, offset = max(sd, found.sd), found.offset
        d = (raw - offset).clamp(0.0, 1.0) * brain
        support = smooth_study(d, brain) >= sd
        # The cut stays at twice the configured sd: where the support already excludes the
        # noise floor, a cut at twice a larger estimated sd would drop the tumour's tail
        # (a third of the burden at sd 0.15).
        d = d * (d >= 2.0 * noise.density_sd)
        if seg is not None:
            support &= F.max_pool3d(seg[None, None].to(dtype), 5, stride=1, padding=2)[0, 0] > 0.5
    elif seg is not None:
        d = 0.5 * seg.to(dtype)
        support = seg
    else:
        raise ValueError("a twin starts from a study with a density map or a segmentation")
    support = F.max_pool3d(support[None, None].to(dtype), 3, stride=1, padding=1)[0, 0] > 0.5
    return d * (support & brain)


def init_twin(patient_id: str, imaging: ImagingObservation, n_members: int, prior: TumorPrior | None = None,
              *, config: TwinConfig | None = None, epoch: datetime | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
              filter_version: str = "none: no analysis yet") -> PatientTwin:
    """A new twin from the patient's first study (which must carry the tissue map).

    Members: the denoised observed density times exp(s·z_i - s²/2) for a smooth unit field
    z_i, plus c_i times a smoothed copy (c_i uniform in [0, init_tail]) for the sub-visible
    infiltration; clamped to [0, 1] and zero outside the brain. Parameters: N draws from
    ``prior`` with the generator seeded from (patient, "prior"); field perturbations from
    (patient, "init", event id). The study itself counts as applied (it *is* the initial state).
    """
    config = config or TwinConfig()
    prior = prior or TumorPrior()
    if imaging.tissue is None:
        raise ValueError("the study that starts a twin must carry the tissue map")
    if n_members < 2:
        raise ValueError("an ensemble needs at least 2 members")
    tissue = as_tensor(imaging.tissue).to(device=device, dtype=torch.int64)
    device = tissue.device
    grid = Grid(tuple(tissue.shape), tuple(float(h) for h in imaging.spacing_mm))
    brain = tissue > 0
    epoch = epoch or imaging.time
    clock = days_since(epoch, imaging.time)
    if clock < 0:
        raise ValueError(f"the epoch {epoch.isoformat()} is after the first study {imaging.time.isoformat()}")

    g_prior = torch.Generator().manual_seed(hash_seed(patient_id, "prior"))
    drawn = prior.sample(n_members, g_prior, dtype=torch.float64)
    log_params = torch.stack([drawn[n].log() for n in PARAM_NAMES], dim=1).to(dtype=dtype, device=device)

    g_init = torch.Generator().manual_seed(hash_seed(patient_id, "init", imaging.event_id))
    d = _observed_density(imaging, brain, dtype, config.noise)
    z = _smooth_noise(n_members, grid.shape, g_init, dtype, device)
    s = config.init_log_sd
    c = config.init_tail * torch.rand(n_members, generator=g_init, dtype=torch.float64).to(dtype=dtype, device=device)
    tail = _blur(d[None], brain, passes=2)
    u = (d[None] * torch.exp(s * z - 0.5 * s * s) + c[:, None, None, None] * tail).clamp(0.0, 1.0) * brain

    twin = PatientTwin(
        patient_id=patient_id, epoch=epoch, grid=grid, tissue=tissue, u=u, log_params=log_params, clock=clock,
        prior=prior, origin_event_id=imaging.event_id, started_at=clock, applied=(imaging.event_id,),
        data_time=imaging.recorded_at or imaging.time,
        marker_code=config.marker_code, marker_unit=config.marker_unit, model_version=config.model_version,
        filter_version=filter_version,
    )
    if config.presentation and imaging.density is not None:
        twin = present(twin, imaging, config)
    return twin


def _grown_to_volume(u0: Tensor, weight: Tensor, params: TumorParams, grid: Grid, volume_ml: float,
                     max_days: float, dt: float, scheme: str, noise_sd: float = 0.0) -> Tensor:
    """Untreated growth of every member u0 [N, X, Y, Z] (params batch N) up to the first whole
    day its visible volume reaches ``volume_ml``; a member that has not by ``max_days`` keeps
    its last field. Returns [N, X, Y, Z].

    ``noise_sd`` > 0: the volume a map with that additive noise would show, Σ Φ((u - 0.16)/sd)·dV
    (the expected count above the threshold). A study's count is biased up by its noise (the
    sub-visible tail holds more voxels just below the threshold than the edge holds just
    above: +3-5 % in the virtual cohort), so members grown to the raw count would be too big."""
    N = u0.shape[0]
    out = u0.clone()
    done = torch.zeros(N, dtype=torch.bool, device=u0.device)
    u, t, chunk = u0, 0.0, 10
    voxel_ml = grid.voxel_volume_ml
    while t < max_days and not bool(done.all()):
        days = [t + k for k in range(1, chunk + 1)]
        saved = simulate(u, weight, params, grid, t, days[-1], dt=dt, scheme=scheme, save_at=days).saved
        if noise_sd > 0:
            vol = torch.special.ndtr((saved - VISIBLE_THRESHOLD) / noise_sd).flatten(2).sum(-1) * voxel_ml
        else:
            vol = torch.stack([tumor_volume(s, voxel_ml) for s in saved])  # [chunk, N]
        reached = vol >= volume_ml
        first = torch.where(reached.any(0), reached.float().argmax(0), torch.full_like(done, -1, dtype=torch.long))
        new = (first >= 0) & ~done
        if bool(new.any()):
            idx = new.nonzero().squeeze(-1)
            out[idx] = saved[first[idx], idx]
            done |= new
        u, t = saved[-1], days[-1]
    return torch.where(done[:, None, None, None], out, u)


def presentation_seed(density: Tensor, brain: Tensor, grid: Grid, sd_mm: float) -> Tensor:
    """The seed a presented tumour is grown from: 0.9 exp(-r²/(2 sd²)) (r in mm) around its
    densest part, the centroid of the voxels where the smoothed ``density`` [X, Y, Z] is within
    10 % of its maximum; zero outside ``brain``. Returns [X, Y, Z].

    Why the densest part and not the centroid: the origin has grown longest, so it is the
    densest; where the tumour grows unevenly (gray matter, ventricles) the centroid drifts
    away from it, and a seed there grows an edge of the wrong shape, which the presentation
    analysis then reads as a wrong D/rho (in the virtual cohort the centroid seed biased log D
    by -0.25 to -0.4 on some seeds; the true seed by about ±0.1)."""
    smooth = _blur(density[None], brain)[0]
    core = smooth * (smooth >= 0.9 * smooth.max())
    centre = _centre_index(core, brain)  # grid-index units
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=density.dtype, device=density.device)
                                       for n in grid.shape], indexing="ij"), dim=-1)
    spacing = torch.tensor(grid.spacing, dtype=density.dtype, device=density.device)
    r2 = (((idx - centre) * spacing) ** 2).sum(-1)
    return 0.9 * torch.exp(-r2 / (2.0 * sd_mm ** 2)) * brain


def present(twin: PatientTwin, imaging: ImagingObservation, config: TwinConfig | None = None) -> PatientTwin:
    """Learn from the diagnostic study what its untreated natural history tells (the twin's clock
    stays at the study). Every member grows from a Gaussian seed (sd ``presentation_seed_mm``,
    peak 0.9) at the study's densest part (``presentation_seed``), untreated and with its own parameters, until its
    visible volume reaches the study's; the grown fields replace the members'. The shape of a
    grown edge depends on the member's sqrt(D/rho) (Swanson's two radii), the time it took does
    not show; so an ETKF analysis of the study's profile, volume and burden against the grown
    members updates the log-parameters, and the LETKF voxel stage then fits the fields to the
    study's voxels. The analysis is deterministic (ETKF), so ``init_twin`` stays reproducible.
    """
    config = config or TwinConfig()
    study = compact(imaging, twin, config)
    d = _observed_density(imaging, twin.brain, twin.u.dtype, config.noise)
    seed = presentation_seed(d, twin.brain, twin.grid, config.presentation_seed_mm)
    volume = study.tumor_volume_ml if study.tumor_volume_ml is not None else float(
        (d >= VISIBLE_THRESHOLD).sum()) * twin.grid.voxel_volume_ml
    # The study's count is of a noisy map (a density study); members are grown to the same
    # noisy count (see _grown_to_volume).
    noise_sd = config.noise.density_sd if study.channel == "density" else 0.0
    weight = diffusion_weight(twin.tissue, dtype=twin.u.dtype)[None]
    lo, hi = log_bounds(twin.prior, twin.log_params.dtype, twin.log_params.device)
    analyser = ETKF()
    stats = _Stats()
    seed_of = lambda stage, k: hash_seed(twin.patient_id, "presentation", stage, k, study.event_id)  # noqa: E731
    # Multiple data assimilation (Emerick & Reynolds 2013): K analyses of the same study with
    # K-fold error variances, the members regrown in between. The grown profile is far from
    # linear in log D and log rho, and one linear update would trust the ensemble's first
    # regression too much.
    K = max(1, int(config.presentation_iterations))
    work = twin
    for k in range(K):
        grown = _grown_to_volume(seed[None].expand(twin.n_members, -1, -1, -1).contiguous(), weight,
                                 member_params(work), twin.grid, volume, config.presentation_max_days,
                                 config.dt_days, config.scheme, noise_sd)
        work = replace(work, u=grown)
        blocks = [replace(b, r_var=b.r_var * K)
                  for b in _summary_blocks(work, [study], replace(config, profile_shells=config.presentation_shells))]
        work = _stage(work, blocks, analyser, seed_of("summary", k), field_part=False, param_part=True, stats=stats)
        work = replace(work, log_params=torch.maximum(torch.minimum(work.log_params, hi), lo))
    # The fields grown with the analysed parameters, fitted to the study's voxels.
    grown = _grown_to_volume(seed[None].expand(twin.n_members, -1, -1, -1).contiguous(), weight,
                             member_params(work), twin.grid, volume, config.presentation_max_days,
                             config.dt_days, config.scheme, noise_sd)
    work = replace(work, u=grown)
    work = _stage(work, _voxel_blocks(work, [study], config), _field_analyser(work, analyser, config),
                  seed_of("voxels", K), field_part=True, param_part=False, stats=stats)
    return replace(twin, u=work.u, log_params=work.log_params)


# --- propagation ------------------------------------------------------------------------------

def member_params(twin: PatientTwin, log_params: Tensor | None = None) -> TumorParams:
    """Simulator parameters [N] of the members (fixed ones from the twin's prior)."""
    lp = twin.log_params if log_params is None else log_params
    n = lp.shape[0]
    full = lambda v: torch.full((n,), float(v), dtype=lp.dtype, device=lp.device)  # noqa: E731
    i = PARAM_NAMES.index
    return TumorParams(D=lp[:, i("D")].exp(), rho=lp[:, i("rho")].exp(), alpha=lp[:, i("alpha")].exp(),
                       alpha_beta=full(twin.prior.alpha_beta), k_chemo=lp[:, i("k_chemo")].exp(),
                       chemo_decay=full(twin.prior.chemo_decay))


def effective_treatments(records: Sequence[TreatmentRecord]) -> list[TreatmentRecord]:
    """Delivered treatments plus the planned ones no delivered treatment of the same kind
    (within SUPERSEDE_DAYS) has replaced."""
    delivered = [r for r in records if not r.planned]
    keep = list(delivered)
    for r in records:
        if r.planned and not any(d.kind == r.kind and abs(d.t - r.t) <= SUPERSEDE_DAYS for d in delivered):
            keep.append(r)
    return sorted(keep, key=lambda r: (r.t, r.event_id))


def schedule_for(records: Sequence[TreatmentRecord], batch: int, device=None) -> Schedule:
    """The simulator schedule of a treatment list, repeated over ``batch`` members."""
    rt = [(r.t, r.dose) for r in records if r.kind == "radiotherapy"]
    chemo = [(r.t, r.dose) for r in records if r.kind == "chemotherapy"]
    return Schedule.from_lists(rt=rt, chemo=chemo, batch=batch, device=device)


def advance(twin: PatientTwin, t_days: float, *, config: TwinConfig | None = None) -> PatientTwin:
    """Simulate every member from the twin's clock to ``t_days`` with the known treatments
    (radiotherapy fractions in (clock, t] applied, chemotherapy exposure from every dose)."""
    config = config or TwinConfig()
    if t_days < twin.clock:
        raise ValueError(f"cannot advance backwards: clock {twin.clock} > {t_days}")
    if t_days == twin.clock:
        return twin
    weight = diffusion_weight(twin.tissue, dtype=twin.u.dtype)[None]
    result = simulate(twin.u, weight, member_params(twin), twin.grid, twin.clock, t_days, dt=config.dt_days,
                      schedule=schedule_for(effective_treatments(twin.treatments), twin.n_members, twin.u.device),
                      scheme=config.scheme)
    return replace(twin, u=result.u, clock=float(t_days))


# --- analysis ---------------------------------------------------------------------------------

def compact(obs: ObservationBase, twin: PatientTwin, config: TwinConfig | None = None) -> ObservationBase:
    """The form an observation is analysed and journaled in: imaging studies become
    ``CompactImaging`` (selected voxels only); everything else is already compact."""
    config = config or TwinConfig()
    if isinstance(obs, ImagingObservation):
        return compact_imaging(obs, twin.brain, config.selection, config.noise)
    return obs


def is_late(obs: ObservationBase, twin: PatientTwin) -> bool:
    """Whether applying ``obs`` needs a re-analysis from an earlier snapshot.

    An event before the clock is late. At the clock: an observation is late if the analysis at
    that time is done (it must join it, not follow it); a treatment is late once the twin has
    been advanced to the clock (a fraction at exactly the clock belongs to the advance that
    ended there). Events before the twin's first study are never late: assimilate records and
    ignores them.
    """
    t = twin.days(obs.time)
    if t < twin.started_at:
        return False
    if isinstance(obs, TreatmentEvent):
        return t < twin.clock or (t == twin.clock and twin.clock > twin.started_at)
    return t < twin.clock or (t == twin.clock and twin.last_analysis == twin.clock)


# The one drug the model's chemotherapy term stands for: its kill per mg/m² (k_chemo) and its
# exposure decay (TumorPrior.chemo_decay) are temozolomide's. RxNorm ingredient code.
MODELLED_DRUGS = {"rxnorm": {"37776"}, "name": {"temozolomide"}}


def unmodelled(ev: TreatmentEvent) -> str | None:
    """Why the model cannot apply ``ev`` (None when it can). The feed accepts any drug in mg,
    mg/m² or mg/kg; the model has a radiotherapy term in Gy and one chemotherapy term, that of
    temozolomide in mg/m². Another drug, or a dose without the body size that makes it mg/m², is
    recorded and left out of the simulation with this reason: applying it as temozolomide
    would be silently wrong (a 10 mg/kg bevacizumab infusion kills no cells)."""
    if ev.kind == "radiotherapy":
        return None if ev.unit == "Gy" else f"a radiotherapy dose in {ev.unit!r}, the model needs Gy"
    code_ok = ev.drug_system == "rxnorm" and ev.drug_code in MODELLED_DRUGS["rxnorm"]
    name_ok = ev.drug is not None and ev.drug.strip().casefold() in MODELLED_DRUGS["name"]
    if ev.drug_code is not None and not code_ok:
        return f"no model for drug {ev.drug_system}:{ev.drug_code} (the twin models temozolomide)"
    if ev.drug_code is None and ev.drug is not None and not name_ok:
        return f"no model for drug {ev.drug!r} (the twin models temozolomide)"
    if ev.unit != "mg/m2":
        return f"a dose in {ev.unit!r} without the body size that makes it mg/m²"
    return None


def _record_treatment(twin: PatientTwin, ev: TreatmentEvent) -> PatientTwin:
    rec = TreatmentRecord(ev.event_id, twin.days(ev.time), ev.kind, float(ev.dose), ev.unit, ev.drug, bool(ev.planned))
    treatments = tuple(sorted((*twin.treatments, rec), key=lambda r: (r.t, r.event_id)))
    return replace(twin, treatments=treatments, applied=(*twin.applied, ev.event_id))


def _scalar_blocks(twin: PatientTwin, items: Sequence[ObservationBase], config: TwinConfig) -> list[ObsBlock]:
    """Markers and ctDNA: functions of the tumour burden and the shedding parameters."""
    u, lp = twin.u[None], twin.log_params[None]
    voxel_ml = twin.grid.voxel_volume_ml
    i = PARAM_NAMES.index
    blocks = []
    for o in items:
        if isinstance(o, MarkerObservation):
            block = marker_operator(u, lp[..., i("marker_shedding")], torch.tensor([float(o.value)]),
                                    twin.prior.marker_baseline, voxel_ml, config.noise)
        elif isinstance(o, CtdnaObservation):
            block = ctdna_operator(u, lp[..., i("ctdna_shedding")], torch.tensor([float(o.tumor_fraction)]),
                                   voxel_ml, config.noise)
        else:
            continue
        # A result beyond the assay's limit says on which side of it the value lies, no more.
        blocks.append(censor_block(block, below=o.comparator in ("<", "<=")) if o.comparator else block)
    return blocks


def _summary_blocks(twin: PatientTwin, items: Sequence[CompactImaging], config: TwinConfig) -> list[ObsBlock]:
    """Per study: its visible volume and, for a density map, the burden over its voxels."""
    u = twin.u[None]
    voxel_ml = twin.grid.voxel_volume_ml
    blocks = []
    for o in items:
        if o.tumor_volume_ml is not None:
            blocks.append(volume_operator(u, torch.tensor([float(o.tumor_volume_ml)]), voxel_ml, config.noise))
        if o.channel == "density":
            noise = o.noise_model(config.noise)
            blocks.append(density_sum_operator(u, o.index[None], o.values[None], voxel_ml, noise))
            if config.profile_shells > 0:
                blocks.append(profile_operator(u, o.index[None], o.values[None], twin.grid.spacing, noise,
                                               config.profile_shells))
    return blocks


def _voxel_blocks(twin: PatientTwin, items: Sequence[CompactImaging], config: TwinConfig) -> list[ObsBlock]:
    u = twin.u[None]
    blocks = []
    for o in items:
        if o.channel == "density":
            blocks.append(density_operator(u, o.index[None], o.values[None], o.noise_model(config.noise)))
        elif o.channel == "segmentation":
            blocks.append(segmentation_operator(u, o.index[None], o.values[None], config.noise))
    return blocks


@dataclass
class _Stats:
    """Diagnostics gathered over the stages of one analysis."""

    n_obs: int = 0
    n_used: int = 0
    n_rejected: int = 0
    z: list[Tensor] = field(default_factory=list)

    def add(self, result: AnalysisResult) -> None:
        d = result.diagnostics
        self.n_obs += int(d.innovation.shape[-1])
        self.n_used += int(d.n_used[0])
        self.n_rejected += int(d.n_rejected[0])
        keep = ~d.rejected[0]
        self.z.append((d.innovation[0] / d.innovation_std[0].clamp_min(1e-12))[keep])

    def rms(self) -> float:
        z = torch.cat(self.z) if self.z else torch.zeros(0)
        return float(z.square().mean().sqrt()) if z.numel() else math.nan


def _stage(twin: PatientTwin, blocks: list[ObsBlock], analyser: Analyser, seed: int, *, field_part: bool,
           param_part: bool, stats: _Stats) -> PatientTwin:
    """One analysis of ``blocks`` updating the density field and/or the log-parameters."""
    brain = twin.brain.flatten()
    N = twin.n_members
    block = concat_blocks(blocks)
    locations = block.locations
    if locations is not None and bool(torch.isnan(locations).any()):
        # Burden-type observations sit at the tumour: the ensemble-mean centre of mass, in
        # grid-index units, for a localized filter.
        centre = _centre_index(twin.u.mean(0), twin.brain)
        locations = torch.where(torch.isnan(locations), centre.to(locations.dtype), locations)
    obs = Observations(y=block.y, r_var=block.r_var, locations=locations)
    parts = []
    if field_part:
        parts.append(twin.u.reshape(N, -1)[:, brain])
    if param_part:
        parts.append(twin.log_params)
    X = torch.cat(parts, dim=1)[None]
    g = torch.Generator(device=twin.u.device).manual_seed(seed)
    result = analyser.analyse(X, obs, HX=block.HX.to(X.dtype), generator=g)
    stats.add(result)
    Xa = result.X_a[0]
    u, lp = twin.u, twin.log_params
    if field_part:
        n_vox = int(brain.sum())
        flat = torch.zeros(N, brain.numel(), dtype=u.dtype, device=u.device)
        flat[:, brain] = Xa[:, :n_vox].clamp(0.0, 1.0)
        u = flat.reshape(u.shape)
        Xa = Xa[:, n_vox:]
    if param_part:
        lp = Xa
    return replace(twin, u=u, log_params=lp)


def _field_analyser(twin: PatientTwin, analyser: Analyser, config: TwinConfig) -> Analyser:
    """The filter of the voxel stage: an LETKF over the brain mask (settings from ``analyser``
    where it has them), or ``analyser`` itself when localization is off. A global update of the
    field from hundreds of voxels with a few dozen members spreads sampling noise over the
    whole brain; clamped at zero, that noise becomes tumour that then grows everywhere."""
    if config.localization_radius_mm is None:
        return analyser
    settings = {k: getattr(analyser, k) for k in ("inflation", "rtps", "outlier_k") if hasattr(analyser, k)}
    geometry = VoxelGrid(twin.grid.shape, mask=twin.brain, block=config.localization_block, spacing=twin.grid.spacing)
    return LETKF(geometry=geometry, radius=config.localization_radius_mm, **settings)


def describe_filter(analyser: Analyser, config: TwinConfig) -> str:
    """The filter version string stored with twins and forecasts: the filter's settings, the
    voxel stage's localization and the parameter spread controls."""
    names = ("inflation", "rtps", "outlier_k")
    settings = ",".join(f"{k}={getattr(analyser, k)}" for k in names if hasattr(analyser, k))
    text = f"{type(analyser).__name__}({settings})"
    if config.localization_radius_mm is not None:
        text += f"+LETKF-voxels(radius_mm={config.localization_radius_mm},block={config.localization_block})"
    return text + f";params(inflation={config.param_inflation},rtps={config.param_rtps})"


def _analyse(twin: PatientTwin, items: Sequence[ObservationBase], analyser: Analyser,
             config: TwinConfig) -> tuple[PatientTwin, AnalysisRecord]:
    """One analysis of ``items`` (all at the twin's clock), in three stages whose observation
    errors are independent, so that they can follow one another:

    1. markers and ctDNA update the whole state [field, log-parameters];
    2. each study's summaries (visible volume, burden over its voxels) update the parameters;
    3. the study's voxels update the field only.

    Keeping the hundreds of voxels away from the parameters is a localization: with N of a few
    dozen members, the sample cross-covariances between each parameter and hundreds of voxels
    are mostly noise, and the regression on all of them moved log D by ~0.6 in a single study
    in the virtual cohort (a systematic overestimate). The study's information reaches the
    parameters through its summaries instead, and the field through its voxels, each once.
    """
    ids = sorted(o.event_id for o in items)
    scalars = [o for o in items if not isinstance(o, CompactImaging)]
    studies = [o for o in items if isinstance(o, CompactImaging)]
    checks = _predictive_checks(twin, scalars, studies, config)
    prior_lp = twin.log_params
    # The parameters have no model error to keep their spread: optional inflation before,
    # relaxation to the prior spread after.
    work = replace(twin, log_params=inflate(prior_lp[None], config.param_inflation)[0])
    stats = _Stats()
    seed = lambda stage: hash_seed(twin.patient_id, "analysis", stage, *ids)  # noqa: E731
    if scalars:
        work = _stage(work, _scalar_blocks(work, scalars, config), analyser, seed("scalar"),
                      field_part=True, param_part=True, stats=stats)
    summaries = _summary_blocks(work, studies, config)
    if summaries:
        work = _stage(work, summaries, analyser, seed("summary"), field_part=False, param_part=True, stats=stats)
    voxels = _voxel_blocks(work, studies, config)
    if voxels:
        work = _stage(work, voxels, _field_analyser(twin, analyser, config), seed("voxels"), field_part=True,
                      param_part=False, stats=stats)
    lo, hi = log_bounds(twin.prior, prior_lp.dtype, prior_lp.device)
    lp_a = rtps(prior_lp[None], work.log_params[None], config.param_rtps)[0]
    lp_a = torch.maximum(torch.minimum(lp_a, hi), lo)
    record = AnalysisRecord(
        t_days=twin.clock, event_ids=tuple(ids), n_obs=stats.n_obs, n_used=stats.n_used,
        n_rejected=stats.n_rejected, normalized_innovation_rms=stats.rms(),
        param_spread_prior=float(spread(prior_lp[None])[0]), param_spread_analysis=float(spread(lp_a[None])[0]),
        checks=tuple(checks),
    )
    new = replace(twin, u=work.u, log_params=lp_a, n_analyses=twin.n_analyses + 1, last_analysis=twin.clock,
                  applied=(*twin.applied, *[o.event_id for o in items]),
                  filter_version=describe_filter(analyser, config),
                  checks=(*twin.checks, *checks)[-MAX_CHECKS:])
    return new, record


def _predictive_checks(twin: PatientTwin, scalars: Sequence[ObservationBase], studies: Sequence[CompactImaging],
                       config: TwinConfig) -> list[PredictiveCheck]:
    """How each scalar about to be analysed falls in the prior's prediction of it: markers,
    ctDNA and each study's visible volume (``calibration.pit``; exact, no draws)."""
    checks: list[PredictiveCheck] = []
    # The lead time of a prediction is the time since the quantity was last observed (the
    # study that started the twin for the first): analyses of other quantities in between
    # hardly correct it, so its model error has grown over all of that time.
    last_seen: dict[str, float] = {}
    for c in twin.checks:
        last_seen[c.quantity] = c.t_days
    lead = lambda name: twin.clock - last_seen.get(name, twin.started_at)  # noqa: E731
    observed = [o for o in scalars if isinstance(o, (MarkerObservation, CtdnaObservation))]
    uncensored = [replace(o, comparator=None, limit=None) for o in observed]
    for o, block in zip(observed, _scalar_blocks(twin, uncensored, config)):
        name = f"marker:{o.code}" if isinstance(o, MarkerObservation) else "ctdna_tumor_fraction"
        if o.comparator:
            # Censored: the PIT is uniform over the censored side's share F of the prediction
            # (its midpoint is taken); it teaches nothing about the size of the model's error.
            below = pit(block.HX[0], block.y[0], block.r_var[0]).item()
            share = below if o.comparator in ("<", "<=") else 1.0 - below
            mid = 0.5 * share if o.comparator in ("<", "<=") else 1.0 - 0.5 * share
            checks.append(PredictiveCheck(name, float(twin.clock), o.event_id, float(mid)))
            continue
        checks += checks_of([name], block.HX, block.y, block.r_var, twin.clock, [o.event_id], lead(name))
    voxel_ml = twin.grid.voxel_volume_ml
    c = VOLUME_LOG_OFFSET_ML
    for study in studies:
        if study.tumor_volume_ml is None:
            continue
        block = volume_operator(twin.u[None], torch.tensor([float(study.tumor_volume_ml)]), voxel_ml, config.noise)
        # In log(V + c), with the volume's error variance carried over to first order.
        checks += checks_of(["tumor_volume_ml"], (block.HX + c).log(), (block.y + c).log(),
                            block.r_var / (block.y + c) ** 2, twin.clock, [study.event_id], lead("tumor_volume_ml"))
    return checks


def _centre_index(u: Tensor, brain: Tensor) -> Tensor:
    """Density-weighted centroid of u [X, Y, Z] in grid-index units [3] (brain centre if empty)."""
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=u.dtype, device=u.device) for n in u.shape],
                                     indexing="ij"), dim=-1)
    w = u * brain
    if float(w.sum()) <= 0:
        w = brain.to(u.dtype)
    return (w[..., None] * idx).flatten(0, 2).sum(0) / w.sum()


def assimilate(twin: PatientTwin, observations: Sequence[ObservationBase], analyser: Analyser,
               *, config: TwinConfig | None = None) -> tuple[PatientTwin, AssimilationReport]:
    """Fold observations into the twin, in event-time order.

    Ids already applied (or repeated in the call) are skipped and reported. Treatments are
    recorded (they act when the members are advanced past them). Observations at one time are
    analysed together after advancing to that time. Events before the epoch are recorded as
    applied and ignored (the twin has no state before its first study); so are markers of a
    code the state does not model. Late observations (``is_late``) are refused with a
    ValueError: they need a re-analysis from an earlier snapshot (the engine's job).
    """
    config = config or TwinConfig()
    seen: set[str] = set(twin.applied)
    skipped: list[str] = []
    todo: list[ObservationBase] = []
    for o in observations:
        if o.event_id in seen:
            skipped.append(o.event_id)
            continue
        if o.patient_id != twin.patient_id:
            raise ValueError(f"event {o.event_id} belongs to {o.patient_id}, not {twin.patient_id}")
        seen.add(o.event_id)
        todo.append(o)
    late = [o.event_id for o in todo if is_late(o, twin)]
    if late:
        raise ValueError(f"late events need a re-analysis from an earlier snapshot: {late}")
    todo.sort(key=lambda o: (o.time, o.event_id))

    ignored: dict[str, str] = {}
    applied: list[str] = []
    records: list[AnalysisRecord] = []
    if todo:
        latest = max((o.recorded_at or o.time) for o in todo)
        twin = replace(twin, data_time=latest if twin.data_time is None else max(twin.data_time, latest))
    k = 0
    while k < len(todo):
        t = todo[k].time
        group = []
        while k < len(todo) and todo[k].time == t:
            group.append(todo[k])
            k += 1
        analysable = []
        for o in group:
            applied.append(o.event_id)
            if isinstance(o, TreatmentEvent):
                why = unmodelled(o)
                if why is None:
                    twin = _record_treatment(twin, o)
                else:
                    ignored[o.event_id] = why
                    twin = replace(twin, applied=(*twin.applied, o.event_id))
            elif twin.days(o.time) < twin.started_at:
                ignored[o.event_id] = "before the twin's first study"
                twin = replace(twin, applied=(*twin.applied, o.event_id))
            elif isinstance(o, MarkerObservation) and o.code != twin.marker_code:
                ignored[o.event_id] = f"no model for marker code {o.code} (the twin models {twin.marker_code})"
                twin = replace(twin, applied=(*twin.applied, o.event_id))
            else:
                analysable.append(compact(o, twin, config))
        if analysable:
            twin = advance(twin, twin.days(t), config=config)
            twin, record = _analyse(twin, analysable, analyser, config)
            records.append(record)
    return twin, AssimilationReport(tuple(applied), tuple(skipped), ignored, tuple(records))
