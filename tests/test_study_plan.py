"""`slmkd plan`'s budget: JSON keys, the 40 GB design, what does not fit, the Drive arithmetic,
the cached teacher and the 14B escalation teacher."""

from __future__ import annotations

import dataclasses
import json

import pytest

from slmkd.config import ConfigError, load_config
from slmkd.planner import PRESETS
from slmkd.study_plan import (
    CONSTANTS,
    EXIT_DISK,
    EXIT_DRIVE,
    EXIT_GPU,
    GB,
    KINDS,
    STAGES,
    generation_vram_gib,
    plan_study_budget,
    set_constant,
)

#: The design recommended for a100-40g: LoRA (r=16) for both students, the micro-batch of the
#: 80 GB profile, and the teacher in bf16 for the CoT, the KD and its evaluation.
RECOMMENDED_40G = {
    "train.use_lora": True, "train.lora_r": 16, "train.lora_alpha": 32,
    "train.learning_rate": 2e-4, "train.optim": "adamw_torch_fused",
    "train.batch_size": 4, "train.grad_accum_steps": 4,
    "models.teacher_load_in_4bit": False,
    "generation.batch_size": 128, "evaluation.batch_size": 48,
}
ALL_METHODS = ["sft", "kd", "cascod", "cascod-2stage", "cascod-kd"]
#: the profiles before the storage/VRAM issue: full fine-tuning with fp32 AdamW states on 80 GB;
#: 4-bit teacher + 8-bit AdamW + micro-batch 2 on 40 GB
OLD_80G = {"train.optim": "adamw_torch_fused", "generation.batch_size": 64,
           "evaluation.batch_size": 64}
OLD_40G = {"train.use_lora": False, "train.learning_rate": 3e-5, "train.optim": "adamw_bnb_8bit",
           "train.batch_size": 2, "train.grad_accum_steps": 8,
           "models.teacher_load_in_4bit": True, "generation.batch_size": 32,
           "evaluation.batch_size": 32}


def _cfg(profile: str, overrides: dict | None = None):
    """``load_config`` with ``overrides``; fields the config does not have yet (the trainer's
    storage policy and the teacher cache land concurrently) are set as attributes, which is how
    the plan reads them (``getattr`` with a default)."""
    overrides = dict(overrides or {})
    try:
        return load_config(profile, overrides=overrides, environ={})
    except ConfigError:
        pass
    cfg = load_config(profile, environ={})
    known, later = {}, {}
    for path, value in overrides.items():
        section, name = path.rsplit(".", 1) if "." in path else ("", path)
        obj = getattr(cfg, section) if section else cfg
        fields = {f.name for f in dataclasses.fields(obj)}
        (known if name in fields else later)[path] = value
    cfg = load_config(profile, overrides=known, environ={})
    for path, value in later.items():
        section, name = path.rsplit(".", 1)
        setattr(getattr(cfg, section), name, value)
    return cfg


def test_json_keys_and_format():
    b = plan_study_budget(_cfg("a100-80g"))
    d = b.to_json()
    json.dumps(d)  # serialisable
    for k in ("total_hours", "stage_hours", "local_peak_gb", "drive_peak_gb", "drive_final_gb",
              "fits", "problems", "runs", "constants", "exit_code", "gap_to_floor_hours",
              "escalation"):
        assert k in d, k
    assert set(d["stage_hours"]) == set(STAGES)
    assert d["total_hours"] == pytest.approx(sum(d["stage_hours"].values()), abs=0.01)
    assert len(d["runs"]) == 2 * 3 * 3  # students x default methods x seeds
    for r in d["runs"]:
        for k in ("method", "student", "seed", "vram_gib", "fits", "hours", "checkpoint_gb",
                  "final_gb"):
            assert k in r, k
    # notebook order: 02 (sft, kd) then 03 (cascod); method -> student -> seed
    assert [r["method"] for r in d["runs"]][:6] == ["sft"] * 6
    assert [r["method"] for r in d["runs"]][-6:] == ["cascod"] * 6
    assert d["runs"][0]["student"] == "Qwen2.5-3B-Instruct" and d["runs"][0]["seed"] == 42
    for c in d["constants"]:
        assert set(c) == {"name", "value", "unit", "source", "kind"} and c["kind"] in KINDS
    text = b.format()
    for stage in STAGES:
        assert stage in text
    assert "total" in text and "Drive peak" in text and "local disk peak" in text
    assert "kd Qwen2.5-3B-Instruct" in text


def test_constants_name_their_source():
    measured = [c for c in CONSTANTS.values() if c.kind == "measured"]
    assert measured and all(c.source for c in CONSTANTS.values())
    gen = CONSTANTS["gen_7b_h200_b256_tps"]
    assert gen.value == 4156 and "H200" in gen.source and "2026-11-26" in gen.source
    assert CONSTANTS["gen_step_fixed_ms_h200"].kind == "derived"
    assert CONSTANTS["train_mfu"].kind == "assumed"  # no CUDA train step measured yet
    # the derived decode-step line reproduces both measured points
    for b, tps in ((64, 2856), (256, 4156)):
        ms = CONSTANTS["gen_step_fixed_ms_h200"].value + CONSTANTS[
            "gen_step_per_row_ms_h200"].value * b
        assert b / ms * 1e3 == pytest.approx(tps, rel=1e-3)
    # the KV-cache model reproduces the measured H200 generation peaks (GiB)
    spec = PRESETS["qwen2.5-7b"]
    for b, peak in ((64, 16.6), (256, 23.5)):
        total = generation_vram_gib(spec, b, 150 + 200)
        assert peak < total < peak * 1.2  # total adds CUDA context and fragmentation


@pytest.mark.parametrize("methods", [None, ALL_METHODS])
def test_a100_40g_recommended_design_fits(methods):
    cfg = _cfg("a100-40g", RECOMMENDED_40G)
    b = plan_study_budget(cfg, methods=methods)
    assert b.vram_limit_gib == pytest.approx(38.0)
    for r in b.runs:
        assert r.fits and r.vram_gib <= 38.0, (r.method, r.student, r.vram_gib)
    for what, v in {**b.teacher_vram_gib, **b.eval_vram_gib}.items():
        assert v <= 38.0, what
    assert not [p for p in b.problems if p.startswith("GPU")]
    if methods is None:
        assert b.fits and b.exit_code == 0
        assert b.teacher_precision == "bf16"  # one precision for CoT, KD and evaluation
    # with the cached teacher (issue 18) it fits too, and the KD runs need less memory
    cached = plan_study_budget(_cfg("a100-40g", {**RECOMMENDED_40G, "kd.teacher_source": "cached"}),
                               methods=methods)
    assert all(r.fits for r in cached.runs)
    live_kd = max(r.vram_gib for r in b.runs if r.method == "kd")
    assert max(r.vram_gib for r in cached.runs if r.method == "kd") < live_kd


def test_a100_40g_as_configured_does_not_fit_the_3b_student():
    """The old 40 GB profile (full fine-tuning of 3B) does not fit; the new one (LoRA) does."""
    assert plan_study_budget(_cfg("a100-40g")).exit_code == 0
    b = plan_study_budget(_cfg("a100-40g", OLD_40G))
    assert b.exit_code & EXIT_GPU
    bad = {(r.method, r.student) for r in b.runs if not r.fits}
    assert ("sft", "Qwen2.5-3B-Instruct") in bad and ("kd", "Qwen2.5-3B-Instruct") in bad
    assert any("GPU: kd Qwen2.5-3B-Instruct (3 runs)" in p and "short by" in p
               for p in b.problems)


def test_what_does_not_fit_names_the_resource_and_the_shortfall():
    cfg = _cfg("a100-80g", {"train.optim": "adamw_bnb_8bit"})
    ok = plan_study_budget(cfg)
    assert ok.exit_code == 0 and ok.fits
    small_drive = plan_study_budget(cfg, drive_free_gb=15)
    assert small_drive.exit_code == EXIT_DRIVE and not small_drive.fits
    (line,) = [p for p in small_drive.problems if p.startswith("Drive")]
    assert f"short by {small_drive.drive_peak_gb - 15:.1f} GB" in line
    small_gpu = plan_study_budget(cfg, gpu_gib=24)
    assert small_gpu.exit_code & EXIT_GPU
    kd3 = next(r for r in small_gpu.runs if r.method == "kd" and "3B" in r.student)
    line = next(p for p in small_gpu.problems if p.startswith("GPU: kd Qwen2.5-3B"))
    assert f"short by {kd3.vram_gib - (24 - 1.4):.1f} GiB" in line
    small_disk = plan_study_budget(cfg, disk_free_gb=20)
    assert small_disk.exit_code & EXIT_DISK
    assert any(p.startswith("local disk") and "short by" in p for p in small_disk.problems)


def test_a100_80g_defaults_drive_peak_over_100_gb_and_the_8bit_knob():
    """Full AdamW checkpoints (37 GB for 3B) on top of the finals pass 100 GB; 8-bit AdamW
    checkpoints (20 GB) bring the peak under it; fp32 finals would not fit at all."""
    default = plan_study_budget(_cfg("a100-80g", OLD_80G))
    assert default.drive_peak_gb > 100 and default.exit_code == EXIT_DRIVE
    assert plan_study_budget(_cfg("a100-80g")).drive_peak_gb <= 100  # the profile as shipped
    eight = plan_study_budget(_cfg("a100-80g", {"train.optim": "adamw_bnb_8bit"}))
    assert eight.drive_peak_gb <= 100
    fp32 = plan_study_budget(_cfg("a100-80g", {**OLD_80G, "train.final_dtype": "fp32"}))
    assert fp32.drive_final_gb > 1.9 * default.drive_final_gb - 1


def test_drive_peak_arithmetic_by_hand():
    """One 1.5B student, sft, two seeds, a checkpoint every minute (so each run rotates: two
    checkpoints at once), fp32 AdamW."""
    cfg = _cfg("a100-80g", {**OLD_80G, "students": ["student_small"], "methods": ["sft"],
                            "seeds": [1, 2], "train.save_every_minutes": 1.0})
    b = plan_study_budget(cfg, escalation=False)
    n = PRESETS["qwen2.5-1.5b"].num_params  # 1,543,714,304
    ckpt = n * (4 + 8) / GB + 0.02  # fp32 master weights + AdamW states + small files
    final = n * 2 / GB + 0.012  # bf16 final/
    cot = 7473 * 2500 / GB
    assert [r.checkpoint_gb for r in b.runs] == pytest.approx([ckpt, ckpt])
    assert [r.final_gb for r in b.runs] == pytest.approx([final, final])
    assert all(r.checkpoints_written >= 2 for r in b.runs)
    # run 1: two checkpoints; run 2: run 1's final + two checkpoints (> 1 checkpoint + final)
    assert b.drive_peak_gb == pytest.approx(cot + final + 2 * ckpt)
    # after completion: the finals, the CoT and 4 models' predictions (base, teacher, 2 runs)
    ev = 4 * (500 + 27 * 100) * 2000 / GB
    assert b.drive_final_gb == pytest.approx(2 * final + cot + ev)
    # local: the HF cache (teacher + student, bf16) + the largest run's peak: run 2's two
    # checkpoints + run 1's final/, copied to Drive in the background while run 2 trains
    hf = (PRESETS["qwen2.5-7b"].num_params + n) * 2 / GB
    assert b.local_peak_gb == pytest.approx(hf + final + 2 * ckpt)
    # ... and the copy's time counts once, in the grid's last run (the others overlap a run)
    cfg.train.background_final_copy = False
    sync = plan_study_budget(cfg, escalation=False)
    assert sync.local_peak_gb == pytest.approx(hf + 2 * ckpt)
    copy_h = final / 0.08 / 3600  # drive_write_gbps
    assert sync.runs[0].hours - b.runs[0].hours == pytest.approx(copy_h)
    assert sync.runs[1].hours == pytest.approx(b.runs[1].hours)
    cfg.train.background_final_copy = True
    # no checkpoint at all when the interval is longer than the run
    cfg.train.save_every_minutes = 10_000.0
    b = plan_study_budget(cfg, escalation=False)
    assert all(r.checkpoints_written == 0 for r in b.runs)
    assert b.drive_peak_gb == pytest.approx(2 * final + cot + ev)


def test_cached_teacher_lowers_vram_and_removes_teacher_forwards():
    live = plan_study_budget(_cfg("a100-80g"), escalation=False)
    cached = plan_study_budget(_cfg("a100-80g", {"kd.teacher_source": "cached"}), escalation=False)
    lk = [r for r in live.runs if r.method == "kd"]
    ck = [r for r in cached.runs if r.method == "kd"]
    for a, b in zip(lk, ck, strict=True):
        assert b.vram_gib < a.vram_gib - 14  # no bf16 7B teacher on the card
        assert a.teacher_hours > 0 and b.teacher_hours == 0
        assert b.hours < a.hours
    assert live.stage_hours["cache_teacher"] == 0 < cached.stage_hours["cache_teacher"]
    assert cached.stage_hours["train_02"] < live.stage_hours["train_02"]
    assert cached.total_hours < live.total_hours
    # the cache: kept CoT tokens x (k ids x 6 B + one fp32 per temperature)
    kept = 7473 * CONSTANTS["cot_keep_fraction"].value
    per_token = 64 * (4 + 2) + 4 * 3
    expect = kept * CONSTANTS["cot_completion_tokens_mean"].value * per_token / GB
    assert cached.drive_final_parts["teacher cache"] == pytest.approx(expect)
    assert "cache_teacher" in cached.teacher_vram_gib


def test_14b_teacher_escalation_is_planned():
    b = plan_study_budget(_cfg("a100-80g", OLD_80G))
    esc = {e["precision"]: e for e in b.escalation}
    assert set(esc) == {"bf16", "4-bit NF4"}
    assert all(e["teacher"] == "Qwen2.5-14B-Instruct" for e in esc.values())
    assert esc["4-bit NF4"]["teacher_vram_gib"]["cot"] < esc["bf16"]["teacher_vram_gib"]["cot"]
    assert esc["bf16"]["teacher_vram_gib"]["cot"] > 2 * 14.7e9 / 2**30  # bf16 weights alone
    # as the configured teacher (cfg override), with the cached teacher the KD runs fit 80 GB
    cfg = _cfg("a100-80g", {"models.teacher_medium": "Qwen/Qwen2.5-14B-Instruct",
                            "kd.teacher_source": "cached", "evaluation.batch_size": 16,
                            "generation.batch_size": 64})
    big = plan_study_budget(cfg)
    assert big.teacher == "Qwen2.5-14B-Instruct" and not big.escalation
    assert all(r.fits for r in big.runs)
    assert big.teacher_vram_gib["cot"] < 77.8 and big.teacher_vram_gib["evaluate"] < 77.8
    live = plan_study_budget(_cfg("a100-80g", {**OLD_80G,
                                             "models.teacher_medium": "Qwen2.5-14B-Instruct"}))
    assert not next(r for r in live.runs if r.method == "kd" and "3B" in r.student).fits
    assert big.stage_hours["cot"] > b.stage_hours["cot"]


def test_tiny_profile_has_no_gpu_check():
    b = plan_study_budget(_cfg("tiny"))
    assert b.gpu_gib is None and b.fits and b.exit_code == 0
    assert all(r.fits for r in b.runs) and 0 < b.total_hours < 2
    assert b.drive_peak_gb < 1


def test_a_benchmark_can_update_a_constant():
    cfg = _cfg("a100-80g")
    before = plan_study_budget(cfg, escalation=False)
    old = CONSTANTS["train_mfu"]
    try:
        c = set_constant("train_mfu", 0.45, "benchmarks/train_step.py, A100, test")
        assert c.kind == "measured" and c.unit == old.unit
        after = plan_study_budget(cfg, escalation=False)
        assert after.stage_hours["train_02"] < before.stage_hours["train_02"]
        assert {"name": "train_mfu", "value": 0.45, "unit": old.unit,
                "source": "benchmarks/train_step.py, A100, test", "kind": "measured"} in \
            after.to_json()["constants"]
        with pytest.raises(ValueError):
            set_constant("train_mfu", 0.4, "x", kind="guessed")
    finally:
        CONSTANTS["train_mfu"] = old


def test_plan_command(capsys, tmp_path):
    import argparse

    from slmkd.cli import add_plan_command

    parser = argparse.ArgumentParser()
    add_plan_command(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["plan", "--profile", "a100-80g", "--json", "--drive-gb", "15",
                              "--drive-root", str(tmp_path)])
    assert args.func(args) == EXIT_DRIVE
    d = json.loads(capsys.readouterr().out)
    assert d["drive_free_gb"] == 15 and not d["fits"]
    args = parser.parse_args(["plan", "--profile", "tiny", "--detect", "--drive-root", str(tmp_path)])
    assert args.func(args) == 0
    assert "slmkd plan — profile tiny" in capsys.readouterr().out


def test_cascod_2stage_plans_each_stage_its_lm_head_copy_and_its_hf_evaluation():
    """Stage 2 of cascod-2stage is planned as what it is: a LoRA adapter on the frozen bf16
    stage-1 model for ``stage2_epochs``, plus (with ``stage2_train_lm_head``) a trained lm_head
    copy of V × H parameters — fp32 weights, grads and AdamW states in VRAM, fp32 in the saved
    adapter — and the student-rationale generation before it; its evaluation runs on HF (vLLM
    cannot serve an adapter with a trained lm_head copy)."""
    spec = PRESETS["qwen2.5-3b"]
    vh = spec.vocab_size * spec.hidden_size
    base = {"methods": ["cascod-2stage"], "students": ["student_primary"], "seeds": [1]}
    on = plan_study_budget(_cfg("a100-80g", base), escalation=False)
    off = plan_study_budget(_cfg("a100-80g", {**base, "cascod.stage2_train_lm_head": False}),
                            escalation=False)
    (r_on,), (r_off,) = on.runs, off.runs
    assert r_on.finals == 2
    # the adapter's saved size grows by the fp32 lm_head copy
    assert r_on.extra_final_gb - r_off.extra_final_gb == pytest.approx(4 * vh / GB, rel=1e-6)
    # stage 1 (full fine-tuning) stays the larger VRAM figure, so the run's VRAM is stage 1's
    assert r_on.vram_gib == pytest.approx(r_off.vram_gib)
    # the evaluation: HF for the lm_head-copy adapter, vLLM otherwise
    assert on.stage_hours["evaluate_04"] > 1.5 * off.stage_hours["evaluate_04"]
    # stage 2's epochs and the student rationales count in the run's hours
    more = plan_study_budget(_cfg("a100-80g", {**base, "cascod.stage2_epochs": 3}),
                             escalation=False)
    assert more.runs[0].stage_hours[1] > on.runs[0].stage_hours[1]
    assert more.runs[0].stage_hours[0] == pytest.approx(on.runs[0].stage_hours[0])
    no_gen = plan_study_budget(_cfg("a100-80g", {**base,
                                                 "cascod.stage2_student_rationale_fraction": 0.0}),
                               escalation=False)
    assert no_gen.runs[0].stage_hours[1] < on.runs[0].stage_hours[1]


def test_stage2_vram_counts_the_lm_head_copy():
    from slmkd.study_plan import _stage_plan

    cfg = _cfg("a100-80g")
    spec = PRESETS["qwen2.5-3b"]
    vh = spec.vocab_size * spec.hidden_size
    on = _stage_plan(cfg, "cascod-2stage", "cascod-stage2", spec, 2.0)
    cfg.cascod.stage2_train_lm_head = False
    off = _stage_plan(cfg, "cascod-2stage", "cascod-stage2", spec, 2.0)
    assert on["setup"].lora and on["setup"].extra_trainable_params == vh
    d = on["est"].components
    e = off["est"].components
    # fp32 weights (4) + grads (4) + AdamW moments (8) + foreach AdamW's step transient (4) +
    # the loss's fp32 lm_head grad buffer (4): 16.9 vs 10.6 GiB for 3B
    extra = sum(d.values()) - sum(e.values())
    assert extra == pytest.approx((4 + 4 + 8 + 4 + 4) * vh, rel=0.01)
