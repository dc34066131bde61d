"""Lorenz-96: the textbook chaotic test bed for ensemble data assimilation.

    dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F,   indices periodic.

With 40 variables and F = 8 it has about 13 positive Lyapunov exponents, which is why a global
square-root filter needs more than ~14 members while a localized one does with fewer. Both
functions act on the last axis and broadcast over any leading axes ([..., n], e.g. [P, N, n]).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["l96_tendency", "l96_rk4_step"]


def l96_tendency(x: Tensor, F: float = 8.0) -> Tensor:
    """dx/dt of Lorenz-96 for states ``x`` [..., n] (n >= 4); returns [..., n]."""
    if x.shape[-1] < 4:
        raise ValueError(f"Lorenz-96 needs at least 4 variables, got {x.shape[-1]}")
    return (torch.roll(x, -1, -1) - torch.roll(x, 2, -1)) * torch.roll(x, 1, -1) - x + F


def l96_rk4_step(x: Tensor, dt: float = 0.05, F: float = 8.0) -> Tensor:
    """One classical Runge-Kutta-4 step of length ``dt``; ``x`` [..., n] -> [..., n]."""
    k1 = l96_tendency(x, F)
    k2 = l96_tendency(x + 0.5 * dt * k1, F)
    k3 = l96_tendency(x + 0.5 * dt * k2, F)
    k4 = l96_tendency(x + dt * k3, F)
    return x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
