from pathlib import Path

import pytest

from slmkd.data import (
    FINAL_ANSWER_PREFIX,
    IGNORE_INDEX,
    DropReason,
    Record,
    build_prompt,
    format_final_answer,
    gold_completion,
    load_bbh_cot_prompts,
    tokenize_example,
)

HERE = Path(__file__).parent
QWEN_DIRS = [HERE / "fixtures" / "qwen2-tokenizer",
             HERE.resolve().parents[1] / "shared" / "data" / "qwen2-tokenizer"]
QWEN25_EXTRA = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>"]


@pytest.fixture(scope="module")
def qwen_tok():
    from transformers import AutoTokenizer

    path = next((p for p in QWEN_DIRS if (p / "vocab.json").is_file()), None)
    if path is None:
        pytest.skip("real Qwen2 tokenizer not found (tests/fixtures or ../shared/data)")
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": QWEN25_EXTRA})
    assert len(tok) == 151_665  # Qwen2.5's real token count
    return tok


GSM = Record("gsm8k-test-00001", "gsm8k", None, "test", "Tom has 3 apples and buys 4. How many?",
             "7", "3 + 4 = 7.")


def test_final_answer_format():
    assert format_final_answer("18") == "The answer is 18."
    assert gold_completion(GSM) == "3 + 4 = 7.\nThe answer is 7."
    assert FINAL_ANSWER_PREFIX == "The answer is"


def test_gsm8k_prompt_uses_the_chat_template(qwen_tok):
    text = build_prompt(qwen_tok, GSM)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nSolve the problem step by step." in text
    assert 'of the form "The answer is N."' in text
    assert text.endswith("Question: Tom has 3 apples and buys 4. How many?<|im_end|>\n"
                         "<|im_start|>assistant\n")


def test_bbh_prompt_is_the_official_three_shot_cot_prompt(qwen_tok):
    prompts = load_bbh_cot_prompts(HERE / "fixtures" / "bbh")
    rec = Record("bbh-navigate-0000", "bbh", "navigate", "test", "Turn left. Options:\n- Yes\n- No",
                 "No")
    text = build_prompt(qwen_tok, rec, prompts)
    assert prompts["navigate"] in text
    assert text.count("Let's think step by step.") == 4  # 3 exemplars + the question
    assert "Q: Turn left." in text and "canary" not in text.lower()
    with pytest.raises(KeyError, match="load_bbh_cot_prompts"):
        build_prompt(qwen_tok, rec, None)


def test_labels_mask_prompt_and_supervise_completion_plus_eos(qwen_tok):
    prompt = build_prompt(qwen_tok, GSM)
    completion = gold_completion(GSM)
    ex = tokenize_example(qwen_tok, prompt, completion, max_length=512)
    n_prompt = len(qwen_tok(prompt, add_special_tokens=False)["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == qwen_tok.convert_tokens_to_ids("<|im_end|>")
    assert qwen_tok.decode(ex.input_ids[n_prompt:-1]) == completion
    assert ex.num_supervised == len(ex.input_ids) - n_prompt and ex.prompt_tokens_dropped == 0
    # digits are split one per token, as in Qwen
    assert qwen_tok.tokenize("1234") == ["1", "2", "3", "4"]


def test_truncation_drops_prompt_from_the_left_never_the_completion(qwen_tok):
    prompt = build_prompt(qwen_tok, GSM)
    completion = gold_completion(GSM)
    n_c = len(qwen_tok(completion, add_special_tokens=False)["input_ids"]) + 1
    ex = tokenize_example(qwen_tok, prompt, completion, max_length=n_c + 5)
    assert len(ex.input_ids) == n_c + 5 and ex.prompt_tokens_dropped > 0
    assert qwen_tok.decode(ex.input_ids[5:-1]) == completion
    full = qwen_tok(prompt, add_special_tokens=False)["input_ids"]
    assert ex.input_ids[:5] == full[-5:]
    too_long = tokenize_example(qwen_tok, prompt, completion, max_length=n_c)
    assert isinstance(too_long, DropReason) and too_long.reason == "completion_too_long"
    assert not too_long


def test_too_few_supervised_tokens_is_dropped(qwen_tok):
    prompt = build_prompt(qwen_tok, GSM)
    short = tokenize_example(qwen_tok, prompt, "7", max_length=512, min_supervised_tokens=8)
    assert isinstance(short, DropReason) and short.reason == "too_few_supervised_tokens"
    ok = tokenize_example(qwen_tok, prompt, "7", max_length=512, min_supervised_tokens=2)
    assert ok.num_supervised == 2  # "7" + <|im_end|>
