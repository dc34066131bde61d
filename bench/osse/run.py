"""Running the twin on the fraternal-twin cohort, and what is scored.

The default path is the service's own code without Kafka: every delivery, downgraded to today's
contract (``to_current_contract``), goes through the normalizer (contract, terms, claim checks,
RDF, SHACL; ``stream.normalizer.Normalizer``), the worker's decode and adapt
(``stream.adapt``) and the engine (``assimilation.engine.Engine``) configured as a worker
configures it (``stream.worker.WorkerSettings``). Deliveries arrive in delivery order (late ones
late, duplicates twice) in micro-batches that end at each cut scan's delivery, so the forecast
the engine publishes for that batch is "the first forecast issued after the cut scan" (a cut:
each imaging study after the first two). ``bench.osse.service`` runs the same deliveries through
the embedded broker instead.

Scored at horizons 30/60/90/180 days after the forecast's own start (its analysis time), beside
two baselines on the same cuts and target times:

* persistence: the last result delivered by then (the clinic's, censored ctDNA at its limit),
  with an empirical 95 % band fitted on the tuning seeds (``scorer.log_ratio_band``);
* calibrated once: the twin as it stood after the second scan, then given only the treatments
  (advanced to each cut, never analysed again).

The twin forecasts one visible volume (u >= 0.16) and a P(visible) map: it is scored against
the true enhancing volume and, separately, the true FLAIR volume; its map against the true
enhancing and FLAIR regions.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from assimilation.engine import Engine, EngineConfig
from assimilation.forecast import Forecast, forecast
from assimilation.observations import ObservationBase, TreatmentEvent
from assimilation.store import MemoryBackend, StateStore
from assimilation.twin import advance, assimilate
from schemas import parse_time, validate
from stream.adapt import AdaptConfig, AdaptError, Unsupported, adapt, decode_record
from stream.eventlog import dumps
from stream.normalizer import Normalizer, NormalizerSettings, SourceRecord
from stream.producer import timestamp_ms
from stream.topics import Topics
from stream.worker import WorkerSettings

from . import scorer
from .cohort import Delivery, Patient, Sample, Scan
from .truth import ENHANCING_LABEL

log = logging.getLogger(__name__)

#: Fields the full contract adds to today's, per kind (the open contract issue's shapes).
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "imaging": ("labels",),
    "ctdna": ("comparator",),
    "lab": (),
    "treatment": ("regimen", "line_of_therapy", "cycle", "cycles_planned", "day_of_cycle", "cycle_length_days",
                  "body_weight_kg"),
}
WITHHELD_CENSORED = "ctdna.comparator (censored result withheld)"
FORECASTERS = ("oncotwin", "persistence", "calibrated-once")
QUANTITIES = ("enhancing_ml", "flair_ml", "ctdna", "ldh")
#: The floors of the relative errors (scorer): below them a value is not told from the floor.
VOLUME_FLOOR_ML = 0.5


def to_current_contract(event: dict) -> tuple[dict | None, Counter]:
    """``event`` as today's contract accepts it, and a count of every fact dropped on the way
    ("kind.field" -> 1). An event that validates is returned as it is. Otherwise each field the
    full contract adds (EXTENSIONS) is kept only if the contract accepts it, so the downgrade
    shrinks by itself as the contract widens; none is translated (a dose in mg/kg stays mg/kg:
    converting it would invent a body surface area). A censored ctDNA result whose comparator
    cannot be carried is withheld (None): sent without it, its limit would read as a measured
    value. Raises ValueError if the event is invalid even without its extensions."""
    if not validate(event):
        return event, Counter()
    kind, body = event.get("kind"), event.get("body") or {}
    present = [f for f in EXTENSIONS.get(kind, ()) if f in body]
    base = copy.deepcopy(event)
    for f in present:
        del base["body"][f]
    issues = validate(base)
    if issues:
        raise ValueError(f"event {event.get('event_id')} is invalid without its extensions: "
                         + "; ".join(i.path for i in issues[:5]))
    dropped: Counter = Counter()
    for f in present:
        trial = copy.deepcopy(base)
        trial["body"][f] = copy.deepcopy(body[f])
        if validate(trial):
            dropped[f"{kind}.{f}"] += 1
        else:
            base = trial
    if "comparator" in body and "comparator" not in base["body"]:
        return None, Counter({WITHHELD_CENSORED: 1})
    return base, dropped


class ServicePath:
    """The service between an event and the engine, without Kafka: the normalizer and the
    worker's decode and adapt, with the worker's accounting (dead letters by stage and reason,
    unsupported events, duplicates) in ``counts``. Logs carry event ids only."""

    def __init__(self, imaging_root: Path) -> None:
        self.topics = Topics("osse")
        self.normalizer = Normalizer(NormalizerSettings(imaging_root=Path(imaging_root)), self.topics)
        self.adapt_config = AdaptConfig(Path(imaging_root))
        self.seen: set[str] = set()
        self.offset = 0
        self.counts: Counter = Counter()

    def deliver(self, events: Sequence[dict]) -> list[ObservationBase]:
        """The typed observations of ``events`` (in the order given) that reach the engine."""
        records = []
        for e in events:
            self.offset += 1
            records.append(SourceRecord(self.topics.event_topic(e["kind"]), 0, self.offset, e["patient_id"],
                                        dumps(e).encode(), {}, timestamp_ms(parse_time(e["occurred_at"]))))
        result = self.normalizer.process(records, seen=self.seen.__contains__)
        self.counts["duplicates dropped by the normalizer"] += len(result.duplicates)
        for dead in result.dead_letters:
            log.info("dead letter at the normalizer: event %s stage %s", dead.event_id, dead.stage)
            self.counts[f"dead letter, normalizer ({dead.stage})"] += 1
        out: list[ObservationBase] = []
        for obs in result.observations:
            self.seen.add(obs.event_id)
            try:
                out.append(adapt(decode_record(obs.value), self.adapt_config, obs.value))
            except AdaptError as exc:
                log.info("dead letter at the worker: event %s stage %s", obs.event_id, exc.stage)
                self.counts[f"dead letter, worker ({exc.stage}): {exc.reason[:90]}"] += 1
            except Unsupported as exc:
                self.counts[f"unsupported ({exc.kind}): {exc.reason[:90]}"] += 1
        self.counts["observations to the engine"] += len(out)
        return out


@dataclass(frozen=True)
class RunConfig:
    """members: ensemble size; presentation: twins start by growing to the diagnostic study
    (``ONCOTWIN_TWIN_PRESENTATION``); horizons: forecast days."""

    members: int = 16
    horizons: tuple[float, ...] = (30.0, 60.0, 90.0, 180.0)
    presentation: bool = True
    device: str = "cpu"

    def engine_config(self) -> EngineConfig:
        """What a worker started with these settings runs (stream.worker.WorkerSettings)."""
        env = {"ONCOTWIN_ENSEMBLE_MEMBERS": str(self.members),
               "ONCOTWIN_FORECAST_HORIZONS": ",".join(f"{h:g}" for h in self.horizons),
               "ONCOTWIN_TWIN_PRESENTATION": "on" if self.presentation else "off",
               "ONCOTWIN_DEVICE": self.device, "ONCOTWIN_STATE_URL": "memory://", "ONCOTWIN_DATA_DIR": "."}
        return WorkerSettings.from_env(env).engine_config()


@dataclass
class Cut:
    """One cut scan of one patient and the forecasts made from it.

    start: the twin forecast's analysis time (every forecaster's horizons count from it);
    known: the deliveries known by then (full contract, for persistence)."""

    patient: Patient
    index: int
    scan: Scan
    start: datetime
    twin: Forecast | None
    calibrated: Forecast | None
    known: list[Delivery] = field(default_factory=list)

    def start_day(self) -> float:
        return (self.start - self.patient.day0).total_seconds() / 86400.0


def downgrade(deliveries: Sequence[Delivery], counts: Counter) -> list[tuple[int, dict]]:
    """(index into ``deliveries``, today's event) for every delivery today's contract can carry."""
    out = []
    for k, d in enumerate(deliveries):
        event, dropped = to_current_contract(d.event)
        counts.update(dropped)
        if event is not None:
            out.append((k, event))
    return out


def run_patient(patient: Patient, deliveries: Sequence[Delivery], path: ServicePath, config: RunConfig,
                dropped: Counter, service: dict | None = None) -> list[Cut]:
    """The twin's first forecast after each cut scan, and the calibrated-once twin's forecast
    from the same start; in-process, through ``path`` and a fresh engine. With ``service``
    (delivery index of a cut scan -> the forecast the service published after it) the twin's
    forecasts are those, and the engine here only builds the calibrated-once baseline."""
    engine_config = config.engine_config()
    engine = Engine(StateStore(MemoryBackend()), engine_config)
    twin_config = engine_config.twin
    sent = downgrade(deliveries, dropped)
    scans = sorted((k for k, d in enumerate(deliveries) if isinstance(d.fact, Scan) and not d.duplicate),
                   key=lambda k: deliveries[k].fact.t)
    if len(scans) < 3:
        return []
    calibration_end = scans[1]
    cut_ends = sorted(scans[2:])
    boundaries = sorted({calibration_end, *cut_ends})
    cuts: list[Cut] = []
    calibrated = None
    ignored: dict[str, str] = {}  # event id -> why the twin left it out (counted once per event)
    pos = 0
    for end in boundaries:
        chunk = [e for k, e in sent if pos <= k <= end]
        pos = end + 1
        typed = path.deliver(chunk)
        if service is None or calibrated is None:
            result = engine.process_batch(typed)
            fc = next((f for f in result.forecasts if f.patient_id == patient.pseudonym), None)
            for report in result.reports.values():
                ignored.update(report.ignored)
        if service is not None:
            fc = service.get(end)
        if end >= calibration_end and calibrated is None:
            calibrated = engine.store.latest(patient.pseudonym)
        elif calibrated is not None:
            treatments = [o for o in typed if isinstance(o, TreatmentEvent)]
            # one delivered late, before the second scan, finds the members already past it: the
            # baseline never re-analyses, so it goes without (counted)
            late = [o for o in treatments if calibrated.days(o.time) <= calibrated.clock]
            path.counts["calibrated-once: late treatments not applied"] += len(late)
            treatments = [o for o in treatments if o not in late]
            if treatments:
                calibrated, _ = assimilate(calibrated, treatments, engine.analyser, config=twin_config)
        if end not in cut_ends:
            continue
        scan = deliveries[end].fact
        index = cut_ends.index(end)
        if fc is None:
            log.warning("no forecast after cut %d of a patient (event %s)", index, deliveries[end].event["event_id"])
            continue
        fc_cal = None
        if calibrated is not None:
            start = calibrated.days(fc.issued_for)
            moved = advance(calibrated, start, config=twin_config) if start > calibrated.clock else calibrated
            fc_cal = forecast(moved, engine_config.horizons, config=twin_config)
        cuts.append(Cut(patient, index, scan, fc.issued_for, fc, fc_cal, list(deliveries[:end + 1])))
    path.counts.update(f"left out by the twin: {why[:90]}" for why in ignored.values())
    return cuts


# -- scoring -------------------------------------------------------------------------------


def _last(known: Sequence[Delivery], kind: type, sample_kind: str | None = None):
    facts = [d.fact for d in known if isinstance(d.fact, kind) and (sample_kind is None or d.fact.kind == sample_kind)]
    return max(facts, key=lambda f: f.t) if facts else None


def persisted_values(cut: Cut) -> dict[str, float]:
    """The last delivered result of each quantity at the cut (nan when none)."""
    scan = _last(cut.known, Scan)
    ct, ldh = _last(cut.known, Sample, "ctdna"), _last(cut.known, Sample, "lab")
    return {"enhancing_ml": scan.enhancing_ml, "flair_ml": scan.flair_ml,
            "ctdna": ct.value if ct else math.nan, "ldh": ldh.value if ldh else math.nan}


def floors(patient: Patient) -> dict[str, float]:
    """Per quantity, the value below which a result is not told from it: a volume too small to
    measure, the ctDNA assay's limit of detection (LDH never comes near its floor)."""
    return {"enhancing_ml": VOLUME_FLOOR_ML, "flair_ml": VOLUME_FLOOR_ML, "ctdna": patient.config.ctdna_lod,
            "ldh": 1.0}


def _forecast_values(fc: Forecast, h: int) -> dict[str, tuple[float, float, float]]:
    vol = tuple(float(x) for x in fc.quantity("volume_ml")[h])
    return {"enhancing_ml": vol, "flair_ml": vol,
            "ctdna": tuple(float(x) for x in fc.quantity("ctdna_fraction")[h]),
            "ldh": tuple(float(x) for x in fc.quantity("marker")[h])}


def score_cut(cut: Cut, bands: dict[tuple[str, float], tuple[float, float]] | None) -> tuple[list[scorer.Scored], int]:
    """Every Scored sample of one cut (the three forecasters, four quantities, each horizon)
    and how many of the twin's forecasts fill the brain where the truth does not."""
    p = cut.patient
    out: list[scorer.Scored] = []
    fl = floors(p)
    persisted = persisted_values(cut)
    last_scan = _last(cut.known, Scan)
    saturated = 0
    for h, days in enumerate(cut.twin.horizons_days):
        day = cut.start_day() + days
        truth = {q: p.truth_at(q, day) for q in QUANTITIES}
        map_day, labels = p.map_at(day)
        if abs(map_day - day) > 1.0:
            # maps are kept for the days a forecast from a cut can start at (cohort.map_days)
            log.warning("cut %d, %g d: the nearest truth map is %.1f days off", cut.index, days, abs(map_day - day))
        regions = {"enhancing_ml": (labels == ENHANCING_LABEL).numpy(), "flair_ml": (labels > 0).numpy()}
        observed = {"enhancing_ml": (last_scan.labels == ENHANCING_LABEL).numpy(), "flair_ml": (last_scan.labels > 0).numpy()}
        for name, fc in (("oncotwin", cut.twin), ("calibrated-once", cut.calibrated)):
            if fc is None:
                continue
            values = _forecast_values(fc, h)
            region = (fc.prob_visible[0, h] >= 0.5).cpu().numpy()
            if name == "oncotwin" and scorer.saturated(values["flair_ml"][1], truth["flair_ml"], p.brain_ml):
                saturated += 1
            for q in QUANTITIES:
                lo, med, hi = values[q]
                d = c = None
                if q in regions:
                    d = scorer.dice(region, regions[q])
                    c = scorer.com_distance(region, regions[q], p.grid.spacing)
                out.append(scorer.Scored(name, q, days, p.pseudonym, cut.index, truth[q], med, fl[q], lo, hi, d, c))
        for q in QUANTITIES:
            x = persisted[q]
            if not math.isfinite(x):
                continue
            lo = hi = None
            if bands is not None and (q, days) in bands:
                a, b = bands[(q, days)]
                lo, hi = max(x, fl[q]) * math.exp(a), max(x, fl[q]) * math.exp(b)
            d = c = None
            if q in regions:
                d = scorer.dice(observed[q], regions[q])
                c = scorer.com_distance(observed[q], regions[q], p.grid.spacing)
            out.append(scorer.Scored("persistence", q, days, p.pseudonym, cut.index, truth[q], x, fl[q], lo, hi, d, c))
    return out, saturated


def persistence_bands(cuts: Sequence[Cut]) -> dict[tuple[str, float], tuple[float, float]]:
    """Persistence's empirical 95 % band per quantity and horizon, from ``cuts`` (the tuning
    seeds')."""
    pairs: dict[tuple[str, float], tuple[list[float], list[float]]] = {}
    for cut in cuts:
        persisted = persisted_values(cut)
        for days in cut.twin.horizons_days:
            day = cut.start_day() + days
            for q in QUANTITIES:
                if math.isfinite(persisted[q]):
                    xs, ts = pairs.setdefault((q, days), ([], []))
                    xs.append(persisted[q])
                    ts.append(cut.patient.truth_at(q, day))
    return {key: scorer.log_ratio_band(xs, ts, floors(cuts[0].patient)[key[0]]) for key, (xs, ts) in pairs.items()}


@dataclass
class SetResult:
    """What one seed set gave: cuts, scored samples, summaries, saturated twin forecasts."""

    seeds: tuple[int, ...]
    cuts: list[Cut]
    samples: list[scorer.Scored] = field(default_factory=list)
    summaries: list[scorer.Summary] = field(default_factory=list)
    saturated: int = 0
    seconds: float = 0.0


def score_set(result: SetResult, bands) -> SetResult:
    result.samples, result.saturated = [], 0
    for cut in result.cuts:
        samples, sat = score_cut(cut, bands)
        result.samples += samples
        result.saturated += sat
    result.summaries = scorer.summarize(result.samples)
    return result


def summary_of(summaries: Sequence[scorer.Summary], forecaster: str, quantity: str, horizon: float | None):
    return next((s for s in summaries if (s.forecaster, s.quantity, s.horizon) == (forecaster, quantity, horizon)), None)


def targets(result: SetResult, horizons: Sequence[float]) -> dict[str, bool]:
    """The issue's targets on one seed set: MdARE below persistence at 60/90/180 d for
    enhancing, FLAIR and ctDNA; 95 % coverage within [0.88, 0.97] for each of them (all
    horizons pooled); no saturated twin forecast where the truth is not; mean Dice of the
    predicted region against the true enhancing region >= 0.7 at 30 d."""
    s = result.summaries
    out: dict[str, bool] = {}
    for q in ("enhancing_ml", "flair_ml", "ctdna"):
        for h in (60.0, 90.0, 180.0):
            if h not in horizons:
                continue
            twin, pers = summary_of(s, "oncotwin", q, h), summary_of(s, "persistence", q, h)
            out[f"mdare_below_persistence:{q}:{h:g}d"] = bool(twin and pers and twin.mdare < pers.mdare)
        twin = summary_of(s, "oncotwin", q, None)
        out[f"coverage_0.88-0.97:{q}"] = bool(twin and 0.88 <= twin.coverage <= 0.97)
    out["no_saturated_forecast"] = result.saturated == 0
    d30 = summary_of(s, "oncotwin", "enhancing_ml", 30.0)
    out["dice_enhancing_30d>=0.7"] = bool(d30 and d30.dice >= 0.7)
    return out


def run_set(patients: Sequence[Patient], deliveries: dict[str, list[Delivery]], imaging_root: Path,
            config: RunConfig, dropped: Counter, counts: Counter, seeds: tuple[int, ...],
            progress=None) -> SetResult:
    """Every patient of one seed set through the in-process service path."""
    t0 = time.perf_counter()
    path = ServicePath(imaging_root)
    cuts: list[Cut] = []
    for p in patients:
        cuts += run_patient(p, deliveries[p.pseudonym], path, config, dropped)
        if progress is not None:
            progress(p)
    counts.update(path.counts)
    return SetResult(tuple(seeds), cuts, seconds=time.perf_counter() - t0)


def as_jsonable(result: SetResult, horizons: Sequence[float]) -> dict:
    """The figures of one seed set for the JSON line: per quantity and forecaster MdARE per
    horizon and pooled, bias, within 15 %, coverage, CRPS; Dice and CoM at 30 d; saturation."""
    out: dict = {"patients": len({c.patient.pseudonym for c in result.cuts}), "cuts": len(result.cuts),
                 "saturated_twin_forecasts": result.saturated, "seconds": round(result.seconds, 1)}
    for q in QUANTITIES:
        for f in FORECASTERS:
            pooled = summary_of(result.summaries, f, q, None)
            if pooled is None:
                continue
            row = {"mdare": {f"{h:g}": _r(summary_of(result.summaries, f, q, h).mdare) for h in horizons
                             if summary_of(result.summaries, f, q, h)},
                   "mdare_all": _r(pooled.mdare), "bias": _r(pooled.bias), "within15": _r(pooled.within15),
                   "coverage": _r(pooled.coverage), "crps": _r(pooled.crps, 6), "crps_median": _r(pooled.crps_median, 6)}
            d30 = summary_of(result.summaries, f, q, 30.0)
            if d30 is not None and math.isfinite(d30.dice):
                row["dice_30d"], row["com_mm_30d"] = _r(d30.dice), _r(d30.com_mm)
            out.setdefault(q, {})[f] = row
    return out


def _r(x: float, digits: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def table(result: SetResult, horizons: Sequence[float], title: str) -> str:
    """The side-by-side table of one seed set (plain text)."""
    hs = " / ".join(f"{h:g}" for h in horizons)
    lines = [f"{title}: {len({c.patient.pseudonym for c in result.cuts})} patients, {len(result.cuts)} cuts, "
             f"{result.saturated} saturated twin forecasts",
             f"{'quantity':<13} {'forecaster':<16} {'MdARE ' + hs + ' d':<34} {'all':>6} {'bias':>7} {'w15%':>5} "
             f"{'cov95':>6} {'CRPS':>9} {'Dice30':>6} {'CoM30':>6}"]
    for q in QUANTITIES:
        for f in FORECASTERS:
            pooled = summary_of(result.summaries, f, q, None)
            if pooled is None:
                continue
            per = " / ".join(_fmt(summary_of(result.summaries, f, q, h).mdare if summary_of(result.summaries, f, q, h)
                                  else math.nan) for h in horizons)
            d30 = summary_of(result.summaries, f, q, 30.0)
            dice = _fmt(d30.dice) if d30 else "-"
            com = _fmt(d30.com_mm, 1) if d30 else "-"
            label = {"enhancing_ml": "enhancing mL", "flair_ml": "FLAIR mL", "ctdna": "ctDNA TF", "ldh": "LDH U/L"}[q]
            lines.append(f"{label:<13} {f:<16} {per:<34} {_fmt(pooled.mdare):>6} {_fmt(pooled.bias, 2, True):>7} "
                         f"{_fmt(pooled.within15):>5} {_fmt(pooled.coverage):>6} {_fmt_crps(pooled.crps):>9} {dice:>6} {com:>6}")
    return "\n".join(lines)


def _fmt(x: float, digits: int = 2, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _fmt_crps(x: float) -> str:
    return "-" if not math.isfinite(x) else (f"{x:.3g}")


def cohort_counts(patients: Sequence[Patient]) -> dict:
    """What the cohort holds: second lines, progressions, censored ctDNA, deliveries."""
    lines = Counter(p.second_line for p in patients if p.second_line_start is not None)
    return {"patients": len(patients), "progressions": sum(p.progression_day is not None for p in patients),
            "second_lines_started": dict(sorted(lines.items())),
            "scans": sum(len(p.scans) for p in patients),
            "ctdna_results": sum(s.kind == "ctdna" for p in patients for s in p.samples),
            "ctdna_censored": sum(s.censored for p in patients for s in p.samples)}

