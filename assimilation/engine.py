"""The engine: a batch of typed observations in, one refreshed forecast per updated patient out.

For each patient in the batch (in patient-id order), in event-time order:

1. Load the newest twin snapshot, or start the twin at the patient's first imaging study that
   carries the anatomy. Until such a study arrives the patient's observations wait in the
   store's pending area and are folded in, in time order, once the twin exists (observations
   from before that study are then recorded and ignored: the twin has no state before it).
2. Skip event ids the twin has already applied (at-least-once delivery, effectively-once
   application); compact the rest (imaging -> selected voxels) and journal them.
3. On time: advance the members to each observation time and analyse the observations of that
   time together; persist a snapshot after each analysis. Late (before the twin's clock):
   reload the newest snapshot before the earliest late event (or rebuild the twin from its
   first study when none is left) and re-apply, in time order, every journaled event that
   snapshot has not applied, the late ones included. Randomness is seeded by (patient, event
   ids), so the result equals in-order processing.
4. Apply the snapshot retention policy; then forecast every updated patient (as-planned
   scenario plus the configured rehearsal plans) to the configured horizons.

Patients' analyses run one patient after another (their observation times rarely coincide);
within a patient the members run batched on the configured device, and a forecast batches
scenarios x members, or, with ``batch_patients``, patients x scenarios x members per grid.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from models.device import resolve_device
from models.priors import TumorPrior

from .filters.enkf import StochasticEnKF
from .filters.etkf import ETKF
from .forecast import DEFAULT_HORIZONS, Forecast, forecast, forecast_batch
from .observations import ImagingObservation, ObservationBase, TreatmentEvent
from .store import StateStore
from .twin import (
    AnalysisRecord,
    Analyser,
    PatientTwin,
    TwinConfig,
    assimilate,
    compact,
    describe_filter,
    init_twin,
    is_late,
)

__all__ = ["BatchResult", "Engine", "EngineConfig", "PatientReport", "make_filter"]

PlanSource = Callable[[PatientTwin], Mapping[str, Sequence[TreatmentEvent]]]


@dataclass(frozen=True)
class EngineConfig:
    """n_members: ensemble size. filter: "etkf" (deterministic) or "enkf" (perturbed
    observations), with inflation / rtps / outlier_k (assimilation.filters.FilterSettings);
    the twin's voxel stage is localized per ``twin.localization_radius_mm``. horizons: forecast
    days. plans: optional function twin -> {name: planned treatments} rehearsed in every
    forecast. batch_patients: forecast the batch's patients that share a grid in one simulator
    batch (faster on a GPU; a patient's numbers then depend in the last digits on who shares
    the batch, so replays with other micro-batches are not bit-identical). device: "auto",
    "cpu", "cuda", ..."""

    n_members: int = 32
    prior: TumorPrior = field(default_factory=TumorPrior)
    twin: TwinConfig = field(default_factory=TwinConfig)
    filter: str = "etkf"
    inflation: float = 1.0
    rtps: float = 0.0
    outlier_k: float | None = None
    horizons: tuple[float, ...] = DEFAULT_HORIZONS
    plans: PlanSource | None = None
    batch_patients: bool = False
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


def make_filter(config: EngineConfig) -> Analyser:
    """The configured global filter (the twin localizes its voxel stage itself)."""
    settings = dict(inflation=config.inflation, rtps=config.rtps, outlier_k=config.outlier_k)
    if config.filter == "etkf":
        return ETKF(**settings)
    if config.filter == "enkf":
        return StochasticEnKF(**settings)
    raise ValueError(f"unknown filter {config.filter!r} (etkf or enkf)")


@dataclass(frozen=True)
class PatientReport:
    """What a batch did to one patient.

    applied: ids applied now (in order); skipped: ids already applied; pending: ids waiting for
    a first study; ignored: id -> reason; replayed_from: clock (days) of the snapshot a late
    event was re-analysed from (None: no re-analysis; -inf: rebuilt from the first study);
    analyses: one record per analysis time (replays included); snapshots: keys written.
    """

    patient_id: str
    applied: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()
    ignored: dict[str, str] = field(default_factory=dict)
    replayed_from: float | None = None
    analyses: tuple[AnalysisRecord, ...] = ()
    snapshots: tuple[str, ...] = ()


@dataclass(frozen=True)
class BatchResult:
    forecasts: list[Forecast]
    reports: dict[str, PatientReport]


class Engine:
    """Applies observation batches to twins kept in ``store``."""

    def __init__(self, store: StateStore, config: EngineConfig | None = None) -> None:
        self.store = store
        self.config = config or EngineConfig()
        self.device = resolve_device(self.config.device)
        self.analyser = make_filter(self.config)
        self.filter_version = describe_filter(self.analyser, self.config.twin)

    def process(self, observations: Sequence[ObservationBase]) -> list[Forecast]:
        """One forecast per patient whose twin changed, in patient-id order."""
        return self.process_batch(observations).forecasts

    def process_batch(self, observations: Sequence[ObservationBase]) -> BatchResult:
        by_patient: dict[str, list[ObservationBase]] = defaultdict(list)
        for o in observations:
            by_patient[o.patient_id].append(o)
        reports, updated = {}, []
        for pid in sorted(by_patient):
            twin, report = self._process_patient(pid, by_patient[pid])
            reports[pid] = report
            if twin is not None:
                updated.append(twin)
        return BatchResult(self._forecast(updated), reports)

    def _forecast(self, twins: list[PatientTwin]) -> list[Forecast]:
        """One forecast per twin, in the order given; batched over patients per grid if asked."""
        cfg = self.config
        plans = [cfg.plans(t) if cfg.plans is not None else None for t in twins]
        if not cfg.batch_patients:
            return [forecast(t, cfg.horizons, p, config=cfg.twin) for t, p in zip(twins, plans)]
        groups: dict[object, list[int]] = defaultdict(list)
        for k, t in enumerate(twins):
            groups[(t.grid, t.u.device, t.u.dtype)].append(k)
        out: list[Forecast | None] = [None] * len(twins)
        for members in groups.values():
            batch = forecast_batch([twins[k] for k in members], cfg.horizons, [plans[k] for k in members],
                                   config=cfg.twin)
            for k, fc in zip(members, batch):
                out[k] = fc
        return [fc for fc in out if fc is not None]

    # --- one patient --------------------------------------------------------------------------

    def _init(self, pid: str, anchor: ImagingObservation, known: Sequence[ObservationBase] = ()) -> PatientTwin:
        cfg = self.config
        twin_config = cfg.twin
        # Presentation grows the members untreated up to the first study: only right when that
        # study is a diagnostic one, i.e. no delivered treatment came before it.
        if twin_config.presentation and any(isinstance(o, TreatmentEvent) and not o.planned and o.time < anchor.time
                                            for o in known):
            twin_config = replace(twin_config, presentation=False)
        return init_twin(pid, anchor, cfg.n_members, cfg.prior, config=twin_config, dtype=cfg.dtype,
                         device=self.device, filter_version=self.filter_version)

    def _process_patient(self, pid: str,
                         incoming: Sequence[ObservationBase]) -> tuple[PatientTwin | None, PatientReport]:
        """Apply one patient's events; returns its twin if it changed (for the forecast)."""
        store, cfg = self.store, self.config
        batch = _dedupe(incoming)
        twin = store.latest(pid, self.device)
        started = False
        if twin is None:
            pending = store.pending(pid)
            pool = _dedupe([*pending, *batch])
            anchor = next((o for o in pool if isinstance(o, ImagingObservation) and o.tissue is not None
                           and (o.density is not None or o.segmentation is not None)), None)
            if anchor is None:
                waiting = {o.event_id for o in pending}
                store.pending_put([o for o in batch if o.event_id not in waiting])
                return None, PatientReport(pid, pending=tuple(o.event_id for o in pool))
            twin = self._init(pid, anchor, pool)
            store.journal_put([anchor])
            store.save(twin)
            batch = [o for o in pool if o.event_id != anchor.event_id]
            started = True

        skipped = tuple(o.event_id for o in batch if twin.has_applied(o.event_id))
        new = [o for o in batch if not twin.has_applied(o.event_id)]
        if not new and not started:
            return None, PatientReport(pid, skipped=skipped)

        ignored: dict[str, str] = {}
        compacted = []
        for o in new:
            try:
                compacted.append(compact(o, twin, cfg.twin))
            except ValueError as exc:  # e.g. a study on another grid: recorded, not analysed
                ignored[o.event_id] = str(exc)
        store.journal_put(compacted)
        if ignored:
            twin = replace(twin, applied=(*twin.applied, *ignored))

        replayed_from = None
        late = [o for o in compacted if is_late(o, twin)]
        if late:
            t_min = min(twin.days(o.time) for o in late)
            base = store.snapshot_before(pid, t_min, self.device)
            if base is None:
                base = self._rebuild(pid, twin.origin_event_id)
                replayed_from = float("-inf")
            else:
                replayed_from = base.clock
            journal = store.journal(pid)
            done = set(base.applied)
            todo = [o for o in journal if o.event_id not in done]
            # Ids applied without a journal entry (studies that could not be used) stay applied.
            journaled = {o.event_id for o in journal}
            kept = [i for i in twin.applied if i not in done and i not in journaled]
            twin = replace(base, applied=(*base.applied, *kept))
        else:
            todo = compacted

        twin, applied, analyses, snaps, more_ignored = self._apply(twin, todo)
        ignored.update(more_ignored)
        snaps.append(store.save(twin))
        if started:
            store.pending_clear(pid)
        store.apply_retention(pid)
        report = PatientReport(pid, applied=tuple(applied), skipped=skipped, ignored=ignored,
                               replayed_from=replayed_from, analyses=tuple(analyses),
                               snapshots=tuple(dict.fromkeys(snaps)))
        return twin, report

    def _rebuild(self, pid: str, origin_event_id: str) -> PatientTwin:
        """The twin as first started, from the full first study kept in the journal."""
        journal = self.store.journal(pid)
        for o in journal:
            if o.event_id == origin_event_id and isinstance(o, ImagingObservation):
                return self._init(pid, o, journal)
        raise LookupError(f"the journal of {pid} lacks its first study {origin_event_id}")

    def _apply(self, twin: PatientTwin, todo: Sequence[ObservationBase]):
        """Assimilate ``todo`` time by time, persisting a snapshot after every analysis."""
        ordered = sorted(todo, key=lambda o: (o.time, o.event_id))
        applied, analyses, snaps, ignored = [], [], [], {}
        k = 0
        while k < len(ordered):
            group = [ordered[k]]
            k += 1
            while k < len(ordered) and ordered[k].time == group[0].time:
                group.append(ordered[k])
                k += 1
            twin, rep = assimilate(twin, group, self.analyser, config=self.config.twin)
            applied += rep.applied
            ignored.update(rep.ignored)
            if rep.analyses:
                analyses += rep.analyses
                snaps.append(self.store.save(twin))
        return twin, applied, analyses, snaps, ignored


def _dedupe(observations: Sequence[ObservationBase]) -> list[ObservationBase]:
    """First occurrence of each event id, in (time, event id) order."""
    seen: dict[str, ObservationBase] = {}
    for o in observations:
        seen.setdefault(o.event_id, o)
    return sorted(seen.values(), key=lambda o: (o.time, o.event_id))
