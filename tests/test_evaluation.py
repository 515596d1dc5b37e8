"""Batched evaluation: predictions, summaries, resume, subsets, CasCoD routing, leakage guard,
the three per-item metrics (lm-eval strict / flexible, slmkd lenient), old-format rows re-scored,
item-set hashes and the recorded system prompt."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from slmkd import cli
from slmkd import evaluation as ev
from slmkd.config import load_config
from slmkd.data.records import Record

FIXTURES = Path(__file__).parent / "fixtures"
ROW_FIELDS = {"id", "dataset", "task", "question", "raw_output", "extracted", "target", "correct",
              "strict_correct", "flexible_correct", "strict", "flexible", "lenient",
              "extracted_strict", "extracted_flexible"}
NEW_ROW_KEYS = ("strict", "flexible", "lenient", "extracted_strict", "extracted_flexible")
SUMMARY_FIELDS = {"model", "kind", "method", "student", "seed", "dataset", "n", "accuracy",
                  "strict_accuracy", "flexible_accuracy", "ci_low", "ci_high", "per_task",
                  "accuracy_strict", "accuracy_flexible", "accuracy_lenient", "ci_strict",
                  "ci_flexible", "ci_lenient", "item_ids_hash", "limit", "subset_seed",
                  "system_prompt", "rescored_rows"}
METRICS = ("strict", "flexible", "lenient")


class FakeTokenizer:
    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        assert not tokenize and add_generation_prompt
        return "<|user|>" + messages[0]["content"] + "<|assistant|>"


def _cfg(tmp_path, **extra):
    ov = {"drive_root": str(tmp_path / "drive"),
          "data.gsm8k_test": str(FIXTURES / "gsm8k" / "test.jsonl"),
          "data.gsm8k_train": str(FIXTURES / "gsm8k" / "train.jsonl"),
          "data.bbh_dir": str(FIXTURES / "bbh"), "evaluation.batch_size": 4}
    ov.update(extra)
    return load_config("tiny", overrides=ov, environ={})


class Oracle:
    """Answers item i correctly when ``i % 3 != 0`` (GSM8K: trained format; BBH: CoT style);
    stands in for slmkd.generation.iter_generate_batched / slmkd.generation.cascaded_generate.

    With ``mixed=True`` the answers vary their final line with i % 4 (GSM8K 1: LaTeX
    ``\\boxed{N}``, which lm-eval's strict-match misses, 2: no final line, a bare number; BBH 1:
    capital ``"The answer is X."``, which lm-eval's strict-match misses), so the three metrics
    differ."""

    def __init__(self, records, fail_after=None, mixed=False):
        self.by_q = {r.question: r for r in records}
        self.order = {r.id: i for i, r in enumerate(sorted(records, key=lambda r: r.id))}
        self.calls = 0
        self.generated: list[str] = []
        self.fail_after = fail_after
        self.mixed = mixed

    def answer(self, prompt):
        rec = next(r for q, r in self.by_q.items() if q in prompt)
        self.generated.append(rec.id)
        i = self.order[rec.id]
        ok = i % 3 != 0
        if rec.dataset == "gsm8k":
            n = rec.answer if ok else "-999"
            if self.mixed and i % 4 == 1:
                return f"Some steps.\nThe answer is \\boxed{{{n}}}."
            if self.mixed and i % 4 == 2:
                return f"Some steps, so she has {n}"
            return f"Some steps.\nThe answer is {n}."
        if self.mixed and i % 4 == 1:
            return f"Reasoning.\nThe answer is {rec.answer if ok else 'zzz'}."
        return f"Reasoning. So the answer is {rec.answer if ok else 'zzz'}."

    def iter_generate_batched(self, model, tokenizer, prompts, *, max_new_tokens, batch_size,
                              desc=None, show_progress=True):
        from slmkd.generation import GenerationBatch, GenerationOutput

        for k in range(0, len(prompts), batch_size):
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise RuntimeError("simulated crash")
            self.calls += 1
            idx = list(range(k, min(k + batch_size, len(prompts))))
            outs = [GenerationOutput(self.answer(prompts[i]), 5, False) for i in idx]
            yield GenerationBatch(idx, outs, 0.01)

    def cascaded_generate(self, model, tokenizer, prompts, *, answer_cue, batch_size,
                          max_new_tokens_rationale, **kw):
        self.calls += 1
        outs = []
        for p in prompts:
            text = self.answer(p)
            rat, _, ans = text.rpartition("The answer is")
            outs.append({"rationale": rat.strip(), "answer_text": ans,
                         "full_text": f"{rat.strip()}\n{answer_cue}{ans}",
                         "rationale_hit_max": False, "answer_hit_max": False,
                         "num_new_tokens": 7})
        return outs


@pytest.fixture
def gsm8k_records(tmp_path):
    return ev.evaluation_records(_cfg(tmp_path), "gsm8k", limit=12)


def _patch(monkeypatch, oracle):
    import slmkd.generation

    monkeypatch.setattr(slmkd.generation, "iter_generate_batched", oracle.iter_generate_batched)
    monkeypatch.setattr(slmkd.generation, "cascaded_generate", oracle.cascaded_generate)


def test_evaluate_model_gsm8k_rows_and_summary(tmp_path, monkeypatch, gsm8k_records):
    cfg = _cfg(tmp_path)
    oracle = Oracle(gsm8k_records)
    _patch(monkeypatch, oracle)
    s = ev.evaluate_model(cfg, object(), "gsm8k", tokenizer=FakeTokenizer(), limit=12,
                          model_slug="base-x", student="x", show_progress=False)
    assert SUMMARY_FIELDS <= set(s)
    assert s["n"] == 12 and s["kind"] == "base"
    assert s["accuracy"] == pytest.approx(8 / 12)  # ids 0, 3, 6, 9 answered wrong
    assert s["strict_accuracy"] == s["flexible_accuracy"] == s["accuracy"]
    assert s["ci_low"] <= s["accuracy"] <= s["ci_high"]
    out = tmp_path / "drive" / "eval" / "base-x" / "gsm8k"
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(ROW_FIELDS <= set(r) for r in rows)
    assert all(r["correct"] == r["lenient"] for r in rows)
    assert s["accuracy_strict"] == s["accuracy_flexible"] == s["accuracy_lenient"] == s["accuracy"]
    assert json.loads((out / "summary.json").read_text())["accuracy"] == s["accuracy"]
    # a rerun generates nothing and gives the same summary
    oracle.generated.clear()
    s2 = ev.evaluate_model(cfg, object(), "gsm8k", tokenizer=FakeTokenizer(), limit=12,
                           model_slug="base-x", show_progress=False)
    assert oracle.generated == [] and s2["accuracy"] == s["accuracy"]


def test_resume_after_crash_and_truncated_line(tmp_path, monkeypatch, gsm8k_records):
    cfg = _cfg(tmp_path)
    crashing = Oracle(gsm8k_records, fail_after=2)
    _patch(monkeypatch, crashing)
    kw = dict(tokenizer=FakeTokenizer(), limit=12, model_slug="m", show_progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ev.evaluate_model(cfg, object(), "gsm8k", **kw)
    pred = tmp_path / "drive" / "eval" / "m" / "gsm8k" / "predictions.jsonl"
    assert len(pred.read_text().splitlines()) == 8  # two completed batches of 4
    with pred.open("a") as f:
        f.write('{"id": "gsm8k-test-99", "raw_out')  # a write cut short
    resumed = Oracle(gsm8k_records)
    _patch(monkeypatch, resumed)
    s = ev.evaluate_model(cfg, object(), "gsm8k", **kw)
    assert len(resumed.generated) == 4  # only the missing items
    ids = [json.loads(x)["id"] for x in pred.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 12
    assert s["n"] == 12


def test_settings_mismatch_refuses_to_mix(tmp_path, monkeypatch, gsm8k_records):
    cfg = _cfg(tmp_path)
    _patch(monkeypatch, Oracle(gsm8k_records))
    kw = dict(tokenizer=FakeTokenizer(), limit=4, model_slug="m", show_progress=False)
    ev.evaluate_model(cfg, object(), "gsm8k", max_new_tokens=64, **kw)
    with pytest.raises(ValueError, match="different settings"):
        ev.evaluate_model(cfg, object(), "gsm8k", max_new_tokens=32, **kw)
    s = ev.evaluate_model(cfg, object(), "gsm8k", max_new_tokens=32, force=True, **kw)
    assert s["n"] == 4 and s["max_new_tokens"] == 32


def test_subsets_fixed_by_seed(tmp_path):
    cfg = _cfg(tmp_path)
    a = [r.id for r in ev.evaluation_records(cfg, "gsm8k", limit=7)]
    b = [r.id for r in ev.evaluation_records(cfg, "gsm8k", limit=7)]
    assert a == b and len(a) == 7
    other = _cfg(tmp_path, **{"evaluation.subset_seed": 99})
    assert [r.id for r in ev.evaluation_records(other, "gsm8k", limit=7)] != a
    assert len(ev.evaluation_records(cfg, "gsm8k", limit=None)) == 30
    assert len(ev.evaluation_records(cfg, "gsm8k", limit=0)) == 30  # 0 = all
    bbh = ev.evaluation_records(cfg, "bbh", limit=2)
    assert len(bbh) == 54 and len({r.task for r in bbh}) == 27
    with pytest.raises(ValueError):
        ev.evaluation_records(cfg, "mmlu")


def test_bbh_per_task_summary_and_cascod_routing(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    recs = ev.evaluation_records(cfg, "bbh", limit=3)
    oracle = Oracle(recs)
    _patch(monkeypatch, oracle)
    s = ev.evaluate_model(cfg, object(), "bbh", tokenizer=FakeTokenizer(), limit=3,
                          method="cascod", model_slug="cascod__x__seed0", show_progress=False)
    assert oracle.calls >= 1 and len(oracle.generated) == 81
    assert set(s["per_task"]) == set(ev.BBH_TASK_TYPES)
    assert s["micro_accuracy"] == pytest.approx(s["accuracy"])
    total = sum(d["correct"] for d in s["per_task"].values())
    assert total / 81 == pytest.approx(s["accuracy"])
    assert s["accuracy"] == pytest.approx(54 / 81)  # 1 of every 3 answered wrong
    assert s["kind"] == "run"


def test_check_no_leakage():
    recs = [Record("a", "gsm8k", None, "test", "How many  apples?", "3"),
            Record("b", "gsm8k", None, "test", "How many pears?", "4")]
    assert ev.check_no_leakage(recs, ["something else"]) == 2
    with pytest.raises(ev.LeakageError, match="1 of 2"):
        ev.check_no_leakage(recs, ["how many apples?"])
    with pytest.raises(ev.LeakageError):
        ev.check_no_leakage([{"id": "c", "question": "Q"}], ["q"])


def _fake_run(tmp_path, method="sft", student="tiny-qwen2-student-s", seed=1):
    run = tmp_path / "drive" / "runs" / method / student / f"seed{seed}"
    (run / "final").mkdir(parents=True)
    (run / "train_summary.json").write_text(json.dumps({
        "method": method, "student": student, "seed": seed, "final_model_dir": "final",
        "steps": 10, "skipped_batches": 0, "skipped_fraction": 0.0, "final_loss": 1.0}))
    return run


def test_evaluate_run_and_leakage_guard(tmp_path, monkeypatch, gsm8k_records):
    import slmkd.modeling

    cfg = _cfg(tmp_path)
    oracle = Oracle(gsm8k_records)
    _patch(monkeypatch, oracle)
    loaded = []
    monkeypatch.setattr(slmkd.modeling, "load_tokenizer",
                        lambda n, c, padding_side: FakeTokenizer())
    monkeypatch.setattr(slmkd.modeling, "load_causal_lm",
                        lambda n, c, **kw: loaded.append(n) or object())
    run = _fake_run(tmp_path)
    out = ev.evaluate_run(cfg, run, datasets=["gsm8k"], limit=12, show_progress=False)
    s = out["gsm8k"]
    assert s["model"] == "sft__tiny-qwen2-student-s__seed1"
    assert (s["method"], s["seed"], s["kind"]) == ("sft", 1, "run")
    assert s["leakage_checked"] and loaded == [str(run / "final")]
    assert (tmp_path / "drive" / "eval" / s["model"] / "gsm8k" / "summary.json").is_file()
    # training data containing the test set: the guard fails loudly before generating
    leaky = _cfg(tmp_path, **{"data.gsm8k_train": str(FIXTURES / "gsm8k" / "test.jsonl")})
    oracle.generated.clear()
    with pytest.raises(ev.LeakageError):
        ev.evaluate_run(leaky, run, datasets=["gsm8k"], limit=12, force=True,
                        show_progress=False)
    assert oracle.generated == []
    with pytest.raises(FileNotFoundError, match="not complete"):
        ev.evaluate_run(cfg, tmp_path / "nowhere")


def test_real_tiny_model_generation(tmp_path):
    """Real greedy generation through slmkd.generation with a tiny random Qwen2 model."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _tiny_lm import make_model, make_tokenizer

    tok = make_tokenizer()
    tok.padding_side = "left"
    model = make_model(tok)
    cfg = _cfg(tmp_path)
    s = ev.evaluate_model(cfg, model, "gsm8k", tokenizer=tok, limit=3, max_new_tokens=6,
                          batch_size=2, model_slug="rand", show_progress=False)
    assert s["n"] == 3 and 0.0 <= s["accuracy"] <= 1.0
    rows = [json.loads(x) for x in Path(s["predictions"]).read_text().splitlines()]
    assert all(isinstance(r["raw_output"], str) and r["num_new_tokens"] <= 6 for r in rows)
    assert all(ROW_FIELDS <= set(r) for r in rows)
    from slmkd.tiny import DEFAULT_SYSTEM  # the tiny chat template's default system turn

    meta = json.loads((Path(s["predictions"]).parent / "eval_meta.json").read_text())
    assert meta["system_prompt"] == DEFAULT_SYSTEM


def test_cli_parser():
    parser = argparse.ArgumentParser()
    cli.add_evaluate_command(parser.add_subparsers(dest="cmd"))
    a = parser.parse_args(["evaluate", "--run-dir", "R", "--dataset", "bbh", "--limit", "5"])
    assert (a.run_dir, a.dataset, a.limit, a.model) == ("R", "bbh", 5, None)
    assert a.func is cli._evaluate_command
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--run-dir", "R", "--model", "M"])


# --- the three metrics, item-set hash, old rows re-scored, system prompt -------------------------
def _rows(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _recompute(rows, dataset):
    """The summary's accuracies recomputed by hand from the stored rows."""
    out = {f"accuracy_{m}": sum(r[m] for r in rows) / len(rows) for m in METRICS}
    if dataset == "bbh":
        tasks = sorted({r["task"] for r in rows})
        for m in METRICS:
            acc = {t: [r[m] for r in rows if r["task"] == t] for t in tasks}
            out[f"macro_accuracy_{m}"] = sum(sum(v) / len(v) for v in acc.values()) / len(tasks)
            out[f"micro_accuracy_{m}"] = out[f"accuracy_{m}"]
            out[f"per_task_{m}"] = {t: sum(v) / len(v) for t, v in acc.items()}
    return out


def test_rows_carry_three_metrics_and_summary_recomputes(tmp_path, monkeypatch, gsm8k_records):
    from slmkd.scoring import score_output

    cfg = _cfg(tmp_path)
    _patch(monkeypatch, Oracle(gsm8k_records, mixed=True))
    s = ev.evaluate_model(cfg, object(), "gsm8k", tokenizer=FakeTokenizer(), limit=12,
                          model_slug="m", show_progress=False)
    assert SUMMARY_FIELDS <= set(s)
    rows = _rows(s["predictions"])
    for r in rows:
        assert all(isinstance(r[m], bool) for m in METRICS)
        so = score_output("gsm8k", r["raw_output"], r["target"], task=r["task"],
                          question=r["question"])
        assert {m: r[m] for m in METRICS} == {m: so[m] for m in METRICS}
        assert (r["extracted_strict"], r["extracted_flexible"]) == (
            so["extracted"]["strict"], so["extracted"]["flexible"])
        assert r["correct"] == r["lenient"] and r["extracted"] == so["extracted"]["lenient"]
    by = {r["id"]: r for r in rows}
    order = sorted(by)
    boxed = by[order[1]]  # right answer written as \boxed{N}: lm-eval strict misses it
    assert boxed["lenient"] and boxed["flexible"] and not boxed["strict"]
    assert boxed["strict_correct"]  # the lenient extractor's final-answer line accepts LaTeX
    bare = by[order[2]]  # no final-answer line: only the flexible extractions find the number
    assert bare["lenient"] and bare["flexible"] and not bare["strict"]
    assert not bare["strict_correct"] and bare["flexible_correct"]
    want = _recompute(rows, "gsm8k")
    for k, v in want.items():
        assert s[k] == pytest.approx(v), k
    assert s["accuracy"] == s["accuracy_lenient"] == pytest.approx(8 / 12)
    assert s["accuracy_strict"] < s["accuracy_lenient"]
    for m in METRICS:
        lo, hi = s[f"ci_{m}"]
        assert lo <= s[f"accuracy_{m}"] <= hi
    stored = json.loads((Path(s["predictions"]).parent / "summary.json").read_text())
    assert {k: stored[k] for k in want} == {k: s[k] for k in want}


def test_bbh_summary_three_metrics_per_task_macro_micro(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    recs = ev.evaluation_records(cfg, "bbh", limit=2)
    _patch(monkeypatch, Oracle(recs, mixed=True))
    s = ev.evaluate_model(cfg, object(), "bbh", tokenizer=FakeTokenizer(), limit=2,
                          model_slug="m", show_progress=False)
    rows = _rows(s["predictions"])
    capital = [r for r in rows if r["raw_output"].startswith("Reasoning.\nThe answer is")
               and r["lenient"]]
    assert capital and not any(r["strict"] for r in capital)  # lm-eval: lower-case "the" only
    want = _recompute(rows, "bbh")
    for m in METRICS:
        assert s[f"accuracy_{m}"] == pytest.approx(want[f"accuracy_{m}"])
        assert s[f"macro_accuracy_{m}"] == pytest.approx(want[f"macro_accuracy_{m}"])
        assert s[f"micro_accuracy_{m}"] == pytest.approx(want[f"micro_accuracy_{m}"])
        for t, acc in want[f"per_task_{m}"].items():
            assert s["per_task"][t][f"accuracy_{m}"] == pytest.approx(acc)
    assert s["macro_accuracy"] == s["macro_accuracy_lenient"]
    assert s["micro_accuracy"] == s["micro_accuracy_lenient"] == s["accuracy"]
    assert 0 < s["accuracy_strict"] < s["accuracy_lenient"]


def test_summarize_predictions_by_hand():
    """Unequal task sizes: macro != micro, per metric, against hand-computed values."""
    from slmkd.evaluation.predictions import summarize_predictions

    def row(i, task, strict, flexible, lenient):
        return {"id": f"i{i}", "task": task, "strict": strict, "flexible": flexible,
                "lenient": lenient, "correct": lenient, "extracted": "x",
                "strict_correct": lenient, "flexible_correct": lenient}

    rows = [row(0, "a", True, True, True), row(1, "a", False, True, True),
            row(2, "a", False, False, True), row(3, "a", False, False, False),
            row(4, "b", True, True, False)]
    s = summarize_predictions(rows, "bbh", n_resamples=200)
    assert (s["accuracy_strict"], s["accuracy_flexible"], s["accuracy_lenient"]) == (
        2 / 5, 3 / 5, 3 / 5)
    assert s["macro_accuracy_strict"] == pytest.approx((1 / 4 + 1) / 2)
    assert s["macro_accuracy_flexible"] == pytest.approx((2 / 4 + 1) / 2)
    assert s["macro_accuracy_lenient"] == pytest.approx((3 / 4 + 0) / 2) == s["macro_accuracy"]
    assert s["micro_accuracy_strict"] == pytest.approx(2 / 5)
    assert s["per_task"]["a"]["accuracy_flexible"] == 0.5 and s["per_task"]["b"]["n"] == 1
    assert s["rescored_rows"] == 0 and s["accuracy"] == s["accuracy_lenient"]
    # a row that has neither the metric nor an output to re-score it from: no such accuracy
    del rows[0]["strict"]
    s = summarize_predictions(rows, "bbh", n_resamples=200)
    assert s["accuracy_strict"] is None and s["macro_accuracy_strict"] is None
    assert s["accuracy_lenient"] == 3 / 5


def test_item_ids_hash_recorded_and_follows_the_subset(tmp_path, monkeypatch):
    import hashlib

    from slmkd.evaluation.predictions import item_ids_hash

    assert item_ids_hash(["b", "a"]) == hashlib.sha256(b"a\nb").hexdigest()
    assert item_ids_hash(["a", "b"]) == item_ids_hash(["b", "a"]) != item_ids_hash(["a"])
    cfg = _cfg(tmp_path)
    every = ev.evaluation_records(cfg, "gsm8k", limit=None)
    oracle = Oracle(every)
    _patch(monkeypatch, oracle)
    kw = dict(tokenizer=FakeTokenizer(), model_slug="m", show_progress=False)
    out = tmp_path / "drive" / "eval" / "m" / "gsm8k"

    def run(c, limit):
        s = ev.evaluate_model(c, object(), "gsm8k", limit=limit, **kw)
        meta = json.loads((out / "eval_meta.json").read_text())
        ids = [r.id for r in ev.evaluation_records(c, "gsm8k", limit=limit)]
        assert s["item_ids_hash"] == meta["item_ids_hash"] == item_ids_hash(ids)
        assert (meta["limit"], meta["subset_seed"], meta["dataset"]) == (
            limit, c.evaluation.subset_seed, "gsm8k")
        assert (s["limit"], s["subset_seed"], meta["n_items"]) == (
            limit, c.evaluation.subset_seed, len(ids))
        return s["item_ids_hash"]

    h6 = run(cfg, 6)
    assert run(cfg, 6) == h6  # same subset, same hash
    oracle.generated.clear()
    h12 = run(cfg, 12)  # a larger subset in the same folder: stored rows reused
    assert h12 != h6 and len(oracle.generated) == 6
    other = _cfg(tmp_path, **{"evaluation.subset_seed": 99})
    assert run(other, 6) != h6  # another subset seed: other items, another hash
    explicit = ev.evaluation_records(cfg, "gsm8k", limit=6)
    s = ev.evaluate_model(cfg, object(), "gsm8k", records=explicit, **kw)
    assert s["item_ids_hash"] == h6
    assert json.loads((out / "eval_meta.json").read_text())["subset_source"] == "records"


def _make_old_format(folder):
    """Turn a folder into what an earlier slmkd version wrote: rows without the lm-eval metrics
    (and, for a LaTeX answer, the lenient verdict of the old extractor), meta without the new
    keys, summary without the new accuracies."""
    rows = _rows(folder / "predictions.jsonl")
    latex = None
    for r in rows:
        for k in NEW_ROW_KEYS:
            del r[k]
        if "\\boxed" in r["raw_output"] and r["correct"]:
            latex = r["id"]
            r["strict_correct"] = False  # the old extractor missed "The answer is \boxed{N}."
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = json.loads((folder / "eval_meta.json").read_text())
    old_keys = ("model", "model_name", "dataset", "method", "max_new_tokens", "cascaded",
                "answer_cue", "final_answer_prefix")
    (folder / "eval_meta.json").write_text(json.dumps({k: meta[k] for k in old_keys}))
    summary = json.loads((folder / "summary.json").read_text())
    for k in list(summary):
        if k.startswith(("accuracy_", "ci_strict", "ci_flexible", "ci_lenient")) or k in (
                "item_ids_hash", "rescored_rows", "system_prompt"):
            del summary[k]
    (folder / "summary.json").write_text(json.dumps(summary))
    return rows, latex


def test_old_format_predictions_are_rescored_not_regenerated(tmp_path, monkeypatch,
                                                            gsm8k_records):
    from slmkd.evaluation.predictions import summarize_predictions

    cfg = _cfg(tmp_path)
    oracle = Oracle(gsm8k_records, mixed=True)
    _patch(monkeypatch, oracle)
    kw = dict(tokenizer=FakeTokenizer(), limit=12, model_slug="m", show_progress=False)
    fresh = ev.evaluate_model(cfg, object(), "gsm8k", **kw)
    assert oracle.calls == 3 and len(oracle.generated) == 12  # three batches of 4
    folder = Path(fresh["predictions"]).parent
    old_rows, latex = _make_old_format(folder)
    assert latex is not None
    # in memory: summarize_predictions re-scores rows without the new keys
    mem = summarize_predictions(old_rows, "gsm8k")
    assert mem["rescored_rows"] == 12
    for m in METRICS:
        assert mem[f"accuracy_{m}"] == pytest.approx(fresh[f"accuracy_{m}"])
    # a rerun: nothing generated, the rows re-scored from raw_output and stored again
    oracle.calls, oracle.generated = 0, []
    s = ev.evaluate_model(cfg, object(), "gsm8k", **kw)
    assert oracle.calls == 0 and oracle.generated == [] and s["generated_now"] == 0
    assert s["rescored_rows"] == 12
    rows = _rows(folder / "predictions.jsonl")
    assert len(rows) == 12 and all(ROW_FIELDS <= set(r) for r in rows)
    assert next(r for r in rows if r["id"] == latex)["strict_correct"]  # re-scored
    for k in ("accuracy", "accuracy_strict", "accuracy_flexible", "accuracy_lenient",
              "strict_accuracy", "flexible_accuracy", "item_ids_hash"):
        assert s[k] == fresh[k], k
    meta = json.loads((folder / "eval_meta.json").read_text())
    assert meta["item_ids_hash"] == s["item_ids_hash"] and "system_prompt" in meta
    # a third run has nothing left to re-score
    assert ev.evaluate_model(cfg, object(), "gsm8k", **kw)["rescored_rows"] == 0


def test_rescore_eval_dir_without_a_model(tmp_path, monkeypatch, gsm8k_records):
    from slmkd.evaluation.predictions import rescore_eval_dir

    cfg = _cfg(tmp_path)
    _patch(monkeypatch, Oracle(gsm8k_records, mixed=True))
    fresh = ev.evaluate_model(cfg, object(), "gsm8k", tokenizer=FakeTokenizer(), limit=12,
                              model_slug="m", student="x", show_progress=False)
    folder = Path(fresh["predictions"]).parent
    _make_old_format(folder)
    s = rescore_eval_dir(folder)
    assert s["rescored_rows"] == 12 and s["student"] == "x" and s["model"] == "m"
    for k in ("accuracy_strict", "accuracy_flexible", "accuracy_lenient", "item_ids_hash"):
        assert s[k] == fresh[k]
    assert json.loads((folder / "summary.json").read_text())["accuracy_strict"] == s["accuracy_strict"]
    assert all("strict" in r for r in _rows(folder / "predictions.jsonl"))
    # rows of other items than the summary's: refused
    with (folder / "predictions.jsonl").open("a") as f:
        f.write(json.dumps({"id": "extra", "raw_output": "1", "target": "1",
                            "dataset": "gsm8k"}) + "\n")
    with pytest.raises(ValueError, match="rerun the evaluation"):
        rescore_eval_dir(folder)


class QwenLikeTokenizer:
    """A chat template that adds a default system turn unless the messages bring one."""

    def __init__(self, default="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."):
        self.default = default

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        out = ""
        if messages[0]["role"] != "system" and self.default is not None:
            out += f"<|im_start|>system\n{self.default}<|im_end|>\n"
        for m in messages:
            out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        return out + "<|im_start|>assistant\n"


def test_chat_system_prompt():
    from slmkd.evaluation.evaluate import chat_system_prompt

    assert chat_system_prompt(QwenLikeTokenizer(), "Q?") == QwenLikeTokenizer().default
    assert chat_system_prompt(QwenLikeTokenizer(default=None), "Q?") is None
    assert chat_system_prompt(FakeTokenizer(), "Q?") is None  # ignores system turns

    class Raises:
        def apply_chat_template(self, messages, **kw):
            if messages[0]["role"] == "system":
                raise ValueError("System role not supported")
            return "<bos><start_of_turn>user\n" + messages[0]["content"]

    assert chat_system_prompt(Raises(), "Q?") is None


def test_system_prompt_recorded_in_eval_meta(tmp_path, monkeypatch, gsm8k_records):
    cfg = _cfg(tmp_path)
    _patch(monkeypatch, Oracle(gsm8k_records))
    kw = dict(limit=4, model_slug="m", show_progress=False)
    s = ev.evaluate_model(cfg, object(), "gsm8k", tokenizer=QwenLikeTokenizer(), **kw)
    meta = json.loads((Path(s["predictions"]).parent / "eval_meta.json").read_text())
    assert meta["system_prompt"] == s["system_prompt"] == QwenLikeTokenizer().default
    assert meta["system_prompt_rendered"]
    # another system prompt changes the generations: refused like any other setting
    with pytest.raises(ValueError, match="system_prompt"):
        ev.evaluate_model(cfg, object(), "gsm8k", tokenizer=QwenLikeTokenizer("Be brief."), **kw)
    s = ev.evaluate_model(cfg, object(), "gsm8k", tokenizer=FakeTokenizer(), force=True, **kw)
    assert s["system_prompt"] is None


@pytest.mark.parametrize("which", ["run", "model"])
def test_a_model_is_loaded_once_for_all_datasets_and_not_at_all_when_stored(tmp_path, monkeypatch,
                                                                          which):
    """evaluate_run / evaluate_on_datasets on GSM8K and BBH: one load, one engine closed at the
    end; a rerun with every prediction stored loads nothing."""
    import slmkd.modeling
    from slmkd.generation import engines

    cfg = _cfg(tmp_path)
    recs = ev.evaluation_records(cfg, "gsm8k", limit=12) + ev.evaluation_records(cfg, "bbh",
                                                                                limit=12)
    _patch(monkeypatch, Oracle(recs))
    loaded, closed = [], []
    monkeypatch.setattr(slmkd.modeling, "load_tokenizer",
                        lambda n, c, padding_side="right": FakeTokenizer())
    monkeypatch.setattr(slmkd.modeling, "load_causal_lm",
                        lambda n, c, **kw: loaded.append(n) or object())
    real_close = engines.HFEngine.close
    monkeypatch.setattr(engines.HFEngine, "close", lambda self: closed.append(1) or
                        real_close(self))

    def evaluate():
        if which == "run":
            return ev.evaluate_run(cfg, run, datasets=["gsm8k", "bbh"], limit=12,
                                   show_progress=False)
        return ev.evaluate_on_datasets(cfg, "some/base-model", ["gsm8k", "bbh"], kind="base",
                                       limit=12, show_progress=False)

    run = _fake_run(tmp_path)
    out = evaluate()
    assert set(out) == {"gsm8k", "bbh"} and out["gsm8k"]["n"] == 12 and out["bbh"]["n"] > 0
    assert len(loaded) == 1 and closed == [1]
    assert out["bbh"]["model_name"] == out["gsm8k"]["model_name"] == loaded[0]
    again = evaluate()
    assert len(loaded) == 1 and again["bbh"]["accuracy"] == out["bbh"]["accuracy"]
