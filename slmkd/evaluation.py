"""Evaluation: answer extraction, scoring, batched generation over GSM8K / BBH, summaries.

Scoring follows lm-evaluation-harness's chain-of-thought tasks:

* GSM8K has two extractors. *strict* reads the trained final-answer line
  (``"The answer is N."``, :data:`FINAL_ANSWER_PREFIX`); *flexible* takes the last number anywhere
  in the output. Both normalise numbers (``$``, thousands commas, trailing period,
  ``18.00 == 18``, negatives). :func:`extract_answer` returns strict when present, else flexible.
* BBH is scored by task type (:data:`BBH_TASK_TYPES`): multiple choice ``(A)``–``(R)`` (option
  text mapped back to its letter using the options parsed from the question), True/False,
  Yes/No, valid/invalid, numbers (digits or number words), Dyck bracket completions and word
  sorting. The answer is read from the last answer cue (``"So the answer is X."``,
  ``"The answer is X"``, ``"Answer: X"``, ``\\boxed{X}``); without a cue, from the last line.
  An answer naming more than one option (``"(A) or (B)"``, ``"Yes or no"``) earns nothing.

This module imports nothing heavy at import time: torch / transformers and the generation
back-ends are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from slmkd.data.gsm8k import normalize_number

try:  # the lead's prompt module defines the trained final-answer format
    from slmkd.data.prompts import FINAL_ANSWER_PREFIX
except Exception:  # pragma: no cover - only while the data package does not exist yet
    FINAL_ANSWER_PREFIX = "The answer is"

__all__ = [
    "BBH_TASK_TYPES",
    "FINAL_ANSWER_PREFIX",
    "add_evaluate_command",
    "bbh_task_type",
    "check_no_leakage",
    "eval_dir",
    "evaluate_model",
    "evaluate_run",
    "extract_answer",
    "extract_bbh",
    "extract_gsm8k",
    "is_correct",
    "normalize_number",
    "parse_options",
    "score_prediction",
]

# ---------------------------------------------------------------------------------------------
# BBH task table
# ---------------------------------------------------------------------------------------------

MULTIPLE_CHOICE = "multiple_choice"
TRUE_FALSE = "true_false"
YES_NO = "yes_no"
VALID_INVALID = "valid_invalid"
NUMBER = "number"
DYCK = "dyck"
WORD_SORT = "word_sort"

#: The 27 BIG-Bench Hard tasks and how their answers are read and compared.
BBH_TASK_TYPES: dict[str, str] = {
    "boolean_expressions": TRUE_FALSE,
    "causal_judgement": YES_NO,
    "date_understanding": MULTIPLE_CHOICE,
    "disambiguation_qa": MULTIPLE_CHOICE,
    "dyck_languages": DYCK,
    "formal_fallacies": VALID_INVALID,
    "geometric_shapes": MULTIPLE_CHOICE,
    "hyperbaton": MULTIPLE_CHOICE,
    "logical_deduction_five_objects": MULTIPLE_CHOICE,
    "logical_deduction_seven_objects": MULTIPLE_CHOICE,
    "logical_deduction_three_objects": MULTIPLE_CHOICE,
    "movie_recommendation": MULTIPLE_CHOICE,
    "multistep_arithmetic_two": NUMBER,
    "navigate": YES_NO,
    "object_counting": NUMBER,
    "penguins_in_a_table": MULTIPLE_CHOICE,
    "reasoning_about_colored_objects": MULTIPLE_CHOICE,
    "ruin_names": MULTIPLE_CHOICE,
    "salient_translation_error_detection": MULTIPLE_CHOICE,
    "snarks": MULTIPLE_CHOICE,
    "sports_understanding": YES_NO,
    "temporal_sequences": MULTIPLE_CHOICE,
    "tracking_shuffled_objects_five_objects": MULTIPLE_CHOICE,
    "tracking_shuffled_objects_seven_objects": MULTIPLE_CHOICE,
    "tracking_shuffled_objects_three_objects": MULTIPLE_CHOICE,
    "web_of_lies": YES_NO,
    "word_sorting": WORD_SORT,
}

#: Canonical labels (as the BBH targets spell them) for the binary task types.
_BINARY_LABELS: dict[str, tuple[str, str]] = {
    TRUE_FALSE: ("True", "False"),
    YES_NO: ("Yes", "No"),
    VALID_INVALID: ("valid", "invalid"),
}
_LOWERCASE_YES_NO_TASKS = {"sports_understanding"}

_NUMBER_WORDS: dict[str, int] = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER_WORDS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
                      "eighty": 80, "ninety": 90, "hundred": 100})


def bbh_task_type(task: str | None) -> str | None:
    """The answer type of a BBH task (``None`` for an unknown or missing task name)."""
    if task is None:
        return None
    return BBH_TASK_TYPES.get(task)


# ---------------------------------------------------------------------------------------------
# Shared text helpers
# ---------------------------------------------------------------------------------------------

_NUM_RE = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_CUE_RE = re.compile(
    r"\b(?:answers?\s+(?:is|would\s+be|should\s+be|will\s+be|=)\s*:?|answers?\s*:)",
    re.IGNORECASE,
)
_BOXED_RE = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
_NEXT_QUESTION_RE = re.compile(r"\n\s*(?:Q|Question)\s*:")


def _clean_markdown(text: str) -> str:
    """Drop bold/underline markers, backticks and heading hashes (``####`` is kept for GSM8K)."""
    text = re.sub(r"\*\*|__|`+", "", text)
    return re.sub(r"^\s*#{1,3}\s+(?!\d)", "", text, flags=re.MULTILINE)


def _truncate_next_question(text: str) -> str:
    """Cut a generation where it starts inventing the next ``Q:`` (few-shot run-on)."""
    m = _NEXT_QUESTION_RE.search(text)
    return text[: m.start()] if m and m.start() > 0 else text


def _answer_span(text: str) -> str | None:
    """Text after the last answer cue, up to the end of its line (or the next non-empty line).

    Cues: ``the answer is``, ``answer:``, ``final answer is`` … and ``\\boxed{...}`` (whichever
    comes last). Returns ``None`` when the text has no cue.
    """
    best_pos, best_span = -1, None
    for m in _CUE_RE.finditer(text):
        rest = text[m.end():]
        line, _, after = rest.partition("\n")
        if not line.strip(" \t*:-"):
            nxt = next((ln for ln in after.split("\n") if ln.strip()), "")
            line = nxt
        best_pos, best_span = m.start(), line
    for m in _BOXED_RE.finditer(text):
        if m.start() > best_pos:
            best_pos, best_span = m.start(), m.group(1)
    if best_span is None:
        return None
    return best_span.strip()


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().split("\n") if ln.strip()]
    return lines[-1] if lines else ""


_CLAUSE_END_RE = re.compile(
    r"\.\s+(?=[A-Z(])|\.$|;|\s+(?:because|since|as|which|given|due to)\s+|\s+--\s+|\s*—\s*",
)


def _first_clause(span: str) -> str:
    """The span up to its first sentence end or explanation (``because``, ``since``, ``;``…)."""
    m = _CLAUSE_END_RE.search(span)
    return span[: m.start()] if m else span


def _strip_wrappers(s: str) -> str:
    s = s.strip()
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    return s.strip(" \t\"'“”‘’*_$.:,!")


# ---------------------------------------------------------------------------------------------
# Numbers / GSM8K
# ---------------------------------------------------------------------------------------------


def _number_word(s: str) -> int | None:
    words = re.findall(r"[a-z]+", s.lower())
    if not words:
        return None
    total = 0
    for w in words:
        if w in ("and",):
            continue
        if w not in _NUMBER_WORDS:
            return None
        v = _NUMBER_WORDS[w]
        total = total * 100 if v == 100 else total + v
    return total


def _numbers_in(text: str) -> list[str]:
    out = []
    for m in _NUM_RE.finditer(text):
        n = normalize_number(m.group(0))
        if n is not None:
            out.append(n)
    return out


def extract_gsm8k(text: str | None) -> tuple[str | None, str | None]:
    """``(strict, flexible)`` GSM8K answers of a generation, both normalised (or ``None``).

    strict: the number after the last ``"The answer is"`` (the trained final-answer line; markdown
    bold, ``:`` and ``$`` allowed in between); flexible: the last number anywhere in the text.
    """
    if not text:
        return None, None
    t = _clean_markdown(_truncate_next_question(text))
    strict = None
    prefix = re.escape(FINAL_ANSWER_PREFIX).replace(r"\ ", r"\s+")
    for m in re.finditer(prefix + r"\s*:?\s*(-?\s?\$?\s?-?\d[\d,]*(?:\.\d+)?)", t, re.IGNORECASE):
        strict = normalize_number(m.group(1))
    nums = _numbers_in(t)
    flexible = nums[-1] if nums else None
    return strict, flexible


# ---------------------------------------------------------------------------------------------
# BBH
# ---------------------------------------------------------------------------------------------

_OPTION_LINE_RE = re.compile(r"^\s*\(([A-R])\)\s*(.+?)\s*$", re.MULTILINE)
_LETTER_PAREN_RE = re.compile(r"\(([A-R])\)")
_LETTER_WORD_RE = re.compile(r"\b(?:option|choice)\s*\(?([A-R])\b\)?", re.IGNORECASE)
_LETTER_LEAD_RE = re.compile(r"^\(?([A-R])(?:\)|\.|:|,|$|\s)")
_LETTER_JOINED_RE = re.compile(r"(?:\bor|\band|,|/)\s*\(?([A-R])\b(?!['\w])")


def parse_options(question: str | None) -> dict[str, str]:
    """Options of a BBH multiple-choice question: ``{"A": "12/25/1937", ...}``."""
    if not question:
        return {}
    return {m.group(1): m.group(2) for m in _OPTION_LINE_RE.finditer(question)}


def _norm_text(s: str) -> str:
    s = s.lower().replace("’", "'").replace("‘", "'").replace("“", '"').replace("”", '"')
    s = re.sub(r"\s+", " ", s)
    return s.strip(" \t\"'*_.,:;!")


def _letters_in(clause: str) -> list[str]:
    letters = [m.group(1) for m in _LETTER_PAREN_RE.finditer(clause)]
    letters += [m.group(1) for m in _LETTER_WORD_RE.finditer(clause)]
    lead = re.sub(r"^(?:either|maybe|probably)\s+", "", clause.strip(" \t\"'*_:"))
    m = _LETTER_LEAD_RE.match(lead)
    if m:
        letters.append(m.group(1))
        # "A or B", "A, B": further bare letters joined to the first one
        letters += _LETTER_JOINED_RE.findall(clause)
    return list(dict.fromkeys(letters))


def _options_named(span: str, options: dict[str, str]) -> list[str]:
    """Letters whose option text appears (as a whole phrase) in ``span``.

    Options whose text lies inside another matched option's text are dropped ("rita" inside
    "rita, sue and bob poo"); numbers written as digits match number-word options.
    """
    s = _norm_text(span)
    hits: list[tuple[str, str, int, int]] = []
    for letter, text in options.items():
        o = _norm_text(text)
        if not o:
            continue
        for m in re.finditer(r"(?<![\w])" + re.escape(o) + r"(?![\w])", s):
            hits.append((letter, o, m.start(), m.end()))
    # an option's text as a number ("two") also matches the digits ("2")
    for letter, text in options.items():
        v = _number_word(text)
        if v is not None and any(n == str(v) for n in _numbers_in(s)):
            hits.append((letter, str(v), -1, -1))
    keep = []
    for h in hits:
        covered = any(
            o is not h and o[2] <= h[2] and h[3] <= o[3] and (o[3] - o[2]) > (h[3] - h[2])
            for o in hits
            if o[2] >= 0 and h[2] >= 0
        )
        if not covered:
            keep.append(h)
    # identical option texts under different letters: ambiguous by construction
    return list(dict.fromkeys(h[0] for h in keep))


def _mc_from(span: str, options: dict[str, str]) -> str | None:
    clause = _first_clause(span)
    letters = _letters_in(clause)
    if len(letters) == 1:
        return f"({letters[0]})"
    if len(letters) > 1:
        return None  # hedging: more than one option named
    if options:
        named = _options_named(clause, options)
        if len(named) != 1:
            named = _options_named(span, options) if not named else named
        if len(named) == 1:
            return f"({named[0]})"
    return None


def _binary_from(span: str, labels: tuple[str, str]) -> str | None:
    clause = _first_clause(span)
    head = clause.split("(", 1)[0]  # "True (since not False is True)"
    return _one_label(head, labels) or _one_label(clause, labels)


def _one_label(clause: str, labels: tuple[str, str]) -> str | None:
    found = {
        m.group(1).lower()
        for m in re.finditer(
            r"(?<![\w-])(" + "|".join(re.escape(lb) for lb in labels) + r")(?![\w-])",
            clause,
            re.IGNORECASE,
        )
    }
    if len(found) != 1:
        return None
    word = found.pop()
    return next(lb for lb in labels if lb.lower() == word)


def _number_from(span: str) -> str | None:
    clause = _first_clause(span)
    if "=" in clause:
        clause = clause.rsplit("=", 1)[1]
    nums = _numbers_in(clause)
    if re.search(r"\d\s*,?\s+or\s+-?\$?\d", clause):
        return None
    if nums:
        return nums[0]
    words = _strip_wrappers(clause)
    v = _number_word(words.split(" ")[0]) if words else None
    if v is not None:
        return str(v)
    return None


_DYCK_CHARS = "()[]{}<>"


def _dyck_from(span: str, question: str | None) -> str | None:
    s = re.sub(r"[\"'`*“”]", " ", span).strip()
    m = re.match(r"[\s()\[\]{}<>,]*", s)
    seq = [c for c in (m.group(0) if m else "") if c in _DYCK_CHARS]
    if not seq:
        return None
    if question:
        qm = re.search(r"Input:\s*(.+)", question)
        if qm:
            given = [c for c in qm.group(1) if c in _DYCK_CHARS]
            # the model repeated the whole sequence: keep only the completion
            if len(seq) > len(given) and seq[: len(given)] == given:
                seq = seq[len(given):]
    return " ".join(seq)


def _word_sort_from(span: str) -> str | None:
    s = span.strip()
    s = re.sub(r"\.$", "", s)
    words = [w.strip("\"'“”‘’*_.,;:!`[]") for w in re.split(r"[\s,]+", s)]
    words = [w.lower() for w in words if w]
    return " ".join(words) if words else None


def _bbh_from_span(span: str, ttype: str | None, task: str | None, question: str | None):
    if ttype == MULTIPLE_CHOICE:
        return _mc_from(span, parse_options(question))
    if ttype in _BINARY_LABELS:
        labels = _BINARY_LABELS[ttype]
        if task in _LOWERCASE_YES_NO_TASKS:
            labels = (labels[0].lower(), labels[1].lower())
        return _binary_from(span, labels)
    if ttype == NUMBER:
        return _number_from(span)
    if ttype == DYCK:
        return _dyck_from(span, question)
    if ttype == WORD_SORT:
        return _word_sort_from(span)
    # unknown task: best effort, the first clause as written
    out = _strip_wrappers(_first_clause(span))
    return out or None


def extract_bbh(
    text: str | None, task: str | None = None, question: str | None = None
) -> tuple[str | None, str | None]:
    """``(strict, flexible)`` BBH answers of a generation.

    strict reads only the text after the last answer cue; flexible falls back to the last
    non-empty line and, for multiple choice / numbers, to the last ``(X)`` / number in the text
    (lm-evaluation-harness's flexible extraction).
    """
    if not text:
        return None, None
    t = _clean_markdown(_truncate_next_question(text))
    ttype = bbh_task_type(task)
    span = _answer_span(t)
    strict = _bbh_from_span(span, ttype, task, question) if span is not None else None
    if strict is not None:
        return strict, strict
    last = _last_line(t)
    flexible = _bbh_from_span(last, ttype, task, question)
    if flexible is None and span is None and len(_letters_in(last)) < 2:
        if ttype == MULTIPLE_CHOICE:
            letters = _LETTER_PAREN_RE.findall(t)
            flexible = f"({letters[-1]})" if letters else None
        elif ttype == NUMBER:
            nums = _numbers_in(t)
            flexible = nums[-1] if nums else None
    return strict, flexible


def extract_answer(
    dataset: str, text: str | None, task: str | None = None, question: str | None = None
) -> str | None:
    """The answer a generation gives, normalised for :func:`is_correct` (``None`` if none).

    ``dataset`` is ``"gsm8k"`` or ``"bbh"``; ``task`` selects the BBH answer type and
    ``question`` lets a multiple-choice answer written as option text map to its letter.
    Strict extraction is preferred; the flexible one is used when strict finds nothing.
    """
    ds = dataset.lower()
    if ds == "gsm8k":
        strict, flexible = extract_gsm8k(text)
    elif ds == "bbh":
        strict, flexible = extract_bbh(text, task, question)
    else:
        raise ValueError(f"unknown dataset {dataset!r}: expected 'gsm8k' or 'bbh'")
    return strict if strict is not None else flexible


def _gsm8k_target(target: str) -> str | None:
    t = str(target)
    if "####" in t:
        t = t.rsplit("####", 1)[1]
    return normalize_number(t.strip())


def _mc_letter(s: str) -> str | None:
    m = re.fullmatch(r"\s*\(?([A-R])\)?\s*\.?\s*", s)
    return m.group(1) if m else None


def is_correct(dataset: str, prediction: str | None, target: str, task: str | None = None) -> bool:
    """Whether an extracted answer equals the gold target.

    GSM8K: numeric equality after normalisation (a ``"... #### N"`` target is reduced to N).
    BBH by task type: option letter; case-insensitive label; numeric value; bracket sequence
    ignoring spaces; word list (case-insensitive, punctuation ignored). Unknown tasks compare the
    normalised strings. ``None`` predictions are never correct.
    """
    if prediction is None or target is None:
        return False
    ds = dataset.lower()
    if ds == "gsm8k":
        p, t = normalize_number(prediction), _gsm8k_target(target)
        return p is not None and t is not None and Decimal(p) == Decimal(t)
    if ds != "bbh":
        raise ValueError(f"unknown dataset {dataset!r}: expected 'gsm8k' or 'bbh'")
    ttype = bbh_task_type(task)
    pred, tgt = str(prediction), str(target)
    if ttype == MULTIPLE_CHOICE or (ttype is None and _mc_letter(tgt)):
        tl = _mc_letter(tgt)
        if tl is not None:
            return _mc_letter(pred) == tl
        return _norm_text(pred) == _norm_text(tgt)  # a few BBH targets are option text
    if ttype in _BINARY_LABELS:
        return _norm_text(pred) == _norm_text(tgt)
    if ttype == NUMBER:
        p, t = normalize_number(pred), normalize_number(tgt)
        return p is not None and t is not None and Decimal(p) == Decimal(t)
    if ttype == DYCK:
        return re.sub(r"\s+", "", pred) == re.sub(r"\s+", "", tgt)
    if ttype == WORD_SORT:
        return _word_sort_from(pred) == _word_sort_from(tgt)
    return _norm_text(pred) == _norm_text(tgt)


def score_prediction(
    dataset: str,
    raw_output: str,
    target: str,
    task: str | None = None,
    question: str | None = None,
) -> dict[str, Any]:
    """Extraction and scoring of one generation: ``extracted, correct, strict_correct,
    flexible_correct`` (``correct`` uses :func:`extract_answer`, strict when present)."""
    if dataset.lower() == "gsm8k":
        strict, flexible = extract_gsm8k(raw_output)
    else:
        strict, flexible = extract_bbh(raw_output, task, question)
    extracted = strict if strict is not None else flexible
    return {
        "extracted": extracted,
        "correct": is_correct(dataset, extracted, target, task),
        "strict_correct": is_correct(dataset, strict, target, task),
        "flexible_correct": is_correct(dataset, flexible, target, task),
    }


# ---------------------------------------------------------------------------------------------
# Leakage guard
# ---------------------------------------------------------------------------------------------


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
        from slmkd.teacher import cot_dir, load_cot_records

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


# ---------------------------------------------------------------------------------------------
# Predictions file (resumable) and summaries
# ---------------------------------------------------------------------------------------------

PREDICTIONS_FILE = "predictions.jsonl"
SUMMARY_FILE = "summary.json"
EVAL_META_FILE = "eval_meta.json"
CASCOD_METHODS = ("cascod", "cascod-2stage", "cascod-kd")
_USE_CONFIG: Any = object()


def eval_dir(cfg: Any, model_slug: str, dataset: str) -> Path:
    """``{drive_root}/eval/{model_slug}/{dataset}``."""
    from slmkd.runtime import get_drive_root

    return get_drive_root(cfg) / "eval" / model_slug / dataset


def run_model_slug(method: str, student: str, seed: int) -> str:
    """``{method}__{student_slug}__seed{N}``: the eval folder name of a trained run."""
    from slmkd.modeling import model_slug

    return f"{method}__{model_slug(student)}__seed{int(seed)}"


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


# ---------------------------------------------------------------------------------------------
# Batched evaluation
# ---------------------------------------------------------------------------------------------


def _resolve_limit(cfg: Any, dataset: str, limit: Any) -> int | None:
    if limit is _USE_CONFIG:
        return cfg.evaluation.gsm8k_limit if dataset == "gsm8k" else cfg.evaluation.bbh_limit
    if limit is not None and int(limit) <= 0:
        return None
    return None if limit is None else int(limit)


def evaluation_records(cfg: Any, dataset: str, limit: Any = _USE_CONFIG) -> list[Any]:
    """The evaluation items: the test split (BBH: the pool disjoint from any BBH training part)
    reduced to ``limit`` items (BBH: per task) by ``cfg.evaluation.subset_seed``; sorted by id.
    ``limit`` defaults to ``cfg.evaluation.gsm8k_limit`` / ``bbh_limit``; ``None`` = all."""
    from slmkd.data.records import eval_subset
    from slmkd.data.sources import load_records

    if dataset not in ("gsm8k", "bbh"):
        raise ValueError(f"unknown dataset {dataset!r}: expected 'gsm8k' or 'bbh'")
    loaded = load_records(cfg, dataset, "test")
    if not loaded.records:
        raise ValueError(f"no {dataset} evaluation records ({loaded.summary()})")
    return eval_subset(loaded.records, _resolve_limit(cfg, dataset, limit),
                       cfg.evaluation.subset_seed, per_task=(dataset == "bbh"))


def evaluate_model(
    cfg: Any,
    model: Any,
    dataset: str,
    *,
    method: str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    limit: Any = _USE_CONFIG,
    tokenizer: Any = None,
    tokenizer_name: str | None = None,
    model_slug: str | None = None,
    kind: str | None = None,
    student: str | None = None,
    seed: int | None = None,
    train_questions: Iterable[str] | None = None,
    records: Sequence[Any] | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    force: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Generate, score and summarise one model on one dataset; returns the summary dict.

    ``model`` is a model name / local path (loaded only if some item still needs generating) or
    a loaded model (then pass ``tokenizer``). Prompts are the training chat prompts
    (:func:`slmkd.data.prompts.build_prompt`); CasCoD methods decode in two steps
    (:func:`slmkd.cascod.cascaded_generate`), others greedily
    (:func:`slmkd.generation.iter_generate_batched`, or vLLM with
    ``cfg.evaluation.backend == "vllm"``). Each finished batch is appended to
    ``predictions.jsonl``, so a rerun continues where it stopped; ``summary.json`` is written
    atomically at the end. With ``train_questions`` the leakage guard runs first.
    """
    import time

    from slmkd.modeling import model_slug as _slug
    from slmkd.runtime import atomic_write_json

    dataset = dataset.lower()
    name = model if isinstance(model, (str, os.PathLike)) else None
    if name is None and tokenizer is None:
        raise ValueError("pass tokenizer= together with a loaded model")
    slug = model_slug or (_slug(str(name)) if name is not None else "model")
    if kind is None:
        kind = "run" if method else ("teacher" if name == cfg.teacher else "base")
    subset = list(records) if records is not None else evaluation_records(cfg, dataset, limit)
    if train_questions is not None:
        check_no_leakage(subset, train_questions)
    out = Path(out_dir) if out_dir is not None else eval_dir(cfg, slug, dataset)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / PREDICTIONS_FILE
    max_new = int(max_new_tokens or cfg.evaluation.max_new_tokens)
    bs = int(batch_size or cfg.evaluation.batch_size)
    cascod = method in CASCOD_METHODS
    meta = {"model": slug, "model_name": str(name) if name is not None else None,
            "dataset": dataset, "method": method, "max_new_tokens": max_new,
            "cascaded": cascod, "answer_cue": cfg.cascod.answer_cue if cascod else None,
            "final_answer_prefix": FINAL_ANSWER_PREFIX}
    meta_path = out / EVAL_META_FILE
    if force:
        for p in (pred_path, out / SUMMARY_FILE, meta_path):
            p.unlink(missing_ok=True)
    if meta_path.is_file() and pred_path.is_file():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        diff = {k: (old.get(k), v) for k, v in meta.items()
                if old.get(k) != v and k != "model_name"}
        if diff:
            raise ValueError(
                f"{pred_path} was produced with different settings {diff}; rerun with "
                "force=True (CLI: --force) to start over, or use another out_dir."
            )
    atomic_write_json(meta_path, meta)

    done, bad = read_predictions(pred_path)
    if bad:  # drop a line cut short by a crash, atomically
        from slmkd.runtime import atomic_write_text

        atomic_write_text(pred_path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                             for r in done.values()))
    pending = [r for r in subset if r.id not in done]
    t0 = time.perf_counter()
    if pending:
        _generate_into(cfg, model, name, tokenizer, tokenizer_name, dataset, pending, pred_path,
                       done, method=method, batch_size=bs, max_new_tokens=max_new,
                       desc=f"eval {slug} {dataset}", show_progress=show_progress)
    rows = [done[r.id] for r in subset if r.id in done]
    if len(rows) != len(subset):
        raise RuntimeError(f"{len(subset) - len(rows)} items have no prediction in {pred_path}")
    summary = summarize_predictions(rows, dataset, seed=cfg.evaluation.subset_seed)
    summary.update({
        "model": slug, "model_name": meta["model_name"], "kind": kind, "method": method,
        "student": student, "seed": seed, "subset_seed": cfg.evaluation.subset_seed,
        "limit": (len(subset) if records is not None else _resolve_limit(cfg, dataset, limit)),
        "max_new_tokens": max_new, "generated_now": len(pending),
        "wall_time_s": round(time.perf_counter() - t0, 3),
        "leakage_checked": train_questions is not None,
        "predictions": str(pred_path),
    })
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def _generate_into(cfg, model, name, tokenizer, tokenizer_name, dataset, pending, pred_path,
                   done, *, method, batch_size, max_new_tokens, desc, show_progress) -> None:
    """Generate for ``pending`` records and append scored rows batch by batch."""
    from slmkd.data.prompts import build_prompt
    from slmkd.data.sources import bbh_prompts_for

    if tokenizer is None:
        from slmkd.modeling import load_tokenizer

        try:
            tokenizer = load_tokenizer(str(name), cfg, padding_side="left")
        except (OSError, ValueError):
            if not tokenizer_name:
                raise
            tokenizer = load_tokenizer(tokenizer_name, cfg, padding_side="left")
    bbh_prompts = bbh_prompts_for(cfg, dataset)
    prompts = [build_prompt(tokenizer, r, bbh_prompts) for r in pending]

    def rows_for(idx: Sequence[int], texts: Sequence[str], extra: Sequence[dict]) -> list[dict]:
        rows = []
        for i, text, ex in zip(idx, texts, extra, strict=True):
            rec = pending[i]
            row = {"id": rec.id, "dataset": dataset, "task": rec.task, "question": rec.question,
                   "raw_output": text, "target": rec.answer}
            row.update(score_prediction(dataset, text, rec.answer, rec.task, rec.question))
            row.update(ex)
            rows.append(row)
            done[rec.id] = row
        return rows

    backend = getattr(cfg.evaluation, "backend", "hf")
    if backend == "vllm" and name is not None and method not in CASCOD_METHODS:
        from slmkd.generation import generate_batched_vllm

        def on_batch(b):
            _append_rows(pred_path, rows_for(
                b.indices, [o.text for o in b.outputs],
                [{"num_new_tokens": o.num_new_tokens, "hit_max_new_tokens": o.hit_max_new_tokens}
                 for o in b.outputs]))

        from slmkd.modeling import resolve_model_path

        generate_batched_vllm(resolve_model_path(str(name), cfg), tokenizer, prompts,
                              max_new_tokens=max_new_tokens, batch_size=batch_size * 8,
                              desc=desc, on_batch=on_batch)
        return

    if name is not None:
        from slmkd.modeling import load_causal_lm

        model = load_causal_lm(str(name), cfg, role="student", for_training=False)
    if method in CASCOD_METHODS:
        from slmkd.cascod import cascaded_generate

        step = batch_size * 4  # persist every few batches
        for k in range(0, len(prompts), step):
            outs = cascaded_generate(
                model, tokenizer, prompts[k:k + step], answer_cue=cfg.cascod.answer_cue,
                max_new_tokens_rationale=max_new_tokens, batch_size=batch_size,
                desc=f"{desc} [{k}/{len(prompts)}]", show_progress=show_progress)
            idx = list(range(k, k + len(outs)))
            _append_rows(pred_path, rows_for(
                idx, [o["full_text"] for o in outs],
                [{"num_new_tokens": o["num_new_tokens"],
                  "hit_max_new_tokens": bool(o["rationale_hit_max"] or o["answer_hit_max"]),
                  "rationale": o["rationale"]} for o in outs]))
        return
    from slmkd.generation import iter_generate_batched

    for b in iter_generate_batched(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, desc=desc,
                                   show_progress=show_progress):
        _append_rows(pred_path, rows_for(
            b.indices, [o.text for o in b.outputs],
            [{"num_new_tokens": o.num_new_tokens, "hit_max_new_tokens": o.hit_max_new_tokens}
             for o in b.outputs]))


def read_train_summary(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``run_dir/train_summary.json`` (written last by the trainer: the run is complete)."""
    p = Path(run_dir) / "train_summary.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"{p} not found: the run is not complete. Finish it with notebook 02/03 or "
            "`slmkd train` (it resumes from its last checkpoint).")
    s = json.loads(p.read_text(encoding="utf-8"))
    missing = [k for k in ("method", "student", "seed") if k not in s]
    if missing:
        raise ValueError(f"{p} lacks {missing}")
    return s


def evaluate_run(
    cfg: Any,
    run_dir: str | os.PathLike[str],
    *,
    datasets: Sequence[str] | None = None,
    limit: Any = _USE_CONFIG,
    check_leakage: bool = True,
    force: bool = False,
    show_progress: bool = True,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Evaluate a trained run on ``datasets`` (default ``cfg.evaluation.datasets``).

    Reads ``train_summary.json`` (method, student, seed, final_model_dir), evaluates
    ``run_dir/final_model_dir`` into ``eval/{method}__{student_slug}__seed{N}/{dataset}/`` and
    returns ``{dataset: summary}``. The leakage guard compares every evaluation question with
    the questions of the run's training data (teacher CoT records and training split).
    """
    run_dir = Path(run_dir)
    ts = read_train_summary(run_dir)
    method, student, seed = str(ts["method"]), str(ts["student"]), int(ts["seed"])
    final = run_dir / str(ts.get("final_model_dir") or "final")
    if not final.is_dir():
        raise FileNotFoundError(f"final model folder {final} (from train_summary.json) is missing")
    slug = run_model_slug(method, student, seed)
    train_q = training_questions_for_run(cfg, ts) if check_leakage else None
    out: dict[str, dict[str, Any]] = {}
    for ds in datasets or cfg.evaluation.datasets:
        out[ds] = evaluate_model(
            cfg, str(final), ds, method=method, limit=limit, model_slug=slug, kind="run",
            student=student, seed=seed, train_questions=train_q, tokenizer_name=student,
            force=force, show_progress=show_progress, **kwargs)
    return out


def format_summary_line(summary: dict[str, Any]) -> str:
    """``model dataset: acc 52.4% [47.9, 56.8] (strict 51.0%, flexible 53.2%), n=500``."""
    return (f"{summary['model']} {summary['dataset']}: acc {100 * summary['accuracy']:.1f}% "
            f"[{100 * summary['ci_low']:.1f}, {100 * summary['ci_high']:.1f}] "
            f"(strict {100 * summary['strict_accuracy']:.1f}%, "
            f"flexible {100 * summary['flexible_accuracy']:.1f}%), n={summary['n']}")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _evaluate_command(args: argparse.Namespace) -> int:
    from slmkd.cli import config_from_args

    cfg = config_from_args(args)
    datasets = [args.dataset] if args.dataset else list(cfg.evaluation.datasets)
    limit = _USE_CONFIG if args.limit is None else (None if args.limit <= 0 else args.limit)
    kw = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    if args.run_dir:
        results = evaluate_run(cfg, args.run_dir, datasets=datasets, limit=limit,
                               force=args.force, **kw)
    else:
        results = {ds: evaluate_model(cfg, args.model, ds, limit=limit, force=args.force, **kw)
                   for ds in datasets}
    for s in results.values():
        print(format_summary_line(s))
        print(f"  -> {Path(s['predictions']).parent}")
    return 0


def add_evaluate_command(subparsers: Any) -> None:
    """``slmkd evaluate --run-dir DIR | --model NAME [--dataset gsm8k|bbh] [--limit N]``."""
    from slmkd.cli import add_profile_args

    p = subparsers.add_parser(
        "evaluate", help="evaluate a trained run or a base/teacher model on GSM8K / BBH")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--run-dir", default=None, help="a complete run folder (train_summary.json)")
    g.add_argument("--model", default=None, help="a model name or path (base student, teacher)")
    p.add_argument("--dataset", choices=["gsm8k", "bbh"], default=None,
                   help="default: cfg.evaluation.datasets")
    p.add_argument("--limit", type=int, default=None,
                   help="items (BBH: per task); default from the config; 0 = all")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--force", action="store_true", help="discard earlier predictions")
    add_profile_args(p)
    p.set_defaults(func=_evaluate_command)
