"""CoT quality filters on crafted completions: every flag, keep/blocking rules, config."""

from __future__ import annotations

import pytest

from slmkd.teacher.filters import (
    ALL_FLAGS,
    FLAG_EMPTY,
    FLAG_INCORRECT,
    FLAG_NO_ANSWER,
    FLAG_REPETITION,
    FLAG_TRUNCATED,
    FilterConfig,
    apply_filters,
    blocking_flags,
    find_repetition,
)

GOOD = ("Natalia sold 48 / 2 = 24 clips in May.\nAltogether she sold 48 + 24 = 72 clips.\n"
        "The answer is 72.")


def gsm(text, gold="72", hit=False, **cfg):
    return apply_filters("gsm8k", text, gold, hit_max_new_tokens=hit, config=FilterConfig(**cfg))


def test_clean_correct_completion_is_kept():
    r = gsm(GOOD)
    assert r.flags == [] and r.keep and r.extracted_answer == "72"
    r = gsm("It costs 1,000 + 234 dollars.\nThe answer is $1,234.", gold="1234")
    assert r.flags == [] and r.extracted_answer == "1234"


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty(text):
    r = gsm(text)
    assert FLAG_EMPTY in r.flags and FLAG_NO_ANSWER in r.flags and not r.keep
    assert r.extracted_answer is None and FLAG_INCORRECT not in r.flags


def test_truncated_blocks_even_with_right_answer():
    r = gsm(GOOD, hit=True)
    assert r.flags == [FLAG_TRUNCATED] and not r.keep
    r = gsm("Natalia sold 48 / 2 = 24 clips in May.\nAltogether she", hit=True)
    assert FLAG_TRUNCATED in r.flags and FLAG_NO_ANSWER in r.flags


def test_word_ngram_loop():
    loop = "Natalia sold 48 clips. " + "Then she sold 24 clips in May and 48 in April. " * 6
    r = gsm(loop + "The answer is 72.", hit=False)
    assert FLAG_REPETITION in r.flags and not r.keep
    assert find_repetition(loop, ngram=8, max_repeats=4) is not None


def test_repetition_threshold_is_more_than_max_repeats():
    unit = "a b c d e f g h "  # one 8-gram per repetition (plus shifted ones across copies)
    assert find_repetition(unit * 4, ngram=8, max_repeats=4) is None  # 4 occurrences: allowed
    assert find_repetition(unit * 5, ngram=8, max_repeats=4) == unit.strip()  # 5: a loop
    assert find_repetition(unit * 5, ngram=8, max_repeats=5) is None


def test_char_loop_without_spaces():
    r = gsm("48 / 2 = 24\n" + "=" * 80, hit=True)
    assert FLAG_REPETITION in r.flags
    assert find_repetition("x = 1" + "12" * 40) == "12"
    assert find_repetition("The total is 1000000 dollars.") is None  # short runs are fine


def test_legitimate_reasoning_is_not_a_loop():
    steps = "\n".join(f"Step {i}: she has {i} + 1 = {i + 1} apples." for i in range(1, 15))
    assert find_repetition(steps + "\nThe answer is 15.") is None
    assert FLAG_REPETITION not in gsm(steps + "\nThe answer is 15.", gold="15").flags


def test_no_extractable_final_answer():
    r = gsm("Natalia sold 48 + 24 = 72 clips altogether.")
    # a flexible (last number) answer exists, but not the trained "The answer is N." line
    assert r.flags == [FLAG_NO_ANSWER] and r.extracted_answer == "72" and not r.keep
    r = gsm("I am not sure how to solve this.")
    assert FLAG_NO_ANSWER in r.flags and r.extracted_answer is None


def test_incorrect_blocks_unless_keep_incorrect():
    wrong = GOOD.replace("The answer is 72.", "The answer is 71.")
    r = gsm(wrong)
    assert r.flags == [FLAG_INCORRECT] and not r.keep and r.extracted_answer == "71"
    r = gsm(wrong, keep_incorrect=True)
    assert r.flags == [FLAG_INCORRECT] and r.keep
    # keep_incorrect never rescues other problems
    assert not gsm(wrong, hit=True, keep_incorrect=True).keep


def test_bbh_multiple_choice():
    q = "Which is a fruit?\nOptions:\n(A) car\n(B) apple\n(C) chair"
    ok = "A car and a chair are not fruits; an apple is. So the answer is (B)."
    kw = dict(task="disambiguation_qa", question=q, hit_max_new_tokens=False)
    r = apply_filters("bbh", ok, "(B)", **kw)
    assert r.flags == [] and r.keep and r.extracted_answer == "(B)"
    r = apply_filters("bbh", ok.replace("(B)", "(C)"), "(B)", **kw)
    assert r.flags == [FLAG_INCORRECT]
    r = apply_filters("bbh", "Cars are vehicles.", "(B)", **kw)
    assert FLAG_NO_ANSWER in r.flags and not r.keep


def test_blocking_flags_and_config():
    assert blocking_flags(ALL_FLAGS) == list(ALL_FLAGS)
    assert FLAG_INCORRECT not in blocking_flags(ALL_FLAGS, keep_incorrect=True)
    with pytest.raises(ValueError):
        FilterConfig(repetition_ngram=0)
    with pytest.raises(ValueError):
        FilterConfig(repetition_max_repeats=0)
    from slmkd.config import load_config

    cfg = load_config("tiny", overrides={"generation.keep_incorrect": True,
                                         "generation.repetition_ngram": 5})
    fc = FilterConfig.from_cfg(cfg)
    assert fc.keep_incorrect and fc.repetition_ngram == 5
    assert fc.repetition_max_repeats == cfg.generation.repetition_max_repeats
    with pytest.raises(TypeError):
        apply_filters("gsm8k", None, "1", hit_max_new_tokens=False)  # type: ignore[arg-type]


LATEX_RATIONALE = "Natalia sold \\(48 / 2 = 24\\) clips in May.\nAltogether she sold \\(48 + 24 = 72\\).\n"


@pytest.mark.parametrize(
    "final",
    [
        "The answer is \\(72\\).",
        "The answer is $72$.",
        "The answer is $\\boxed{72}$.",
        "The answer is \\boxed{72}.",
        "The answer is \\(\\boxed{72}\\).",
        "The answer is:\n\\[\n\\boxed{72}\n\\]",
        "The answer is \\$72.",
        "**The answer is \\(\\boxed{72}\\).**",
    ],
)
def test_correct_latex_cot_is_kept(final):
    """Qwen2.5-Instruct writes LaTeX answers: a correct one is the trained final-answer line."""
    r = gsm(LATEX_RATIONALE + final)
    assert r.flags == [] and r.keep and r.extracted_answer == "72"
    wrong = gsm(LATEX_RATIONALE + final.replace("72", "71"))
    assert wrong.flags == [FLAG_INCORRECT] and not wrong.keep and wrong.extracted_answer == "71"


def test_latex_fraction_is_no_answer():
    r = gsm("Half of the clips.\nThe answer is \\(\\boxed{\\frac{1}{2}}\\).", gold="2")
    assert FLAG_NO_ANSWER in r.flags and not r.keep
    r = gsm("Half of the clips.\nThe answer is \\boxed{\\frac{1}{2}}.", gold="1")
    assert not r.keep


@pytest.mark.parametrize("final", ["So the answer is \\boxed{(B)}.", "So the answer is $\\boxed{(B)}$.",
                                   "So the answer is \\(\\text{(B)}\\).", "\\[\\boxed{\\text{(B)}}\\]"])
def test_correct_latex_bbh_cot_is_kept(final):
    q = "Which is a fruit?\nOptions:\n(A) car\n(B) apple\n(C) chair"
    r = apply_filters("bbh", "An apple is a fruit. " + final, "(B)", task="disambiguation_qa",
                      question=q, hit_max_new_tokens=False)
    assert r.flags == [] and r.keep and r.extracted_answer == "(B)"
