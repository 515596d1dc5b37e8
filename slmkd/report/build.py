"""The study report (notebook 05, ``slmkd report``): tables, seed × item statistics and figures.

Computed from the ``eval/{model}/{dataset}/`` folders alone (``predictions.jsonl``, ``summary.json``,
``eval_meta.json``) plus ``runs/**/train_summary.json``; writes ``report/``: ``report.md`` (verdicts,
methods, accuracy tables, comparisons with Holm-adjusted p and the minimum detectable difference, BBH
macro/micro and per task, supplementary per-seed McNemar, CasCoD error propagation, training health),
``results.csv``, ``accuracy.csv``, ``comparisons.csv``, ``mcnemar_per_seed.csv``, ``accuracy_{dataset}.png``
(bar = mean with its CI, a dot per seed), ``forest.png`` (every Δ with its CI and the zero line),
``bbh_per_task.png`` and ``training_health.png``. Statistics: :mod:`slmkd.stats` (math in its docstring);
the methods paragraph of the report (:func:`_methods_md`) says what is computed and why. Runs evaluated on
different item sets are never compared: :func:`build_report` raises ``ValueError`` naming both.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slmkd import stats
from slmkd.evaluation.predictions import item_ids_hash
from slmkd.report.cascade import error_propagation_markdown
from slmkd.report.figures import (  # noqa: F401
    ALPHA,
    METHOD_ORDER,
    _method_key,
    _plot_accuracy,
    _plot_bbh_heatmap,
    _plot_forest,
    _plot_training_health,
    _slug,
)

__all__ = ["EvalResult", "ReportResult", "build_report", "check_same_items",
           "collect_results", "item_ids_hash", "write_report"]

logger = logging.getLogger(__name__)

BASELINE_METHOD = "sft"
METRICS = ("strict", "flexible", "lenient")


@dataclass
class EvalResult:
    """One evaluated model on one dataset: summary, ``{item_id: correct}`` (lenient), the per-item
    metrics present on every row (``{metric: {item_id: bool}}``), BBH tasks and eval_meta. Derived:
    ``kind``, ``method``, ``seed``, ``dataset``, ``student_slug``, ``label`` (``eval/{model}/{dataset}``,
    how messages name the run) and ``stored_hash`` (the recorded ``item_ids_hash``, if any)."""

    summary: dict[str, Any]
    correct: dict[str, bool]
    metrics: dict[str, dict[str, bool]] = field(default_factory=dict)
    tasks: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.summary
        self.kind = str(s.get("kind") or "base")
        self.method: str | None = s.get("method")
        self.seed = None if s.get("seed") is None else int(s["seed"])
        self.dataset = str(s["dataset"])
        st = s.get("student") or s.get("model_name")
        self.student_slug = _slug(st) if st else str(s.get("model"))
        self.label = f"eval/{s.get('model')}/{self.dataset}"
        h = s.get("item_ids_hash") or self.meta.get("item_ids_hash")
        self.stored_hash = str(h) if h else None


@dataclass
class ReportResult:
    """Where the report went and the short headline table printed by the CLI."""

    path: Path
    headline: str
    results_csv: Path
    comparisons_csv: Path
    figures: list[Path] = field(default_factory=list)
    accuracy_csv: Path | None = None
    mcnemar_csv: Path | None = None


def _fmt_pct(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.{digits}f}"


def _fmt_p(p: float | None) -> str:
    return "n/a" if p is None or math.isnan(p) else f"{p:.3g}"


def _fmt_df(df: float) -> str:
    return "n/a" if math.isnan(df) else "∞" if math.isinf(df) else f"{df:.1f}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("skipping unreadable %s (%s)", path, exc)
        return None


def _read_eval(sp: Path) -> EvalResult | None:
    summary = _read_json(sp)
    if summary is None:
        return None
    mp = sp.parent / "eval_meta.json"
    meta = (_read_json(mp) or {}) if mp.is_file() else {}
    summary.setdefault("dataset", sp.parent.name)
    summary.setdefault("model", sp.parent.parent.name)
    res = EvalResult(summary, {}, meta=meta)
    pp = sp.parent / "predictions.jsonl"
    if pp.is_file():
        from slmkd.evaluation import read_predictions

        rows, _ = read_predictions(pp)
        per: dict[str, dict[str, bool]] = {m: {} for m in METRICS}
        for k, r in rows.items():
            for m in METRICS:
                v = r.get(m, r.get("correct")) if m == "lenient" else r.get(m)
                if isinstance(v, (bool, int, np.integer)):
                    per[m][k] = bool(v)
            res.correct[k] = per["lenient"].get(k, False)
            res.tasks[k] = str(r.get("task") or "all")
        res.metrics = {m: d for m, d in per.items() if rows and len(d) == len(rows)}
    return res


def collect_results(drive_root: Path) -> tuple[list[EvalResult], list[dict[str, Any]]]:
    """All evaluation results and all training summaries under ``drive_root``."""
    evals = [e for sp in sorted((Path(drive_root) / "eval").glob("*/*/summary.json"))
             if (e := _read_eval(sp)) is not None]
    trains = []
    for tp in sorted((Path(drive_root) / "runs").glob("**/train_summary.json")):
        if (d := _read_json(tp)) is not None:
            trains.append({**d, "_path": str(tp.parent)})
    return evals, trains


def check_same_items(a: EvalResult, b: EvalResult) -> None:
    """Raise ``ValueError`` naming both runs unless ``a`` and ``b`` were evaluated on the same
    items (their recorded hashes when both have one, and the ids of their predictions)."""
    ha, hb = a.stored_hash, b.stored_hash
    ids_a, ids_b = set(a.correct), set(b.correct)
    if (ha and hb and ha != hb) or ids_a != ids_b:
        if not (ha and hb):
            ha, hb = item_ids_hash(ids_a), item_ids_hash(ids_b)
        raise ValueError(
            f"refusing to compare {a.label} with {b.label}: they were evaluated on different item "
            f"sets (item_ids_hash {str(ha)[:12]}… vs {str(hb)[:12]}…; {len(ids_a)} vs {len(ids_b)} "
            f"items, {len(ids_a ^ ids_b)} not shared). Re-evaluate both on the same subset (same "
            "limit and subset_seed) before comparing them.")


@dataclass
class _Group:
    """The evaluations of one model (k seeds, or a single evaluation) on one dataset."""

    dataset: str
    student: str
    name: str  # method, "base" or "teacher"
    results: list[EvalResult]

    @property
    def ids(self) -> list[str]:
        return sorted(self.results[0].correct)

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.results]

    @property
    def k(self) -> int:
        return len(self.results)

    def has(self, metric: str) -> bool:
        return all(metric in r.metrics for r in self.results)

    def matrix(self, metric: str, results: list[EvalResult] | None = None) -> np.ndarray:
        return np.array([[float(r.metrics[metric][i]) for i in self.ids]
                         for r in (results or self.results)])

    def strata(self) -> list[str]:
        return [self.results[0].tasks.get(i, "all") for i in self.ids]


def _cell(e: stats.SeedItemEstimate | None) -> str:
    if e is None:
        return "n/a"
    sd = f" ± {_fmt_pct(e.sd_seeds)}" if e.k > 1 else ""
    return f"{_fmt_pct(e.mean)}{sd} [{_fmt_pct(e.ci_low)}, {_fmt_pct(e.ci_high)}]"


@dataclass
class _Comparison:
    dataset: str
    student: str
    method: str
    baseline: str
    metric: str
    average: str
    res: stats.SeedItemComparison
    seeds: list[int | None]
    per_seed: list[tuple[int | None, stats.McNemarResult, float]]
    note: str = ""
    p_holm: float = math.nan
    mdd_proj: dict[int, float] = field(default_factory=dict)

    @property
    def eligible(self) -> bool:
        """A verdict needs at least two seeds of the trained method (seed variance)."""
        return self.res.k >= 2

    @property
    def verdict(self) -> str:
        if not self.eligible:
            return "no verdict (1 seed: seed variance not estimable)"
        if self.p_holm < ALPHA:
            return "significantly better" if self.res.diff > 0 else "significantly worse"
        return "no significant difference"

    @property
    def label(self) -> str:
        return f"{self.dataset} · {self.student} · {self.method} − {self.baseline}"


def _compare(a: _Group, b: _Group, metric: str, average: str) -> _Comparison | None:
    """``a − b``: seeds matched by seed number, or ``b`` evaluated once (its vector used once)."""
    for r in a.results[1:] + b.results:
        check_same_items(a.results[0], r)
    note = ""
    if b.k == 1 and b.results[0].seed is None:
        ra, rb = a.results, b.results
    else:
        common = sorted(set(a.seeds) & set(b.seeds), key=lambda s: -1 if s is None else s)
        if not common:
            logger.warning("no common seed between %s and %s on %s", a.name, b.name, a.dataset)
            return None
        ra = [r for r in a.results if r.seed in common]
        rb = [next(r for r in b.results if r.seed == s) for s in common]
        if len(common) < max(a.k, b.k):
            note = f"seeds matched: {', '.join(str(s) for s in common)}"
    A, B = a.matrix(metric, ra), b.matrix(metric, rb)
    res = stats.seed_item_difference(A, B, a.strata() if average == "macro" else None, alpha=ALPHA)
    per_seed = [(ra[j].seed, mc, float(A[j].mean() - B[min(j, B.shape[0] - 1)].mean()))
                for j, mc in enumerate(stats.per_seed_mcnemar(A, B))]
    c = _Comparison(a.dataset, a.student, a.name, b.name, metric, average, res,
                    [r.seed for r in ra], per_seed, note)
    if res.k >= 2:
        c.mdd_proj = {k: stats.projected_mdd(res.components, k, ALPHA) for k in (5, 10)}
    return c


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    from slmkd.runtime import atomic_write_text

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    atomic_write_text(path, buf.getvalue())
    return path


def _md_table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(x) for x in r) + " |" for r in rows)]


@dataclass
class _Study:
    """Every usable evaluation grouped by (dataset, student, model), with cached estimates."""

    groups: dict[tuple[str, str, str], _Group]
    teachers: dict[str, _Group]
    headline: dict[str, str]  # dataset -> headline metric
    cache: dict[tuple[str, str, str, str, str], stats.SeedItemEstimate] = field(default_factory=dict)

    @property
    def datasets(self) -> list[str]:
        return sorted(self.headline)

    def estimate(self, g: _Group, metric: str, average: str) -> stats.SeedItemEstimate | None:
        if not g.has(metric):
            return None
        key = (g.dataset, g.student, g.name, metric, average)
        if key not in self.cache:
            self.cache[key] = stats.seed_item_accuracy(
                g.matrix(metric), g.strata() if average == "macro" else None)
        return self.cache[key]

    def keys(self, ds: str) -> list[tuple[str, str, str]]:
        return sorted((k for k in self.groups if k[0] == ds), key=lambda k: (k[1], _method_key(k[2])))

    def ordered(self, ds: str) -> list[tuple[str, str, _Group]]:
        """``(student, row label, group)``: the teacher first, then per student base and methods."""
        rows = [("—", f"teacher {self.teachers[ds].results[0].summary.get('model')}",
                 self.teachers[ds])] if ds in self.teachers else []
        return rows + [(k[1], "base (no training)" if k[2] == "base" else k[2], self.groups[k])
                       for k in self.keys(ds)]


def _avg(ds: str) -> str:
    return "macro" if ds == "bbh" else "all"


def _study(usable: list[EvalResult]) -> _Study:
    runs: dict[tuple[str, str, str], dict[int | None, EvalResult]] = defaultdict(dict)
    groups: dict[tuple[str, str, str], _Group] = {}
    teachers: dict[str, _Group] = {}
    for r in sorted(usable, key=lambda r: (r.label, -1 if r.seed is None else r.seed)):
        if r.kind == "run" and r.method:
            seen = runs[(r.dataset, r.student_slug, r.method)]
            if r.seed in seen:
                logger.warning("duplicate seed %s: keeping %s, not %s", r.seed, seen[r.seed].label,
                               r.label)
            seen.setdefault(r.seed, r)
        elif r.kind == "teacher":
            teachers[r.dataset] = _Group(r.dataset, "—", "teacher", [r])
        else:
            groups[(r.dataset, r.student_slug, "base")] = _Group(r.dataset, r.student_slug, "base", [r])
    for (ds, s, m), by_seed in runs.items():
        g = _Group(ds, s, m, [by_seed[k] for k in sorted(by_seed, key=lambda x: -1 if x is None else x)])
        for r in g.results[1:]:
            check_same_items(g.results[0], r)
        groups[(ds, s, m)] = g
    headline = {ds: "strict" if all("strict" in r.metrics for r in usable if r.dataset == ds)
                else "lenient" for ds in {r.dataset for r in usable}}
    return _Study(groups, teachers, headline)


def _accuracy_section(st: _Study, out: Path) -> tuple[list[str], list[list[Any]], list[Path]]:
    md: list[str] = []
    rows: list[list[Any]] = []
    figs: list[Path] = []
    for ds in st.datasets:
        hm, avg, bbh = st.headline[ds], _avg(ds), ds == "bbh"
        cols = [f"{m}{' macro' if bbh else ''} (%){' ← headline' if m == hm else ''}" for m in METRICS]
        table = []
        for s, label, g in st.ordered(ds):
            cells = [_cell(st.estimate(g, m, avg)) for m in METRICS]
            if bbh:
                cells.append(_cell(st.estimate(g, hm, "all")))
            n_txt = f"{len(g.ids)}" + (f" ({len(set(g.strata()))} tasks)" if bbh else "")
            table.append([s, label, g.k, n_txt, *cells])
            for m in METRICS:
                for a in ((avg, "all") if bbh else (avg,)):
                    if (e := st.estimate(g, m, a)) is not None:
                        rows.append([ds, s, g.name, g.results[0].kind, m, a, e.k, e.n, e.mean,
                                     e.sd_seeds, e.ci_low, e.ci_high, e.df, e.interval,
                                     " ".join(str(x) for x in g.seeds if x is not None),
                                     " ".join(f"{v:.10g}" for v in e.per_seed)])
        md += [f"### {ds}", "", *_md_table(["student", "model", "k", "n", *cols]
                                           + ([f"{hm} micro (%)"] if bbh else []), table), "",
               "Cells: mean ± sd over seeds [95% CI] (k = 1: mean [Wilson 95% CI over items]"
               + ("; macro = mean of the task accuracies, CI stratified by task" if bbh else "") + ").",
               ""]
        bars = [(s, g.name, e) for s, _l, g in st.ordered(ds)
                if g.name != "teacher" and (e := st.estimate(g, hm, avg)) is not None]
        teacher = st.estimate(st.teachers[ds], hm, avg) if ds in st.teachers else None
        if fig := _plot_accuracy(bars, ds, f"{hm}{' macro' if bbh else ''}", teacher,
                                 out / f"accuracy_{ds}.png"):
            figs.append(fig)
    return md, rows, figs


def _comparisons(st: _Study) -> list[_Comparison]:
    """Each method vs ``sft`` and vs the base student, on the headline metric; Holm over all."""
    comps: list[_Comparison] = []
    for ds in st.datasets:
        hm = st.headline[ds]
        for key in st.keys(ds):
            if key[2] == "base":
                continue
            g = st.groups[key]
            for bname in ((BASELINE_METHOD,) if key[2] != BASELINE_METHOD else ()) + ("base",):
                b = st.groups.get((ds, key[1], bname))
                if b is not None and g.has(hm) and b.has(hm):
                    if (c := _compare(g, b, hm, _avg(ds))) is not None:
                        comps.append(c)
    family = [c for c in comps if c.eligible]
    for c, p in zip(family, stats.holm([c.res.pvalue for c in family])):
        c.p_holm = float(p)
    return comps


def _comparison_sections(st: _Study, comps: list[_Comparison]):
    """Markdown (comparisons, MDD lines, supplementary McNemar), CSV rows and headline verdicts."""
    comp_md: list[str] = []
    mcn_md: list[list[Any]] = []
    comp_rows: list[list[Any]] = []
    mcn_rows: list[list[Any]] = []
    verdicts: list[str] = []
    for ds in st.datasets:
        cs = [c for c in comps if c.dataset == ds]
        if not cs:
            continue
        hm, avg_txt = st.headline[ds], " macro" if ds == "bbh" else ""
        table = []
        for c in cs:
            r = c.res
            seed_t = ("n/a" if r.k < 2 else "n/a (same Δ on every seed)" if math.isnan(r.seed_t_pvalue)
                      else f"{_fmt_p(r.seed_t_pvalue)} [{100 * r.seed_t_ci_low:.1f}, "
                      f"{100 * r.seed_t_ci_high:.1f}]")
            table.append([c.student, c.method, c.baseline + (" (once)" if r.single_baseline else ""),
                          r.k, r.n, f"{100 * r.diff:+.1f}",
                          f"[{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]", _fmt_df(r.df),
                          _fmt_p(r.pvalue), _fmt_p(c.p_holm), seed_t, _fmt_pct(r.mdd),
                          c.verdict + (f" ({c.note})" if c.note else "")])
            comp_rows.append([ds, c.student, c.method, c.baseline, c.metric, c.average, r.k, r.n,
                              " ".join(str(s) for s in c.seeds if s is not None), r.acc_a, r.acc_b,
                              r.diff, r.ci_low, r.ci_high, r.df, r.se, r.pvalue, c.p_holm,
                              r.seed_t_pvalue, r.seed_t_ci_low, r.seed_t_ci_high, r.mdd,
                              c.mdd_proj.get(5, ""), c.mdd_proj.get(10, ""), r.single_baseline,
                              c.verdict, " ".join(f"{v:.10g}" for v in r.per_seed_diff)])
            for seed, mc, dseed in c.per_seed:
                mcn_md.append([ds, c.student, c.method, c.baseline, "—" if seed is None else seed, r.n,
                               f"{100 * dseed:+.1f}", f"{mc.n10} / {mc.n01}", _fmt_p(mc.pvalue)])
                mcn_rows.append([ds, c.student, c.method, c.baseline, c.metric,
                                 "" if seed is None else seed, r.n, dseed, mc.n10, mc.n01, mc.pvalue])
            if c.baseline == BASELINE_METHOD:
                ans = ("Not established" if not c.eligible else
                       "Yes" if c.p_holm < ALPHA and r.diff > 0 else "No")
                verdicts.append(
                    f"- **Does {c.method} beat CoT-SFT on {c.student} ({ds})? {ans}.** {c.method} − sft "
                    f"({hm}{avg_txt}): {100 * r.diff:+.1f} pts (95% CI [{100 * r.ci_low:.1f}, "
                    f"{100 * r.ci_high:.1f}]), p = {_fmt_p(r.pvalue)}, Holm-adjusted p = "
                    f"{_fmt_p(c.p_holm)}; seed-level paired t p = {_fmt_p(r.seed_t_pvalue)} "
                    f"(cross-check); k = {r.k} seeds, n = {r.n} items — {c.verdict}.")
        comp_md += [f"### {ds} ({hm}{avg_txt})", "", *_md_table(
            ["student", "method", "baseline", "k", "n", "Δ (pts)", "95% CI (pts)", "df", "p", "Holm p",
             "seed-level t p [95% CI]", "MDD (pts)", "verdict"], table), ""]
        elig = [c for c in cs if c.eligible and not math.isnan(c.res.mdd)]
        if elig:
            mdds = sorted(100 * c.res.mdd for c in elig)
            proj = {k: float(np.nanmedian([100 * c.mdd_proj.get(k, math.nan) for c in elig]))
                    for k in (5, 10)}
            comp_md += [
                f"**Minimum detectable difference.** With k = "
                f"{'/'.join(str(k) for k in sorted({c.res.k for c in elig}))} seeds and n = "
                f"{'/'.join(str(n) for n in sorted({c.res.n for c in elig}))} items, differences below "
                f"{float(np.median(mdds)):.1f} pts cannot be told apart at 80% power (median over the "
                f"{len(elig)} comparisons on {ds}; range {mdds[0]:.1f}–{mdds[-1]:.1f} pts; two-sided "
                f"α = 0.05 before the Holm correction). Projected from the estimated variance "
                f"components: 5 seeds → {proj[5]:.1f} pts, 10 seeds → {proj[10]:.1f} pts.", ""]
    mcn = _md_table(["dataset", "student", "method", "baseline", "seed", "n", "Δ (pts)", "n10 / n01",
                     "exact McNemar p"], mcn_md) if mcn_md else []
    return comp_md, mcn, comp_rows, mcn_rows, verdicts


def _bbh_section(st: _Study, out: Path) -> tuple[list[str], list[Path]]:
    if "bbh" not in st.headline:
        return [], []
    hm = st.headline["bbh"]
    cols = [("teacher" if g.name == "teacher" else f"{s} {g.name}",
             stats.per_task_seed_stats(g.matrix(hm), g.strata()))
            for s, _l, g in st.ordered("bbh") if g.has(hm)]
    table = []
    for t in sorted({t for _, pt in cols for t in pt}):
        n0 = min(int(pt[t]["n"]) for _, pt in cols if t in pt)
        cells = ["n/a" if t not in pt else _fmt_pct(pt[t]["mean"])
                 + (f" ± {_fmt_pct(pt[t]['sd'])}" if pt[t]["k"] > 1 else "")
                 + (f" (n={pt[t]['n']})" if pt[t]["n"] != n0 else "") for _, pt in cols]
        table.append([t, n0, *cells])
    md = [f"Headline metric `{hm}`; cells: mean ± sd over seeds (%), a single evaluation: its "
          "accuracy; n = items per task.", "", *_md_table(["task", "n", *(n for n, _ in cols)], table), ""]
    fig = _plot_bbh_heatmap([(n, {t: d["mean"] for t, d in pt.items()}) for n, pt in cols],
                            out / "bbh_per_task.png")
    return md, [fig] if fig else []


def _health_md(trains: list[dict[str, Any]]) -> list[str]:
    def num(x: Any, fmt: str = ".4g") -> str:
        return "n/a" if x is None else format(float(x), fmt)

    return _md_table(
        ["run", "steps", "skipped batches", "skipped fraction (%)", "final loss", "final CE",
         "final KD", "wall time (s)"],
        ([f"{t.get('method')}/{_slug(t.get('student'))}/seed{t.get('seed')}", t.get("steps", "n/a"),
          t.get("skipped_batches", "n/a"), _fmt_pct(t.get("skipped_fraction"), 2),
          num(t.get("final_loss")), num(t.get("final_ce")), num(t.get("final_kd")),
          num(t.get("wall_time_s"), ".0f")] for t in trains))


def _methods_md(headline: dict[str, str], n_family: int) -> list[str]:
    heads = ", ".join(f"{ds}: `{m}`" for ds, m in sorted(headline.items())) or "none"
    return [
        "## Methods", "",
        "**Metrics.** Each item is scored three ways: `strict` is lm-evaluation-harness's strict-match "
        "filter (GSM8K: `gsm8k_cot_zeroshot` strict-match; BBH: the CoT `get-answer` filter) and is the "
        "one comparable with published lm-eval numbers; `flexible` is the harness's flexible-extract; "
        "`lenient` is slmkd's own, more forgiving scorer (the one the teacher filters use). Headline "
        "metric: `strict` where every evaluation of the dataset stores it, else `lenient` (older "
        f"predictions carry only `correct`, read as `lenient`). Headline here — {heads}. BBH's headline "
        "is the macro average (mean of the per-task accuracies) with the micro average (all items "
        "pooled) beside it.", "",
        "**Accuracy.** Each method is trained with k seeds and scored on the same n items: a k × n 0/1 "
        "matrix. Shown: mean ± sd of the per-seed accuracies, k, n and a 95% CI from a two-way crossed "
        "random-effects decomposition (seed effect, item effect, seed × item residual): Var(mean) = "
        "σ²_seed/k + σ²_item/n + σ²_res/(kn), estimated from the two-way ANOVA mean squares as "
        "var(per-seed accuracies)/k + max(0, MS_item − MS_res)/(kn), with a Cochran–Cox critical value "
        "mixing t on k − 1 df (seed part) and t on the Satterthwaite df of the item part. The interval "
        "covers what another set of training seeds and another draw of items would give; with 3 seeds "
        "it is wide when seeds disagree. A model evaluated once (base student, teacher; k = 1) gets the "
        "Wilson interval over its items. BBH macro: the item part is estimated within each task.", "",
        "**Comparisons.** Δ = accuracy(method) − accuracy(baseline) by the same estimator on the "
        "per-item differences, seeds matched by seed number; against the base student (evaluated once) "
        "its single prediction vector is used once, never replicated, so its item variance counts once "
        "and is not mistaken for seed variance. The p-value is two-sided from that estimator; "
        f"**verdicts use Holm-adjusted p < 0.05 over the family of all {n_family} comparisons with ≥ 2 "
        "seeds in this report**. A seed-level paired t-test on the per-seed differences (k − 1 df) is "
        "shown as a cross-check; it conditions on the items and gives no verdict. Comparisons with a "
        "single seed get no verdict. The minimum detectable difference (MDD) is the smallest true Δ "
        "the test finds with 80% power (two-sided α = 0.05 before the Holm correction), given the "
        "estimated variance, k and n; it is itself an estimate (with 3 seeds its variance rests on 2 "
        "df). The 95% CIs in the tables and the forest plot are unadjusted. Calibration on simulated "
        "null studies (false-positive rate ≤ 6%, CI coverage ≥ 93%): `benchmarks/stats_calibration.py`.",
        "",
        "**Same items or no comparison.** Runs are compared only when they were evaluated on the same "
        "item ids (`item_ids_hash` in summary.json / eval_meta.json, and the ids in predictions.jsonl); "
        "otherwise the report refuses.", "",
        "**Supplementary per-seed McNemar.** The exact McNemar test of one checkpoint against another "
        "on these items is conditional on those checkpoints: it says nothing about the methods and "
        "carries no verdict.", ""]


def _headline(st: _Study, comps: list[_Comparison]) -> str:
    head = ["dataset student                      method         metric   acc(%) ± sd [95% CI]    k  "
            "vs sft Δ pts (Holm p)"]
    for ds in st.datasets:
        for key in st.keys(ds):
            if key[2] == "base" or (e := st.estimate(st.groups[key], st.headline[ds], _avg(ds))) is None:
                continue
            vs = next((f"{100 * c.res.diff:+.1f} (p={_fmt_p(c.p_holm)})" for c in comps
                       if (c.dataset, c.student, c.method, c.baseline) == (*key, BASELINE_METHOD)), "")
            head.append(f"{ds:<7} {key[1][:28]:<28} {key[2]:<14} {st.headline[ds]:<8} "
                        f"{_fmt_pct(e.mean):>5} ± {_fmt_pct(e.sd_seeds):<4} [{_fmt_pct(e.ci_low)}, "
                        f"{_fmt_pct(e.ci_high)}] {e.k:<2} {vs}")
    return "\n".join(head if len(head) > 1 else [*head, "(no trained runs evaluated yet)"])


def build_report(cfg: Any = None, drive_root: str | Path | None = None) -> ReportResult:
    """Write ``{drive_root}/report/`` (see the module docstring) and return where it is plus a
    short headline table for the CLI. Raises ``ValueError`` (naming both runs) when runs that
    would be compared were evaluated on different items."""
    from slmkd.runtime import atomic_write_text

    if drive_root is None:
        from slmkd.runtime import get_drive_root

        root = get_drive_root(cfg)
    else:
        root = Path(drive_root)
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    evals, trains = collect_results(root)
    usable = [e for e in evals if e.correct]
    st = _study(usable)

    def acc_of(r: EvalResult, m: str) -> Any:
        d = r.metrics.get(m)
        return sum(d.values()) / len(d) if d else ""

    results_csv = _write_csv(out / "results.csv", [
        "model", "kind", "method", "student", "seed", "dataset", "n", "accuracy", "accuracy_strict",
        "accuracy_flexible", "accuracy_lenient", "item_ids_hash_computed", "item_ids_hash_recorded"],
        [[r.summary.get("model"), r.kind, r.method or "", r.student_slug, "" if r.seed is None else r.seed,
          r.dataset, len(r.correct) or r.summary.get("n"), r.summary.get("accuracy"), acc_of(r, "strict"),
          acc_of(r, "flexible"), acc_of(r, "lenient"), item_ids_hash(r.correct) if r.correct else "",
          r.stored_hash or ""] for r in evals])
    acc_md, acc_rows, figures = _accuracy_section(st, out)
    accuracy_csv = _write_csv(out / "accuracy.csv", [
        "dataset", "student", "model", "kind", "metric", "average", "k", "n", "mean", "sd_seeds",
        "ci_low", "ci_high", "df", "interval", "seeds", "per_seed"], acc_rows)
    comps = _comparisons(st)
    n_family = sum(c.eligible for c in comps)
    comp_md, mcn_md, comp_rows, mcn_rows, verdicts = _comparison_sections(st, comps)
    comparisons_csv = _write_csv(out / "comparisons.csv", [
        "dataset", "student", "method", "baseline", "metric", "average", "k", "n_items", "seeds",
        "acc_method", "acc_baseline", "diff", "ci_low", "ci_high", "df", "se", "p", "p_holm", "seed_t_p",
        "seed_t_ci_low", "seed_t_ci_high", "mdd", "mdd_5_seeds", "mdd_10_seeds",
        "baseline_evaluated_once", "verdict", "per_seed_diff"], comp_rows)
    mcnemar_csv = _write_csv(out / "mcnemar_per_seed.csv", [
        "dataset", "student", "method", "baseline", "metric", "seed", "n_items", "diff", "n10", "n01",
        "mcnemar_p"], mcn_rows)
    if fig := _plot_forest(comps, out / "forest.png"):
        figures.append(fig)
    bbh_md, bbh_figs = _bbh_section(st, out)
    figures += bbh_figs
    if fig := _plot_training_health(trains, out / "training_health.png"):
        figures.append(fig)

    md = ["# slmkd study report", "", "## Headline: do KD and CasCoD beat CoT-SFT?", ""]
    md += verdicts or ["- No paired comparison against CoT-SFT (`sft`) is possible yet: evaluate "
                       "`sft` and at least one other method for the same student."]
    md += ["", f"Verdicts: two-way seed × item estimator, Holm-adjusted over the {n_family} comparisons "
           "of this report (see Methods); the seed-level paired t is a cross-check only.", ""]
    md += [*_methods_md(st.headline, n_family), "## Accuracy", "", *acc_md]
    if no_preds := [e for e in evals if not e.correct]:
        md += ["Not included (no predictions.jsonl, so no per-item statistics): "
               + ", ".join(f"`{e.label}`" for e in no_preds) + ".", ""]
    md += ["## Comparisons", "", *(comp_md or ["No comparison possible yet.", ""])]
    if bbh_md:
        md += ["## BBH per task", "", *bbh_md]
    if mcn_md:
        md += ["## Supplementary: per-seed exact McNemar (conditional on these checkpoints)", "",
               "Each row tests whether one checkpoint of the method and the matching checkpoint of the "
               "baseline (or the baseline's single evaluation) differ on these items. It is conditional "
               "on those particular checkpoints — another training seed gives another checkpoint — so "
               "it says nothing about the methods and carries **no verdict**. Δ is that seed's "
               "difference on the headline metric over all items (BBH: micro).", "", *mcn_md, ""]
    md += error_propagation_markdown(root)
    md += ["## Training health", "", *(_health_md(trains) if trains else ["No training runs found."]), ""]
    if figures:
        md += ["## Figures", "", *(f"![{p.stem}]({p.name})" for p in figures), ""]
    md += [f"Files: `{results_csv.name}` (every model × dataset), `{accuracy_csv.name}` (the accuracy "
           f"tables), `{comparisons_csv.name}` (every comparison), `{mcnemar_csv.name}` "
           "(supplementary per-seed McNemar).", ""]
    report_path = atomic_write_text(out / "report.md", "\n".join(md))
    return ReportResult(report_path, _headline(st, comps), results_csv, comparisons_csv, figures,
                        accuracy_csv, mcnemar_csv)


def write_report(cfg: Any = None, drive_root: str | Path | None = None) -> Path:
    """Write the report under ``{drive_root}/report/`` and return the path of ``report.md``."""
    return build_report(cfg, drive_root).path
