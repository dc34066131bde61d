"""Observation operators: what each kind of measurement sees of an ensemble, and its noise model.

Two halves:

* Compaction (``compact_imaging``): an imaging study becomes the few hundred voxel values the
  analysis uses, chosen from the study itself (never from the forecast), so the same study
  always yields the same observations. The compact form is what the engine journals and what a
  re-analysis replays; a full image never has to be kept.
* Operators (``density_operator`` ...): tensor functions of the ensemble u [P, N, X, Y, Z]
  (and log-shedding coefficients [P, N]) returning an ``ObsBlock``: predicted observations
  HX [P, N, m], observed values y [P, m], error variances r_var [P, m] and, for spatial
  observations, voxel locations [P, m, 3] in grid-index units for localization.

Noise models (defaults match the virtual-patient generator, models.virtual_patient):
density additive Gaussian (sd 0.05 of capacity); segmentation labels against a soft
segmentation; volume Gaussian with a relative and an absolute part; markers and ctDNA
log-normal, compared in log space.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from models.observables import VISIBLE_THRESHOLD, soft_segmentation, tumor_burden

from .observations import ImagingObservation, ObservationBase, as_tensor

__all__ = [
    "CompactImaging",
    "NoiseModel",
    "ObsBlock",
    "MapNoise",
    "VoxelSelection",
    "compact_imaging",
    "censor_block",
    "concat_blocks",
    "ctdna_operator",
    "density_operator",
    "density_sum_operator",
    "estimate_map_noise",
    "marker_operator",
    "profile_operator",
    "segmentation_operator",
    "select_voxels",
    "smooth_study",
    "volume_operator",
]


@dataclass(frozen=True)
class NoiseModel:
    """Observation-error standard deviations.

    density_sd:        additive, fraction of capacity (cellularity maps); per study, the larger
                       of this and what the study's own background shows (``estimate_map_noise``).
    density_offset:    additive bias of a cellularity map where there is no tumour (fraction of
                       capacity); per study, estimated from its background.
    segmentation_sd:   additive on 0/1 labels compared with a soft segmentation.
    volume_rel_sd, volume_abs_sd_ml: volume error sd = sqrt((rel * V)² + abs²), mL.
    marker_log_sd:     sd of log(marker value).
    ctdna_log_sd:      sd of log(tumour fraction).
    ctdna_lod:         assay limit of detection; fractions below it are reported at it, so the
                       operator censors its prediction the same way.
    profile_sd:        model-error floor of a shell-averaged density (``profile_operator``):
                       averaging n voxels shrinks the measurement error to density_sd/sqrt(n),
                       far below what the twin's imperfect field can match.
    """

    density_sd: float = 0.05
    density_offset: float = 0.0
    segmentation_sd: float = 0.25
    volume_rel_sd: float = 0.10
    volume_abs_sd_ml: float = 0.5
    marker_log_sd: float = 0.10
    ctdna_log_sd: float = 0.20
    ctdna_lod: float = 1e-4
    profile_sd: float = 0.03


@dataclass(frozen=True)
class VoxelSelection:
    """Which voxels of an image enter the analysis (m <= max_obs).

    signal_threshold: voxels where the locally smoothed study reaches it are "signal"
                      (about 4 sd of the smoothed noise of a 0.05-sd density map; for
                      segmentations 0.1, so that even a single labelled voxel counts).
                      Selection only decides where the study is compared with the ensemble,
                      so a few spurious signal voxels cost a few observations, nothing more.
    margin:           signal is dilated by this many voxels, so the rim where a forecast may
                      have grown past the visible tumour is observed as well.
    background_stride: a regular lattice of every stride-th voxel per axis inside the brain
                      observes the rest (where a forecast may have spread and the study says
                      there is nothing).
    max_obs:          cap on m; signal voxels are kept first, each part thinned evenly.
    """

    signal_threshold: float = 0.05
    margin: int = 1
    background_stride: int = 3
    max_obs: int = 1024


@dataclass(frozen=True, kw_only=True)
class CompactImaging(ObservationBase):
    """An imaging study as the analysis uses it (and as the journal keeps it).

    channel:  "density" | "segmentation" | "volume".
    shape:    the study grid (X, Y, Z); spacing_mm its voxel size.
    index:    [m] int64 flat voxel indices (C order) for density/segmentation, else None.
    values:   [m] float32 observed values at ``index``, else None.
    tumor_volume_ml: the visible volume, measured upstream or counted on the study.
    noise_sd, noise_offset: for a density map, the noise its own background shows
              (``estimate_map_noise``; fraction of capacity); None where not estimated (journals
              written before the estimate existed), which means the configured noise model.
    """

    channel: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    index: Tensor | None = None
    values: Tensor | None = None
    tumor_volume_ml: float | None = None
    noise_sd: float | None = None
    noise_offset: float = 0.0

    def noise_model(self, noise: NoiseModel) -> NoiseModel:
        """``noise`` with this study's density noise: the configured sd is a floor (a study
        never claims to be more precise than the model can be matched to)."""
        if self.noise_sd is None:
            return noise
        return replace(noise, density_sd=max(noise.density_sd, float(self.noise_sd)),
                       density_offset=float(self.noise_offset))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.channel not in ("density", "segmentation", "volume"):
            raise ValueError(f"unknown imaging channel {self.channel!r}")
        if self.channel == "volume" and self.tumor_volume_ml is None:
            raise ValueError("a volume observation needs tumor_volume_ml")
        if self.channel != "volume" and (self.index is None or self.values is None):
            raise ValueError(f"a {self.channel} observation needs index and values")


@dataclass(frozen=True)
class ObsBlock:
    """Predicted and observed values of one group of observations.

    HX [P, N, m]; y [P, m]; r_var [P, m] error variances; locations [P, m, 3] voxel indices
    (float, grid-index units) for spatial observations, None otherwise.
    """

    HX: Tensor
    y: Tensor
    r_var: Tensor
    locations: Tensor | None = None

    @property
    def m(self) -> int:
        return int(self.y.shape[-1])


def select_voxels(values: Tensor, brain: Tensor, selection: VoxelSelection) -> Tensor:
    """Flat indices [m] (sorted, int64) of the voxels of ``values`` [X, Y, Z] to observe.

    Depends only on the study and the brain mask ``brain`` [X, Y, Z] bool: signal voxels
    dilated by ``margin`` plus a strided background lattice, all inside the brain, thinned
    evenly to at most ``max_obs`` with signal first.
    """
    brain = brain.to(torch.bool)
    signal = (smooth_study(values, brain) >= selection.signal_threshold) & brain
    if selection.margin > 0 and bool(signal.any()):
        k = 2 * selection.margin + 1
        near = F.max_pool3d(signal[None, None].to(torch.float32), kernel_size=k, stride=1, padding=selection.margin)
        region = (near[0, 0] > 0.5) & brain
    else:
        region = signal
    s = max(1, int(selection.background_stride))
    lattice = torch.zeros_like(brain)
    lattice[::s, ::s, ::s] = True
    background = lattice & brain & ~region
    first = _thin(torch.nonzero(region.flatten()).squeeze(-1), selection.max_obs)
    rest = _thin(torch.nonzero(background.flatten()).squeeze(-1), selection.max_obs - first.numel())
    return torch.sort(torch.cat([first, rest])).values


@dataclass(frozen=True)
class MapNoise:
    """The noise of a cellularity map where it shows no tumour: the map reads
    clamp(offset + sd·z, 0, 1) there (z standard normal), fractions of capacity."""

    offset: float
    sd: float


# Quantiles of the background used by ``estimate_map_noise``, as fractions of the part of the
# background above the clamp at 0: low enough to stay clear of the few tumour voxels a margin
# may miss, far enough apart to resolve the spread.
_NOISE_QUANTILES = (0.3, 0.8)


def estimate_map_noise(values: Tensor, brain: Tensor, mask: Tensor | None = None, *,
                       threshold_sd: float = 1.0, iterations: int = 3, min_voxels: int = 200) -> MapNoise | None:
    """The offset and sd of a density map's noise, read off its own background.

    Real cellularity maps (ADC-derived) carry noise everywhere, and its level differs between
    scanners, protocols and studies; a fixed noise model that is too small reads the noise
    floor as tumour burden (tens of mL over a brain). The background is the brain minus the
    tumour: minus ``mask`` [X, Y, Z] (a segmentation, dilated by two voxels) when given, and
    minus the voxels where the smoothed map exceeds the background's mean by ``threshold_sd``
    noise sd (dilated likewise), found by a few fixed-point iterations from the whole brain.

    With the map clamped at 0, x = clamp(b + σz, 0, 1) has the quantile b + σ Φ⁻¹(q) for every q
    above the clamped fraction, so two such quantiles give σ and b whatever the share of zeros
    (an unclamped map works the same way). ``values``, ``brain`` [X, Y, Z]. Returns None when
    fewer than ``min_voxels`` background voxels remain or the background is all zeros (a
    noise-free map: the configured model applies).
    """
    x = values.to(torch.float64)
    brain = brain.to(torch.bool)

    def dilate(m: Tensor) -> Tensor:
        return F.max_pool3d(m[None, None].to(torch.float32), 5, stride=1, padding=2)[0, 0] > 0.5

    marked = dilate(mask.to(device=x.device) > 0.5) if mask is not None else torch.zeros_like(brain)
    tumour = marked
    estimate: MapNoise | None = None
    for _ in range(max(1, iterations)):
        background = x[brain & ~tumour]
        if background.numel() < min_voxels:
            return estimate
        p0 = float((background <= 0.0).to(torch.float64).mean())
        if p0 >= 0.98:
            return None
        qs = torch.tensor([p0 + (1.0 - p0) * q for q in _NOISE_QUANTILES], dtype=torch.float64)
        lo, hi = torch.quantile(background, qs.to(background.device)).tolist()
        zlo, zhi = (float(torch.special.ndtri(q)) for q in qs)
        sd = (hi - lo) / (zhi - zlo)
        if not sd > 0.0:
            return None
        estimate = MapNoise(offset=lo - sd * zlo, sd=sd)
        # Where the smoothed map stands out of the background: smoothing shrinks the noise
        # about fourfold (the 3-D binomial kernel's L2 norm is 0.23), so one sd above the
        # background's mean is ~4 smoothed sd.
        signal = smooth_study(values, brain).to(torch.float64) >= float(background.mean()) + threshold_sd * sd
        # A segmentation misses the infiltrative tail that the map may still show.
        tumour = marked | dilate(signal & brain)
    return estimate


def smooth_study(values: Tensor, brain: Tensor) -> Tensor:
    """Binomial [1, 2, 1]/4 smoothing per axis of a study [X, Y, Z] inside the brain: the voxel
    noise of a density map drops about fourfold while a tumour of a few voxels keeps most of its
    contrast, so a threshold on the smoothed map finds the tumour without picking up noise.
    Outside-brain neighbours count as zeros (no renormalization): renormalizing would average
    fewer voxels at the brain's edge and let the noise there cross the threshold."""
    k1 = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float32, device=values.device)
    kernel = (k1[:, None, None] * k1[None, :, None] * k1[None, None, :])[None, None]
    m = brain.to(torch.float32)
    return F.conv3d((values.to(torch.float32) * m)[None, None], kernel, padding=1)[0, 0] * m


def _thin(index: Tensor, cap: int) -> Tensor:
    """At most ``cap`` entries of a sorted index, evenly spaced (deterministic)."""
    if cap <= 0:
        return index[:0]
    if index.numel() <= cap:
        return index
    pick = torch.linspace(0, index.numel() - 1, cap, dtype=torch.float64, device=index.device).round().long()
    return index[pick]


def clamped_mean(noise: NoiseModel) -> float:
    """E[clamp(b + e, 0, 1)] for e ~ N(0, sd²): what a map shows where there is no tumour."""
    m = torch.tensor(float(noise.density_offset), dtype=torch.float64)
    if noise.density_sd <= 0:
        return float(m.clamp(0.0, 1.0))
    return float(_positive_part_mean(m, noise.density_sd) - _positive_part_mean(m - 1.0, noise.density_sd))


def compact_imaging(obs: ImagingObservation, brain: Tensor,
                    selection: VoxelSelection = VoxelSelection(), noise: NoiseModel = NoiseModel()) -> CompactImaging:
    """The analysis form of a study: a density map if present, else a segmentation, else the
    measured volume. One channel only: the segmentation and the volume are derived from the same
    image as the density map, so using them as well would count one measurement several times.
    ``brain`` [X, Y, Z] bool: the twin's tissue mask (the study must be on the twin's grid).

    A density map's noise is estimated from its own background (``estimate_map_noise``, the
    segmentation marking the tumour when the study has one) and kept with it; where it is
    noisier or biased against ``noise``, the signal threshold of the voxel selection moves with
    the background's mean and spread, so the noise floor is not selected as tumour.
    """
    shape = obs.shape or tuple(int(n) for n in brain.shape)
    if tuple(shape) != tuple(brain.shape):
        raise ValueError(f"study grid {shape} differs from the twin's {tuple(brain.shape)}")
    voxel_ml = math.prod(float(h) for h in obs.spacing_mm) / 1000.0
    common: dict = dict(event_id=obs.event_id, patient_id=obs.patient_id, time=obs.time, recorded_at=obs.recorded_at,
                        spacing_mm=tuple(float(h) for h in obs.spacing_mm), tumor_volume_ml=obs.tumor_volume_ml)
    if obs.segmentation is not None and common["tumor_volume_ml"] is None:
        # The visible volume the study shows, for the parameter stage of the analysis.
        common["tumor_volume_ml"] = float((as_tensor(obs.segmentation) > 0.5).sum()) * voxel_ml
    for channel, payload in (("density", obs.density), ("segmentation", obs.segmentation)):
        if payload is None:
            continue
        values = as_tensor(payload).to(device=brain.device, dtype=torch.float32)
        threshold = 0.1
        if channel == "density":
            mask = as_tensor(obs.segmentation).to(brain.device) if obs.segmentation is not None else None
            found = estimate_map_noise(values, brain, mask)
            if found is not None:
                common.update(noise_sd=float(found.sd), noise_offset=float(found.offset))
            threshold = _signal_threshold(selection.signal_threshold, noise, found)
            if common["tumor_volume_ml"] is None:
                # Counted where the map stands out of its noise only: over a whole brain a
                # noise floor crosses the visibility threshold in thousands of voxels.
                shows = (values - common.get("noise_offset", 0.0) >= VISIBLE_THRESHOLD) & brain
                near = F.max_pool3d((smooth_study(values, brain) >= threshold)[None, None].to(torch.float32),
                                    3, stride=1, padding=1)[0, 0] > 0.5
                common["tumor_volume_ml"] = float((shows & near).sum()) * voxel_ml
        sel = VoxelSelection(threshold, selection.margin, selection.background_stride, selection.max_obs)
        index = select_voxels(values, brain, sel)
        return CompactImaging(channel=channel, shape=tuple(shape), index=index.cpu(),
                              values=values.flatten()[index].cpu(), **common)
    return CompactImaging(channel="volume", shape=tuple(shape), **common)


def _signal_threshold(configured: float, noise: NoiseModel, found: MapNoise | None) -> float:
    """The selection threshold for a map whose noise is ``found``: ``configured`` is set for the
    configured ``noise``; a noisier or offset background moves it by the change of the
    background's mean plus the threshold's margin above that mean scaled by the sd."""
    if found is None:
        return configured
    study = replace(noise, density_sd=max(noise.density_sd, found.sd), density_offset=found.offset)
    base = clamped_mean(noise)
    scale = study.density_sd / noise.density_sd if noise.density_sd > 0 else 1.0
    return clamped_mean(study) + (configured - base) * scale


def _locations(index: Tensor, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Flat C-order indices [..., m] -> voxel coordinates [..., m, 3] in grid-index units."""
    _, Y, Z = shape
    i = torch.div(index, Y * Z, rounding_mode="floor")
    j = torch.div(index % (Y * Z), Z, rounding_mode="floor")
    k = index % Z
    return torch.stack([i, j, k], dim=-1).to(dtype)


def _gather(field: Tensor, index: Tensor) -> Tensor:
    """field [P, N, X, Y, Z], index [P, m] -> [P, N, m]."""
    P, N = field.shape[:2]
    flat = field.reshape(P, N, -1)
    return torch.gather(flat, 2, index[:, None, :].expand(P, N, index.shape[-1]))


def _positive_part_mean(m: Tensor, sd: float) -> Tensor:
    """E[max(0, m + e)] for e ~ N(0, sd²): m Φ(m/sd) + sd φ(m/sd)."""
    z = m / sd
    return m * torch.special.ndtr(z) + sd * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def density_operator(u: Tensor, index: Tensor, values: Tensor, noise: NoiseModel = NoiseModel()) -> ObsBlock:
    """Voxel densities at ``index`` [P, m] (flat voxel indices), y = ``values`` [P, m].

    A cellularity map is reported in [0, 1], i.e. the measurement is clamp(u + e, 0, 1) with
    e ~ N(0, sd²). Its mean is not u: where there is no tumour the map still averages
    sd/sqrt(2π) (0.02 for sd 0.05), and hundreds of such background voxels compared with
    HX = u would read as tumour everywhere and drive the diffusivity up. So HX is the exact
    mean of the clamped measurement, E[clamp(u + e, 0, 1)] = g(u) - g(u - 1) with
    g(m) = E[max(0, m + e)]; r = sd² (an upper bound of the clamped variance). A map with a
    background offset b (``noise.density_offset``) reads clamp(u + b + e, 0, 1).
    """
    index = index.to(u.device)
    y = values.to(device=u.device, dtype=u.dtype)
    r = torch.full_like(y, noise.density_sd ** 2)
    x = _gather(u, index) + noise.density_offset
    sd = noise.density_sd
    hx = _positive_part_mean(x, sd) - _positive_part_mean(x - 1.0, sd) if sd > 0 else x.clamp(0.0, 1.0)
    return ObsBlock(hx, y, r, _locations(index, u.shape[2:], u.dtype))


def density_sum_operator(u: Tensor, index: Tensor, values: Tensor, voxel_ml: float,
                         noise: NoiseModel = NoiseModel()) -> ObsBlock:
    """The tumour burden a density map shows over its selected voxels, in mL: y = Σ values · dV,
    HX = Σ E[clamp(u + e, 0, 1)] · dV over ``index`` [P, m], r = m (sd · dV)² (independent voxel
    errors). One number per study that summarizes its voxels for the parameters. m = 1."""
    block = density_operator(u, index, values, noise)
    n = block.y.shape[-1]
    y = block.y.sum(-1, keepdim=True) * voxel_ml
    r = torch.full_like(y, n * (noise.density_sd * voxel_ml) ** 2)
    return ObsBlock(block.HX.sum(-1, keepdim=True) * voxel_ml, y, r)


def shell_weights(index: Tensor, values: Tensor, shape: Sequence[int], spacing_mm: Sequence[float],
                  n_shells: int, width_mm: float, noise_sd: float) -> Tensor:
    """Shell-averaging weights [P, n_shells, m] of the voxels ``index`` [P, m] of a study.

    Shell k holds the voxels whose distance (mm) from the study's centre lies in
    [k, k + 1) · ``width_mm``; the centre is the centroid of the study's values of at least
    2 ``noise_sd`` (``values`` [P, m]), so background noise does not pull it. Each row sums to 1
    over its voxels (0 for an empty shell). Depends on the study only, like the voxel selection.
    """
    loc = _locations(index, shape, torch.float64) * torch.tensor(spacing_mm, dtype=torch.float64, device=index.device)
    w = values.to(torch.float64) * (values >= 2.0 * noise_sd)
    w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
    centre = (w[..., None] * loc).sum(-2) / w.sum(-1)[..., None]  # [P, 3]
    shell = ((loc - centre[:, None, :]).norm(dim=-1) / width_mm).floor().long()  # [P, m]
    onehot = (shell[:, None, :] == torch.arange(n_shells, device=index.device)[None, :, None]).to(torch.float64)
    return onehot / onehot.sum(-1, keepdim=True).clamp_min(1.0)


def profile_operator(u: Tensor, index: Tensor, values: Tensor, spacing_mm: Sequence[float],
                     noise: NoiseModel = NoiseModel(), n_shells: int = 8, width_mm: float | None = None) -> ObsBlock:
    """The radial density profile a study shows: mean density over spherical shells around its
    centre (``shell_weights``, width one voxel edge by default), m = ``n_shells``.

    Why: the shape of the infiltrative edge carries what the visible volume and the burden do
    not. For a travelling front the distance between the T1-Gd core (u ~ 0.8) and the T2/FLAIR
    edge (u ~ 0.16) scales with sqrt(D/rho) while its speed scales with sqrt(D rho) (Swanson's
    two radii); a profile resolved over a few voxels holds both, and so D and rho apart. Linear
    in the voxel values: y = W values, HX = W E[clamp(u + e, 0, 1)] (as ``density_operator``),
    r = density_sd² / n_k + profile_sd². Empty shells get y = HX = 0 and r = 1e6 (no weight).
    u [P, N, X, Y, Z]; index, values [P, m] as in ``density_operator``.
    """
    block = density_operator(u, index, values, noise)
    W = shell_weights(index.to(u.device), values.to(u.device), u.shape[2:], spacing_mm, n_shells,
                      width_mm or float(min(spacing_mm)), noise.density_sd).to(u.dtype)
    count = (W > 0).sum(-1).to(u.dtype)  # [P, K]
    hx = torch.einsum("pkm,pnm->pnk", W, block.HX)
    y = torch.einsum("pkm,pm->pk", W, block.y)
    r = noise.density_sd ** 2 / count.clamp_min(1.0) + noise.profile_sd ** 2
    r = torch.where(count > 0, r, torch.full_like(r, 1e6))
    return ObsBlock(hx, y, r)


def segmentation_operator(u: Tensor, index: Tensor, labels: Tensor, noise: NoiseModel = NoiseModel(),
                          threshold: float = VISIBLE_THRESHOLD) -> ObsBlock:
    """Segmentation labels: HX = soft_segmentation(u) at ``index`` [P, m], y = labels in {0, 1}."""
    index = index.to(u.device)
    y = labels.to(device=u.device, dtype=u.dtype)
    r = torch.full_like(y, noise.segmentation_sd ** 2)
    return ObsBlock(_gather(soft_segmentation(u, threshold), index), y, r, _locations(index, u.shape[2:], u.dtype))


def volume_operator(u: Tensor, volume_ml: Tensor, voxel_ml: float, noise: NoiseModel = NoiseModel(),
                    threshold: float = VISIBLE_THRESHOLD) -> ObsBlock:
    """Visible volume in mL: HX = Σ s(u) · dV with a soft segmentation s (differentiable in u,
    unlike the hard count), y = ``volume_ml`` [P]. Returns m = 1.

    The sigmoid of ``soft_segmentation`` is 0.005 at u = 0, which summed over a whole brain of
    empty voxels would claim most of a millilitre of tumour; s is shifted and rescaled so that
    s(0) = 0 exactly (and s → 1 well above the threshold)."""
    P, N = u.shape[:2]
    s0 = soft_segmentation(torch.zeros((), dtype=u.dtype, device=u.device), threshold)
    s = (soft_segmentation(u, threshold) - s0) / (1.0 - s0)
    hx = s.reshape(P, N, -1).sum(-1) * voxel_ml
    y = volume_ml.to(device=u.device, dtype=u.dtype).reshape(P, 1)
    r = (noise.volume_rel_sd * y) ** 2 + noise.volume_abs_sd_ml ** 2
    return ObsBlock(hx[..., None], y, r)


def _burden(u: Tensor, voxel_ml: float) -> Tensor:
    P, N = u.shape[:2]
    return tumor_burden(u.reshape(P * N, *u.shape[2:]), voxel_ml).reshape(P, N)


def marker_operator(u: Tensor, log_shedding: Tensor, value: Tensor, baseline: float | Tensor, voxel_ml: float,
                    noise: NoiseModel = NoiseModel()) -> ObsBlock:
    """Serum marker in log space: HX = log(baseline + s · burden), s = exp(log_shedding) [P, N]
    (marker units per mL), burden in mL; y = log(value) [P]. Log-normal noise. m = 1."""
    burden = _burden(u, voxel_ml)
    level = torch.as_tensor(baseline, dtype=u.dtype, device=u.device) + log_shedding.to(u.dtype).exp() * burden
    y = value.to(device=u.device, dtype=u.dtype).reshape(-1, 1).log()
    return ObsBlock(level.log()[..., None], y, torch.full_like(y, noise.marker_log_sd ** 2))


def ctdna_operator(u: Tensor, log_shedding: Tensor, tumor_fraction: Tensor, voxel_ml: float,
                   noise: NoiseModel = NoiseModel()) -> ObsBlock:
    """ctDNA tumour fraction in log space: TF = sB / (1 + sB), s = exp(log_shedding) [P, N] in
    1/mL, B the burden in mL; HX = log(max(TF, lod)), y = log(max(value, lod)) [P]. m = 1.

    log TF = log(sB) - log1p(sB) is evaluated in that form so that tiny burdens do not round to
    log 0 before the censoring at the limit of detection.
    """
    burden = _burden(u, voxel_ml).clamp_min(torch.finfo(u.dtype).tiny)
    log_sb = log_shedding.to(u.dtype) + burden.log()
    log_tf = log_sb - torch.log1p(log_sb.exp())
    lod = math.log(noise.ctdna_lod)
    y = tumor_fraction.to(device=u.device, dtype=u.dtype).reshape(-1, 1).clamp_min(noise.ctdna_lod).log()
    return ObsBlock(log_tf.clamp_min(lod)[..., None], y, torch.full_like(y, noise.ctdna_log_sd ** 2))


def censor_block(block: ObsBlock, below: bool, max_r: float = 1e6) -> ObsBlock:
    """A censored scalar (m = 1) as the Gaussian pseudo-observation that gives the exact first
    two moments of the censored posterior.

    The observation says only that Y = X + e lies below (``below``) or above its limit L =
    ``block.y``. With the members' prediction X ~ N(μ, S) (their mean and variance of HX) and
    e ~ N(0, r), the posterior of X given Y < L has (Tobin's truncated moments, α = (L − μ)/√(S + r),
    λ = φ(α)/Φ(α)) mean μ − S λ/√(S + r) and variance S − S² λ (α + λ)/(S + r). A Kalman update
    with y*, r* reproduces both when r* = S v/(S − v) and y* = μ + (m − μ)(S + r*)/S. A
    prediction well inside the censored side gives λ → 0, r* → ∞: no information, as it should;
    one on the wrong side is pulled across. ``block``: HX [P, N, 1], y [P, 1] (the limit), r_var."""
    hx = block.HX.to(torch.float64)
    mu, S = hx.mean(1), hx.var(1, unbiased=True).clamp_min(0.0)  # [P, 1]
    r = block.r_var.to(torch.float64)
    L = block.y.to(torch.float64)
    sign = 1.0 if below else -1.0  # above: the same on -X
    tot = (S + r).sqrt()
    alpha = sign * (L - mu) / tot
    lam = torch.exp(-0.5 * alpha ** 2) / math.sqrt(2 * math.pi) / torch.special.ndtr(alpha).clamp_min(1e-300)
    m = mu - sign * S * lam / tot
    v = (S - S ** 2 * lam * (alpha + lam) / (S + r)).clamp_min(0.0)
    informative = (S > 1e-12) & (S - v > 1e-9 * S)
    r_star = torch.where(informative, S * v / (S - v).clamp_min(1e-300), torch.full_like(S, max_r)).clamp(max=max_r)
    y_star = torch.where(informative, mu + (m - mu) * (S + r_star) / S.clamp_min(1e-300), mu)
    return ObsBlock(block.HX, y_star.to(block.y.dtype), r_star.to(block.r_var.dtype), block.locations)


def concat_blocks(blocks: Sequence[ObsBlock]) -> ObsBlock:
    """One block from several along m. Locations: spatial blocks keep theirs; non-spatial ones
    get NaN (a localized filter must treat them as global), and None if no block is spatial."""
    if not blocks:
        raise ValueError("no observations")
    HX = torch.cat([b.HX for b in blocks], dim=-1)
    y = torch.cat([b.y for b in blocks], dim=-1)
    r = torch.cat([b.r_var for b in blocks], dim=-1)
    if all(b.locations is None for b in blocks):
        return ObsBlock(HX, y, r)
    locs = [b.locations if b.locations is not None
            else torch.full((*b.y.shape, 3), math.nan, dtype=y.dtype, device=y.device) for b in blocks]
    return ObsBlock(HX, y, r, torch.cat(locs, dim=-2))
