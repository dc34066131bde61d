"""3-D reaction-diffusion glioma model with radiotherapy and chemotherapy, batched over [B].

    du/dt = div(D(x) grad u) + rho u (1 - u) - k_c C(t) u        (mm, days; u in [0, 1])

with no flux across the tissue boundary (D = 0 outside) and the grid edge. Time stepping is
Strang splitting around the exact logistic flow:

    L(h/2) . [K(t, t+h) D(h)] . L(h/2)

where L is the exact logistic flow, K the exact chemotherapy kill exp(-k_c * int C) (a scalar per
member, so it commutes with the linear diffusion D and is folded into the next logistic update)
and D(h) either one forward-Euler step of the flux-form operator (``"explicit"``) or one
backward-Euler step solved by batched conjugate gradients (``"imex"``); the operator lives on
the tissue voxels only (``models.diffusion``). Consecutive half-steps of L merge into whole
steps (L is an exact flow), so a step costs one diffusion solve and one logistic update.
Splitting is second order; backward Euler is first order (at dt = 2 days, 1 mm, reference
parameters, fronts run ~2.5 % fast). Radiotherapy fractions are breakpoints of each member's
step grid (see ``models.treatment``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .batched import BatchedParams
from .device import DEFAULT_DTYPE
from .diffusion import DiffusionOperator, ImplicitDiffusion
from .grid import Grid
from .treatment import Schedule, chemo_step_survival, plan_batch, rt_log_kill


@dataclass
class TumorParams(BatchedParams):
    """Per-member model parameters, each a [B] tensor.

    D            mm^2/day  white-matter diffusivity; D(x) = D * diffusion_weight(labels)(x)
    rho          1/day     proliferation rate
    alpha        1/Gy      LQ radiosensitivity
    alpha_beta   Gy        LQ alpha/beta ratio (beta = alpha / alpha_beta)
    k_chemo      1/(exposure unit * day)  kill rate per unit of drug exposure C
    chemo_decay  1/day     lambda, first-order clearance of the exposure C
    """

    D: Tensor
    rho: Tensor
    alpha: Tensor
    alpha_beta: Tensor
    k_chemo: Tensor
    chemo_decay: Tensor

    NAMES = ("D", "rho", "alpha", "alpha_beta", "k_chemo", "chemo_decay")

    def __post_init__(self) -> None:
        self._check_shapes()

    @classmethod
    def reference(cls, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype = DEFAULT_DTYPE) -> "TumorParams":
        """High-grade-glioma reference values for ``batch`` identical members.

        D = 0.1 mm^2/day, rho = 0.05 /day, alpha = 0.05 /Gy, alpha/beta = 10 Gy (DESIGN.md 5,
        after Swanson/Rockne). Chemotherapy (our choice, temozolomide-like): exposure half-life
        1 day (lambda = ln 2 /day), so daily unit doses hold C near 1/lambda = 1.44 units, and
        k_chemo = 0.02 /(unit day) then kills at ~0.03 /day, below rho, as TMZ adds a modest
        benefit to radiotherapy.
        """
        vals = dict(D=0.1, rho=0.05, alpha=0.05, alpha_beta=10.0, k_chemo=0.02,
                    chemo_decay=math.log(2.0))
        return cls(**{k: torch.full((batch,), v, device=device, dtype=dtype) for k, v in vals.items()})

    def as_tensor(self) -> Tensor:
        """[B, 6] in the order of ``NAMES`` (for ensemble statistics and EnKF state vectors)."""
        return torch.stack([getattr(self, n) for n in self.NAMES], dim=1)

    @classmethod
    def from_tensor(cls, t: Tensor) -> "TumorParams":
        """Inverse of ``as_tensor``."""
        return cls(**{n: t[:, i].clone() for i, n in enumerate(cls.NAMES)})


@dataclass
class SimResult:
    """``u`` [B, X, Y, Z] at t1 (0 outside tissue); ``saved`` [T, B, X, Y, Z] at ``times`` (the
    ``save_at`` values, days) or None; ``n_steps`` batched steps taken (the most any member
    needed, stability sub-steps included); ``rt_applied`` [B] int64 fractions applied;
    ``cg_iterations`` total batched CG iterations (IMEX)."""

    u: Tensor
    saved: Tensor | None
    times: tuple[float, ...]
    n_steps: int
    rt_applied: Tensor
    cg_iterations: int = 0


def stable_dt(params: TumorParams, weight: Tensor | DiffusionOperator, grid: Grid) -> Tensor:
    """Per-member largest explicit step [B] (days, float64, CPU) keeping the flux-form Euler
    step positive: 1 / (2 D_max sum_a 1/h_a^2), i.e. h^2 / (2 dim D_max) on isotropic grids,
    with D_max = D * max(weight) over that member's map; inf where D_max = 0."""
    if isinstance(weight, DiffusionOperator):
        w_max = weight.w_max.detach().to("cpu", torch.float64)
    else:
        w = weight.unsqueeze(0) if weight.ndim == 3 else weight
        w_max = w.detach().flatten(1).amax(1).to("cpu", torch.float64)
    d_max = params.D.detach().to("cpu", torch.float64) * w_max
    denom = 2.0 * d_max * sum(1.0 / (h * h) for h, n in zip(grid.spacing, grid.shape) if n > 1)
    return torch.where(denom > 0, 1.0 / torch.where(denom > 0, denom, 1.0), math.inf)


# An IMEX step costs about this many operator applications (CG iterations, measured 6-7 at
# dt = 1-2 days); explicit sub-steps cost one each, so "auto" takes explicit below it.
IMEX_COST_IN_SUBSTEPS = 6


def choose_scheme(params: TumorParams, weight: Tensor | DiffusionOperator, grid: Grid, dt: float) -> str:
    """"explicit" when its stability sub-steps are cheaper than one IMEX solve, else "imex"."""
    dt_max = float(stable_dt(params, weight, grid).min())
    substeps = math.ceil(dt / (0.9 * dt_max)) if math.isfinite(dt_max) else 1
    return "explicit" if substeps <= IMEX_COST_IN_SUBSTEPS else "imex"


def simulate(u0: Tensor, weight: Tensor | DiffusionOperator, params: TumorParams, grid: Grid,
             t0: float, t1: float, *, dt: float, schedule: Schedule | None = None,
             scheme: Literal["explicit", "imex", "auto"] = "imex",
             save_at: Sequence[float] | None = None,
             cg_tol: float = 1e-5, cg_max_iter: int = 200) -> SimResult:
    """Advance tumour densities from ``t0`` to ``t1`` days for the whole batch.

    u0       [B, X, Y, Z] cell density / carrying capacity. Values are clipped to [0, 1] and set
             to 0 where the member's weight is 0 (no tumour lives outside tissue).
    weight   [B or 1, X, Y, Z] (or [X, Y, Z]) D(x)/D, e.g. ``diffusion_weight(labels)``; or a
             ``DiffusionOperator`` built from it (reuse it across calls to skip the set-up).
    params   TumorParams with batch B (or 1, broadcast).
    grid     geometry; ``grid.shape`` must match u0.
    dt       largest step, days. ``"explicit"`` splits a step into ceil(step / (0.9 stable_dt))
             sub-steps wherever it exceeds ``stable_dt``, per member (so a member's result does
             not depend on its batch-mates); ``"imex"`` is unconditionally stable.
             ``"auto"`` picks per call whichever costs fewer operator applications
             (``choose_scheme``).
    schedule treatment with batch B (or 1); fractions in (t0, t1] are applied at their times.
    save_at  non-decreasing days in [t0, t1]; the states there come back in ``saved``.
    cg_tol, cg_max_iter  IMEX solve: a member stops when its residual has dropped by cg_tol
             (||r_k|| <= cg_tol ||r_0||, r_0 = c L b the step's change), all stop after
             cg_max_iter iterations (mass is conserved either way). Steps with
             c = D dt / h^2 well above 1 need a tighter cg_tol to keep a front's leading edge.

    Device and dtype follow ``u0``; nothing passed in is modified.
    """
    if u0.ndim != 4 or tuple(u0.shape[1:]) != grid.shape:
        raise ValueError(f"u0 must be [B, {grid.shape}], got {tuple(u0.shape)}")
    if scheme not in ("explicit", "imex", "auto"):
        raise ValueError(f"unknown scheme {scheme!r}")
    device, dtype = u0.device, u0.dtype
    bsz = u0.shape[0]
    if isinstance(weight, DiffusionOperator):
        op = weight
        if op.grid != grid or op.device != device or op.dtype != dtype:
            raise ValueError("the DiffusionOperator was built for another grid, device or dtype")
    else:
        op = DiffusionOperator(weight.to(device=device, dtype=dtype), grid)
    if op.map_batch not in (1, bsz):
        raise ValueError(f"weight has batch {op.map_batch}, expected 1 or {bsz}")
    p = params.to(device=device, dtype=dtype).expand(bsz)
    if schedule is not None:
        schedule = schedule.to(device=device).expand(bsz)

    d_cpu = p.D.detach().to("cpu", torch.float64)
    limit = torch.full((bsz,), float(dt), dtype=torch.float64)
    if scheme == "auto":
        scheme = choose_scheme(p, op, grid, dt)
    if scheme == "explicit":
        dt_max = stable_dt(p, op, grid).expand(bsz)
        limit = torch.where(limit > dt_max, 0.9 * dt_max, limit)
    plan = plan_batch(t0, t1, limit.tolist(), schedule, save_at)
    n_rows = plan.n_rows

    # Every per-step scalar, for all rows at once: [K, B].
    h_cpu = plan.t_end - plan.t_start                     # 0 on idle rows
    tau = h_cpu.to(device=device, dtype=dtype)
    pre_tau = torch.where(plan.first.to(device), 0.5 * tau, 0.0)
    post_tau = torch.where(plan.last.to(device), 0.5 * tau, tau)
    any_pre = plan.first.any(dim=1).tolist()
    kill = chemo_step_survival(plan, schedule, p.k_chemo, p.chemo_decay)
    rt_applied = torch.zeros(bsz, dtype=torch.long, device=device)
    any_rt = (~torch.isnan(plan.rt_at)).any(dim=1).tolist()
    rt_factor = None
    if any(any_rt):
        log_kill, count = rt_log_kill(schedule, plan.rt_at.to(device), p.alpha, p.alpha_beta)
        rt_factor = torch.exp(-log_kill)
        rt_applied = count.sum(dim=0)
    # rho tau and the c = D h of every row, with growth factors precomputed for the logistic.
    pre_a, pre_b = torch.exp(-p.rho * pre_tau), -torch.expm1(-p.rho * pre_tau)
    post_a, post_b = torch.exp(-p.rho * post_tau), -torch.expm1(-p.rho * post_tau)
    if kill is not None:
        post_a = post_a / kill
    # c = D h per row and member, rounded to the state dtype on the CPU so that the fused
    # one-c path and the per-member path use identical numbers (batch invariance).
    c_host = d_cpu.to(dtype) * h_cpu.to(dtype)
    c_cpu = c_host.tolist()
    c_all = c_host.to(device)

    state = op.to_state(u0).clamp_(0.0, 1.0)   # a fresh compact copy: u0 is left alone
    n_save = len(save_at) if save_at is not None else 0
    saved = torch.empty((n_save, *u0.shape), device=device, dtype=dtype) if n_save else None
    if plan.initial_saves:
        field = op.to_field(state)
        for k in plan.initial_saves:
            saved[k].copy_(field)
    cg_total = 0
    bufs: dict[str, Tensor] = {}
    tmp = torch.empty_like(state)
    other = torch.empty_like(state)
    per = op.per_member

    def logistic(x: Tensor, a: Tensor, b: Tensor) -> None:
        # x <- K x e / (1 + K x (e - 1)) with e = exp(rho tau), K the chemo survival, written as
        # x / (1/(K e) + (1 - 1/e) x): one fused multiply-add and one division per voxel.
        torch.addcmul(per(a), x, per(b), out=tmp)
        x.div_(tmp)

    solver: ImplicitDiffusion | None = None
    solver_c: list[float] | None = None
    for k in range(n_rows):
        if any_pre[k]:
            logistic(state, pre_a[k], pre_b[k])
        c_row = c_cpu[k]
        if scheme == "explicit":
            if all(ci == c_row[0] for ci in c_row):
                op.euler(state, c_row[0], out=other)
            else:
                op.matmul(state, out=other)
                torch.addcmul(state, other, per(c_all[k]), out=other)
            state, other = other, state
        else:
            if c_row != solver_c:
                solver, solver_c = ImplicitDiffusion(op, c_all[k], cg_tol, cg_max_iter), c_row
            cg_total += solver.solve(state, other, bufs)
            state, other = other, state
        logistic(state, post_a[k], post_b[k])
        if any_rt[k]:
            state.mul_(per(rt_factor[k]))
        if plan.saves[k]:
            field = op.to_field(state)
            for si, b in plan.saves[k]:
                saved[si, b].copy_(field[b])
    state.clamp_(0.0, 1.0)
    if saved is not None:
        saved.clamp_(0.0, 1.0)
    times = tuple(float(x) for x in save_at) if save_at is not None else ()
    return SimResult(u=op.to_field(state), saved=saved, times=times, n_steps=n_rows,
                     rt_applied=rt_applied, cg_iterations=cg_total)
