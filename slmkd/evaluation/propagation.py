"""Error propagation of a CasCoD student: answer accuracy given the teacher's rationale vs its own."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from slmkd.data.cot_format import DEFAULT_ANSWER_CUE, SplitCoT, split_cot
from slmkd.data.records import record_from_dict
from slmkd.generation.cascade import cascaded_generate
from slmkd.scoring import extract_answer, is_correct

__all__ = ["error_propagation"]


def _first(rec: dict[str, Any], keys: Sequence[str]) -> Any:
    for k in keys:
        if rec.get(k) is not None:
            return rec[k]
    return None


def error_propagation(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    *,
    answer_cue: str = DEFAULT_ANSWER_CUE,
    max_new_tokens_rationale: int,
    max_new_tokens_answer: int = 64,
    batch_size: int,
    bbh_prompts: dict[str, str] | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """How much of a CasCoD student's error comes from its own rationale.

    For each record (a dict with ``question``, ``dataset``, ``task``, the gold answer in ``gold``
    / ``target`` / ``answer``, and the teacher's CoT in ``completion`` / ``raw_output``: a CoT
    record or a teacher ``predictions.jsonl`` row) the student answers twice with the same answer
    step: given the teacher's rationale (split off the teacher's CoT) and given its own greedy
    rationale. Records whose teacher CoT has no clean split are skipped and counted.

    Returns ``n``, ``acc_teacher_rationale``, ``acc_own_rationale``, their difference
    ``propagation_gap`` (= teacher − own), the 2×2 agreement counts ``both_correct``,
    ``only_teacher_rationale``, ``only_own_rationale``, ``neither``, ``skipped`` (reason → count)
    and per-record ``rows``.
    """
    from slmkd.data.prompts import build_prompt

    kept: list[tuple[dict[str, Any], str, str]] = []
    skipped: Counter = Counter()
    for rec in records:
        split = split_cot(_first(rec, ("completion", "raw_output", "teacher_output")))
        gold = _first(rec, ("gold", "target", "answer"))
        if not isinstance(split, SplitCoT):
            skipped[f"split:{split}"] += 1
            continue
        if gold is None:
            skipped["no_gold"] += 1
            continue
        try:
            prompt = build_prompt(tokenizer, record_from_dict(rec), bbh_prompts)
        except (KeyError, TypeError):
            skipped["prompt_error"] += 1
            continue
        kept.append((rec, prompt, split.rationale))
    prompts = [p for _, p, _ in kept]
    kw = dict(answer_cue=answer_cue, max_new_tokens_rationale=max_new_tokens_rationale,
              max_new_tokens_answer=max_new_tokens_answer, batch_size=batch_size,
              show_progress=show_progress)
    with_teacher = cascaded_generate(model, tokenizer, prompts, rationales=[r for *_, r in kept],
                                     desc="answer | teacher rationale", **kw)
    with_own = cascaded_generate(model, tokenizer, prompts, desc="answer | own rationale", **kw)
    rows: list[dict[str, Any]] = []
    counts = Counter()
    for (rec, _, _), t_out, o_out in zip(kept, with_teacher, with_own, strict=True):
        ds, task, q = str(rec.get("dataset", "gsm8k")), rec.get("task"), rec.get("question")
        gold = str(_first(rec, ("gold", "target", "answer")))
        t_pred = extract_answer(ds, t_out["full_text"], task, q)
        o_pred = extract_answer(ds, o_out["full_text"], task, q)
        t_ok, o_ok = is_correct(ds, t_pred, gold, task), is_correct(ds, o_pred, gold, task)
        counts[(t_ok, o_ok)] += 1
        rows.append({"id": rec.get("id"), "target": gold, "teacher_rationale_pred": t_pred,
                     "own_rationale_pred": o_pred, "teacher_rationale_correct": t_ok,
                     "own_rationale_correct": o_ok, "own_output": o_out["full_text"]})
    n = len(rows)
    acc_t = sum(r["teacher_rationale_correct"] for r in rows) / n if n else float("nan")
    acc_o = sum(r["own_rationale_correct"] for r in rows) / n if n else float("nan")
    return {
        "n": n, "acc_teacher_rationale": acc_t, "acc_own_rationale": acc_o,
        "propagation_gap": acc_t - acc_o,
        "both_correct": counts[(True, True)], "only_teacher_rationale": counts[(True, False)],
        "only_own_rationale": counts[(False, True)], "neither": counts[(False, False)],
        "skipped": dict(skipped), "rows": rows,
    }
