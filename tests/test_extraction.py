"""Answer extraction and scoring (slmkd.evaluation.extract_answer / is_correct)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from slmkd.evaluation import (
    BBH_TASK_TYPES,
    extract_answer,
    extract_bbh,
    extract_gsm8k,
    is_correct,
    normalize_number,
    parse_options,
)

FIXTURES = Path(__file__).parent / "fixtures"
BBH_PROMPTS = FIXTURES / "bbh" / "cot-prompts"
GSM8K_FILES = [FIXTURES / "gsm8k" / "train.jsonl", FIXTURES / "gsm8k" / "test.jsonl"]
SHARED_GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"


def _exemplars(task: str) -> list[tuple[str, str, str]]:
    """(question, answer text, gold) triples of a task's official 3-shot CoT prompt."""
    body = (BBH_PROMPTS / f"{task}.txt").read_text().split("-----", 1)[1]
    out = []
    for part in re.split(r"\n\s*Q: ", "\n" + body)[1:]:
        q, a = part.split("\nA: ", 1)
        gold = re.search(r"So the answer is (.*)\.\s*$", a.strip()).group(1)
        out.append((q, a, gold))
    return out


def test_task_table_covers_all_27_tasks():
    tasks = sorted(p.stem for p in BBH_PROMPTS.glob("*.txt"))
    assert len(tasks) == 27
    assert sorted(BBH_TASK_TYPES) == tasks
    counts: dict[str, int] = {}
    for t in BBH_TASK_TYPES.values():
        counts[t] = counts.get(t, 0) + 1
    assert counts == {
        "multiple_choice": 17, "true_false": 1, "yes_no": 4, "valid_invalid": 1,
        "number": 2, "dyck": 1, "word_sort": 1,
    }


@pytest.mark.parametrize("task", sorted(BBH_TASK_TYPES))
def test_official_cot_exemplars(task):
    exemplars = _exemplars(task)
    assert len(exemplars) == 3
    for question, answer, gold in exemplars:
        pred = extract_answer("bbh", answer, task=task, question=question)
        assert pred is not None, (task, answer[-80:])
        assert is_correct("bbh", pred, gold, task=task), (task, gold, pred)
        strict, flexible = extract_bbh(answer, task, question)
        assert strict == pred == flexible


@pytest.mark.parametrize("task", sorted(BBH_TASK_TYPES))
def test_bbh_fixture_targets_score_themselves(task):
    """Each fixture target, written in the trained format, is extracted and scored correct."""
    examples = json.loads((FIXTURES / "bbh" / "tasks" / f"{task}.json").read_text())["examples"]
    assert examples
    for ex in examples:
        out = f"Let's think step by step.\nSome reasoning.\nThe answer is {ex['target']}."
        pred = extract_answer("bbh", out, task=task, question=ex["input"])
        assert is_correct("bbh", pred, ex["target"], task=task), (ex["target"], pred)


def test_gsm8k_gold_solutions_trained_format_and_raw():
    n = 0
    for path in GSM8K_FILES:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            sol, ans = row["answer"].split("####")
            trained = sol.strip() + f"\nThe answer is {ans.strip()}."
            strict, flexible = extract_gsm8k(trained)
            assert is_correct("gsm8k", strict, ans)
            assert is_correct("gsm8k", flexible, row["answer"])
            raw_strict, raw_flexible = extract_gsm8k(row["answer"])
            assert raw_strict is None  # "#### N" is not the trained final-answer line
            assert is_correct("gsm8k", raw_flexible, ans)
            n += 1
    assert n >= 40


@pytest.mark.skipif(not SHARED_GSM8K.exists(), reason="../shared not available")
def test_gsm8k_all_gold_solutions_shared():
    """All 1,319 GSM8K test solutions (train was checked once by hand: 7,473/7,473)."""
    for line in (SHARED_GSM8K / "test.jsonl").read_text().splitlines():
        row = json.loads(line)
        sol, ans = row["answer"].split("####")
        strict, _ = extract_gsm8k(sol.strip() + f"\nThe answer is {ans.strip()}.")
        assert is_correct("gsm8k", strict, ans)
        assert is_correct("gsm8k", extract_gsm8k(row["answer"])[1], ans)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("18", "18"), ("$18", "18"), ("18.00", "18"), ("18.", "18"), ("1,234", "1234"),
        ("$1,234.50", "1234.5"), ("-5", "-5"), ("-0.50", "-0.5"), ("0.25", "0.25"),
        ("50%", "50"), ("abc", None), ("", None), (None, None),
    ],
)
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


@pytest.mark.parametrize(
    "text, strict, flexible",
    [
        ("3 + 4 = 7 apples.\nThe answer is 7.", "7", "7"),
        ("She pays $1,200.\nThe answer is $1,200.", "1200", "1200"),
        ("The answer is **18.00**.", "18", "18"),
        ("**The answer is: -3.**", "-3", "-3"),
        ("The answer is 5.\nActually, wait: 6 eggs.", "5", "6"),
        ("So he has 12 left.", None, "12"),
        ("Total = 40 + 2 = 42\n#### 42", None, "42"),
        ("I don't know.", None, None),
        ("", None, None),
        ("The answer is 4.\n\nQ: Next question has 99 apples.", "4", "4"),
    ],
)
def test_gsm8k_strict_and_flexible(text, strict, flexible):
    assert extract_gsm8k(text) == (strict, flexible)
    expected = strict if strict is not None else flexible
    assert extract_answer("gsm8k", text) == expected


def test_gsm8k_is_correct_numeric():
    assert is_correct("gsm8k", "18", "18")
    assert is_correct("gsm8k", "18.0", "#### 18")
    assert is_correct("gsm8k", "70000", "70,000")
    assert not is_correct("gsm8k", "-18", "18")
    assert not is_correct("gsm8k", None, "18")
    assert not is_correct("gsm8k", "eighteen", "18")
    with pytest.raises(ValueError):
        is_correct("mmlu", "1", "1")


DATE_Q = (
    "Today is Christmas Eve of 1937. What is the date tomorrow in MM/DD/YYYY?\nOptions:\n"
    "(A) 12/11/1937\n(B) 12/25/1937\n(C) 01/04/1938\n(D) 12/04/1937\n(E) 12/25/2006\n(F) 07/25/1937"
)
SHAPES_Q = "This SVG path draws a\nOptions:\n(A) circle\n(B) heptagon\n(C) hexagon\n(D) kite"
COLOR_Q = "How many grey objects remain?\nOptions:\n(A) zero\n(B) one\n(C) two\n(D) three"
RUIN_Q = (
    "Which is a humorous edit of 'rita, sue and bob too'?\nOptions:\n(A) rita, sue and bob poo\n"
    "(B) rita\n(C) rita, sue and box too"
)


@pytest.mark.parametrize(
    "text, question, expected",
    [
        ("Reasoning...\nSo the answer is (B).", DATE_Q, "(B)"),
        ("Reasoning.\n**Answer: (B)**", DATE_Q, "(B)"),
        ("The correct answer is **(B) 12/25/1937**.", DATE_Q, "(B)"),
        ("Final answer: B", DATE_Q, "(B)"),
        ("Final Answer: B) 12/25/1937", DATE_Q, "(B)"),
        ("The answer is option B.", DATE_Q, "(B)"),
        ("The answer is (B). This is because (A) is in the wrong month.", DATE_Q, "(B)"),
        ("The answer is (B) because (A) is wrong.", DATE_Q, "(B)"),
        ("Tomorrow is Christmas.\nThe answer is 12/25/1937.", DATE_Q, "(B)"),
        ("The answer is \\boxed{B}", DATE_Q, "(B)"),
        ("The answer is:\n\n(B)", DATE_Q, "(B)"),
        ("It has four sides in a kite pattern.\nThe answer is a kite.", SHAPES_Q, "(D)"),
        ("The answer is 2.", COLOR_Q, "(C)"),
        ("The answer is two.", COLOR_Q, "(C)"),
        ("The answer is rita, sue and bob poo.", RUIN_Q, "(A)"),
        # no cue at all: the last line, then the last (X) in the text (lm-eval flexible)
        ("Let me think.\n(B)", DATE_Q, "(B)"),
        ("Options (A) and (C) are wrong, so it must be (B) here", DATE_Q, None),
        ("Compare (A) with (C).\nBoth are wrong, so it is the other date.", DATE_Q, "(C)"),
    ],
)
def test_multiple_choice_messy(text, question, expected):
    assert extract_answer("bbh", text, task="date_understanding", question=question) == expected


@pytest.mark.parametrize(
    "text",
    [
        "The answer is (A) or (B).",
        "The answer is either (B) or (C).",
        "So the answer is A or B.",
        "The answer is (A), (B).",
        "The answer is 12/25/1937 or 12/11/1937.",
    ],
)
def test_multiple_choice_hedging_not_credited(text):
    pred = extract_answer("bbh", text, task="date_understanding", question=DATE_Q)
    assert pred is None
    assert not is_correct("bbh", pred, "(B)", task="date_understanding")


def test_multiple_choice_scoring():
    task = "snarks"
    assert is_correct("bbh", "(A)", "(A)", task=task)
    assert is_correct("bbh", "A", "(A)", task=task)
    assert not is_correct("bbh", "(B)", "(A)", task=task)
    assert not is_correct("bbh", None, "(A)", task=task)
    # a few BBH targets are option text rather than a letter
    assert is_correct("bbh", "Monsters, Inc", "Monsters, Inc", task="movie_recommendation")
    assert parse_options(DATE_Q)["B"] == "12/25/1937"
    assert parse_options("no options here") == {}


@pytest.mark.parametrize(
    "task, text, expected",
    [
        ("boolean_expressions", "not False is True.\nSo the answer is True.", "True"),
        ("boolean_expressions", "The answer is **false**.", "False"),
        ("boolean_expressions", "Answer: True (since not False is True)", "True"),
        ("boolean_expressions", "The answer is True or False.", None),
        ("causal_judgement", "So the answer is Yes.", "Yes"),
        ("causal_judgement", "The answer is: no, because the event was accidental.", "No"),
        ("causal_judgement", "Hard to say. Yes or no.", None),
        ("navigate", "We end where we started.\nYes", "Yes"),
        ("sports_understanding", "So the answer is yes.", "yes"),
        ("sports_understanding", "**Answer:** No", "no"),
        ("web_of_lies", "The answer is Yes. Ka tells the truth.", "Yes"),
        ("formal_fallacies", "So the answer is invalid.", "invalid"),
        ("formal_fallacies", "The answer is **valid**.", "valid"),
        ("formal_fallacies", "The argument is deductively valid or invalid? The answer is valid.",
         "valid"),
        ("formal_fallacies", "The answer is valid or invalid.", None),
    ],
)
def test_binary_tasks(task, text, expected):
    assert extract_answer("bbh", text, task=task) == expected


def test_binary_scoring_is_case_insensitive():
    assert is_correct("bbh", "yes", "Yes", task="navigate")
    assert is_correct("bbh", "Yes", "yes", task="sports_understanding")
    assert not is_correct("bbh", "valid", "invalid", task="formal_fallacies")
    assert not is_correct("bbh", "True", "False", task="boolean_expressions")


@pytest.mark.parametrize(
    "task, text, expected",
    [
        ("multistep_arithmetic_two", "So the answer is -219.", "-219"),
        ("multistep_arithmetic_two", "The answer is ((-1) + 2) * 3 = 3.", "3"),
        ("multistep_arithmetic_two", "**Answer: -1,240**", "-1240"),
        ("multistep_arithmetic_two", "Compute: 3 * 4 = 12, then 12 - 20 = -8", "-8"),
        ("object_counting", "So the answer is 6.", "6"),
        ("object_counting", "The answer is six.", "6"),
        ("object_counting", "The answer is 6 (a piano, two flutes and three violins).", "6"),
        ("object_counting", "The answer is 5 or 6.", None),
        ("object_counting", "I have twelve things.\nThe answer is: twelve", "12"),
    ],
)
def test_number_tasks(task, text, expected):
    pred = extract_answer("bbh", text, task=task)
    assert pred == expected
    if expected is not None:
        assert is_correct("bbh", pred, expected, task=task)


def test_number_scoring():
    assert is_correct("bbh", "6.0", "6", task="object_counting")
    assert not is_correct("bbh", "7", "6", task="object_counting")


DYCK_Q = "Complete the rest of the sequence. Input: [ { ["


@pytest.mark.parametrize(
    "text, expected",
    [
        ("So the answer is ] } ].", "] } ]"),
        ("The answer is `] } ]`", "] } ]"),
        ("The answer is: \"]}]\" which closes every bracket.", "] } ]"),
        ("**Answer:** ] } ]", "] } ]"),
        ("The answer is [ { [ ] } ].", "] } ]"),  # repeated the input: keep the completion
        ("The stack is empty.\n] } ]", "] } ]"),
    ],
)
def test_dyck(text, expected):
    pred = extract_answer("bbh", text, task="dyck_languages", question=DYCK_Q)
    assert pred == expected
    assert is_correct("bbh", pred, "] } ]", task="dyck_languages")
    assert not is_correct("bbh", "] ]", "] } ]", task="dyck_languages")


@pytest.mark.parametrize(
    "text",
    [
        "So the answer is apple banana cherry.",
        "The answer is: apple, banana, cherry",
        "**Answer:** Apple Banana Cherry",
        "Sorted list:\napple banana cherry",
        "The answer is \"apple banana cherry\".",
    ],
)
def test_word_sorting(text):
    pred = extract_answer("bbh", text, task="word_sorting")
    assert pred == "apple banana cherry"
    assert is_correct("bbh", pred, "apple banana cherry", task="word_sorting")
    assert not is_correct("bbh", "banana apple cherry", "apple banana cherry", task="word_sorting")


def test_empty_and_unknown():
    assert extract_answer("bbh", "", task="navigate") is None
    assert extract_answer("bbh", None, task="navigate") is None
    assert extract_answer("bbh", "The answer is foo.", task=None) == "foo"
    assert is_correct("bbh", "(A)", "(A)", task=None)
    with pytest.raises(ValueError):
        extract_answer("mmlu", "The answer is 3.")


def test_run_on_next_question_is_cut():
    text = "So the answer is (B).\n\nQ: another question\nA: So the answer is (A)."
    assert extract_answer("bbh", text, task="snarks") == "(B)"


# --- LaTeX final answers (Qwen2.5-Instruct writes \boxed{} often) -------------------------------
@pytest.mark.parametrize(
    "text, strict, flexible",
    [
        ("2 * 9 = 18.\nThe answer is \\(18\\).", "18", "18"),
        (r"The answer is $18$.", "18", "18"),
        (r"The answer is $\boxed{18}$.", "18", "18"),
        (r"The answer is \boxed{18}.", "18", "18"),
        (r"The answer is \(\boxed{18}\).", "18", "18"),
        (r"The answer is \[\boxed{18}\]", "18", "18"),
        ("The answer is:\n\\[\n\\boxed{18}\n\\]", "18", "18"),
        (r"The answer is \$18.", "18", "18"),
        (r"The answer is \(\$1{,}234\).", "1234", "1234"),
        (r"The answer is \boxed{\$1,234.50}.", "1234.5", "1234.5"),
        (r"The answer is \(1\,234\).", "1234", "1234"),
        (r"The answer is \boxed{\text{18}}.", "18", "18"),
        (r"The answer is \boxed{18 \text{ apples}}.", "18", "18"),
        (r"The answer is **\(\boxed{-3}\)**.", "-3", "-3"),
        (r"The answer is \boxed{18\%}.", "18", "18"),
        # a fraction is not a number: never its numerator, never its denominator
        (r"The answer is \boxed{\frac{1}{2}}.", None, None),
        ("Half of 36 is 18.\nThe answer is \\(\\dfrac{36}{2}\\).", None, "18"),
        ("The answer is 1/2.", None, None),
        # \boxed{} without the final-answer line: a flexible answer only (not the trained format)
        (r"So she pays \(\boxed{18}\) dollars.", None, "18"),
    ],
)
def test_gsm8k_latex(text, strict, flexible):
    assert extract_gsm8k(text) == (strict, flexible)


def test_gsm8k_latex_scored_correct():
    from slmkd.scoring import score_prediction

    for text in [r"The answer is \(18\).", r"The answer is $\boxed{18}$.",
                 r"The answer is \boxed{18}.", r"The answer is \$18."]:
        s = score_prediction("gsm8k", text, "18")
        assert s == {"extracted": "18", "correct": True, "strict_correct": True,
                     "flexible_correct": True}, text
    s = score_prediction("gsm8k", r"The answer is \boxed{\frac{1}{2}}.", "2")
    assert s["extracted"] is None and not s["correct"]
    s = score_prediction("gsm8k", r"The answer is \boxed{\frac{1}{2}}.", "1")
    assert not s["correct"]


def test_delatex():
    from slmkd.scoring.lenient import FRACTION_SLASH, delatex

    assert delatex("plain text, 18.") == "plain text, 18."
    assert delatex(r"It costs \$5 and \(x = 3\).") == "It costs $5 and  x = 3."
    assert delatex(r"\boxed{\text{(A)}}") == "(A)"
    assert delatex(r"\boxed{\text{(A)}}", keep_boxed=True) == r"\boxed{(A)}"
    assert delatex(r"\frac{1}{2}") == f"1{FRACTION_SLASH}2"
    assert delatex(r"$\boxed{1{,}000}$") == "$1,000 "  # "$" before a number: currency, kept
    assert delatex(r"\boxed{18") == r"\boxed{18"  # unbalanced: left alone


@pytest.mark.parametrize(
    "task, text, question, expected",
    [
        ("date_understanding", r"So the answer is \boxed{(B)}.", DATE_Q, "(B)"),
        ("date_understanding", r"So the answer is $\boxed{(B)}$.", DATE_Q, "(B)"),
        ("date_understanding", r"So the answer is \text{(B)}.", DATE_Q, "(B)"),
        ("date_understanding", r"So the answer is \(\text{(B)}\).", DATE_Q, "(B)"),
        ("date_understanding", "Reasoning.\n\\[\n\\boxed{\\textbf{(B)}}\n\\]", DATE_Q, "(B)"),
        ("date_understanding", r"The answer is \boxed{B}.", DATE_Q, "(B)"),
        ("date_understanding", r"The answer is \boxed{12/25/1937}.", DATE_Q, "(B)"),
        ("date_understanding", r"The answer is \boxed{(A) \text{ or } (B)}.", DATE_Q, None),
        ("boolean_expressions", r"So the answer is \boxed{\text{True}}.", None, "True"),
        ("causal_judgement", r"So the answer is $\boxed{\text{No}}$.", None, "No"),
        ("formal_fallacies", r"So the answer is \(\boxed{\text{invalid}}\).", None, "invalid"),
        ("multistep_arithmetic_two", r"So the answer is \(\boxed{-219}\).", None, "-219"),
        ("object_counting", r"So the answer is $6$.", None, "6"),
        ("word_sorting", r"So the answer is \boxed{\text{apple banana cherry}}.", None,
         "apple banana cherry"),
    ],
)
def test_bbh_latex(task, text, question, expected):
    pred = extract_answer("bbh", text, task=task, question=question)
    assert pred == expected
    strict, _ = extract_bbh(text, task, question)
    assert strict == expected  # an answer cue or \boxed{}: strict, i.e. the teacher filters keep it
