"""Resume, all of it: a KD run with everything that makes resuming hard, SIGKILLed during a
checkpoint copy to Drive, rerun after the local disk is lost: bit-identical to an uninterrupted
run. Then each restored piece is disabled in turn and the same resume must come out different
(so the identity test would catch the loss of that piece).

The run: cosine LR with warm-up, a three-entry temperature/alpha schedule (epoch 0, 1, 2; the run
crosses two epoch boundaries, and the resume point lies after the first, mid-epoch), attention
dropout 0.1, gradient accumulation 2, checkpoints every 5 steps (5, 10, 15), 20 steps of 8
examples over 64 records (8 steps per epoch). The process is killed half-way through the first
file of checkpoint-15's Drive copy (:data:`slmkd.training.checkpoint.FAULT_KILL_IN_COPY_ENV`), so
Drive holds checkpoint-10 (epoch 1.25) and a partial ``.tmp-checkpoint-15-*``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("slmkd.losses")

from _train_world import STUDENT, build_world, make_cfg  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from slmkd import training as T  # noqa: E402
from slmkd.training import trainer as TR  # noqa: E402
from slmkd.training.checkpoint import FAULT_KILL_IN_COPY_ENV  # noqa: E402
from slmkd.training.monitor import read_log  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SETTINGS = {
    "train.batch_size": 4, "train.grad_accum_steps": 2, "train.max_steps": 20,
    "train.lr_scheduler_type": "cosine", "train.warmup_ratio": 0.2, "train.epochs": 3,
    "kd.temperature_schedule": [1.0, 2.0, 4.0], "kd.alpha_schedule": [0.2, 0.5, 0.8],
    "train.log_every": 1,
}

_RUN = """
import json, sys
import torch
torch.set_num_threads(1)
from _train_world import make_cfg
from slmkd.training import train
world, run, local, extra = sys.argv[1:5]
cfg = make_cfg(world, **{"train.local_checkpoint_dir": local, **json.loads(extra)})
train(cfg, "kd", "student_small", 3, run_dir=run, save_steps=5)
"""


def _dropout_student(world: Path) -> Path:
    """The test student with ``attention_dropout = 0.1`` (so the RNG state matters)."""
    out = world / "models" / f"{STUDENT}-dropout"
    if not out.is_dir():
        shutil.copytree(world / "models" / STUDENT, out)
        p = out / "config.json"
        c = json.loads(p.read_text())
        c["attention_dropout"] = 0.1
        p.write_text(json.dumps(c))
    return out


def _cfg(world: Path, local: Path):
    return make_cfg(world, **{**SETTINGS, "models.student_small": str(_dropout_student(world)),
                              "train.local_checkpoint_dir": str(local)})


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """(world, reference run, killed run): the reference is uninterrupted; the killed run is the
    state a Colab disconnect during checkpoint-15's copy leaves on Drive (local disk removed)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("resume")
    world = build_world(root / "world")
    ref = root / "ref"
    T.train(_cfg(world, root / "ref_local"), "kd", "student_small", 3, run_dir=ref, save_steps=5)
    run = root / "killed" / "run"
    pp = os.pathsep.join(x for x in (str(REPO), str(REPO / "tests"),
                                     os.environ.get("PYTHONPATH", "")) if x)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLM_KD_")},
           "PYTHONPATH": pp, "OMP_NUM_THREADS": "1", FAULT_KILL_IN_COPY_ENV: "15"}
    extra = {**SETTINGS, "models.student_small": str(_dropout_student(world))}
    proc = subprocess.run([sys.executable, "-c", _RUN, str(world), str(run),
                           str(root / "killed" / "local"), json.dumps(extra)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    local = Path(json.loads((run / "run.json").read_text())["local_checkpoint_dir"])
    shutil.rmtree(local)  # the runtime is gone: only Drive remains
    return world, ref, run


def _resume(world: Path, src: Path, dst: Path) -> T.TrainResult:
    """Copy the killed run's Drive state to ``dst`` and rerun the same call there."""
    shutil.copytree(src, dst)
    return T.train(_cfg(world, dst.parent / "local"), "kd", "student_small", 3, run_dir=dst,
                   save_steps=5)


def test_reference_run_exercises_every_piece(killed):
    """The reference crosses both epoch boundaries with the schedule, warms up and decays."""
    _, ref, _ = killed
    log = read_log(ref / "log.jsonl")
    assert [e["step"] for e in log] == list(range(1, 21))
    by_step = {e["step"]: e for e in log}
    assert by_step[4]["learning_rate"] > by_step[1]["learning_rate"]  # warm-up
    assert by_step[20]["learning_rate"] < 0.2 * by_step[5]["learning_rate"]  # cosine decay
    assert {by_step[s]["temperature"] for s in (1, 8)} == {1.0}
    assert {by_step[s]["temperature"] for s in (9, 16)} == {2.0}
    assert by_step[17]["temperature"] == 4.0 and by_step[17]["alpha"] == 0.8


def test_kill_during_checkpoint_copy_then_rerun_is_bit_identical(killed, tmp_path, capsys):
    world, ref, run = killed
    drive = run / "checkpoints"
    # Drive kept the verified checkpoint-10; the cut copy of checkpoint-15 is a temp folder
    assert sorted(p.name for p in drive.glob("checkpoint-*")) == ["checkpoint-10"]
    assert list(drive.glob(".tmp-checkpoint-15-*"))
    assert not (run / "train_summary.json").exists()
    capsys.readouterr()
    res = _resume(world, run, tmp_path / "run")
    out = capsys.readouterr().out
    assert "removed a stale partial copy" in out and "resuming from" in out
    assert res.summary["resumed_from"].endswith("checkpoint-10")
    assert _same(_weights(ref), _weights(res.run_dir))
    steps = [e["step"] for e in read_log(res.run_dir / "log.jsonl")]
    assert steps == list(range(1, 21))  # no duplicate, none missing
    ref_summary = json.loads((ref / "train_summary.json").read_text())
    for k in ("steps", "optimizer_steps_taken", "skipped_batches", "final_loss"):
        assert res.summary[k] == ref_summary[k], k


# -- each restored piece matters ------------------------------------------------------------------
def _no_rng(monkeypatch):
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "_load_rng_state", lambda self, checkpoint: None)


def _fresh_state_after_load(monkeypatch, attr: str):
    """Load optimizer and scheduler as usual, then put ``attr`` back to its fresh state."""
    from transformers import Trainer

    real = Trainer._load_optimizer_and_scheduler

    def load(self, checkpoint):
        fresh = getattr(self, attr).state_dict()
        real(self, checkpoint)
        if checkpoint is not None:
            getattr(self, attr).load_state_dict(fresh)

    monkeypatch.setattr(Trainer, "_load_optimizer_and_scheduler", load)


def _no_optimizer(monkeypatch):
    _fresh_state_after_load(monkeypatch, "optimizer")


def _no_scheduler(monkeypatch):
    _fresh_state_after_load(monkeypatch, "lr_scheduler")


def _no_batch_skipping(monkeypatch):
    import transformers.trainer as hf_trainer

    monkeypatch.setattr(hf_trainer, "skip_first_batches", lambda dataloader, num_batches=0:
                        dataloader)


def _schedule_from_process_start(monkeypatch):
    """The T/alpha schedule counted from the epoch this process started in (a resume bug)."""
    def update(self, state):
        if self.trainer is not None:
            start = getattr(self, "_start_epoch", None)
            if start is None:
                start = self._start_epoch = int(state.epoch or 0)
            t, a = self.trainer.cfg.schedule_for_epoch(int(state.epoch or 0) - start)
            self.trainer.temperature, self.trainer.alpha = t, a

    monkeypatch.setattr(TR.ScheduleCallback, "_update", update)


def _no_guard_state(monkeypatch):
    monkeypatch.setattr(TR.GuardState, "from_dict", classmethod(lambda cls, d: cls()))


@pytest.mark.parametrize("disable", [_no_rng, _no_optimizer, _no_scheduler, _no_batch_skipping,
                                     _schedule_from_process_start, _no_guard_state],
                         ids=lambda f: f.__name__.lstrip("_"))
def test_each_restored_piece_matters(killed, tmp_path, monkeypatch, disable):
    """With one piece of the resume disabled, the rerun is not the uninterrupted run: the weights
    differ (RNG/dropout, optimizer moments, LR schedule, data position, T/alpha epoch) or the
    counted steps do (guard state)."""
    world, ref, run = killed
    disable(monkeypatch)
    res = _resume(world, run, tmp_path / "run")
    ref_summary = json.loads((ref / "train_summary.json").read_text())
    if disable is _no_guard_state:
        assert _same(_weights(ref), _weights(res.run_dir))
        assert res.summary["optimizer_steps_taken"] != ref_summary["optimizer_steps_taken"]
    else:
        assert not _same(_weights(ref), _weights(res.run_dir))


def test_length_grouped_sampling_resumes_bit_identically(tmp_path):
    """``train.group_by_length``: the sampler's order depends on (seed, epoch) only, so the run
    killed during checkpoint-15's copy and resumed from Drive (epoch 1, mid-epoch) ends
    bit-identical to the uninterrupted one."""
    torch.set_num_threads(1)
    world = build_world(tmp_path / "world")
    extra = {**SETTINGS, "models.student_small": str(_dropout_student(world)),
             "train.group_by_length": True}

    def cfg(local):
        return make_cfg(world, **{**extra, "train.local_checkpoint_dir": str(local)})

    ref = T.train(cfg(tmp_path / "ref_local"), "kd", "student_small", 3, run_dir=tmp_path / "ref",
                  save_steps=5)
    run = tmp_path / "killed" / "run"
    pp = os.pathsep.join(x for x in (str(REPO), str(REPO / "tests"),
                                     os.environ.get("PYTHONPATH", "")) if x)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLM_KD_")},
           "PYTHONPATH": pp, "OMP_NUM_THREADS": "1", FAULT_KILL_IN_COPY_ENV: "15"}
    proc = subprocess.run([sys.executable, "-c", _RUN, str(world), str(run),
                           str(tmp_path / "killed" / "local"), json.dumps(extra)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    shutil.rmtree(json.loads((run / "run.json").read_text())["local_checkpoint_dir"])
    res = T.train(cfg(tmp_path / "killed" / "local"), "kd", "student_small", 3, run_dir=run,
                  save_steps=5)
    assert res.summary["resumed_from"].endswith("checkpoint-10")
    assert _same(_weights(ref.run_dir), _weights(run))


def test_seeded_length_grouped_sampler():
    """Deterministic per (seed, epoch), another order each epoch, every index once, and far less
    padding than a random order on skewed lengths."""
    import random

    from slmkd.training.data import SeededLengthGroupedSampler

    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(5, 0.6)) + 10 for _ in range(2000)]
    s = SeededLengthGroupedSampler(lengths, group=16, seed=3)
    e0 = list(s)
    assert sorted(e0) == list(range(2000)) and list(s) == e0
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0 and sorted(e1) == list(range(2000))
    s2 = SeededLengthGroupedSampler(lengths, group=16, seed=3)
    s2.set_epoch(1)
    assert list(s2) == e1

    def pad(order):  # padded tokens / real tokens over steps of 16
        steps = [order[i:i + 16] for i in range(0, len(order), 16)]
        return sum(len(b) * max(lengths[j] for j in b) for b in steps) / sum(lengths)

    rand = list(range(2000))
    rng.shuffle(rand)
    assert pad(e0) < 1.1 < 1.5 < pad(rand)
