"""Virtual patients: a synthetic anatomy, a seeded tumour, true parameters drawn from the prior,
a standard-of-care schedule, an irregular observation schedule and noisy observations.

Everything here is in memory and in model time (days since day 0, a Monday 00:00 in the
patient's local clinic time). Turning a patient into files and schema-valid events is the job of
the I/O edge (``stream.virtual_feed``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from .grid import Grid
from .observables import (
    VISIBLE_THRESHOLD,
    ctdna_fraction,
    marker_level,
    tumor_burden,
    tumor_volume,
)
from .priors import TumorPrior
from .reaction_diffusion import TumorParams, simulate
from .tissue import WHITE, diffusion_weight, synthetic_brain
from .treatment import Schedule

# LDH (LOINC 2532-0): glioma has no specific serum marker, LDH is the generic tumour-burden lab.
DEFAULT_MARKER = ("2532-0", "U/L")


@dataclass(frozen=True)
class CohortConfig:
    """How virtual patients are made. Times in days, doses in Gy (RT) and mg/m² (chemo)."""

    grid: Grid = Grid((32, 32, 32), (3.0, 3.0, 3.0))
    prior: TumorPrior = field(default_factory=TumorPrior)
    observe_days: float = 300.0  # observations are generated on [0, observe_days]
    truth_margin_days: float = 180.0  # the truth continues this long after, to score forecasts
    seed_radius_mm: tuple[float, float] = (5.0, 9.0)
    seed_peak: float = 0.9
    # Presentation: None starts day 0 from the seeded blob itself. A (low, high) range of visible
    # volumes (mL) lets the seed grow untreated (natural history, same parameters and anatomy)
    # until its visible volume reaches a value drawn uniformly from the range; that field is
    # day 0, the diagnostic study. A tumour found this way has the travelling-front profile
    # of its own D and rho (a saturated core and an infiltrative edge whose width scales with
    # sqrt(D/rho), Swanson's two radii), which a freshly seeded blob does not have.
    presentation_volume_ml: tuple[float, float] | None = None
    presentation_max_days: float = 2000.0
    rt_start_days: tuple[int, int] = (14, 35)  # RT starts on a Monday in this window
    rt_fractions: int = 30
    rt_dose_gy: float = 2.0
    rt_hour: float = 9.0
    concurrent_chemo_mg_m2: float = 75.0
    adjuvant_cycles: int = 6
    adjuvant_mg_m2: tuple[float, float] = (150.0, 200.0)  # first cycle, later cycles
    mri_interval_days: tuple[float, float] = (42.0, 70.0)
    lab_interval_days: tuple[float, float] = (14.0, 28.0)
    image_noise_sd: float = 0.05  # additive on density, fraction of capacity
    marker_noise_log_sd: float = 0.10  # multiplicative (log-normal)
    ctdna_noise_log_sd: float = 0.20
    ctdna_lod: float = 1e-4  # tumour fractions below this are reported at the limit of detection
    marker: tuple[str, str] = DEFAULT_MARKER
    dt_days: float = 1.0


@dataclass(frozen=True)
class TreatmentEvent:
    """A delivered treatment. t in days; dose in Gy (radiotherapy) or mg/m² (chemotherapy)."""

    kind: str  # "radiotherapy" | "chemotherapy"
    t: float
    dose: float
    unit: str
    drug: str | None = None
    fraction_number: int | None = None


@dataclass(frozen=True)
class SyntheticObservation:
    """One noisy measurement. kind: "imaging" | "lab" | "ctdna"; t in days.

    imaging: ``density`` [X, Y, Z] (noisy cellularity map, fraction of capacity) and
    ``segmentation`` [X, Y, Z] uint8, ``value`` = segmented volume in mL.
    lab: ``value`` in ``unit`` for LOINC ``code``. ctdna: ``value`` = tumour fraction (unit "1").
    """

    kind: str
    t: float
    value: float
    unit: str
    code: str | None = None
    density: torch.Tensor | None = None
    segmentation: torch.Tensor | None = None


@dataclass(frozen=True)
class VirtualPatient:
    pseudonym: str
    seed: int
    grid: Grid
    tissue: torch.Tensor  # [X, Y, Z] labels
    params: dict[str, float]  # true parameters (names as in TumorPrior)
    u0: torch.Tensor  # [X, Y, Z] density at day 0
    treatments: list[TreatmentEvent]
    observations: list[SyntheticObservation]
    truth_times: torch.Tensor  # [T] days, daily
    truth_volume_ml: torch.Tensor  # [T] visible volume
    truth_burden_ml: torch.Tensor  # [T]
    truth_marker: torch.Tensor  # [T] in the marker's unit
    truth_ctdna: torch.Tensor  # [T] tumour fraction
    truth_fields: dict[float, torch.Tensor]  # day -> [X, Y, Z], at observation days and every 30 days
    config: CohortConfig

    @property
    def end_day(self) -> float:
        return float(self.truth_times[-1])

    def field_at(self, day: float) -> torch.Tensor:
        """The true density at a stored day (nearest stored day)."""
        key = min(self.truth_fields, key=lambda d: abs(d - day))
        return self.truth_fields[key]


def pseudonym(index: int, seed: int) -> str:
    """A synthetic patient pseudonym: stable for (index, seed), unlinkable to anything real."""
    digest = hashlib.sha256(f"oncotwin-virtual:{seed}:{index}".encode()).hexdigest()[:8]
    return f"VP-{index:04d}-{digest}"


def standard_of_care(rt_start: int, config: CohortConfig) -> list[TreatmentEvent]:
    """Stupp-like regimen: 30 × 2 Gy on weekdays at 09:00 with daily concurrent temozolomide
    (75 mg/m², 7 days a week, an hour before RT), then adjuvant 5-day cycles every 28 days
    starting 4 weeks after RT. rt_start is a Monday (a multiple of 7)."""
    events: list[TreatmentEvent] = []
    hour = config.rt_hour / 24.0
    n = 0
    week = 0
    while n < config.rt_fractions:
        for weekday in range(5):
            if n == config.rt_fractions:
                break
            n += 1
            events.append(
                TreatmentEvent("radiotherapy", rt_start + 7 * week + weekday + hour, config.rt_dose_gy, "Gy", fraction_number=n)
            )
        week += 1
    rt_end_day = int(events[-1].t)
    for day in range(rt_start, rt_end_day + 1):
        events.append(TreatmentEvent("chemotherapy", day + hour - 1 / 24, config.concurrent_chemo_mg_m2, "mg/m2", drug="temozolomide"))
    adjuvant_start = rt_end_day + 28
    for cycle in range(config.adjuvant_cycles):
        dose = config.adjuvant_mg_m2[0] if cycle == 0 else config.adjuvant_mg_m2[1]
        for day in range(5):
            t = adjuvant_start + 28 * cycle + day + 8.0 / 24
            events.append(TreatmentEvent("chemotherapy", t, dose, "mg/m2", drug="temozolomide"))
    return sorted(events, key=lambda e: e.t)


def schedule_from_treatments(treatments: list[TreatmentEvent], batch: int = 1, *, dtype=torch.float32, device="cpu") -> Schedule:
    """The simulator's schedule for a list of delivered treatments, repeated over a batch."""
    rt = [(e.t, e.dose) for e in treatments if e.kind == "radiotherapy"]
    chemo = [(e.t, e.dose) for e in treatments if e.kind == "chemotherapy"]
    return Schedule.from_lists(rt=rt, chemo=chemo, batch=batch, dtype=dtype, device=device)


def tumor_params(values: dict[str, torch.Tensor]) -> TumorParams:
    """Simulator parameters from a dict of [B] tensors (as drawn by TumorPrior.sample)."""
    return TumorParams(
        D=values["D"],
        rho=values["rho"],
        alpha=values["alpha"],
        alpha_beta=values["alpha_beta"],
        k_chemo=values["k_chemo"],
        chemo_decay=values["chemo_decay"],
    )


def _irregular_times(start: float, end: float, interval: tuple[float, float], g: torch.Generator, hours=(8.0, 17.0)) -> list[float]:
    times = []
    t = start
    while t <= end:
        hour = hours[0] + (hours[1] - hours[0]) * float(torch.rand((), generator=g, dtype=torch.float64))
        times.append(math.floor(t) + hour / 24.0)
        t += interval[0] + (interval[1] - interval[0]) * float(torch.rand((), generator=g, dtype=torch.float64))
    return [x for x in times if x <= end]


def _seed_tumor(grid: Grid, tissue: torch.Tensor, config: CohortConfig, g: torch.Generator) -> torch.Tensor:
    """A Gaussian blob of cells centred on a random white-matter voxel away from the edge."""
    white = torch.nonzero(tissue == WHITE)
    idx = int(torch.randint(len(white), (1,), generator=g))
    coords = grid.coords(device="cpu", dtype=torch.float64)
    centre = coords[tuple(white[idx].tolist())]
    lo, hi = config.seed_radius_mm
    radius = lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))
    r2 = ((coords - centre) ** 2).sum(-1)
    u = config.seed_peak * torch.exp(-r2 / (2 * (radius / 2.0) ** 2))
    return (u * (tissue > 0)).to(torch.float32)


def _present(u0: torch.Tensor, weight: torch.Tensor, params: TumorParams, grid: Grid, volume_ml: float,
             config: CohortConfig) -> torch.Tensor:
    """The untreated natural history of ``u0`` [X, Y, Z] up to the first day its visible volume
    reaches ``volume_ml`` (whole days; at most ``config.presentation_max_days``, where it stops
    whatever the volume). Returns the field [X, Y, Z] of that day."""
    u, t, chunk = u0[None], 0.0, 10.0
    voxel_ml = grid.voxel_volume_ml
    while t < config.presentation_max_days:
        days = [t + k for k in range(1, int(chunk) + 1)]
        saved = simulate(u, weight, params, grid, t, days[-1], dt=config.dt_days, scheme="auto", save_at=days).saved
        reached = (tumor_volume(saved[:, 0], voxel_ml) >= volume_ml).nonzero()
        if len(reached):
            return saved[int(reached[0]), 0]
        u, t = saved[-1], days[-1]
    return u[0]


def generate_patient(index: int, seed: int, config: CohortConfig | None = None) -> VirtualPatient:
    """One virtual patient, deterministic for (index, seed)."""
    config = config or CohortConfig()
    g = torch.Generator().manual_seed(hash_seed(seed, index))
    grid = config.grid
    tissue = synthetic_brain(grid, g)
    u0 = _seed_tumor(grid, tissue, config, g)
    drawn = config.prior.sample(1, g, dtype=torch.float64)
    params = {k: float(v[0]) for k, v in drawn.items()}
    weight = diffusion_weight(tissue)[None].to(torch.float32)
    if config.presentation_volume_ml is not None:
        lo_v, hi_v = config.presentation_volume_ml
        target = lo_v + (hi_v - lo_v) * float(torch.rand((), generator=g, dtype=torch.float64))
        u0 = _present(u0, weight, tumor_params({k: v.to(torch.float32) for k, v in drawn.items()}), grid, target,
                      config)

    lo, hi = config.rt_start_days
    rt_start = 7 * math.ceil((lo + (hi - lo) * float(torch.rand((), generator=g))) / 7)
    treatments = [e for e in standard_of_care(rt_start, config) if e.t <= config.observe_days + config.truth_margin_days]

    mri_days = _irregular_times(0.0, config.observe_days, config.mri_interval_days, g)
    lab_days = _irregular_times(float(torch.randint(3, 10, (1,), generator=g)), config.observe_days, config.lab_interval_days, g)
    end = config.observe_days + config.truth_margin_days
    daily = [float(d) for d in range(0, int(end) + 1)]
    monthly = [float(d) for d in range(0, int(end) + 1, 30)]
    save_at = sorted(set(daily) | set(mri_days) | set(lab_days))

    result = simulate(
        u0[None],
        weight,
        tumor_params({k: v.to(torch.float32) for k, v in drawn.items()}),
        grid,
        0.0,
        end,
        dt=config.dt_days,
        schedule=schedule_from_treatments(treatments),
        scheme="auto",
        save_at=save_at,
    )
    saved = result.saved[:, 0]  # [T, X, Y, Z]
    at = {t: i for i, t in enumerate(save_at)}
    voxel_ml = grid.voxel_volume_ml
    burden = tumor_burden(saved, voxel_ml).to(torch.float64)
    volume = tumor_volume(saved, voxel_ml).to(torch.float64)
    marker = marker_level(burden, torch.tensor(params["marker_shedding"]), torch.tensor(params["marker_baseline"]))
    ctdna = ctdna_fraction(burden, torch.tensor(params["ctdna_shedding"]))

    observations: list[SyntheticObservation] = []
    brain = tissue > 0
    for t in mri_days:
        truth = saved[at[t]]
        noise = config.image_noise_sd * torch.randn(truth.shape, generator=g)
        density = ((truth + noise).clamp(0, 1) * brain).to(torch.float32)
        seg = (density >= VISIBLE_THRESHOLD).to(torch.uint8)
        observations.append(
            SyntheticObservation("imaging", t, float(seg.sum()) * voxel_ml, "mL", density=density, segmentation=seg)
        )
    code, unit = config.marker
    for t in lab_days:
        i = at[t]
        m = float(marker[i]) * math.exp(config.marker_noise_log_sd * float(torch.randn((), generator=g)))
        observations.append(SyntheticObservation("lab", t, m, unit, code=code))
        f = float(ctdna[i]) * math.exp(config.ctdna_noise_log_sd * float(torch.randn((), generator=g)))
        observations.append(SyntheticObservation("ctdna", t, min(max(f, config.ctdna_lod), 1.0), "1"))
    observations.sort(key=lambda o: (o.t, o.kind))

    daily_idx = torch.tensor([at[d] for d in daily])
    field_days = sorted(set(mri_days) | set(monthly))
    return VirtualPatient(
        pseudonym=pseudonym(index, seed),
        seed=seed,
        grid=grid,
        tissue=tissue,
        params=params,
        u0=u0,
        treatments=treatments,
        observations=observations,
        truth_times=torch.tensor(daily, dtype=torch.float64),
        truth_volume_ml=volume[daily_idx],
        truth_burden_ml=burden[daily_idx],
        truth_marker=marker[daily_idx],
        truth_ctdna=ctdna[daily_idx],
        truth_fields={d: saved[at[d]].clone() for d in field_days},
        config=config,
    )


def generate_cohort(n: int, seed: int, config: CohortConfig | None = None) -> list[VirtualPatient]:
    return [generate_patient(i, seed, config) for i in range(n)]


def hash_seed(*parts: object) -> int:
    """A 63-bit seed derived from any parts (stable across runs and platforms)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
