"""Two CPU processes (torchrun, gloo): data-parallel KD training with global token normalisation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("slmkd.losses")

from _train_world import build_world  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.mark.slow
def test_two_process_gloo_run_normalises_tokens_globally(tmp_path):
    world = build_world(tmp_path / "world")
    out = tmp_path / "out"
    out.mkdir()
    run_dir = tmp_path / "run"
    pp = os.pathsep.join(x for x in (str(TESTS.parent), os.environ.get("PYTHONPATH", "")) if x)
    env = {**os.environ, "PYTHONPATH": pp, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", "29533", str(TESTS / "_mp_worker.py"), str(world), str(run_dir),
           str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
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
