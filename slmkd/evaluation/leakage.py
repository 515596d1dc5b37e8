"""The leakage guard: no evaluation question may appear in a model's training data."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any


class LeakageError(RuntimeError):
    """An evaluation question also appears in the training records of the model."""


def _norm_question(q: str) -> str:
    return re.sub(r"\s+", " ", str(q)).strip().lower()


def check_no_leakage(eval_records: Iterable[Any], train_questions: Iterable[str]) -> int:
    """Raise :class:`LeakageError` if any evaluation question is among ``train_questions``.

    ``eval_records`` are :class:`slmkd.data.Record` objects or dicts with ``question`` (and
    ``id``); questions are compared after lower-casing and collapsing whitespace. Returns the
    number of evaluation records checked.
    """
    train = {_norm_question(q) for q in train_questions if q}
    n = 0
    leaked: list[str] = []
    for r in eval_records:
        q = r.get("question") if isinstance(r, dict) else getattr(r, "question", None)
        rid = r.get("id") if isinstance(r, dict) else getattr(r, "id", None)
        n += 1
        if q and _norm_question(q) in train:
            leaked.append(str(rid))
    if leaked:
        raise LeakageError(
            f"{len(leaked)} of {n} evaluation questions appear in the training records "
            f"(e.g. {leaked[:5]}). The evaluation would be contaminated: make the training data "
            "disjoint from the evaluation set (GSM8K: train on the train split; BBH: "
            "cfg.data.bbh_train_per_task draws a disjoint training part)."
        )
    return n


def training_questions_for_run(cfg: Any, train_summary: dict[str, Any]) -> list[str]:
    """Questions the run was trained on: the teacher CoT records (kept or not) of its training
    dataset, plus that dataset's training split. Missing sources are skipped with a warning."""
    import logging

    log = logging.getLogger(__name__)
    dataset = (train_summary.get("dataset") or train_summary.get("train_dataset")
               or cfg.generation.dataset)
    questions: list[str] = []
    try:
        from slmkd.teacher.store import cot_dir, load_cot_records

        cdir = train_summary.get("cot_dir") or cot_dir(cfg, dataset, cfg.teacher)
        questions += [r.get("question", "") for r in load_cot_records(cdir, kept_only=False)]
    except (FileNotFoundError, ImportError, ValueError) as exc:
        log.warning("leakage guard: no teacher CoT records found (%s)", exc)
    try:
        from slmkd.data.sources import load_records

        questions += [r.question for r in load_records(cfg, dataset, "train").records]
    except (FileNotFoundError, ValueError, ImportError) as exc:
        log.warning("leakage guard: no %s training split (%s)", dataset, exc)
    return questions
