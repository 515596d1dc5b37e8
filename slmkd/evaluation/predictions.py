"""Evaluation files: the resumable ``predictions.jsonl`` and its ``summary.json``.

One folder per (model, dataset): ``{drive_root}/eval/{model_slug}/{dataset}/`` holding
``predictions.jsonl`` (one scored row per item, appended batch by batch, fsynced),
``eval_meta.json`` (the settings; a rerun with other generation settings is refused) and
``summary.json``.

A row (:func:`score_row`) carries the three per-item metrics of :func:`slmkd.scoring.score_output`:

* ``strict``, ``flexible`` — lm-evaluation-harness 0.4.13's strict-match and flexible-extract
  decisions (:mod:`slmkd.scoring.harness`; ``strict`` is the one comparable with published
  lm-eval numbers), with the answers they extracted in ``extracted_strict`` /
  ``extracted_flexible``;
* ``lenient`` — slmkd's own scorer (:mod:`slmkd.scoring.lenient`).

and, for compatibility with files and code of earlier versions, ``correct`` (== ``lenient``),
``extracted`` (the lenient answer) and ``strict_correct`` / ``flexible_correct``. The last two
are the *lenient* extractor's two modes (its final-answer line / answer cue, and its last-number /
last-line fallback), **not** lm-eval's metrics, which are the new ``strict`` / ``flexible``.

Rows written by an earlier version (no ``strict`` key) are re-scored from their ``raw_output``
(:func:`upgrade_row`) whenever a summary is computed; nothing is regenerated.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from slmkd.layout import eval_dir, run_model_slug

__all__ = ["CASCOD_METHODS", "EVAL_META_FILE", "METRICS", "PREDICTIONS_FILE", "ROW_SCORE_KEYS",
           "SUMMARY_FILE", "eval_dir", "item_ids_hash", "read_predictions", "rescore_eval_dir",
           "run_model_slug", "score_row", "summarize_predictions", "upgrade_row"]


PREDICTIONS_FILE = "predictions.jsonl"
SUMMARY_FILE = "summary.json"
EVAL_META_FILE = "eval_meta.json"
CASCOD_METHODS = ("cascod", "cascod-2stage", "cascod-kd")
#: The per-item metrics of a row (lm-eval strict, lm-eval flexible, slmkd lenient).
METRICS = ("strict", "flexible", "lenient")
#: The keys :func:`score_row` writes into a row.
ROW_SCORE_KEYS = ("strict", "flexible", "lenient", "extracted_strict", "extracted_flexible",
                  "correct", "extracted", "strict_correct", "flexible_correct")


def item_ids_hash(ids: Iterable[Any]) -> str:
    """sha256 (hex) of ``"\\n".join(sorted(str(id) for id in ids))``: two evaluations are on the
    same items exactly when their hashes are equal (the report uses the same definition)."""
    return hashlib.sha256("\n".join(sorted(str(i) for i in ids)).encode("utf-8")).hexdigest()


def score_row(dataset: str, raw_output: str | None, target: Any, *, task: str | None = None,
              question: str | None = None) -> dict[str, Any]:
    """The scoring keys of a prediction row (:data:`ROW_SCORE_KEYS`, see the module docstring)."""
    from slmkd.scoring import score_output, score_prediction

    text = raw_output or ""
    s = score_output(dataset, text, str(target), task=task, question=question)
    lp = score_prediction(dataset, text, str(target), task, question)
    return {
        "strict": bool(s["strict"]), "flexible": bool(s["flexible"]),
        "lenient": bool(s["lenient"]),
        "extracted_strict": s["extracted"]["strict"],
        "extracted_flexible": s["extracted"]["flexible"],
        "correct": bool(lp["correct"]), "extracted": lp["extracted"],
        "strict_correct": bool(lp["strict_correct"]),
        "flexible_correct": bool(lp["flexible_correct"]),
    }


def upgrade_row(row: dict[str, Any], dataset: str | None = None) -> tuple[dict[str, Any], bool]:
    """``(row, rescored)``: a row of an earlier version (no ``strict`` key) re-scored from its
    ``raw_output`` with today's scorers (all of :data:`ROW_SCORE_KEYS` rewritten); a current row,
    or one without ``raw_output``, is returned unchanged."""
    if all(k in row for k in METRICS) or not isinstance(row.get("raw_output"), str):
        return row, False
    ds = str(row.get("dataset") or dataset or "").lower()
    new = dict(row)
    new.update(score_row(ds, row["raw_output"], row.get("target"), task=row.get("task"),
                         question=row.get("question")))
    return new, True


def read_predictions(path: str | os.PathLike[str]) -> tuple[dict[str, dict[str, Any]], int]:
    """Rows of a predictions file by id (first occurrence wins) and the number of unreadable
    lines (a write cut short by a crash leaves at most one): :func:`slmkd.fileio.read_jsonl_by_id`."""
    from slmkd.fileio import read_jsonl_by_id

    return read_jsonl_by_id(path)


def _append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append complete lines in one write, flushed and fsynced (:func:`slmkd.fileio.append_jsonl`)."""
    from slmkd.fileio import append_jsonl

    append_jsonl(path, rows)


def _rewrite_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Replace the predictions file atomically (dropping a cut line, storing re-scored rows)."""
    from slmkd.fileio import atomic_write_jsonl

    atomic_write_jsonl(path, rows)


def _accuracy(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize_predictions(
    rows: Sequence[dict[str, Any]], dataset: str, *, seed: int = 0, n_resamples: int = 2000
) -> dict[str, Any]:
    """The summary of scored rows (rows of an earlier version are re-scored first, in memory).

    Keys: ``n``; ``accuracy_strict``, ``accuracy_flexible``, ``accuracy_lenient`` (lm-eval
    strict-match, lm-eval flexible-extract, slmkd lenient; ``None`` when some row lacks the
    metric and has no ``raw_output`` to re-score) with 95 % item-bootstrap CIs in
    ``ci_strict`` / ``ci_flexible`` / ``ci_lenient`` (``[low, high]``); ``item_ids_hash``
    (:func:`item_ids_hash` of the rows' ids); ``rescored_rows``; for compatibility ``accuracy``
    (== ``accuracy_lenient``) with ``ci_low`` / ``ci_high``, and ``strict_accuracy`` /
    ``flexible_accuracy`` (the lenient extractor's two modes, not lm-eval's). For BBH also
    ``per_task`` (each task's ``n``, ``correct``, ``accuracy``, ``ci_low``, ``ci_high`` -- lenient,
    as before -- and ``accuracy_{metric}`` / ``correct_{metric}`` for the three metrics),
    ``micro_accuracy_{metric}`` / ``macro_accuracy_{metric}`` for the three metrics and
    ``micro_accuracy`` / ``macro_accuracy`` (lenient).
    """
    from slmkd import stats

    dataset = dataset.lower()
    upgraded = [upgrade_row(r, dataset) for r in rows]
    rows = [r for r, _ in upgraded]
    rescored = sum(flag for _, flag in upgraded)
    n = len(rows)
    per_item: dict[str, list[bool] | None] = {}
    for m in METRICS:
        key = "correct" if m == "lenient" else m  # "correct" == "lenient"; old rows: "correct"
        per_item[m] = ([bool(r.get(m, r.get(key))) for r in rows]
                       if all(m in r or key in r for r in rows) else None)
    lenient = per_item["lenient"] or []
    out: dict[str, Any] = {
        "dataset": dataset,
        "n": n,
        "item_ids_hash": item_ids_hash(str(r["id"]) for r in rows if "id" in r),
        "rescored_rows": rescored,
    }
    for m in METRICS:
        v = per_item[m]
        out[f"accuracy_{m}"] = None if v is None else _accuracy(v)
        out[f"ci_{m}"] = (None if v is None else
                          list(stats.bootstrap_ci(v, seed=seed, n_resamples=n_resamples)))
    out["accuracy"] = out["accuracy_lenient"] if n else math.nan
    out["ci_low"], out["ci_high"] = out["ci_lenient"] or (math.nan, math.nan)
    out.update({
        "strict_accuracy": _accuracy([bool(r.get("strict_correct")) for r in rows]),
        "flexible_accuracy": _accuracy([bool(r.get("flexible_correct")) for r in rows]),
        "no_answer_fraction": sum(r.get("extracted") is None for r in rows) / n if n else 0.0,
        "hit_max_new_tokens_fraction": (
            sum(bool(r.get("hit_max_new_tokens")) for r in rows) / n if n else 0.0
        ),
        "per_task": {},
    })
    if dataset == "bbh":
        tasks = [str(r.get("task") or "all") for r in rows]
        per_task: dict[str, dict[str, Any]] = {}
        for t in sorted(set(tasks)):
            idx = [i for i, tt in enumerate(tasks) if tt == t]
            t_len = [lenient[i] for i in idx]
            lo, hi = stats.bootstrap_ci(t_len, seed=seed, n_resamples=n_resamples)
            d: dict[str, Any] = {"n": len(idx), "correct": sum(t_len),
                                 "accuracy": _accuracy(t_len), "ci_low": lo, "ci_high": hi}
            for m in METRICS:
                v = per_item[m]
                d[f"correct_{m}"] = None if v is None else sum(v[i] for i in idx)
                d[f"accuracy_{m}"] = None if v is None else _accuracy([v[i] for i in idx])
            per_task[t] = d
        out["per_task"] = per_task
        out["micro_accuracy"] = stats.micro_average(per_task)
        out["macro_accuracy"] = stats.macro_average(per_task)
        for m in METRICS:
            if per_item[m] is None:
                out[f"micro_accuracy_{m}"] = out[f"macro_accuracy_{m}"] = None
                continue
            out[f"micro_accuracy_{m}"] = (sum(d[f"correct_{m}"] for d in per_task.values()) / n
                                          if n else math.nan)
            accs = [d[f"accuracy_{m}"] for d in per_task.values() if d["n"]]
            out[f"macro_accuracy_{m}"] = sum(accs) / len(accs) if accs else math.nan
    return out


def rescore_eval_dir(folder: str | os.PathLike[str], *, seed: int | None = None) -> dict[str, Any]:
    """Re-score an evaluation folder in place, without a model: rows of an earlier version get
    the three metrics (``predictions.jsonl`` rewritten atomically) and ``summary.json`` is
    recomputed from the rows, its other fields (model, kind, method, seed …) kept.

    Refuses (``ValueError``) when the rows' ids are not the items the summary was computed on
    (its ``n`` / ``item_ids_hash``, when recorded): then rerun the evaluation, which reuses
    the stored generations. Returns the new summary.
    """
    from slmkd.fileio import atomic_write_json

    folder = Path(folder)
    sp, pp = folder / SUMMARY_FILE, folder / PREDICTIONS_FILE
    if not sp.is_file() or not pp.is_file():
        raise FileNotFoundError(f"{folder} lacks {SUMMARY_FILE} or {PREDICTIONS_FILE}")
    old = json.loads(sp.read_text(encoding="utf-8"))
    done, bad = read_predictions(pp)
    rows = list(done.values())
    h = item_ids_hash(done)
    if (old.get("item_ids_hash") and old["item_ids_hash"] != h) or (
            old.get("n") is not None and int(old["n"]) != len(rows)):
        raise ValueError(
            f"{pp} holds {len(rows)} rows (item_ids_hash {h[:12]}…) but {sp} was computed on "
            f"{old.get('n')} items ({str(old.get('item_ids_hash'))[:12]}…): rerun the "
            "evaluation (it reuses the stored generations) instead of re-scoring.")
    dataset = str(old.get("dataset") or folder.name).lower()
    upgraded = [upgrade_row(r, dataset) for r in rows]
    if bad or any(flag for _, flag in upgraded):
        _rewrite_rows(pp, [r for r, _ in upgraded])
    if seed is None:
        seed = int(old.get("subset_seed") or 0)
    summary = summarize_predictions(rows, dataset, seed=seed)
    merged = {**old, **summary}
    atomic_write_json(sp, merged)
    return merged
