"""Statistics for the study: seeds, bootstrap intervals, paired tests, BBH averages.

* Across training seeds: ``mean ± std`` of the per-seed accuracies (sample std, ``ddof=1``).
* Over items: a 95% percentile bootstrap CI of the accuracy ``p = (1/n) Σ_i c_i``
  (``c_i ∈ {0, 1}``), resampling items with replacement (:func:`scipy.stats.bootstrap`).
* Between two methods A and B scored on the same items: the exact McNemar test on the discordant
  pairs ``n10 = #{A right, B wrong}``, ``n01 = #{A wrong, B right}`` (two-sided binomial test of
  ``n10 ~ Bin(n10 + n01, 1/2)``; :func:`statsmodels.stats.contingency_tables.mcnemar`,
  ``exact=True``) and a paired bootstrap CI of ``Δ = p_A − p_B`` where each resample draws the
  same items for both methods.
* BBH: accuracy per task and the micro average over all items (``Σ correct / Σ n``); the macro
  average (mean of task accuracies) is reported beside it.

Everything takes plain sequences of booleans / 0-1 ints; item pairing is done by id with
:func:`pair_by_id` (pooled over seeds by keying on ``(seed, id)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "McNemarResult",
    "PairedComparison",
    "bootstrap_ci",
    "compare_paired",
    "macro_average",
    "mcnemar_exact",
    "mean_std",
    "micro_average",
    "paired_bootstrap_diff",
    "pair_by_id",
    "per_task_accuracy",
]

DEFAULT_RESAMPLES = 2000


def _as01(values: Iterable[Any]) -> np.ndarray:
    arr = np.asarray([1.0 if bool(v) else 0.0 for v in values], dtype=float)
    return arr


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, sample std with ddof=1)``; std is 0.0 for a single value, NaNs for none."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std


def bootstrap_ci(
    correct: Sequence[Any],
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the accuracy over items (``NaN, NaN`` for no items).

    A constant vector (all right / all wrong) has a degenerate interval ``(p, p)``.
    """
    x = _as01(correct)
    if x.size == 0:
        return math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    from scipy.stats import bootstrap

    res = bootstrap(
        (x,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
        rng=np.random.default_rng(seed), vectorized=True,
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


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
    n10 = int(np.sum((xa == 1) & (xb == 0)))
    n01 = int(np.sum((xa == 0) & (xb == 1)))
    if n10 + n01 == 0:
        return McNemarResult(n10, n01, 1.0)
    from statsmodels.stats.contingency_tables import mcnemar

    n11 = int(np.sum((xa == 1) & (xb == 1)))
    n00 = int(np.sum((xa == 0) & (xb == 0)))
    res = mcnemar([[n11, n10], [n01, n00]], exact=True)
    return McNemarResult(n10, n01, float(min(1.0, res.pvalue)))


def paired_bootstrap_diff(
    a: Sequence[Any],
    b: Sequence[Any],
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(Δ, low, high)`` for ``Δ = mean(a) − mean(b)``; each resample uses the same items for
    both vectors (``scipy.stats.bootstrap(..., paired=True)``, percentile method)."""
    xa, xb = _as01(a), _as01(b)
    if xa.shape != xb.shape:
        raise ValueError(f"paired vectors differ in length: {xa.size} vs {xb.size}")
    if xa.size == 0:
        return math.nan, math.nan, math.nan
    diff = float(xa.mean() - xb.mean())
    d = xa - xb
    if np.all(d == d[0]):
        return diff, diff, diff
    from scipy.stats import bootstrap

    def stat(x, y, axis=-1):
        return np.mean(x, axis=axis) - np.mean(y, axis=axis)

    res = bootstrap(
        (xa, xb), stat, paired=True, confidence_level=confidence, n_resamples=n_resamples,
        method="percentile", rng=np.random.default_rng(seed), vectorized=True,
    )
    return diff, float(res.confidence_interval.low), float(res.confidence_interval.high)


def pair_by_id(
    a: Mapping[Any, Any], b: Mapping[Any, Any]
) -> tuple[list[Any], list[bool], list[bool]]:
    """Items present in both ``{id: correct}`` maps, sorted by key: ``(keys, a_vals, b_vals)``."""
    keys = sorted(set(a) & set(b), key=lambda k: str(k))
    return keys, [bool(a[k]) for k in keys], [bool(b[k]) for k in keys]


@dataclass(frozen=True)
class PairedComparison:
    """A vs B on ``n`` shared items: accuracies, ``diff = acc_a − acc_b`` with its paired
    bootstrap CI, the discordant counts and the exact McNemar p-value."""

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
        """McNemar p < 0.05 and the CI of the difference excludes 0."""
        return self.pvalue < 0.05 and (self.ci_low > 0 or self.ci_high < 0)


def compare_paired(
    a: Mapping[Any, Any],
    b: Mapping[Any, Any],
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> PairedComparison:
    """Pair two ``{item_key: correct}`` maps on their shared keys and compare them.

    Pool over seeds by keying both maps on ``(seed, item_id)``.
    """
    _, xa, xb = pair_by_id(a, b)
    if not xa:
        raise ValueError("no shared items to compare")
    diff, lo, hi = paired_bootstrap_diff(xa, xb, confidence, n_resamples, seed)
    mc = mcnemar_exact(xa, xb)
    return PairedComparison(
        n=len(xa), acc_a=float(np.mean(xa)), acc_b=float(np.mean(xb)), diff=diff, ci_low=lo,
        ci_high=hi, n10=mc.n10, n01=mc.n01, pvalue=mc.pvalue,
    )


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
