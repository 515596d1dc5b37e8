"""benchmarks/train_step.py runs end to end on CPU with scaled-down configurations."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("slmkd.losses")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def test_train_step_benchmark_cpu_two_steps(tmp_path):
    spec = importlib.util.spec_from_file_location("train_step_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "res.json"
    assert mod.main(["--tiny", "--steps", "2", "--warmup", "1", "--batch-size", "2",
                     "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["configs"] == "tiny (scaled down)" and res["steps_measured"] == 2
    assert res["tokens_per_s"] > 0 and res["step_time_s"] > 0
    assert res["student_matmul_params"] < res["teacher_matmul_params"]
    assert res["skipped_steps"] == 0
    # MFU definition: (6·N_s + 2·N_t)·tokens / time / peak
    flops = (6 * res["student_matmul_params"] + 2 * res["teacher_matmul_params"]) * 2 * 64
    assert res["achieved_tflops"] == pytest.approx(flops / res["step_time_s"] / 1e12)


def test_cascod_rows_benchmark_cpu(tmp_path, monkeypatch):
    """benchmarks/cascod_rows.py: both layouts on the same pairs, B vs 2B rows, equal losses."""
    import sys

    script = SCRIPT.parent / "cascod_rows.py"
    spec = importlib.util.spec_from_file_location("cascod_rows_bench", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "res.json"
    monkeypatch.setattr(sys, "argv", ["cascod_rows.py", "--tiny", "--repeats", "1",
                                      "--out", str(out)])
    mod.main()
    res = json.loads(out.read_text())
    assert res["rows_shared"] == 4 and res["rows_stacked"] == 8
    assert res["tokens_shared"] < res["tokens_stacked"]
    assert res["loss_shared"] == pytest.approx(res["loss_stacked"], rel=1e-5)
