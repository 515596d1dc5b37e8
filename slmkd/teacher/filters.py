"""Quality filters for teacher chain-of-thought completions.

Every completion is checked against each filter and gets one flag per failed check; a record is
*kept* (used for training) when it carries no *blocking* flag. Nothing is dropped silently: flags
are stored with the record and counted in ``cot_stats.json``.

Flags (all can co-occur):

* ``empty`` — the completion is blank after stripping whitespace.
* ``truncated`` — generation hit ``max_new_tokens`` without an end-of-sequence token.
* ``repetition`` — degenerate looping: some word n-gram (``n = repetition_ngram``) occurs more than
  ``repetition_max_repeats`` times, or the text ends in a short character unit repeated more than
  ``repetition_max_repeats`` times over at least ``min_loop_chars`` characters (loops without
  spaces, e.g. ``"=========…"``). For the word test, with tokens ``w_1..w_N`` (split on
  whitespace) the count of a gram ``g`` is ``#{i : (w_i, …, w_{i+n-1}) = g}`` (overlaps counted).
* ``no_answer`` — no final answer in the trained format: the *strict* mode of the lenient
  extractor (:mod:`slmkd.scoring.lenient`: ``"The answer is N."`` for GSM8K, an answer cue or
  ``\\boxed{}`` for BBH) finds nothing. LaTeX final answers count as the trained format
  (``"The answer is \\(18\\)."``, ``"The answer is $\\boxed{18}$."``, ``"The answer is
  \\boxed{18}."``, ``"The answer is \\$18."``, ``"So the answer is \\boxed{(A)}."``), so correct
  LaTeX CoTs are kept; a fraction (``\\boxed{\\frac{1}{2}}``) is not a number and gets this flag.
* ``incorrect`` — an answer was extracted but ``is_correct(dataset, answer, gold, task)`` is False.
  Blocking unless ``keep_incorrect`` is set.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from slmkd.scoring import extract_answer, extract_bbh, extract_gsm8k, is_correct

__all__ = [
    "FLAG_EMPTY",
    "FLAG_TRUNCATED",
    "FLAG_REPETITION",
    "FLAG_NO_ANSWER",
    "FLAG_INCORRECT",
    "ALL_FLAGS",
    "FilterConfig",
    "FilterResult",
    "find_repetition",
    "blocking_flags",
    "apply_filters",
]

FLAG_EMPTY = "empty"
FLAG_TRUNCATED = "truncated"
FLAG_REPETITION = "repetition"
FLAG_NO_ANSWER = "no_answer"
FLAG_INCORRECT = "incorrect"
ALL_FLAGS: tuple[str, ...] = (
    FLAG_EMPTY,
    FLAG_TRUNCATED,
    FLAG_REPETITION,
    FLAG_NO_ANSWER,
    FLAG_INCORRECT,
)


@dataclass(frozen=True)
class FilterConfig:
    """Filter settings (from ``cfg.generation`` via :meth:`from_cfg`)."""

    repetition_ngram: int = 8
    repetition_max_repeats: int = 4
    keep_incorrect: bool = False
    min_loop_chars: int = 48
    max_loop_unit: int = 24

    def __post_init__(self) -> None:
        if self.repetition_ngram < 1:
            raise ValueError(f"repetition_ngram must be >= 1, got {self.repetition_ngram}")
        if self.repetition_max_repeats < 1:
            raise ValueError(
                f"repetition_max_repeats must be >= 1, got {self.repetition_max_repeats}"
            )

    @classmethod
    def from_cfg(cls, cfg: Any) -> FilterConfig:
        g = cfg.generation
        return cls(
            repetition_ngram=int(g.repetition_ngram),
            repetition_max_repeats=int(g.repetition_max_repeats),
            keep_incorrect=bool(g.keep_incorrect),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "repetition_ngram": self.repetition_ngram,
            "repetition_max_repeats": self.repetition_max_repeats,
            "keep_incorrect": self.keep_incorrect,
            "min_loop_chars": self.min_loop_chars,
            "max_loop_unit": self.max_loop_unit,
        }


@dataclass(frozen=True)
class FilterResult:
    """Flags of one completion, the extracted answer (strict if present, else flexible; may be
    ``None``) and whether the record is kept for training."""

    flags: list[str] = field(default_factory=list)
    extracted_answer: str | None = None
    keep: bool = True


def _word_ngram_loop(text: str, n: int, max_repeats: int) -> str | None:
    words = text.split()
    if len(words) < n * (max_repeats + 1):
        return None
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, c = counts.most_common(1)[0]
    return " ".join(gram) if c > max_repeats else None


def _char_tail_loop(text: str, max_repeats: int, min_chars: int, max_unit: int) -> str | None:
    """A unit of 1..max_unit characters repeated > max_repeats times at the end of the text,
    covering at least ``min_chars`` characters."""
    t = text.rstrip()
    for unit in range(1, max_unit + 1):
        need = max(max_repeats + 1, -(-min_chars // unit))  # ceil(min_chars / unit)
        if len(t) < unit * need:
            continue
        pat = t[-unit:]
        if not pat.strip():
            continue
        if t[-unit * need :] == pat * need:
            return pat
    return None


def find_repetition(
    text: str,
    ngram: int = 8,
    max_repeats: int = 4,
    *,
    min_loop_chars: int = 48,
    max_loop_unit: int = 24,
) -> str | None:
    """The looping unit if ``text`` is degenerate (see the module docstring), else ``None``."""
    if not text:
        return None
    hit = _word_ngram_loop(text, ngram, max_repeats)
    if hit is None:
        hit = _char_tail_loop(text, max_repeats, min_loop_chars, max_loop_unit)
    return hit


def blocking_flags(flags: Iterable[str], keep_incorrect: bool = False) -> list[str]:
    """The flags that exclude a record from training (all but ``incorrect`` when
    ``keep_incorrect``)."""
    return [f for f in flags if not (keep_incorrect and f == FLAG_INCORRECT)]


def _extract(dataset: str, text: str, task: str | None, question: str | None):
    """``(strict, answer)``: strict from the trained format, answer = strict or flexible."""
    ds = dataset.lower()
    if ds == "gsm8k":
        strict, flexible = extract_gsm8k(text)
    elif ds == "bbh":
        strict, flexible = extract_bbh(text, task, question)
    else:
        strict = flexible = extract_answer(dataset, text, task=task, question=question)
    return strict, (strict if strict is not None else flexible)


def apply_filters(
    dataset: str,
    completion: str,
    gold: str,
    *,
    hit_max_new_tokens: bool,
    task: str | None = None,
    question: str | None = None,
    config: FilterConfig | None = None,
) -> FilterResult:
    """Run every filter on one completion (see the module docstring) and decide ``keep``."""
    config = config or FilterConfig()
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a string, got {type(completion).__name__}")
    flags: list[str] = []
    if not completion.strip():
        flags.append(FLAG_EMPTY)
    if hit_max_new_tokens:
        flags.append(FLAG_TRUNCATED)
    if find_repetition(
        completion,
        config.repetition_ngram,
        config.repetition_max_repeats,
        min_loop_chars=config.min_loop_chars,
        max_loop_unit=config.max_loop_unit,
    ):
        flags.append(FLAG_REPETITION)
    strict, answer = _extract(dataset, completion, task, question) if completion.strip() else (
        None,
        None,
    )
    if strict is None:
        flags.append(FLAG_NO_ANSWER)
    if answer is not None and not is_correct(dataset, answer, gold, task):
        flags.append(FLAG_INCORRECT)
    keep = not blocking_flags(flags, config.keep_incorrect)
    return FilterResult(flags=flags, extracted_answer=answer, keep=keep)

