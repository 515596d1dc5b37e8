"""slmkd.stats against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slmkd.stats import (
    bootstrap_ci,
    compare_paired,
    macro_average,
    mcnemar_exact,
    mean_std,
    micro_average,
    pair_by_id,
    paired_bootstrap_diff,
    per_task_accuracy,
)


def test_mean_std_sample_std():
    m, s = mean_std([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6)
    assert s == pytest.approx(0.1)  # sqrt(((-.1)^2 + 0 + .1^2) / 2)
    assert mean_std([0.4]) == (0.4, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


def test_mcnemar_exact_hand_computed():
    # n10 = 6, n01 = 1: p = 2 * P(Bin(7, .5) <= 1) = 2 * (1 + 7) / 128 = 0.125
    a = [1] * 6 + [0] + [1, 1, 0, 0]
    b = [0] * 6 + [1] + [1, 1, 0, 0]
    r = mcnemar_exact(a, b)
    assert (r.n10, r.n01) == (6, 1)
    assert r.pvalue == pytest.approx(0.125)
    # n10 = 5, n01 = 0: p = 2 / 32 = 0.0625
    assert mcnemar_exact([1] * 5, [0] * 5).pvalue == pytest.approx(0.0625)
    # no discordant pair: p = 1
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]).pvalue == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact([1, 0], [1])


def test_bootstrap_ci_degenerate_and_normal_approx():
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)
    assert bootstrap_ci([0, 0]) == (0.0, 0.0)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    # p = 0.5, n = 400: normal approximation 0.5 ± 1.96 * sqrt(.25 / 400) = 0.5 ± 0.049
    x = [1, 0] * 200
    lo, hi = bootstrap_ci(x, seed=1)
    assert lo < 0.5 < hi
    assert lo == pytest.approx(0.451, abs=0.012)
    assert hi == pytest.approx(0.549, abs=0.012)
    assert bootstrap_ci(x, seed=1) == (lo, hi)  # seeded: reproducible


def test_paired_bootstrap_diff():
    assert paired_bootstrap_diff([1, 1, 0], [1, 1, 0]) == (0.0, 0.0, 0.0)
    assert paired_bootstrap_diff([1, 1], [0, 0]) == (1.0, 1.0, 1.0)
    # differences d_i = a_i - b_i in {+1 (x60), 0 (x340)}: Δ = 0.15,
    # SE = sqrt(var(d)/n) = sqrt((0.15 - 0.0225) / 400) = 0.01785 -> 0.15 ± 0.035
    a = [1] * 60 + [1] * 100 + [0] * 240
    b = [0] * 60 + [1] * 100 + [0] * 240
    diff, lo, hi = paired_bootstrap_diff(a, b, seed=3)
    assert diff == pytest.approx(0.15)
    assert lo == pytest.approx(0.115, abs=0.01)
    assert hi == pytest.approx(0.185, abs=0.01)
    # pairing matters: an unpaired interval would be far wider (SE ~ 0.032)
    assert hi - lo < 0.09


def test_pair_by_id_and_compare_paired():
    a = {"x": True, "y": True, "z": False, "only_a": True}
    b = {"x": False, "y": True, "z": False, "only_b": False}
    keys, xa, xb = pair_by_id(a, b)
    assert keys == ["x", "y", "z"]
    assert xa == [True, True, False] and xb == [False, True, False]
    c = compare_paired(a, b)
    assert c.n == 3
    assert c.acc_a == pytest.approx(2 / 3) and c.acc_b == pytest.approx(1 / 3)
    assert c.diff == pytest.approx(1 / 3)
    assert (c.n10, c.n01) == (1, 0) and c.pvalue == 1.0
    assert not c.significant
    # pooled over seeds: keys (seed, id)
    pooled_a = {(s, i): True for s in (0, 1) for i in range(10)}
    pooled_b = {(s, i): i < 2 for s in (0, 1) for i in range(10)}
    c2 = compare_paired(pooled_a, pooled_b)
    assert c2.n == 20 and (c2.n10, c2.n01) == (16, 0)
    assert c2.pvalue == pytest.approx(2 * 0.5**16)
    assert c2.significant
    with pytest.raises(ValueError):
        compare_paired({"a": 1}, {"b": 1})


def test_per_task_micro_macro():
    rows = (
        [{"task": "t1", "correct": True}] * 3
        + [{"task": "t1", "correct": False}]
        + [{"task": "t2", "correct": False}] * 4
        + [{"task": "t2", "correct": True}] * 4
    )
    pt = per_task_accuracy(rows)
    assert pt["t1"] == {"n": 4, "correct": 3, "accuracy": 0.75}
    assert pt["t2"]["accuracy"] == 0.5
    assert micro_average(pt) == pytest.approx(7 / 12)
    assert macro_average(pt) == pytest.approx(0.625)
    assert math.isnan(micro_average({}))
    assert np.isnan(macro_average({}))
