"""Test helpers: a tiny random Qwen2 causal LM and a ChatML BPE tokenizer, built in milliseconds.

Used by tests/test_generation.py and tests/test_teacher.py for mechanics (padding, EOS, shards,
resume); the trained tiny teacher is exercised end to end separately.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "3 + 4 = 7",
    "The answer is 7.",
    "Solve the problem step by step. Finish with a last line of the form",
    "A shop sells 12 pens. It sells 5. How many pens are left? 12 - 5 = 7",
    "You are a helpful assistant.",
    "user assistant system Question:",
]


def make_tokenizer(vocab_size: int = 300):
    from slmkd.tiny import train_tokenizer

    return train_tokenizer(CORPUS * 20, vocab_size)


def make_model(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2):
    from slmkd.tiny import TinyModelSpec, build_model

    spec = TinyModelSpec("tiny-test-lm", hidden, layers, 4, 2, hidden * 2, len(tokenizer) + 8)
    return build_model(spec, tokenizer, seed, max_positions=512)


def write_gsm8k(path: Path, n: int) -> Path:
    """``n`` GSM8K-format items (question, answer with ``#### N``) of varying lengths."""
    rows = []
    for i in range(n):
        a, b = 2 + i, 3 + (i * 7) % 11
        extra = " Then he counts them again." * (i % 3)
        rows.append({"question": f"Tom has {a} apples and buys {b} more.{extra} How many?",
                     "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
