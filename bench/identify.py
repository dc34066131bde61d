"""Parameter identifiability benchmark: the twin experiment of tests/twin over several seeds.

    python -m bench.identify [--seeds 7 8 9] [--patients 3] [--members 16] [--design presenting|ci16]
                             [--grid X H] [--trace]
    python -m bench.identify --oracle [--draws 256] [--oracle-init present|twin|truth] ...

Designs. ``presenting`` (default; the design of tests/twin/test_twin_experiment.py, see
assimilation.experiment): 32³ voxels of 2.5 mm, tumours grown untreated from a small seed to
5-15 mL visible before the diagnostic study, and a twin that grows its members to that study
and analyses its radial profile (``assimilation.twin.present``). ``ci16``: the earlier CI
design (16³ voxels of 5 mm, a seeded blob at day 0, no presentation), where D is not learnt.
``--grid X H`` puts either on X³ voxels of H mm.

Per seed: virtual patients, 200 days observed, each assimilated by an N-member twin with the
ETKF (voxel stage localized); reports the mean |log error| of D and rho of the prior draws and
of the assimilated ensemble mean, their ratios, the 90-day visible-volume forecast error
(assimilated and blind: the prior twin given only its treatments) and the wall time per
analysis (the ``_analyse`` calls alone, and the whole assimilation divided by its analyses).
``--trace`` prints, per analysis, the ensemble-mean log D and log rho errors and the log D sd.

``--oracle`` replaces the twin by near-ideal Bayes: adaptive importance sampling (``--draws``
per round, 4 rounds) of the six log-parameters from the twin's prior against every observation
of the study period (all brain voxels of the MRIs with the generator's exact clamped-Gaussian
likelihood, the LDH and ctDNA values with their log-normal noise and the assay's censoring).
The forward model starts from ``present``: a seed at the first study's densest part grown
untreated to its visible volume by each draw (as the presenting twin does; every study is data); ``twin``:
the denoised first study plus the mean sub-visible tail, as ``init_twin`` builds it without
presentation (the later studies are data; its fixed initial field makes the likelihood
misspecified, so treat it with care); ``truth``: the true day-0 field (an upper bound on what any
twin could learn). It reports the same error ratios for the weighted posterior mean, the
effective sample size of the last round and the posterior sd of log D. Thousands of voxels make
the likelihood so sharp that the sample size is often a few draws: the posterior mean is then
close to the best draw, the "ratio" a noisy figure, and a posterior sd far below the prior's
(0.35) the firmer sign that the data hold information on D.

Prints a table, then as its last line one JSON object {"bench": "identify", ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import numpy as np
import torch

import assimilation.twin as twin_mod
from assimilation.experiment import PRESENTING_COHORT, PRESENTING_TWIN
from assimilation.filters.etkf import ETKF
from assimilation.forecast import forecast
from assimilation.observations import ImagingObservation, TreatmentEvent
from assimilation.twin import PARAM_NAMES, advance, assimilate, init_twin
from assimilation.virtual import typed_observations
from models.grid import Grid
from models.virtual_patient import CohortConfig, generate_patient

DAY0 = datetime(2025, 3, 3, tzinfo=timezone(timedelta(hours=1)))
NAMESPACE = uuid.UUID("0b7b7f0e-3c1a-4d51-9d8e-6f2b8f1c2a11")
COHORT = CohortConfig(grid=Grid((16, 16, 16), (5.0, 5.0, 5.0)), observe_days=200.0, truth_margin_days=100.0)
GROWTH = [PARAM_NAMES.index("D"), PARAM_NAMES.index("rho")]


class _Timer:
    """Wraps ``assimilation.twin._analyse`` to time it (and optionally trace log D)."""

    def __init__(self, trace: bool, truth: list[float] | None = None):
        self.seconds = 0.0
        self.calls = 0
        self.trace = trace
        self.truth = truth
        self._inner = twin_mod._analyse

    def __call__(self, twin, items, analyser, config):
        start = time.perf_counter()
        new, record = self._inner(twin, items, analyser, config)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        if self.trace and self.truth is not None:
            before = twin.log_params[:, GROWTH].mean(0)
            after = new.log_params[:, GROWTH].mean(0)
            kinds = sorted({type(o).__name__[:6] for o in items})
            print(f"    t={twin.clock:6.1f} {','.join(kinds):28s} logD err {float(before[0]) - self.truth[0]:+.3f}"
                  f" -> {float(after[0]) - self.truth[0]:+.3f}  rho err {float(before[1]) - self.truth[1]:+.3f}"
                  f" -> {float(after[1]) - self.truth[1]:+.3f}  sd D {float(new.log_params[:, 0].std()):.3f}")
        return new, record


def run_seed(seed: int, n_patients: int, members: int, trace: bool, cohort: CohortConfig = COHORT,
             config: twin_mod.TwinConfig | None = None) -> dict:
    config = config or twin_mod.TwinConfig()
    rows = []
    for i in range(n_patients):
        p = generate_patient(i, seed, cohort)
        events = typed_observations(p, DAY0, NAMESPACE, planned=True)
        first = next(o for o in events if isinstance(o, ImagingObservation))
        # The prior: the twin's draws before any data (the presentation analysis, if on, is
        # assimilation of the first study).
        prior = init_twin(p.pseudonym, first, members, config=replace(config, presentation=False))
        start_twin = init_twin(p.pseudonym, first, members, config=config)
        truth = torch.tensor([math.log(p.params[n]) for n in PARAM_NAMES])
        timer = _Timer(trace, [float(truth[k]) for k in GROWTH])
        twin_mod._analyse = timer
        try:
            if trace:
                e0 = prior.log_params[:, GROWTH].mean(0) - truth[GROWTH]
                e1 = start_twin.log_params[:, GROWTH].mean(0) - truth[GROWTH]
                print(f"  patient {i}: true D {p.params['D']:.3f} rho {p.params['rho']:.4f}; prior logD err"
                      f" {float(e0[0]):+.3f} rho {float(e0[1]):+.3f}; first study logD err {float(e1[0]):+.3f}"
                      f" rho {float(e1[1]):+.3f} sd D {float(start_twin.log_params[:, 0].std()):.3f}")
            start = time.perf_counter()
            twin, report = assimilate(start_twin, events, ETKF(), config=config)
            total = time.perf_counter() - start
        finally:
            twin_mod._analyse = timer._inner
        blind, _ = assimilate(prior, [o for o in events if isinstance(o, TreatmentEvent)], ETKF(), config=config)
        blind = advance(blind, twin.clock)
        day = (twin.time - DAY0).total_seconds() / 86400.0 + 90.0
        true_volume = float(np.interp(day, p.truth_times.numpy(), p.truth_volume_ml.numpy()))
        va = forecast(twin, (90.0,)).quantity("volume_ml")[0]
        vb = forecast(blind, (90.0,)).quantity("volume_ml")[0]
        rows.append({
            "err_prior": (prior.log_params.mean(0) - truth).abs()[GROWTH],
            "err_post": (twin.log_params.mean(0) - truth).abs()[GROWTH],
            "signed_post": (twin.log_params.mean(0) - truth)[GROWTH],
            "vol_assim": abs(float(va[1]) - true_volume),
            "vol_blind": abs(float(vb[1]) - true_volume),
            "inside": float(va[0]) <= true_volume <= float(va[2]),
            "analysis_s": timer.seconds / max(1, timer.calls),
            "total_s": total / max(1, len(report.analyses)),
        })
    prior = torch.stack([r["err_prior"] for r in rows]).mean(0)
    post = torch.stack([r["err_post"] for r in rows]).mean(0)
    ratio = post / prior
    return {
        "seed": seed,
        "D_prior": float(prior[0]), "D_post": float(post[0]), "D_ratio": float(ratio[0]),
        "rho_prior": float(prior[1]), "rho_post": float(post[1]), "rho_ratio": float(ratio[1]),
        "D_ratio_per_patient": [float(r["err_post"][0] / r["err_prior"][0]) for r in rows],
        "D_signed_error_per_patient": [float(r["signed_post"][0]) for r in rows],
        "vol_assim_ml": float(np.mean([r["vol_assim"] for r in rows])),
        "vol_blind_ml": float(np.mean([r["vol_blind"] for r in rows])),
        "inside": sum(r["inside"] for r in rows),
        "analysis_s": float(np.mean([r["analysis_s"] for r in rows])),
        "per_analysis_total_s": float(np.mean([r["total_s"] for r in rows])),
    }


def _clamped_gaussian_loglik(y: torch.Tensor, u: torch.Tensor, sd: float) -> torch.Tensor:
    """log p(y | u) of y = clamp(u + e, 0, 1), e ~ N(0, sd²), summed over the last dims.
    y [V], u [B, V] -> [B] (constants dropped; exact at the clamps, where y is 0 or 1)."""
    low, high = y <= 0.0, y >= 1.0
    mid = ~(low | high)
    ll = (-0.5 * ((y[mid] - u[:, mid]) / sd).square()).sum(-1)
    ll = ll + torch.special.log_ndtr(-u[:, low] / sd).sum(-1)
    return ll + torch.special.log_ndtr((u[:, high] - 1.0) / sd).sum(-1)


def oracle_patient(p, draws: int, init: str, rounds: int = 4, chunk: int = 256) -> dict:
    """Near-ideal Bayes for ``p``'s log-parameters given all of its observations (see the module
    docstring), by adaptive importance sampling (population Monte Carlo): round 0 samples the
    twin's prior; each later round samples a Gaussian fitted to the previous round's weighted
    draws (covariance doubled, so it covers the posterior) and weighs by prior × likelihood /
    proposal. Plain prior sampling leaves an effective sample size of ~1 here (thousands of
    voxels make the likelihood sharp), i.e. the "posterior mean" would be one lucky draw; the
    adaptive rounds help where the posterior is moderately sharp, but where it is very sharp
    the last round's sample size is still a few draws (reported). Returns prior and posterior |log error| of D and rho, the posterior sd of log D and the
    effective sample size of the last round."""
    from assimilation.twin import _blur, _observed_density
    from models.priors import TumorPrior
    from models.tissue import diffusion_weight
    from models.virtual_patient import hash_seed, schedule_from_treatments, tumor_params
    from models.reaction_diffusion import simulate

    cfg = p.config
    prior = TumorPrior()
    brain = p.tissue > 0
    images = [o for o in p.observations if o.kind == "imaging"]
    grow_to = None
    if init == "truth":
        t0, u0, fit_images = 0.0, p.u0, images
    elif init == "present":
        # As the presenting twin: every draw grows untreated from the seed at the first study's
        # densest part to its visible volume (its own natural history), then every study is data.
        first = images[0]
        d = _observed_density(ImagingObservation(event_id="x", patient_id=p.pseudonym, time=DAY0,
                                                 spacing_mm=p.grid.spacing, density=first.density.numpy()),
                              brain, torch.float32, twin_mod.TwinConfig().noise.density_sd)
        u0 = twin_mod.presentation_seed(d, brain, p.grid, twin_mod.TwinConfig().presentation_seed_mm)
        t0, fit_images, grow_to = first.t, images, first.value
    else:
        first = images[0]
        noise = twin_mod.TwinConfig().noise.density_sd
        d = _observed_density(ImagingObservation(event_id="x", patient_id=p.pseudonym, time=DAY0,
                                                 spacing_mm=p.grid.spacing, density=first.density.numpy()),
                              brain, torch.float32, noise)
        tail = _blur(d[None], brain, passes=2)[0]
        t0, u0, fit_images = first.t, (d + 0.5 * twin_mod.TwinConfig().init_tail * tail).clamp(0, 1) * brain, images[1:]
    labs = [o for o in p.observations if o.kind in ("lab", "ctdna") and o.t >= t0]
    save_at = sorted({o.t for o in fit_images} | {o.t for o in labs})
    at = {t: i for i, t in enumerate(save_at)}
    weight = diffusion_weight(p.tissue)[None]
    voxel_ml = p.grid.voxel_volume_ml
    flat_brain = brain.flatten()
    fixed = {n: torch.tensor(float(getattr(prior, n)), dtype=torch.float64)
             for n in ("alpha_beta", "chemo_decay", "marker_baseline")}
    mu0 = torch.tensor([getattr(prior, n).log_median for n in PARAM_NAMES], dtype=torch.float64)
    sd0 = torch.tensor([getattr(prior, n).sigma for n in PARAM_NAMES], dtype=torch.float64)
    lo, hi = twin_mod.log_bounds(prior, torch.float64)

    def loglik(theta: torch.Tensor) -> torch.Tensor:
        """theta [K, 6] log-parameters -> log-likelihood [K]."""
        out = []
        for s in range(0, len(theta), chunk):
            th = torch.maximum(torch.minimum(theta[s:s + chunk], hi), lo)
            b = len(th)
            part = {n: th[:, i].exp() for i, n in enumerate(PARAM_NAMES)}
            part.update({n: v.expand(b) for n, v in fixed.items()})
            tp = tumor_params({k: v.to(torch.float32) for k, v in part.items()})
            start = u0[None].expand(b, -1, -1, -1).contiguous()
            if grow_to is not None:
                start = twin_mod._grown_to_volume(start, weight, tp, p.grid, grow_to, 2000.0, cfg.dt_days, "explicit",
                                                   cfg.image_noise_sd)
            res = simulate(start, weight, tp, p.grid, t0,
                           save_at[-1], dt=cfg.dt_days, schedule=schedule_from_treatments(p.treatments, b),
                           scheme="explicit", save_at=save_at)
            ll = torch.zeros(b, dtype=torch.float64)
            for o in fit_images:
                u = res.saved[at[o.t]].reshape(b, -1)[:, flat_brain]
                ll += _clamped_gaussian_loglik(o.density.flatten()[flat_brain], u, cfg.image_noise_sd).double()
            for o in labs:
                burden = res.saved[at[o.t]].reshape(b, -1).sum(-1).double() * voxel_ml
                if o.kind == "lab":
                    level = part["marker_baseline"] + part["marker_shedding"] * burden
                    ll += -0.5 * ((math.log(o.value) - level.log()) / cfg.marker_noise_log_sd) ** 2
                else:
                    sb = part["ctdna_shedding"] * burden
                    log_f = (sb / (1 + sb)).clamp_min(1e-30).log()
                    if o.value <= cfg.ctdna_lod:
                        ll += torch.special.log_ndtr((math.log(cfg.ctdna_lod) - log_f) / cfg.ctdna_noise_log_sd)
                    else:
                        ll += -0.5 * ((math.log(o.value) - log_f) / cfg.ctdna_noise_log_sd) ** 2
            out.append(ll)
        return torch.cat(out)

    g = torch.Generator().manual_seed(hash_seed(p.pseudonym, "oracle"))
    log_prior = lambda th: (-0.5 * ((th - mu0) / sd0).square()).sum(-1)  # noqa: E731
    theta = mu0 + sd0 * torch.randn((draws, len(PARAM_NAMES)), generator=g, dtype=torch.float64)
    logw = loglik(theta)
    for _ in range(rounds - 1):
        w = torch.softmax(logw, 0)
        mean = (w[:, None] * theta).sum(0)
        dev = theta - mean
        cov = (w[:, None, None] * dev[:, :, None] * dev[:, None, :]).sum(0)
        # Doubled, plus a floor of (prior sd / 20)², so a collapsed round still explores.
        cov = 2.0 * cov + torch.diag((sd0 / 20.0).square())
        prop = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
        theta = mean + torch.randn((draws, len(PARAM_NAMES)), generator=g, dtype=torch.float64) @ \
            torch.linalg.cholesky(cov).T
        logw = loglik(theta) + log_prior(theta) - prop.log_prob(theta)
    w = torch.softmax(logw, 0)
    k = [PARAM_NAMES.index("D"), PARAM_NAMES.index("rho")]
    truth = torch.tensor([math.log(p.params["D"]), math.log(p.params["rho"])], dtype=torch.float64)
    post = (w[:, None] * theta[:, k]).sum(0)
    sd_d = float((w * (theta[:, k[0]] - post[0]).square()).sum().sqrt())
    return {"err_prior": (mu0[k] - truth).abs(), "err_post": (post - truth).abs(),
            "ess": float(1.0 / w.square().sum()), "post_sd_logD": sd_d}


def oracle_seed(seed: int, n_patients: int, cohort: CohortConfig, draws: int, init: str) -> dict:
    rows = [oracle_patient(generate_patient(i, seed, cohort), draws, init) for i in range(n_patients)]
    prior = torch.stack([r["err_prior"] for r in rows]).mean(0)
    post = torch.stack([r["err_post"] for r in rows]).mean(0)
    ratio = post / prior
    return {
        "seed": seed, "D_prior": float(prior[0]), "D_post": float(post[0]), "D_ratio": float(ratio[0]),
        "rho_prior": float(prior[1]), "rho_post": float(post[1]), "rho_ratio": float(ratio[1]),
        "D_ratio_per_patient": [float(r["err_post"][0] / r["err_prior"][0]) for r in rows],
        "ess": [r["ess"] for r in rows], "post_sd_logD": [r["post_sd_logD"] for r in rows],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--oracle", action="store_true", help="importance-sampling Bayes instead of the twin")
    parser.add_argument("--draws", type=int, default=256,
                        help="per adaptive round (present init, 32³: ~3 min per patient at 256)")
    parser.add_argument("--oracle-init", choices=("present", "twin", "truth"), default="present")
    parser.add_argument("--design", choices=("presenting", "ci16"), default="presenting",
                        help="presenting: the twin experiment of tests/twin (assimilation.experiment."
                             "PRESENTING_COHORT / PRESENTING_TWIN); ci16: 16³ voxels of 5 mm, tumours seeded at "
                             "day 0, no presentation analysis (the earlier design, where D is not learnt)")
    parser.add_argument("--grid", type=float, nargs=2, metavar=("X", "H"), default=None,
                        help="override the design's grid: X³ voxels of H mm")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.design == "presenting":
        cohort, config = PRESENTING_COHORT, PRESENTING_TWIN
    else:
        cohort, config = COHORT, twin_mod.TwinConfig()
    if args.grid is not None:
        n = int(args.grid[0])
        cohort = replace(cohort, grid=Grid((n, n, n), (args.grid[1],) * 3))
    results = []
    if args.oracle:
        for seed in args.seeds:
            r = oracle_seed(seed, args.patients, cohort, args.draws, args.oracle_init)
            results.append(r)
            print(f"seed {seed} oracle ({args.oracle_init} init, {args.draws} draws): D {r['D_prior']:.3f}->"
                  f"{r['D_post']:.3f} ratio {r['D_ratio']:.2f} (per patient "
                  f"{', '.join(f'{x:.2f}' for x in r['D_ratio_per_patient'])}); rho ratio {r['rho_ratio']:.2f}; "
                  f"ESS {', '.join(f'{x:.1f}' for x in r['ess'])}; post sd log D "
                  f"{', '.join(f'{x:.2f}' for x in r['post_sd_logD'])}", flush=True)
        mean = {k: float(np.mean([r[k] for r in results])) for k in ("D_ratio", "rho_ratio")}
        print(f"mean over seeds: oracle D ratio {mean['D_ratio']:.2f}, rho ratio {mean['rho_ratio']:.2f}")
        print(json.dumps({"bench": "identify", "design": args.design, "oracle": args.oracle_init, "draws": args.draws,
                          "grid": list(cohort.grid.shape), "spacing_mm": cohort.grid.spacing[0],
                          "patients": args.patients, "seeds": results, "mean": mean}))
        return
    for seed in args.seeds:
        r = run_seed(seed, args.patients, args.members, args.trace, cohort, config)
        results.append(r)
        print(f"seed {seed}: D {r['D_prior']:.3f}->{r['D_post']:.3f} ratio {r['D_ratio']:.2f} "
              f"(per patient {', '.join(f'{x:.2f}' for x in r['D_ratio_per_patient'])}; log D error "
              f"{', '.join(f'{x:+.2f}' for x in r['D_signed_error_per_patient'])}); "
              f"rho {r['rho_prior']:.3f}->{r['rho_post']:.3f} ratio {r['rho_ratio']:.2f}; "
              f"90-day volume |err| {r['vol_assim_ml']:.2f} mL (blind {r['vol_blind_ml']:.1f}), "
              f"inside {r['inside']}/{args.patients}; analysis {r['analysis_s'] * 1e3:.0f} ms "
              f"(with advance {r['per_analysis_total_s'] * 1e3:.0f} ms)", flush=True)
    mean = {k: float(np.mean([r[k] for r in results])) for k in ("D_ratio", "rho_ratio", "vol_assim_ml", "analysis_s")}
    print(f"mean over seeds: D ratio {mean['D_ratio']:.2f}, rho ratio {mean['rho_ratio']:.2f}, "
          f"volume |err| {mean['vol_assim_ml']:.2f} mL, analysis {mean['analysis_s'] * 1e3:.0f} ms")
    print(json.dumps({"bench": "identify", "design": args.design, "grid": list(cohort.grid.shape),
                      "spacing_mm": cohort.grid.spacing[0], "members": args.members, "patients": args.patients,
                      "seeds": results, "mean": mean}))


if __name__ == "__main__":
    main()
