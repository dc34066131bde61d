"""Whole-tumour burden ODEs with a circulating marker, for cancers followed mainly by labs.

    dN/dt = g(N) - k_c C(t) N,   g = rho N (1 - N/K)  (logistic)  or  rho N ln(K/N)  (Gompertz)
    dM/dt = s N - k M + b                                        (marker: shed, cleared, baseline)

N is tumour burden in the caller's unit (mL of tumour, or cells); M the marker concentration
(e.g. PSA in ng/mL). Treatment follows ``models.treatment``: RT fractions at breakpoints in
(t0, t1] multiply N by the LQ survival, chemotherapy kills through the exact exposure integral.
Stepping is Strang splitting G(h/2) K G(h/2) with the exact growth flow G and exact kill K, and
the marker is advanced exactly for N linear in time across the step. Without treatment N is the
exact analytic curve at any step size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .batched import BatchedParams
from .device import DEFAULT_DTYPE
from .treatment import Schedule, chemo_step_survival, plan_batch, rt_log_kill

GrowthModel = Literal["logistic", "gompertz"]


@dataclass
class BurdenParams(BatchedParams):
    """Per-member parameters, each a [B] tensor except ``model`` (one law for the whole batch).

    rho          1/day       growth rate
    capacity     burden unit carrying capacity K
    alpha        1/Gy        LQ radiosensitivity
    alpha_beta   Gy          LQ alpha/beta ratio
    k_chemo      1/(exposure unit * day)
    chemo_decay  1/day       exposure clearance lambda
    shed         marker unit / (burden unit * day)   marker released per unit burden
    clearance    1/day       marker elimination rate k (half-life ln 2 / k; PSA ~ 3 days)
    baseline     marker unit / day   production not from the tumour (benign tissue); the
                 tumour-free steady level is baseline / clearance
    """

    rho: Tensor
    capacity: Tensor
    alpha: Tensor
    alpha_beta: Tensor
    k_chemo: Tensor
    chemo_decay: Tensor
    shed: Tensor
    clearance: Tensor
    baseline: Tensor
    model: GrowthModel = "gompertz"

    NAMES = ("rho", "capacity", "alpha", "alpha_beta", "k_chemo", "chemo_decay", "shed",
             "clearance", "baseline")

    def __post_init__(self) -> None:
        if self.model not in ("logistic", "gompertz"):
            raise ValueError(f"model must be 'logistic' or 'gompertz', got {self.model!r}")
        self._check_shapes()

    @classmethod
    def reference(cls, batch: int = 1, model: GrowthModel = "gompertz",
                  device: torch.device | str | None = None,
                  dtype: torch.dtype = DEFAULT_DTYPE) -> "BurdenParams":
        """A PSA-followed prostate-cancer-like reference, burden in mL of tumour, marker ng/mL.

        rho 0.01 /day, K 1000 mL; alpha 0.15 /Gy with alpha/beta 1.5 Gy (prostate's low ratio);
        chemotherapy as in TumorParams.reference (k 0.02, half-life 1 day); PSA half-life 3 days
        (k = ln2/3), ~3.5 ng/mL of PSA per mL of cancer at steady state (s = 3.5 k) and a benign
        background of 1 ng/mL (b = k).
        """
        k = math.log(2.0) / 3.0
        vals = dict(rho=0.01, capacity=1000.0, alpha=0.15, alpha_beta=1.5, k_chemo=0.02,
                    chemo_decay=math.log(2.0), shed=3.5 * k, clearance=k, baseline=1.0 * k)
        return cls(**{n: torch.full((batch,), v, device=device, dtype=dtype) for n, v in vals.items()},
                   model=model)


@dataclass
class BurdenSeries:
    """Saved trajectory: ``times`` days, ``n`` [T, B] burden, ``m`` [T, B] marker."""

    times: tuple[float, ...]
    n: Tensor
    m: Tensor


class BurdenResult(NamedTuple):
    n: Tensor                      # [B] burden at t1
    m: Tensor                      # [B] marker at t1
    saved: BurdenSeries | None


def growth_flow(n: Tensor, tau: Tensor | float, params: BurdenParams) -> Tensor:
    """Exact solution of the untreated growth law after ``tau`` days from ``n`` [B]."""
    rho, cap = params.rho, params.capacity
    if params.model == "logistic":
        em = torch.expm1(rho * tau)
        return n * (1.0 + em) / (1.0 + (n / cap) * em)
    # Gompertz: ln(N/K) decays like exp(-rho t); N = 0 stays 0 (log 0 = -inf maps back to 0).
    return cap * torch.exp(torch.log(n / cap) * torch.exp(-rho * tau))


def _marker_step(m: Tensor, n_a: Tensor, n_b: Tensor, tau: Tensor, params: BurdenParams) -> Tensor:
    """Exact marker update over ``tau`` days with N linear from n_a to n_b."""
    z = params.clearance * tau
    small = z.abs() < 1e-4
    zs = torch.where(small, torch.ones_like(z), z)
    phi1 = torch.where(small, 1.0 - z / 2 + z * z / 6, -torch.expm1(-zs) / zs)
    phi2 = torch.where(small, 0.5 - z / 6 + z * z / 24, (1.0 - phi1) / zs)
    # phi1 = (1 - e^-z)/z, phi2 = (1 - phi1)/z: the constant and ramp parts of the forcing.
    return (m * torch.exp(-z) + tau * phi1 * (params.shed * n_a + params.baseline)
            + tau * phi2 * params.shed * (n_b - n_a))


def simulate_burden(n0: Tensor, m0: Tensor, params: BurdenParams, t0: float, t1: float, *,
                    dt: float, schedule: Schedule | None = None,
                    save_at: Sequence[float] | None = None) -> BurdenResult:
    """Advance burden ``n0`` [B] and marker ``m0`` [B] from ``t0`` to ``t1`` days.

    ``dt`` is the largest step (days); treatment and save conventions as in ``simulate``.
    Device and dtype follow ``n0``; inputs are not modified.
    """
    device, dtype = n0.device, n0.dtype
    bsz = n0.shape[0]
    p = params.to(device=device, dtype=dtype).expand(bsz)
    if schedule is not None:
        schedule = schedule.to(device=device).expand(bsz)
    plan = plan_batch(t0, t1, [float(dt)] * bsz, schedule, save_at)
    n_rows = plan.n_rows
    h = (plan.t_end - plan.t_start).to(device=device, dtype=dtype)      # [K, B], 0 when idle
    kill = chemo_step_survival(plan, schedule, p.k_chemo, p.chemo_decay)
    survival = None
    if bool((~torch.isnan(plan.rt_at)).any()):
        log_kill, _ = rt_log_kill(schedule, plan.rt_at.to(device), p.alpha, p.alpha_beta)
        survival = torch.exp(-log_kill)

    n = n0.clamp_min(0.0)
    m = m0.to(device=device, dtype=dtype).clone()
    n_save = len(save_at) if save_at is not None else 0
    sn = torch.empty((n_save, bsz), device=device, dtype=dtype)
    sm = torch.empty((n_save, bsz), device=device, dtype=dtype)
    for k in plan.initial_saves:
        sn[k], sm[k] = n, m
    for k in range(n_rows):
        n_new = growth_flow(n, 0.5 * h[k], p)
        if kill is not None:
            n_new = n_new * kill[k]
        n_new = growth_flow(n_new, 0.5 * h[k], p)
        m = _marker_step(m, n, n_new, h[k], p)
        n = n_new
        if survival is not None:
            n = n * survival[k]
        for si, b in plan.saves[k]:
            sn[si, b], sm[si, b] = n[b], m[b]
    saved = BurdenSeries(tuple(float(x) for x in save_at), sn, sm) if n_save else None
    return BurdenResult(n, m, saved)
