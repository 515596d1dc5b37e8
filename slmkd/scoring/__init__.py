"""Scoring model outputs: pure text in, answers and correctness out (no model, no files).

Three named per-item metrics (:func:`score_output`):

* ``strict`` — lm-evaluation-harness's strict-match filter for the task matching our protocol
  (GSM8K ``gsm8k_cot_zeroshot``; BBH ``bbh_cot_fewshot``'s ``get-answer``), reproduced exactly
  (:mod:`slmkd.scoring.harness`): comparable with published lm-eval numbers;
* ``flexible`` — the harness's flexible-extract filters for the same tasks;
* ``lenient`` — slmkd's own, more forgiving scorer (:mod:`slmkd.scoring.lenient`), which the
  teacher filters, the tiny world and CasCoD use; LaTeX answers (``\\boxed{}``, ``\\( \\)``,
  ``$ $``) count.
"""

from __future__ import annotations

from typing import Any

from slmkd.scoring.lenient import (
    BBH_TASK_TYPES,
    FINAL_ANSWER_PREFIX,
    bbh_task_type,
    extract_answer,
    extract_bbh,
    extract_gsm8k,
    is_correct,
    normalize_number,
    parse_options,
    score_prediction,
)

__all__ = [
    "BBH_TASK_TYPES",
    "FINAL_ANSWER_PREFIX",
    "METRICS",
    "bbh_task_type",
    "extract_answer",
    "extract_bbh",
    "extract_gsm8k",
    "is_correct",
    "normalize_number",
    "parse_options",
    "score_output",
    "score_prediction",
]

#: The per-item metric names, in the order tables show them.
METRICS = ("strict", "flexible", "lenient")


def score_output(dataset: str, text: str, target: str, *, task: str | None = None,
                 question: str | None = None) -> dict[str, Any]:
    """All three metrics of one output: ``{"strict": bool, "flexible": bool, "lenient": bool,
    "extracted": {"strict": str, "flexible": str, "lenient": str | None}}``."""
    from slmkd.scoring.harness import harness_scores

    dataset = dataset.lower()
    h = harness_scores(dataset, text or "", str(target), task=task, question=question)
    lenient = score_prediction(dataset, text or "", str(target), task, question)
    return {
        "strict": bool(h["strict"]), "flexible": bool(h["flexible"]),
        "lenient": bool(lenient["correct"]),
        "extracted": {**h["extracted"], "lenient": lenient["extracted"]},
    }
