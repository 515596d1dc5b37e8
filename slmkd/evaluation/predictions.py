"""Evaluation files: the resumable ``predictions.jsonl`` and its ``summary.json``.

One folder per (model, dataset): ``{drive_root}/eval/{model_slug}/{dataset}/`` holding
``predictions.jsonl`` (one scored row per item, appended batch by batch, fsynced),
``eval_meta.json`` (the settings; a rerun with other settings is refused) and ``summary.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slmkd.layout import eval_dir, run_model_slug

__all__ = ["CASCOD_METHODS", "EVAL_META_FILE", "PREDICTIONS_FILE", "SUMMARY_FILE", "eval_dir",
           "read_predictions", "run_model_slug", "summarize_predictions"]


PREDICTIONS_FILE = "predictions.jsonl"
SUMMARY_FILE = "summary.json"
EVAL_META_FILE = "eval_meta.json"
CASCOD_METHODS = ("cascod", "cascod-2stage", "cascod-kd")


def read_predictions(path: str | os.PathLike[str]) -> tuple[dict[str, dict[str, Any]], int]:
    """Rows of a predictions file by id (first occurrence wins) and the number of unreadable
    lines (a write cut short by a crash leaves at most one)."""
    rows: dict[str, dict[str, Any]] = {}
    bad = 0
    p = Path(path)
    if not p.is_file():
        return rows, 0
    with p.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rid = str(row["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                bad += 1
                continue
            rows.setdefault(rid, row)
    return rows, bad


def _append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append complete lines in one write, flushed and fsynced (a crash loses at most the
    batch being written, which :func:`read_predictions` then drops)."""
    if not rows:
        return
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with path.open("a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def summarize_predictions(
    rows: Sequence[dict[str, Any]], dataset: str, *, seed: int = 0, n_resamples: int = 2000
) -> dict[str, Any]:
    """Accuracy (strict-or-flexible), strict and flexible accuracy, 95% bootstrap CI over items,
    and for BBH the per-task accuracies with CIs plus the micro (= overall) and macro averages."""
    from slmkd import stats

    correct = [bool(r["correct"]) for r in rows]
    n = len(rows)
    lo, hi = stats.bootstrap_ci(correct, seed=seed, n_resamples=n_resamples)
    out: dict[str, Any] = {
        "dataset": dataset,
        "n": n,
        "accuracy": sum(correct) / n if n else float("nan"),
        "strict_accuracy": sum(bool(r["strict_correct"]) for r in rows) / n if n else float("nan"),
        "flexible_accuracy": (
            sum(bool(r["flexible_correct"]) for r in rows) / n if n else float("nan")
        ),
        "ci_low": lo,
        "ci_high": hi,
        "no_answer_fraction": sum(r.get("extracted") is None for r in rows) / n if n else 0.0,
        "hit_max_new_tokens_fraction": (
            sum(bool(r.get("hit_max_new_tokens")) for r in rows) / n if n else 0.0
        ),
        "per_task": {},
    }
    if dataset == "bbh":
        per_task = stats.per_task_accuracy(rows)
        for task, d in per_task.items():
            t_rows = [bool(r["correct"]) for r in rows if (r.get("task") or "all") == task]
            d["ci_low"], d["ci_high"] = stats.bootstrap_ci(t_rows, seed=seed,
                                                           n_resamples=n_resamples)
        out["per_task"] = per_task
        out["micro_accuracy"] = stats.micro_average(per_task)
        out["macro_accuracy"] = stats.macro_average(per_task)
    return out
