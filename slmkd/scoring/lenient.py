"""Lenient answer extraction and correctness for GSM8K and BBH: pure text, no model, no I/O.

This is slmkd's own scorer (the one the teacher filters, the tiny world, CasCoD and the evaluator
share). It is more forgiving than lm-evaluation-harness's published filters (see
:mod:`slmkd.scoring.harness` for those, reproduced exactly):

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
* LaTeX answers count as their plain text for both datasets (:func:`delatex`): ``\\boxed{18}``,
  ``\\(18\\)``, ``\\[18\\]``, ``$18$``, ``\\$18``, ``\\text{(A)}``, ``1{,}234``; so
  ``"The answer is \\(\\boxed{18}\\)."`` is the trained final-answer line (GSM8K strict) and the
  teacher filters keep such CoTs. A fraction (``\\frac{1}{2}``, ``"The answer is 1/2."``) is not
  a number: it is never read as ``1`` or ``2``.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from slmkd.data.gsm8k import normalize_number
from slmkd.data.prompts import FINAL_ANSWER_PREFIX

__all__ = [
    "BBH_TASK_TYPES",
    "FINAL_ANSWER_PREFIX",
    "bbh_task_type",
    "delatex",
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


# LaTeX commands whose braced argument is kept as plain text (``\boxed`` unless asked not to).
_LATEX_WRAPPERS = ("text", "textbf", "textit", "textrm", "textnormal", "mathrm", "mathbf",
                   "mathit", "mathsf", "mbox", "fbox", "operatorname")
_LATEX_CMD_RE = re.compile(r"\\(boxed|[dt]?frac|" + "|".join(_LATEX_WRAPPERS) + r")\s*\{")
#: U+2044 FRACTION SLASH: a LaTeX fraction ``\frac{a}{b}`` becomes ``a⁄b``, which no number
#: extractor reads as a number (:func:`_numbers_in` drops it whole).
FRACTION_SLASH = "\u2044"
_FRACTION_TOKEN_RE = re.compile(
    r"\S*" + FRACTION_SLASH + r"\S*"  # LaTeX: any content
    r"|(?<![\w/])-?\d[\d,.]*(?:/-?\d[\d,.]*)+(?![\w/])"  # plain "1/2", "12/25/1937"
)


def _closing_brace(text: str, start: int) -> int | None:
    """Index just past the ``}`` closing the ``{`` at ``text[start]`` (``None``: unbalanced).
    Escaped braces (``\\{``, ``\\}``) do not count."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _unwrap_commands(text: str, keep_boxed: bool) -> str:
    """``\\cmd{X}`` -> ``X`` and ``\\frac{a}{b}`` -> ``a⁄b``, outermost first, at any depth."""
    pos = 0
    while True:
        m = _LATEX_CMD_RE.search(text, pos)
        if m is None:
            return text
        name, brace = m.group(1), m.end() - 1
        end = _closing_brace(text, brace)
        if end is None or (name == "boxed" and keep_boxed):
            pos = m.end()
            continue
        inner = text[brace + 1 : end - 1]
        if name.endswith("frac"):
            m2 = re.compile(r"\s*\{").match(text, end)
            end2 = _closing_brace(text, m2.end() - 1) if m2 else None
            if end2 is None:
                pos = m.end()
                continue
            den = text[m2.end() : end2 - 1]
            repl = re.sub(r"\s+", "", inner) + FRACTION_SLASH + re.sub(r"\s+", "", den)
            end = end2
        else:
            repl = inner
        text = text[: m.start()] + repl + text[end:]
        pos = m.start()


def delatex(text: str, *, keep_boxed: bool = False) -> str:
    """Plain text of the LaTeX markup in a model output (text without ``\\`` or ``$`` is
    returned unchanged).

    ``\\(``, ``\\)``, ``\\[``, ``\\]`` and the ``$`` / ``$$`` math delimiters are dropped;
    ``\\$`` (an escaped dollar sign) becomes ``$``; ``\\boxed{X}``, ``\\text{X}``,
    ``\\mathbf{X}``… become ``X`` (``\\boxed`` stays with ``keep_boxed``, for callers that use it
    as an answer cue); ``\\frac{a}{b}`` becomes ``a⁄b`` (U+2044, not a number); ``1{,}234`` and
    ``1\\,234`` become ``1,234`` / ``1234``; ``\\%`` becomes ``%``. A ``$`` directly before a
    number (``$18``) is kept: it is currency, which the number normaliser ignores.
    """
    if "\\" not in text and "$" not in text:
        return text
    t = text.replace("\\$", "\x00")  # an escaped dollar sign is currency, not a delimiter
    t = _unwrap_commands(t, keep_boxed)
    t = re.sub(r"\\[()\[\]]", " ", t)
    t = t.replace("{,}", ",").replace("\\%", "%")
    t = re.sub(r"(?<=\d)\\[,!;:]\s?(?=\d)", "", t)  # 1\,234
    t = re.sub(r"\\[,!;:]|\\q?quad\b", " ", t)
    # math-mode "$": dropped, except a currency sign directly before a number
    t = t.replace("$$", " ")
    t = re.sub(r"\$(?!\s?-?\d|\.\d)", " ", t)
    t = re.sub(r"(?<=[\d.])\$", " ", t)  # the closing "$" of "$18$"
    t = t.replace("\x00", "$")
    # "\( 18 \)." leaves "18 ." once the delimiters are gone: rejoin the sentence end
    return re.sub(r"[ \t]+(?=[.,;:!?](?:\s|$))", "", t)


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
    if FRACTION_SLASH in text or "/" in text:  # a fraction is no number, nor are its parts
        text = _FRACTION_TOKEN_RE.sub(" ", text)
    for m in _NUM_RE.finditer(text):
        n = normalize_number(m.group(0))
        if n is not None:
            out.append(n)
    return out


_GSM8K_STRICT_RE = re.compile(
    re.escape(FINAL_ANSWER_PREFIX).replace(r"\ ", r"\s+")
    + r"\s*:?\s*(-?\s?\$?\s?-?\d[\d,]*(?:\.\d+)?)"
    + r"(?!\.?\d|\s*[/" + FRACTION_SLASH + r"]\s*\d)",  # not the numerator of "1/2"
    re.IGNORECASE,
)


def extract_gsm8k(text: str | None) -> tuple[str | None, str | None]:
    """``(strict, flexible)`` GSM8K answers of a generation, both normalised (or ``None``).

    strict: the number after the last ``"The answer is"`` (the trained final-answer line; markdown
    bold, ``:``, ``$`` and LaTeX allowed around it: ``\\boxed{18}``, ``\\(18\\)``, ``$18$``,
    ``\\$18``; a fraction ``1/2`` is no number); flexible: the last number anywhere in the text
    (LaTeX fractions skipped).
    """
    if not text:
        return None, None
    t = delatex(_clean_markdown(_truncate_next_question(text)))
    strict = None
    for m in _GSM8K_STRICT_RE.finditer(t):
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
    t = delatex(_clean_markdown(_truncate_next_question(text)), keep_boxed=True)
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
