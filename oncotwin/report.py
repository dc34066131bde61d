"""Figures and tables of a virtual cohort: what a person looks at after `oncotwin demo`."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from models.virtual_patient import VirtualPatient  # noqa: E402

SUMMARY_COLUMNS = [
    "patient",
    "D_mm2_per_day",
    "rho_per_day",
    "alpha_per_gy",
    "rt_fractions",
    "chemo_doses",
    "mri",
    "labs",
    "ctdna",
    "volume_day0_ml",
    "volume_end_rt_ml",
    "volume_nadir_ml",
    "volume_last_obs_ml",
    "volume_end_ml",
]


def summary_rows(patients: list[VirtualPatient]) -> list[dict]:
    rows = []
    for p in patients:
        vol = p.truth_volume_ml.numpy()
        days = p.truth_times.numpy()
        rt = [e for e in p.treatments if e.kind == "radiotherapy"]
        end_rt = int(np.searchsorted(days, rt[-1].t)) if rt else 0
        last_obs = int(np.searchsorted(days, p.config.observe_days))
        kinds = [o.kind for o in p.observations]
        rows.append(
            {
                "patient": p.pseudonym,
                "D_mm2_per_day": round(p.params["D"], 4),
                "rho_per_day": round(p.params["rho"], 4),
                "alpha_per_gy": round(p.params["alpha"], 4),
                "rt_fractions": len(rt),
                "chemo_doses": sum(e.kind == "chemotherapy" for e in p.treatments),
                "mri": kinds.count("imaging"),
                "labs": kinds.count("lab"),
                "ctdna": kinds.count("ctdna"),
                "volume_day0_ml": round(float(vol[0]), 2),
                "volume_end_rt_ml": round(float(vol[min(end_rt, len(vol) - 1)]), 2),
                "volume_nadir_ml": round(float(vol.min()), 2),
                "volume_last_obs_ml": round(float(vol[min(last_obs, len(vol) - 1)]), 2),
                "volume_end_ml": round(float(vol[-1]), 2),
            }
        )
    return rows


def write_summary(rows: list[dict], folder: Path) -> Path:
    path = Path(folder) / "summary.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _shade_treatments(ax, p: VirtualPatient) -> None:
    rt = [e.t for e in p.treatments if e.kind == "radiotherapy"]
    if rt:
        ax.axvspan(min(rt), max(rt), color="tab:orange", alpha=0.15, lw=0, label="radiotherapy")
    chemo = [e.t for e in p.treatments if e.kind == "chemotherapy" and (not rt or e.t > max(rt))]
    for t in chemo:
        ax.axvline(t, color="tab:purple", alpha=0.08, lw=1)
    ax.axvline(p.config.observe_days, color="k", ls=":", lw=1)


def plot_trajectories(p: VirtualPatient, path: Path) -> Path:
    """Truth (lines) and noisy observations (dots) of volume, marker and ctDNA over time."""
    days = p.truth_times.numpy()
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    obs = {k: [o for o in p.observations if o.kind == k] for k in ("imaging", "lab", "ctdna")}
    panels = [
        (axes[0], p.truth_volume_ml.numpy(), obs["imaging"], "visible tumour volume (mL)"),
        (axes[1], p.truth_marker.numpy(), obs["lab"], f"LOINC {p.config.marker[0]} ({p.config.marker[1]})"),
        (axes[2], p.truth_ctdna.numpy(), obs["ctdna"], "ctDNA tumour fraction"),
    ]
    for ax, truth, points, label in panels:
        _shade_treatments(ax, p)
        ax.plot(days, truth, color="tab:blue", label="truth")
        ax.plot([o.t for o in points], [o.value for o in points], "o", color="tab:red", ms=4, label="observed")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(loc="upper left", fontsize=8)
    axes[2].set_xlabel("days since day 0 (dotted: end of observations)")
    fig.suptitle(f"{p.pseudonym}: D={p.params['D']:.3f} mm²/day, ρ={p.params['rho']:.3f} /day, α={p.params['alpha']:.3f} /Gy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_maps(p: VirtualPatient, path: Path, n_times: int = 5) -> Path:
    """Axial slices through the tumour's initial centre: anatomy with density at a few days."""
    u0 = p.u0.numpy()
    z = int(np.unravel_index(np.argmax(u0), u0.shape)[2])
    days = sorted(p.truth_fields)
    picks = [days[int(round(i))] for i in np.linspace(0, len(days) - 1, n_times)]
    tissue = p.tissue.numpy()[:, :, z].T
    fig, axes = plt.subplots(1, n_times, figsize=(3 * n_times, 3.2))
    for ax, day in zip(axes, picks):
        ax.imshow(tissue, cmap="gray", origin="lower", vmin=0, vmax=2)
        u = p.truth_fields[day].numpy()[:, :, z].T
        ax.imshow(np.ma.masked_less(u, 0.01), cmap="inferno", origin="lower", vmin=0, vmax=1, alpha=0.8)
        ax.set_title(f"day {day:.0f}")
        ax.axis("off")
    fig.suptitle(f"{p.pseudonym}: tumour density over anatomy (slice z={z})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_forecast(p: VirtualPatient, fc, path: Path) -> Path:
    """Volume truth and observations with the final forecast's median and 95 % band."""
    from stream.virtual_feed import day0_of

    days = p.truth_times.numpy()
    start = (fc.issued_for - day0_of(p)).total_seconds() / 86400.0
    fig, ax = plt.subplots(figsize=(8, 4))
    _shade_treatments(ax, p)
    ax.plot(days, p.truth_volume_ml.numpy(), color="tab:blue", label="truth")
    mri = [o for o in p.observations if o.kind == "imaging"]
    ax.plot([o.t for o in mri], [o.value for o in mri], "o", color="tab:red", ms=4, label="MRI volume")
    t = np.array([start, *(start + h for h in fc.horizons_days)])
    q = fc.volume_ml[0].cpu().numpy()  # [H, 3]
    now = float(np.interp(start, days, p.truth_volume_ml.numpy()))
    lo = np.array([now, *q[:, 0]])
    mid = np.array([now, *q[:, 1]])
    hi = np.array([now, *q[:, 2]])
    ax.fill_between(t, lo, hi, color="tab:green", alpha=0.25, label="forecast 95 % interval")
    ax.plot(t, mid, "s-", color="tab:green", ms=4, label="forecast median")
    ax.set_xlabel("days since day 0")
    ax.set_ylabel("visible tumour volume (mL)")
    ax.set_title(f"{p.pseudonym}: forecast from day {start:.0f} ({fc.n_members} members)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_forecast_maps(p: VirtualPatient, fc, path: Path) -> Path:
    """P(visible) at each horizon over the anatomy (slice through the forecast's mass), with the
    true visible region's outline."""
    from models import VISIBLE_THRESHOLD
    from stream.virtual_feed import day0_of

    start = (fc.issued_for - day0_of(p)).total_seconds() / 86400.0
    prob = fc.prob_visible[0].cpu().numpy()  # [H, X, Y, Z]
    weight = prob.sum(axis=(0, 1, 2))
    z = int(np.argmax(weight)) if weight.any() else prob.shape[-1] // 2
    tissue = p.tissue.numpy()[:, :, z].T
    n = len(fc.horizons_days)
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.3))
    for ax, h, days in zip(np.atleast_1d(axes), range(n), fc.horizons_days):
        ax.imshow(tissue, cmap="gray", origin="lower", vmin=0, vmax=2)
        ax.imshow(np.ma.masked_less(prob[h][:, :, z].T, 0.02), cmap="viridis", origin="lower", vmin=0, vmax=1, alpha=0.85)
        truth = p.field_at(start + days).numpy()[:, :, z].T >= VISIBLE_THRESHOLD
        if truth.any():
            ax.contour(truth.astype(float), levels=[0.5], colors="red", linewidths=1)
        ax.set_title(f"+{days:g} d")
        ax.axis("off")
    fig.suptitle(f"{p.pseudonym}: P(visible tumour) forecast (red: truth), slice z={z}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
