"""Calibration of the report's statistics on simulated studies (issue 16).

Each simulated study evaluates method A (``k`` training seeds) and a baseline B on ``n`` items:

* items: difficulty ``θ_i ~ N(μ_θ, s_θ²)`` on the logit scale (heterogeneous: some items almost
  always right, some almost never), drawn afresh for every study;
* a checkpoint (seed ``s``) has a logit shift ``u_s ~ N(0, τ²)``; ``τ`` is set so that the
  across-seed standard deviation of a checkpoint's *population* accuracy ``E_θ[sigmoid(θ + u)]``
  is ``σ`` points (the observed across-seed sd on ``n`` items is larger: the table shows it);
* ``Y[s, i] ~ Bernoulli(sigmoid(θ_i + u_s + m))`` (the seed×item residual), ``m`` the method's
  offset, solved so that the true difference ``E[A] − E[B]`` is exactly the requested effect;
* two-method rows: B is an independent method of the same kind (its own ``k`` seeds, seeds
  paired by index); single-baseline rows: B is one fixed model evaluated once (``u = 0``, a single
  vector), as the base student or the teacher are.

Per row: the report procedure's false-positive rate (two-way seed × item estimator of
:mod:`slmkd.stats`, p < 0.05), that of the seed-level paired t (cross-check) and of the old
pooled procedure (exact McNemar over the pooled (seed, item) pairs, baseline replicated per seed,
plus a CI excluding 0 — the normal approximation of the old paired bootstrap), the coverage of
the 95% CI of the true difference and of the true accuracy of A (and of B's Wilson interval when
B is evaluated once), the mean minimum detectable difference (80% power) and the power for true
effects of 3, 5 and 10 points, at k = 3 and k = 5. Everything is vectorised over studies.

    python benchmarks/stats_calibration.py [--studies 2000] [--power-studies 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slmkd import stats  # noqa: E402

N_ITEMS = 300
SIGMAS = (0, 2, 4, 6, 8, 12)
EFFECTS = (3, 5, 10)
THETA_MU, THETA_SD = 0.3, 2.0

_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(96)
_GH_W = _GH_W / _GH_W.sum()


def _expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def _acc_given_shift(u: np.ndarray | float, m: float = 0.0) -> np.ndarray:
    """Population accuracy of a checkpoint with logit shift ``u`` (expectation over items)."""
    u = np.asarray(u, dtype=float)
    th = THETA_MU + THETA_SD * _GH_X
    return (_expit(th[None, :] + u.reshape(-1, 1) + m) * _GH_W).sum(-1).reshape(u.shape)


def _moments(tau: float, m: float = 0.0) -> tuple[float, float]:
    """``(mean, sd)`` over checkpoints of the population accuracy (shift ``u ~ N(0, τ²)``)."""
    g = _acc_given_shift(tau * _GH_X, m)
    mean = float((g * _GH_W).sum())
    return mean, float(math.sqrt(max(0.0, ((g - mean) ** 2 * _GH_W).sum())))


def tau_for_sigma(sigma_pts: float) -> float:
    """Logit sd of the checkpoint shift giving an across-seed accuracy sd of ``sigma_pts``."""
    if sigma_pts <= 0:
        return 0.0
    from scipy.optimize import brentq

    return float(brentq(lambda t: 100 * _moments(t)[1] - sigma_pts, 1e-6, 10.0))


def offset_for(target: float, tau: float) -> float:
    """Offset ``m`` with population accuracy ``E_{θ,u}[sigmoid(θ + u + m)] = target``."""
    from scipy.optimize import brentq

    return float(brentq(lambda m: _moments(tau, m)[0] - target, -20.0, 20.0))


def simulate(rng: np.random.Generator, studies: int, k: int, sigma_pts: float,
             effect_pts: float = 0.0, single_baseline: bool = False, n_items: int = N_ITEMS):
    """``(A (S, k, n), B (S, k or 1, n), true_diff, true_acc_a, true_acc_b)`` as 0/1 arrays."""
    tau = tau_for_sigma(sigma_pts)
    acc_b = float(_acc_given_shift(0.0)) if single_baseline else _moments(tau)[0]
    m_a = offset_for(acc_b + effect_pts / 100.0, tau) if effect_pts else (
        offset_for(acc_b, tau) if single_baseline else 0.0)
    acc_a = _moments(tau, m_a)[0]
    theta = rng.normal(THETA_MU, THETA_SD, (studies, 1, n_items))
    u_a = rng.normal(0.0, 1.0, (studies, k, 1)) * tau
    A = rng.random((studies, k, n_items)) < _expit(theta + u_a + m_a)
    if single_baseline:
        B = rng.random((studies, 1, n_items)) < _expit(theta)
    else:
        u_b = rng.normal(0.0, 1.0, (studies, k, 1)) * tau
        B = rng.random((studies, k, n_items)) < _expit(theta + u_b)
    return A.astype(np.float64), B.astype(np.float64), acc_a - acc_b, acc_a, acc_b


def old_pooled_significant(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """The old report's verdict: exact McNemar over the pooled (seed, item) pairs (a single
    baseline replicated for every seed) with p < 0.05 and a pooled paired CI excluding 0."""
    from scipy.stats import binom

    B = np.broadcast_to(B, A.shape)
    n10 = ((A == 1) & (B == 0)).sum((-2, -1))
    n01 = ((A == 0) & (B == 1)).sum((-2, -1))
    disc = n10 + n01
    p = np.where(disc > 0, np.minimum(1.0, 2 * binom.cdf(np.minimum(n10, n01), disc, 0.5)), 1.0)
    d = (A - B).reshape(A.shape[0], -1)
    half = 1.96 * d.std(-1, ddof=1) / math.sqrt(d.shape[-1])
    mean = d.mean(-1)
    return (p < 0.05) & ((mean - half > 0) | (mean + half < 0))


def run_row(rng: np.random.Generator, k: int, sigma: float, single: bool, studies: int,
            power_studies: int) -> dict[str, float]:
    A, B, true_diff, acc_a, acc_b = simulate(rng, studies, k, sigma, 0.0, single)
    r = stats.batched_difference(A, B)
    acc = stats.batched_accuracy(A)
    row = {
        "fpr": float((r["pvalue"] < 0.05).mean()),
        "fpr_seed_t": float((r["seed_t_pvalue"] < 0.05).mean()),
        "fpr_old": float(old_pooled_significant(A, B).mean()),
        "cov_diff": float(((r["ci_low"] <= true_diff) & (true_diff <= r["ci_high"])).mean()),
        "cov_acc": float(((acc["ci_low"] <= acc_a) & (acc_a <= acc["ci_high"])).mean()),
        "obs_sd": float(100 * np.mean(A.mean(-1).std(-1, ddof=1))),
        "mdd": float(100 * np.nanmedian([
            stats.min_detectable_difference(se, stats.effective_df(c))
            for se, c in zip(r["se"][:50], r["crit"][:50])])),
        "cov_acc_b": math.nan,
    }
    if single:
        accb = stats.batched_accuracy(B)
        row["cov_acc_b"] = float(((accb["ci_low"] <= acc_b) & (acc_b <= accb["ci_high"])).mean())
    for eff in EFFECTS:
        A, B, true_diff, _, _ = simulate(rng, power_studies, k, sigma, eff, single)
        r = stats.batched_difference(A, B)
        row[f"power{eff}"] = float(((r["pvalue"] < 0.05) & (r["diff"] > 0)).mean())
        row[f"cov{eff}"] = float(((r["ci_low"] <= true_diff) & (true_diff <= r["ci_high"])).mean())
    return row


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:.1f}"


def table(rows: list[tuple[str, float, dict[str, float]]], k: int) -> str:
    head = ("| B | σ (pts) | obs. seed sd (pts) | FPR report | FPR seed-t | FPR old pooled | "
            "cov. Δ | cov. Δ (effects) | cov. acc A | cov. acc B (k=1) | median MDD (pts) | "
            "power 3 | power 5 | power 10 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            "---:|---:|---:|---:|")
    lines = [f"k = {k} seeds, n = {N_ITEMS} items:", "", head]
    for kind, sigma, r in rows:
        cov_eff = min(r[f"cov{e}"] for e in EFFECTS)
        lines.append(
            f"| {kind} | {sigma:g} | {r['obs_sd']:.1f} | {_pct(r['fpr'])} | {_pct(r['fpr_seed_t'])}"
            f" | {_pct(r['fpr_old'])} | {_pct(r['cov_diff'])} | ≥ {_pct(cov_eff)} | "
            f"{_pct(r['cov_acc'])} | {_pct(r['cov_acc_b'])} | {r['mdd']:.1f} | "
            f"{_pct(r['power3'])} | {_pct(r['power5'])} | {_pct(r['power10'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=2000, help="null studies per row")
    ap.add_argument("--power-studies", type=int, default=400, help="studies per effect size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ks", type=int, nargs="+", default=[3, 5])
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    out = [f"Simulated studies: {args.studies} null studies per row, {args.power_studies} per "
           f"effect size; items θ ~ N({THETA_MU}, {THETA_SD}²) on the logit scale; σ = sd of a "
           f"checkpoint's population accuracy across seeds; FPR and power at p < 0.05 "
           f"(two-sided); cov. = coverage of the 95% CI.", ""]
    for k in args.ks:
        rows = []
        for single in (False, True):
            for sigma in SIGMAS:
                rows.append(("once" if single else f"{k} seeds", sigma,
                             run_row(rng, k, sigma, single, args.studies, args.power_studies)))
        out += [table(rows, k), ""]
    out.append(f"({time.time() - t0:.0f} s)")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
