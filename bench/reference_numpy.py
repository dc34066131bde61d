"""A straightforward single-member NumPy float64 version of the explicit scheme in
``models.reaction_diffusion``: the yardstick the benchmark compares against.

Same equations and the same step sequence (flux-form forward Euler with harmonic-mean face
diffusivities, exact logistic flow in Strang half steps, stability sub-steps to 0.9 of the
limit), written the way one would without thinking about performance: plain vectorised NumPy,
one member at a time, fresh arrays per operation. No treatment (the benchmark needs none).
"""

from __future__ import annotations

import math

import numpy as np


def face_coefficients(weight: np.ndarray, spacing: tuple[float, float, float]) -> list[np.ndarray | None]:
    """Harmonic mean of neighbouring weights over h^2 on each axis's faces (1/mm^2)."""
    faces: list[np.ndarray | None] = []
    for axis, h in enumerate(spacing):
        if weight.shape[axis] < 2:
            faces.append(None)
            continue
        lo = np.take(weight, np.arange(weight.shape[axis] - 1), axis=axis)
        hi = np.take(weight, np.arange(1, weight.shape[axis]), axis=axis)
        s = lo + hi
        faces.append(np.where(s > 0, 2.0 * lo * hi / np.where(s > 0, s, 1.0), 0.0) / (h * h))
    return faces


def laplacian(u: np.ndarray, faces: list[np.ndarray | None]) -> np.ndarray:
    """div(w grad u) in flux form: each face's flux leaves one voxel and enters the other."""
    out = np.zeros_like(u)
    for axis, f in enumerate(faces):
        if f is None:
            continue
        flux = f * np.diff(u, axis=axis)
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        out[tuple(lo)] += flux
        out[tuple(hi)] -= flux
    return out


def logistic(u: np.ndarray, rho: float, tau: float) -> np.ndarray:
    e = math.exp(rho * tau)
    return u * e / (1.0 - u + u * e)


def simulate_reference(u0: np.ndarray, weight: np.ndarray, D: float, rho: float,
                       spacing: tuple[float, float, float], t0: float, t1: float,
                       dt: float) -> tuple[np.ndarray, int]:
    """One member [X, Y, Z] float64 from t0 to t1 days; returns (u, steps taken)."""
    u = np.clip(np.asarray(u0, dtype=np.float64) * (weight > 0), 0.0, 1.0)
    weight = np.asarray(weight, dtype=np.float64)
    faces = face_coefficients(weight, spacing)
    inv_h2 = sum(1.0 / (h * h) for h, n in zip(spacing, weight.shape) if n > 1)
    d_max = D * float(weight.max())
    dt_max = 1.0 / (2.0 * d_max * inv_h2) if d_max > 0 and inv_h2 > 0 else math.inf
    limit = 0.9 * dt_max if dt > dt_max else dt
    length = t1 - t0
    n = max(1, math.ceil(length / limit * (1.0 - 1e-12))) if length > 0 else 0
    h = length / n if n else 0.0
    if n:
        u = logistic(u, rho, 0.5 * h)
    for i in range(n):
        u = u + h * D * laplacian(u, faces)
        u = logistic(u, rho, 0.5 * h if i == n - 1 else h)
    return np.clip(u, 0.0, 1.0), n
