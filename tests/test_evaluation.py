"""Batched evaluation: predictions, summaries, resume, subsets, CasCoD routing, leakage guard."""

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
              "strict_correct", "flexible_correct"}
SUMMARY_FIELDS = {"model", "kind", "method", "student", "seed", "dataset", "n", "accuracy",
                  "strict_accuracy", "flexible_accuracy", "ci_low", "ci_high", "per_task"}


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
    stands in for slmkd.generation.iter_generate_batched / slmkd.generation.cascaded_generate."""

    def __init__(self, records, fail_after=None):
        self.by_q = {r.question: r for r in records}
        self.order = {r.id: i for i, r in enumerate(sorted(records, key=lambda r: r.id))}
        self.calls = 0
        self.generated: list[str] = []
        self.fail_after = fail_after

    def answer(self, prompt):
        rec = next(r for q, r in self.by_q.items() if q in prompt)
        self.generated.append(rec.id)
        ok = self.order[rec.id] % 3 != 0
        if rec.dataset == "gsm8k":
            return f"Some steps.\nThe answer is {rec.answer if ok else '-999'}."
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
    assert len(rows) == 12 and ROW_FIELDS <= set(rows[0])
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


def test_cli_parser():
    parser = argparse.ArgumentParser()
    cli.add_evaluate_command(parser.add_subparsers(dest="cmd"))
    a = parser.parse_args(["evaluate", "--run-dir", "R", "--dataset", "bbh", "--limit", "5"])
    assert (a.run_dir, a.dataset, a.limit, a.model) == ("R", "bbh", 5, None)
    assert a.func is cli._evaluate_command
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--run-dir", "R", "--model", "M"])
