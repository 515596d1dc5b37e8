"""Error propagation of a CasCoD student: answer accuracy given the teacher's rationale vs its own."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
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


def _own_rows_by_id(own_rows: Mapping[str, dict[str, Any]] | Iterable[dict[str, Any]] | None
                    ) -> dict[str, dict[str, Any]]:
    if own_rows is None:
        return {}
    if isinstance(own_rows, Mapping):
        return {str(k): v for k, v in own_rows.items()}
    out: dict[str, dict[str, Any]] = {}
    for row in own_rows:
        out.setdefault(str(row["id"]), row)
    return out


def _stored_output(row: dict[str, Any]) -> str | None:
    """The cascaded output a stored row holds: ``raw_output`` (the evaluator's
    ``r + "\n" + cue + a``) or ``full_text`` (a :func:`cascaded_generate` dict)."""
    for k in ("raw_output", "full_text"):
        if isinstance(row.get(k), str):
            return row[k]
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
    own_rows: Mapping[str, dict[str, Any]] | Iterable[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """How much of a CasCoD student's error comes from its own rationale.

    For each record (a dict with ``question``, ``dataset``, ``task``, the gold answer in ``gold``
    / ``target`` / ``answer``, and the teacher's CoT in ``completion`` / ``raw_output``: a CoT
    record or a teacher ``predictions.jsonl`` row) the student answers twice with the same answer
    step: given the teacher's rationale (split off the teacher's CoT) and given its own greedy
    rationale. Records whose teacher CoT has no clean split are skipped and counted.

    ``own_rows``: the student's stored cascaded outputs (its evaluation ``predictions.jsonl``
    rows, as a mapping id → row or a list of rows with ``id``; the output is ``raw_output`` or
    ``full_text``). A record with a stored row is scored on it and its own-rationale answer is
    not generated again; only the answers given the teacher's rationale (and own answers for
    records without a stored row) are generated. ``own_reused`` / ``own_generated`` count both.

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
    stored = _own_rows_by_id(own_rows)
    with_own: list[dict[str, Any] | None] = [None] * len(kept)
    missing: list[int] = []
    for i, (rec, _, _) in enumerate(kept):
        row = stored.get(str(rec.get("id")))
        text = _stored_output(row) if row is not None else None
        if text is None:
            missing.append(i)
        else:
            with_own[i] = {"full_text": text, "rationale": row.get("rationale")}
    if missing:
        gen = cascaded_generate(model, tokenizer, [prompts[i] for i in missing],
                                desc="answer | own rationale", **kw)
        for i, o in zip(missing, gen, strict=True):
            with_own[i] = o
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
        "skipped": dict(skipped), "own_reused": len(kept) - len(missing),
        "own_generated": len(missing), "rows": rows,
    }
