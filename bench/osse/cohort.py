"""The fraternal-twin cohort: virtual glioblastoma patients from ``bench.osse.truth``, their clinic
(standard of care, observed progression, second-line therapy, scans and blood tests at irregular
times) and their events in the service's contract, with late and duplicated deliveries.

Clinic, per patient (days from the diagnostic MRI, day 0, a Monday 00:00 clinic time):

* presentation: the tumour grows untreated from a small seed until its tumour core (enhancing
  plus necrosis, noise-free) reaches a volume drawn from ``presentation_core_ml``; that is day 0;
* standard of care (Stupp et al. 2005): from a Monday 2-5 weeks after diagnosis, 30 x 2 Gy on
  weekdays at 09:00 with temozolomide 75 mg/m² daily (7 days a week, 08:00) from the first to the
  last fraction day; 4 weeks later 6 adjuvant cycles of temozolomide on days 1-5 of 28, 150 mg/m²
  in cycle 1 and 200 mg/m² from cycle 2 for the patients who escalate (drawn);
* MRI every 6-10 weeks (irregular), LDH and ctDNA every 2-4 weeks at irregular times;
* progression is called on the observed scans (RANO-like, Wen et al. 2010): enhancing volume
  at least 25 % and ``progression_min_ml`` above its nadir, not within 12 weeks of the end of
  radiotherapy (pseudoprogression); it stops first-line therapy, and two weeks later (the next
  Monday) second-line therapy starts, one per patient from its seed (``second_line_of``):
  lomustine 110 mg/m² every 6 weeks (Wick et al. 2017), re-irradiation 35 Gy in 10 fractions
  (Fogh et al. 2010), bevacizumab 10 mg/kg every 2 weeks (Friedman et al. 2009), or supportive
  care. One switch per patient: a second progression changes nothing (the follow-up is short);
* no surgery: the patients are biopsied only (today's twin has no resection model);
* the truth goes on ``score_margin_days`` past the observed period with the course as planned
  (no events are written for it): the forecasts made at the last scans are scored there.

Events are written in the contract the open contract issue asks for (``full`` events): a censored
ctDNA result carries ``comparator: "<"`` with the limit as its value, the segmentation's body a
``labels`` mapping, treatments their course (``regimen``, ``cycle``, ``cycles_planned``,
``day_of_cycle``, ``cycle_length_days``, ``line_of_therapy``) and mg/kg doses ``body_weight_kg``.
``bench.osse.run.to_current_contract`` downgrades them to what today's contract accepts.
Deliveries: each event is recorded some hours after it occurred (imaging 26 h, labs 4 h, ctDNA
72 h, treatments 1 h), a few much later (``late_probability``, 2-21 days) and a few twice
(``duplicate_probability``: the same event, byte for byte, re-sent days later).
"""

from __future__ import annotations

import hashlib
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import torch
from torch import Tensor

from models.grid import Grid
from models.tissue import synthetic_brain
from models.virtual_patient import hash_seed
from schemas import SCHEMA_VERSION, format_time

from .truth import (
    BEVACIZUMAB,
    ENHANCING_LABEL,
    LABELS,
    LOMUSTINE,
    NECROSIS_LABEL,
    TEMOZOLOMIDE,
    Anatomy,
    Regimen,
    Thresholds,
    TruthParams,
    TruthState,
    advance,
    bev_level,
    bev_suppression,
    build_anatomy,
    cellularity_map,
    draw_params,
    label_map,
    readout,
    seed_state,
    volume_ml,
)

#: Namespace of the cohort's deterministic ids (uuid5).
OSSE_NAMESPACE = uuid.UUID("0b7e3a8e-4c1d-5f2a-9e6b-7d8c9a0b1c2d")
#: Day 0 of every patient is a Monday at 00:00 clinic time, some weeks after this one (well in
#: the past: the normalizer refuses events from the future).
EPOCH = datetime(2023, 1, 2, tzinfo=timezone(timedelta(hours=1)))
SOURCE = "osse-virtual-clinic"
SECOND_LINES = ("lomustine", "bevacizumab", "reirradiation", "supportive")
TRUTH_SERIES = ("enhancing_ml", "flair_ml", "necrosis_ml", "viable_ml", "damaged_ml", "resistant_ml", "ctdna",
                "ldh", "suppression")


@dataclass(frozen=True)
class CohortConfig:
    """How the cohort is made. Days, mm, mL; probabilities in [0, 1]."""

    grid: Grid = Grid((48, 48, 48), (2.5, 2.5, 2.5))
    observe_days: float = 450.0
    score_margin_days: float = 180.0
    horizons: tuple[float, ...] = (30.0, 60.0, 90.0, 180.0)
    presentation_core_ml: tuple[float, float] = (4.0, 25.0)
    presentation_max_days: float = 2500.0
    dt_days: float = 0.5
    rt_start_days: tuple[int, int] = (14, 35)
    adjuvant_escalation: float = 0.75  # share of patients escalating to 200 mg/m² from cycle 2
    mri_interval_days: tuple[float, float] = (42.0, 70.0)
    lab_interval_days: tuple[float, float] = (14.0, 28.0)
    progression_increase: float = 0.25
    progression_min_ml: float = 0.5
    pseudoprogression_days: float = 84.0
    second_line_delay_days: float = 14.0
    cellularity_noise_sd: tuple[float, float] = (0.05, 0.10)
    cellularity_offset: tuple[float, float] = (0.0, 0.02)
    threshold_log_sd: float = 0.08
    ldh_log_sd: float = 0.08
    ctdna_log_sd: float = 0.25
    ctdna_lod: float = 2e-3  # a plasma panel's limit of detection, 0.2 % (assumption)
    late_probability: float = 0.08
    late_days: tuple[float, float] = (2.0, 21.0)
    duplicate_probability: float = 0.03

    @property
    def end_day(self) -> float:
        return self.observe_days + self.score_margin_days


#: The quick cohort of tests and ``--quick``: a smaller brain (32³ x 2.5 mm) and follow-up.
QUICK = CohortConfig(grid=Grid((32, 32, 32), (2.5, 2.5, 2.5)), observe_days=300.0, presentation_core_ml=(2.0, 8.0),
                     dt_days=1.0)


@dataclass(frozen=True)
class Scan:
    """One MRI: observed BraTS labels uint8 [X, Y, Z], cellularity float32 [X, Y, Z], and the
    observed label volumes (mL); ``progression``: the clinic called progression on it;
    ``delivery_hours``: how long after the scan its event is recorded (``scan_delays``)."""

    t: float
    labels: Tensor
    cellularity: Tensor
    enhancing_ml: float
    flair_ml: float
    necrosis_ml: float
    progression: bool = False
    delivery_hours: float = 26.0


@dataclass(frozen=True)
class Sample:
    """A blood result: kind "lab" (LDH, U/L) or "ctdna" (tumour fraction; ``censored``: below
    the limit of detection, ``value`` is then the limit)."""

    kind: str
    t: float
    value: float
    censored: bool = False


@dataclass(frozen=True)
class Treatment:
    """A delivered treatment and its course facts. kind radiotherapy (dose Gy) or chemotherapy
    (dose in ``unit``: mg/m² or mg/kg)."""

    kind: str
    t: float
    dose: float
    unit: str
    regimen: str
    line: int
    drug: str | None = None
    fraction_number: int | None = None
    fractions_planned: int | None = None
    cycle: int | None = None
    cycles_planned: int | None = None
    day_of_cycle: int | None = None
    cycle_length_days: int | None = None


@dataclass(frozen=True)
class Patient:
    """One virtual patient and the hidden truth to score against.

    truth_days [T] integer days 0..end; truth[name] [T] for TRUTH_SERIES (mL, tumour fraction,
    U/L, anti-angiogenic suppression); truth_maps: day -> noise-free labels uint8 [X, Y, Z] at
    the days forecasts from the cut scans are scored at (see ``map_days``)."""

    index: int
    seed: int
    pseudonym: str
    day0: datetime
    grid: Grid
    tissue: Tensor
    params: TruthParams
    second_line: str
    presentation_days: float
    progression_day: float | None
    second_line_start: float | None
    scans: list[Scan]
    samples: list[Sample]
    treatments: list[Treatment]
    truth_days: Tensor
    truth: dict[str, Tensor]
    truth_maps: dict[int, Tensor]
    config: CohortConfig
    brain_ml: float

    def truth_at(self, name: str, day: float) -> float:
        """A truth series at a real-valued day (linear between days; clamped to the range)."""
        x = self.truth_days
        d = min(max(float(day), float(x[0])), float(x[-1]))
        i = min(int(math.floor(d)), len(x) - 2)
        w = d - i
        y = self.truth[name]
        return float((1.0 - w) * y[i] + w * y[i + 1])

    def map_at(self, day: float) -> tuple[int, Tensor]:
        """The stored truth label map nearest to ``day`` (and its day)."""
        k = min(self.truth_maps, key=lambda d: (abs(d - day), d))
        return k, self.truth_maps[k]

    def at(self, t: float) -> datetime:
        """Clinic time of day t (whole seconds: feeds carry no sub-second precision)."""
        return self.day0 + timedelta(seconds=round(t * 86400.0))


def pseudonym(index: int, seed: int) -> str:
    digest = hashlib.sha256(f"oncotwin-osse:{seed}:{index}".encode()).hexdigest()[:8]
    return f"OSSE-{index:04d}-{digest}"


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _irregular(start: float, end: float, interval: tuple[float, float], g: torch.Generator,
               hours: tuple[float, float] = (8.0, 17.0)) -> list[float]:
    out, t = [], start
    while t <= end:
        out.append(math.floor(t) + _uniform(g, *hours) / 24.0)
        t += _uniform(g, *interval)
    return [x for x in out if x <= end]


def second_line_of(index: int, seed: int) -> str:
    """The patient's second line if it progresses: the four options rotate over a seed's
    patients from a place drawn from the seed, so any four consecutive patients of a seed
    cover lomustine, bevacizumab, re-irradiation and supportive care (a small cohort drawn at
    random would often miss one)."""
    return SECOND_LINES[(index + hash_seed("osse-second-line", seed)) % len(SECOND_LINES)]


def first_line(rt_start: int, escalate: bool) -> list[Treatment]:
    """Stupp: 30 x 2 Gy weekdays 09:00, temozolomide 75 mg/m² daily 08:00 through the last
    fraction day, then 6 cycles days 1-5 of 28 (150, then 200 mg/m² if ``escalate``) starting
    28 days after the last fraction. ``rt_start`` is a Monday (a multiple of 7)."""
    out: list[Treatment] = []
    days = [rt_start + 7 * (n // 5) + n % 5 for n in range(30)]
    for n, day in enumerate(days, start=1):
        out.append(Treatment("radiotherapy", day + 9 / 24, 2.0, "Gy", "stupp", 1, fraction_number=n, fractions_planned=30))
    for day in range(rt_start, days[-1] + 1):
        out.append(Treatment("chemotherapy", day + 8 / 24, 75.0, "mg/m2", "stupp-concomitant", 1, drug="temozolomide"))
    start = days[-1] + 28
    for c in range(6):
        dose = 150.0 if c == 0 or not escalate else 200.0
        for k in range(5):
            out.append(Treatment("chemotherapy", start + 28 * c + k + 8 / 24, dose, "mg/m2", "stupp-adjuvant", 1,
                                 drug="temozolomide", cycle=c + 1, cycles_planned=6, day_of_cycle=k + 1,
                                 cycle_length_days=28))
    return out


def second_line(kind: str, start: int, end: float) -> list[Treatment]:
    """The second-line course from day ``start`` (a Monday) until ``end``."""
    out: list[Treatment] = []
    if kind == "lomustine":
        for c in range(6):
            t = start + 42 * c + 8 / 24
            if t <= end:
                out.append(Treatment("chemotherapy", t, 110.0, "mg/m2", "lomustine", 2, drug="lomustine", cycle=c + 1,
                                     cycles_planned=6, day_of_cycle=1, cycle_length_days=42))
    elif kind == "bevacizumab":
        planned = int((end - start) // 14) + 1
        for c in range(planned):
            t = start + 14 * c + 10 / 24
            if t <= end:
                out.append(Treatment("chemotherapy", t, 10.0, "mg/kg", "bevacizumab", 2, drug="bevacizumab", cycle=c + 1,
                                     cycles_planned=planned, day_of_cycle=1, cycle_length_days=14))
    elif kind == "reirradiation":
        for n in range(10):
            t = start + 7 * (n // 5) + n % 5 + 9 / 24
            out.append(Treatment("radiotherapy", t, 3.5, "Gy", "reirradiation", 2, fraction_number=n + 1,
                                 fractions_planned=10))
    elif kind != "supportive":
        raise ValueError(f"unknown second line {kind!r}")
    return out


def regimen_of(treatments: list[Treatment]) -> Regimen:
    reg = Regimen.empty()
    for e in treatments:
        if e.kind == "radiotherapy":
            reg.rt.append((e.t, e.dose))
        elif e.drug == TEMOZOLOMIDE.name:
            reg.tmz.append((e.t, e.dose))
        elif e.drug == LOMUSTINE.name:
            reg.ccnu.append((e.t, e.dose))
        elif e.drug == BEVACIZUMAB.name:
            reg.bev.append((e.t, e.dose))
    return reg


def _core_ml(state: TruthState, anatomy: Anatomy, p: TruthParams) -> float:
    labels = label_map(state, anatomy, p, 0.0)
    return volume_ml((labels == ENHANCING_LABEL) | (labels == NECROSIS_LABEL), anatomy.grid)


def present(state: TruthState, anatomy: Anatomy, p: TruthParams, target_ml: float, config: CohortConfig
            ) -> tuple[TruthState, float]:
    """Grow untreated (10-day checks, 2-day steps) until the tumour core reaches ``target_ml`` or
    ``presentation_max_days`` pass; returns that state with its clock reset to day 0 and the
    days it took."""
    empty = Regimen.empty()
    while state.t < config.presentation_max_days and _core_ml(state, anatomy, p) < target_ml:
        state = advance(state, state.t + 10.0, anatomy, p, empty, dt=2.0)
    return TruthState(state.s, state.r, state.d, state.n, state.packed_days, 0.0), state.t


def scan_delays(index: int, seed: int, n: int, config: CohortConfig) -> list[float]:
    """Hours from each of ``n`` scans to its event's record: 26, plus 2-21 days for a late one
    (``late_probability``). Drawn before the truth is simulated (from a generator of their own),
    because the truth maps a cut's forecasts are scored on must cover the days that forecast
    can start at: from the scan to its delivery."""
    g = torch.Generator().manual_seed(hash_seed("osse-scan-delivery", seed, index))
    out = []
    for _ in range(n):
        late = float(torch.rand((), generator=g, dtype=torch.float64)) < config.late_probability
        out.append(26.0 + (_uniform(g, *config.late_days) * 24.0 if late else 0.0))
    return out


def map_days(scan_days: list[float], delays_h: list[float], horizons: tuple[float, ...], end: float) -> list[int]:
    """Days whose truth maps are kept: for each cut scan (all but the first two) and horizon h,
    every day from the scan's day + h to its delivery's day + h + 1 (the forecast after a cut
    starts from the data delivered with it, between the two)."""
    out = set()
    for t, hours in list(zip(scan_days, delays_h))[2:]:
        for h in horizons:
            for day in range(int(math.floor(t)) + int(h), int(math.floor(t + hours / 24.0)) + int(h) + 2):
                if day <= end:
                    out.add(day)
    return sorted(out)


def generate_patient(index: int, seed: int, config: CohortConfig = CohortConfig()) -> Patient:
    """One patient, deterministic for (seed, index): every draw comes from one generator seeded
    by hash_seed("osse", seed, index), in a fixed order."""
    g = torch.Generator().manual_seed(hash_seed("osse", seed, index))
    grid = config.grid
    tissue = synthetic_brain(grid, g)
    p = draw_params(g)
    anatomy = build_anatomy(grid, tissue, p, g)
    state = seed_state(anatomy, p, g)
    target = _uniform(g, *config.presentation_core_ml)
    state, presentation_days = present(state, anatomy, p, target, config)

    lo, hi = config.rt_start_days
    rt_start = 7 * math.ceil(_uniform(g, lo, hi) / 7)
    escalate = _uniform(g, 0.0, 1.0) < config.adjuvant_escalation
    line2 = second_line_of(index, seed)
    scan_days = _irregular(0.0, config.observe_days, config.mri_interval_days, g)
    sample_days = _irregular(_uniform(g, 3.0, 10.0), config.observe_days, config.lab_interval_days, g)

    treatments = first_line(rt_start, escalate)
    rt_end = max(e.t for e in treatments if e.kind == "radiotherapy")
    end = config.end_day
    truth_days = list(range(0, int(math.floor(end)) + 1))
    delays = dict(zip(scan_days, scan_delays(index, seed, len(scan_days), config)))
    keep_maps = set(map_days(scan_days, [delays[t] for t in scan_days], config.horizons, end))
    stops = sorted({*(float(d) for d in truth_days), *scan_days, *sample_days})
    scan_set, sample_set, day_set = set(scan_days), set(sample_days), set(truth_days)

    series: dict[str, list[float]] = {k: [] for k in TRUTH_SERIES}
    maps: dict[int, Tensor] = {}
    scans: list[Scan] = []
    samples: list[Sample] = []
    nadir = math.inf
    progression_day = second_start = None
    for t in stops:
        regimen = regimen_of(treatments)
        state = advance(state, t, anatomy, p, regimen, dt=config.dt_days)
        suppression = bev_suppression(p, bev_level(regimen, t))
        if t in scan_set:
            jitter = Thresholds().jitter(g, config.threshold_log_sd)
            labels = label_map(state, anatomy, p, suppression, jitter)
            sd, offset = _uniform(g, *config.cellularity_noise_sd), _uniform(g, *config.cellularity_offset)
            cell = cellularity_map(state, g, sd, offset)
            enh = volume_ml(labels == ENHANCING_LABEL, grid)
            called = (progression_day is None and t >= rt_end + config.pseudoprogression_days
                      and enh >= (1.0 + config.progression_increase) * nadir and enh - nadir >= config.progression_min_ml)
            if called:
                progression_day = t
                # first-line therapy stops; second line from the next Monday two weeks on
                treatments = [e for e in treatments if e.t <= t]
                second_start = 7 * math.ceil((t + config.second_line_delay_days) / 7)
                treatments += second_line(line2, second_start, end)
                treatments.sort(key=lambda e: (e.t, e.kind))
            if progression_day is None:
                nadir = min(nadir, enh)
            scans.append(Scan(t, labels, cell, enh, volume_ml(labels > 0, grid), volume_ml(labels == NECROSIS_LABEL, grid),
                              called, delays[t]))
        if t in sample_set:
            truth_now = readout(state, anatomy, p, suppression)
            ldh = truth_now.ldh * math.exp(config.ldh_log_sd * float(torch.randn((), generator=g, dtype=torch.float64)))
            samples.append(Sample("lab", t, ldh))
            tf = truth_now.ctdna * math.exp(config.ctdna_log_sd * float(torch.randn((), generator=g, dtype=torch.float64)))
            censored = tf < config.ctdna_lod
            samples.append(Sample("ctdna", t, config.ctdna_lod if censored else min(tf, 1.0), censored))
        if t == math.floor(t) and int(t) in day_set:
            labels = label_map(state, anatomy, p, suppression)
            r = readout(state, anatomy, p, suppression, labels)
            for name in TRUTH_SERIES[:-1]:
                series[name].append(getattr(r, name))
            series["suppression"].append(suppression)
            if int(t) in keep_maps:
                maps[int(t)] = labels

    brain_ml = volume_ml(anatomy.brain, grid)
    weeks = hash_seed("osse-day0", seed, index) % 26
    return Patient(
        index=index, seed=seed, pseudonym=pseudonym(index, seed), day0=EPOCH + timedelta(weeks=weeks), grid=grid,
        tissue=tissue, params=p, second_line=line2, presentation_days=presentation_days,
        progression_day=progression_day, second_line_start=second_start, scans=scans, samples=samples,
        treatments=[e for e in treatments if e.t <= end],
        truth_days=torch.tensor(truth_days, dtype=torch.float64),
        truth={k: torch.tensor(v, dtype=torch.float64) for k, v in series.items()},
        truth_maps=maps, config=config, brain_ml=brain_ml,
    )


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One arrival of an event at the service: when it came and the event (a dict in the
    full contract). A duplicate is a second Delivery of the same event."""

    delivered_at: datetime
    event: dict
    duplicate: bool = False
    fact: Scan | Sample | Treatment | None = None  # what the event reports (for scoring baselines)


def _event_id(patient: Patient, *parts: object) -> str:
    return str(uuid.uuid5(OSSE_NAMESPACE, ":".join(map(str, (patient.pseudonym, *parts)))))


def _uid(*parts: object) -> str:
    """A DICOM UID under the UUID-derived root 2.25 (PS3.5 B.2)."""
    return "2.25." + str(uuid.uuid5(OSSE_NAMESPACE, ":".join(map(str, parts))).int)


def envelope(kind: str, patient: Patient, t: float, recorded: datetime, body: dict, event_id: str) -> dict:
    """An event of ``patient`` at day t in the contract's envelope (not validated: a full-contract
    body is more than today's contract accepts)."""
    return {"event_id": event_id, "patient_id": patient.pseudonym, "kind": kind,
            "occurred_at": format_time(patient.at(t)), "recorded_at": format_time(recorded),
            "source": SOURCE, "schema_version": SCHEMA_VERSION, "body": body}


def treatment_body(patient: Patient, e: Treatment) -> dict:
    course = {"regimen": e.regimen, "line_of_therapy": e.line}
    if e.kind == "radiotherapy":
        return {"type": "radiotherapy", "dose": {"value": e.dose, "unit": e.unit}, "fraction_number": e.fraction_number,
                "fractions_planned": e.fractions_planned, "target": "brain", **course}
    drug = {"temozolomide": TEMOZOLOMIDE, "lomustine": LOMUSTINE, "bevacizumab": BEVACIZUMAB}[e.drug or ""]
    body = {"type": "chemotherapy", "drug": {"name": drug.name, "rxnorm": drug.rxnorm},
            "dose": {"value": e.dose, "unit": e.unit}, "route": drug.route, **course}
    for name in ("cycle", "cycles_planned", "day_of_cycle", "cycle_length_days"):
        if getattr(e, name) is not None:
            body[name] = getattr(e, name)
    if e.unit == "mg/kg":
        body["body_weight_kg"] = round(patient.params.body_weight_kg, 1)
    return body


def patient_events(patient: Patient, root) -> list[Delivery]:
    """Every delivery of one patient's observed period, in delivery order (writing its NIfTI
    files under ``root``, the imaging root of the claim checks)."""
    from pathlib import Path  # noqa: PLC0415

    from stream.volumes import claim_check, write_nifti  # noqa: PLC0415  (I/O only when writing)

    root = Path(root)
    folder = root / patient.pseudonym
    spacing = patient.grid.spacing
    anatomy_path = folder / "anatomy.nii.gz"
    write_nifti(anatomy_path, patient.tissue.to(torch.uint8).numpy(), spacing)
    g = torch.Generator().manual_seed(hash_seed("osse-delivery", patient.seed, patient.index))
    cfg = patient.config
    raw: list[tuple[str, float, float, dict, str, object]] = []  # kind, t, delay hours, body, id, fact
    for e in patient.treatments:
        if e.t <= cfg.observe_days:
            raw.append(("treatment", e.t, 1.0, treatment_body(patient, e),
                        _event_id(patient, "treatment", e.kind, f"{e.t:.6f}"), e))
    for s in patient.scans:
        stem = f"mri-{s.t:08.3f}".replace(".", "_")
        seg_path, den_path = folder / f"{stem}-seg.nii.gz", folder / f"{stem}-cellularity.nii.gz"
        write_nifti(seg_path, s.labels.numpy(), spacing)
        write_nifti(den_path, s.cellularity.numpy(), spacing)
        body = {
            "modality": "MR",
            "study_uid": _uid(patient.pseudonym, "study", s.t),
            "series_uid": _uid(patient.pseudonym, "series", s.t),
            "segmentation_uri": claim_check(seg_path, root, format="nifti", content="segmentation"),
            "voxel_spacing_mm": list(spacing),
            "labels": dict(LABELS),
            "measures": {
                # the whole T2/FLAIR abnormality: what today's twin reads a segmentation as
                "tumor_volume": {"value": round(s.flair_ml, 4), "unit": "mL"},
                "cellularity_map_uri": claim_check(den_path, root, format="nifti", content="density"),
                "tissue_map_uri": claim_check(anatomy_path, root, format="nifti", content="segmentation"),
            },
        }
        raw.append(("imaging", s.t, s.delivery_hours, body, _event_id(patient, "imaging", f"{s.t:.6f}"), s))
    for s in patient.samples:
        if s.kind == "lab":
            body = {"code": "2532-0", "value": round(s.value, 2), "unit": "U/L", "specimen": "serum"}
            raw.append(("lab", s.t, 4.0, body, _event_id(patient, "lab", f"{s.t:.6f}"), s))
        else:
            body = {"measure": "tumor_fraction", "value": float(f"{s.value:.6g}"), "unit": "1",
                    "assay": "tumour-informed plasma ctDNA (synthetic)"}
            if s.censored:
                body["comparator"] = "<"
            raw.append(("ctdna", s.t, 72.0, body, _event_id(patient, "ctdna", f"{s.t:.6f}"), s))
    out: list[Delivery] = []
    for kind, t, hours, body, eid, fact in sorted(raw, key=lambda r: (r[1], r[4])):
        extra = 0.0
        if kind != "imaging":  # a scan's delay, late or not, was drawn with the scan (scan_delays)
            late = float(torch.rand((), generator=g, dtype=torch.float64)) < cfg.late_probability
            extra = _uniform(g, *cfg.late_days) * 24.0 if late else 0.0
        recorded = patient.at(t) + timedelta(hours=hours + extra)
        recorded = recorded.replace(microsecond=0)
        event = envelope(kind, patient, t, recorded, body, eid)
        out.append(Delivery(recorded, event, fact=fact))
        if float(torch.rand((), generator=g, dtype=torch.float64)) < cfg.duplicate_probability:
            again = recorded + timedelta(hours=_uniform(g, 12.0, 120.0))
            out.append(Delivery(again.replace(microsecond=0), event, duplicate=True, fact=fact))
    return sorted(out, key=lambda d: (d.delivered_at, d.event["occurred_at"], d.event["event_id"], d.duplicate))


def truth_record(patient: Patient) -> dict:
    """The hidden truth of one patient as JSON (parameters, clinic, daily series)."""
    return {
        "pseudonym": patient.pseudonym,
        "index": patient.index,
        "seed": patient.seed,
        "day0": patient.day0.isoformat(),
        "grid": {"shape": list(patient.grid.shape), "spacing_mm": list(patient.grid.spacing)},
        "brain_ml": round(patient.brain_ml, 4),
        "params": patient.params.as_dict(),
        "presentation_days": patient.presentation_days,
        "second_line": patient.second_line,
        "progression_day": patient.progression_day,
        "second_line_start": patient.second_line_start,
        "days": patient.truth_days.tolist(),
        "series": {k: [float(f"{v:.6g}") for v in patient.truth[k].tolist()] for k in TRUTH_SERIES},
        "treatments": [{"kind": e.kind, "day": e.t, "dose": e.dose, "unit": e.unit, "drug": e.drug, "regimen": e.regimen,
                        "line": e.line} for e in patient.treatments],
    }


@dataclass
class WrittenCohort:
    """A cohort on disk: ``events.jsonl`` (event-time order, duplicates included: what
    ``oncotwin replay`` sends), ``deliveries.jsonl`` (delivery order, full contract) and
    ``truth.json`` under ``root`` (also the imaging root of the claim checks)."""

    root: object
    deliveries: dict[str, list[Delivery]] = field(default_factory=dict)


def write_cohort(patients: list[Patient], root) -> WrittenCohort:
    """Write every patient's files, the event logs (full contract) and the truth."""
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from stream.eventlog import dumps, write_events  # noqa: PLC0415

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    written = WrittenCohort(root)
    for p in patients:
        written.deliveries[p.pseudonym] = patient_events(p, root)
    everything = sorted((d for ds in written.deliveries.values() for d in ds),
                        key=lambda d: (d.delivered_at, d.event["event_id"], d.duplicate))
    write_events(root / "events.jsonl", [d.event for d in everything])
    (root / "deliveries.jsonl").write_text("".join(dumps(d.event) + "\n" for d in everything), encoding="utf-8")
    (root / "truth.json").write_text(json.dumps({"patients": [truth_record(p) for p in patients]}, indent=1,
                                                sort_keys=True) + "\n", encoding="utf-8")
    return written
