"""A miniature training world for the trainer tests, built in about a second.

Tokenizer + teacher + student (tiny random Qwen2 models saved under ``{root}/models/``; also
:data:`QTEACHER` / :data:`QSTUDENT` for the bitsandbytes tests) and teacher
CoT records in the real shard format (gold rationales of synthetic arithmetic problems,
``keep=True``) under ``{root}/cot/gsm8k/{teacher}/``, plus a tiny-profile config pointing at them.
Independent of the trained tiny teacher and of teacher CoT generation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEACHER = "kdtest-teacher"
STUDENT = "kdtest-student"
#: a teacher whose linear layers have multiples of 32 outputs: bitsandbytes' packed CPU 4-bit
#: kernel needs them (real models have them; kdtest-teacher's 24-wide k/v projections do not)
QTEACHER = "kdtest-teacher-q"
#: a student with tensors of >= 4,096 elements: bitsandbytes keeps 32-bit AdamW states below that
QSTUDENT = "kdtest-student-q"


def _problems(n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        a, b = 3 + (i * 7) % 40, 2 + (i * 5) % 30
        q = f"Tom has {a} apples and buys {b} more. How many apples does he have?"
        completion = f"Tom has {a} apples.\n{a} + {b} = {a + b}\nThe answer is {a + b}."
        rows.append({"id": f"gsm8k-train-{i:05d}", "question": q, "completion": completion,
                     "gold": str(a + b)})
    return rows


def build_world(root: str | Path, n_records: int = 64) -> Path:
    """Write models, tokenizer and CoT under ``root`` (idempotent). Returns ``root``."""
    from slmkd.tiny import TinyModelSpec, build_model, train_tokenizer

    root = Path(root)
    marker = root / "world_ready"
    if marker.exists():
        return root
    probs = _problems(n_records)
    corpus = [p["question"] for p in probs] + [p["completion"] for p in probs] + [
        "Solve the problem step by step. Finish with a last line of the form",
        '"The answer is N." where N is a number. Question:', "You are a helpful assistant.",
        "system user assistant"] * 5
    tok = train_tokenizer(corpus * 3, 260)
    n = len(tok)
    for name, hidden, layers, rows, seed in ((TEACHER, 48, 2, n + 24, 1),
                                             (STUDENT, 32, 2, n + 8, 2),
                                             (QTEACHER, 64, 2, n + 24, 3),
                                             (QSTUDENT, 64, 1, n + 8, 4)):
        spec = TinyModelSpec(name, hidden, layers, 4, 2, hidden * 2, rows)
        model = build_model(spec, tok, seed, max_positions=256)
        out = root / "models" / name
        model.save_pretrained(out)
        tok.save_pretrained(out)
    from slmkd.teacher.store import gen_config_hash, generation_settings

    for teacher in (TEACHER, QTEACHER):  # the same gold rationales as each teacher's CoT
        cot = root / "cot" / "gsm8k" / teacher
        cot.mkdir(parents=True, exist_ok=True)
        # the hash the tiny config gives: the CLI's `train` sees a complete CoT, generates none
        cfg = make_cfg(root, **{"models.teacher_medium": str(root / "models" / teacher)})
        h = gen_config_hash(generation_settings(cfg, "gsm8k", cfg.teacher))
        recs = []
        for p in probs:
            recs.append({**p, "dataset": "gsm8k", "task": None, "prompt": p["question"],
                         "extracted_answer": p["gold"], "flags": [], "keep": True,
                         "teacher": teacher, "gen_config_hash": h,
                         "num_new_tokens": 20, "hit_max_new_tokens": False, "backend": "hf"})
        (cot / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (cot / "cot_stats.json").write_text(json.dumps(
            {"kept": len(recs), "gen_config_hash": h, "complete": True, "limit": None}))
    marker.write_text("ok")
    return root


def overrides(root: str | Path, **extra: Any) -> dict[str, Any]:
    root = Path(root)
    o = {
        "drive_root": str(root),
        "models.teacher_medium": str(root / "models" / TEACHER),
        "models.student_small": str(root / "models" / STUDENT),
        "models.student_primary": str(root / "models" / STUDENT),
        "train.batch_size": 8, "train.grad_accum_steps": 1, "train.learning_rate": 3e-3,
        "train.epochs": 1, "kd.temperature_schedule": [2.0], "kd.alpha_schedule": [0.5],
        "train.log_every": 2, "train.save_steps": 1000, "train.warmup_ratio": 0.0,
        "train.lr_scheduler_type": "constant", "train.max_seq_length": 128,
        "train.local_checkpoint_dir": str(root / "local_ckpt"),
    }
    o.update(extra)
    return o


def make_cfg(root: str | Path, **extra: Any):
    from slmkd.config import load_config

    return load_config("tiny", overrides=overrides(root, **extra), environ={})
