"""Datasets (GSM8K, BBH) in one record type, prompt formatting and label masking."""

from slmkd.data.bbh import BBH_TASKS, load_bbh, load_bbh_cot_prompts
from slmkd.data.gsm8k import load_gsm8k, normalize_number, parse_gsm8k_answer
from slmkd.data.prompts import (
    FINAL_ANSWER_PREFIX,
    IGNORE_INDEX,
    DropReason,
    TokenizedExample,
    build_prompt,
    format_final_answer,
    gold_completion,
    tokenize_example,
    user_message,
)
from slmkd.data.records import LoadResult, Record, bbh_train_eval_split, eval_subset
from slmkd.data.sources import bbh_prompts_for, gsm8k_path, load_records

__all__ = [
    "BBH_TASKS", "FINAL_ANSWER_PREFIX", "IGNORE_INDEX", "DropReason", "LoadResult", "Record",
    "TokenizedExample", "bbh_prompts_for", "bbh_train_eval_split", "gsm8k_path", "load_records",
    "build_prompt", "eval_subset",
    "format_final_answer", "gold_completion", "load_bbh", "load_bbh_cot_prompts", "load_gsm8k",
    "normalize_number", "parse_gsm8k_answer", "tokenize_example", "user_message",
]
