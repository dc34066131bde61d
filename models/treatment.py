"""Treatment schedules, their dose-response laws, and the step grid they impose on a simulation.

Conventions shared by every simulator in ``models``:

* A call advancing the state from ``t0`` to ``t1`` applies the radiotherapy fractions with
  time in the half-open interval (t0, t1]. A fraction at exactly ``t0`` belongs to the call that
  ended at ``t0``, so advancing in pieces [t0, t1], [t1, t2], ... applies every fraction exactly
  once whatever the cut points. A fraction is applied at its own time (a breakpoint of the step
  grid), after the transport up to that instant: the state saved or returned at a fraction's time
  already includes it.
* Each member's step grid breaks at its own fraction times and the save times only, never at a
  batch-mate's fractions (``plan_batch``), so a member's result does not depend on who else is
  in the batch. Two fractions at the same instant are two deliveries (survivals multiply).
* Chemotherapy acts through the exposure C(t) = sum_k dose_k exp(-lambda (t - t_k)) for t >= t_k,
  integrated in closed form over each step, so its effect does not depend on the step size.
* Doses are absolute (Gy; chemotherapy in exposure units, e.g. 1 = one standard administration).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

_INF = math.inf


def _pad_stack(rows: Sequence[Sequence[tuple[float, float]]], device, dtype) -> tuple[Tensor, Tensor]:
    k = max((len(r) for r in rows), default=0)
    times = torch.full((len(rows), k), _INF, dtype=dtype, device=device)
    doses = torch.zeros((len(rows), k), dtype=dtype, device=device)
    for b, row in enumerate(rows):
        for j, (t, d) in enumerate(sorted(row)):
            times[b, j] = float(t)
            doses[b, j] = float(d)
    return times, doses


@dataclass
class Schedule:
    """Per-batch-element treatment plans, padded to a common length.

    ``rt_times`` [B, K] days (padding: +inf), ``rt_doses`` [B, K] Gy (padding: 0);
    ``chemo_times`` [B, M] days (padding: +inf), ``chemo_doses`` [B, M] exposure units
    (padding: 0). Times are on the simulation clock (days, any origin). float64 by default:
    a float32 clock loses minutes after a few decades of days counted from an epoch.
    """

    rt_times: Tensor
    rt_doses: Tensor
    chemo_times: Tensor
    chemo_doses: Tensor

    def __post_init__(self) -> None:
        if self.rt_times.shape != self.rt_doses.shape or self.rt_times.ndim != 2:
            raise ValueError("rt_times and rt_doses must both be [B, K]")
        if self.chemo_times.shape != self.chemo_doses.shape or self.chemo_times.ndim != 2:
            raise ValueError("chemo_times and chemo_doses must both be [B, M]")
        if self.rt_times.shape[0] != self.chemo_times.shape[0]:
            raise ValueError("RT and chemo plans must have the same batch size")

    @property
    def batch_size(self) -> int:
        return self.rt_times.shape[0]

    @property
    def device(self) -> torch.device:
        return self.rt_times.device

    @classmethod
    def empty(cls, batch: int = 1, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float64) -> "Schedule":
        """No treatment for ``batch`` elements (K = M = 0)."""
        z = torch.zeros((batch, 0), dtype=dtype, device=device)
        return cls(z, z.clone(), z.clone(), z.clone())

    @classmethod
    def from_lists(cls, rt: Sequence[tuple[float, float]] = (),
                   chemo: Sequence[tuple[float, float]] = (), batch: int = 1,
                   device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float64) -> "Schedule":
        """One plan, ``rt=[(day, Gy), ...]`` and ``chemo=[(day, dose), ...]``, for ``batch`` elements."""
        rt_t, rt_d = _pad_stack([rt], device, dtype)
        ch_t, ch_d = _pad_stack([chemo], device, dtype)
        return cls(rt_t, rt_d, ch_t, ch_d).expand(batch)

    @classmethod
    def from_plans(cls, rt: Sequence[Sequence[tuple[float, float]]],
                   chemo: Sequence[Sequence[tuple[float, float]]] | None = None,
                   device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float64) -> "Schedule":
        """Different plans per element: ``rt[b] = [(day, Gy), ...]``, ``chemo[b]`` likewise."""
        chemo = chemo if chemo is not None else [[] for _ in rt]
        if len(chemo) != len(rt):
            raise ValueError("rt and chemo must list the same number of elements")
        rt_t, rt_d = _pad_stack(rt, device, dtype)
        ch_t, ch_d = _pad_stack(chemo, device, dtype)
        return cls(rt_t, rt_d, ch_t, ch_d)

    def _map(self, fn) -> "Schedule":
        return Schedule(fn(self.rt_times), fn(self.rt_doses), fn(self.chemo_times), fn(self.chemo_doses))

    def expand(self, batch: int) -> "Schedule":
        """Broadcast a batch-1 schedule to ``batch`` elements (returns copies, never views)."""
        if self.batch_size == batch:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot expand a batch of {self.batch_size} to {batch}")
        return self._map(lambda t: t.expand(batch, -1).clone())

    def repeat(self, n: int) -> "Schedule":
        """Each element repeated ``n`` times consecutively ([p0, p0, ..., p1, p1, ...]), the
        patients x members layout used by ``TumorParams.repeat``."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def index(self, idx) -> "Schedule":
        """The elements selected by ``idx`` (int, slice, index or bool tensor), batch dim kept."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return self._map(lambda t: t[idx])

    @staticmethod
    def cat(schedules: Sequence["Schedule"]) -> "Schedule":
        """Concatenate along the batch, padding plans to the longest."""
        if not schedules:
            raise ValueError("nothing to concatenate")

        def pad(t: Tensor, k: int, value: float) -> Tensor:
            return torch.nn.functional.pad(t, (0, k - t.shape[1]), value=value)

        k = max(s.rt_times.shape[1] for s in schedules)
        m = max(s.chemo_times.shape[1] for s in schedules)
        return Schedule(torch.cat([pad(s.rt_times, k, _INF) for s in schedules]),
                        torch.cat([pad(s.rt_doses, k, 0.0) for s in schedules]),
                        torch.cat([pad(s.chemo_times, m, _INF) for s in schedules]),
                        torch.cat([pad(s.chemo_doses, m, 0.0) for s in schedules]))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Schedule":
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def shift(self, dt: float) -> "Schedule":
        """The same plan with every time moved by ``dt`` days (+inf padding stays +inf); e.g.
        ``shift(-t_ref)`` re-expresses it relative to ``t_ref``."""
        return replace(self, rt_times=self.rt_times + dt, chemo_times=self.chemo_times + dt)

    def total_rt_dose(self, t0: float = -_INF, t1: float = _INF) -> Tensor:
        """Gy delivered in (t0, t1], [B]."""
        m = (self.rt_times > t0) & (self.rt_times <= t1)
        return (self.rt_doses * m).sum(dim=1)


def lq_survival(dose: Tensor | float, alpha: Tensor | float, alpha_beta: Tensor | float) -> Tensor:
    """Linear-quadratic surviving fraction exp(-alpha d - beta d^2), beta = alpha / (alpha/beta).

    ``dose`` Gy, ``alpha`` 1/Gy, ``alpha_beta`` Gy; broadcasts.
    """
    dose, alpha, alpha_beta = (torch.as_tensor(x) for x in (dose, alpha, alpha_beta))
    return torch.exp(-alpha * dose * (1.0 + dose / alpha_beta))


def _phi1(z: Tensor) -> Tensor:
    """(1 - exp(-z)) / z, continuous at z = 0 (value 1)."""
    safe = torch.where(z.abs() > 1e-8, z, torch.ones_like(z))
    return torch.where(z.abs() > 1e-8, -torch.expm1(-safe) / safe, 1.0 - 0.5 * z)


def chemo_exposure(t0: float | Tensor, t1: float | Tensor, times: Tensor, doses: Tensor,
                   lam: Tensor) -> Tensor:
    """Exact integral of C(t) = sum_k dose_k exp(-lam (t - t_k)) [t >= t_k] over [t0, t1], [B].

    ``times``/``doses`` [B, M] (days; padding +inf / 0), ``lam`` [B] 1/day (lam = 0 is allowed:
    no clearance). Result in exposure units x days, dtype of ``doses``. Each administration
    contributes dose e^{-lam (a - t_k)} (1 - e^{-lam (t1 - a)}) / lam with a = max(t0, t_k), and
    nothing if t_k >= t1.
    """
    dtype = doses.dtype
    lam = torch.as_tensor(lam, dtype=dtype, device=doses.device).reshape(-1, 1)
    t0 = torch.as_tensor(t0, dtype=times.dtype, device=times.device).reshape(-1, 1)
    t1 = torch.as_tensor(t1, dtype=times.dtype, device=times.device).reshape(-1, 1)
    active = times < t1
    # Inactive (future or padded) entries get a = t1 so that no inf - inf appears.
    tk = torch.where(active, times, t1)
    a = torch.maximum(t0, tk)
    length = (t1 - a).to(dtype)
    age = (a - tk).to(dtype)
    contrib = doses * torch.exp(-lam * age) * length * _phi1(lam * length)
    return torch.where(active, contrib, torch.zeros_like(contrib)).sum(dim=1)


def chemo_step_survival(plan: "BatchPlan", schedule: Schedule | None, k_chemo: Tensor,
                        chemo_decay: Tensor) -> Tensor | None:
    """Chemotherapy survival exp(−k_c ∫C dt) of every step of a batch plan, [K, B] in the dtype
    and on the device of ``k_chemo`` (exact exposure integral per step); None without chemo."""
    if schedule is None or schedule.chemo_times.shape[1] == 0 or plan.n_rows == 0:
        return None
    n_rows, bsz = plan.t_start.shape
    device = k_chemo.device
    expo = chemo_exposure(plan.t_start.to(device).reshape(-1), plan.t_end.to(device).reshape(-1),
                          schedule.chemo_times.repeat(n_rows, 1),
                          schedule.chemo_doses.repeat(n_rows, 1),
                          chemo_decay.to(schedule.chemo_doses.dtype).repeat(n_rows))
    return torch.exp(-k_chemo * expo.view(n_rows, bsz).to(k_chemo.dtype))


@dataclass(frozen=True)
class Segment:
    """One stretch of a step grid: ``n_steps`` equal steps from ``t_start`` to ``t_end`` days,
    then the fractions at ``t_end`` (if ``rt``) and the saves listed in ``save_indices``."""

    t_start: float
    t_end: float
    n_steps: int
    rt: bool
    save_indices: tuple[int, ...]

    @property
    def step(self) -> float:
        return (self.t_end - self.t_start) / self.n_steps if self.n_steps else 0.0


def _check_interval(t0: float, t1: float, dt: float, saves: Sequence[float]) -> None:
    if not (t1 >= t0):
        raise ValueError(f"t1 ({t1}) must be >= t0 ({t0})")
    if not (dt > 0.0):
        raise ValueError(f"dt must be > 0, got {dt}")
    if any(b < a for a, b in zip(saves, saves[1:])):
        raise ValueError("save_at must be non-decreasing")
    if saves and (saves[0] < t0 or saves[-1] > t1):
        raise ValueError(f"save_at must lie in [{t0}, {t1}]")


def _segments(t0: float, t1: float, limit: float, rt_times: set[float],
              saves: Sequence[float]) -> list[Segment]:
    points = sorted(rt_times | set(saves) | {t1})
    segments: list[Segment] = []
    start, save_idx = t0, 0
    for p in points:
        idx = []
        while save_idx < len(saves) and saves[save_idx] == p:
            idx.append(save_idx)
            save_idx += 1
        length = p - start
        # The tiny slack keeps 10 days / 2-day steps at 5 steps despite rounding of the clock.
        n = math.ceil(length / limit * (1.0 - 1e-12)) if length > 0.0 else 0
        segments.append(Segment(start, p, n, p in rt_times, tuple(idx)))
        start = p
    return segments


def _rt_times_in(schedule: Schedule | None, t0: float, t1: float) -> list[set[float]] | None:
    if schedule is None or not schedule.rt_times.numel():
        return None
    rt = schedule.rt_times.detach().to("cpu", torch.float64)
    return [set(row[(row > t0) & (row <= t1)].tolist()) for row in rt]


def plan_steps(t0: float, t1: float, dt: float, schedule: Schedule | None = None,
               save_at: Sequence[float] | None = None, max_step: float | None = None,
               ) -> list[Segment]:
    """One step grid for the whole batch: [t0, t1] split at every RT fraction time of any element
    in (t0, t1] and every save time, each stretch cut into the fewest equal steps no longer than
    ``dt`` (and ``max_step`` when given). Save times must be non-decreasing in [t0, t1]; a save
    at ``t0`` gives a segment with no steps. (``simulate`` uses per-member grids, ``plan_batch``.)
    """
    t0, t1, dt = float(t0), float(t1), float(dt)
    saves = [float(x) for x in (save_at or ())]
    _check_interval(t0, t1, dt, saves)
    limit = min(dt, max_step) if max_step is not None else dt
    per = _rt_times_in(schedule, t0, t1)
    rt_times = set().union(*per) if per else set()
    return _segments(t0, t1, limit, rt_times, saves)


@dataclass
class BatchPlan:
    """Per-member step grids laid side by side, so one batched loop runs them all.

    Member b takes its own grid: [t0, t1] split at its own fraction times and the save times,
    each stretch cut into equal steps within its own limit (dt, or a stability bound). Row k
    holds every member's k-th step; a member with fewer steps idles (zero-length steps) at the
    end. This keeps a member's numbers independent of its batch-mates. All tensors are on CPU:
    ``t_start``/``t_end`` [K, B] float64 days; ``first``/``last`` [K, B] bool (the step opens /
    closes a stretch: Strang half reaction steps go there); ``rt_at`` [K, B] float64, the
    fraction time applied after the step or NaN; ``saves[k]`` the (save index, member) pairs
    taken after row k; ``initial_saves`` the save indices at t0; ``n_steps`` [B].
    """

    t_start: Tensor
    t_end: Tensor
    first: Tensor
    last: Tensor
    rt_at: Tensor
    saves: list[list[tuple[int, int]]]
    initial_saves: list[int]
    n_steps: Tensor

    @property
    def n_rows(self) -> int:
        return self.t_start.shape[0]

    @property
    def active(self) -> Tensor:
        return torch.arange(self.n_rows).unsqueeze(1) < self.n_steps.unsqueeze(0)


def plan_batch(t0: float, t1: float, limits: Sequence[float], schedule: Schedule | None = None,
               save_at: Sequence[float] | None = None) -> BatchPlan:
    """Per-member step grids (see ``BatchPlan``); ``limits`` [B] is each member's largest step."""
    t0, t1 = float(t0), float(t1)
    saves = [float(x) for x in (save_at or ())]
    limits = [float(x) for x in limits]
    bsz = len(limits)
    _check_interval(t0, t1, min(limits) if limits else 1.0, saves)
    per = _rt_times_in(schedule, t0, t1) or [set() for _ in range(bsz)]
    rows: list[list[tuple[float, float, bool, bool, float, tuple[int, ...]]]] = []
    initial: list[int] = []
    for b in range(bsz):
        steps = []
        for seg in _segments(t0, t1, limits[b], per[b], saves):
            if seg.n_steps == 0:
                if b == 0:
                    initial.extend(seg.save_indices)
                continue
            h = seg.step
            for i in range(seg.n_steps):
                last = i == seg.n_steps - 1
                ta = seg.t_start + i * h
                tb = seg.t_end if last else ta + h
                steps.append((ta, tb, i == 0, last, seg.t_end if (last and seg.rt) else math.nan,
                              seg.save_indices if last else ()))
        rows.append(steps)
    k = max((len(r) for r in rows), default=0)
    t_start = torch.full((k, bsz), t1, dtype=torch.float64)
    t_end = torch.full((k, bsz), t1, dtype=torch.float64)
    first = torch.zeros((k, bsz), dtype=torch.bool)
    last = torch.zeros((k, bsz), dtype=torch.bool)
    rt_at = torch.full((k, bsz), math.nan, dtype=torch.float64)
    saves_k: list[list[tuple[int, int]]] = [[] for _ in range(k)]
    for b, steps in enumerate(rows):
        if steps:
            cols = list(zip(*steps))
            n = len(steps)
            t_start[:n, b] = torch.tensor(cols[0], dtype=torch.float64)
            t_end[:n, b] = torch.tensor(cols[1], dtype=torch.float64)
            first[:n, b] = torch.tensor(cols[2])
            last[:n, b] = torch.tensor(cols[3])
            rt_at[:n, b] = torch.tensor(cols[4], dtype=torch.float64)
            for i, idx in enumerate(cols[5]):
                saves_k[i].extend((si, b) for si in idx)
    n_steps = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return BatchPlan(t_start, t_end, first, last, rt_at, saves_k, initial, n_steps)


def rt_log_kill(schedule: Schedule, when: float | Tensor, alpha: Tensor, alpha_beta: Tensor,
                ) -> tuple[Tensor, Tensor]:
    """Summed LQ log-kill alpha d + beta d^2 of the fractions at exactly ``when`` days, and how
    many fractions that is (int64). ``when`` is a float or a tensor of shape [..., B] (NaN: none);
    results have the shape of ``when`` (or [B]). Two fractions at the same instant count twice
    and multiply their survivals: separate deliveries, not one larger one."""
    dev = schedule.device
    when = torch.as_tensor(when, dtype=torch.float64, device=dev)
    if when.ndim == 0:
        when = when.expand(schedule.batch_size)
    hit = schedule.rt_times.to(torch.float64) == when.unsqueeze(-1)       # [..., B, K]
    d = schedule.rt_doses.to(device=dev, dtype=alpha.dtype)
    per = alpha.to(dev).unsqueeze(1) * d * (1.0 + d / alpha_beta.to(dev).unsqueeze(1))
    return (per * hit).sum(dim=-1), hit.sum(dim=-1)
