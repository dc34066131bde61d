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
