"""slmkd.report on synthetic predictions."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest

from slmkd.evaluation import summarize_predictions
from slmkd.report import add_report_command, build_report, write_report

STUDENT = "tiny-qwen2-student-s"
TASKS = ["navigate", "snarks"]


def _write_eval(root: Path, slug: str, dataset: str, correct: list[bool], **meta) -> None:
    d = root / "eval" / slug / dataset
    d.mkdir(parents=True)
    rows = []
    for i, c in enumerate(correct):
        task = TASKS[i % 2] if dataset == "bbh" else None
        rows.append({"id": f"{dataset}-{i:03d}", "dataset": dataset, "task": task,
                     "question": f"q{i}", "raw_output": "x", "extracted": "1", "target": "1",
                     "correct": c, "strict_correct": c, "flexible_correct": c})
    (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = summarize_predictions(rows, dataset, n_resamples=200)
    s.update({"model": slug, **meta})
    (d / "summary.json").write_text(json.dumps(s))


def _write_run(root: Path, method: str, seed: int, skipped: float) -> None:
    d = root / "runs" / method / STUDENT / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "train_summary.json").write_text(json.dumps({
        "method": method, "student": STUDENT, "seed": seed, "final_model_dir": "final",
        "steps": 100, "skipped_batches": int(skipped * 100), "skipped_fraction": skipped,
        "final_loss": 0.5, "final_ce": 0.4, "final_kd": 0.1 if method != "sft" else None,
        "wall_time_s": 12.0}))


@pytest.fixture
def drive(tmp_path):
    root = tmp_path / "drive"
    n = 60
    for seed in (0, 1, 2):
        # sft: 50% right; kd: sft + 18 extra items right (clearly better);
        # cascod: sft with one item flipped each way (no difference)
        sft = [i % 2 == 0 for i in range(n)]
        kd = [c or (i % 2 == 1 and i < 36 + 2 * seed) for i, c in enumerate(sft)]
        cas = list(sft)
        cas[0], cas[1] = False, True
        for m, c in (("sft", sft), ("kd", kd), ("cascod", cas)):
            slug = f"{m}__{STUDENT}__seed{seed}"
            meta = {"kind": "run", "method": m, "student": STUDENT, "seed": seed}
            _write_eval(root, slug, "gsm8k", c, **meta)
            _write_eval(root, slug, "bbh", c[:20], **meta)
            _write_run(root, m, seed, 0.01 * seed)
    base = [i % 4 == 0 for i in range(n)]
    _write_eval(root, STUDENT, "gsm8k", base, kind="base", method=None, student=STUDENT,
                seed=None)
    _write_eval(root, STUDENT, "bbh", base[:20], kind="base", method=None, student=STUDENT,
                seed=None)
    _write_eval(root, "tiny-qwen2-teacher", "gsm8k", [True] * 50 + [False] * 10,
                kind="teacher", method=None, student=None, seed=None)
    return root


def test_report_files_and_plain_verdicts(drive):
    res = build_report(None, drive)
    out = drive / "report"
    assert res.path == out / "report.md"
    text = res.path.read_text()
    # kd: 18 + seed extra items over 60 for each seed -> (18+19+20) / 180 = +31.7 pts,
    # n10 = 57, n01 = 0 over 180 pooled pairs -> McNemar p = 2 * 0.5**57
    assert "**Does kd beat CoT-SFT on tiny-qwen2-student-s (gsm8k)? Yes.**" in text
    assert "kd vs sft on tiny-qwen2-student-s (gsm8k): +31.7 pts" in text
    assert "over 3 seeds (180 paired items) — significantly better" in text
    # cascod differs from sft on two items per seed, one each way: Δ = 0, p = 1
    assert "**Does cascod beat CoT-SFT on tiny-qwen2-student-s (gsm8k)? No.**" in text
    assert "cascod vs sft on tiny-qwen2-student-s (gsm8k): +0.0 pts" in text
    assert "McNemar p=1 over 3 seeds" in text
    assert "Teacher (tiny-qwen2-teacher) on gsm8k: 83.3%" in text
    assert "## BBH per task" in text and "| navigate |" in text
    assert "## Training health" in text and "kd/tiny-qwen2-student-s/seed2" in text
    for png in ("accuracy_gsm8k.png", "accuracy_bbh.png", "bbh_per_task.png",
                "training_health.png"):
        assert (out / png).stat().st_size > 1000, png
    assert {p.name for p in res.figures} >= {"accuracy_gsm8k.png", "bbh_per_task.png"}
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * 9 + 2 + 1
    sft0 = next(r for r in rows if r["model"] == f"sft__{STUDENT}__seed0"
                and r["dataset"] == "gsm8k")
    assert float(sft0["accuracy"]) == pytest.approx(0.5)
    comps = list(csv.DictReader((out / "comparisons.csv").open()))
    pooled = [c for c in comps if c["seed"] == "pooled"]
    # per dataset: kd vs sft, kd vs base, cascod vs sft, cascod vs base, sft vs base
    assert len(pooled) == 2 * 5
    kd_base = next(c for c in pooled if c["dataset"] == "gsm8k" and c["method"] == "kd"
                   and c["baseline"] == "base")
    # base is right on i % 4 == 0 (15/60), a subset of kd's right answers
    assert float(kd_base["acc_baseline"]) == pytest.approx(0.25)
    assert int(kd_base["n01"]) == 0
    per_seed = [c for c in comps if c["seed"] == "1" and c["method"] == "kd"
                and c["baseline"] == "sft" and c["dataset"] == "gsm8k"]
    assert len(per_seed) == 1 and float(per_seed[0]["diff"]) == pytest.approx(19 / 60)
    assert "kd" in res.headline and "+31.7" in res.headline
    assert write_report(None, drive) == res.path  # rerun overwrites in place


def test_report_empty_drive(tmp_path):
    res = build_report(None, tmp_path)
    text = res.path.read_text()
    assert "No paired comparison against CoT-SFT" in text
    assert "no trained runs" in res.headline


def test_report_cli_parser():
    parser = argparse.ArgumentParser()
    add_report_command(parser.add_subparsers(dest="cmd"))
    a = parser.parse_args(["report", "--drive-root", "/x"])
    assert a.drive_root == "/x" and callable(a.func)
