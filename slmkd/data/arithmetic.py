"""Seeded generator of GSM8K-format two-step arithmetic word problems (the tiny task).

Each problem is ``start ± first ± second`` told as a short story, e.g.::

    question: "Mia has 23 apples. She buys 15 more apples and then gives away 8 apples.
               How many apples does Mia have now?"
    answer:   "After buying: 23 + 15 = 38 apples.\\n"
              "After giving away: 38 - 8 = 30 apples.\\n"
              "#### 30"

which is exactly the real GSM8K JSONL record shape (``{"question", "answer"}``, the answer being a
step-by-step rationale then a final line ``#### N``), so the GSM8K loader reads it unchanged.

Train/test disjointness is by construction: the parameter tuple
``(scenario, pattern, start, first, second)`` is hashed (BLAKE2b, no dependence on Python's
salted ``hash``) into 1,000 buckets and buckets ``< test_per_mille`` belong to the test split,
the rest to train. A split only ever emits tuples of its own buckets, so no test problem's
arithmetic (in the same scenario and pattern) is ever seen in training, whatever the names;
question texts are additionally deduplicated within each split.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "test"]

NAMES: tuple[tuple[str, str], ...] = (
    ("Mia", "She"), ("Tom", "He"), ("Ava", "She"), ("Leo", "He"), ("Zoe", "She"),
    ("Sam", "He"), ("Ivy", "She"), ("Ben", "He"), ("Lily", "She"), ("Max", "He"),
    ("Emma", "She"), ("Noah", "He"), ("Ella", "She"), ("Jack", "He"), ("Ruby", "She"),
    ("Owen", "He"),
)

# scenario: (items, gain verb phrase (present), gain label, loss verb phrase, loss label)
SCENARIOS: tuple[tuple[str, str, str, str, str], ...] = (
    ("apples", "buys", "buying", "gives away", "giving away"),
    ("stickers", "gets", "getting", "loses", "losing"),
    ("marbles", "finds", "finding", "gives away", "giving away"),
    ("cookies", "bakes", "baking", "eats", "eating"),
    ("books", "buys", "buying", "sells", "selling"),
    ("coins", "earns", "earning", "spends", "spending"),
)

# pattern: signs of the two steps (+1 gain, -1 loss)
PATTERNS: tuple[tuple[int, int], ...] = ((1, -1), (-1, 1), (1, 1), (-1, -1))

HASH_BUCKETS = 1000
MAX_CONSECUTIVE_MISSES = 20_000  # draws in a row that were foreign or duplicate: space exhausted


@dataclass(frozen=True)
class ArithmeticSpec:
    """Difficulty of the task: operand ranges (inclusive) and the test share.

    ``start`` is drawn from ``[min_start, max_start]``, each step's amount from
    ``[1, max_operand]``; draws whose running total would go negative are rejected.
    """

    min_start: int = 10
    max_start: int = 60
    max_operand: int = 30
    test_per_mille: int = 100

    def __post_init__(self) -> None:
        if not 0 <= self.min_start <= self.max_start:
            raise ValueError(f"need 0 <= min_start <= max_start, got {self.min_start}, {self.max_start}")
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
        if not 0 < self.test_per_mille < HASH_BUCKETS:
            raise ValueError(f"test_per_mille must be in (0, {HASH_BUCKETS}), got {self.test_per_mille}")


@dataclass(frozen=True)
class Problem:
    """One generated problem with its parameters; ``record()`` is the GSM8K JSONL row."""

    scenario: int
    pattern: int
    start: int
    first: int
    second: int
    name: int
    question: str
    answer: str
    value: int

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        """The arithmetic identity used for the train/test partition."""
        return (self.scenario, self.pattern, self.start, self.first, self.second)

    def record(self) -> dict[str, str]:
        return {"question": self.question, "answer": self.answer}


def split_of_key(key: tuple[int, ...], spec: ArithmeticSpec) -> Split:
    """Which split a parameter tuple belongs to (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(tuple(key)).encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % HASH_BUCKETS
    return "test" if bucket < spec.test_per_mille else "train"


def _render(scenario: int, pattern: int, start: int, first: int, second: int, name: int) -> Problem:
    items, gain, gain_label, loss, loss_label = SCENARIOS[scenario]
    who, pronoun = NAMES[name]
    s1, s2 = PATTERNS[pattern]
    verb1 = gain if s1 > 0 else loss
    verb2 = gain if s2 > 0 else loss
    more1 = " more" if s1 > 0 else ""
    more2 = " more" if s2 > 0 else ""
    question = (
        f"{who} has {start} {items}. {pronoun} {verb1} {first}{more1} {items} and then "
        f"{verb2} {second}{more2} {items}. How many {items} does {who} have now?"
    )
    mid = start + s1 * first
    value = mid + s2 * second
    op1 = "+" if s1 > 0 else "-"
    op2 = "+" if s2 > 0 else "-"
    label1 = gain_label if s1 > 0 else loss_label
    label2 = gain_label if s2 > 0 else loss_label
    answer = (
        f"After {label1}: {start} {op1} {first} = {mid} {items}.\n"
        f"After {label2}: {mid} {op2} {second} = {value} {items}.\n"
        f"#### {value}"
    )
    return Problem(scenario, pattern, start, first, second, name, question, answer, value)


def _draw(rng: random.Random, spec: ArithmeticSpec) -> Problem:
    while True:
        scenario = rng.randrange(len(SCENARIOS))
        pattern = rng.randrange(len(PATTERNS))
        start = rng.randint(spec.min_start, spec.max_start)
        first = rng.randint(1, spec.max_operand)
        second = rng.randint(1, spec.max_operand)
        s1, s2 = PATTERNS[pattern]
        mid = start + s1 * first
        if mid < 0 or mid + s2 * second < 0:
            continue
        return _render(scenario, pattern, start, first, second, rng.randrange(len(NAMES)))


def iter_problems(split: Split, seed: int, spec: ArithmeticSpec | None = None) -> Iterator[Problem]:
    """Endless stream of distinct-question problems of ``split`` (deterministic in ``seed``)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    spec = spec or ArithmeticSpec()
    rng = random.Random(f"slmkd-arithmetic:{seed}:{split}")
    seen: set[str] = set()
    misses = 0
    while True:
        problem = _draw(rng, spec)
        if split_of_key(problem.key, spec) != split or problem.question in seen:
            misses += 1
            if misses > MAX_CONSECUTIVE_MISSES:
                raise RuntimeError(
                    f"could not draw more distinct {split} problems ({len(seen)} drawn); "
                    "widen the ArithmeticSpec ranges or ask for fewer items"
                )
            continue
        misses = 0
        seen.add(problem.question)
        yield problem


def generate_split(
    split: Split, n: int, seed: int = 0, spec: ArithmeticSpec | None = None
) -> list[Problem]:
    """``n`` distinct problems of ``split``; train and test are disjoint by construction."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    stream = iter_problems(split, seed, spec)
    return [next(stream) for _ in range(n)]


def write_jsonl(path: str | os.PathLike[str], problems: list[Problem]) -> Path:
    """Write GSM8K-format rows atomically (temp file then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for problem in problems:
            fh.write(json.dumps(problem.record(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def write_splits(
    out_dir: str | os.PathLike[str],
    n_train: int,
    n_test: int,
    seed: int = 0,
    spec: ArithmeticSpec | None = None,
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` under ``out_dir``; returns both paths."""
    out = Path(out_dir)
    train = write_jsonl(out / "train.jsonl", generate_split("train", n_train, seed, spec))
    test = write_jsonl(out / "test.jsonl", generate_split("test", n_test, seed, spec))
    return train, test
