"""slmkd.stats against hand-computed values, and a simulated null study that the old pooled
procedure fails."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import nct
from scipy.stats import t as student_t

from slmkd import stats
from slmkd.stats import (
    bootstrap_ci,
    compare_paired,
    holm,
    macro_average,
    mcnemar_exact,
    mean_std,
    micro_average,
    min_detectable_difference,
    pair_by_id,
    paired_bootstrap_diff,
    per_seed_mcnemar,
    per_task_accuracy,
    per_task_seed_stats,
    seed_item_accuracy,
    seed_item_difference,
    two_way_moments,
    wilson_interval,
)

# 3 seeds x 4 items, worked by hand below
Y34 = np.array([[1, 1, 1, 0],
                [1, 1, 0, 0],
                [1, 0, 0, 0]], dtype=float)


def test_mean_std_sample_std():
    m, s = mean_std([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6)
    assert s == pytest.approx(0.1)  # sqrt(((-.1)^2 + 0 + .1^2) / 2)
    assert mean_std([0.4]) == (0.4, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


def test_two_way_moments_hand_computed():
    # per-seed accuracies x = (3/4, 1/2, 1/4): mean 1/2, var_s(x) = 1/16 -> seed part 1/48
    # item means z = (1, 2/3, 1/3, 0): var 5/27 -> MS_item = 3 * 5/27 = 5/9
    # residuals Y - x_s - z_i + 1/2: squares sum to 5/6 over (3-1)(4-1) = 6 df -> MS_res = 5/36
    # item part (MS_item - MS_res) / (k n) = (5/9 - 5/36) / 12 = 5/144;  V = 1/48 + 5/144 = 1/18
    m = two_way_moments(Y34)
    assert float(m["mean"]) == pytest.approx(0.5)
    assert float(m["var_seed_part"]) == pytest.approx(1 / 48)
    assert float(m["var_item_part"]) == pytest.approx(5 / 144)
    assert float(m["var"]) == pytest.approx(1 / 18)
    assert float(m["df_seed"]) == 2
    # components: R = MS_res / n = 5/144, sigma2_seed = var_s(x) - R = 9/144 - 5/144 = 1/36
    assert float(m["resid_per_seed"]) == pytest.approx(5 / 144)
    assert float(m["sigma2_seed"]) == pytest.approx(1 / 36)
    # Satterthwaite df of the item part: (5/144)^2 / ((5/108)^2/3 + (5/432)^2/6) = 18/11 < 2,
    # floored at k - 1 = 2
    assert float(m["df_item"]) == pytest.approx(2.0)


def test_difference_ci_and_p_hand_computed():
    # A − 0 = Y34: both parts on 2 df -> Cochran–Cox critical value t_2; Δ = 1/2, se = sqrt(1/18)
    r = seed_item_difference(Y34, np.zeros(4))
    se = math.sqrt(1 / 18)
    t2 = student_t.isf(0.025, 2)  # 4.303
    assert r.diff == pytest.approx(0.5) and r.se == pytest.approx(se)
    assert (r.ci_low, r.ci_high) == pytest.approx((0.5 - t2 * se, 0.5 + t2 * se))
    assert r.pvalue == pytest.approx(2 * student_t.sf(0.5 / se, 2), rel=1e-6)  # 0.168
    assert r.df == pytest.approx(2.0, rel=1e-6)
    assert r.k == 3 and r.n == 4 and r.single_baseline
    # the seed-level paired t (cross-check) ignores the item part: per-seed (.75, .5, .25)
    assert r.seed_t_pvalue == pytest.approx(2 * student_t.sf(0.5 / (0.25 / math.sqrt(3)), 2))
    assert r.seed_t_pvalue < r.pvalue


def test_single_baseline_is_used_once_not_replicated():
    # A: the same checkpoint behaviour on every seed (no seed variance); B evaluated once
    A = np.tile([1.0, 1.0, 0.0, 0.0], (3, 1))
    b = np.array([0.0, 0.0, 1.0, 0.0])
    r = seed_item_difference(A, b)
    # D_si = A_si - b_i = (1, 1, -1, 0) on every seed: Δ = 1/4; all variance is item variance,
    # var(1, 1, -1, 0) = 11/12 over n = 4 items (not 3 x 4 pairs): V = 11/48, df = n - 1 = 3
    assert r.diff == pytest.approx(0.25) and r.n == 4
    assert r.se ** 2 == pytest.approx(11 / 48)
    assert r.df == pytest.approx(3.0, rel=1e-6)
    assert r.pvalue == pytest.approx(2 * student_t.sf(0.25 / math.sqrt(11 / 48), 3), rel=1e-6)
    assert r.components.sigma2_seed == 0.0
    # the old pooled pairing counts b three times: 12 "independent" pairs, variance / 3.7
    pooled = compare_paired({(s, i): A[s, i] for s in range(3) for i in range(4)},
                            {(s, i): b[i] for s in range(3) for i in range(4)})
    assert pooled.n == 12
    assert np.var([1, 1, -1, 0] * 3, ddof=1) / 12 < r.se ** 2 / 3
    # per-seed McNemar pairs every seed with the same single vector
    mc = per_seed_mcnemar(A, b)
    assert len(mc) == 3 and all((m.n10, m.n01) == (2, 1) for m in mc)


def test_seeds_must_match():
    with pytest.raises(ValueError, match="seeds not matched"):
        seed_item_difference(np.zeros((3, 4)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="different numbers of items"):
        seed_item_difference(np.zeros((3, 4)), np.zeros(5))


def test_accuracy_intervals_k1_degenerate_and_wilson():
    # k = 1: Wilson over items. p = 3/4, n = 4, z = 1.96:
    # centre (0.75 + z²/8) / (1 + z²/4) = 0.6276, half z sqrt(.1875/4 + z²/64) / (1 + z²/4) = 0.3269
    e = seed_item_accuracy([1, 0, 1, 1])
    assert e.k == 1 and e.interval == "Wilson over items"
    assert (e.ci_low, e.ci_high) == pytest.approx((0.3006, 0.9544), abs=2e-4)
    assert wilson_interval(0.75, 4) == pytest.approx((e.ci_low, e.ci_high))
    # all wrong over 3 seeds x 300 items: [0, z²/(n + z²)] = [0, 1.26%], never [0, 0]
    z = seed_item_accuracy(np.zeros((3, 300)))
    assert z.mean == 0 and z.ci_low == pytest.approx(0.0, abs=1e-12)
    assert z.ci_high == pytest.approx(1.959964**2 / (300 + 1.959964**2))
    one = seed_item_accuracy(np.ones((3, 300)))
    assert one.ci_high == 1.0 and one.ci_low == pytest.approx(1 - z.ci_high)
    # constant difference: all 0 -> [-u, u], p = 1; all +1 -> [1 - 2u, 1], exact sign test
    d0 = seed_item_difference(np.zeros((3, 10)), np.zeros(10))
    u = 1.959964**2 / (10 + 1.959964**2)
    assert (d0.ci_low, d0.ci_high, d0.pvalue) == pytest.approx((-u, u, 1.0))
    d1 = seed_item_difference(np.ones((3, 10)), np.zeros(10))
    assert (d1.ci_low, d1.ci_high) == pytest.approx((1 - 2 * u, 1.0))
    assert d1.pvalue == pytest.approx(2 * 0.5**10)
    # k >= 2: a two-way t interval around the mean of the per-seed accuracies
    e3 = seed_item_accuracy(Y34)
    assert e3.mean == 0.5 and e3.sd_seeds == pytest.approx(0.25) and e3.per_seed == (0.75, 0.5, 0.25)
    assert e3.interval == "two-way t" and (e3.ci_low, e3.ci_high) == (0.0, 1.0)  # clipped


def test_bbh_macro_stratified_and_per_task():
    # task a: 2 items both right, task b: 4 items, 1 right; one evaluation (k = 1)
    y = [1, 1, 1, 0, 0, 0]
    tasks = ["a", "a", "b", "b", "b", "b"]
    macro = seed_item_accuracy(y, tasks)
    micro = seed_item_accuracy(y)
    assert macro.mean == pytest.approx((1 + 0.25) / 2) and micro.mean == pytest.approx(0.5)
    # stratified: V = sum_t var_t / (T² n_t) = 0 + (1/4) / (4 * 4) = 1/64, Welch df = 3
    assert macro.se == pytest.approx(1 / 8)
    assert macro.ci_low == pytest.approx(0.625 - student_t.isf(0.025, 3) / 8)
    assert macro.n_strata == 2 and micro.interval == "Wilson over items"
    pt = per_task_seed_stats(np.array([y, [1, 0, 1, 1, 0, 0]]), tasks)
    assert pt["a"] == {"mean": 0.75, "sd": pytest.approx(math.sqrt(0.125)), "k": 2, "n": 2}
    assert pt["b"]["mean"] == pytest.approx(0.375) and pt["b"]["n"] == 4


def test_holm_known_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    adj = holm([0.01, 0.04, 0.03, 0.005])
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])
    from statsmodels.stats.multitest import multipletests

    p = [0.2, 0.001, 0.04, 0.03, 0.5]
    assert holm(p) == pytest.approx(multipletests(p, method="holm")[1])
    both = holm([0.01, math.nan, 0.02])  # NaNs are not in the family
    assert both[0] == pytest.approx(0.02) and math.isnan(both[1]) and both[2] == pytest.approx(0.02)


def test_min_detectable_difference():
    # normal limit: (z_.975 + z_.8) * se = 2.8016 * se
    assert min_detectable_difference(0.01, math.inf) == pytest.approx(0.028016, abs=1e-5)
    # finite df: the two-sided t-test on 2 df rejects with probability 0.8 at the MDD
    d = min_detectable_difference(0.01, 2.0)
    tc = student_t.isf(0.025, 2)
    assert nct.sf(tc, 2, d / 0.01) + nct.cdf(-tc, 2, d / 0.01) == pytest.approx(0.8, abs=1e-6)
    assert d > min_detectable_difference(0.01, 20.0) > 0.028
    # projected from components: more seeds, smaller MDD
    A = np.array([[1, 1, 0, 1, 0, 1], [0, 1, 0, 0, 0, 1], [1, 1, 1, 1, 0, 1]], dtype=float)
    r = seed_item_difference(A, np.zeros(6))
    assert r.components.sigma2_seed > 0
    assert stats.projected_mdd(r.components, 10) < stats.projected_mdd(r.components, 5) < r.mdd


def _calibration_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "stats_calibration.py"
    spec = importlib.util.spec_from_file_location("stats_calibration", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_null_study_new_procedure_calibrated_old_pooled_not():
    """Two identically distributed methods, 3 seeds, 300 items, across-seed sd 6 pts: the report's
    procedure keeps its false-positive rate near 5%; the old pooled McNemar does not."""
    cal = _calibration_module()
    rng = np.random.default_rng(123)
    A, B, true_diff, _, _ = cal.simulate(rng, 300, 3, 6.0)
    assert true_diff == 0.0
    r = stats.batched_difference(A, B)
    fpr_new = float(np.mean(r["pvalue"] < 0.05))
    fpr_old = float(np.mean(cal.old_pooled_significant(A, B)))
    assert fpr_new <= 0.10
    assert fpr_old >= 0.30
    cover = np.mean((r["ci_low"] <= 0) & (0 <= r["ci_high"]))
    assert cover >= 0.90
    # a base model evaluated once: the old procedure replicates it, the new one does not
    A, B, _, _, _ = cal.simulate(rng, 300, 3, 0.0, single_baseline=True)
    assert B.shape[1] == 1
    assert np.mean(stats.batched_difference(A, B)["pvalue"] < 0.05) <= 0.10
    assert np.mean(cal.old_pooled_significant(A, B)) >= 0.10


# --- the older item-level helpers (kept; no longer used for verdicts) ---------------------------


def test_mcnemar_exact_hand_computed():
    # n10 = 6, n01 = 1: p = 2 * P(Bin(7, .5) <= 1) = 2 * (1 + 7) / 128 = 0.125
    a = [1] * 6 + [0] + [1, 1, 0, 0]
    b = [0] * 6 + [1] + [1, 1, 0, 0]
    r = mcnemar_exact(a, b)
    assert (r.n10, r.n01) == (6, 1)
    assert r.pvalue == pytest.approx(0.125)
    assert mcnemar_exact([1] * 5, [0] * 5).pvalue == pytest.approx(0.0625)
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]).pvalue == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact([1, 0], [1])


def test_bootstrap_ci_degenerate_and_normal_approx():
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    x = [1, 0] * 200  # 0.5 ± 1.96 * sqrt(.25 / 400) = 0.5 ± 0.049
    lo, hi = bootstrap_ci(x, seed=1)
    assert lo == pytest.approx(0.451, abs=0.012) and hi == pytest.approx(0.549, abs=0.012)
    assert bootstrap_ci(x, seed=1) == (lo, hi)


def test_paired_bootstrap_diff_and_pairing():
    assert paired_bootstrap_diff([1, 1, 0], [1, 1, 0]) == (0.0, 0.0, 0.0)
    a = [1] * 60 + [1] * 100 + [0] * 240
    b = [0] * 60 + [1] * 100 + [0] * 240
    diff, lo, hi = paired_bootstrap_diff(a, b, seed=3)
    assert diff == pytest.approx(0.15)
    assert lo == pytest.approx(0.115, abs=0.01) and hi == pytest.approx(0.185, abs=0.01)
    keys, xa, xb = pair_by_id({"x": True, "y": True, "z": False, "only_a": True},
                              {"x": False, "y": True, "z": False, "only_b": False})
    assert keys == ["x", "y", "z"] and xa == [True, True, False] and xb == [False, True, False]
    with pytest.raises(ValueError):
        compare_paired({"a": 1}, {"b": 1})


def test_per_task_micro_macro():
    rows = ([{"task": "t1", "correct": True}] * 3 + [{"task": "t1", "correct": False}]
            + [{"task": "t2", "correct": False}] * 4 + [{"task": "t2", "correct": True}] * 4)
    pt = per_task_accuracy(rows)
    assert pt["t1"] == {"n": 4, "correct": 3, "accuracy": 0.75}
    assert micro_average(pt) == pytest.approx(7 / 12)
    assert macro_average(pt) == pytest.approx(0.625)
    assert math.isnan(micro_average({}))
