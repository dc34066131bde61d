"""Log-normal priors for the tumour and shedding parameters.

The same prior draws the virtual patients' true parameters and the twins' initial ensembles,
so a twin experiment starts from a prior that is consistent with the truth generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch


@dataclass(frozen=True)
class LogNormal:
    """log X ~ N(log median, sigma²), truncated to [lower, upper] by clamping."""

    median: float
    sigma: float
    lower: float = 0.0
    upper: float = math.inf

    def sample(self, n: int, generator: torch.Generator, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        x = torch.exp(math.log(self.median) + self.sigma * z).clamp(self.lower, self.upper)
        return x.to(dtype=dtype, device=device)

    @property
    def log_median(self) -> float:
        return math.log(self.median)


def _temozolomide_decay() -> float:
    # plasma half-life of temozolomide ≈ 1.8 h
    return math.log(2.0) / (1.8 / 24.0)


@dataclass(frozen=True)
class TumorPrior:
    """Priors for one patient's parameters (reference values: high-grade glioma literature).

    D: white-matter diffusivity, mm²/day.  rho: proliferation, 1/day.  alpha: LQ radiosensitivity,
    1/Gy (alpha/beta fixed at 10 Gy).  k_chemo: kill per unit exposure, 1/(mg/m²·day).
    chemo_decay: exposure decay rate, 1/day.  marker_shedding: marker units per mL of tumour burden.
    marker_baseline: tumour-independent marker level.  ctdna_shedding: 1/mL, tumour fraction
    TF = s·B / (1 + s·B) for burden B in mL.
    """

    D: LogNormal = LogNormal(0.1, 0.35, 1e-3, 2.0)
    rho: LogNormal = LogNormal(0.05, 0.3, 1e-3, 0.5)
    alpha: LogNormal = LogNormal(0.05, 0.3, 1e-3, 0.5)
    k_chemo: LogNormal = LogNormal(2.5e-3, 0.4, 1e-5, 0.1)
    marker_shedding: LogNormal = LogNormal(3.0, 0.4, 1e-3, 1e3)
    ctdna_shedding: LogNormal = LogNormal(2e-3, 0.4, 1e-6, 1.0)
    alpha_beta: float = 10.0
    chemo_decay: float = field(default_factory=_temozolomide_decay)
    marker_baseline: float = 180.0  # LDH U/L, a typical normal level

    def sampled_names(self) -> list[str]:
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), LogNormal)]

    def sample(self, n: int, generator: torch.Generator, *, dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor]:
        """Draw n parameter sets: a dict name -> [n]. Fixed parameters are broadcast."""
        out = {name: getattr(self, name).sample(n, generator, dtype=dtype, device=device) for name in self.sampled_names()}
        for name in ("alpha_beta", "chemo_decay", "marker_baseline"):
            out[name] = torch.full((n,), float(getattr(self, name)), dtype=dtype, device=device)
        return out
