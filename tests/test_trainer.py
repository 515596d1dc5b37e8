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

from slmkd import training as T  # noqa: E402
from slmkd.training.monitor import read_log  # noqa: E402
from slmkd.training.data import ExampleDataset  # noqa: E402

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
    for key in ("ce", "temperature", "alpha", "grad_norm", "learning_rate", "tokens_per_s",
                "skipped_batches"):
        assert key in log[0]
    s = json.loads((run / "train_summary.json").read_text())
    for key in ("method", "student", "seed", "final_model_dir", "steps", "skipped_batches",
                "skipped_fraction", "final_loss", "final_ce", "final_kd", "wall_time_s"):
        assert key in s
    assert s["steps"] == 16 and s["skipped_batches"] == 0 and s["method"] == method
    if method == "kd":
        assert log[0]["kd"] is not None and log[0]["alpha"] == 0.5
        assert s["final_kd"] is not None
        # loss = (1-α)·ce + α·kd, where kd already carries the T² factor
        e = log[-1]
        assert e["loss"] == pytest.approx(0.5 * e["ce"] + 0.5 * e["kd"], rel=1e-4)
    else:
        assert s["teacher"] is None and log[-1]["loss"] == pytest.approx(log[-1]["ce"], rel=1e-5)
    assert (run / "final" / "config.json").is_file()
    assert (run / "final" / "tokenizer_config.json").is_file()
    assert (run / "config.json").is_file()
    assert (run / "plots" / "loss.png").stat().st_size > 0
    assert (run / "checkpoints" / "checkpoint-16" / "slmkd_manifest.json").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "checkpoint-16"
    assert T.is_run_complete(run)
    # rerunning a complete run does nothing
    again = T.train(cfg, method, "student_small", 7, run_dir=run)
    assert again.summary["wall_time_s"] == s["wall_time_s"]


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
def _register_faulty(name: str, nan_steps: set[int]):
    base = T.get_method("sft")

    def loss(trainer, model, inputs, items):
        lo, m = base.compute_loss(trainer, model, inputs, items)
        if trainer.state.global_step + 1 in nan_steps:
            lo = lo * float("nan")
        return lo, m

    T.register_method(T.MethodSpec(name=name, needs_teacher=False,
                                   build_datasets=base.build_datasets, compute_loss=loss,
                                   config_sections=base.config_sections))


class _Snapshot(TrainerCallback):
    """Records weights and optimiser state around given steps."""

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


def test_nonfinite_loss_step_is_skipped_without_touching_weights_or_optimizer(
        world, tmp_path, monkeypatch, capsys):
    _register_faulty("test-nan", {3})
    snap = _Snapshot([3, 4])
    orig_init = T.DistillationTrainer.__init__

    def init(self, *a, **kw):
        kw["callbacks"] = [*kw.get("callbacks", []), snap]
        orig_init(self, *a, **kw)
        snap.trainer = self

    monkeypatch.setattr(T.DistillationTrainer, "__init__", init)
    cfg = make_cfg(world, **{"train.max_steps": 5, "train.weight_decay": 0.1,
                             "train.debug_nan": True, "train.log_every": 1})
    res = T.train(cfg, "test-nan", "student_small", 1, run_dir=tmp_path / "run")
    (p0, s0, lr0), (p1, s1, lr1) = snap.before[3], snap.after[3]
    for n in p0:  # weight decay + Adam momentum would move every weight
        assert torch.equal(p0[n], p1[n]), n
    assert lr0 == lr1  # the LR scheduler did not step
    for k in s0:
        for kk in s0[k]:
            assert torch.equal(torch.as_tensor(s0[k][kk]), torch.as_tensor(s1[k][kk]))
    (q0, _, _), (q1, _, _) = snap.before[4], snap.after[4]
    assert any(not torch.equal(q0[n], q1[n]) for n in q0)  # normal steps still train
    s = res.summary
    assert s["skipped_batches"] == 1 and s["skipped_reasons"] == {"nonfinite_loss": 1}
    assert s["skipped_fraction"] == pytest.approx(0.2) and s["skipped_flagged"] is True
    err = capsys.readouterr().err
    assert "skipped optimiser step 3" in err and "gsm8k-train-" in err  # debug details
    assert read_log(res.run_dir / "log.jsonl")[-1]["skipped_batches"] == 1


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
    """A real subprocess SIGKILLed after step 7 (checkpoints at 3 and 6), local disk lost, newest
    Drive checkpoint truncated: the rerun falls back to checkpoint-3 and ends bit-identical."""
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
    # the local disk is gone (Colab disconnect) and the newest Drive checkpoint is truncated
    import shutil

    shutil.rmtree(meta["local_checkpoint_dir"])
    opt = drive / "checkpoint-6" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    steps_before = [e["step"] for e in read_log(run / "log.jsonl")]
    assert steps_before[-1] == 6  # logged up to the kill
    capsys.readouterr()
    assert cli_main(_argv(world, run)) == 0  # the same command again
    out = capsys.readouterr().out
    assert "checkpoint-6 is not usable" in out and "resuming from" in out
    a = load_file(str(tmp_path / "ref" / "run" / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [e["step"] for e in read_log(run / "log.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 10  # no duplicate log lines
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-3")


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
