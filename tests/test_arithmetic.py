"""The synthetic GSM8K-format arithmetic task: format, determinism, train/test disjointness."""

from __future__ import annotations

import json
import re

import pytest

from slmkd.data.arithmetic import (
    ArithmeticSpec,
    generate_split,
    iter_problems,
    split_of_key,
    write_splits,
)
from slmkd.data.gsm8k import load_gsm8k

_STEP = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)")


def test_records_are_gsm8k_format_and_arithmetic_is_right() -> None:
    for p in generate_split("train", 300, seed=1):
        rec = p.record()
        assert set(rec) == {"question", "answer"}
        lines = rec["answer"].split("\n")
        assert lines[-1] == f"#### {p.value}"
        steps = [_STEP.search(line) for line in lines[:-1]]
        assert len(steps) == 2 and all(steps)
        for m in steps:
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert (a + b if op == "+" else a - b) == c
        assert int(steps[0][4]) == int(steps[1][1])  # the second step continues the first
        assert int(steps[1][4]) == p.value >= 0
        assert str(p.start) in rec["question"] and rec["question"].endswith("now?")


def test_generation_is_deterministic_and_seed_dependent() -> None:
    a = [p.question for p in generate_split("test", 50, seed=3)]
    assert a == [p.question for p in generate_split("test", 50, seed=3)]
    assert a != [p.question for p in generate_split("test", 50, seed=4)]
    assert len(set(a)) == 50


def test_train_and_test_are_disjoint_by_construction() -> None:
    spec = ArithmeticSpec()
    train = generate_split("train", 4000, seed=0, spec=spec)
    test = generate_split("test", 400, seed=0, spec=spec)
    assert {p.question for p in train}.isdisjoint({p.question for p in test})
    assert {p.key for p in train}.isdisjoint({p.key for p in test})
    assert all(split_of_key(p.key, spec) == "train" for p in train)
    assert all(split_of_key(p.key, spec) == "test" for p in test)
    # different seeds still never cross the partition
    other = generate_split("test", 400, seed=9, spec=spec)
    assert {p.key for p in train}.isdisjoint({p.key for p in other})


def test_operand_ranges_follow_the_spec() -> None:
    spec = ArithmeticSpec(min_start=5, max_start=9, max_operand=3, test_per_mille=500)
    for p in generate_split("train", 100, seed=0, spec=spec):
        assert 5 <= p.start <= 9 and 1 <= p.first <= 3 and 1 <= p.second <= 3


def test_files_load_unchanged_with_the_gsm8k_loader(tmp_path) -> None:
    train_path, test_path = write_splits(tmp_path, 60, 20, seed=2)
    train, test = load_gsm8k("train", train_path), load_gsm8k("test", test_path)
    assert not train.skipped and not test.skipped
    assert len(train.records) == 60 and len(test.records) == 20
    rows = [json.loads(line) for line in test_path.read_text().splitlines()]
    for rec, row in zip(test.records, rows):
        assert rec.question == row["question"]
        assert row["answer"].endswith(f"#### {rec.answer}")
        assert rec.rationale and "####" not in rec.rationale
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="min_start"):
        ArithmeticSpec(min_start=10, max_start=5)
    with pytest.raises(ValueError, match="max_operand"):
        ArithmeticSpec(max_operand=0)
    with pytest.raises(ValueError, match="test_per_mille"):
        ArithmeticSpec(test_per_mille=0)
    with pytest.raises(ValueError, match="split"):
        next(iter_problems("dev", 0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        generate_split("train", -1)


def test_exhausted_parameter_space_is_reported() -> None:
    spec = ArithmeticSpec(min_start=1, max_start=1, max_operand=1, test_per_mille=500)
    with pytest.raises(RuntimeError, match="widen"):
        generate_split("train", 1000, seed=0, spec=spec)
