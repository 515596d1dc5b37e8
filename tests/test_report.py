"""slmkd.report on synthetic eval/ folders (seed × item statistics, refusal on item mismatch)."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from slmkd import stats
from slmkd.cli import add_report_command
from slmkd.report import build_report, item_ids_hash, write_report

STUDENT = "tiny-qwen2-student-s"
TASKS = ["navigate", "snarks"]


def _write_eval(root: Path, slug: str, dataset: str, correct: list[bool], *, legacy: bool = False,
                ids: list[str] | None = None, record_hash: bool = True, hash_override: str | None = None,
                **meta) -> None:
    """An eval folder as the evaluator writes it: predictions.jsonl (strict / flexible / lenient
    per row, or only ``correct`` when ``legacy``), summary.json and eval_meta.json."""
    d = root / "eval" / slug / dataset
    d.mkdir(parents=True)
    ids = ids or [f"{dataset}-{i:03d}" for i in range(len(correct))]
    rows = []
    for i, (rid, c) in enumerate(zip(ids, correct)):
        row = {"id": rid, "dataset": dataset, "task": TASKS[i % 2] if dataset == "bbh" else None,
               "question": f"q{i}", "raw_output": "x", "extracted": "1", "target": "1",
               "correct": c}
        if not legacy:  # strict misses every item i % 10 == 0 (e.g. no final-answer period)
            row.update(strict=c and i % 10 != 0, flexible=c, lenient=c)
        rows.append(row)
    (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    h = hash_override or hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
    summary = {"model": slug, "dataset": dataset, "n": len(rows),
               "accuracy": sum(correct) / len(correct), **meta}
    if record_hash:
        summary["item_ids_hash"] = h
        (d / "eval_meta.json").write_text(json.dumps({"item_ids_hash": h, "dataset": dataset}))
    (d / "summary.json").write_text(json.dumps(summary))


def _write_run(root: Path, method: str, seed: int, skipped: float) -> None:
    d = root / "runs" / method / STUDENT / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "train_summary.json").write_text(json.dumps({
        "method": method, "student": STUDENT, "seed": seed, "final_model_dir": "final",
        "steps": 100, "skipped_batches": int(skipped * 100), "skipped_fraction": skipped,
        "final_loss": 0.5, "final_ce": 0.4, "final_kd": 0.1 if method != "sft" else None,
        "wall_time_s": 12.0}))


N = 60


def _sft(seed: int) -> list[bool]:
    return [i % 2 == 0 for i in range(N)]


def _kd(seed: int) -> list[bool]:  # sft + 18 / 19 / 20 extra items right
    return [c or (i % 2 == 1 and i < 36 + 2 * seed) for i, c in enumerate(_sft(seed))]


def _cascod(seed: int) -> list[bool]:  # sft with one item flipped each way
    c = _sft(seed)
    c[0], c[1] = False, True
    return c


BASE = [i % 4 == 0 for i in range(N)]


def _drive(root: Path, *, legacy: bool = False, record_hash: bool = True) -> Path:
    for seed in (0, 1, 2):
        for m, fn in (("sft", _sft), ("kd", _kd), ("cascod", _cascod)):
            slug = f"{m}__{STUDENT}__seed{seed}"
            meta = {"kind": "run", "method": m, "student": STUDENT, "seed": seed}
            c = fn(seed)
            _write_eval(root, slug, "gsm8k", c, legacy=legacy, record_hash=record_hash, **meta)
            _write_eval(root, slug, "bbh", c[:20], legacy=legacy, record_hash=record_hash, **meta)
            _write_run(root, m, seed, 0.01 * seed)
    for ds, c in (("gsm8k", BASE), ("bbh", BASE[:20])):
        _write_eval(root, STUDENT, ds, c, legacy=legacy, record_hash=record_hash, kind="base",
                    method=None, student=STUDENT, seed=None)
    _write_eval(root, "tiny-qwen2-teacher", "gsm8k", [True] * 50 + [False] * 10, legacy=legacy,
                record_hash=record_hash, kind="teacher", method=None, student=None, seed=None)
    return root


@pytest.fixture
def drive(tmp_path):
    return _drive(tmp_path / "drive")


def _comparisons(root: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((root / "report" / "comparisons.csv").open()))


def test_report_verdicts_tables_and_figures(drive):
    res = build_report(None, drive)
    out = drive / "report"
    assert res.path == out / "report.md"
    text = res.path.read_text()
    # kd − sft per seed: 18/60, 19/60, 20/60 -> +31.7 pts; seed sd 1.67 pts -> significant
    assert "**Does kd beat CoT-SFT on tiny-qwen2-student-s (gsm8k)? Yes.**" in text
    assert "kd − sft (strict): +31.7 pts" in text
    assert "k = 3 seeds, n = 60 items — significantly better" in text
    # cascod − sft: two items flipped in opposite directions; under strict item 0 was already
    # wrong, so +1 item (+1.7 pts) on every seed, from one item: not significant
    assert "**Does cascod beat CoT-SFT on tiny-qwen2-student-s (gsm8k)? No.**" in text
    assert "cascod − sft (strict): +1.7 pts" in text
    assert "n/a (same Δ on every seed)" in text
    # family: per dataset kd−sft, kd−base, cascod−sft, cascod−base, sft−base; Holm over all 10
    assert "Holm-adjusted over the 10 comparisons" in text
    comps = _comparisons(drive)
    assert len(comps) == 10
    assert {c["metric"] for c in comps} == {"strict"}
    kd_sft = next(c for c in comps if c["dataset"] == "gsm8k" and c["method"] == "kd"
                  and c["baseline"] == "sft")
    assert float(kd_sft["diff"]) == pytest.approx(19 / 60)
    assert kd_sft["verdict"] == "significantly better" and kd_sft["k"] == "3"
    assert [float(x) for x in kd_sft["per_seed_diff"].split()] == pytest.approx([0.3, 19 / 60, 1 / 3])
    p = [float(c["p"]) for c in comps]
    assert [float(c["p_holm"]) for c in comps] == pytest.approx(list(stats.holm(p)))
    cas_sft = next(c for c in comps if c["dataset"] == "gsm8k" and c["method"] == "cascod"
                   and c["baseline"] == "sft")
    assert cas_sft["verdict"] == "no significant difference" and float(cas_sft["p"]) > 0.3
    # the base student (evaluated once) is one vector over n = 60 items, not 3 × 60 pairs
    kd_base = next(c for c in comps if c["dataset"] == "gsm8k" and c["method"] == "kd"
                   and c["baseline"] == "base")
    assert kd_base["n_items"] == "60" and kd_base["baseline_evaluated_once"] == "True"
    # strict misses items i % 10 == 0: base right on i % 4 == 0 (15), strict 15 − 3 = 12 of 60
    assert float(kd_base["acc_baseline"]) == pytest.approx(12 / 60)
    # accuracy tables: strict is the headline, flexible and lenient beside it, with k, n and CIs
    assert "strict (%) ← headline" in text and "lenient (%)" in text
    assert "| tiny-qwen2-student-s | sft | 3 | 60 | 40.0 ± 0.0 [" in text  # strict 24/60
    assert "[40.0, 40.0]" not in text  # a constant accuracy still gets an honest interval
    accs = list(csv.DictReader((out / "accuracy.csv").open()))
    sft_len = next(a for a in accs if a["dataset"] == "gsm8k" and a["model"] == "sft"
                   and a["metric"] == "lenient")
    assert float(sft_len["mean"]) == pytest.approx(0.5) and sft_len["k"] == "3"
    assert float(sft_len["ci_low"]) < 0.5 < float(sft_len["ci_high"])
    base_acc = next(a for a in accs if a["dataset"] == "gsm8k" and a["model"] == "base"
                    and a["metric"] == "lenient")
    assert base_acc["interval"] == "Wilson over items" and base_acc["k"] == "1"
    # methods paragraph, MDD line, BBH macro + micro + per-task, supplementary McNemar
    assert "comparable with published lm-eval numbers" in text
    assert "gsm8k_cot_zeroshot" in text
    assert "cannot be told apart at 80% power" in text and "With k = 3 seeds and n = 60 items" in text
    assert "strict macro (%) ← headline" in text and "strict micro (%)" in text
    assert "## BBH per task" in text and "| navigate | 10 |" in text
    assert "## Supplementary: per-seed exact McNemar (conditional on these checkpoints)" in text
    assert "**no verdict**" in text
    mcn = list(csv.DictReader((out / "mcnemar_per_seed.csv").open()))
    kd1 = next(r for r in mcn if r["dataset"] == "gsm8k" and r["method"] == "kd"
               and r["baseline"] == "sft" and r["seed"] == "1")
    assert (kd1["n10"], kd1["n01"]) == ("19", "0")
    assert "## Training health" in text and "kd/tiny-qwen2-student-s/seed2" in text
    for png in ("accuracy_gsm8k.png", "accuracy_bbh.png", "forest.png", "bbh_per_task.png",
                "training_health.png"):
        assert (out / png).stat().st_size > 1000, png
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * 9 + 2 + 1
    sft0 = next(r for r in rows if r["model"] == f"sft__{STUDENT}__seed0" and r["dataset"] == "gsm8k")
    assert float(sft0["accuracy_lenient"]) == pytest.approx(0.5)
    assert float(sft0["accuracy_strict"]) == pytest.approx(0.4)
    assert sft0["item_ids_hash_computed"] == sft0["item_ids_hash_recorded"]
    assert "kd" in res.headline and "+31.7" in res.headline
    assert write_report(None, drive) == res.path  # rerun overwrites in place


def test_report_legacy_rows_fall_back_to_lenient(tmp_path):
    root = _drive(tmp_path / "d", legacy=True, record_hash=False)
    text = build_report(None, root).path.read_text()
    assert "lenient (%) ← headline" in text
    assert "kd − sft (lenient): +31.7 pts" in text
    assert {c["metric"] for c in _comparisons(root)} == {"lenient"}
    assert "| tiny-qwen2-student-s | sft | 3 | 60 | n/a | n/a | 50.0 ± 0.0 [" in text


def test_report_refuses_different_item_sets(tmp_path):
    root = _drive(tmp_path / "d")
    # a fourth sft seed evaluated on other items (ids shifted by one): same n, other set
    ids = [f"gsm8k-{i:03d}" for i in range(1, N + 1)]
    _write_eval(root, f"sft__{STUDENT}__seed3", "gsm8k", _sft(3), ids=ids, kind="run",
                method="sft", student=STUDENT, seed=3)
    with pytest.raises(ValueError, match="different item sets") as exc:
        build_report(None, root)
    msg = str(exc.value)
    assert f"eval/sft__{STUDENT}__seed0/gsm8k" in msg and f"eval/sft__{STUDENT}__seed3/gsm8k" in msg


def test_report_refuses_on_recorded_hash_and_without_hash(tmp_path):
    # same ids in the predictions but the recorded hashes differ (e.g. another subset setting)
    root = _drive(tmp_path / "a")
    d = root / "eval" / STUDENT / "gsm8k"
    s = json.loads((d / "summary.json").read_text())
    s["item_ids_hash"] = "0" * 64
    (d / "summary.json").write_text(json.dumps(s))
    with pytest.raises(ValueError, match=f"eval/{STUDENT}/gsm8k"):
        build_report(None, root)
    # no hash recorded anywhere: computed from the predictions' ids
    root = _drive(tmp_path / "b", record_hash=False)
    (root / "eval" / STUDENT / "bbh").joinpath("predictions.jsonl").write_text("".join(
        json.dumps({"id": f"other-{i}", "task": TASKS[i % 2], "correct": True, "strict": True,
                    "flexible": True, "lenient": True}) + "\n" for i in range(20)))
    with pytest.raises(ValueError, match="different item sets"):
        build_report(None, root)
    assert item_ids_hash(["b", "a"]) == hashlib.sha256(b"a\nb").hexdigest()


def test_report_single_seed_gets_no_verdict(tmp_path):
    root = tmp_path / "d"
    for m, fn in (("sft", _sft), ("kd", _kd)):
        _write_eval(root, f"{m}__{STUDENT}__seed0", "gsm8k", fn(0), kind="run", method=m,
                    student=STUDENT, seed=0)
    text = build_report(None, root).path.read_text()
    assert "Does kd beat CoT-SFT on tiny-qwen2-student-s (gsm8k)? Not established.**" in text
    c = _comparisons(root)[0]
    assert c["verdict"].startswith("no verdict") and math.isnan(float(c["p_holm"]))


def test_report_comparison_matches_estimator(drive):
    """The report's kd − base numbers are the estimator on (3 × 60 kd matrix) − (base vector)."""
    build_report(None, drive)
    kd = np.array([[float(c and i % 10 != 0) for i, c in enumerate(_kd(s))] for s in (0, 1, 2)])
    base = np.array([float(c and i % 10 != 0) for i, c in enumerate(BASE)])
    ref = stats.seed_item_difference(kd, base)
    row = next(c for c in _comparisons(drive) if c["dataset"] == "gsm8k" and c["method"] == "kd"
               and c["baseline"] == "base")
    assert float(row["diff"]) == pytest.approx(ref.diff)
    assert float(row["ci_low"]) == pytest.approx(ref.ci_low)
    assert float(row["p"]) == pytest.approx(ref.pvalue)


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


# -- CasCoD error propagation per method ----------------------------------------------------------
def _write_errprop(root: Path, method: str, seed: int, acc: float, teacher: float, own: float):
    d = root / "eval" / f"{method}__{STUDENT}__seed{seed}" / "gsm8k"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({
        "kind": "run", "method": method, "seed": seed, "student": STUDENT, "dataset": "gsm8k",
        "accuracy": acc + 0.5, "accuracy_strict": acc}))  # strict is the one reported
    (d / "error_propagation.json").write_text(json.dumps({
        "n": 300, "acc_teacher_rationale": teacher, "acc_own_rationale": own,
        "propagation_gap": teacher - own}))


def test_error_propagation_by_method_is_the_mean_and_sd_over_seeds(tmp_path, capsys):
    from slmkd.report import error_propagation_by_method, show_error_propagation
    from slmkd.report.cascade import error_propagation_markdown

    assert show_error_propagation(tmp_path) == []
    assert "No CasCoD run evaluated" in capsys.readouterr().out
    _write_errprop(tmp_path, "cascod", 1, 0.90, 0.96, 0.90)
    _write_errprop(tmp_path, "cascod", 2, 0.80, 0.94, 0.80)
    _write_errprop(tmp_path, "cascod-2stage", 1, 0.99, 0.96, 0.99)
    joint, two = error_propagation_by_method(tmp_path)
    assert (joint["method"], joint["seeds"], two["method"], two["seeds"]) == (
        "cascod", 2, "cascod-2stage", 1)
    assert joint["accuracy_mean"] == pytest.approx(0.85)
    assert joint["accuracy_sd"] == pytest.approx(math.sqrt(0.005))  # sample sd of 0.9, 0.8
    assert joint["acc_teacher_rationale_mean"] == pytest.approx(0.95)
    assert joint["acc_own_rationale_mean"] == pytest.approx(0.85)
    assert joint["gap_mean"] == pytest.approx(0.10) and joint["gap_sd"] == pytest.approx(
        math.sqrt(0.0032))  # gaps 0.06, 0.14
    assert two["gap_mean"] == pytest.approx(-0.03) and two["gap_sd"] == 0.0
    md = "\n".join(error_propagation_markdown(tmp_path))
    assert f"| cascod | {STUDENT} | gsm8k | 2 | 85.0 ± 7.1 | 95.0 ± 1.4 | 85.0 ± 7.1 | 10.0 ± 5.7 |" in md
    assert f"| cascod-2stage__{STUDENT}__seed1 | gsm8k | 300 | 99.0 | 96.0 | 99.0 | -3.0 |" in md
    show_error_propagation(tmp_path)
    assert "| cascod-2stage |" in capsys.readouterr().out
