"""The report's figures (matplotlib, Agg backend: they work headless): per-seed dots over each
method's bar, the forest plot of every comparison, the BBH per-task heatmap, training health."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slmkd import stats

METHOD_ORDER = ["base", "sft", "kd", "kd-cached", "cascod", "cascod-2stage", "cascod-kd"]
ALPHA = 0.05

if TYPE_CHECKING:  # pragma: no cover
    from slmkd.report.build import _Comparison


def _method_key(m: str | None) -> tuple[int, str]:
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), str(m))


def _slug(name: Any) -> str:
    from slmkd.layout import model_slug

    return model_slug(str(name)) if name else "?"



def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _plot_accuracy(bars: list[tuple[str, str, stats.SeedItemEstimate]], dataset: str, metric: str,
                   teacher: stats.SeedItemEstimate | None, path: Path) -> Path | None:
    """Bars = mean with the 95% CI, one dot per seed over its bar; teacher as a dashed line."""
    if not bars:
        return None
    plt = _pyplot()
    students = sorted({s for s, _m, _e in bars})
    methods = sorted({m for _s, m, _e in bars}, key=_method_key)
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(students) * len(methods) + 3), 4))
    width = 0.8 / len(methods)
    rng = np.random.default_rng(0)
    for j, m in enumerate(methods):
        pts = [(students.index(s) + (j - (len(methods) - 1) / 2) * width, e)
               for s, mm, e in bars if mm == m]
        for x, e in pts:
            ax.scatter(x + rng.uniform(-0.18, 0.18, len(e.per_seed)) * width,
                       [100 * v for v in e.per_seed], s=14, color="k", zorder=3, linewidths=0)
        ax.bar([x for x, _ in pts], [100 * e.mean for _, e in pts], width, alpha=0.75, label=m,
               color=f"C{j % 10}", capsize=3,
               yerr=[[100 * max(e.mean - e.ci_low, 0) for _, e in pts],
                     [100 * max(e.ci_high - e.mean, 0) for _, e in pts]])
    if teacher is not None:
        ax.axhline(100 * teacher.mean, color="k", ls="--", lw=1, label="teacher")
    ax.set_xticks(range(len(students)), students, fontsize=8)
    ax.set_ylabel(f"{metric} accuracy (%)")
    ax.set_title(f"{dataset}: mean over seeds (bar), each seed (dot), 95% CI (two-way seed × item)",
                 fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _plot_forest(comps: list[_Comparison], path: Path) -> Path | None:
    """Every comparison's Δ (pts) with its 95% CI and the zero line; filled = Holm-significant."""
    if not comps:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.32 * len(comps) + 1.2)))
    ys = np.arange(len(comps))[::-1]
    for y, c in zip(ys, comps):
        col = "C0" if c.eligible and c.p_holm < ALPHA else "0.5"
        ax.plot([100 * c.res.ci_low, 100 * c.res.ci_high], [y, y], color=col, lw=1.5)
        ax.plot(100 * c.res.diff, y, "o", color=col, mfc=col if col == "C0" else "white", ms=5)
    ax.axvline(0, color="k", lw=1)
    ax.set_yticks(ys, [c.label + ("" if c.eligible else " (k=1)") for c in comps], fontsize=7)
    ax.set_xlabel("Δ accuracy (pts), 95% CI (two-way seed × item); filled: Holm p < 0.05")
    ax.set_title("All comparisons", fontsize=9)
    return _save(fig, path)


def _plot_bbh_heatmap(rows: list[tuple[str, dict[str, float]]], path: Path) -> Path | None:
    if not rows:
        return None
    plt = _pyplot()
    tasks = sorted({t for _, pt in rows for t in pt})
    data = np.array([[pt.get(t, np.nan) for t in tasks] for _, pt in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(max(8, 0.4 * len(tasks)), max(2.5, 0.45 * len(rows) + 1.5)))
    im = ax.imshow(100 * data, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=90, fontsize=6)
    ax.set_yticks(range(len(rows)), [n for n, _ in rows], fontsize=7)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_title("BBH accuracy per task (mean over seeds)")
    return _save(fig, path)


def _plot_training_health(trains: list[dict[str, Any]], path: Path) -> Path | None:
    if not trains:
        return None
    plt = _pyplot()
    labels = [f"{t.get('method')}/{_slug(t.get('student'))}/s{t.get('seed')}" for t in trains]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.5 * len(trains) + 4), 3.5))
    axes[0].bar(range(len(trains)), [100 * float(t.get("skipped_fraction") or 0) for t in trains])
    axes[0].set_title("skipped batches (%)")
    for key, off in (("final_loss", -0.25), ("final_ce", 0.0), ("final_kd", 0.25)):
        vals = [t.get(key) for t in trains]
        xs = [i + off for i, v in enumerate(vals) if v is not None]
        ys = [float(v) for v in vals if v is not None]
        if ys:
            axes[1].bar(xs, ys, 0.25, label=key)
    axes[1].set_title("final losses")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(range(len(trains)), labels, rotation=60, ha="right", fontsize=6)
    return _save(fig, path)
