"""The tiny offline world: tokenizer, tiny Qwen2 models and the synthetic arithmetic task.

Everything a stage needs to run without the Hugging Face Hub, built once under
``{drive_root}/tiny/`` and loaded afterwards with ``from_pretrained`` exactly like Hub models::

    tiny/
      data/train.jsonl, data/test.jsonl     GSM8K-format synthetic problems (disjoint splits)
      tokenizer/                            byte-level BPE, ChatML template, digits one per token
      models/tiny-qwen2-teacher/            Qwen2ForCausalLM, pretrained on data/train.jsonl
      models/tiny-qwen2-student-m/          Qwen2ForCausalLM, random init (seeded)
      models/tiny-qwen2-student-s/          Qwen2ForCausalLM, random init (seeded)
      teacher_eval.json                     the teacher's held-out greedy accuracy and build time
      world.json                            written LAST: the completion marker

Embedding rows mirror the real vocabulary mismatch (Qwen2.5: 152,064 teacher rows >
151,936 student rows > 151,665 tokenizer entries): ``teacher_rows > student_rows > len(tokenizer)``.

Teacher pretraining minimises the token-level cross-entropy of the gold completion
(``rationale + "\\nThe answer is N."`` + ``<|im_end|>``) given the chat prompt,

    L = - (1 / |S|) * sum_{t in S} log p_theta(y_t | y_<t),   S = completion token positions,

with AdamW, linear warm-up then cosine decay, gradient clipping; batches are padded to the longest
sequence in the batch (``input_ids``: [B, T]).

Command line: ``python3 -m slmkd.tiny --drive-root DIR [--force]``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmkd.data.arithmetic import ArithmeticSpec, write_splits

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedTokenizerFast

    from slmkd.config import ExperimentConfig, TinyConfig

TEACHER_NAME = "tiny-qwen2-teacher"
STUDENT_M_NAME = "tiny-qwen2-student-m"
STUDENT_S_NAME = "tiny-qwen2-student-s"
MODEL_NAMES = (TEACHER_NAME, STUDENT_M_NAME, STUDENT_S_NAME)

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
DEFAULT_SYSTEM = "You are a helpful assistant."
WORLD_MARKER = "world.json"
WORLD_FORMAT = 1

# Same shape as Qwen2.5's ChatML template: a default system message, `<|im_start|>role\n...<|im_end|>\n`
# per message, and `<|im_start|>assistant\n` as the generation prompt.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyWorld:
    """Paths of a built tiny world and the teacher's held-out accuracy."""

    root: Path
    tokenizer_dir: Path
    models_dir: Path
    train_path: Path
    test_path: Path
    teacher_accuracy: float
    teacher_eval_path: Path

    def model_dir(self, name: str) -> Path:
        return self.models_dir / name


# ---------------------------------------------------------------------------------------------
# prompts (delegated to slmkd.data.prompts, the single source of the prompt format)
# ---------------------------------------------------------------------------------------------
def _instruction_texts() -> list[str]:
    """Texts that appear in every prompt, fed to the BPE trainer so they compress well."""
    texts = [DEFAULT_SYSTEM]
    try:
        from slmkd.data import prompts
    except ImportError:  # pragma: no cover - prompts is written by the lead
        return texts
    for name in dir(prompts):
        value = getattr(prompts, name)
        if name.isupper() and isinstance(value, str) and value.strip():
            texts.append(value)
    return texts


def gold_completion(answer: str) -> str:
    """GSM8K ``answer`` (rationale + ``#### N``) → assistant completion ending ``The answer is N.``"""
    from slmkd.data.prompts import format_final_answer

    if "####" not in answer:
        raise ValueError(f"not a GSM8K answer (no '####' line): {answer!r}")
    rationale, final = answer.rsplit("####", 1)
    return rationale.rstrip() + "\n" + format_final_answer(final.strip())


def prompt_for_question(tokenizer: Any, question: str) -> str:
    """The chat prompt (generation prompt added) for a GSM8K-format question."""
    from slmkd.data import Record
    from slmkd.data.prompts import build_prompt

    record = Record(id="tiny", dataset="gsm8k", task="gsm8k", split="train", question=question,
                    answer="", rationale=None)
    return build_prompt(tokenizer, record)


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------
def train_tokenizer(texts: Sequence[str], vocab_size: int,
                    split_words: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen-style special tokens, digits split one per token.

    Special tokens get ids 0..2 (``<|endoftext|>`` pad, ``<|im_start|>``, ``<|im_end|>`` eos);
    ``vocab_size`` counts them and the 256 byte symbols.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"bpe vocab_size must be >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END], model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def tokenizer_corpus(train_path: Path, repeats_of_instructions: int = 200) -> list[str]:
    """Questions and gold completions of the train split plus the fixed prompt texts."""
    texts: list[str] = []
    with open(train_path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            texts.append(row["question"])
            texts.append(row["answer"])
            texts.append(gold_completion(row["answer"]))
    texts.extend(_instruction_texts() * repeats_of_instructions)
    texts.extend(["user", "assistant", "system"] * repeats_of_instructions)
    return texts


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of one tiny Qwen2 model."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab_rows: int


def model_specs(tiny: TinyConfig, tokenizer_len: int) -> list[TinyModelSpec]:
    """Teacher and students; rows: teacher > student > tokenizer length (both students equal)."""
    student_rows = tokenizer_len + tiny.student_extra_rows
    teacher_rows = student_rows + tiny.teacher_extra_rows
    if not teacher_rows > student_rows > tokenizer_len:
        raise ValueError("tiny.student_extra_rows and tiny.teacher_extra_rows must be > 0")
    return [
        TinyModelSpec(TEACHER_NAME, tiny.teacher_hidden, tiny.teacher_layers, tiny.teacher_heads,
                      tiny.teacher_kv_heads, tiny.teacher_intermediate, teacher_rows),
        TinyModelSpec(STUDENT_M_NAME, tiny.student_m_hidden, tiny.student_m_layers,
                      tiny.student_heads, tiny.student_kv_heads,
                      tiny.student_m_hidden * tiny.student_intermediate_ratio, student_rows),
        TinyModelSpec(STUDENT_S_NAME, tiny.student_s_hidden, tiny.student_s_layers,
                      tiny.student_heads, tiny.student_kv_heads,
                      tiny.student_s_hidden * tiny.student_intermediate_ratio, student_rows),
    ]


def build_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast, seed: int,
                max_positions: int) -> Any:
    """A randomly initialised ``Qwen2ForCausalLM`` (seeded, tied embeddings, fp32)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if spec.hidden % spec.heads or spec.heads % spec.kv_heads:
        raise ValueError(f"{spec.name}: hidden % heads and heads % kv_heads must be 0")
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    pad = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = Qwen2Config(
        vocab_size=spec.vocab_rows, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, max_position_embeddings=max_positions,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=pad, eos_token_id=eos,
        pad_token_id=pad, torch_dtype="float32", use_cache=True,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad, do_sample=False,
    )
    return model


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
