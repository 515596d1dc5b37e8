"""Prompt formatting (chat template, final-answer format) and label masking.

One format is used everywhere — teacher CoT generation, student training and evaluation:

* GSM8K: the user message is ``GSM8K_INSTRUCTION`` + the question; the assistant reasons step by
  step and ends with the line ``The answer is N.``
* BBH: the user message is the task's official 3-shot CoT prompt followed by
  ``Q: {input}\\nA: Let's think step by step.``; the exemplars end with ``So the answer is X.``

Label masking follows the Hugging Face causal-LM convention: ``labels`` are aligned with
``input_ids``; prompt and padding positions are ``-100``; the completion and the closing EOS are
supervised (the loss shifts internally so position t predicts ``labels[t+1]``).
"""

from __future__ import annotations

from dataclasses import dataclass

from slmkd.data.records import Record

IGNORE_INDEX = -100
FINAL_ANSWER_PREFIX = "The answer is"
GSM8K_INSTRUCTION = (
    "Solve the problem step by step. Finish with a last line of the form "
    f'"{FINAL_ANSWER_PREFIX} N." where N is a number.'
)
BBH_COT_CUE = "A: Let's think step by step."


def format_final_answer(answer: str) -> str:
    """``"18"`` → ``"The answer is 18."``"""
    return f"{FINAL_ANSWER_PREFIX} {answer}."


def gold_completion(record: Record) -> str:
    """The gold rationale in the trained format (used to pretrain the tiny teacher)."""
    final = format_final_answer(record.answer)
    return f"{record.rationale.strip()}\n{final}" if record.rationale else final


def user_message(record: Record, bbh_prompts: dict[str, str] | None = None) -> str:
    """The user turn for ``record`` (before the chat template)."""
    if record.dataset == "bbh":
        if not bbh_prompts or record.task not in bbh_prompts:
            raise KeyError(f"No CoT prompt for BBH task {record.task!r}: load them with "
                           "slmkd.data.load_bbh_cot_prompts(bbh_dir).")
        return f"{bbh_prompts[record.task]}\n\nQ: {record.question}\n{BBH_COT_CUE}"
    return f"{GSM8K_INSTRUCTION}\n\nQuestion: {record.question}"


def build_prompt(tokenizer, record: Record, bbh_prompts: dict[str, str] | None = None) -> str:
    """The chat-templated prompt text, ending with the assistant generation prompt."""
    messages = [{"role": "user", "content": user_message(record, bbh_prompts)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class TokenizedExample:
    """Token ids and aligned labels of one prompt+completion example."""

    input_ids: list[int]
    labels: list[int]
    num_supervised: int
    prompt_tokens_dropped: int = 0


@dataclass
class DropReason:
    """Why an example never reaches the loss (every drop is counted by the caller)."""

    reason: str
    detail: str = ""

    def __bool__(self) -> bool:  # a DropReason is falsy, so ``if ex:`` keeps examples
        return False


def tokenize_example(tokenizer, prompt: str, completion: str, max_length: int,
                     min_supervised_tokens: int = 1, add_eos: bool = True,
                     ) -> TokenizedExample | DropReason:
    """Tokenise ``prompt`` + ``completion`` (+ EOS) with labels on the completion only.

    The end of a completion is never cut: an over-long example loses prompt tokens from the left
    (counted in ``prompt_tokens_dropped``); if the completion alone does not fit with at least one
    prompt token, the example is dropped (``completion_too_long``). Examples with fewer than
    ``min_supervised_tokens`` supervised tokens are dropped (``too_few_supervised_tokens``).
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has no eos_token; set one before tokenising.")
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    if len(completion_ids) < max(min_supervised_tokens, 1):
        return DropReason("too_few_supervised_tokens",
                          f"{len(completion_ids)} < {max(min_supervised_tokens, 1)}")
    if len(completion_ids) > max_length - 1:
        return DropReason("completion_too_long", f"{len(completion_ids)} tokens > {max_length - 1}")
    if not prompt_ids:
        return DropReason("empty_prompt")
    budget = max_length - len(completion_ids)
    dropped = max(0, len(prompt_ids) - budget)
    prompt_ids = prompt_ids[dropped:]
    input_ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return TokenizedExample(input_ids, labels, len(completion_ids), dropped)
