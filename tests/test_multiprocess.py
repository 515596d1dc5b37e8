"""Two CPU processes (torchrun, gloo): data-parallel training normalises tokens globally, ends
with the weights of one process, and both processes skip the same steps (no hang)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("slmkd.losses")

from _train_world import build_world, make_cfg  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

TESTS = Path(__file__).resolve().parent


def _torchrun(tmp_path: Path, world: Path, port: int, *jobs: str) -> Path:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    pp = os.pathsep.join(x for x in (str(TESTS.parent), os.environ.get("PYTHONPATH", "")) if x)
    env = {**os.environ, "PYTHONPATH": pp, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(port), str(TESTS / "_mp_worker.py"), str(world), str(out), *jobs]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.slow
def test_two_process_gloo_run_normalises_tokens_globally(tmp_path):
    world = build_world(tmp_path / "world")
    run_dir = tmp_path / "run"
    out = _torchrun(tmp_path, world, 29533, f"tokens:kd:{run_dir}")
    r0 = json.loads((out / "tokens-rank0.json").read_text())
    r1 = json.loads((out / "tokens-rank1.json").read_text())
    assert len(r0["seen"]) == len(r1["seen"]) == 8  # 4 steps x 2 micro-batches per process
    for step in range(1, 5):
        m0 = [s for s in r0["seen"] if s["step"] == step]
        m1 = [s for s in r1["seen"] if s["step"] == step]
        g = {s["global"] for s in m0 + m1}
        assert len(g) == 1  # every micro-batch of every process normalises by the same count
        assert g.pop() == sum(s["local"] for s in m0 + m1)  # = all supervised tokens of the step
        assert sum(s["local"] for s in m0) != sum(s["local"] for s in m0 + m1)
    s = r0["summary"]
    assert s["steps"] == 4 and s["skipped_batches"] == 0 and s["final_loss"] is not None
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert (run_dir / "train_summary.json").is_file()


@pytest.mark.slow
def test_two_processes_equal_one_process_and_skip_the_same_steps(tmp_path):
    """(1) sft and kd: 2 processes × micro-batch 4 × GA 2 end with the weights of 1 process ×
    micro-batch 4 × GA 4 (the same 16 examples per step), within fp32 tolerance, and the two
    processes hold bit-identical weights. (2) A step with no supervised token on rank 1 only (the
    step's global count below min_supervised_tokens) and a step with a NaN in rank 1's teacher
    hidden states only: both processes skip both steps (same reasons, weights unchanged by them,
    equal across processes) and the run finishes (no collective left waiting)."""
    import _mp_worker

    from slmkd import training as T

    world = build_world(tmp_path / "world")
    out = _torchrun(tmp_path, world, 29534, f"equal-sft:sft:{tmp_path / 'ddp-sft'}",
                    f"equal-kd:kd:{tmp_path / 'ddp-kd'}", f"guard:kd:{tmp_path / 'ddp-guard'}")
    torch.set_num_threads(1)
    for method in ("sft", "kd"):
        cfg = make_cfg(world, **{"train.max_steps": 4, "train.batch_size": 4,
                                 "train.grad_accum_steps": 4})
        res = T.train(cfg, method, "student_small", 1, run_dir=tmp_path / f"one-{method}")
        one = load_file(str(res.final_dir / "model.safetensors"))
        r0, r1 = (torch.load(out / f"equal-{method}-rank{r}.pt") for r in (0, 1))
        assert r0["summary"]["skipped_batches"] == 0
        w0, w1 = r0["after"][4], r1["after"][4]
        init = r0["after"][0]
        for k in w0:
            assert torch.equal(w0[k], w1[k]), (method, k)  # DDP: one update on both ranks
            torch.testing.assert_close(w0[k], one[k], rtol=2e-4, atol=2e-6, msg=(method, k))
        assert any(not torch.equal(w0[k], init[k]) for k in w0)

    g0, g1 = (torch.load(out / f"guard-rank{r}.pt") for r in (0, 1))
    expected = {"too_few_supervised_tokens": 1, "nonfinite_teacher": 1}
    assert g0["guard"]["reasons"] == g1["guard"]["reasons"] == expected
    assert g0["guard"]["steps"] == g1["guard"]["steps"] == 4
    assert [d["step"] for d in g0["guard"]["details"]] == [2, 3]
    assert g0["guard"]["details"][0]["supervised_tokens"] < _mp_worker.GUARD_MIN_TOKENS
    for g in (g0, g1):
        a = g["after"]
        for k in a[0]:
            assert torch.equal(a[1][k], a[2][k]) and torch.equal(a[2][k], a[3][k]), k  # skipped
            assert torch.equal(g0["after"][4][k], g1["after"][4][k]), k
        assert any(not torch.equal(a[3][k], a[4][k]) for k in a[0])  # step 4 trains
        assert any(not torch.equal(a[0][k], a[1][k]) for k in a[0])  # step 1 trains
    assert g0["summary"]["skipped_reasons"] == expected
