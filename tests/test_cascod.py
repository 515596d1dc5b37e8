"""Tests for slmkd.cascod: splitting, example masks, joint loss, cascaded inference, training."""

from __future__ import annotations

import pytest

from slmkd.cascod import (
    DEFAULT_ALPHA_CASCOD,
    SplitCoT,
    answer_target,
    build_answer_example,
    build_cascod_dataset,
    build_rationale_example,
    join_rationale_cue,
    split_cot,
    split_rationale_answer,
)

# -- splitting ----------------------------------------------------------------------------------


def test_default_alpha_is_authors_value():
    from slmkd.config import CasCoDConfig

    assert DEFAULT_ALPHA_CASCOD == 0.1 == CasCoDConfig().alpha_cascod


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("3 + 4 = 7.\n7 * 2 = 14.\nThe answer is 14.", ("3 + 4 = 7.\n7 * 2 = 14.", "14")),
        ("She pays 2.5 each.\nThe answer is 3.5.", ("She pays 2.5 each.", "3.5")),
        ("Step one.\nThe answer is -12", ("Step one.", "-12")),
        ("Step one.\nthe answer is 1,000.  \n", ("Step one.", "1,000")),
        # BBH CoTs: the marker follows the last sentence on the same line, after "So".
        ("Sentence is about a dog. The options say (A). So the answer is (A).",
         ("Sentence is about a dog. The options say (A).", "(A)")),
        ("True and False is False. So, the answer is False.", ("True and False is False.", "False")),
        ("Therefore, the answer is Yes.", None),  # nothing before the marker: empty rationale
    ],
)
def test_split_clean(completion, expected):
    assert split_rationale_answer(completion) == expected


@pytest.mark.parametrize(
    ("completion", "reason"),
    [
        ("3 + 4 = 7 so we get 7.", "marker_missing"),
        ("The answer is 7.\nWait.\nThe answer is 8.", "marker_repeated"),
        ("I think the answer is 7 but let me check. 3+4=7. So the answer is 7.", "marker_repeated"),
        ("3 + 4 = 7.\nThe answer is .", "empty_answer"),
        ("3 + 4 = 7.\nThe answer is", "empty_answer"),
        ("3 + 4 = 7.\nThe answer is 7.\nI hope this helps!", "text_after_answer"),
        ("The answer is 7.", "empty_rationale"),
        (None, "not_text"),
    ],
)
def test_split_dropped_with_reason(completion, reason):
    assert split_cot(completion) == reason
    assert split_rationale_answer(completion) is None


def test_marker_not_matched_inside_words():
    # "Also the answer is" must not strip "Al" + "so" as a connective.
    res = split_cot("Also the answer is 5.")
    assert isinstance(res, SplitCoT) and res.rationale == "Also" and res.answer == "5"


def test_cue_and_target_reassemble_the_cot():
    cot = "3 + 4 = 7.\n7 * 2 = 14.\nThe answer is 14."
    r, a = split_rationale_answer(cot)
    assert join_rationale_cue(r, "The answer is") + answer_target(a) == cot


# -- examples and label masks --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from slmkd.tiny import train_tokenizer

    texts = ["Solve the problem step by step. The answer is 14.", "Question: what is 3 + 4 * 2?",
             "You are a helpful assistant.", "3 + 4 = 7.\n7 * 2 = 14.\n"] * 20
    return train_tokenizer(texts, vocab_size=300)


def _prompt(tok, question="What is 3 + 4, times 2?"):
    from slmkd.data import Record, build_prompt

    return build_prompt(tok, Record("x", "gsm8k", None, "train", question, "14"))


def _supervised(ex):
    return [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != -100]


def test_rationale_example_mask(tok):
    prompt = _prompt(tok)
    r = "3 + 4 = 7.\n7 * 2 = 14."
    ex = build_rationale_example(tok, prompt, r, max_length=512, min_supervised_tokens=1)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(r, add_special_tokens=False)["input_ids"]
    assert ex.input_ids == p_ids + r_ids + [tok.eos_token_id]
    assert ex.labels == [-100] * len(p_ids) + r_ids + [tok.eos_token_id]
    # the supervised text is exactly the rationale + EOS: no answer, no cue
    assert tok.decode(_supervised(ex)[:-1]) == r
    assert "answer" not in tok.decode(_supervised(ex)).lower()


def test_answer_example_mask(tok):
    prompt = _prompt(tok)
    r = "3 + 4 = 7.\n7 * 2 = 14."
    ex = build_answer_example(tok, prompt, r, "14", max_length=512, answer_cue="The answer is")
    ctx = prompt + r + "\nThe answer is"
    c_ids = tok(ctx, add_special_tokens=False)["input_ids"]
    a_ids = tok(" 14.", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == c_ids + a_ids + [tok.eos_token_id]
    assert ex.labels == [-100] * len(c_ids) + a_ids + [tok.eos_token_id]
    assert tok.decode(_supervised(ex)[:-1]) == " 14."
    # the rationale and cue are context only
    assert tok.decode(ex.input_ids[: len(c_ids)]).endswith("14.\nThe answer is")
    # answers are short: the run-wide minimum for CoTs does not apply to them
    assert ex.num_supervised == len(a_ids) + 1 < 8


def test_build_dataset_counts_drops(tok):
    recs = [
        {"id": "a", "dataset": "gsm8k", "task": None, "question": "What is 3 + 4?",
         "completion": "3 + 4 = 7.\nThe answer is 7."},
        {"id": "b", "dataset": "gsm8k", "task": None, "question": "What is 1 + 1?",
         "completion": "1 + 1 = 2."},  # marker missing
        {"id": "c", "dataset": "gsm8k", "task": None, "question": "What is 1 + 2?",
         "completion": "The answer is 3.\n1 + 2 = 3.\nThe answer is 3."},  # twice
        {"id": "d", "dataset": "gsm8k", "task": None, "question": "What is 2 + 2?",
         "completion": "2 + 2 = 4.\nThe answer is ."},  # empty answer
        {"id": "e", "dataset": "gsm8k", "task": None, "question": "What is 2 + 3?",
         "completion": "5.\nThe answer is 5."},  # rationale below min_supervised_tokens
    ]
    ds, stats = build_cascod_dataset(tok, recs, max_length=512, min_supervised_tokens=4)
    assert len(ds) == stats.kept == 1 and stats.total == 5
    assert dict(stats.dropped) == {"split:marker_missing": 1, "split:marker_repeated": 1,
                                   "split:empty_answer": 1,
                                   "rationale:too_few_supervised_tokens": 1}
    item = ds[0]
    assert item["example_id"] == "a"
    assert set(item) == {"example_id", "rationale_input_ids", "rationale_labels", "answer_input_ids",
                         "answer_labels"}
    assert set(ds.with_kind("answer")[0]) == {"example_id", "input_ids", "labels"}
    assert ds.with_kind("answer")[0]["input_ids"] == item["answer_input_ids"]


def test_collator_pads_both_kinds_to_one_width(tok):
    from slmkd.cascod import CasCoDCollator

    recs = [{"id": str(i), "dataset": "gsm8k", "task": None, "question": f"What is {i} + 4?",
             "completion": f"{i} + 4 = {i + 4}." + " ok." * i + f"\nThe answer is {i + 4}."}
            for i in range(3)]
    ds, _ = build_cascod_dataset(tok, recs, max_length=512, min_supervised_tokens=1)
    batch = CasCoDCollator(pad_token_id=tok.pad_token_id)([ds[i] for i in range(3)])
    n = batch["input_ids"].shape[0]
    assert n == 6 and int(batch["num_rationale_rows"]) == 3
    assert batch["answer_row_mask"].tolist() == [False] * 3 + [True] * 3
    for row, item in enumerate([ds[i] for i in range(3)]):
        for off, key in ((0, "rationale"), (3, "answer")):
            ids = item[f"{key}_input_ids"]
            k = len(ids)
            assert batch["input_ids"][row + off, :k].tolist() == ids
            assert batch["labels"][row + off, :k].tolist() == item[f"{key}_labels"]
            assert batch["attention_mask"][row + off].sum().item() == k
            assert (batch["labels"][row + off, k:] == -100).all()
            assert (batch["input_ids"][row + off, k:] == tok.pad_token_id).all()
