"""`slmkd run` end to end on a shortened tiny study, then resumed (every stage skipped)."""

import json

import pytest

from slmkd.cli import main

pytestmark = pytest.mark.slow

SHORT = {
    "tiny": {"num_train": 600, "num_test": 40, "teacher_pretrain_steps": 300},
    "train": {"max_steps": 6, "save_steps": 3, "log_every": 2},
    "generation": {"limit": 48, "keep_incorrect": True},
    "evaluation": {"gsm8k_limit": 16, "batch_size": 16},
}


def test_run_shortened_study_then_resume_skips_everything(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLMKD_NUM_THREADS", "1")
    conf = tmp_path / "short.json"
    conf.write_text(json.dumps(SHORT))
    root = tmp_path / "drive"
    args = ["run", "--profile", "tiny", "--config", str(conf), "--drive-root", str(root),
            "--methods", "sft", "kd", "cascod", "--seeds", "1", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "slmkd study plan — profile tiny" in out and "estimated" in out
    report = root / "report" / "report.md"
    assert report.is_file() and (root / "report" / "results.csv").is_file()
    text = report.read_text()
    for method in ("kd", "cascod"):
        assert f"Does {method} beat CoT-SFT on tiny-qwen2-student-s" in text
    assert "McNemar" in text
    for method in ("sft", "kd", "cascod"):
        for seed in (1, 2):
            run = root / "runs" / method / "tiny-qwen2-student-s" / f"seed{seed}"
            assert (run / "train_summary.json").is_file() and (run / "final").is_dir()
            ev = root / "eval" / f"{method}__tiny-qwen2-student-s__seed{seed}" / "gsm8k"
            rows = (ev / "predictions.jsonl").read_text().splitlines()
            assert len(rows) == 16 and len({json.loads(r)["id"] for r in rows}) == 16
    for base in ("tiny-qwen2-student-s", "tiny-qwen2-teacher"):
        assert (root / "eval" / base / "gsm8k" / "summary.json").is_file()

    stamps = {p: p.stat().st_mtime_ns for p in root.glob("runs/*/*/*/train_summary.json")}
    assert main(args) == 0  # rerun: everything is complete, only the report is rewritten
    out = capsys.readouterr().out
    assert "0 to run" in out
    assert stamps == {p: p.stat().st_mtime_ns for p in root.glob("runs/*/*/*/train_summary.json")}


_ORPHAN_SCRIPT = """
import multiprocessing as mp, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from slmkd.pipeline import _worker_init

def work(path):
    open(path, "w").write(str(os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(os.getpid(),)) as pool:
        pool.submit(work, sys.argv[1])
        time.sleep(120)
"""


@pytest.mark.slow
def test_study_workers_exit_when_the_study_process_is_killed(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    script, pid_file = tmp_path / "orphan.py", tmp_path / "worker.pid"
    script.write_text(_ORPHAN_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)])
    try:
        for _ in range(120):
            if pid_file.is_file() and pid_file.read_text():
                break
            time.sleep(0.5)
        worker = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        for _ in range(20):  # the worker's watcher polls every 2 s
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the worker outlived the killed study process")
    finally:
        if parent.poll() is None:
            parent.kill()
