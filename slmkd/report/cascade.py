"""CasCoD's error propagation, per method: accuracy, the answer step's accuracy given the
teacher's rationale vs given the student's own, and the gap, as mean ± sd over seeds.

Read from the ``eval/`` folders alone (notebook 04 writes them):
``eval/{method}__{student}__seed{N}/{dataset}/error_propagation.json`` (the probe of
:func:`slmkd.evaluation.error_propagation`) and the ``summary.json`` beside it (the run's accuracy,
strict where recorded). ``gap = acc(teacher rationale) − acc(own rationale)``: a large gap means the
answer step is fine and the errors come from the student's rationales.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def error_propagation_runs(drive_root: str | Path) -> list[dict[str, Any]]:
    """One row per evaluated CasCoD run × dataset: ``model``, ``method``, ``student``, ``seed``,
    ``dataset``, ``n``, ``accuracy``, ``acc_teacher_rationale``, ``acc_own_rationale``, ``gap``
    (fractions; ``accuracy`` None when the summary is missing)."""
    rows = []
    for f in sorted(Path(drive_root).glob("eval/*/*/error_propagation.json")):
        d = json.loads(f.read_text())
        sp = f.parent / "summary.json"
        s = json.loads(sp.read_text()) if sp.is_file() else {}
        acc = s.get("accuracy_strict", s.get("accuracy"))
        rows.append({"model": f.parent.parent.name, "method": s.get("method") or
                     f.parent.parent.name.split("__")[0], "student": s.get("student"),
                     "seed": s.get("seed"), "dataset": f.parent.name, "n": d.get("n"),
                     "accuracy": None if acc is None else float(acc),
                     "acc_teacher_rationale": float(d["acc_teacher_rationale"]),
                     "acc_own_rationale": float(d["acc_own_rationale"]),
                     "gap": float(d["propagation_gap"])})
    return rows


def error_propagation_by_method(drive_root: str | Path) -> list[dict[str, Any]]:
    """:func:`error_propagation_runs` grouped by (method, student, dataset): ``seeds`` (count)
    and, for each of ``accuracy``, ``acc_teacher_rationale``, ``acc_own_rationale``, ``gap``, the
    mean and the sd over seeds (``{key}_mean``, ``{key}_sd``; sd 0 for one seed)."""
    return _by_method(error_propagation_runs(drive_root))


def _by_method(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["method"], str(r["student"]), r["dataset"]), []).append(r)
    out = []
    for (method, student, dataset), rs in sorted(groups.items()):
        row: dict[str, Any] = {"method": method, "student": student, "dataset": dataset,
                               "seeds": len(rs)}
        for key in ("accuracy", "acc_teacher_rationale", "acc_own_rationale", "gap"):
            xs = [r[key] for r in rs if r[key] is not None]
            m, sd = _mean_sd(xs) if xs else (None, None)
            row[f"{key}_mean"], row[f"{key}_sd"] = m, sd
        out.append(row)
    return out


def _pct(m: float | None, sd: float | None) -> str:
    return "n/a" if m is None else f"{100 * m:.1f} ± {100 * sd:.1f}"


def method_table(groups: list[dict[str, Any]]) -> list[str]:
    """:func:`error_propagation_by_method`'s rows as a markdown table."""
    lines = ["| method | student | dataset | seeds | accuracy | given teacher rationale | "
             "given own rationale | gap |", "|---|---|---|---|---|---|---|---|"]
    for g in groups:
        lines.append(f"| {g['method']} | {g['student']} | {g['dataset']} | {g['seeds']} | "
                     f"{_pct(g['accuracy_mean'], g['accuracy_sd'])} | "
                     f"{_pct(g['acc_teacher_rationale_mean'], g['acc_teacher_rationale_sd'])} | "
                     f"{_pct(g['acc_own_rationale_mean'], g['acc_own_rationale_sd'])} | "
                     f"{_pct(g['gap_mean'], g['gap_sd'])} |")
    return lines


def error_propagation_markdown(drive_root: str | Path) -> list[str]:
    """The report's section: the per-method table, then one row per run ([] when no CasCoD run
    has been evaluated)."""
    runs = error_propagation_runs(drive_root)
    if not runs:
        return []
    lines = ["## CasCoD error propagation", "",
             "Answer step of each CasCoD student on the evaluation items given the teacher's "
             "rationale (from the teacher's own evaluation output) vs given the student's own "
             "rationale; gap = teacher − own. A large gap means the answer step is fine and the "
             "errors come from the student's rationale. Mean ± sd over seeds (%, gap in pts):", ""]
    lines += method_table(_by_method(runs))
    lines += ["", "| run | dataset | n | accuracy (%) | given teacher rationale (%) | "
              "given own rationale (%) | gap (pts) |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        acc = "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}"
        lines.append(f"| {r['model']} | {r['dataset']} | {r['n']} | {acc} | "
                     f"{100 * r['acc_teacher_rationale']:.1f} | {100 * r['acc_own_rationale']:.1f} | "
                     f"{100 * r['gap']:.1f} |")
    return [*lines, ""]


def show_error_propagation(drive_root: str | Path) -> list[dict[str, Any]]:
    """Print the per-method table (notebooks 03/04); says so when nothing is evaluated yet."""
    rows = error_propagation_by_method(drive_root)
    if not rows:
        print(f"No CasCoD run evaluated under {drive_root}/eval yet: notebook 04 measures the "
              "answer accuracy given the teacher's vs the student's own rationale.")
        return rows
    print("\n".join(method_table(rows)))
    return rows


__all__ = ["error_propagation_by_method", "error_propagation_markdown", "error_propagation_runs",
           "method_table", "show_error_propagation"]
