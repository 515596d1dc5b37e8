"""Student examples from CoT records: masking, left truncation, counted drops, padding."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from _tiny_lm import make_tokenizer  # noqa: E402

from slmkd.data.prompts import IGNORE_INDEX  # noqa: E402
from slmkd.training.data import PaddingCollator, build_sft_examples, count_supervised  # noqa: E402


def _rec(i, completion="3 + 4 = 7\nThe answer is 7.", keep=True, **kw):
    return {"id": f"r{i}", "dataset": "gsm8k", "task": None, "keep": keep,
            "question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
            "completion": completion, "gold": "7", **kw}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_examples_mask_prompt_and_supervise_completion_plus_eos(tok):
    ds, st = build_sft_examples([_rec(0)], tok, max_length=512, min_supervised_tokens=1)
    ex = ds[0]
    sup = [y for y in ex["labels"] if y != IGNORE_INDEX]
    comp = tok("3 + 4 = 7\nThe answer is 7.", add_special_tokens=False)["input_ids"]
    assert sup == comp + [tok.eos_token_id]
    assert ex["input_ids"][-len(sup):] == sup and len(ex["input_ids"]) == len(ex["labels"])
    assert ex["labels"][0] == IGNORE_INDEX and st.num_examples == 1 and st.num_dropped == 0
    assert st.supervised_tokens == len(sup)


def test_drops_and_truncation_are_counted(tok):
    long_completion = " ".join(["3 + 4 = 7"] * 60)
    recs = [_rec(0), _rec(1, keep=False), _rec(2, completion=long_completion),
            _rec(3, completion=""), {"id": "r4", "keep": True}]
    ds, st = build_sft_examples(recs, tok, max_length=40, min_supervised_tokens=3)
    assert st.num_records == 5 and st.num_examples == len(ds)
    assert st.dropped["not_kept"] == 1 and st.dropped["completion_too_long"] == 1
    assert st.dropped["too_few_supervised_tokens"] == 1 and st.dropped["bad_record"] == 1
    # the kept example fits only by losing prompt tokens from the left; its end is intact
    assert st.prompt_truncated == 1 and st.prompt_tokens_dropped > 0
    assert len(ds[0]["input_ids"]) == 40 and ds[0]["labels"][-1] == tok.eos_token_id
    assert "dropped" in st.summary()


def test_collator_pads_dynamically(tok):
    ds, _ = build_sft_examples([_rec(0), _rec(1, completion="7")], tok, 512, 1)
    batch = PaddingCollator(tok.pad_token_id)([ds[0], ds[1]])
    n0, n1 = len(ds[0]["input_ids"]), len(ds[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1))
    short = 0 if n0 < n1 else 1
    n = min(n0, n1)
    assert (batch["attention_mask"][short, n:] == 0).all()
    assert (batch["attention_mask"][short, :n] == 1).all()
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, n:] == tok.pad_token_id).all()
    assert batch["example_id"] == ["r0", "r1"]
    sup = sum(sum(1 for y in ds[i]["labels"][1:] if y != IGNORE_INDEX) for i in range(2))
    assert int(count_supervised(batch["labels"])) == sup
    b8 = PaddingCollator(tok.pad_token_id, pad_to_multiple_of=8)([ds[0]])
    assert b8["input_ids"].shape[1] % 8 == 0
