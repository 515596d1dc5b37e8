"""Tests for CasCoD (slmkd.data.cot_format, slmkd.training.cascod, slmkd.generation.cascade): splitting, example masks, joint loss, cascaded inference, training."""

from __future__ import annotations

import pytest

from slmkd.data.cot_format import (
    SplitCoT,
    answer_target,
    join_rationale_cue,
    split_cot,
    split_rationale_answer,
)
from slmkd.training.cascod import (
    DEFAULT_ALPHA_CASCOD,
    build_answer_example,
    build_cascod_dataset,
    build_rationale_example,
)

# -- splitting ----------------------------------------------------------------------------------


def test_default_alpha_is_authors_value():
    from slmkd.config import CasCoDConfig

    assert DEFAULT_ALPHA_CASCOD == 0.1 == CasCoDConfig().alpha_cascod


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("3 + 4 = 7.\n7 * 2 = 14.\nThe answer is 14.", ("3 + 4 = 7.\n7 * 2 = 14.", "14")),
        ("She pays 2.5 each.\nThe answer is 3.5.", ("She pays 2.5 each.", "3.5")),
        ("Step one.\nThe answer is -12", ("Step one.", "-12")),
        ("Step one.\nthe answer is 1,000.  \n", ("Step one.", "1,000")),
        # BBH CoTs: the marker follows the last sentence on the same line, after "So".
        ("Sentence is about a dog. The options say (A). So the answer is (A).",
         ("Sentence is about a dog. The options say (A).", "(A)")),
        ("True and False is False. So, the answer is False.",
         ("True and False is False.", "False")),
        ("Therefore, the answer is Yes.", None),  # nothing before the marker: empty rationale
    ],
)
def test_split_clean(completion, expected):
    assert split_rationale_answer(completion) == expected


@pytest.mark.parametrize(
    ("completion", "reason"),
    [
        ("3 + 4 = 7 so we get 7.", "marker_missing"),
        ("The answer is 7.\nWait.\nThe answer is 8.", "marker_repeated"),
        ("I think the answer is 7 but let me check. 3+4=7. So the answer is 7.", "marker_repeated"),
        ("3 + 4 = 7.\nThe answer is .", "empty_answer"),
        ("3 + 4 = 7.\nThe answer is", "empty_answer"),
        ("3 + 4 = 7.\nThe answer is 7.\nI hope this helps!", "text_after_answer"),
        ("The answer is 7.", "empty_rationale"),
        (None, "not_text"),
    ],
)
def test_split_dropped_with_reason(completion, reason):
    assert split_cot(completion) == reason
    assert split_rationale_answer(completion) is None


def test_marker_not_matched_inside_words():
    # "Also the answer is" must not strip "Al" + "so" as a connective.
    res = split_cot("Also the answer is 5.")
    assert isinstance(res, SplitCoT) and res.rationale == "Also" and res.answer == "5"


def test_cue_and_target_reassemble_the_cot():
    cot = "3 + 4 = 7.\n7 * 2 = 14.\nThe answer is 14."
    r, a = split_rationale_answer(cot)
    assert join_rationale_cue(r, "The answer is") + answer_target(a) == cot


# -- examples and label masks --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from slmkd.tiny import train_tokenizer

    texts = ["Solve the problem step by step. The answer is 14.", "Question: what is 3 + 4 * 2?",
             "You are a helpful assistant.", "3 + 4 = 7.\n7 * 2 = 14.\n"] * 20
    return train_tokenizer(texts, vocab_size=300)


def _prompt(tok, question="What is 3 + 4, times 2?"):
    from slmkd.data import Record, build_prompt

    return build_prompt(tok, Record("x", "gsm8k", None, "train", question, "14"))


def _supervised(ex):
    return [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != -100]


def test_rationale_example_mask(tok):
    prompt = _prompt(tok)
    r = "3 + 4 = 7.\n7 * 2 = 14."
    ex = build_rationale_example(tok, prompt, r, max_length=512, min_supervised_tokens=1)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(r, add_special_tokens=False)["input_ids"]
    assert ex.input_ids == p_ids + r_ids + [tok.eos_token_id]
    assert ex.labels == [-100] * len(p_ids) + r_ids + [tok.eos_token_id]
    # the supervised text is exactly the rationale + EOS: no answer, no cue
    assert tok.decode(_supervised(ex)[:-1]) == r
    assert "answer" not in tok.decode(_supervised(ex)).lower()


def test_answer_example_mask(tok):
    prompt = _prompt(tok)
    r = "3 + 4 = 7.\n7 * 2 = 14."
    ex = build_answer_example(tok, prompt, r, "14", max_length=512, answer_cue="The answer is")
    ctx = prompt + r + "\nThe answer is"
    c_ids = tok(ctx, add_special_tokens=False)["input_ids"]
    a_ids = tok(" 14.", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == c_ids + a_ids + [tok.eos_token_id]
    assert ex.labels == [-100] * len(c_ids) + a_ids + [tok.eos_token_id]
    assert tok.decode(_supervised(ex)[:-1]) == " 14."
    # the rationale and cue are context only
    assert tok.decode(ex.input_ids[: len(c_ids)]).endswith("14.\nThe answer is")
    # answers are short: the run-wide minimum for CoTs does not apply to them
    assert ex.num_supervised == len(a_ids) + 1 < 8


def test_build_dataset_counts_drops(tok):
    recs = [
        {"id": "a", "dataset": "gsm8k", "task": None, "question": "What is 3 + 4?",
         "completion": "3 + 4 = 7.\nThe answer is 7."},
        {"id": "b", "dataset": "gsm8k", "task": None, "question": "What is 1 + 1?",
         "completion": "1 + 1 = 2."},  # marker missing
        {"id": "c", "dataset": "gsm8k", "task": None, "question": "What is 1 + 2?",
         "completion": "The answer is 3.\n1 + 2 = 3.\nThe answer is 3."},  # twice
        {"id": "d", "dataset": "gsm8k", "task": None, "question": "What is 2 + 2?",
         "completion": "2 + 2 = 4.\nThe answer is ."},  # empty answer
        {"id": "e", "dataset": "gsm8k", "task": None, "question": "What is 2 + 3?",
         "completion": "5.\nThe answer is 5."},  # rationale below min_supervised_tokens
    ]
    ds, stats = build_cascod_dataset(tok, recs, max_length=512, min_supervised_tokens=4)
    assert len(ds) == stats.kept == 1 and stats.total == 5
    assert dict(stats.dropped) == {"split:marker_missing": 1, "split:marker_repeated": 1,
                                   "split:empty_answer": 1,
                                   "rationale:too_few_supervised_tokens": 1}
    item = ds[0]
    assert item["example_id"] == "a"
    assert set(item) == {"example_id", "rationale_input_ids", "rationale_labels",
                         "answer_input_ids", "answer_labels"}
    assert set(ds.with_kind("answer")[0]) == {"example_id", "input_ids", "labels"}
    assert ds.with_kind("answer")[0]["input_ids"] == item["answer_input_ids"]
    assert ds.with_kind("rationale")[0]["labels"] == item["rationale_labels"]
    assert stats.rationale_tokens == sum(t != -100 for t in item["rationale_labels"])
    assert stats.answer_tokens == sum(t != -100 for t in item["answer_labels"])
    # a budget that fits q + r but not q + r + cue + a: only the answer prompt loses tokens
    n_r = len(item["rationale_input_ids"])
    _, st2 = build_cascod_dataset(tok, recs[:1], max_length=n_r, min_supervised_tokens=4)
    assert st2.kept == 1 and st2.rationale_prompt_truncated == 0
    assert st2.answer_prompt_truncated == 1 and st2.prompt_tokens_dropped > 0
    assert st2.to_dict()["num_dropped"] == 0


def test_collator_pads_both_kinds_to_one_width(tok):
    from slmkd.training.cascod import CasCoDCollator

    recs = [{"id": str(i), "dataset": "gsm8k", "task": None, "question": f"What is {i} + 4?",
             "completion": f"{i} + 4 = {i + 4}." + " ok." * i + f"\nThe answer is {i + 4}."}
            for i in range(3)]
    ds, _ = build_cascod_dataset(tok, recs, max_length=512, min_supervised_tokens=1)
    batch = CasCoDCollator(pad_token_id=tok.pad_token_id)([ds[i] for i in range(3)])
    n = batch["input_ids"].shape[0]
    assert n == 6 and int(batch["num_rationale_rows"]) == 3
    assert batch["answer_row_mask"].tolist() == [False] * 3 + [True] * 3
    assert batch["example_id"] == ["0", "1", "2"]
    for row, item in enumerate([ds[i] for i in range(3)]):
        for off, key in ((0, "rationale"), (3, "answer")):
            ids = item[f"{key}_input_ids"]
            k = len(ids)
            assert batch["input_ids"][row + off, :k].tolist() == ids
            assert batch["labels"][row + off, :k].tolist() == item[f"{key}_labels"]
            assert batch["attention_mask"][row + off].sum().item() == k
            assert (batch["labels"][row + off, k:] == -100).all()
            assert (batch["input_ids"][row + off, k:] == tok.pad_token_id).all()


# -- joint loss ----------------------------------------------------------------------------------
def _direct_ce_sum(logits, labels):
    """Σ over supervised positions of -log softmax(logits_t)[labels_{t+1}], and the count."""
    import torch.nn.functional as F

    lg, lab = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    return F.cross_entropy(lg.float(), lab, ignore_index=-100, reduction="sum"), lab.ne(-100).sum()


def test_joint_loss_matches_direct_computation(tok):
    import torch
    from _tiny_lm import make_model

    from slmkd.training.cascod import CasCoDCollator, cascod_joint_loss

    recs = [{"id": str(i), "dataset": "gsm8k", "task": None, "question": f"What is {i} + 4?",
             "completion": f"{i} + 4 = {i + 4}." + " ok." * i + f"\nThe answer is {i + 4}."}
            for i in range(3)]
    ds, _ = build_cascod_dataset(tok, recs, max_length=512, min_supervised_tokens=1)
    batch = CasCoDCollator(pad_token_id=tok.pad_token_id)([ds[i] for i in range(3)])
    model = make_model(tok, seed=3)
    model.eval()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = model(input_ids=ids, attention_mask=mask).logits
    w = model.get_output_embeddings().weight
    v = len(tok)
    alpha = 0.3
    out = cascod_joint_loss(hidden, w, labels, 3, alpha_cascod=alpha, vocab_size=v,
                            max_logit_abs=1e4, chunk_size=7)
    sr, nr = _direct_ce_sum(logits[:3, :, :v], labels[:3])
    sa, na = _direct_ce_sum(logits[3:, :, :v], labels[3:])
    expected = (1 - alpha) * sr / nr + alpha * sa / na
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rationale_ce, sr / nr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.answer_ce, sa / na, rtol=1e-5, atol=1e-5)
    assert int(out.rationale_tokens) == int(nr) and int(out.answer_tokens) == int(na)
    # step-level normalisation: the counts of the whole optimiser step divide each term's sum
    out2 = cascod_joint_loss(hidden, w, labels, 3, alpha_cascod=alpha, vocab_size=v,
                             max_logit_abs=1e4, num_rationale_tokens=2 * nr,
                             num_answer_tokens=4 * na)
    torch.testing.assert_close(out2.loss, (1 - alpha) * sr / (2 * nr) + alpha * sa / (4 * na),
                               rtol=1e-5, atol=1e-5)
    # α_c = 0 ignores the answer rows entirely; α_c = 1 the rationale rows
    o0 = cascod_joint_loss(hidden, w, labels, 3, alpha_cascod=0.0, vocab_size=v, max_logit_abs=1e4)
    torch.testing.assert_close(o0.loss, sr / nr, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        cascod_joint_loss(hidden[:5], w, labels[:5], 3, vocab_size=v)


def test_joint_loss_kd_term_on_rationale_rows(tok):
    import torch
    import torch.nn.functional as F
    from _tiny_lm import make_model

    from slmkd.training.cascod import CasCoDCollator, cascod_joint_loss

    recs = [{"id": str(i), "dataset": "gsm8k", "task": None, "question": f"What is {i} + 5?",
             "completion": f"{i} + 5 = {i + 5}.\nThe answer is {i + 5}."} for i in range(2)]
    ds, _ = build_cascod_dataset(tok, recs, max_length=512, min_supervised_tokens=1)
    batch = CasCoDCollator(pad_token_id=tok.pad_token_id)([ds[i] for i in range(2)])
    student, teacher = make_model(tok, seed=1), make_model(tok, seed=2, hidden=48)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        hs = student.model(input_ids=ids, attention_mask=mask).last_hidden_state
        ls = student(input_ids=ids, attention_mask=mask).logits
        ht = teacher.model(input_ids=ids[:2], attention_mask=mask[:2]).last_hidden_state
        lt = teacher(input_ids=ids[:2], attention_mask=mask[:2]).logits
    v, t, a, ac = len(tok), 2.0, 0.5, 0.1
    out = cascod_joint_loss(hs, student.get_output_embeddings().weight, labels, 2,
                            alpha_cascod=ac, teacher_hidden=ht,
                            teacher_weight=teacher.get_output_embeddings().weight,
                            temperature=t, kd_alpha=a, vocab_size=v, max_logit_abs=1e4)
    sel = labels[:2, 1:].ne(-100)
    s_log = F.log_softmax(ls[:2, :-1, :v][sel] / t, -1)
    t_log = F.log_softmax(lt[:, :-1, :v][sel] / t, -1)
    kl = (t_log.exp() * (t_log - s_log)).sum() / sel.sum()
    sr, nr = _direct_ce_sum(ls[:2, :, :v], labels[:2])
    sa, na = _direct_ce_sum(ls[2:, :, :v], labels[2:])
    expected = (1 - ac) * ((1 - a) * sr / nr + a * t * t * kl) + ac * sa / na
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-5)


# -- cascaded inference --------------------------------------------------------------------------
def test_cascaded_generate_appends_cue_then_answers(tok):
    from _tiny_lm import make_model

    from slmkd.generation import cascaded_generate
    from slmkd.generation import generate_batched

    model = make_model(tok, seed=5)
    prompts = [_prompt(tok, "What is 3 + 4?"), _prompt(tok, "What is 10 + 4 + 5?")]
    outs = cascaded_generate(model, tok, prompts, answer_cue="The answer is",
                             max_new_tokens_rationale=12, max_new_tokens_answer=5, batch_size=2,
                             show_progress=False)
    step1 = generate_batched(model, tok, prompts, max_new_tokens=12, batch_size=2,
                             show_progress=False)
    step2 = generate_batched(model, tok, [p + o.text.strip() + "\nThe answer is"
                                          for p, o in zip(prompts, step1, strict=True)],
                             max_new_tokens=5, batch_size=2, show_progress=False)
    for o, r, a in zip(outs, step1, step2, strict=True):
        assert o["rationale"] == r.text.strip()
        assert o["answer_text"] == a.text
        assert o["full_text"] == r.text.strip() + "\nThe answer is" + a.text
        assert o["num_new_tokens"] == r.num_new_tokens + a.num_new_tokens
        assert o["rationale_hit_max"] == r.hit_max_new_tokens


def test_error_propagation_counts(tok, monkeypatch):
    """A scripted student: its own rationale is wrong for the second question; it always reads
    the answer off whatever rationale it is given (the last number before the cue)."""
    import re

    import slmkd.generation.cascade as gen
    from slmkd.evaluation import error_propagation
    from slmkd.generation import GenerationOutput

    own = {"What is 3 + 4?": "3 + 4 = 7.", "What is 5 + 5?": "5 + 5 = 11."}

    def fake(model, tokenizer, prompts, *, max_new_tokens, batch_size, desc=None,
             show_progress=True):
        out = []
        for p in prompts:
            if p.endswith("The answer is"):
                last = re.findall(r"\d+", p.rsplit("\nThe answer is", 1)[0])[-1]
                out.append(GenerationOutput(f" {last}.", 3, False))
            else:
                q = next(q for q in own if q in p)
                out.append(GenerationOutput(own[q], 8, False))
        return out

    monkeypatch.setattr(gen, "generate_batched", fake)
    recs = [
        {"id": "1", "dataset": "gsm8k", "question": "What is 3 + 4?", "gold": "7",
         "completion": "3 + 4 = 7.\nThe answer is 7."},
        {"id": "2", "dataset": "gsm8k", "question": "What is 5 + 5?", "target": "10",
         "raw_output": "5 + 5 = 10.\nThe answer is 10."},
        {"id": "3", "dataset": "gsm8k", "question": "What is 5 + 5?", "gold": "10",
         "completion": "no marker here"},
    ]
    res = error_propagation(None, tok, recs, max_new_tokens_rationale=16, batch_size=4,
                            show_progress=False)
    assert res["n"] == 2 and res["skipped"] == {"split:marker_missing": 1}
    assert res["acc_teacher_rationale"] == 1.0 and res["acc_own_rationale"] == 0.5
    assert res["propagation_gap"] == 0.5
    assert (res["both_correct"], res["only_teacher_rationale"], res["only_own_rationale"],
            res["neither"]) == (1, 1, 0, 0)
    assert res["rows"][1]["own_rationale_pred"] == "11"


# -- trainer registry ----------------------------------------------------------------------------
def test_methods_registered_with_the_trainer():
    pytest.importorskip("torch")
    from slmkd import training as T

    assert {"cascod", "cascod-2stage", "cascod-kd"} <= set(T.registered_methods())
    joint, kd, two = (T.get_method(m) for m in ("cascod", "cascod-kd", "cascod-2stage"))
    assert not joint.needs_teacher and kd.needs_teacher and not two.needs_teacher
    assert two.stages == ("cascod-stage1", "cascod-stage2")
    assert "cascod" in joint.config_sections and "kd" in kd.config_sections
    assert "kd" not in joint.config_sections  # KD schedules do not change a cascod run


# -- training end to end (tiny world of tests/_train_world.py) -----------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("slmkd.losses")
    from _train_world import build_world

    torch.set_num_threads(1)
    return build_world(tmp_path_factory.mktemp("cascodworld"), n_records=48)


def _cfg(world, **extra):
    from _train_world import make_cfg

    return make_cfg(world, **extra)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _cli_cascod(world, run_dir, env_extra):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from _train_world import overrides

    repo = Path(__file__).resolve().parents[1]
    cfg_file = run_dir.parent / "cfg.json"
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(json.dumps(overrides(world)))
    pp = os.pathsep.join(x for x in (str(repo), os.environ.get("PYTHONPATH", "")) if x)
    env = {**os.environ, "PYTHONPATH": pp, "OMP_NUM_THREADS": "1", **env_extra}
    for k in [k for k in env if k.startswith("SLM_KD_")]:
        env.pop(k)
    cmd = [sys.executable, "-c", "import torch,sys; torch.set_num_threads(1); "
           "from slmkd.training import main; sys.exit(main())",
           "train", "--method", "cascod", "--student", "student_small", "--seed", "3",
           "--profile", "tiny", "--config", str(cfg_file), "--run-dir", str(run_dir),
           "--max-steps", "6", "--save-steps", "2"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cascod_train_and_kill9_resume_is_bit_identical(world, tmp_path):
    import torch

    from slmkd.training.monitor import read_log
    from slmkd.training import FAULT_KILL_ENV, train

    # uninterrupted reference, in process (also the end-to-end check of `cascod`)
    ref = train(_cfg(world), "cascod", "student_small", 3, run_dir=tmp_path / "ref",
                max_steps=6, save_steps=2)
    s = ref.summary
    assert s["method"] == "cascod" and s["steps"] == 6 and s["skipped_batches"] == 0
    assert s["data"]["kept"] == 48 and s["final_model_dir"] == "final"
    log = read_log(tmp_path / "ref" / "log.jsonl")
    assert all(e["loss"] > 0 for e in log if "loss" in e)
    init = _weights(world / "models" / "kdtest-student")
    w_ref = _weights(ref.final_dir)
    assert any(not torch.equal(init[k], w_ref[k]) for k in init)

    # killed with SIGKILL at the end of step 5 (checkpoint-4 on "Drive"), then resumed
    run = tmp_path / "killed"
    killed = _cli_cascod(world, run, {FAULT_KILL_ENV: "5"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (run / "train_summary.json").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "checkpoint-4"
    res = train(_cfg(world), "cascod", "student_small", 3, run_dir=run, max_steps=6,
                save_steps=2)
    assert res.summary["resumed_from"].endswith("checkpoint-4")
    w = _weights(res.final_dir)
    assert w.keys() == w_ref.keys()
    for k in w:
        assert torch.equal(w[k], w_ref[k]), k
    steps = [e["step"] for e in read_log(run / "log.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_cascod_kd_end_to_end(world, tmp_path):
    from slmkd.training import train

    res = train(_cfg(world), "cascod-kd", "student_small", 0, run_dir=tmp_path / "r",
                max_steps=2)
    s = res.summary
    assert s["method"] == "cascod-kd" and s["steps"] == 2 and s["teacher"]
    assert s["final_kd"] is not None and s["final_kd"] > 0
    assert (res.final_dir / "model.safetensors").is_file()


def test_cascod_2stage_end_to_end(world, tmp_path):
    import json

    import torch

    from slmkd.training import is_run_complete, train

    run = tmp_path / "two"
    res = train(_cfg(world), "cascod-2stage", "student_small", 0, run_dir=run, max_steps=2)
    s = res.summary
    assert s["method"] == "cascod-2stage" and s["final_model_dir"] == "stage2/final"
    assert res.final_dir == run / "stage2" / "final" and is_run_complete(run)
    assert [st["method"] for st in s["stages"]] == ["cascod-stage1", "cascod-stage2"]
    for i in (1, 2):
        assert is_run_complete(run / f"stage{i}")
    # stage 2 starts from stage 1's final weights and trains further
    ident = json.loads((run / "stage2" / "run.json").read_text())["identity"]
    assert ident["init_model"] == str(run / "stage1" / "final")
    w1, w2 = _weights(run / "stage1" / "final"), _weights(run / "stage2" / "final")
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    # rerunning a complete run does nothing
    again = train(_cfg(world), "cascod-2stage", "student_small", 0, run_dir=run, max_steps=2)
    assert again.summary["steps"] == s["steps"] == 4
