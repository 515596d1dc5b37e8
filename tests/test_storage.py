"""The storage policy on real files (tiny runs): one checkpoint per run on Drive and on local disk
while training, none once the run is complete, ``final/`` in ``final_dtype``, kill -9 and resume
from Drive alone, stale partial copies, a full Drive, wall-time checkpoints, and the model and
trainer freed when ``train()`` returns."""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("slmkd.losses")

from _train_world import build_world, make_cfg  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from slmkd import training as T  # noqa: E402
from slmkd.training import checkpoint as C  # noqa: E402
from slmkd.training import run as R  # noqa: E402
from slmkd.training.monitor import read_log  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    return build_world(tmp_path_factory.mktemp("storageworld"))


@pytest.fixture
def sync_copies(monkeypatch):
    """Each submitted checkpoint is handled before training goes on (deterministic), and the
    number of checkpoints on Drive and on local disk is recorded right after each one."""
    counts: list[tuple[int, int]] = []
    submit = C.DriveSyncer.submit

    def synchronous(self, path):
        submit(self, path)
        assert self.wait(60)
        counts.append((len(C.list_checkpoints(self.drive_folder)),
                       len(C.list_checkpoints(Path(path).parent))))

    monkeypatch.setattr(C.DriveSyncer, "submit", synchronous)
    return counts


def _cfg(world: Path, tmp: Path, **extra):
    return make_cfg(world, **{"train.local_checkpoint_dir": str(tmp / "local"), **extra})


def _steps(folder: Path) -> list[int]:
    return [s for s, _ in C.list_checkpoints(folder)]


def _dtypes(final: Path) -> set[str]:
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118


# -- a completed run ------------------------------------------------------------------------------
def test_completed_run_keeps_one_checkpoint_while_training_none_after_final_in_dtype(
        world, tmp_path, sync_copies, monkeypatch):
    import threading

    hashed: list[tuple[str, str]] = []
    sha = C.sha256_file

    def tracked_sha(path, cancel=None):
        hashed.append((threading.current_thread().name, str(path)))
        return sha(path, cancel)

    monkeypatch.setattr(C, "sha256_file", tracked_sha)
    finals = {}
    for dtype in ("fp32", "bf16"):
        sync_copies.clear()
        cfg = _cfg(world, tmp_path / dtype, **{"train.max_steps": 8, "train.save_steps": 2,
                                               "train.final_dtype": dtype})
        res = T.train(cfg, "sft", "student_small", 4, run_dir=tmp_path / dtype / "run")
        run, local = res.run_dir, T.local_checkpoint_dir(cfg, res.run_dir)
        # checkpoints 2, 4, 6 (none at the last step): after each copy one on Drive, one local
        assert res.summary["checkpoints_saved"] == [2, 4, 6]
        assert sync_copies == [(1, 1)] * 3
        assert res.summary["drive_sync_failures"] == []
        # complete: no checkpoint left on either side; logs, plots, summary stay
        assert T.is_run_complete(run) and res.final_dir == run / "final"
        assert not (run / "checkpoints").exists() and not local.exists()
        assert not list(run.rglob("checkpoint-*")) and not list(run.rglob(".tmp-*"))
        assert not list((tmp_path / dtype / "local").rglob("*"))
        for f in ("log.jsonl", "train_summary.json", "plots/loss.png", "config.json", "run.json",
                  "final/config.json", "final/tokenizer_config.json"):
            assert (run / f).is_file(), f
        assert C.verify_checkpoint(run / "final")[0]  # the copy was verified against this
        assert res.summary["final_dtype"] == dtype
        finals[dtype] = run / "final"
    # checkpoints are hashed by the syncer's thread only; the training thread hashes final/
    ck = [t for t, p in hashed if "checkpoint-" in p]
    assert ck and set(ck) == {"slmkd-drive-sync"}
    assert {t for t, p in hashed if "final" in p} == {threading.main_thread().name}
    assert _dtypes(finals["fp32"]) == {"F32"}
    assert _dtypes(finals["bf16"]) == {"BF16"}
    assert json.loads((finals["bf16"] / "config.json").read_text())["dtype"] == "bfloat16"
    a, b = load_file(str(finals["fp32"] / "model.safetensors")), \
        load_file(str(finals["bf16"] / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # same training (seed 4): bf16 is the fp32 result rounded, nothing else
        assert torch.equal(b[k], a[k].to(torch.bfloat16)), k
    assert (finals["bf16"] / "model.safetensors").stat().st_size < \
        0.6 * (finals["fp32"] / "model.safetensors").stat().st_size
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(finals["bf16"], dtype="auto")
    assert m.dtype == torch.bfloat16


def test_save_final_model_leaves_the_in_memory_model_in_fp32(world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = world / "models" / "kdtest-student"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    C.save_final_model(model, AutoTokenizer.from_pretrained(src), tmp_path / "f", "bf16")
    assert _dtypes(tmp_path / "f") == {"BF16"}
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k]), k


# -- kill -9 mid-run, resume from Drive alone ---------------------------------------------------
_KILL_RUN = """
import json, sys
import torch
torch.set_num_threads(1)
from _train_world import make_cfg
from slmkd.training import train
world, run, local = sys.argv[1:4]
cfg = make_cfg(world, **{"train.local_checkpoint_dir": local, "train.max_steps": 10})
train(cfg, "sft", "student_small", 5, run_dir=run, save_steps=3)
"""


def test_kill9_leaves_one_checkpoint_on_drive_and_resumes_from_it(world, tmp_path, capsys):
    """A real subprocess SIGKILLed at the end of step 7 (checkpoints at 3 and 6); the local disk
    is then lost. Drive held only checkpoint-6, and the same call resumes from it and ends
    bit-identical to an uninterrupted run."""
    def cfg(local):
        return make_cfg(world, **{"train.local_checkpoint_dir": str(local), "train.max_steps": 10})

    T.train(cfg(tmp_path / "ref_local"), "sft", "student_small", 5, run_dir=tmp_path / "ref",
            save_steps=3)
    run, local_root = tmp_path / "k" / "run", tmp_path / "k" / "local"
    pp = os.pathsep.join(x for x in (str(REPO), str(REPO / "tests"),
                                     os.environ.get("PYTHONPATH", "")) if x)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLM_KD_")},
           "PYTHONPATH": pp, "OMP_NUM_THREADS": "1", T.FAULT_KILL_ENV: "7"}
    killed = subprocess.run([sys.executable, "-c", _KILL_RUN, str(world), str(run),
                             str(local_root)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    drive = run / "checkpoints"
    local = Path(json.loads((run / "run.json").read_text())["local_checkpoint_dir"])
    # checkpoints at 3 and 6: Drive and local disk each hold only the newest one
    assert _steps(drive) == [6] and (drive / "latest").read_text().strip() == "checkpoint-6"
    assert _steps(local) == [6]
    assert all("sha256" in m for m in C.read_manifest(drive / "checkpoint-6")["files"].values())
    assert not list(drive.glob(".tmp-*")) and not (run / "train_summary.json").exists()
    shutil.rmtree(local)  # the runtime is gone: only Drive remains
    capsys.readouterr()
    res = T.train(cfg(local_root), "sft", "student_small", 5, run_dir=run, save_steps=3)
    out = capsys.readouterr().out
    assert f"resuming from {drive / 'checkpoint-6'}" in out
    assert res.summary["resumed_from"] == str(drive / "checkpoint-6")
    a = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [e["step"] for e in read_log(run / "log.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 10
    assert T.is_run_complete(run) and not drive.exists() and not local.exists()


# -- stale partial copies -------------------------------------------------------------------------
def _plant(folder: Path, name: str) -> Path:
    d = folder / name
    d.mkdir(parents=True)
    (d / "optimizer.pt").write_bytes(b"\0" * 300_000)
    return d


def test_stale_partial_copies_are_removed_at_start(world, tmp_path, capsys):
    cfg = _cfg(world, tmp_path, **{"train.max_steps": 2})
    run = tmp_path / "run"
    local = T.local_checkpoint_dir(cfg, run)
    keep = run / "notes" / ".tmp-mine"  # not the run's copies: left alone
    keep.mkdir(parents=True)
    stale = [_plant(run / "checkpoints", ".tmp-checkpoint-4-1234-5678"),
             _plant(run / "checkpoints", ".old-checkpoint-2-1234"),
             _plant(run, ".tmp-final-1234-5678"), _plant(local, ".tmp-checkpoint-6-1-2")]
    T.train(cfg, "sft", "student_small", 1, run_dir=run)
    out = capsys.readouterr().out
    assert not any(p.exists() for p in stale)
    assert out.count("removed a stale partial copy") == 4 and "300.0 kB" in out
    assert keep.is_dir() and T.is_run_complete(run)
    # also when the run is already complete (a copy cut after the run finished)
    again = _plant(run, ".tmp-final-99-98")
    T.train(cfg, "sft", "student_small", 1, run_dir=run)
    assert not again.exists() and "stale partial copy" in capsys.readouterr().out


# -- a full Drive -------------------------------------------------------------------------------
def test_full_drive_trains_on_keeps_final_locally_and_a_rerun_copies_it(world, tmp_path,
                                                                       monkeypatch, capsys,
                                                                       sync_copies):
    calls: list[str] = []
    drive_full = {"on": True}
    real = C.copy_file

    def copy(src, dst, cancel=None):
        calls.append(str(dst))
        # checkpoint-2 still fits; from then on Drive is full (checkpoints and final/)
        if drive_full["on"] and ".tmp-checkpoint-2-" not in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, cancel)

    monkeypatch.setattr(C, "copy_file", copy)
    cfg = _cfg(world, tmp_path, **{"train.max_steps": 8, "train.save_steps": 2})
    run = tmp_path / "run"
    local = T.local_checkpoint_dir(cfg, run)
    res = T.train(cfg, "sft", "student_small", 2, run_dir=run)
    out = capsys.readouterr().out
    # training went on to the end; one message for the checkpoints that did not fit
    assert res.summary["steps"] == 8 and len(res.summary["drive_sync_failures"]) == 2
    assert out.count("WARNING: Drive is full") == 1
    ck_msg = next(line for line in out.splitlines() if "WARNING: Drive is full" in line)
    assert "checkpoint-4 needs" in ck_msg and "free at" in ck_msg
    assert "Resumable from Drive: checkpoint-2 (step 2)" in ck_msg
    assert sum(".tmp-checkpoint-4-" in c for c in calls) == 1  # a full Drive is not retried
    # the final model is on local disk, the run is not complete, Drive keeps its checkpoint
    fin_msg = next(line for line in out.splitlines() if "NOT complete on Drive" in line)
    assert "Drive is full" in fin_msg and str(local / "final") in fin_msg
    assert "rerun the same command" in fin_msg and "checkpoint-2 (step 2)" in fin_msg
    assert res.final_dir == local / "final" and res.summary["final_on_drive"] is False
    assert C.verify_checkpoint(local / "final")[0]
    assert not T.is_run_complete(run) and not (run / "final").exists()
    assert not (run / "train_summary.json").exists()
    assert _steps(run / "checkpoints") == [2] and _steps(local) == []
    assert not list(run.rglob(".tmp-*"))
    weights = load_file(str(local / "final" / "model.safetensors"))

    # Drive freed: the same command copies the local final model, without training
    drive_full["on"] = False

    def no_training(*a, **k):
        raise AssertionError("the rerun must not train")

    monkeypatch.setattr(R, "_fit", no_training)
    res2 = T.train(cfg, "sft", "student_small", 2, run_dir=run)
    out2 = capsys.readouterr().out
    assert "copying it (no training)" in out2
    assert T.is_run_complete(run) and res2.final_dir == run / "final"
    assert res2.summary["steps"] == 8 and "final_on_drive" not in res2.summary
    got = load_file(str(run / "final" / "model.safetensors"))
    for k in weights:
        assert torch.equal(got[k], weights[k]), k
    assert not (run / "checkpoints").exists() and not local.exists()


# -- wall-time checkpoints --------------------------------------------------------------------------
def test_save_schedule_by_wall_time_and_steps(world, tmp_path):
    timed = _cfg(world, tmp_path, **{"train.save_every_minutes": 30.0})
    timed.train.save_steps = 200  # the TrainConfig default: not set by the user
    assert C.save_schedule(timed) == (1800.0, 0)
    assert C.save_schedule(timed, save_steps=50) == (1800.0, 50)  # as set by the user
    timed.train.save_steps = 70
    assert C.save_schedule(timed) == (1800.0, 70)
    steps_only = _cfg(world, tmp_path, **{"train.save_steps": 40})
    assert C.save_schedule(steps_only) == (0.0, 40)


def test_checkpoint_schedule_saves_by_wall_time_never_at_the_last_step():
    from transformers import TrainerControl, TrainerState

    now = [0.0]
    cb = C.CheckpointSchedule(60.0, clock=lambda: now[0])
    state, control = TrainerState(), TrainerControl()
    state.max_steps = 10
    cb.on_train_begin(None, state, control)
    saved = []
    for step in range(1, 11):
        now[0] += 25.0
        state.global_step = step
        control.should_save = step == 10  # the Trainer's own end-of-training save
        cb.on_step_end(None, state, control)
        if control.should_save:
            saved.append(step)
            cb.on_save(None, state, control)
    assert saved == [3, 6, 9]


def test_wall_time_checkpoints_in_a_real_run(world, tmp_path, sync_copies):
    cfg = _cfg(world, tmp_path, **{"train.max_steps": 4, "train.save_every_minutes": 1e-9})
    res = T.train(cfg, "sft", "student_small", 1, run_dir=tmp_path / "run")
    assert res.summary["checkpoints_saved"] == [1, 2, 3]  # due after every step, not the last
    assert sync_copies == [(1, 1)] * 3 and T.is_run_complete(res.run_dir)


# -- memory -------------------------------------------------------------------------------------
def test_model_teacher_and_trainer_are_freed_when_train_returns(world, tmp_path, monkeypatch):
    """With the cyclic garbage collector off and ``gc.collect`` a no-op, reference counting alone
    frees the student, the teacher and the trainer as ``train()`` returns: the cycles are broken."""
    import slmkd.modeling as modeling

    refs: list[weakref.ref] = []
    load = modeling.load_causal_lm

    def tracked_load(*a, **k):
        m = load(*a, **k)
        refs.append(weakref.ref(m))
        return m

    init = T.DistillationTrainer.__init__

    def tracked_init(self, *a, **k):
        init(self, *a, **k)
        refs.append(weakref.ref(self))

    monkeypatch.setattr(modeling, "load_causal_lm", tracked_load)
    monkeypatch.setattr(T.DistillationTrainer, "__init__", tracked_init)
    cfg = _cfg(world, tmp_path, **{"train.max_steps": 3, "train.save_steps": 2})
    T.train(cfg, "kd", "student_small", 1, run_dir=tmp_path / "warm")  # first-use imports
    refs.clear()
    gc.collect()
    gc.disable()
    try:
        with monkeypatch.context() as m:
            m.setattr(gc, "collect", lambda *a, **k: 0)
            T.train(cfg, "kd", "student_small", 1, run_dir=tmp_path / "run")
            alive = [r() is not None for r in refs]
    finally:
        gc.enable()
    assert len(alive) == 3 and not any(alive), alive  # student, teacher, trainer


# -- final/ copied to Drive in the background (train_grid) -----------------------------------------
@pytest.fixture
def gated_final_copy(monkeypatch):
    """``final/`` copies (not checkpoints) wait for ``gates[run_dir]`` (an Event, set by the
    test); ``events`` records ``(start|end, run_dir, thread name)`` of each."""
    import threading

    gates: dict[Path, threading.Event] = {}
    events: list[tuple[str, Path, str]] = []
    publish = R.publish_checkpoint

    def gated(src, dst, *a, **k):
        if k.get("name") != R.FINAL_DIR:
            return publish(src, dst, *a, **k)
        dst = Path(dst)
        events.append(("start", dst, threading.current_thread().name))
        if dst in gates:
            assert gates[dst].wait(180)
        out = publish(src, dst, *a, **k)
        events.append(("end", dst, threading.current_thread().name))
        return out

    monkeypatch.setattr(R, "publish_checkpoint", gated)
    yield gates, events
    T.wait_for_final_copies()


def test_background_final_copy_returns_at_once_and_completes_the_run_later(
        world, tmp_path, gated_final_copy):
    import threading

    gates, events = gated_final_copy
    cfg = _cfg(world, tmp_path, **{"train.max_steps": 4})
    run = tmp_path / "run"
    gates[run] = threading.Event()
    res = T.train(cfg, "sft", "student_small", 1, run_dir=run, background_copy=True)
    # returned while the copy waits: not complete yet, its final/ only on local disk
    assert res.summary["final_copy"] == "background" and res.final_dir == run / "final"
    assert T.pending_final_copies() == [run] and not T.is_run_complete(run)
    local = T.local_checkpoint_dir(cfg, run)
    assert (local / "final").is_dir() and (local / R.PENDING_NAME).is_file()
    gates[run].set()
    (done,) = T.wait_for_final_copies()
    assert T.is_run_complete(run) and done.final_dir == run / "final"
    assert C.verify_checkpoint(run / "final")[0] and not local.exists()
    assert [e[0] for e in events] == ["start", "end"]
    assert events[0][2].startswith("slmkd-final-copy")  # not the training thread
    assert T.pending_final_copies() == [] and T.wait_for_final_copies() == []


def test_next_run_waits_for_the_copy_in_flight_and_a_rerun_for_its_own(world, tmp_path,
                                                                       gated_final_copy,
                                                                       monkeypatch):
    """At most one finished run's final/ waits on local disk: run B returns only once run A's
    copy is verified (A's gate opens 1 s after B has trained); rerunning A while its copy is
    pending waits for it instead of copying (or training) again."""
    import threading
    import time

    gates, events = gated_final_copy
    cfg = _cfg(world, tmp_path, **{"train.max_steps": 4})
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    gates[run_a] = threading.Event()
    T.train(cfg, "sft", "student_small", 1, run_dir=run_a, background_copy=True)
    pending_b = T.local_checkpoint_dir(cfg, run_b) / R.PENDING_NAME

    def open_a_after_b_trained():
        t0 = time.time()
        while not pending_b.exists() and time.time() - t0 < 170:
            time.sleep(0.05)
        time.sleep(1.0)
        gates[run_a].set()

    threading.Thread(target=open_a_after_b_trained, daemon=True).start()
    T.train(cfg, "sft", "student_small", 2, run_dir=run_b, background_copy=True)
    assert T.is_run_complete(run_a)  # B's train() waited for A's copy
    assert [(k, d) for k, d, _ in events][:2] == [("start", run_a), ("end", run_a)]
    T.wait_for_final_copies()
    assert T.is_run_complete(run_b)

    # a rerun of a run whose copy is pending waits for it: one copy, no training
    run_c = tmp_path / "c"
    gates[run_c] = threading.Event()
    T.train(cfg, "sft", "student_small", 3, run_dir=run_c, background_copy=True)

    def no_training(*a, **k):
        raise AssertionError("the rerun must not train")

    monkeypatch.setattr(R, "_fit", no_training)
    threading.Timer(1.0, gates[run_c].set).start()
    again = T.train(cfg, "sft", "student_small", 3, run_dir=run_c)
    assert T.is_run_complete(run_c) and again.final_dir == run_c / "final"
    assert sum(1 for k, d, _ in events if k == "start" and d == run_c) == 1
