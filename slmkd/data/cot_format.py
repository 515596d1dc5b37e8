"""The CoT text format shared by training, generation and evaluation: a teacher chain of thought
is ``rationale`` + final-answer line (``"The answer is N."``, BBH ``"So the answer is (A)."``).

:func:`split_cot` cuts a CoT at its final-answer marker; :func:`join_rationale_cue` and
:func:`answer_target` build the CasCoD answer step's context (``r + "\\n" + cue``) and target
(``" a."``), identically for training examples and cascaded inference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from slmkd.data.prompts import FINAL_ANSWER_PREFIX

__all__ = ["DEFAULT_ANSWER_CUE", "RATIONALE_END", "SPLIT_REASONS", "SplitCoT", "answer_target",
           "join_rationale_cue", "rationale_target", "shares_prefix", "split_cot",
           "split_rationale_answer"]

#: The answer cue appended after the rationale; matches the project's final-answer line.
DEFAULT_ANSWER_CUE = "The answer is"

# -- splitting -----------------------------------------------------------------------------------
#: Reasons a completion cannot be split (counted by :func:`build_cascod_dataset`).
SPLIT_REASONS = ("not_text", "marker_missing", "marker_repeated", "empty_answer", "empty_rationale",
                 "text_after_answer")

# Connectives that introduce the final answer ("So the answer is (A)." in BBH CoTs); they belong
# to the answer line, not to the rationale.
_CONNECTIVE = r"(?:(?:so|therefore|thus|hence),?\s+)?"


@dataclass(frozen=True)
class SplitCoT:
    """A CoT cut at its final-answer marker: ``rationale`` (stripped, non-empty) and ``answer``
    (the text after the marker, stripped, one trailing period removed, non-empty, one line)."""

    rationale: str
    answer: str


def _marker_regex(marker: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in marker.strip().split()]
    if not words:
        raise ValueError("the final-answer marker must not be empty")
    return re.compile(r"\b" + _CONNECTIVE + r"\s+".join(words) + r"\b", re.IGNORECASE)


def split_cot(completion: Any, marker: str | None = None) -> SplitCoT | str:
    """Split a teacher CoT into rationale and answer at the final-answer marker.

    The marker (default :data:`slmkd.data.prompts.FINAL_ANSWER_PREFIX`, ``"The answer is"``) is
    matched case-insensitively with an optional leading connective ("So", "Therefore,", "Thus",
    "Hence"), so both ``"…\\nThe answer is 42."`` and BBH's ``"… So the answer is (A)."`` split.

    Returns a :class:`SplitCoT`, or the reason (one of :data:`SPLIT_REASONS`) the completion has no
    clean split: the marker is missing or occurs more than once (ambiguous: which is final?), the
    answer after it is empty, the rationale before it is empty, or more lines follow the answer.
    """
    if not isinstance(completion, str):
        return "not_text"
    if marker is None:
        marker = FINAL_ANSWER_PREFIX
    matches = list(_marker_regex(marker).finditer(completion))
    if not matches:
        return "marker_missing"
    if len(matches) > 1:
        return "marker_repeated"
    m = matches[0]
    rationale = completion[: m.start()].strip()
    tail = completion[m.end() :].strip()
    if "\n" in tail:
        return "text_after_answer"
    answer = tail[:-1].rstrip() if tail.endswith(".") else tail
    answer = answer.lstrip(":").strip()
    if not answer:
        return "empty_answer"
    if not rationale:
        return "empty_rationale"
    return SplitCoT(rationale, answer)


def split_rationale_answer(completion: Any, marker: str | None = None) -> tuple[str, str] | None:
    """``(rationale, answer)`` of a CoT, or ``None`` when there is no clean split (see
    :func:`split_cot` for the rules and the reasons)."""
    res = split_cot(completion, marker)
    return (res.rationale, res.answer) if isinstance(res, SplitCoT) else None


#: What ends the rationale target before EOS: the line break that precedes the answer cue in
#: :func:`join_rationale_cue` (and in the teacher's own ``"…\\nThe answer is N."``).
RATIONALE_END = "\n"


def join_rationale_cue(rationale: str, answer_cue: str = DEFAULT_ANSWER_CUE) -> str:
    """The text the answer step is conditioned on after the prompt: ``r + "\\n" + cue``.

    Used identically for training examples and for cascaded inference."""
    return rationale.rstrip() + RATIONALE_END + answer_cue.strip()


def rationale_target(rationale: str) -> str:
    """The supervised text of the rationale step: ``r + "\\n"`` (EOS is appended by
    :func:`slmkd.data.prompts.tokenize_example`).

    The line break belongs to the target because it is where the answer context continues:
    BPE merges it with the rationale's last character (Qwen2: ``".\\n"`` is one token), so with
    it the rationale example's tokens are the answer example's first tokens (and the full CoT
    example's), which lets one forward pass serve both CasCoD steps (:func:`shares_prefix`)."""
    return rationale.strip() + RATIONALE_END


def answer_target(answer: str) -> str:
    """The supervised answer text that follows the cue: ``" {a}."`` (EOS is appended by
    :func:`slmkd.data.prompts.tokenize_example`)."""
    return " " + answer.strip() + "."


# -- CasCoD's rationale example and the full CoT example it is cut from ---------------------------
#: the teacher-cache key suffix of a record's rationale example (cached separately when it is not
#: a token prefix of the record's full CoT example)
RATIONALE_CACHE_SUFFIX = "#rationale"


def rationale_example(tokenizer: Any, prompt: str, rationale: str, max_length: int,
                      min_supervised_tokens: int) -> Any:
    """CasCoD's rationale example ``q → r``: input ``prompt + r + "\\n" + eos``, labels on
    ``r + "\\n" + eos`` only (−100 on the prompt; :func:`rationale_target`); a
    ``TokenizedExample`` or a ``DropReason`` (:func:`slmkd.data.prompts.tokenize_example`)."""
    from slmkd.data.prompts import tokenize_example

    return tokenize_example(tokenizer, prompt, rationale_target(rationale), max_length,
                            min_supervised_tokens)


def shares_prefix(part: Any, full: Any) -> bool:
    """True when ``part``'s tokens (a ``TokenizedExample`` or a list of ids) before its last one
    (its EOS) are ``full``'s first tokens.

    Then, by causality, a model's hidden states at those positions of ``full`` are exactly those
    of ``part``, and every label of ``part`` (unshifted: ``labels[t]`` is predicted from position
    ``t-1``) can sit at the same index of ``full``'s row: the CasCoD collator gives such a pair
    one row instead of two (``part`` = the rationale example, ``full`` = its answer example)."""
    a = list(getattr(part, "input_ids", part))
    b = getattr(full, "input_ids", full)
    n = len(a)
    return 1 < n <= len(b) and a[:n - 1] == list(b[:n - 1])


def is_supervised_prefix(part: Any, full: Any) -> bool:
    """True when every position that predicts a supervised token of ``part`` (a rationale
    example) sees exactly the tokens the same position of ``full`` (its record's full CoT
    example) sees, and both start supervising at the same position: then a causal teacher's
    logits at ``part``'s supervised positions are ``full``'s first ones (no teacher rerun)."""
    n = len(part.input_ids)
    if n > len(full.input_ids) or list(part.input_ids[:n - 1]) != list(full.input_ids[:n - 1]):
        return False

    def first(labels: Any) -> int:
        return next((i for i, y in enumerate(labels) if y != -100), -1)

    return first(part.labels) == first(full.labels) >= 0
