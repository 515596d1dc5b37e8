"""VRAM planner estimate vs the measured peak of real training steps.

On CUDA: for a few configurations, build randomly initialised Qwen2 models of that shape (saved
locally with a tokenizer), write a synthetic teacher-CoT folder whose examples fill the sequence
length, run ``slmkd.training.train`` for a few steps (the real Trainer step: fp32 student, bf16
autocast, fused chunked loss, AdamW) and compare ``torch.cuda.max_memory_allocated`` (the run's
``peak_vram_gb``) with :func:`slmkd.planner.estimate_memory`'s ``peak_allocated``. Target: within
15 %.

Without CUDA (or with ``--estimate-only``) it prints the estimates of tiny configurations only,
so the script itself is exercised by the test-suite.

Cases 0-3 were measured (benchmarks/RESULTS.md); 4-8 cover the planner's newer terms (CasCoD's
doubled rows and second lm_head gradient buffer, bitsandbytes 8-bit AdamW with 32-bit embedding
states, gradients resident under accumulation, LoRA); ``--study-sizes`` adds the real student
shapes with the 7B teacher (80 GB settings, and the LoRA design recommended for 40 GB).

``--token-stats`` measures the token-count constants of :mod:`slmkd.study_plan` (prompt and
completion lengths, length tails, padding factors) with the Qwen2 tokenizer over ``shared/data``.

    python3 benchmarks/planner_vs_measured.py [--estimate-only] [--tokenizer DIR] [--out FILE]
    python3 benchmarks/planner_vs_measured.py --study-sizes --cases 9,10,11,12
    python3 benchmarks/planner_vs_measured.py --token-stats [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slmkd.planner import GIB, ModelSpec, TrainSetup, estimate_memory  # noqa: E402


@dataclass
class Case:
    name: str
    student: ModelSpec
    teacher: ModelSpec | None
    method: str
    batch: int
    seq: int
    ckpt: bool
    optim: str = "adamw_torch_fused"  # slmkd's default
    accum: int = 1
    lora: bool = False


def _spec(name, h, layers, heads, kv, inter, vocab, tie=True) -> ModelSpec:
    return ModelSpec(name, h, layers, heads, kv, inter, vocab, tie)


def gpu_cases(vocab: int) -> list[Case]:
    s05 = _spec("s-0.5B", 896, 24, 14, 2, 4864, vocab)  # Qwen2.5-0.5B's shape
    s_small = _spec("s-0.2B", 768, 12, 12, 2, 2048, vocab)
    t_1b = _spec("t-1.5B", 1536, 28, 12, 2, 8960, vocab + 128, tie=False)
    return [
        Case("sft 0.5B b4 s512", s05, None, "sft", 4, 512, False),
        Case("sft 0.5B b8 s1024 ckpt", s05, None, "sft", 8, 1024, True),
        Case("kd 0.2B<-1.5B b4 s512", s_small, t_1b, "kd", 4, 512, False),
        Case("kd 0.5B<-1.5B b8 s1024 ckpt", s05, t_1b, "kd", 8, 1024, True),
        # the planner's newer terms (not measured yet)
        Case("cascod 0.5B b4 s512 ckpt", s05, None, "cascod", 4, 512, True),
        Case("sft 0.5B b8 s1024 ckpt 8bit", s05, None, "sft", 8, 1024, True, "adamw_bnb_8bit"),
        Case("sft 0.5B b4x4 s512 ckpt", s05, None, "sft", 4, 512, True, accum=4),
        Case("sft 0.5B b4 s512 ckpt lora", s05, None, "sft", 4, 512, True, lora=True),
        Case("cascod-kd 0.5B<-1.5B b4 s512 ckpt", s05, t_1b, "cascod-kd", 4, 512, True),
    ]


def study_cases(vocab: int) -> list[Case]:
    """The real student shapes with the 7B teacher: 80 GB settings and the 40 GB LoRA design
    (grad_accum 1: one step's peak; accumulation adds the resident gradients, see case 6)."""
    s15 = _spec("s-1.5B", 1536, 28, 12, 2, 8960, vocab)
    s3 = _spec("s-3B", 2048, 36, 16, 2, 11008, vocab)
    t7 = _spec("t-7B", 3584, 28, 28, 4, 18944, vocab + 128, tie=False)
    return [
        Case("kd 1.5B<-7B b4 s1024 ckpt", s15, t7, "kd", 4, 1024, True),
        Case("kd 3B<-7B b4 s1024 ckpt", s3, t7, "kd", 4, 1024, True),
        Case("kd 3B<-7B b4 s1024 ckpt lora", s3, t7, "kd", 4, 1024, True, lora=True),
        Case("cascod 3B b4 s1024 ckpt lora", s3, None, "cascod", 4, 1024, True, lora=True),
    ]


def cpu_cases() -> list[Case]:
    st = _spec("tiny-s", 96, 2, 4, 2, 288, 464)
    te = _spec("tiny-t", 192, 4, 6, 2, 512, 592)
    return [Case("sft tiny b32 s160", st, None, "sft", 32, 160, False),
            Case("kd tiny b32 s160", st, te, "kd", 32, 160, False),
            Case("kd tiny b32 s160 ckpt", st, te, "kd", 32, 160, True)]


def setup_for(case: Case, chunk_size: int, cuda: bool) -> TrainSetup:
    return TrainSetup(method=case.method, batch_size=case.batch, seq_len=case.seq,
                      gradient_checkpointing=case.ckpt, chunk_size=chunk_size,
                      param_bytes=2 if (case.lora and cuda) else 4, act_bytes=2 if cuda else 4,
                      autocast=cuda, optim=case.optim, grad_accum_steps=case.accum,
                      lora=case.lora)


def estimate_rows(cases: list[Case], chunk_size: int, cuda: bool) -> list[dict[str, Any]]:
    rows = []
    for c in cases:
        e = estimate_memory(c.student, c.teacher, setup_for(c, chunk_size, cuda))
        rows.append({"case": c.name, "estimate_gib": e.peak_allocated / GIB,
                     "total_gib": e.total / GIB, "measured_gib": None, "rel_error": None})
    return rows


# -- CUDA measurement ------------------------------------------------------------------------
def _save_model(spec: ModelSpec, folder: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                      num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                      intermediate_size=spec.intermediate_size, vocab_size=spec.vocab_size,
                      tie_word_embeddings=spec.tie_embeddings, max_position_embeddings=4096)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)  # half the disk; loaders set the dtype
    model.save_pretrained(folder, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)


def _write_cot(cdir: Path, teacher: str, seq: int, n: int, tokenizer_dir: Path) -> None:
    """Synthetic kept CoT records whose prompt + completion fill ``seq`` tokens (minus ~60)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = "we add the numbers then multiply by two and subtract three to get".split()
    cdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        ids = tok(" ".join(words[(i + k) % len(words)] for k in range(seq * 2)))["input_ids"]
        body = tok.decode(ids[: seq - 60])
        rows.append({"id": f"b{i}", "dataset": "gsm8k", "task": "gsm8k",
                     "question": f"Question {i}: what is {i} + {i}?",
                     "prompt": "", "completion": body + f"\nThe answer is {2 * i}.",
                     "gold": str(2 * i), "extracted_answer": str(2 * i), "flags": [],
                     "keep": True, "teacher": teacher, "gen_config_hash": "bench",
                     "num_new_tokens": seq, "hit_max_new_tokens": False})
    (cdir / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (cdir / "cot_stats.json").write_text("{}")


def measure(case: Case, tokenizer_dir: Path, work: Path, steps: int, chunk_size: int) -> float:
    """Peak allocated GiB of ``steps`` real training steps of ``case``."""
    import torch

    from slmkd.config import load_config
    from slmkd.modeling import model_slug
    from slmkd.training import train

    root = work / case.name.replace(" ", "_").replace("<-", "_from_")
    shutil.rmtree(root, ignore_errors=True)
    sdir, tdir = root / "models" / "student", root / "models" / "teacher"
    _save_model(case.student, sdir, tokenizer_dir)
    teacher = str(tdir)
    if case.teacher is not None:
        _save_model(case.teacher, tdir, tokenizer_dir)
    _write_cot(root / "drive" / "cot" / "gsm8k" / model_slug(teacher), teacher, case.seq,
               case.batch * case.accum * (steps + 1), tokenizer_dir)
    cfg = load_config("a100-80g", environ={}, overrides={
        "drive_root": str(root / "drive"), "models.teacher_medium": teacher,
        "train.batch_size": case.batch, "train.grad_accum_steps": case.accum,
        "train.optim": case.optim, "train.use_lora": case.lora,
        "train.max_seq_length": case.seq, "train.gradient_checkpointing": case.ckpt,
        "train.dataloader_num_workers": 0, "train.min_supervised_tokens": 1,
        "train.local_checkpoint_dir": str(root / "local"), "train.save_steps": 10_000,
        "train.log_every": 1, "kd.chunk_size": chunk_size})
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result = train(cfg, case.method, str(sdir), 0, max_steps=steps, save_steps=10_000)
    # (cascod rows: the synthetic completions end with "The answer is N.", so every example splits)
    peak = result.summary.get("peak_vram_gb") or torch.cuda.max_memory_allocated() / GIB
    shutil.rmtree(root, ignore_errors=True)
    return float(peak)


# -- token-count constants of slmkd.study_plan ----------------------------------------------
def _expected_max_ratio(xs: list[float], b: int) -> float:
    """E[max of b iid draws from xs] / mean(xs) (order statistics of the empirical law)."""
    xs = sorted(xs)
    m = len(xs)
    e = sum(x * (((i + 1) / m) ** b - (i / m) ** b) for i, x in enumerate(xs))
    return e / (sum(xs) / m)


def _grouped_pad(rows: list[float], micro: int, group: int, epochs: int = 3) -> float:
    """Padded / real tokens with :class:`slmkd.training.data.SeededLengthGroupedSampler`
    (``group`` examples per optimiser step, micro-batches of ``micro`` padded to their longest
    rounded up to a multiple of 8, as the CUDA collator does), over ``epochs`` epochs of seed 0."""
    from slmkd.training.data import SeededLengthGroupedSampler

    lens = [max(1, int(round(r))) for r in rows]
    s = SeededLengthGroupedSampler(lens, group, seed=0)
    padded = real = 0
    for e in range(epochs):
        s.set_epoch(e)
        order = list(s)
        for i in range(0, len(order), micro):
            b = [lens[j] for j in order[i:i + micro]]
            padded += len(b) * (-(-max(b) // 8) * 8)
            real += sum(b)
    return padded / real


def token_stats(tokenizer_dir: Path, data_dir: Path, limit: int | None = None,
                cot_mean: float = 200.0) -> dict[str, Any]:
    """The measured token constants (names as in ``slmkd.study_plan.CONSTANTS``)."""
    from transformers import AutoTokenizer

    from slmkd.data import eval_subset, load_bbh, load_bbh_cot_prompts, load_gsm8k
    from slmkd.data.prompts import build_prompt, gold_completion

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    def n(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    train = load_gsm8k("train", data_dir / "gsm8k" / "train.jsonl").records[:limit]
    prompts = [n(build_prompt(tok, r)) for r in train]
    comps = [n(gold_completion(r)) + 1 for r in train]  # + EOS
    bbh_dir = data_dir / "bbh"
    cot = load_bbh_cot_prompts(bbh_dir)
    sub = eval_subset(load_bbh(bbh_dir).records, 100, 1234, per_task=True)[:limit]
    bbh = [n(build_prompt(tok, r, cot)) for r in sub]
    rationales = [n(m.group(1).strip()) + 1 for text in cot.values() for m in re.finditer(
        r"A: Let's think step by step\.(.*?)(?=\n\nQ:|\Z)", text, re.S)]
    scale = cot_mean / (sum(comps) / len(comps))
    rows = [p + c * scale for p, c in zip(prompts, comps)]
    out: dict[str, Any] = {
        "gsm8k_prompt_tokens_mean": sum(prompts) / len(prompts),
        "gsm8k_prompt_tokens_max": max(prompts),
        "gsm8k_gold_completion_tokens_mean": sum(comps) / len(comps),
        "bbh_prompt_tokens_mean": sum(bbh) / len(bbh), "bbh_prompt_tokens_max": max(bbh),
        "bbh_completion_tokens_mean": sum(rationales) / len(rationales),
    }
    for b in (1, 4, 16, 32, 64, 128, 256, 512):
        out[f"len_tail_b{b}"] = _expected_max_ratio(comps, b)
    for b in (1, 2, 4, 8, 16, 32, 64):
        out[f"row_pad_b{b}"] = _expected_max_ratio(rows, b)
    out["row_pad_length_grouped"] = _grouped_pad(rows, micro=4, group=16)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--estimate-only", action="store_true")
    p.add_argument("--study-sizes", action="store_true",
                   help="add the real 1.5B/3B students with the 7B teacher (cases 9-12)")
    p.add_argument("--token-stats", action="store_true",
                   help="print the token-count constants of slmkd.study_plan and exit")
    p.add_argument("--data", default=None, help="data folder (default ../shared/data)")
    p.add_argument("--limit", type=int, default=None, help="--token-stats: first N items only")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default ../shared/data/qwen2-tokenizer)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--cases", default=None, help="comma-separated case indices")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    try:
        import torch

        cuda = torch.cuda.is_available() and not args.estimate_only
    except ImportError:  # pragma: no cover
        cuda = False
    tok = Path(args.tokenizer) if args.tokenizer else (
        Path(__file__).resolve().parents[2] / "shared" / "data" / "qwen2-tokenizer")
    if args.token_stats:
        data = Path(args.data) if args.data else tok.parent
        stats = token_stats(tok, data, args.limit)
        print(json.dumps(stats, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(stats, indent=2))
        return [stats]
    if cuda:
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(tok))
        cases = gpu_cases(max(vocab, 151936))
        if args.study_sizes:
            cases += study_cases(max(vocab, 151936))
    else:
        cases = cpu_cases()
    if args.cases:
        cases = [cases[int(i)] for i in args.cases.split(",")]
    rows = estimate_rows(cases, args.chunk_size, cuda)
    if cuda:
        work = Path(tempfile.mkdtemp(prefix="slmkd-bench-"))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        for case, row in zip(cases, rows):
            t = time.time()
            try:
                row["measured_gib"] = measure(case, tok, work, args.steps, args.chunk_size)
                row["rel_error"] = (row["estimate_gib"] - row["measured_gib"]) / row["measured_gib"]
            except Exception as e:  # report and go on with the other cases
                row["error"] = f"{type(e).__name__}: {e}"
            row["seconds"] = round(time.time() - t, 1)
            print(json.dumps(row), flush=True)
    print(f"\n{'case':32s} {'estimate':>9s} {'measured':>9s} {'error':>7s}  (GiB, peak allocated)")
    for r in rows:
        m = f"{r['measured_gib']:9.2f}" if r["measured_gib"] is not None else "        -"
        e = f"{100 * r['rel_error']:+6.1f}%" if r["rel_error"] is not None else "      -"
        print(f"{r['case']:32s} {r['estimate_gib']:9.3f} {m} {e}")
    if not cuda:
        print("(no CUDA: estimates only)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
