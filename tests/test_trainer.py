"""Trainer: tiny sft/kd runs, guards, accumulation equivalence, resume identity, config refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("slmkd.losses")

from _train_world import STUDENT, build_world, make_cfg, overrides  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from slmkd import training as T  # noqa: E402
from slmkd.cli import main as cli_main  # noqa: E402
from slmkd.training import trainer as TR  # noqa: E402
from slmkd.training.data import ExampleDataset  # noqa: E402
from slmkd.training.monitor import read_log  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    return build_world(tmp_path_factory.mktemp("kdworld"))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def _init_weights(world: Path) -> dict[str, torch.Tensor]:
    return load_file(str(world / "models" / STUDENT / "model.safetensors"))


@pytest.mark.parametrize("method", ["sft", "kd"])
def test_tiny_run_loss_falls_and_writes_run_dir(world, tmp_path, method):
    cfg = make_cfg(world, **{"train.max_steps": 16, "train.save_steps": 8})
    res = T.train(cfg, method, "student_small", 7, run_dir=tmp_path / "run")
    run = res.run_dir
    log = read_log(run / "log.jsonl")
    assert [e["step"] for e in log] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], [e["loss"] for e in log]
    for e in log:
        assert e["learning_rate"] == pytest.approx(3e-3)  # constant schedule, no skipped step
        assert e["temperature"] == 2.0 and e["alpha"] == 0.5 and e["skipped_batches"] == 0
        assert 0 < e["grad_norm"] < 1e3 and e["tokens_per_s"] > 0 and e["ce"] > 0
        assert e["epoch"] == pytest.approx(e["step"] / 8)  # 64 examples / batch 8
    s = json.loads((run / "train_summary.json").read_text())
    assert s["steps"] == 16 and s["skipped_batches"] == 0 and s["method"] == method
    assert s["seed"] == 7 and s["skipped_fraction"] == 0.0 and s["skipped_reasons"] == {}
    assert s["final_loss"] == pytest.approx(log[-1]["loss"])
    assert s["final_ce"] == pytest.approx(log[-1]["ce"]) and s["wall_time_s"] > 0
    if method == "kd":
        assert s["final_kd"] == pytest.approx(log[-1]["kd"]) and log[-1]["kd"] > 0
        assert s["teacher"] == cfg.teacher
    else:
        assert s["teacher"] is None and s["final_kd"] is None
        assert log[-1]["loss"] == pytest.approx(log[-1]["ce"], rel=1e-5)  # α = 0: loss is CE
    final = _weights(run)
    init = _init_weights(world)
    assert final.keys() == init.keys()
    assert any(not torch.equal(final[k], init[k]) for k in final)
    assert (run / "final" / "config.json").is_file()
    assert (run / "final" / "tokenizer_config.json").is_file()
    assert (run / "config.json").is_file()
    assert (run / "plots" / "loss.png").stat().st_size > 0
    # complete: final/ verified on Drive, so the run's checkpoints are gone
    from slmkd.training.checkpoint import list_checkpoints

    assert list_checkpoints(run / "checkpoints") == []
    assert T.is_run_complete(run)
    # rerunning a complete run does nothing
    again = T.train(cfg, method, "student_small", 7, run_dir=run)
    assert again.summary["wall_time_s"] == s["wall_time_s"]


def test_logged_kd_loss_equals_a_naive_full_logit_recomputation(world, tmp_path, monkeypatch):
    """The first logged loss/ce/kd of a KD run (T = 3, α = 0.3) equal (1-α)·CE + α·T²·KL computed
    here from full logits of the initial student and the teacher on the same batch (shift,
    vocabulary cut at len(tokenizer), token mean): an independent check of the trainer's path."""
    from _train_world import TEACHER
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []
    orig = T.DistillationTrainer.compute_loss

    def compute_loss(self, model, inputs, *a, **kw):
        if self.state.global_step == 0:
            seen.append({k: inputs[k].clone() for k in ("input_ids", "attention_mask", "labels")})
        return orig(self, model, inputs, *a, **kw)

    monkeypatch.setattr(T.DistillationTrainer, "compute_loss", compute_loss)
    temp, alpha = 3.0, 0.3
    cfg = make_cfg(world, **{"train.max_steps": 1, "train.log_every": 1,
                             "kd.temperature_schedule": [temp], "kd.alpha_schedule": [alpha]})
    res = T.train(cfg, "kd", "student_small", 1, run_dir=tmp_path / "run")
    (entry,) = read_log(res.run_dir / "log.jsonl")
    (batch,) = seen
    v = len(AutoTokenizer.from_pretrained(str(world / "models" / STUDENT)))
    student = AutoModelForCausalLM.from_pretrained(str(world / "models" / STUDENT)).double()
    teacher = AutoModelForCausalLM.from_pretrained(str(world / "models" / TEACHER)).double()
    with torch.no_grad():
        zs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        zt = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    y = batch["labels"][:, 1:]
    sup = y != -100
    zs, zt, y = zs[:, :-1][sup][:, :v], zt[:, :-1][sup][:, :v], y[sup]
    ce = torch.nn.functional.cross_entropy(zs, y)
    ls, lt = (zs / temp).log_softmax(-1), (zt / temp).log_softmax(-1)
    kd = temp**2 * (lt.exp() * (lt - ls)).sum(-1).mean()
    assert entry["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert entry["kd"] == pytest.approx(float(kd), rel=1e-4)
    assert entry["loss"] == pytest.approx(float((1 - alpha) * ce + alpha * kd), rel=1e-5)


def test_schedule_callback_follows_epochs(world, tmp_path):
    cfg = make_cfg(world, **{"train.max_steps": 16, "train.epochs": 2,
                             "kd.temperature_schedule": [3.0, 1.0],
                             "kd.alpha_schedule": [0.9, 0.2]})
    res = T.train(cfg, "kd", "student_small", 1, run_dir=tmp_path / "run")
    log = read_log(res.run_dir / "log.jsonl")  # 64 examples / 8 = 8 steps per epoch
    by_step = {e["step"]: (e["temperature"], e["alpha"]) for e in log}
    assert by_step[8] == (3.0, 0.9) and by_step[10] == (1.0, 0.2) and by_step[16] == (1.0, 0.2)


def test_accumulation_equivalence(world, tmp_path):
    """8×1 and 2×4 (micro-batch × accumulation) give the same weights: the loss is normalised by
    the supervised tokens of the whole accumulated batch, not per micro-batch."""
    finals = []
    for bs, ga in ((8, 1), (2, 4)):
        cfg = make_cfg(world, **{"train.max_steps": 4, "train.batch_size": bs,
                                 "train.grad_accum_steps": ga})
        res = T.train(cfg, "kd", "student_small", 3, run_dir=tmp_path / f"b{bs}")
        finals.append(_weights(res.run_dir))
    init = _init_weights(world)
    for k in finals[0]:
        assert not torch.equal(finals[0][k], init[k]) or "norm" in k
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=2e-4, atol=2e-6)


# -- guards ------------------------------------------------------------------------------------
class _Snapshot(TrainerCallback):
    """Records weights, optimiser state and the LR scheduler's step around given steps."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.before, self.after = {}, {}
        self.trainer = None

    def _snap(self):
        tr = self.trainer
        params = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        opt = tr.optimizer.state_dict()
        state = {k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in v.items()}
                 for k, v in opt["state"].items()}
        return params, state, tr.lr_scheduler.state_dict()["last_epoch"]

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step + 1 in self.steps:
            self.before[state.global_step + 1] = self._snap()

    def on_step_end(self, args, state, control, **kw):
        if state.global_step in self.steps:
            self.after[state.global_step] = self._snap()


def _with_trainer(monkeypatch, setup):
    """Run ``setup(trainer)`` right after every DistillationTrainer is built (the real path)."""
    orig_init = T.DistillationTrainer.__init__

    def init(self, *a, **kw):
        orig_init(self, *a, **kw)
        setup(self)

    monkeypatch.setattr(T.DistillationTrainer, "__init__", init)


def _record_labels(monkeypatch):
    """Keep each micro-batch's labels on the trainer (``trainer._test_labels``) and the input
    row of each label row (``trainer._test_rows``: a CasCoD rationale may live in its answer's
    row or in a row of its own)."""
    orig = T.DistillationTrainer.compute_loss

    def compute_loss(self, model, inputs, *a, **kw):
        self._test_labels = inputs["labels"]
        idx = inputs.get("rationale_row_index")
        self._test_rows = idx.tolist() if idx is not None else list(range(len(inputs["labels"])))
        return orig(self, model, inputs, *a, **kw)

    monkeypatch.setattr(T.DistillationTrainer, "compute_loss", compute_loss)


def _nan_at_one_supervised_position(trainer, module, step, teacher=False):
    """Forward hook on ``module`` (a final norm) that writes NaN into the hidden state of the
    first supervised position of row 0, on optimiser step ``step`` only."""
    def hook(_mod, _inp, out):
        if trainer.state.global_step + 1 != step:
            return None
        lab = trainer._test_labels
        t = int((lab[0, 1:] != -100).nonzero()[0])  # position t predicts labels[t + 1]
        out = out.clone()
        # the student's input row of label row 0; the teacher gets the rationale rows in order
        out[0 if teacher else trainer._test_rows[0], t] = float("nan")
        return out

    module.register_forward_hook(hook)


def _assert_step_skipped(snap, step):
    (p0, s0, lr0), (p1, s1, lr1) = snap.before[step], snap.after[step]
    for n in p0:  # weight decay + Adam momentum would move every weight
        assert torch.equal(p0[n], p1[n]), n
    assert lr0 == lr1  # the LR scheduler did not step
    assert s0.keys() == s1.keys()
    for k in s0:
        for kk in s0[k]:
            assert torch.equal(torch.as_tensor(s0[k][kk]), torch.as_tensor(s1[k][kk]))


def _assert_step_taken(snap, step):
    (q0, _, lr0), (q1, _, lr1) = snap.before[step], snap.after[step]
    assert any(not torch.equal(q0[n], q1[n]) for n in q0) and lr1 == lr0 + 1
    assert all(torch.isfinite(v).all() for v in q1.values())


@pytest.mark.parametrize("method", ["kd", "cascod-kd"])
@pytest.mark.parametrize("model_side", ["teacher", "student"])
def test_nan_in_supervised_hidden_states_skips_the_step(world, tmp_path, monkeypatch, capsys,
                                                        model_side, method):
    """A NaN written into one supervised position of the teacher's (or student's) final hidden
    states on step 3: that step is skipped as nonfinite_<side>, the weights, the optimiser state
    and the LR are unchanged by it, the skip is printed, logged and in the summary; the other
    steps train. ``cascod-kd`` (one fused call over rationale and answer rows) reports the
    same per-model reason (row 0 is a rationale row, the one the teacher sees)."""
    snap = _Snapshot([3, 4])
    _record_labels(monkeypatch)

    def setup(tr):
        tr.add_callback(snap)
        snap.trainer = tr
        lm = tr.teacher if model_side == "teacher" else tr._causal_lm(tr.model)
        _nan_at_one_supervised_position(tr, lm.model.norm, 3, teacher=model_side == "teacher")

    _with_trainer(monkeypatch, setup)
    cfg = make_cfg(world, **{"train.max_steps": 5, "train.weight_decay": 0.1,
                             "train.debug_nan": model_side == "teacher", "train.log_every": 1})
    res = T.train(cfg, method, "student_small", 1, run_dir=tmp_path / "run")
    _assert_step_skipped(snap, 3)
    _assert_step_taken(snap, 4)
    reason = f"nonfinite_{model_side}"
    s = res.summary
    assert s["skipped_batches"] == 1 and s["skipped_reasons"] == {reason: 1}
    assert s["skipped_fraction"] == pytest.approx(0.2) and s["skipped_flagged"] is True
    err = capsys.readouterr().err
    assert f"skipped optimiser step 3: {reason}" in err or \
        ("skipped optimiser step 3" in err and f'"reason": "{reason}"' in err)
    if model_side == "teacher":
        assert "gsm8k-train-" in err  # debug details: the example ids of the bad micro-batch
    log = read_log(res.run_dir / "log.jsonl")
    assert [e.get(f"skipped_{reason}") for e in log] == [None, None, 1, 1, 1]
    assert log[2]["loss"] is None  # only the skipped step in that window: no loss, not 0
    assert all(e["loss"] > 0 for i, e in enumerate(log) if i != 2)


def test_nan_teacher_with_sanitize_trains_on_and_counts_the_rows(world, tmp_path, monkeypatch):
    """cfg.train.nonfinite = "sanitize": the same NaN teacher row does not skip the step; the row
    is counted (guard state, log)."""
    snap = _Snapshot([3])
    _record_labels(monkeypatch)
    trainers = []

    def setup(tr):
        tr.add_callback(snap)
        snap.trainer = tr
        trainers.append(tr)
        _nan_at_one_supervised_position(tr, tr.teacher.model.norm, 3, teacher=True)

    _with_trainer(monkeypatch, setup)
    cfg = make_cfg(world, **{"train.max_steps": 4, "train.log_every": 1,
                             "train.nonfinite": "sanitize"})
    res = T.train(cfg, "kd", "student_small", 1, run_dir=tmp_path / "run")
    _assert_step_taken(snap, 3)
    assert res.summary["skipped_batches"] == 0
    assert trainers[0].guard.sanitized == {"teacher": 1}
    assert res.summary["sanitized_nonfinite_rows"] == {"teacher": 1}
    log = read_log(res.run_dir / "log.jsonl")
    assert [e.get("sanitized_nonfinite_teacher_rows") for e in log] == [None, None, 1, 1]
    assert all(e["loss"] is not None and e["loss"] > 0 for e in log)


@pytest.mark.parametrize("norm_source", ["trainer", "own_check"])
def test_nan_gradient_skips_the_step(world, tmp_path, monkeypatch, norm_source):
    """A real NaN gradient (a backward hook on one student weight writes NaN into one element of
    its gradient on step 3; the loss stays finite) is caught by the grad-norm guard: from the
    Trainer's norm (``_get_grad_norm``, transformers >= 5.3) or, when the Trainer hands none
    over (before 5.3 it computes the clipping norm inline), from the guard's own check."""
    snap = _Snapshot([3, 4])
    if norm_source == "own_check":  # as before transformers 5.3: no _get_grad_norm to capture
        monkeypatch.setattr(T.DistillationTrainer, "_get_grad_norm",
                            lambda self, model, grad_norm=None: grad_norm)

    def setup(tr):
        tr.add_callback(snap)
        snap.trainer = tr
        w = tr._causal_lm(tr.model).model.layers[0].mlp.up_proj.weight

        def nan_grad(g):
            if tr.state.global_step + 1 != 3:
                return g
            g = g.clone()
            g.view(-1)[0] = float("nan")
            return g

        w.register_hook(nan_grad)

    _with_trainer(monkeypatch, setup)
    cfg = make_cfg(world, **{"train.max_steps": 5, "train.weight_decay": 0.1,
                             "train.log_every": 1})
    res = T.train(cfg, "sft", "student_small", 1, run_dir=tmp_path / "run")
    _assert_step_skipped(snap, 3)
    _assert_step_taken(snap, 4)
    # the loss was finite (a non-finite one is reported as nonfinite_loss): only the gradient
    assert res.summary["skipped_reasons"] == {"nonfinite_grad_norm": 1}
    w = _weights(res.run_dir)
    assert all(torch.isfinite(v).all() for v in w.values())


def test_transformers_outside_the_supported_range_is_refused(world, monkeypatch):
    import transformers

    for ok in ("5.0.0", "5.2.0", "5.24.0", "5.30.1", "5.9.0.dev0"):
        assert TR.check_transformers_version(ok) == ok
    for bad in ("4.46.3", "4.57.6", "6.0.0", "6.1.0.dev0"):
        with pytest.raises(TR.UnsupportedTransformersError, match=r">=5\.0\.0,<6"):
            TR.check_transformers_version(bad)
    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    with pytest.raises(TR.UnsupportedTransformersError, match="found 4.57.1"):
        T.DistillationTrainer(model=None, args=None, spec=T.get_method("sft"), cfg=make_cfg(world),
                              vocab_size=10)


def test_low_token_batches_never_change_weights(world, tmp_path):
    """A step whose batch has fewer than min_supervised_tokens supervised tokens is skipped."""
    base = T.get_method("sft")

    def build(cfg, records, tok):
        ds, stats = base.build_datasets(cfg, records, tok)
        for ex in ds.examples:  # keep only 2 supervised tokens
            sup = [i for i, y in enumerate(ex["labels"]) if y != -100]
            ex["labels"] = [y if i in sup[-2:] else -100 for i, y in enumerate(ex["labels"])]
        return ExampleDataset(ds.examples), stats

    T.register_method(T.MethodSpec(name="test-lowtok", needs_teacher=False,
                                   build_datasets=build, compute_loss=base.compute_loss))
    cfg = make_cfg(world, **{"train.max_steps": 3, "train.batch_size": 1,
                             "train.min_supervised_tokens": 4, "train.weight_decay": 0.1})
    res = T.train(cfg, "test-lowtok", "student_small", 1, run_dir=tmp_path / "run")
    assert res.summary["skipped_batches"] == 3
    assert res.summary["skipped_reasons"] == {"too_few_supervised_tokens": 3}
    w, init = _weights(res.run_dir), _init_weights(world)
    for k in w:
        assert torch.equal(w[k], init[k]), k


# -- resume ------------------------------------------------------------------------------------
def _argv(world: Path, run_dir: Path) -> list[str]:
    cfg_file = run_dir.parent / "cfg.json"
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(json.dumps(overrides(world)))
    return ["train", "--method", "kd", "--student", "student_small", "--seed", "5",
            "--profile", "tiny", "--config", str(cfg_file), "--run-dir", str(run_dir),
            "--max-steps", "10", "--save-steps", "3"]


@pytest.mark.slow
def test_kill9_resume_from_drive_is_bit_identical(world, tmp_path, monkeypatch, capsys):
    """A real subprocess SIGKILLed after step 7 (checkpoints at 3 and 6; Drive keeps the newest
    verified one), local disk lost: the rerun resumes from Drive's checkpoint-6 and ends
    bit-identical to an uninterrupted run, without duplicate log lines."""
    for k in [k for k in os.environ if k.startswith("SLM_KD_")]:
        monkeypatch.delenv(k)
    assert cli_main(_argv(world, tmp_path / "ref" / "run")) == 0  # uninterrupted reference
    run = tmp_path / "k" / "run"
    pp = os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x)
    env = {**os.environ, "PYTHONPATH": pp, "OMP_NUM_THREADS": "1", T.FAULT_KILL_ENV: "7"}
    code = "import sys, torch; torch.set_num_threads(1); from slmkd.cli import main; main()"
    killed = subprocess.run([sys.executable, "-c", code, *_argv(world, run)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (run / "train_summary.json").exists()
    meta = json.loads((run / "run.json").read_text())
    drive = run / "checkpoints"
    assert (drive / "latest").read_text().strip() == "checkpoint-6"
    # the local disk is gone (Colab disconnect): only Drive is left
    import shutil

    shutil.rmtree(meta["local_checkpoint_dir"])
    steps_before = [e["step"] for e in read_log(run / "log.jsonl")]
    assert steps_before[-1] == 6  # logged up to the kill
    capsys.readouterr()
    assert cli_main(_argv(world, run)) == 0  # the same command again
    out = capsys.readouterr().out
    assert "resuming from" in out and "checkpoint-6" in out
    a = load_file(str(tmp_path / "ref" / "run" / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [e["step"] for e in read_log(run / "log.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 10  # no duplicate log lines
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-6")


def test_resume_with_other_config_is_refused_unless_forced(world, tmp_path):
    cfg = make_cfg(world, **{"train.max_steps": 2})
    run = tmp_path / "run"
    T.train(cfg, "sft", "student_small", 1, run_dir=run)
    other = make_cfg(world, **{"train.max_steps": 2, "train.learning_rate": 1e-4})
    with pytest.raises(T.RunConfigMismatchError, match="train.learning_rate"):
        T.train(other, "sft", "student_small", 1, run_dir=run)
    # operational settings (logging, save cadence) are not part of the check
    T.train(make_cfg(world, **{"train.max_steps": 2, "train.log_every": 1}), "sft",
            "student_small", 1, run_dir=run)
    res = T.train(other, "sft", "student_small", 1, run_dir=run, force=True)
    assert res.summary["steps"] == 2
    ident = json.loads((run / "run.json").read_text())["identity"]
    assert ident["train.learning_rate"] == 1e-4


def test_registry_and_run_dir(world):
    assert {"sft", "kd"} <= set(T.registered_methods())
    with pytest.raises(ValueError, match="Unknown training method"):
        T.get_method("nope")
    cfg = make_cfg(world)
    assert T.run_dir_for(cfg, "kd", "student_small", 3) == \
        Path(world).resolve() / "runs" / "kd" / STUDENT / "seed3"
    assert not T.is_run_complete(Path(world) / "nothing")


def test_lora_kd_run_trains_adapters_only_and_saves_a_merged_model(world, tmp_path):
    """LoRA (peft, in the dev extras): only adapter weights move; final/ is a plain merged model."""
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(world, **{"train.max_steps": 8, "train.save_steps": 4, "train.use_lora": True,
                             "train.lora_r": 4, "train.lora_alpha": 8,
                             "train.learning_rate": 5e-3})
    res = T.train(cfg, "kd", "student_small", 3, run_dir=tmp_path / "run")
    log = read_log(res.run_dir / "log.jsonl")
    assert log[-1]["loss"] < log[0]["loss"] and res.summary["skipped_batches"] == 0
    merged = AutoModelForCausalLM.from_pretrained(res.final_dir)
    sd = merged.state_dict()
    assert not any("lora" in k for k in sd), "final/ must hold the merged plain model"
    init = _init_weights(world)
    emb = "model.embed_tokens.weight"
    assert torch.equal(sd[emb], init[emb])  # not a LoRA target: untouched
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sd[q], init[q])  # adapted and merged


def test_a_setting_added_after_the_run_does_not_block_its_resume_at_its_default():
    """run.json written before ``cascod.stage1_objective`` existed: at its default the run still
    resumes; set to another value (or a recorded setting changed) it is a mismatch."""
    from slmkd.training.run import _diff

    old = {"method": "cascod", "cascod.alpha_cascod": 0.1}
    assert _diff(old, {**old, "cascod.stage1_objective": "rationale"}) == []
    assert _diff(old, {**old, "cascod.stage1_objective": "joint"}) == [
        "cascod.stage1_objective: '<absent>' -> 'joint'"]
    assert _diff(old, {**old, "cascod.alpha_cascod": 0.2}) != []
    assert _diff({**old, "cascod.gone": 1}, old) != []  # a recorded setting that vanished
