"""Forecasts from a twin, and therapy rehearsal: what-if treatment plans as batched scenarios.

One simulate call advances [scenarios x members] together (horizon by horizon, so only the
current state is held, never a [horizons x scenarios x members] stack of fields); several
patients on one grid can share the batch (``forecast_batch``). For each
scenario and horizon the forecast gives the 2.5 %, 50 % and 97.5 % member quantiles of the
visible tumour volume (mL), the burden (mL), the marker level (the twin's marker, its unit) and
the ctDNA tumour fraction, and the per-voxel probability that the tumour is visible
(u >= VISIBLE_THRESHOLD). Forecasts describe the quantities, not their measurements: no
observation noise is added.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import torch
from torch import Tensor

from models.observables import VISIBLE_THRESHOLD, ctdna_fraction, marker_level, tumor_burden, tumor_volume
from models.reaction_diffusion import TumorParams, simulate
from models.tissue import diffusion_weight
from models.treatment import Schedule
from schemas.times import format_time

from .calibration import VOLUME_LOG_OFFSET_ML, mixture_quantiles, model_error_rate, summarize
from .observations import TreatmentEvent
from .twin import (
    PARAM_NAMES,
    PatientTwin,
    TreatmentRecord,
    TwinConfig,
    effective_treatments,
    member_params,
    unmodelled,
)

__all__ = ["AS_PLANNED", "DEFAULT_HORIZONS", "QUANTILES", "QUANTITIES", "Forecast", "forecast", "forecast_batch",
           "radiotherapy_course"]

DEFAULT_HORIZONS: tuple[float, ...] = (30.0, 60.0, 90.0, 180.0)
QUANTILES: tuple[float, float, float] = (0.025, 0.5, 0.975)
QUANTITIES: tuple[str, ...] = ("volume_ml", "burden_ml", "marker", "ctdna_fraction")
#: Namespace of the deterministic forecast ids (uuid5).
FORECAST_NAMESPACE = uuid.UUID("3f2f4d0e-6a7b-5c8d-9e0f-1a2b3c4d5e6f")
#: The scenario that continues with the treatments the twin knows of (delivered and planned).
AS_PLANNED = "planned"


@dataclass(frozen=True)
class Forecast:
    """A twin's forecast at its clock.

    issued_for:     aware datetime of the state the forecast starts from (the twin's clock).
    horizons_days:  days after ``issued_for``; scenarios: names, AS_PLANNED first.
    volume_ml, burden_ml, marker, ctdna_fraction: [S, H, 3] quantiles QUANTILES (lo, median,
                    hi) per scenario and horizon; marker in ``marker_unit`` of ``marker_code``.
    prob_visible:   [S, H, X, Y, Z] fraction of members with u >= VISIBLE_THRESHOLD.
    params:         log-parameter name -> [3] quantiles of the parameter itself (not its log).
    based_on_events: the event ids the twin had applied.
    calibration:    per observed quantity (and "all"), how the twin's predictions covered its
                    own observations so far (``calibration.Calibration.to_json``).
    model_error:    per quantity group, the learnt log-space model-error variance per day the
                    intervals are dressed with.
    data_time:      the latest recorded_at of the events applied (``PatientTwin.data_time``).
    """

    patient_id: str
    issued_for: datetime
    horizons_days: tuple[float, ...]
    scenarios: tuple[str, ...]
    volume_ml: Tensor
    burden_ml: Tensor
    marker: Tensor
    ctdna_fraction: Tensor
    prob_visible: Tensor
    params: dict[str, Tensor]
    n_members: int
    based_on_events: tuple[str, ...]
    marker_code: str
    model_version: str
    filter_version: str
    quantiles: tuple[float, ...] = QUANTILES
    marker_unit: str | None = None
    grid_spacing_mm: tuple[float, float, float] = field(default=(1.0, 1.0, 1.0))
    calibration: dict[str, dict] = field(default_factory=dict)
    model_error: dict[str, float] = field(default_factory=dict)
    data_time: datetime | None = None

    def valid_at(self, horizon_days: float) -> datetime:
        return self.issued_for + timedelta(days=horizon_days)

    def quantity(self, name: str, scenario: str = AS_PLANNED) -> Tensor:
        """[H, 3] quantiles of one quantity in one scenario."""
        if name not in QUANTITIES:
            raise KeyError(f"unknown quantity {name!r}; one of {QUANTITIES}")
        return getattr(self, name)[self.scenarios.index(scenario)]

    def to_records(self, issued_at: datetime) -> list[dict]:
        """One record per scenario in the shape of schemas/json/forecast.json.

        ``issued_at`` is the wall-clock publication time, passed in (numerics read no clock).
        ``forecast_id`` is a uuid5 of (patient, analysis time, scenario, the applied event ids),
        so re-publishing the same forecast (a replay) gives the same id. Probability maps are
        not included: storing them and adding their claim check is the publisher's job.
        """
        digest = hashlib.sha256("\n".join(sorted(self.based_on_events)).encode()).hexdigest()
        analysis_time = format_time(self.issued_for)
        units = {"tumor_volume_ml": "mL", "burden": "mL", "ctdna_tumor_fraction": "1",
                 f"marker:{self.marker_code}": self.marker_unit or "1"}
        tensors = {"tumor_volume_ml": self.volume_ml, "burden": self.burden_ml,
                   "ctdna_tumor_fraction": self.ctdna_fraction, f"marker:{self.marker_code}": self.marker}
        records = []
        for s, scenario in enumerate(self.scenarios):
            horizons = [
                {
                    "days": days,
                    "at": format_time(self.valid_at(days)),
                    "quantities": {name: {**_q(t[s, h]), "unit": units[name]} for name, t in tensors.items()},
                }
                for h, days in enumerate(self.horizons_days)
            ]
            key = "|".join((self.patient_id, analysis_time, scenario, digest))
            record = {
                "forecast_id": str(uuid.uuid5(FORECAST_NAMESPACE, key)),
                "patient_id": self.patient_id,
                "issued_at": format_time(issued_at),
                "analysis_time": analysis_time,
                "based_on_events": list(dict.fromkeys(self.based_on_events)),
                "model_version": self.model_version,
                "filter_version": self.filter_version,
                "members": self.n_members,
                "scenario": scenario,
                "horizons": horizons,
                "diagnostics": {"parameters": {k: _q(v) for k, v in self.params.items()},
                                "calibration": self.calibration,
                                "model_error_per_day": self.model_error},
            }
            if self.data_time is not None:
                record["data_time"] = format_time(self.data_time)
            records.append(record)
        return records


def _q(v: Tensor) -> dict[str, float]:
    lo, med, hi = (float(x) for x in v.tolist())
    return {"median": med, "lo": lo, "hi": hi}


def radiotherapy_course(patient_id: str, start: datetime, fractions: int = 30, dose_gy: float = 2.0,
                        weekdays_only: bool = True, prefix: str = "plan") -> list[TreatmentEvent]:
    """A rehearsal plan: ``fractions`` x ``dose_gy`` daily (weekdays only by default) from
    ``start``, as planned TreatmentEvents with synthetic ids ``{prefix}-rt-{n}``."""
    out, day, n = [], 0, 0
    while n < fractions:
        when = start + timedelta(days=day)
        day += 1
        if weekdays_only and when.weekday() >= 5:
            continue
        n += 1
        out.append(TreatmentEvent(event_id=f"{prefix}-rt-{n}", patient_id=patient_id, time=when,
                                  kind="radiotherapy", dose=dose_gy, unit="Gy", planned=True))
    return out


def _scenario_treatments(twin: PatientTwin, plan: Sequence[TreatmentEvent] | None) -> list[TreatmentRecord]:
    """AS_PLANNED (plan None): what the twin knows. A named plan: every delivered treatment
    plus the plan's treatments after the clock (the plan replaces the twin's own planned ones;
    the past cannot be re-planned). A plan's treatment the model cannot apply (``unmodelled``:
    another drug than the model's) is refused rather than simulated as something else."""
    if plan is None:
        return effective_treatments(twin.treatments)
    for e in plan:
        why = unmodelled(e)
        if why is not None:
            raise ValueError(f"plan treatment {e.event_id}: {why}")
    delivered = [r for r in twin.treatments if not r.planned]
    future = [TreatmentRecord(e.event_id, twin.days(e.time), e.kind, float(e.dose), e.unit, e.drug, True)
              for e in plan if twin.days(e.time) > twin.clock]
    return sorted(delivered + future, key=lambda r: (r.t, r.event_id))


def _quantiles(x: Tensor, dim: int) -> Tensor:
    q = torch.tensor(QUANTILES, dtype=x.dtype, device=x.device)
    return torch.quantile(x, q, dim=dim).movedim(0, -1)


def model_error_rates(twin: PatientTwin, config: TwinConfig) -> dict[str, float]:
    """Per quantity group, the log-space variance per day of the twin's model error, learnt
    from its predictive checks (``calibration.model_error_rate``)."""
    prior = dict(config.model_error_prior)
    group = lambda q: "marker" if q.startswith("marker:") else q  # noqa: E731
    return {g: min(config.model_error_max_rate,
                   model_error_rate((c for c in twin.checks if group(c.quantity) == g), rate,
                                    config.model_error_prior_days))
            for g, rate in prior.items()}


def _dressed(x: Tensor, var: Tensor, log_offset: float) -> Tensor:
    """[S, H, 3] quantiles of members x [S, H, N] (positive quantities), each member dressed
    with log-normal model error of log-variance ``var`` [H]: quantiles of the mixture
    (1/N) Σ N(log(x_i + c), var) mapped back, c = ``log_offset``. Undressed (var 0): the
    members' own quantiles."""
    plain = _quantiles(x, dim=2)
    if not bool((var > 0).any()):
        return plain
    c = log_offset
    centres = (x.to(torch.float64) + c).clamp_min(1e-300).log()
    q = mixture_quantiles(centres, var[None, :].expand(x.shape[0], -1), QUANTILES)
    dressed = (q.exp() - c).clamp_min(0.0).to(x.dtype)
    # Horizons without model error keep the members' quantiles exactly.
    return torch.where((var > 0)[None, :, None], dressed, plain)


def forecast(twin: PatientTwin, horizons: Sequence[float] = DEFAULT_HORIZONS,
             plans: Mapping[str, Sequence[TreatmentEvent]] | None = None, *, config: TwinConfig | None = None,
             ) -> Forecast:
    """Forecast ``twin`` ``horizons`` days past its clock, for AS_PLANNED and each plan.

    All scenarios x members run in one batch (B = S·N). The twin is not changed.
    """
    return forecast_batch([twin], horizons, [plans], config=config)[0]


def forecast_batch(twins: Sequence[PatientTwin], horizons: Sequence[float] = DEFAULT_HORIZONS,
                   plans: Sequence[Mapping[str, Sequence[TreatmentEvent]] | None] | None = None, *,
                   config: TwinConfig | None = None) -> list[Forecast]:
    """Forecasts of several patients in one batch of [patients x scenarios x members].

    The patients must share the grid (shape and spacing) and live on one device. Each runs on
    its own clock: the batch is simulated on a relative time axis (days after each twin's
    clock, with every patient's treatment times shifted by its clock), which is exact because
    the model is autonomous between treatments. ``plans[p]`` are patient p's rehearsal plans.

    Batched members share the simulator's step grid and its conjugate-gradient stopping rule
    (iterate until every member has converged), so a patient's numbers can differ in the last
    digits from a forecast of that patient alone; the engine batches only when asked to.
    """
    config = config or TwinConfig()
    hs = tuple(float(h) for h in horizons)
    if not hs or any(h <= 0 for h in hs) or list(hs) != sorted(hs):
        raise ValueError(f"horizons must be positive and increasing, got {hs}")
    if not twins:
        return []
    plans = list(plans) if plans is not None else [None] * len(twins)
    grid, device, dtype = twins[0].grid, twins[0].u.device, twins[0].u.dtype
    if any(t.grid != grid or t.u.device != device or t.u.dtype != dtype for t in twins):
        raise ValueError("a forecast batch needs one grid, device and dtype")

    names, rows_rt, rows_chemo, u0, weights, params, log_params, sizes = [], [], [], [], [], [], [], []
    for twin, plan in zip(twins, plans):
        scen = [AS_PLANNED, *(plan or {})]
        if len(set(scen)) != len(scen):
            raise ValueError(f"a plan may not be called {AS_PLANNED!r}")
        S, N = len(scen), twin.n_members
        names.append(scen)
        sizes.append((S, N))
        for name in scen:
            tr = _scenario_treatments(twin, None if name == AS_PLANNED else plan[name])
            rt = [(r.t - twin.clock, r.dose) for r in tr if r.kind == "radiotherapy"]
            chemo = [(r.t - twin.clock, r.dose) for r in tr if r.kind == "chemotherapy"]
            rows_rt += [rt] * N
            rows_chemo += [chemo] * N
        u0.append(twin.u.repeat(S, 1, 1, 1))  # scenario-major, like the schedule rows
        weights.append(diffusion_weight(twin.tissue, dtype=dtype)[None].expand(S * N, *grid.shape))
        params += [member_params(twin)] * S
        log_params.append(twin.log_params.repeat(S, 1))
    schedule = Schedule.from_plans(rt=rows_rt, chemo=rows_chemo, device=device)
    one_anatomy = len(twins) == 1
    weight = weights[0][:1] if one_anatomy else torch.cat(weights)  # [1] broadcasts for one patient
    p_all: TumorParams = TumorParams.stack(params)
    u = torch.cat(u0)
    lp = torch.cat(log_params)
    i = PARAM_NAMES.index
    voxel_ml = grid.voxel_volume_ml
    marker_s, ctdna_s = lp[:, i("marker_shedding")].exp(), lp[:, i("ctdna_shedding")].exp()

    vol, bur, ct, prob = [], [], [], []
    t = 0.0
    for h in hs:
        u = simulate(u, weight, p_all, grid, t, h, dt=config.dt_days, schedule=schedule, scheme=config.scheme).u
        t = h
        b = tumor_burden(u, voxel_ml)
        vol.append(tumor_volume(u, voxel_ml))
        bur.append(b)
        ct.append(ctdna_fraction(b, ctdna_s))
        prob.append(u >= VISIBLE_THRESHOLD)

    out, start = [], 0
    h_days = torch.tensor(hs, dtype=torch.float64, device=device)
    for twin, scen, (S, N) in zip(twins, names, sizes):
        rows = slice(start, start + S * N)
        start += S * N
        baseline = torch.tensor(twin.prior.marker_baseline, dtype=dtype, device=device)
        rates = model_error_rates(twin, config)
        per = lambda xs, group, log_offset=0.0: _dressed(  # noqa: E731  (xs: this patient's rows)
            torch.stack([x.reshape(S, N) for x in xs], dim=1), rates[group] * h_days, log_offset)
        markers = [marker_level(b[rows], marker_s[rows], baseline) for b in bur]  # per-patient baseline
        out.append(Forecast(
            patient_id=twin.patient_id, issued_for=twin.time, horizons_days=hs, scenarios=tuple(scen),
            volume_ml=per([v[rows] for v in vol], "tumor_volume_ml", VOLUME_LOG_OFFSET_ML),
            burden_ml=per([b[rows] for b in bur], "tumor_volume_ml", VOLUME_LOG_OFFSET_ML),
            ctdna_fraction=per([c[rows] for c in ct], "ctdna_tumor_fraction").clamp(max=1.0),
            marker=per(markers, "marker"),
            prob_visible=torch.stack([x[rows].to(dtype).reshape(S, N, *grid.shape).mean(dim=1) for x in prob], dim=1),
            params={n: _quantiles(twin.log_params[:, k].exp(), dim=0) for k, n in enumerate(PARAM_NAMES)},
            n_members=N, based_on_events=twin.applied, marker_code=twin.marker_code,
            model_version=twin.model_version, filter_version=twin.filter_version, marker_unit=twin.marker_unit,
            grid_spacing_mm=grid.spacing, calibration=calibration_of(twin.checks), model_error=rates,
            data_time=twin.data_time,
        ))
    return out


def calibration_of(checks) -> dict[str, dict]:
    """Per quantity and over all, the running calibration of a twin's predictive checks."""
    by: dict[str, list] = {}
    for c in checks:
        by.setdefault(c.quantity, []).append(c)
    out = {q: summarize(cs).to_json() for q, cs in sorted(by.items())}
    out["all"] = summarize(checks).to_json()
    return out
