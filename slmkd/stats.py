r"""Statistics for the study: accuracies and differences over training seeds × evaluation items.

The data of one method on one dataset is a ``k × n`` 0/1 matrix ``Y`` (``Y[s, i] = 1`` when the
checkpoint trained with seed ``s`` answers item ``i`` correctly). A model evaluated once (the
base student, the teacher) is a single row, ``k = 1``. The report's verdicts use
:func:`seed_item_accuracy` and :func:`seed_item_difference`; everything else here is supplementary
or kept for callers of the older API.

Procedure: two-way crossed random-effects decomposition (seeds × items)
=======================================================================

Model ``Y[s, i] = μ + a_s + b_i + e_si`` with random seed effects ``a_s`` (variance ``σ²_seed``:
which checkpoint the training seed produced), random item effects ``b_i`` (``σ²_item``: which
items the benchmark subset drew) and a seed×item residual ``e_si`` (``σ²_res``). The estimate is
the grand mean ``Ȳ = (1/k) Σ_s x_s`` of the per-seed scores ``x_s = Σ_i w_i Y[s, i]`` (``w_i = 1/n``;
for the BBH macro average ``w_i = 1/(T n_t)``, item ``i`` in task ``t`` of ``T``). With one
observation per cell, the two-way ANOVA mean squares of each stratum (task) ``t`` are

* ``MS_item,t = k · var_i(Ȳ_·i)`` (``n_t − 1`` df), ``E = σ²_res + k σ²_item``;
* ``MS_res,t = Σ_{s,i}(Y_si − Ȳ_s· − Ȳ_·i + Ȳ_··)² / ((k − 1)(n_t − 1))``, ``E = σ²_res``;

and ``Var(Ȳ) = σ²_seed/k + σ²_item/n + σ²_res/(kn)`` (one stratum) is estimated (unbiased but
for the truncation at 0) by

    V = V_seed + V_item,   V_seed = var_s(x_s) / k                       (k − 1 df)
                           V_item = Σ_t max(0, MS_item,t − MS_res,t) / (k T² n_t)

One stratum: ``V = (MS_seed + max(0, MS_item − MS_res)) / (kn)`` with ``MS_seed = n var_s(x_s)``
(``E = σ²_res + n σ²_seed``), i.e. ``σ̂²_seed/k + σ̂²_item/n + σ̂²_res/(kn)`` with ``σ̂²_res =
MS_res``, ``σ̂²_item = max(0, (MS_item − MS_res)/k)``, ``σ̂²_seed = (MS_seed − MS_res)/n``. ``V_seed``
is exactly the variance of a seed-level t-test (it holds ``σ²_seed/k + σ²_res/(kn)``), ``V_item``
adds the variance of drawing the items; its df ``ν_item`` is Satterthwaite's over the mean squares
(``MS_item,t``: ``n_t − 1`` df, ``MS_res,t``: ``(k − 1)(n_t − 1)``), floored at ``k − 1`` (an item
part near 0 has a Satterthwaite df near 0, whose huge t quantile would otherwise dominate the
critical value below although that part adds almost nothing to ``V``).

Critical value (Cochran–Cox): ``t*(α) = (V_seed t_{k−1}(α) + V_item t_{ν_item}(α)) / V`` with
``t_ν(α)`` the upper ``α/2`` quantile of Student's t. The 95% CI is ``Ȳ ± t*(0.05) √V``, the
two-sided p-value of a difference is the ``α`` with ``t*(α) = |Ȳ| / √V``, and the reported df is
the effective ``ν`` with ``t_ν(0.05) = t*(0.05)``. Why not one Satterthwaite df for ``V``: the seed
part has only ``k − 1`` df, and a plug-in Satterthwaite df grows exactly when ``var_s(x_s)``
happens to be small, i.e. when ``|t|`` is large; on the simulated null studies it gave 6–8%
false positives at k = 3 (baseline evaluated once, σ ≥ 8 points; and with the seed component
truncated at 0, two methods at σ = 2–4); Cochran–Cox gives 2.9–5.9% in every row (k = 3 and 5,
σ = 0–12 points) with CI coverage ≥ 93%. When the seed part dominates, ``t* → t_{k−1}`` (4.30
with three seeds): the honest price of estimating the seed variance from three checkpoints; when
no seed variance shows, it tends to the item-level t.

* ``k = 1`` (one checkpoint / a fixed model): no seed part, ``V = Σ_t var_i(Y_i)/(T² n_t)`` (the
  item variance, which then contains the residual), ``ν_item`` = Welch–Satterthwaite over the
  strata (``n − 1`` unstratified). An unstratified accuracy with ``k = 1`` gets the Wilson score
  interval over its ``n`` items instead of a t-interval. For a trained method a ``k = 1`` interval is
  conditional on that checkpoint.
* Degenerate data (``V = 0``: e.g. all 0 or all 1): accuracy gets the Wilson interval over the
  ``n`` items (0/300 → [0, 1.3%], never [0, 0]); a difference gets ``[L₊ − U₋, U₊ − L₋]`` from the
  Wilson intervals ``[L±, U±]`` (over ``n``) of the fractions of cells with ``D = ±1`` (all 0 →
  ``[−u, u]``, ``u = z²/(n + z²)``) and the exact sign-test p-value over the items (1 when
  ``Δ̂ = 0``). Accuracy intervals are clipped to ``[0, 1]``.

Differences A − B: the same estimator on ``D[s, i] = Y_A[s, i] − Y_B[s, i]`` with seeds matched by
index (the caller aligns them by seed number). Against a baseline evaluated once (a single vector
``y_B``), ``D[s, i] = Y_A[s, i] − y_B[i]``: the vector enters once — constant across seeds, its
item variance lands in the item part with ``n − 1`` df and adds nothing to the seed part, so it is
never counted as ``k`` independent replicates. Cross-check (reported beside, no verdict): the
seed-level paired t-test on the per-seed differences ``x_s`` (``k − 1`` df); it conditions on the
items, and against a single baseline it ignores that baseline's item variance.

Family of comparisons: Holm's step-down adjustment (:func:`holm`). Minimum detectable difference
(:func:`min_detectable_difference`): the smallest ``|Δ|`` that a two-sided level-α t-test on the
effective ``ν`` df with standard error ``√V`` rejects with the given power (noncentral t), also
projected to other seed counts from the estimated components (:func:`projected_mdd`).

BBH: the headline is the macro average (mean of the task accuracies: stratified weights above,
so items are drawn within tasks); the micro average (every item weighs the same, unstratified) is
shown beside it. :func:`per_task_seed_stats` gives per-task mean ± sd over seeds and ``n``.

Supplementary only: per-seed exact McNemar (:func:`per_seed_mcnemar`) tests whether two
particular checkpoints differ on these items — conditional on the checkpoints, no verdict. The
older pooled helpers (:func:`compare_paired` over ``(seed, item)`` keys, :func:`bootstrap_ci`,
:func:`paired_bootstrap_diff`) treat pooled pairs as independent and are not used for verdicts.

Calibration on simulated null studies: ``benchmarks/stats_calibration.py`` (figures in
``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "McNemarResult", "PairedComparison", "SeedItemComparison", "SeedItemEstimate",
    "VarianceComponents", "batched_accuracy", "batched_difference", "bootstrap_ci", "compare_paired",
    "effective_df", "holm", "macro_average", "mcnemar_exact", "mean_std", "micro_average",
    "min_detectable_difference", "pair_by_id", "paired_bootstrap_diff", "per_seed_mcnemar",
    "per_task_accuracy", "per_task_seed_stats", "projected_mdd", "seed_item_accuracy",
    "seed_item_difference", "seed_paired_t", "two_way_moments", "wilson_interval",
]

DEFAULT_RESAMPLES = 2000
Z95 = 1.959963984540054


def _as01(values: Iterable[Any]) -> np.ndarray:
    return np.asarray([1.0 if bool(v) else 0.0 for v in values], dtype=float)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, sample std with ddof=1)``; std is 0.0 for a single value, NaNs for none."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std


# --- Seed × item estimator (vectorised over leading axes: the calibration benchmark batches studies) ---


def _isf(a: Any, df: Any) -> np.ndarray:
    """Upper ``a`` quantile of Student's t on ``df`` (normal for infinite / huge df), vectorised."""
    from scipy.stats import norm
    from scipy.stats import t as student_t

    a, df = np.broadcast_arrays(np.asarray(a, dtype=float), np.asarray(df, dtype=float))
    out = norm.isf(a)
    ok = np.isfinite(df) & (df > 0) & (df < 1e7)
    if np.any(ok):
        out = np.where(ok, student_t.isf(a, np.where(ok, df, 1.0)), out)
    return out


def _cc_crit(alpha: Any, m: dict[str, np.ndarray]) -> np.ndarray:
    """Cochran–Cox critical value ``t*(α)`` of the module docstring (NaN where ``V = 0``)."""
    vs, vi = m["var_seed_part"], m["var_item_part"]
    var = vs + vi
    ts = _isf(np.asarray(alpha) / 2, np.where(vs > 0, m["df_seed"], 1.0))
    ti = _isf(np.asarray(alpha) / 2, np.where(vi > 0, m["df_item"], 1.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 0, (vs * ts + vi * ti) / np.where(var > 0, var, 1.0), np.nan)


def _cc_pvalue(tstat: Any, m: dict[str, np.ndarray], iters: int = 64) -> np.ndarray:
    """Two-sided p: the ``α`` with ``t*(α) = |t|`` (bisection on ``log α``; ``t*`` decreases)."""
    tstat = np.abs(np.asarray(tstat, dtype=float))
    lo = np.full(tstat.shape, math.log(1e-300))
    hi = np.zeros(tstat.shape)
    for _ in range(iters):
        mid = (lo + hi) / 2
        above = _cc_crit(np.exp(mid), m) > tstat  # crit too high: α must grow
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return np.exp(hi)


def effective_df(crit: float) -> float:
    """``ν`` with ``t_ν(0.05) = crit`` (inf when ``crit`` is at or below the normal quantile)."""
    if not math.isfinite(crit):
        return math.nan
    from scipy.optimize import brentq
    from scipy.stats import t as student_t

    if crit <= float(student_t.isf(0.025, 1e7)):
        return math.inf
    if crit >= float(student_t.isf(0.025, 0.05)):
        return 0.05

    return float(math.exp(brentq(lambda lv: student_t.isf(0.025, math.exp(lv)) - crit,
                                 math.log(0.05), math.log(1e7))))


def _strata_codes(strata: Sequence[Any] | None, n: int) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    if strata is None:
        return np.zeros(n, dtype=int), np.array([n]), ["all"]
    labels = list(strata)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} stratum labels for {n} items")
    names = sorted({str(x) for x in labels})
    index = {nm: j for j, nm in enumerate(names)}
    codes = np.array([index[str(x)] for x in labels], dtype=int)
    return codes, np.bincount(codes, minlength=len(names)), names


def two_way_moments(Y: Any, strata: Sequence[Any] | None = None) -> dict[str, np.ndarray]:
    """The estimator of the module docstring on ``Y`` of shape ``(..., k, n)``.

    Returns arrays over the leading axes: ``mean`` (Ȳ), ``var`` (V), ``var_seed_part`` and
    ``df_seed`` (``k − 1``), ``var_item_part`` and ``df_item`` (Satterthwaite), ``per_seed``
    (``x_s``, shape ``(..., k)``), ``z`` (item means over seeds) and the variance components
    ``sigma2_seed`` (``max(0, var_s(x_s) − R)``), ``resid_per_seed`` (``R = Σ_t MS_res,t/(T² n_t)``,
    the seed×item noise of one seed's score) and ``item_var`` (= ``var_item_part``).
    """
    Y = np.asarray(Y, dtype=float)
    if Y.ndim < 2:
        raise ValueError("expected a (..., k seeds, n items) array")
    k, n = Y.shape[-2], Y.shape[-1]
    if n == 0 or k == 0:
        raise ValueError("no seeds or no items")
    codes, n_t, _ = _strata_codes(strata, n)
    T = len(n_t)
    if T == 1:
        x = Y.mean(-1)  # (..., k): per-seed scores
    else:
        x = sum(Y[..., codes == t].mean(-1) for t in range(T) if n_t[t]) / T
    mean = x.mean(-1)
    lead = mean.shape
    var_x = x.var(-1, ddof=1) if k >= 2 else np.zeros(lead)
    z = Y.mean(-2)  # (..., n): item means over seeds
    v_item, den, resid = np.zeros(lead), np.zeros(lead), np.zeros(lead)
    for t in range(T):
        nt = int(n_t[t])
        if nt < 2:
            continue
        idx = codes == t
        zt = z[..., idx]
        ms_item = k * zt.var(-1, ddof=1)
        c = 1.0 / (T * T * nt)
        if k >= 2:
            Yt = Y[..., idx]
            r = Yt - Yt.mean(-1, keepdims=True) - zt[..., None, :] + zt.mean(-1)[..., None, None]
            ms_res = (r**2).sum((-2, -1)) / ((k - 1) * (nt - 1))
            used = ms_item > ms_res
            v_item = v_item + np.where(used, c * (ms_item - ms_res) / k, 0.0)
            den = den + np.where(used, (c / k) ** 2 * (ms_item**2 / (nt - 1)
                                                       + ms_res**2 / ((k - 1) * (nt - 1))), 0.0)
            resid = resid + c * ms_res
        else:  # one checkpoint: item variance, residual included
            v_item = v_item + c * ms_item
            den = den + (c * ms_item) ** 2 / (nt - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        df_item = np.where(den > 0, v_item**2 / np.where(den > 0, den, 1.0), np.inf)
    if k >= 2:  # a near-zero item part has a near-zero df: floored (see the module docstring)
        df_item = np.maximum(df_item, k - 1.0)
    v_seed = var_x / k
    return {"mean": mean, "var": v_seed + v_item, "var_seed_part": v_seed,
            "df_seed": np.full(lead, float(k - 1) if k >= 2 else np.nan),
            "var_item_part": v_item, "df_item": df_item, "per_seed": x, "z": z,
            "sigma2_seed": np.maximum(0.0, var_x - resid), "resid_per_seed": resid,
            "item_var": v_item}


def wilson_interval(p_hat: Any, n: Any, confidence: float = 0.95) -> tuple[Any, Any]:
    """Wilson score interval for a proportion ``p_hat`` of ``n`` (vectorised)."""
    z = Z95 if confidence == 0.95 else float(_isf((1 - confidence) / 2, np.inf))
    p = np.asarray(p_hat, dtype=float)
    n = np.asarray(n, dtype=float)
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo, hi = np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)
    lo, hi = np.where(p <= 0, 0.0, lo), np.where(p >= 1, 1.0, hi)  # exact ends, no round-off
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


def _as_matrix(x: Any) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError("expected a 0/1 vector (one evaluation) or a k × n matrix (k seeds)")
    return arr


def _accuracy_interval(m: dict[str, np.ndarray], k: int, n: int, stratified: bool,
                       confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(low, high, kind)`` where kind 0 = two-way Cochran–Cox t, 1 = Wilson over items."""
    mean, var = m["mean"], m["var"]
    half = _cc_crit(1 - confidence, m) * np.sqrt(var)
    lo, hi = np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1)
    wil = np.broadcast_to((var <= 0) | ((k == 1) and not stratified), np.shape(mean))
    if np.any(wil):
        wlo, whi = wilson_interval(np.clip(mean, 0, 1), n, confidence)
        lo, hi = np.where(wil, wlo, lo), np.where(wil, whi, hi)
    return lo, hi, wil.astype(int)


def _difference_interval(m: dict[str, np.ndarray], D: np.ndarray, n: int, confidence: float):
    """``(low, high, p)`` for a difference (degenerate cases per the module docstring)."""
    mean, var = m["mean"], m["var"]
    sd = np.sqrt(var)
    half = _cc_crit(1 - confidence, m) * sd
    with np.errstate(divide="ignore", invalid="ignore"):
        p = _cc_pvalue(np.where(var > 0, mean / np.where(var > 0, sd, 1.0), 0.0), m)
    lo, hi = mean - half, mean + half
    deg = var <= 0
    if np.any(deg):
        from scipy.stats import binom

        p_pos, p_neg = (D > 0).mean((-2, -1)), (D < 0).mean((-2, -1))
        lp, up = wilson_interval(p_pos, n, confidence)
        ln, un = wilson_interval(p_neg, n, confidence)
        z = m["z"]
        n_pos, n_neg = (z > 0).sum(-1), (z < 0).sum(-1)
        sign_p = np.minimum(1.0, 2 * binom.cdf(np.minimum(n_pos, n_neg), n_pos + n_neg, 0.5))
        lo = np.where(deg, np.asarray(lp) - np.asarray(un), lo)
        hi = np.where(deg, np.asarray(up) - np.asarray(ln), hi)
        p = np.where(deg, np.where(mean == 0, 1.0, sign_p), p)
    return lo, hi, np.where(np.isnan(p), 1.0, p)


@dataclass(frozen=True)
class VarianceComponents:
    """Estimated components of one estimate, in units of the score: ``sigma2_seed`` (between
    checkpoints, beyond item noise), ``resid_per_seed`` (seed×item noise of one seed's score),
    ``item_var`` (item-sampling variance of the mean, for these ``n`` items) with its df."""

    sigma2_seed: float
    resid_per_seed: float
    item_var: float
    df_item: float = math.inf


@dataclass(frozen=True)
class SeedItemEstimate:
    """A method's accuracy over ``k`` seeds × ``n`` items (see the module docstring)."""

    mean: float
    sd_seeds: float
    k: int
    n: int
    se: float
    df: float
    ci_low: float
    ci_high: float
    interval: str
    per_seed: tuple[float, ...]
    components: VarianceComponents
    n_strata: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_seed"] = list(self.per_seed)
        return d


@dataclass(frozen=True)
class SeedItemComparison:
    """``A − B`` by the two-way estimator (verdict) and the seed-level paired t (cross-check)."""

    diff: float
    se: float
    df: float
    ci_low: float
    ci_high: float
    pvalue: float
    k: int
    n: int
    single_baseline: bool
    per_seed_diff: tuple[float, ...]
    sd_seeds: float
    seed_t_pvalue: float
    seed_t_ci_low: float
    seed_t_ci_high: float
    mdd: float
    components: VarianceComponents
    acc_a: float = math.nan
    acc_b: float = math.nan
    interval: str = "two-way t"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_seed_diff"] = list(self.per_seed_diff)
        return d


def batched_accuracy(Y: Any, strata: Sequence[Any] | None = None,
                     confidence: float = 0.95) -> dict[str, np.ndarray]:
    """:func:`seed_item_accuracy` vectorised over leading axes of ``Y`` (``(..., k, n)``):
    ``mean``, ``ci_low``, ``ci_high``, ``se``, ``df``, ``wilson`` (1 where the Wilson interval
    was used) and the moments of :func:`two_way_moments`."""
    Y = np.asarray(Y, dtype=float)
    k, n = Y.shape[-2], Y.shape[-1]
    m = two_way_moments(Y, strata)
    stratified = strata is not None and len({str(x) for x in strata}) > 1
    lo, hi, kind = _accuracy_interval(m, k, n, stratified, confidence)
    return {**m, "ci_low": lo, "ci_high": hi, "se": np.sqrt(m["var"]), "wilson": kind,
            "crit": _cc_crit(1 - confidence, m)}


def batched_difference(A: Any, B: Any, strata: Sequence[Any] | None = None,
                       confidence: float = 0.95) -> dict[str, np.ndarray]:
    """:func:`seed_item_difference` vectorised over leading axes: ``A`` is ``(..., k, n)``, ``B``
    is ``(..., k, n)`` (seeds matched by row) or ``(..., 1, n)`` (a model evaluated once, used
    once). Returns ``diff``, ``ci_low``, ``ci_high``, ``pvalue``, ``se``, ``crit``, ``seed_t_pvalue``,
    ``seed_t_ci_low``, ``seed_t_ci_high`` and the moments of :func:`two_way_moments`."""
    A, B = np.asarray(A, dtype=float), np.asarray(B, dtype=float)
    if A.shape[-1] != B.shape[-1]:
        raise ValueError(f"A and B are scored on different numbers of items: {A.shape[-1]} vs "
                         f"{B.shape[-1]}")
    if A.shape[-2] != B.shape[-2] and B.shape[-2] != 1 and A.shape[-2] != 1:
        raise ValueError(f"seeds not matched: A has {A.shape[-2]} rows, B has {B.shape[-2]}")
    D = A - B  # a single vector broadcasts: used once per seed row, never as new replicates
    n = D.shape[-1]
    m = two_way_moments(D, strata)
    lo, hi, p = _difference_interval(m, D, n, confidence)
    st_p, st_lo, st_hi = seed_paired_t(m["per_seed"], confidence)
    return {**m, "diff": m["mean"], "ci_low": lo, "ci_high": hi, "pvalue": p,
            "se": np.sqrt(m["var"]), "crit": _cc_crit(1 - confidence, m), "seed_t_pvalue": st_p,
            "seed_t_ci_low": st_lo, "seed_t_ci_high": st_hi}


def seed_item_accuracy(Y: Any, strata: Sequence[Any] | None = None,
                       confidence: float = 0.95) -> SeedItemEstimate:
    """Accuracy of a ``k × n`` 0/1 matrix (or one vector, ``k = 1``); ``strata`` (one label per
    item, e.g. the BBH task) makes it the macro average with a within-stratum item part."""
    M = _as_matrix(Y)
    k, n = M.shape
    r = batched_accuracy(M, strata, confidence)
    x = r["per_seed"]
    return SeedItemEstimate(
        mean=float(r["mean"]), sd_seeds=float(x.std(ddof=1)) if k > 1 else 0.0, k=k, n=n,
        se=float(r["se"]), df=effective_df(float(r["crit"])), ci_low=float(r["ci_low"]),
        ci_high=float(r["ci_high"]),
        interval="Wilson over items" if int(r["wilson"]) else ("two-way t" if k > 1 else "items t"),
        per_seed=tuple(float(v) for v in x),
        components=VarianceComponents(float(r["sigma2_seed"]), float(r["resid_per_seed"]),
                                      float(r["item_var"]), float(r["df_item"])),
        n_strata=len({str(t) for t in strata}) if strata is not None else 1)


def seed_paired_t(per_seed_diff: Any, confidence: float = 0.95) -> tuple[Any, Any, Any]:
    """Seed-level paired t on per-seed differences: ``(p, ci_low, ci_high)`` (NaN for k < 2;
    p NaN when every seed gives the same difference; vectorised over leading axes)."""
    d = np.asarray(per_seed_diff, dtype=float)
    k = d.shape[-1]
    if k < 2:
        nan = np.full(d.shape[:-1], np.nan)
        return (float(nan), float(nan), float(nan)) if nan.ndim == 0 else (nan, nan, nan)
    mean = d.mean(-1)
    se = d.std(-1, ddof=1) / math.sqrt(k)
    ok = se > 1e-12 * np.maximum(1.0, np.abs(mean))  # identical per-seed differences: no test
    with np.errstate(divide="ignore", invalid="ignore"):
        tstat = mean / np.where(ok, se, 1.0)
    from scipy.stats import t as student_t

    p = np.where(ok, np.minimum(1.0, 2 * student_t.sf(np.abs(tstat), k - 1)), np.nan)
    half = float(student_t.isf((1 - confidence) / 2, k - 1)) * se
    lo, hi = mean - half, mean + half
    if np.ndim(p) == 0:
        return float(p), float(lo), float(hi)
    return p, lo, hi


def seed_item_difference(A: Any, B: Any, strata: Sequence[Any] | None = None,
                         confidence: float = 0.95, alpha: float = 0.05,
                         power: float = 0.8) -> SeedItemComparison:
    """``A − B`` on the same items. ``A``, ``B``: ``k × n`` matrices with seeds matched by row, or
    one of them a single vector (a model evaluated once), used once against every seed row."""
    MA, MB = _as_matrix(A), _as_matrix(B)
    r = batched_difference(MA, MB, strata, confidence)
    x = r["per_seed"]
    k, n = x.shape[-1], MA.shape[1]
    se, df = float(r["se"]), effective_df(float(r["crit"]))
    return SeedItemComparison(
        diff=float(r["diff"]), se=se, df=df, ci_low=float(r["ci_low"]), ci_high=float(r["ci_high"]),
        pvalue=float(r["pvalue"]), k=k, n=n,
        single_baseline=bool(MB.shape[0] == 1 and MA.shape[0] > 1),
        per_seed_diff=tuple(float(v) for v in x), sd_seeds=float(x.std(ddof=1)) if k > 1 else 0.0,
        seed_t_pvalue=float(r["seed_t_pvalue"]), seed_t_ci_low=float(r["seed_t_ci_low"]),
        seed_t_ci_high=float(r["seed_t_ci_high"]),
        mdd=min_detectable_difference(se, df, alpha, power) if se > 0 else math.nan,
        components=VarianceComponents(float(r["sigma2_seed"]), float(r["resid_per_seed"]),
                                      float(r["item_var"]), float(r["df_item"])),
        acc_a=float(two_way_moments(MA, strata)["mean"]),
        acc_b=float(two_way_moments(MB, strata)["mean"]),
        interval="two-way t" if r["var"] > 0 else "degenerate (Wilson bound)")


# --- Multiplicity and power ------------------------------------------------------------------------


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaNs are left out of the family and stay NaN):
    ``p̃_(j) = max_{i ≤ j} min(1, (m − i + 1) p_(i))`` over the ascending order."""
    p = np.asarray(list(pvalues), dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adj)
    return out


def min_detectable_difference(se: float, df: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true ``|Δ|`` that a two-sided level-``alpha`` t-test on ``df`` df with standard
    error ``se`` detects with probability ``power`` (noncentral t; normal for infinite df)."""
    if not (se > 0) or math.isnan(df):
        return math.nan
    from scipy.optimize import brentq
    from scipy.stats import nct, norm
    from scipy.stats import t as student_t

    if not math.isfinite(df) or df > 1e6:
        return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * se)
    tc = float(student_t.ppf(1 - alpha / 2, df))
    if df > 500:  # the noncentral t is numerically fragile here and ~ the shifted central one
        return float((tc + student_t.ppf(power, df)) * se)

    def f(lam: float) -> float:
        lower = float(nct.cdf(-tc, df, lam))  # negligible; scipy returns NaN far in the tail
        return float(nct.sf(tc, df, lam)) + (lower if math.isfinite(lower) else 0.0) - power

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        hi = tc + 4.0
        while f(hi) < 0 and hi < 1e4:
            hi *= 2
        if not np.isfinite(f(hi)) or f(hi) < 0:  # numerically out of reach: the approximation
            return float((tc + student_t.ppf(power, df)) * se)
        return float(brentq(f, 0.0, hi) * se)


def projected_mdd(components: VarianceComponents, k: int, alpha: float = 0.05,
                  power: float = 0.8) -> float:
    """MDD with ``k`` seeds on the same items, from the estimated components (seed part
    ``(σ̂²_seed + R)/k`` on ``k − 1`` df, item part on its Satterthwaite df, Cochran–Cox
    combination; ``k = 1``: conditional on one checkpoint, ``R`` + item part)."""
    vs = (components.sigma2_seed + components.resid_per_seed) / k if k > 1 else 0.0
    vi = components.item_var + (components.resid_per_seed if k == 1 else 0.0)
    m = {"var_seed_part": np.asarray(vs), "df_seed": np.asarray(float(k - 1) if k > 1 else np.nan),
         "var_item_part": np.asarray(vi), "df_item": np.asarray(components.df_item)}
    if vs + vi <= 0:
        return math.nan
    df = effective_df(float(_cc_crit(alpha, m)))
    return min_detectable_difference(math.sqrt(vs + vi), df, alpha, power)


# --- BBH per task, supplementary per-seed McNemar --------------------------------------------------


def per_task_seed_stats(Y: Any, tasks: Sequence[Any]) -> dict[str, dict[str, float]]:
    """``{task: {"mean", "sd", "k", "n"}}``: per-task accuracy, mean ± sd over the seeds."""
    M = _as_matrix(Y)
    codes, n_t, names = _strata_codes(tasks, M.shape[1])
    out: dict[str, dict[str, float]] = {}
    for j, name in enumerate(names):
        acc = M[:, codes == j].mean(1)
        out[name] = {"mean": float(acc.mean()), "sd": float(acc.std(ddof=1)) if acc.size > 1 else 0.0,
                     "k": int(M.shape[0]), "n": int(n_t[j])}
    return out


def per_seed_mcnemar(A: Any, B: Any) -> list[McNemarResult]:
    """Exact McNemar of each seed row of ``A`` against the matching row of ``B`` (or its single
    vector). Conditional on those checkpoints: supplementary, never a verdict."""
    MA, MB = _as_matrix(A), _as_matrix(B)
    if MB.shape[0] == 1:
        MB = np.repeat(MB, MA.shape[0], 0)
    if MA.shape != MB.shape:
        raise ValueError(f"shapes differ: {MA.shape} vs {MB.shape}")
    return [mcnemar_exact(a, b) for a, b in zip(MA, MB)]


# --- Older item-level helpers (kept for callers; pooled use ignores seed variance: no verdicts) ----


def bootstrap_ci(correct: Sequence[Any], confidence: float = 0.95,
                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the accuracy over items (``NaN, NaN`` for no items); a constant
    vector gets ``(p, p)``."""
    x = _as01(correct)
    if x.size == 0:
        return math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    from scipy.stats import bootstrap

    ci = bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                   method="percentile", rng=np.random.default_rng(seed), vectorized=True
                   ).confidence_interval
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class McNemarResult:
    """``n10``: A right & B wrong; ``n01``: A wrong & B right; exact two-sided p-value."""

    n10: int
    n01: int
    pvalue: float


def mcnemar_exact(a: Sequence[Any], b: Sequence[Any]) -> McNemarResult:
    """Exact McNemar test between two paired 0/1 vectors (``p = 1`` with no discordant pair)."""
    xa, xb = _as01(a), _as01(b)
    if xa.shape != xb.shape:
        raise ValueError(f"paired vectors differ in length: {xa.size} vs {xb.size}")
    n10, n01 = int(np.sum((xa == 1) & (xb == 0))), int(np.sum((xa == 0) & (xb == 1)))
    if n10 + n01 == 0:
        return McNemarResult(n10, n01, 1.0)
    from statsmodels.stats.contingency_tables import mcnemar

    n11, n00 = int(np.sum((xa == 1) & (xb == 1))), int(np.sum((xa == 0) & (xb == 0)))
    res = mcnemar([[n11, n10], [n01, n00]], exact=True)
    return McNemarResult(n10, n01, float(min(1.0, res.pvalue)))


def paired_bootstrap_diff(a: Sequence[Any], b: Sequence[Any], confidence: float = 0.95,
                          n_resamples: int = DEFAULT_RESAMPLES,
                          seed: int = 0) -> tuple[float, float, float]:
    """``(Δ, low, high)`` for ``Δ = mean(a) − mean(b)``, resampling the same items for both
    (``scipy.stats.bootstrap(..., paired=True)``, percentile). Item-level only."""
    xa, xb = _as01(a), _as01(b)
    if xa.shape != xb.shape:
        raise ValueError(f"paired vectors differ in length: {xa.size} vs {xb.size}")
    if xa.size == 0:
        return math.nan, math.nan, math.nan
    diff, d = float(xa.mean() - xb.mean()), xa - xb
    if np.all(d == d[0]):
        return diff, diff, diff
    from scipy.stats import bootstrap

    ci = bootstrap((xa, xb), lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis),
                   paired=True, confidence_level=confidence, n_resamples=n_resamples,
                   method="percentile", rng=np.random.default_rng(seed), vectorized=True
                   ).confidence_interval
    return diff, float(ci.low), float(ci.high)


def pair_by_id(a: Mapping[Any, Any], b: Mapping[Any, Any]) -> tuple[list[Any], list[bool], list[bool]]:
    """Items present in both ``{id: correct}`` maps, sorted by key: ``(keys, a_vals, b_vals)``."""
    keys = sorted(set(a) & set(b), key=lambda k: str(k))
    return keys, [bool(a[k]) for k in keys], [bool(b[k]) for k in keys]


@dataclass(frozen=True)
class PairedComparison:
    """A vs B on ``n`` shared items: accuracies, ``diff`` with its paired bootstrap CI, the
    discordant counts and the exact McNemar p. Item-level only: pooled over ``(seed, item)``
    keys it ignores seed variance, so the report no longer uses it."""

    n: int
    acc_a: float
    acc_b: float
    diff: float
    ci_low: float
    ci_high: float
    n10: int
    n01: int
    pvalue: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def significant(self) -> bool:
        """McNemar p < 0.05 and the CI excludes 0 (conditional on the items and checkpoints)."""
        return self.pvalue < 0.05 and (self.ci_low > 0 or self.ci_high < 0)


def compare_paired(a: Mapping[Any, Any], b: Mapping[Any, Any], confidence: float = 0.95,
                   n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> PairedComparison:
    """Pair two ``{item_key: correct}`` maps on their shared keys and compare them (item-level)."""
    _, xa, xb = pair_by_id(a, b)
    if not xa:
        raise ValueError("no shared items to compare")
    diff, lo, hi = paired_bootstrap_diff(xa, xb, confidence, n_resamples, seed)
    mc = mcnemar_exact(xa, xb)
    return PairedComparison(len(xa), float(np.mean(xa)), float(np.mean(xb)), diff, lo, hi,
                            mc.n10, mc.n01, mc.pvalue)


def per_task_accuracy(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """``{task: {"n", "correct", "accuracy"}}`` from prediction rows (``task``, ``correct``)."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        t = str(r.get("task") or "all")
        d = out.setdefault(t, {"n": 0, "correct": 0})
        d["n"] += 1
        d["correct"] += int(bool(r.get("correct")))
    for d in out.values():
        d["accuracy"] = d["correct"] / d["n"] if d["n"] else math.nan
    return dict(sorted(out.items()))


def micro_average(per_task: Mapping[str, Mapping[str, float]]) -> float:
    """``Σ_t correct_t / Σ_t n_t`` (every item weighs the same)."""
    n = sum(d["n"] for d in per_task.values())
    c = sum(d["correct"] for d in per_task.values())
    return c / n if n else math.nan


def macro_average(per_task: Mapping[str, Mapping[str, float]]) -> float:
    """Mean of the task accuracies (every task weighs the same)."""
    accs = [d["accuracy"] for d in per_task.values() if d["n"]]
    return float(np.mean(accs)) if accs else math.nan
