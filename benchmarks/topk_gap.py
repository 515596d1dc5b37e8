"""What the teacher top-k cache costs: per-token gap between the full KL and the bucket KL.

For supervised positions of the teacher's CoT (the tokenisation training uses), with teacher
logits ``z_t`` and student logits ``z_s`` over the real vocabulary, at each temperature T of the
KD schedule and each k::

    full   = KL(softmax(z_t/T) ‖ softmax(z_s/T))
    bucket = KL over the (k+1)-bucket coarse-grainings (top-k of the teacher + one tail bucket)
    gap    = full − bucket ≥ 0           (data-processing inequality; 0 when k = V)

Prints mean and p99 of ``gap`` and of ``gap / full``, the teacher's top-k mass (coverage), and
checks ``gap ≥ −1e-9`` everywhere. Run on the tiny world (``slmkd tiny`` + ``generate-cot`` first):

    python benchmarks/topk_gap.py --drive-root slmkd_drive [--student PATH] [--records 200]
"""

from __future__ import annotations

import argparse
import json
import math

import torch


def bucket_kl(zt: torch.Tensor, zs: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Per-row bucket KL (fp64) of teacher/student logits ``(N, V)`` at top-k of the teacher."""
    lt = torch.log_softmax(zt.double() / temperature, -1)
    ls = torch.log_softmax(zs.double() / temperature, -1)
    top = lt.topk(k, dim=-1).indices
    pt, ps = lt.gather(-1, top).exp(), ls.gather(-1, top).exp()
    pt_tail = (1 - pt.sum(-1)).clamp_min(0)
    ps_tail = (1 - ps.sum(-1)).clamp_min(1e-300)
    head = (pt * (pt.clamp_min(1e-300).log() - ps.clamp_min(1e-300).log())).sum(-1)
    tail = torch.where(pt_tail > 0, pt_tail * (pt_tail.clamp_min(1e-300).log() - ps_tail.log()),
                       torch.zeros_like(pt_tail))
    return head + tail


def full_kl(zt: torch.Tensor, zs: torch.Tensor, temperature: float) -> torch.Tensor:
    lt = torch.log_softmax(zt.double() / temperature, -1)
    ls = torch.log_softmax(zs.double() / temperature, -1)
    return (lt.exp() * (lt - ls)).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--drive-root", required=True)
    ap.add_argument("--student", default=None, help="student model dir (default: tiny student-s)")
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--ks", default="8,32,128")
    args = ap.parse_args()
    torch.set_num_threads(2)

    from slmkd.config import load_config
    from slmkd.data.prompts import DropReason, build_prompt, tokenize_example
    from slmkd.data.records import record_from_dict
    from slmkd.layout import cot_dir
    from slmkd.losses import supervised_positions
    from slmkd.modeling import load_causal_lm, load_tokenizer
    from slmkd.teacher.store import load_cot_records

    cfg = load_config("tiny", overrides={"drive_root": args.drive_root})
    tok = load_tokenizer(cfg.teacher, cfg)
    teacher = load_causal_lm(cfg.teacher, cfg, role="teacher")
    student = load_causal_lm(args.student or cfg.student_name("student_small"), cfg,
                             role="teacher")  # eval mode, no grad
    recs = load_cot_records(cot_dir(cfg, "gsm8k", cfg.teacher))[: args.records]
    v = len(tok)
    zts, zss = [], []
    for rec in recs:
        ex = tokenize_example(tok, build_prompt(tok, record_from_dict(rec), None),
                              rec["completion"], cfg.train.max_seq_length, 1)
        if isinstance(ex, DropReason):
            continue
        ids = torch.tensor([ex.input_ids])
        rows, _ = supervised_positions(torch.tensor([ex.labels]))
        with torch.no_grad():
            zt = teacher(input_ids=ids).logits[0, :, :v].reshape(-1, v)[rows]
            zs = student(input_ids=ids).logits[0, :, :v].reshape(-1, v)[rows]
        zts.append(zt)
        zss.append(zs)
    zt, zs = torch.cat(zts), torch.cat(zss)
    out = {"tokens": int(zt.shape[0]), "vocab": v, "student": args.student or "tiny student-s",
           "rows": []}
    print(f"{zt.shape[0]} supervised tokens, V = {v}")
    print("| T | k | coverage | full KL mean | gap mean | gap p99 | gap/full mean | min gap |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in cfg.kd.temperature_schedule:
        full = full_kl(zt, zs, t)
        for k in [int(x) for x in args.ks.split(",")] + [v]:
            b = bucket_kl(zt, zs, min(k, v), t)
            gap = full - b
            cov = torch.softmax(zt.double() / t, -1).topk(min(k, v), -1).values.sum(-1).mean()
            rel = (gap / full.clamp_min(1e-12)).mean()
            row = {"T": t, "k": k, "coverage": float(cov), "full_mean": float(full.mean()),
                   "gap_mean": float(gap.mean()), "gap_p99": float(gap.quantile(0.99)),
                   "rel_gap_mean": float(rel), "min_gap": float(gap.min())}
            out["rows"].append(row)
            print(f"| {t:g} | {k} | {cov:.4f} | {full.mean():.4f} | {gap.mean():.2e} | "
                  f"{gap.quantile(0.99):.2e} | {rel:.2%} | {gap.min():.1e} |")
            assert gap.min() > -1e-9 or not math.isfinite(float(gap.min()))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
