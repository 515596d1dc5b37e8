"""The study report (notebook 05, ``slmkd report``): tables, paired statistics and figures.

Reads every ``{drive_root}/eval/{model}/{dataset}/summary.json`` (+ its ``predictions.jsonl``)
and every ``{drive_root}/runs/**/train_summary.json``; writes ``{drive_root}/report/``:

* ``report.md``  — headline verdicts, accuracy per method × student (mean ± std over seeds and
  a 95% bootstrap CI over the pooled (seed, item) pairs), the teacher's and base students'
  accuracy, paired comparisons (each method vs CoT-SFT ``sft`` and vs the base student; pooled
  over seeds by pairing run seed ``s`` with baseline seed ``s`` on the same items, and per seed),
  BBH per task, training health (skipped-batch fraction, final losses).
* ``results.csv`` — one row per evaluated model × dataset.
* ``comparisons.csv`` — every paired comparison (pooled and per seed).
* PNGs: ``accuracy_{dataset}.png`` (bars with CIs), ``bbh_per_task.png`` (heatmap, when BBH was
  evaluated), ``training_health.png``.

Paired statistics come from :mod:`slmkd.stats`: ``Δ = acc(method) − acc(baseline)`` with a paired
bootstrap 95% CI, and the exact McNemar test on the discordant pairs. A difference is called
significant when McNemar p < 0.05 and the CI excludes 0.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmkd import stats

__all__ = ["ReportResult", "add_report_command", "build_report", "collect_results",
           "write_report"]

logger = logging.getLogger(__name__)

BASELINE_METHOD = "sft"
METHOD_ORDER = ["base", "sft", "kd", "cascod", "cascod-2stage", "cascod-kd"]


@dataclass
class EvalResult:
    """One evaluated model on one dataset: its summary and ``{item_id: correct}``."""

    summary: dict[str, Any]
    correct: dict[str, bool]

    @property
    def kind(self) -> str:
        return str(self.summary.get("kind") or "base")

    @property
    def method(self) -> str | None:
        return self.summary.get("method")

    @property
    def seed(self) -> int | None:
        s = self.summary.get("seed")
        return None if s is None else int(s)

    @property
    def dataset(self) -> str:
        return str(self.summary["dataset"])

    @property
    def student_slug(self) -> str:
        from slmkd.modeling import model_slug

        st = self.summary.get("student") or self.summary.get("model_name")
        return model_slug(str(st)) if st else str(self.summary.get("model"))


@dataclass
class ReportResult:
    """Where the report went and the short headline table printed by the CLI."""

    path: Path
    headline: str
    results_csv: Path
    comparisons_csv: Path
    figures: list[Path] = field(default_factory=list)


def _fmt_pct(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.{digits}f}"


def collect_results(drive_root: Path) -> tuple[list[EvalResult], list[dict[str, Any]]]:
    """All evaluation results and all training summaries under ``drive_root``."""
    evals: list[EvalResult] = []
    for sp in sorted((drive_root / "eval").glob("*/*/summary.json")):
        try:
            summary = json.loads(sp.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            logger.warning("skipping unreadable %s (%s)", sp, exc)
            continue
        correct: dict[str, bool] = {}
        pp = sp.parent / "predictions.jsonl"
        if pp.is_file():
            from slmkd.evaluation import read_predictions

            rows, _ = read_predictions(pp)
            correct = {k: bool(r.get("correct")) for k, r in rows.items()}
        summary.setdefault("dataset", sp.parent.name)
        summary.setdefault("model", sp.parent.parent.name)
        evals.append(EvalResult(summary, correct))
    trains = []
    for tp in sorted((drive_root / "runs").glob("**/train_summary.json")):
        try:
            d = json.loads(tp.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        d["_path"] = str(tp.parent)
        trains.append(d)
    return evals, trains


def _method_key(m: str | None) -> tuple[int, str]:
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), str(m))


def _pooled(results: list[EvalResult]) -> dict[tuple[int, str], bool]:
    """``{(seed, item_id): correct}`` over the seeds of ``results``."""
    out: dict[tuple[int, str], bool] = {}
    for r in results:
        for k, v in r.correct.items():
            out[(r.seed or 0, k)] = v
    return out


def _aggregate(results: list[EvalResult]) -> dict[str, Any]:
    accs = [float(r.summary["accuracy"]) for r in results]
    mean, std = stats.mean_std(accs)
    pooled = list(_pooled(results).values())
    lo, hi = stats.bootstrap_ci(pooled) if pooled else (math.nan, math.nan)
    return {"mean": mean, "std": std, "n_seeds": len(results), "ci_low": lo, "ci_high": hi,
            "seeds": sorted(r.seed for r in results if r.seed is not None),
            "n_items": int(results[0].summary.get("n", 0)) if results else 0}


def _verdict(c: stats.PairedComparison) -> str:
    if c.significant:
        return "significantly better" if c.diff > 0 else "significantly worse"
    return "not significant"


def _comparison_sentence(name_a: str, name_b: str, student: str, dataset: str,
                         c: stats.PairedComparison, n_seeds: int) -> str:
    return (f"{name_a} vs {name_b} on {student} ({dataset}): {100 * c.diff:+.1f} pts "
            f"(95% CI [{100 * c.ci_low:.1f}, {100 * c.ci_high:.1f}]), McNemar p={c.pvalue:.3g} "
            f"over {n_seeds} seed{'s' if n_seeds != 1 else ''} ({c.n} paired items) — "
            f"{_verdict(c)}")


def _compare(runs_a: list[EvalResult], runs_b: list[EvalResult] | EvalResult):
    """Pooled comparison (seed s of A with seed s of B, or every seed of A with one base result)
    and per-seed comparisons. Returns ``(pooled, {seed: comparison}, n_seeds)`` or ``None``."""
    if isinstance(runs_b, EvalResult):
        b_by_seed = {r.seed or 0: runs_b for r in runs_a}
    else:
        b_by_seed = {r.seed or 0: r for r in runs_b}
    a_pool: dict[tuple[int, str], bool] = {}
    b_pool: dict[tuple[int, str], bool] = {}
    per_seed: dict[int, stats.PairedComparison] = {}
    for ra in runs_a:
        s = ra.seed or 0
        rb = b_by_seed.get(s)
        if rb is None:
            continue
        shared = set(ra.correct) & set(rb.correct)
        if not shared:
            continue
        per_seed[s] = stats.compare_paired(ra.correct, rb.correct, seed=s)
        for k in shared:
            a_pool[(s, k)] = ra.correct[k]
            b_pool[(s, k)] = rb.correct[k]
    if not a_pool:
        return None
    return stats.compare_paired(a_pool, b_pool), per_seed, len(per_seed)


def _plot_accuracy(groups, dataset: str, teacher: EvalResult | None, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    students = sorted({s for (s, _m) in groups})
    methods = sorted({m for (_s, m) in groups}, key=_method_key)
    if not students or not methods:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(students) * len(methods) / 2), 4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs, ys, lo, hi = [], [], [], []
        for i, s in enumerate(students):
            agg = groups.get((s, m))
            if agg is None:
                continue
            xs.append(i + (j - (len(methods) - 1) / 2) * width)
            ys.append(100 * agg["mean"])
            lo.append(100 * max(agg["mean"] - agg["ci_low"], 0))
            hi.append(100 * max(agg["ci_high"] - agg["mean"], 0))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=m)
    if teacher is not None:
        ax.axhline(100 * teacher.summary["accuracy"], color="k", ls="--", lw=1,
                   label=f"teacher {teacher.summary.get('model')}")
    ax.set_xticks(range(len(students)), students, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{dataset}: accuracy (mean over seeds, 95% bootstrap CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_bbh_heatmap(rows: list[tuple[str, dict[str, float]]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    if not rows:
        return None
    tasks = sorted({t for _, pt in rows for t in pt})
    data = np.array([[pt.get(t, np.nan) for t in tasks] for _, pt in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(max(8, 0.4 * len(tasks)), max(2.5, 0.45 * len(rows) + 1.5)))
    im = ax.imshow(100 * data, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=90, fontsize=6)
    ax.set_yticks(range(len(rows)), [n for n, _ in rows], fontsize=7)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_title("BBH accuracy per task (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_training_health(trains: list[dict[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not trains:
        return None
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _slug(name: Any) -> str:
    from slmkd.modeling import model_slug

    return model_slug(str(name)) if name else "?"


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def build_report(cfg: Any = None, drive_root: str | Path | None = None) -> ReportResult:
    """Write ``{drive_root}/report/`` (see the module docstring) and return where it is plus a
    short headline table for the CLI."""
    from slmkd.runtime import atomic_write_text

    if drive_root is None:
        from slmkd.runtime import get_drive_root

        root = get_drive_root(cfg)
    else:
        root = Path(drive_root)
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    evals, trains = collect_results(root)

    runs: dict[tuple[str, str, str], list[EvalResult]] = defaultdict(list)  # (ds, student, m)
    bases: dict[tuple[str, str], EvalResult] = {}
    teachers: dict[str, EvalResult] = {}
    for r in evals:
        if r.kind == "run" and r.method:
            runs[(r.dataset, r.student_slug, r.method)].append(r)
        elif r.kind == "teacher":
            teachers[r.dataset] = r
        else:
            bases[(r.dataset, r.student_slug)] = r
    for v in runs.values():
        v.sort(key=lambda r: r.seed or 0)
    datasets = sorted({r.dataset for r in evals})

    # results.csv: one row per evaluated model x dataset
    res_rows = [[r.summary.get("model"), r.kind, r.method or "", r.student_slug,
                 "" if r.seed is None else r.seed, r.dataset, r.summary.get("n"),
                 r.summary.get("accuracy"), r.summary.get("strict_accuracy"),
                 r.summary.get("flexible_accuracy"), r.summary.get("ci_low"),
                 r.summary.get("ci_high")] for r in evals]
    results_csv = out / "results.csv"
    atomic_write_text(results_csv, _csv_text(
        ["model", "kind", "method", "student", "seed", "dataset", "n", "accuracy",
         "strict_accuracy", "flexible_accuracy", "ci_low", "ci_high"], res_rows))

    md: list[str] = ["# slmkd study report", ""]
    headline_rows: list[str] = []
    verdicts: list[str] = []
    comp_rows: list[list[Any]] = []
    comp_md: list[str] = []
    figures: list[Path] = []
    agg_md: list[str] = []

    for ds in datasets:
        groups = {(s, m): _aggregate(v) for (d, s, m), v in runs.items() if d == ds}
        students = sorted({s for (s, _m) in groups} | {s for (d, s) in bases if d == ds})
        agg_md += [f"### {ds}", "",
                   "| student | method | seeds | accuracy mean ± std (%) | pooled 95% CI (%) "
                   "| strict (%) | flexible (%) |",
                   "|---|---|---|---|---|---|---|"]
        if ds in teachers:
            t = teachers[ds].summary
            agg_md.append(f"| teacher {t.get('model')} | — | — | {_fmt_pct(t['accuracy'])} | "
                          f"[{_fmt_pct(t['ci_low'])}, {_fmt_pct(t['ci_high'])}] | "
                          f"{_fmt_pct(t.get('strict_accuracy'))} | "
                          f"{_fmt_pct(t.get('flexible_accuracy'))} |")
        for s in students:
            if (ds, s) in bases:
                b = bases[(ds, s)].summary
                agg_md.append(f"| {s} | base (no training) | — | {_fmt_pct(b['accuracy'])} | "
                              f"[{_fmt_pct(b['ci_low'])}, {_fmt_pct(b['ci_high'])}] | "
                              f"{_fmt_pct(b.get('strict_accuracy'))} | "
                              f"{_fmt_pct(b.get('flexible_accuracy'))} |")
            for m in sorted({m for (ss, m) in groups if ss == s}, key=_method_key):
                a = groups[(s, m)]
                rs = runs[(ds, s, m)]
                strict = stats.mean_std([r.summary.get("strict_accuracy", math.nan) for r in rs])
                flex = stats.mean_std([r.summary.get("flexible_accuracy", math.nan) for r in rs])
                agg_md.append(
                    f"| {s} | {m} | {a['n_seeds']} | {_fmt_pct(a['mean'])} ± {_fmt_pct(a['std'])}"
                    f" | [{_fmt_pct(a['ci_low'])}, {_fmt_pct(a['ci_high'])}] | "
                    f"{_fmt_pct(strict[0])} | {_fmt_pct(flex[0])} |")
        agg_md.append("")
        plot_groups = dict(groups)
        for (d, s), b in bases.items():
            if d == ds:
                plot_groups[(s, "base")] = {"mean": b.summary["accuracy"],
                                            "ci_low": b.summary["ci_low"],
                                            "ci_high": b.summary["ci_high"]}
        fig = _plot_accuracy(plot_groups, ds, teachers.get(ds), out / f"accuracy_{ds}.png")
        if fig:
            figures.append(fig)

        # paired comparisons
        comp_md += [f"### {ds}", "",
                    "| student | method | baseline | seeds | paired items | Δ (pts) | 95% CI (pts) "
                    "| n10 / n01 | McNemar p | verdict |",
                    "|---|---|---|---|---|---|---|---|---|---|"]
        per_seed_md: list[str] = []
        for s in students:
            for m in sorted({m for (ss, m) in groups if ss == s}, key=_method_key):
                baselines: list[tuple[str, Any]] = []
                if m != BASELINE_METHOD and (ds, s, BASELINE_METHOD) in runs:
                    baselines.append((BASELINE_METHOD, runs[(ds, s, BASELINE_METHOD)]))
                if (ds, s) in bases:
                    baselines.append(("base", bases[(ds, s)]))
                for bname, bres in baselines:
                    got = _compare(runs[(ds, s, m)], bres)
                    if got is None:
                        continue
                    c, per_seed, n_seeds = got
                    comp_md.append(
                        f"| {s} | {m} | {bname} | {n_seeds} | {c.n} | {100 * c.diff:+.1f} | "
                        f"[{100 * c.ci_low:.1f}, {100 * c.ci_high:.1f}] | {c.n10} / {c.n01} | "
                        f"{c.pvalue:.3g} | {_verdict(c)} |")
                    comp_rows.append([ds, s, m, bname, "pooled", n_seeds, c.n, c.acc_a, c.acc_b,
                                      c.diff, c.ci_low, c.ci_high, c.n10, c.n01, c.pvalue,
                                      _verdict(c)])
                    for seed, cs in sorted(per_seed.items()):
                        comp_rows.append([ds, s, m, bname, seed, 1, cs.n, cs.acc_a, cs.acc_b,
                                          cs.diff, cs.ci_low, cs.ci_high, cs.n10, cs.n01,
                                          cs.pvalue, _verdict(cs)])
                        per_seed_md.append(
                            f"| {s} | {m} | {bname} | {seed} | {cs.n} | {100 * cs.diff:+.1f} | "
                            f"[{100 * cs.ci_low:.1f}, {100 * cs.ci_high:.1f}] | {cs.pvalue:.3g} |")
                    if bname == BASELINE_METHOD and m in ("kd", "cascod", "cascod-2stage",
                                                          "cascod-kd"):
                        verdicts.append(
                            f"- **Does {m} beat CoT-SFT on {s} ({ds})? "
                            f"{'Yes' if c.significant and c.diff > 0 else 'No'}.** "
                            + _comparison_sentence(m, BASELINE_METHOD, s, ds, c, n_seeds) + ".")
                a = groups[(s, m)]
                vs = ""
                if m != BASELINE_METHOD and (ds, s, BASELINE_METHOD) in runs:
                    got = _compare(runs[(ds, s, m)], runs[(ds, s, BASELINE_METHOD)])
                    if got is not None:
                        vs = f"{100 * got[0].diff:+.1f} (p={got[0].pvalue:.2g})"
                headline_rows.append(
                    f"{ds:<6} {s[:28]:<28} {m:<14} {_fmt_pct(a['mean']):>6} ± "
                    f"{_fmt_pct(a['std']):<5} n_seeds={a['n_seeds']:<2} {vs}")
        comp_md.append("")
        if per_seed_md:
            comp_md += ["Per seed:", "",
                        "| student | method | baseline | seed | items | Δ (pts) | 95% CI (pts) "
                        "| McNemar p |", "|---|---|---|---|---|---|---|---|", *per_seed_md, ""]

    comparisons_csv = out / "comparisons.csv"
    atomic_write_text(comparisons_csv, _csv_text(
        ["dataset", "student", "method", "baseline", "seed", "n_seeds", "n_items", "acc_method",
         "acc_baseline", "diff", "ci_low", "ci_high", "n10", "n01", "mcnemar_p", "verdict"],
        comp_rows))

    # BBH per task
    bbh_md: list[str] = []
    heat_rows: list[tuple[str, dict[str, float]]] = []
    if "bbh" in datasets:
        def mean_per_task(results: list[EvalResult]) -> dict[str, float]:
            acc: dict[str, list[float]] = defaultdict(list)
            for r in results:
                for t, d in (r.summary.get("per_task") or {}).items():
                    acc[t].append(float(d["accuracy"]))
            return {t: sum(v) / len(v) for t, v in acc.items()}

        if "bbh" in teachers:
            heat_rows.append(("teacher", mean_per_task([teachers["bbh"]])))
        for (d, s), b in sorted(bases.items()):
            if d == "bbh":
                heat_rows.append((f"{s} base", mean_per_task([b])))
        for (d, s, m), v in sorted(runs.items(), key=lambda kv: (kv[0][1], _method_key(kv[0][2]))):
            if d == "bbh":
                heat_rows.append((f"{s} {m}", mean_per_task(v)))
        tasks = sorted({t for _, pt in heat_rows for t in pt})
        bbh_md = ["| task | " + " | ".join(n for n, _ in heat_rows) + " |",
                  "|---|" + "---|" * len(heat_rows)]
        for t in tasks:
            bbh_md.append(f"| {t} | " + " | ".join(_fmt_pct(pt.get(t, math.nan))
                                                   for _, pt in heat_rows) + " |")
        bbh_md.append("")
        fig = _plot_bbh_heatmap(heat_rows, out / "bbh_per_task.png")
        if fig:
            figures.append(fig)

    # training health
    health_md = ["| run | steps | skipped batches | skipped fraction (%) | final loss | final CE "
                 "| final KD | wall time (s) |", "|---|---|---|---|---|---|---|---|"]

    def num(x: Any, fmt: str = ".4g") -> str:
        return "n/a" if x is None else format(float(x), fmt)

    for t in trains:
        health_md.append(
            f"| {t.get('method')}/{_slug(t.get('student'))}/seed{t.get('seed')} | "
            f"{t.get('steps', 'n/a')} | {t.get('skipped_batches', 'n/a')} | "
            f"{_fmt_pct(t.get('skipped_fraction'), 2)} | {num(t.get('final_loss'))} | "
            f"{num(t.get('final_ce'))} | {num(t.get('final_kd'))} | "
            f"{num(t.get('wall_time_s'), '.0f')} |")
    fig = _plot_training_health(trains, out / "training_health.png")
    if fig:
        figures.append(fig)

    # assemble report.md
    md += ["## Headline: do KD and CasCoD beat CoT-SFT?", ""]
    md += verdicts or ["- No paired comparison against CoT-SFT (`sft`) is possible yet: evaluate "
                       "`sft` and at least one other method for the same student."]
    md += ["", "Δ = accuracy(method) − accuracy(baseline), paired on the same items; pooled over "
           "seeds by pairing seed s of each method with seed s of the baseline. Significant means "
           "exact McNemar p < 0.05 and a 95% paired-bootstrap CI that excludes 0. Pooling treats "
           "(seed, item) pairs as independent; against the base student (evaluated once) its "
           "items repeat for every seed, so those pooled p-values are optimistic: read the "
           "per-seed rows as well.", ""]
    md += ["## Accuracy", "", "Mean ± std across training seeds; 95% percentile bootstrap CI over "
           "the pooled (seed, item) pairs. Accuracy uses the strict final-answer line when "
           "present, else the flexible extraction (GSM8K: last number).", "", *agg_md]
    for ds in datasets:
        if ds in teachers:
            t = teachers[ds].summary
            md.append(f"Teacher ({t.get('model')}) on {ds}: {_fmt_pct(t['accuracy'])}% "
                      f"(95% CI [{_fmt_pct(t['ci_low'])}, {_fmt_pct(t['ci_high'])}], n={t['n']}).")
    md += ["", "## Paired comparisons", "", *comp_md]
    if bbh_md:
        md += ["## BBH per task (accuracy %, mean over seeds)", "", *bbh_md]
    md += _error_propagation_md(root)
    md += ["## Training health", "", *(health_md if trains else ["No training runs found."]), ""]
    if figures:
        md += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    md += [f"Files: `{results_csv.name}` (every model × dataset), `{comparisons_csv.name}` "
           "(every paired comparison, pooled and per seed).", ""]
    report_path = atomic_write_text(out / "report.md", "\n".join(md))

    head = ["dataset student                      method         acc(%) ± std   vs sft (pts)"]
    head += headline_rows or ["(no trained runs evaluated yet)"]
    return ReportResult(report_path, "\n".join(head), results_csv, comparisons_csv, figures)


def _error_propagation_md(root: Path) -> list[str]:
    """CasCoD error propagation (``eval/*/*/error_propagation.json``, written by the pipeline):
    the student's answer accuracy given the teacher's rationale vs given its own."""
    files = sorted(root.glob("eval/*/*/error_propagation.json"))
    if not files:
        return []
    lines = ["## CasCoD error propagation", "",
             "Answer step of each CasCoD student run on the evaluation items, given the teacher's "
             "rationale (from the teacher's own evaluation output) vs given the student's own "
             "rationale. A large gap means the answer step is fine and errors come from the "
             "student's rationale.", "",
             "| run | dataset | n | acc. teacher rationale (%) | acc. own rationale (%) | gap (pts) |",
             "|---|---|---|---|---|---|"]
    for f in files:
        d = json.loads(f.read_text())
        lines.append(f"| {f.parent.parent.name} | {f.parent.name} | {d.get('n')} | "
                     f"{_fmt_pct(d.get('acc_teacher_rationale'))} | "
                     f"{_fmt_pct(d.get('acc_own_rationale'))} | "
                     f"{_fmt_pct(d.get('propagation_gap'))} |")
    return [*lines, ""]


def write_report(cfg: Any = None, drive_root: str | Path | None = None) -> Path:
    """Write the report under ``{drive_root}/report/`` and return the path of ``report.md``."""
    return build_report(cfg, drive_root).path


def _report_command(args: argparse.Namespace) -> int:
    from slmkd.cli import config_from_args

    cfg = config_from_args(args)
    res = build_report(cfg, args.drive_root)
    print(res.headline)
    print(f"report: {res.path}")
    return 0


def add_report_command(subparsers: Any) -> None:
    """``slmkd report [--drive-root DIR]``."""
    from slmkd.cli import add_profile_args

    p = subparsers.add_parser("report", help="write report.md, results.csv and plots")
    add_profile_args(p)
    p.set_defaults(func=_report_command)
