"""The fraternal twin's truth: a glioblastoma simulator richer than the twin's model.

The twin assimilates one density u with isotropic, tissue-weighted diffusion, one proliferation
rate and instant treatment kills (DESIGN §5). The truth here differs in every way a real tumour
does, so that a forecast scored against it measures skill under model error:

* anisotropic migration along white-matter fibres: D(x) = D_perp I + (D_par - D_perp) f f^T in
  white matter (f a synthetic fibre direction field, ``fibre_field``), isotropic and slower in
  gray matter, no flux into CSF / ventricles / outside (Jbabdi et al. 2005; Painter & Hillen 2013);
* proliferation that varies in space (a smooth random field of rho);
* two cell populations competing for one carrying capacity (logistic): treatment-sensitive
  cells s and a treatment-resistant subclone r, seeded at a small fraction;
* necrosis of long-packed tissue: viable cells in voxels packed above ``pack_threshold`` for
  longer than ``necrosis_delay_days`` turn necrotic (n), which occupies space and never clears
  within the follow-up (the hypoxic necrosis of Swanson et al. 2011, PIHNA);
* delayed clearance: cells killed by radiotherapy or a drug join a damaged compartment d that
  still occupies space, counts as cellularity and enhances, and clears with a half-life of weeks,
  so the radiological response lags the kill;
* drugs with their own exposure and sensitivity: temozolomide and lomustine kill (the resistant
  subclone is less sensitive); bevacizumab kills nothing but normalises vessels, which hides
  enhancement and shrinks vasogenic oedema (a pseudo-response);
* observables a clinic sees: a BraTS label map (1 necrosis, 2 non-enhancing T2/FLAIR signal:
  infiltrated tissue and vasogenic oedema, 4 enhancing), a cellularity map, LDH and ctDNA.

Units: mm, days, densities as fractions of the carrying capacity (all four compartments share
it: s + r + d + n <= 1 in every voxel), doses in Gy, mg/m² or mg/kg.

Equations, per voxel, with T = s + r + d + n and Lie splitting in this order per step dt:

    ds/dt = div(D grad s) + rho(x) s (1 - T)                 (r: rho_r = growth ratio * rho)
    s <- s exp(-k_tmz E_tmz - k_ccnu E_ccnu)                 E = exact exposure integral over the
                                                             step (models.treatment.chemo_exposure)
    s, r -> n at necrosis_rate where packed for > necrosis_delay_days
    d <- d exp(-ln 2 dt / clearance_half_life_days)
    radiotherapy fraction of dose g at its own time: s <- s exp(-alpha g (1 + g / (alpha/beta)))
    everything killed joins d; viable cells pushed above capacity by migration are lost.

Parameters and where their ranges come from (``PRIORS``; every draw from an explicit generator):

| parameter | unit | draw | source |
|---|---|---|---|
| D_white (mean diffusivity in white matter) | mm²/day | log-normal, median 0.1, sd 0.6, in [0.02, 0.5] | Swanson et al. 2000 (D_gray ≈ 0.13 mm²/day, D_white = 5 D_gray); Harpold et al. 2007 (high-grade glioma D spans about 0.01-1 mm²/day) |
| anisotropy D_par/D_perp | - | uniform [3, 10] | Jbabdi et al. 2005 and Painter & Hillen 2013: the tumour diffusion tensor follows the DTI tensor with enhanced anisotropy |
| gray_ratio D_gray/D_white | - | 0.2 | Swanson et al. 2000 |
| rho (median of the field) | 1/day | log-normal, median 0.025, sd 0.5, in [0.005, 0.1] | Harpold et al. 2007; Swanson et al. 2008 (rho of high-grade gliomas about 0.005-0.1 /day) |
| rho_heterogeneity (sd of log rho in space) | - | uniform [0.2, 0.5] | assumption: regional Ki-67 indices vary severalfold within one glioblastoma |
| resistant_fraction (r / (s + r) at the seed) | - | log-uniform [1e-3, 3e-2] | assumption: a minor pre-existing subclone |
| resistant_growth (rho_r / rho) | - | uniform [0.7, 1.0] | assumption: a fitness cost of resistance |
| alpha | 1/Gy | log-normal, median 0.025, sd 0.4, in [0.005, 0.08] | Rockne et al. 2010 (patient-specific alpha of a few hundredths per Gy) |
| alpha_beta | Gy | 10 | Rockne et al. 2010 |
| resistant_rt (alpha_r / alpha) | - | uniform [0.2, 0.5] | Bao et al. 2006: radioresistant glioma stem-like cells |
| mgmt_methylated | - | Bernoulli(0.45) | Hegi et al. 2005: MGMT promoter methylated in 45 % |
| k_tmz | 1/(mg/m²·day) | log-normal, median 1.5e-3, sd 0.4; x3 when methylated | assumption, sized to Stupp et al. 2005's modest benefit and Hegi et al. 2005's MGMT effect |
| resistant_tmz (k_r / k) | - | uniform [0.02, 0.15] | Hegi et al. 2005 (MGMT repair of O6-methylguanine) |
| k_ccnu | 1/(mg/m²·day) | log-normal, median 1e-3, sd 0.4; x2 when methylated | assumption: Wick et al. 2017 (EORTC 26101), lomustine alone gives modest control |
| resistant_ccnu | - | uniform [0.3, 0.7] | assumption: nitrosourea lesions are partly repaired by MGMT too |
| half-lives of exposure: temozolomide, lomustine, bevacizumab | days | 1.8 h, 1.5 d, 20 d | temozolomide label (plasma t½ ~1.8 h); lomustine label (metabolites 16 h-2 d); Lu et al. 2008 (bevacizumab t½ ~20 d) |
| pack_threshold | - | 0.9 | assumption |
| necrosis_delay_days | days | uniform [30, 90] | assumption after Swanson et al. 2011 (necrosis follows sustained hypoxia) |
| necrosis_rate | 1/day | uniform [0.02, 0.06] | assumption |
| clearance_half_life_days | days | uniform [14, 42] | assumption bounded by Wen et al. 2010: treatment effects can mimic progression for ~12 weeks after radiotherapy |
| bev_emax, bev_ec50 | -, mg/kg | uniform [0.6, 0.9], 2 | Ellingson et al. 2011/2014 and Friedman et al. 2009: bevacizumab removes most enhancement and oedema without a matching effect on the cells (pseudo-response) |
| damaged_leak (leakage of damaged relative to viable cells) | - | uniform [1, 1.5] | Brandsma et al. 2008: pseudoprogression, treated tissue enhancing more for weeks after chemoradiation, in 20-30 % |
| oedema_sd_mm | mm | uniform [3, 7] | assumption: FLAIR volume about 2-3x the enhancing volume at diagnosis |
| thresholds of the labels | - | enhancing 0.6 (of the leakage), FLAIR 0.16 (of s + r + d), necrosis 0.5 (of n), oedema 0.15 | Harpold et al. 2007 (T2 ~16 % of capacity; their T1Gd ~80 % is lowered here because leakage, not density, makes enhancement, and treated tissue keeps leaking) |
| ctdna_shedding | 1/mL | log-normal, median 2.5e-4, sd 0.5 | assumption: tumour fractions of 0.1-1 % around diagnosis, at a plasma panel's limit (cohort.ctdna_lod, 0.2 %) after a good response (Bettegowda et al. 2014: plasma ctDNA is scarce in gliomas); TF = a / (1 + a) as in the twin |
| ctdna_damaged, ldh_damaged (weight of damaged cells) | - | uniform [1, 3] | assumption: dying cells release DNA and LDH |
| ldh_baseline | U/L | uniform [140, 220] | the normal serum LDH range |
| ldh_shedding | U/L per mL | log-normal, median 2, sd 0.4 | assumption |
| body_weight_kg | kg | uniform [55, 100] | adult range, for mg/kg doses |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from models.grid import Grid
from models.tissue import GRAY, OUTSIDE, WHITE
from models.treatment import Schedule, chemo_exposure, plan_steps, rt_log_kill

#: BraTS label values of the observed segmentation.
NECROSIS_LABEL, OEDEMA_LABEL, ENHANCING_LABEL = 1, 2, 4
#: What each label means, as the imaging body's ``labels`` mapping carries it.
LABELS = {str(NECROSIS_LABEL): "necrosis", str(OEDEMA_LABEL): "non_enhancing", str(ENHANCING_LABEL): "enhancing"}

ENHANCING_THRESHOLD = 0.6   # of the vascular leakage (s + r + damaged_leak d) after anti-angiogenic masking
FLAIR_THRESHOLD = 0.16      # of s + r + d
NECROSIS_THRESHOLD = 0.5    # of n
OEDEMA_THRESHOLD = 0.15     # of the smoothed leakage field
LEAK_ONSET = 0.5            # vessels leak where s + r + d exceeds this


@dataclass(frozen=True)
class Drug:
    """A drug of the cohort: RxNorm ingredient code, dose unit and exposure half-life (days)."""

    name: str
    rxnorm: str
    unit: str
    half_life_days: float
    route: str

    @property
    def decay(self) -> float:
        return math.log(2.0) / self.half_life_days


TEMOZOLOMIDE = Drug("temozolomide", "37776", "mg/m2", 1.8 / 24.0, "oral")
LOMUSTINE = Drug("lomustine", "6466", "mg/m2", 1.5, "oral")
BEVACIZUMAB = Drug("bevacizumab", "253337", "mg/kg", 20.0, "intravenous")
DRUGS = {d.name: d for d in (TEMOZOLOMIDE, LOMUSTINE, BEVACIZUMAB)}


@dataclass(frozen=True)
class Prior:
    """One parameter's draw: ``kind`` lognormal (a = median, b = sd of the log, clamped to
    [lo, hi]), uniform or loguniform on [a, b], bernoulli (a = probability) or fixed (a)."""

    kind: str
    a: float
    b: float = 0.0
    lo: float = -math.inf
    hi: float = math.inf

    def draw(self, g: torch.Generator) -> float:
        u = lambda: float(torch.rand((), generator=g, dtype=torch.float64))  # noqa: E731
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return self.a + (self.b - self.a) * u()
        if self.kind == "loguniform":
            return math.exp(math.log(self.a) + (math.log(self.b) - math.log(self.a)) * u())
        if self.kind == "bernoulli":
            return float(u() < self.a)
        if self.kind == "lognormal":
            z = float(torch.randn((), generator=g, dtype=torch.float64))
            return min(max(self.a * math.exp(self.b * z), self.lo), self.hi)
        raise ValueError(f"unknown prior kind {self.kind!r}")


@dataclass(frozen=True)
class TruthParams:
    """One patient's true parameters (units and sources: the module's table)."""

    D_white: float
    anisotropy: float
    gray_ratio: float
    rho: float
    rho_heterogeneity: float
    resistant_fraction: float
    resistant_growth: float
    alpha: float
    alpha_beta: float
    resistant_rt: float
    mgmt_methylated: float
    k_tmz: float
    resistant_tmz: float
    k_ccnu: float
    resistant_ccnu: float
    pack_threshold: float
    necrosis_delay_days: float
    necrosis_rate: float
    clearance_half_life_days: float
    bev_emax: float
    bev_ec50: float
    damaged_leak: float
    oedema_sd_mm: float
    ctdna_shedding: float
    ctdna_damaged: float
    ldh_baseline: float
    ldh_shedding: float
    ldh_damaged: float
    body_weight_kg: float

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


PRIORS: dict[str, Prior] = {
    "D_white": Prior("lognormal", 0.1, 0.6, 0.02, 0.5),
    "anisotropy": Prior("uniform", 3.0, 10.0),
    "gray_ratio": Prior("fixed", 0.2),
    "rho": Prior("lognormal", 0.025, 0.5, 0.005, 0.1),
    "rho_heterogeneity": Prior("uniform", 0.2, 0.5),
    "resistant_fraction": Prior("loguniform", 1e-3, 3e-2),
    "resistant_growth": Prior("uniform", 0.7, 1.0),
    "alpha": Prior("lognormal", 0.025, 0.4, 0.005, 0.08),
    "alpha_beta": Prior("fixed", 10.0),
    "resistant_rt": Prior("uniform", 0.2, 0.5),
    "mgmt_methylated": Prior("bernoulli", 0.45),
    "k_tmz": Prior("lognormal", 1.5e-3, 0.4, 1e-4, 2e-2),
    "resistant_tmz": Prior("uniform", 0.02, 0.15),
    "k_ccnu": Prior("lognormal", 1e-3, 0.4, 1e-4, 2e-2),
    "resistant_ccnu": Prior("uniform", 0.3, 0.7),
    "pack_threshold": Prior("fixed", 0.9),
    "necrosis_delay_days": Prior("uniform", 30.0, 90.0),
    "necrosis_rate": Prior("uniform", 0.02, 0.06),
    "clearance_half_life_days": Prior("uniform", 14.0, 42.0),
    "bev_emax": Prior("uniform", 0.6, 0.9),
    "bev_ec50": Prior("fixed", 2.0),
    "damaged_leak": Prior("uniform", 1.0, 1.5),
    "oedema_sd_mm": Prior("uniform", 3.0, 7.0),
    "ctdna_shedding": Prior("lognormal", 2.5e-4, 0.5, 1e-5, 1e-1),
    "ctdna_damaged": Prior("uniform", 1.0, 3.0),
    "ldh_baseline": Prior("uniform", 140.0, 220.0),
    "ldh_shedding": Prior("lognormal", 2.0, 0.4, 0.05, 50.0),
    "ldh_damaged": Prior("uniform", 1.0, 3.0),
    "body_weight_kg": Prior("uniform", 55.0, 100.0),
}


def draw_params(g: torch.Generator) -> TruthParams:
    """Draw every parameter in the table's order; MGMT methylation scales the alkylators."""
    v = {name: prior.draw(g) for name, prior in PRIORS.items()}
    if v["mgmt_methylated"]:
        v["k_tmz"] *= 3.0
        v["k_ccnu"] *= 2.0
    return TruthParams(**v)


# -- fields on the grid -------------------------------------------------------------------------


def smooth_noise(shape: tuple[int, int, int], g: torch.Generator, coarse: int = 5) -> Tensor:
    """A smooth random field, float64 [X, Y, Z], standardised to mean 0 and sd 1: coarse
    Gaussian noise on a ``coarse``³ lattice, trilinearly upsampled."""
    noise = torch.randn((1, 1, coarse, coarse, coarse), generator=g, dtype=torch.float64)
    f = F.interpolate(noise, size=shape, mode="trilinear", align_corners=True)[0, 0]
    return (f - f.mean()) / f.std().clamp_min(1e-12)


def fibre_field(grid: Grid, tissue: Tensor, g: torch.Generator) -> Tensor:
    """Unit fibre directions [X, Y, Z, 3] (float64; zero outside white matter).

    A synthetic tract map: left-right (callosal) fibres near the midline, radial (corona
    radiata) fibres elsewhere blended with front-back association fibres, and a smooth random
    wobble, so the direction varies over a few centimetres as in DTI."""
    x = grid.coords(dtype=torch.float64)
    c = torch.tensor(grid.center_mm, dtype=torch.float64)
    p = x - c
    semi = torch.tensor([0.45 * e for e in grid.extent_mm], dtype=torch.float64)
    radial = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    ex = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    ey = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    callosal = torch.exp(-0.5 * (p[..., 0] / (0.3 * semi[0])) ** 2).unsqueeze(-1)
    wobble = torch.stack([smooth_noise(grid.shape, g) for _ in range(3)], dim=-1)
    f = callosal * ex + (1.0 - callosal) * (0.6 * radial + 0.4 * ey) + 0.35 * wobble
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    return f * (tissue == WHITE).unsqueeze(-1)


def interior(tissue: Tensor) -> Tensor:
    """Tissue voxels whose 26 neighbours (the 3x3x3 cube) are all tissue, none on the grid edge,
    bool [X, Y, Z]: where the cross terms may act, since their stencil reaches the diagonal
    neighbours."""
    t = (tissue != OUTSIDE).to(torch.float64)[None, None]
    eroded = -F.max_pool3d(-F.pad(t, (1, 1, 1, 1, 1, 1), value=0.0), 3, stride=1)
    return eroded[0, 0] > 0.5


def diffusion_tensor(tissue: Tensor, fibres: Tensor, p: TruthParams) -> Tensor:
    """The six components (xx, yy, zz, xy, xz, yz) of D(x), float64 [6, X, Y, Z], mm²/day.

    White matter: D_perp I + (D_par - D_perp) f f^T with D_par = k D_perp, k = anisotropy,
    and mean diffusivity (trace / 3) D_white; gray matter: isotropic gray_ratio * D_white;
    outside: 0. The cross terms are zero next to the tissue boundary, which keeps the
    discretisation free of flux into non-tissue (``divergence``)."""
    k = p.anisotropy
    d_perp = 3.0 * p.D_white / (k + 2.0)
    d_par = k * d_perp
    white = (tissue == WHITE).to(torch.float64)
    gray = (tissue == GRAY).to(torch.float64)
    iso = white * d_perp + gray * p.gray_ratio * p.D_white
    extra = white * (d_par - d_perp)
    f = fibres
    keep = interior(tissue).to(torch.float64)
    comps = [iso + extra * f[..., 0] ** 2, iso + extra * f[..., 1] ** 2, iso + extra * f[..., 2] ** 2,
             keep * extra * f[..., 0] * f[..., 1], keep * extra * f[..., 0] * f[..., 2],
             keep * extra * f[..., 1] * f[..., 2]]
    return torch.stack(comps)


_PAIRS = ((0, 1, 3), (0, 2, 4), (1, 2, 5))  # (axis a, axis b, component index of D_ab)


def _shift(u: Tensor, axis: int, step: int) -> Tensor:
    """u moved by ``step`` voxels along spatial ``axis`` (of [..., X, Y, Z]), zero filled."""
    dim = u.ndim - 3 + axis
    n = u.shape[dim]
    out = torch.zeros_like(u)
    if step > 0:
        out.narrow(dim, step, n - step).copy_(u.narrow(dim, 0, n - step))
    else:
        out.narrow(dim, 0, n + step).copy_(u.narrow(dim, -step, n + step))
    return out


def face_coefficients(tensor: Tensor) -> list[Tensor]:
    """Per axis a, D_aa on the face between voxel i and i + 1 (harmonic mean: zero when either
    side is not tissue, the no-flux condition), [X, Y, Z] each, stored at voxel i."""
    out = []
    for a in range(3):
        lo, hi = tensor[a], _shift(tensor[a], a, -1)
        out.append(2.0 * lo * hi / (lo + hi).clamp_min(1e-300))
    return out


def _sl(ndim: int, axis: int, part: slice) -> tuple:
    """An index taking ``part`` along spatial ``axis`` of an [..., X, Y, Z] tensor."""
    idx = [slice(None)] * ndim
    idx[ndim - 3 + axis] = part
    return tuple(idx)


def divergence(u: Tensor, tensor: Tensor, faces: list[Tensor], spacing: tuple[float, float, float]) -> Tensor:
    """div(D grad u) of u [..., X, Y, Z] (1/day times u's unit).

    Diagonal terms in flux form on the faces; cross terms d_a(D_ab d_b u) as central
    differences of central differences. Both telescope, and the cross terms vanish within one
    voxel of non-tissue, so the sum of the result over the grid is zero: migration conserves
    cells and none cross into CSF or out of the brain."""
    nd = u.ndim
    lo, hi, mid = slice(None, -1), slice(1, None), slice(1, -1)
    out = torch.zeros_like(u)
    for a in range(3):
        # F_{i+1/2} = D_face (u_{i+1} - u_i) / h^2 on the faces between i and i + 1
        flux = faces[a][_sl(3, a, lo)] * (u[_sl(nd, a, hi)] - u[_sl(nd, a, lo)]) / spacing[a] ** 2
        out[_sl(nd, a, lo)] += flux
        out[_sl(nd, a, hi)] -= flux
    inner_lo, inner_hi = slice(None, -2), slice(2, None)
    for a, b, c in _PAIRS:
        # d_a(D_ab d_b u) + d_b(D_ab d_a u): the tensor is symmetric, so each pair appears twice.
        for x, y in ((a, b), (b, a)):
            grad = torch.zeros_like(u)
            grad[_sl(nd, y, mid)] = (u[_sl(nd, y, inner_hi)] - u[_sl(nd, y, inner_lo)]) / (2.0 * spacing[y])
            q = tensor[c] * grad
            out[_sl(nd, x, mid)] += (q[_sl(nd, x, inner_hi)] - q[_sl(nd, x, inner_lo)]) / (2.0 * spacing[x])
    return out


def stable_substep(tensor: Tensor, spacing: tuple[float, float, float]) -> float:
    """The largest explicit Euler step (days) that keeps the diagonal stencil monotone and the
    whole operator stable (Gershgorin bound with the cross terms), with a 10 % margin."""
    bound = sum(2.0 * tensor[a] / spacing[a] ** 2 for a in range(3))
    for a, b, c in _PAIRS:
        bound = bound + 2.0 * tensor[c].abs() / (spacing[a] * spacing[b])
    top = float(bound.max())
    return math.inf if top <= 0.0 else 0.9 / top


def blur(field: Tensor, sd_mm: float, spacing: tuple[float, float, float]) -> Tensor:
    """Separable Gaussian smoothing of [X, Y, Z] (kernel sums to 1 per axis, zero padding)."""
    out = field[None, None]
    for a, h in enumerate(spacing):
        r = max(1, int(math.ceil(3.0 * sd_mm / h)))
        x = torch.arange(-r, r + 1, dtype=field.dtype) * h
        k = torch.exp(-0.5 * (x / sd_mm) ** 2)
        k = (k / k.sum()).view(1, 1, *[len(k) if i == a else 1 for i in range(3)])
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - a)] = pad[2 * (2 - a) + 1] = r
        out = F.conv3d(F.pad(out, pad), k)
    return out[0, 0]


# -- state and treatments -----------------------------------------------------------------------


@dataclass(frozen=True)
class TruthState:
    """The compartments, float64 [X, Y, Z] each (fractions of capacity), the days each voxel has
    been packed (``packed_days``) and the clock ``t`` (days)."""

    s: Tensor
    r: Tensor
    d: Tensor
    n: Tensor
    packed_days: Tensor
    t: float

    @property
    def viable(self) -> Tensor:
        return self.s + self.r

    @property
    def occupying(self) -> Tensor:
        """Cells that fill space and show on a cellularity map: viable and damaged."""
        return self.s + self.r + self.d

    @property
    def total(self) -> Tensor:
        return self.s + self.r + self.d + self.n


@dataclass
class Regimen:
    """Delivered treatments on the truth clock: ``rt`` [(day, Gy)], ``tmz`` / ``ccnu``
    [(day, mg/m²)], ``bev`` [(day, mg/kg)]. Lists grow as the clinic decides."""

    rt: list[tuple[float, float]]
    tmz: list[tuple[float, float]]
    ccnu: list[tuple[float, float]]
    bev: list[tuple[float, float]]

    @classmethod
    def empty(cls) -> "Regimen":
        return cls([], [], [], [])


def _doses(rows: list[tuple[float, float]]) -> tuple[Tensor, Tensor]:
    s = Schedule.from_lists(chemo=rows, dtype=torch.float64)
    return s.chemo_times, s.chemo_doses


def bev_level(regimen: Regimen, t: float) -> float:
    """Bevacizumab exposure at day t (mg/kg in the body: doses decayed with its half-life)."""
    lam = BEVACIZUMAB.decay
    return sum(dose * math.exp(-lam * (t - td)) for td, dose in regimen.bev if td <= t)


def bev_suppression(p: TruthParams, level: float) -> float:
    """Fraction of vascular leakage (enhancement, oedema) removed: emax B / (B + EC50)."""
    return p.bev_emax * level / (level + p.bev_ec50) if level > 0 else 0.0


@dataclass(frozen=True)
class Anatomy:
    """What stays fixed for one patient: grid, tissue labels [X, Y, Z] (models.tissue), the
    diffusion tensor [6, X, Y, Z] and its face coefficients, rho(x) [X, Y, Z] (1/day)."""

    grid: Grid
    tissue: Tensor
    fibres: Tensor
    tensor: Tensor
    faces: list[Tensor]
    rho: Tensor
    substep: float

    @property
    def brain(self) -> Tensor:
        return self.tissue != OUTSIDE


def build_anatomy(grid: Grid, tissue: Tensor, p: TruthParams, g: torch.Generator) -> Anatomy:
    """The patient's fibres, diffusion tensor and rho field (draws from ``g``: fibre wobble, then
    the rho field)."""
    fibres = fibre_field(grid, tissue, g)
    tensor = diffusion_tensor(tissue, fibres, p)
    brain = (tissue != OUTSIDE).to(torch.float64)
    log_rho = math.log(p.rho) + p.rho_heterogeneity * smooth_noise(grid.shape, g, coarse=6)
    rho = log_rho.exp().clamp(0.005, 0.1) * brain
    return Anatomy(grid, tissue, fibres, tensor, face_coefficients(tensor), rho, stable_substep(tensor, grid.spacing))


#: Densities below this are set to zero: far below one cell per voxel, and what the migration's
#: products of ever smaller tails would otherwise turn into subnormal floats, which slow the CPU's
#: arithmetic a hundredfold.
TINY = 1e-20


def _flush(x: Tensor) -> Tensor:
    """x with negative values (the cross terms' undershoot) and values below TINY set to 0."""
    return x.masked_fill(x < TINY, 0.0)


def advance(state: TruthState, t1: float, anatomy: Anatomy, p: TruthParams, regimen: Regimen,
            dt: float = 0.5) -> TruthState:
    """The state at day ``t1`` (>= state.t). Radiotherapy fractions with time in (t, t1] are
    applied at their own times, after the transport up to them (models.treatment's convention,
    so advancing in pieces applies each once); drug exposure is integrated exactly per step."""
    if t1 < state.t:
        raise ValueError(f"cannot advance backwards: {state.t} > {t1}")
    rt = Schedule.from_lists(rt=regimen.rt, dtype=torch.float64)
    tmz_t, tmz_d = _doses(regimen.tmz)
    ccnu_t, ccnu_d = _doses(regimen.ccnu)
    alpha = torch.tensor([p.alpha], dtype=torch.float64)
    alpha_r = torch.tensor([p.alpha * p.resistant_rt], dtype=torch.float64)
    ab = torch.tensor([p.alpha_beta], dtype=torch.float64)
    lam_tmz = torch.tensor([TEMOZOLOMIDE.decay], dtype=torch.float64)
    lam_ccnu = torch.tensor([LOMUSTINE.decay], dtype=torch.float64)
    s, r, d, n, packed = state.s, state.r, state.d, state.n, state.packed_days
    spacing = anatomy.grid.spacing
    clear = math.log(2.0) / p.clearance_half_life_days
    for seg in plan_steps(state.t, t1, dt, rt if regimen.rt else None):
        for k in range(seg.n_steps):
            a = seg.t_start + k * seg.step
            b = seg.t_end if k == seg.n_steps - 1 else a + seg.step
            h = b - a
            # migration of the viable cells, explicit sub-steps within the stability bound
            m = max(1, math.ceil(h / anatomy.substep))
            for _ in range(m):
                vr = torch.stack([s, r])
                vr = _flush(vr + (h / m) * divergence(vr, anatomy.tensor, anatomy.faces, spacing))
                s, r = vr[0], vr[1]
            # logistic competition for the one capacity
            room = (1.0 - s - r - d - n).clamp_min(0.0)
            s = s + h * anatomy.rho * s * room
            r = r + h * p.resistant_growth * anatomy.rho * r * room
            # drugs: exact exposure over the step
            e_tmz = float(chemo_exposure(a, b, tmz_t, tmz_d, lam_tmz)) if regimen.tmz else 0.0
            e_ccnu = float(chemo_exposure(a, b, ccnu_t, ccnu_d, lam_ccnu)) if regimen.ccnu else 0.0
            if e_tmz > 0.0 or e_ccnu > 0.0:
                ks = math.exp(-p.k_tmz * e_tmz - p.k_ccnu * e_ccnu)
                kr = math.exp(-p.k_tmz * p.resistant_tmz * e_tmz - p.k_ccnu * p.resistant_ccnu * e_ccnu)
                d = d + s * (1.0 - ks) + r * (1.0 - kr)
                s, r = s * ks, r * kr
            # necrosis of long-packed tissue (packed: the voxel's space is full, necrosis included,
            # so a necrotic core keeps starving the cells left in it)
            packed = torch.where(s + r + d + n >= p.pack_threshold, packed + h, torch.zeros_like(packed))
            dying = (packed > p.necrosis_delay_days).to(s.dtype) * (1.0 - math.exp(-p.necrosis_rate * h))
            n = n + (s + r) * dying
            s, r = s * (1.0 - dying), r * (1.0 - dying)
            # clearance of the damaged cells
            d = _flush(d * math.exp(-clear * h))
            # migration may push viable cells into a full voxel: they find no room and are lost
            over = s + r + d + n - 1.0
            if bool((over > 0).any()):
                viable = (s + r).clamp_min(1e-300)
                keep = torch.where(over > 0, ((viable - over) / viable).clamp_min(0.0), torch.ones_like(s))
                s, r = s * keep, r * keep
        if seg.rt:
            lk, _ = rt_log_kill(rt, seg.t_end, alpha, ab)
            lk_r, _ = rt_log_kill(rt, seg.t_end, alpha_r, ab)
            ks, kr = math.exp(-float(lk)), math.exp(-float(lk_r))
            d = d + s * (1.0 - ks) + r * (1.0 - kr)
            s, r = s * ks, r * kr
    return TruthState(s, r, d, n, packed, float(t1))


# -- what can be observed -----------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """Label thresholds of one reading (a study's scanner and reader move them a little)."""

    enhancing: float = ENHANCING_THRESHOLD
    flair: float = FLAIR_THRESHOLD
    necrosis: float = NECROSIS_THRESHOLD
    oedema: float = OEDEMA_THRESHOLD

    def jitter(self, g: torch.Generator, log_sd: float) -> "Thresholds":
        z = torch.randn(3, generator=g, dtype=torch.float64).tolist()
        return replace(self, enhancing=min(0.95, self.enhancing * math.exp(log_sd * z[0])),
                       flair=self.flair * math.exp(log_sd * z[1]), oedema=self.oedema * math.exp(log_sd * z[2]))


def label_map(state: TruthState, anatomy: Anatomy, p: TruthParams, suppression: float,
              thresholds: Thresholds = Thresholds()) -> Tensor:
    """BraTS labels uint8 [X, Y, Z]: 1 necrosis, 4 enhancing, 2 other T2/FLAIR signal (tumour
    cells above the FLAIR threshold or vasogenic oedema), 0 elsewhere.

    Enhancement needs leaky vessels: leakage (s + r + damaged_leak d) times (1 - suppression),
    the share of leakage an anti-angiogenic removes. Oedema is that leakage above LEAK_ONSET,
    smoothed over ``oedema_sd_mm`` (fluid spreads from the leaky core), weighted towards white
    matter (it tracks along fibres; gray matter resists it)."""
    occ = state.occupying
    leak = (state.viable + p.damaged_leak * state.d) * (1.0 - suppression)
    source = ((leak - LEAK_ONSET) / (1.0 - LEAK_ONSET)).clamp(0.0, 1.0)
    weight = (anatomy.tissue == WHITE).to(occ.dtype) + 0.4 * (anatomy.tissue == GRAY).to(occ.dtype)
    oedema = blur(source, p.oedema_sd_mm, anatomy.grid.spacing) * weight >= thresholds.oedema
    brain = anatomy.brain
    labels = torch.zeros(occ.shape, dtype=torch.uint8)
    labels[((occ >= thresholds.flair) | oedema) & brain] = OEDEMA_LABEL
    labels[(leak >= thresholds.enhancing) & brain] = ENHANCING_LABEL
    labels[(state.n >= thresholds.necrosis) & brain] = NECROSIS_LABEL
    return labels


def cellularity_map(state: TruthState, g: torch.Generator, noise_sd: float, offset: float) -> Tensor:
    """An ADC-derived cellularity map, float32 [X, Y, Z] in [0, 1]: occupying cells plus
    Gaussian noise (sd ``noise_sd``) and a calibration ``offset`` in every voxel, clipped to
    [0, 1], so the background reads about 0.02-0.05, never exactly 0."""
    noise = noise_sd * torch.randn(state.s.shape, generator=g, dtype=torch.float64)
    return (state.occupying + offset + noise).clamp(0.0, 1.0).to(torch.float32)


def volume_ml(mask: Tensor, grid: Grid) -> float:
    return float(mask.sum()) * grid.voxel_volume_ml


@dataclass(frozen=True)
class Readout:
    """The noise-free quantities of a state (mL, tumour fraction, U/L)."""

    enhancing_ml: float
    flair_ml: float
    necrosis_ml: float
    viable_ml: float
    damaged_ml: float
    resistant_ml: float
    ctdna: float
    ldh: float


def readout(state: TruthState, anatomy: Anatomy, p: TruthParams, suppression: float,
            labels: Tensor | None = None) -> Readout:
    """What the truth is at ``state``: label volumes of the noise-free reading, viable, damaged
    and resistant burden (mL at capacity), ctDNA tumour fraction a / (1 + a) with
    a = shedding (viable + ctdna_damaged damaged), LDH = baseline + shedding (viable +
    ldh_damaged damaged). Bevacizumab changes the labels, not the blood."""
    grid = anatomy.grid
    labels = label_map(state, anatomy, p, suppression) if labels is None else labels
    voxel = grid.voxel_volume_ml
    viable = float(state.viable.sum()) * voxel
    damaged = float(state.d.sum()) * voxel
    a = p.ctdna_shedding * (viable + p.ctdna_damaged * damaged)
    return Readout(
        enhancing_ml=volume_ml(labels == ENHANCING_LABEL, grid),
        flair_ml=volume_ml(labels > 0, grid),
        necrosis_ml=volume_ml(labels == NECROSIS_LABEL, grid),
        viable_ml=viable, damaged_ml=damaged, resistant_ml=float(state.r.sum()) * voxel,
        ctdna=a / (1.0 + a),
        ldh=p.ldh_baseline + p.ldh_shedding * (viable + p.ldh_damaged * damaged),
    )


def seed_state(anatomy: Anatomy, p: TruthParams, g: torch.Generator, sd_mm: float = 2.0, peak: float = 0.6,
               margin_mm: float = 12.0) -> TruthState:
    """A small Gaussian seed (sd ``sd_mm``, peak ``peak``) centred on a white-matter voxel at
    least ``margin_mm`` inside the brain, split into sensitive and resistant cells."""
    grid, tissue = anatomy.grid, anatomy.tissue
    brain = (tissue != OUTSIDE).to(torch.float64)[None, None]
    k = [max(1, round(margin_mm / h)) for h in grid.spacing]
    deep = -F.max_pool3d(-brain, [2 * kk + 1 for kk in k], stride=1, padding=k)[0, 0] > 0.5
    candidates = torch.nonzero(deep & (tissue == WHITE))
    if len(candidates) == 0:
        candidates = torch.nonzero(tissue == WHITE)
    centre = grid.coords(dtype=torch.float64)[tuple(candidates[int(torch.randint(len(candidates), (1,), generator=g))].tolist())]
    r2 = ((grid.coords(dtype=torch.float64) - centre) ** 2).sum(-1)
    u = peak * torch.exp(-0.5 * r2 / sd_mm ** 2) * brain[0, 0]
    zero = torch.zeros_like(u)
    f = p.resistant_fraction
    return TruthState((1.0 - f) * u, f * u, zero, zero.clone(), zero.clone(), 0.0)
