import json
from pathlib import Path

import pytest

from slmkd.data import (
    BBH_TASKS,
    Record,
    bbh_train_eval_split,
    eval_subset,
    load_bbh,
    load_bbh_cot_prompts,
    load_gsm8k,
    normalize_number,
    parse_gsm8k_answer,
)

FIX = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "gsm8k" / "train.jsonl").is_file(),
                                  reason="../shared/data (full GSM8K/BBH) is not beside this checkout")


@pytest.mark.parametrize("raw,expected", [
    ("18", "18"), ("18.00", "18"), ("$1,234", "1234"), ("-7.", "-7"), (" 3.50 ", "3.5"),
    ("0.0", "0"), ("abc", None), ("1/2", None), ("", None),
])
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


def test_parse_gsm8k_answer_strips_calculator_annotations():
    rationale, n = parse_gsm8k_answer("She sold 48/2 = <<48/2=24>>24 clips.\n#### 1,024")
    assert n == "1024" and "<<" not in rationale and rationale.endswith("24 clips.")
    with pytest.raises(ValueError, match="no '####'"):
        parse_gsm8k_answer("no final line")
    with pytest.raises(ValueError, match="unparsable"):
        parse_gsm8k_answer("x\n#### twelve")


def test_gsm8k_fixture_loads_with_stable_ids():
    res = load_gsm8k("test", FIX / "gsm8k" / "test.jsonl")
    assert len(res.records) == 30 and not res.skipped
    r = res.records[0]
    assert r.id == "gsm8k-test-00000" and r.dataset == "gsm8k" and r.split == "test"
    assert r.answer == normalize_number(r.answer) and r.rationale
    assert load_gsm8k("test", FIX / "gsm8k").records == res.records  # folder form


def test_gsm8k_bad_records_are_counted_not_fatal(tmp_path):
    p = tmp_path / "train.jsonl"
    rows = [json.dumps({"question": "Q1?", "answer": "a\n#### 5"}), "{not json",
            json.dumps({"question": "Q2?"}), json.dumps({"question": "Q3?", "answer": "no marker"}),
            json.dumps({"question": "Q4?", "answer": "x\n#### many"}), "",
            json.dumps({"question": "Q5?", "answer": "b\n#### -2.50"})]
    p.write_text("\n".join(rows))
    res = load_gsm8k("train", p)
    assert [r.answer for r in res.records] == ["5", "-2.5"]
    reasons = sorted(r.split(":")[0] for _, r in res.skipped)
    assert reasons == ["bad_answer", "bad_answer", "malformed_json", "missing_field"]
    assert "4 skipped" in res.summary()
    with pytest.raises(FileNotFoundError):
        load_gsm8k("train", tmp_path / "absent.jsonl")


def test_bbh_fixture_and_prompts_have_no_canary():
    res = load_bbh(FIX / "bbh")
    assert {r.task for r in res.records} == set(BBH_TASKS)
    assert all(r.dataset == "bbh" and r.answer for r in res.records)
    prompts = load_bbh_cot_prompts(FIX / "bbh")
    assert set(prompts) == set(BBH_TASKS)
    for text in prompts.values():
        assert "canary" not in text.lower() and "-----" not in text
        assert "So the answer is" in text


def test_bbh_missing_task_file_is_reported(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "navigate.json").write_text(json.dumps(
        {"examples": [{"input": "Go?", "target": "Yes"}, {"input": "", "target": "No"}]}))
    res = load_bbh(tmp_path, tasks=["navigate", "snarks"])
    assert len(res.records) == 1
    assert ("snarks", "missing_task_file") in res.skipped
    assert ("bbh-navigate-0001", "missing_field: input/target") in res.skipped


def _recs(n, task=None):
    return [Record(f"x-{task}-{i:04d}", "bbh", task, "test", f"q{task}{i}", "A") for i in range(n)]


def test_eval_subset_is_fixed_by_seed_and_independent_of_order():
    recs = _recs(50)
    a = eval_subset(recs, 10, seed=1)
    assert a == eval_subset(list(reversed(recs)), 10, seed=1)
    assert a != eval_subset(recs, 10, seed=2)
    assert len(a) == 10 and eval_subset(recs, None, 1) == sorted(recs, key=lambda r: r.id)
    per = eval_subset(_recs(20, "t1") + _recs(5, "t2"), 8, seed=0, per_task=True)
    assert sum(r.task == "t1" for r in per) == 8 and sum(r.task == "t2" for r in per) == 5


def test_bbh_train_and_eval_are_disjoint_by_construction():
    recs = _recs(30, "t1") + _recs(12, "t2")
    train, pool = bbh_train_eval_split(recs, 10, seed=3)
    assert not {r.id for r in train} & {r.id for r in pool}
    assert len(train) == 20 and len(pool) == 22
    dup = recs + [Record("x-t1-9999", "bbh", "t1", "test", "qt10", "A")]  # repeats a question
    tr2, pool2 = bbh_train_eval_split(dup, 10, seed=3)
    assert not {r.question for r in tr2} & {r.question for r in pool2}
    assert bbh_train_eval_split(recs, 10, seed=3) == (train, pool)
    assert bbh_train_eval_split(recs, 0, seed=3) == ([], sorted(recs, key=lambda r: r.id))


@needs_shared
def test_full_gsm8k_loads_and_train_test_questions_are_disjoint():
    train = load_gsm8k("train", SHARED / "gsm8k" / "train.jsonl")
    test = load_gsm8k("test", SHARED / "gsm8k" / "test.jsonl")
    assert (len(train.records), len(test.records)) == (7473, 1319)
    assert not train.skipped and not test.skipped
    assert not {r.question for r in train.records} & {r.question for r in test.records}


@needs_shared
def test_full_bbh_loads_6511_items_and_subsets_are_stable():
    res = load_bbh(SHARED / "bbh")
    assert len(res.records) == 6511 and not res.skipped
    sub = eval_subset(res.records, 100, seed=1234, per_task=True)
    assert len(sub) == sum(min(100, sum(r.task == t for r in res.records)) for t in BBH_TASKS)
    train, pool = bbh_train_eval_split(res.records, 20, seed=0)
    assert not {r.question for r in train} & {r.question for r in eval_subset(pool, 100, 1, True)}
