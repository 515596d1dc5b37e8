"""VRAM planner estimate vs the measured peak of real training steps.

On CUDA: for a few configurations, build randomly initialised Qwen2 models of that shape (saved
locally with a tokenizer), write a synthetic teacher-CoT folder whose examples fill the sequence
length, run ``slmkd.trainer.train`` for a few steps (the real Trainer step: fp32 student, bf16
autocast, fused chunked loss, AdamW) and compare ``torch.cuda.max_memory_allocated`` (the run's
``peak_vram_gb``) with :func:`slmkd.planner.estimate_memory`'s ``peak_allocated``. Target: within
15 %.

Without CUDA (or with ``--estimate-only``) it prints the estimates of tiny configurations only,
so the script itself is exercised by the test-suite.

    python3 benchmarks/planner_vs_measured.py [--estimate-only] [--tokenizer DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
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
                      param_bytes=4, act_bytes=2 if cuda else 4, autocast=cuda)


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
        model = Qwen2ForCausalLM(cfg)
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
    from slmkd.trainer import train

    root = work / case.name.replace(" ", "_").replace("<-", "_from_")
    shutil.rmtree(root, ignore_errors=True)
    sdir, tdir = root / "models" / "student", root / "models" / "teacher"
    _save_model(case.student, sdir, tokenizer_dir)
    teacher = str(tdir)
    if case.teacher is not None:
        _save_model(case.teacher, tdir, tokenizer_dir)
    _write_cot(root / "drive" / "cot" / "gsm8k" / model_slug(teacher), teacher, case.seq,
               case.batch * (steps + 1), tokenizer_dir)
    cfg = load_config("a100-80g", environ={}, overrides={
        "drive_root": str(root / "drive"), "models.teacher_medium": teacher,
        "train.batch_size": case.batch, "train.grad_accum_steps": 1,
        "train.max_seq_length": case.seq, "train.gradient_checkpointing": case.ckpt,
        "train.dataloader_num_workers": 0, "train.min_supervised_tokens": 1,
        "train.local_checkpoint_dir": str(root / "local"), "train.save_steps": 10_000,
        "train.log_every": 1, "kd.chunk_size": chunk_size})
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result = train(cfg, case.method, str(sdir), 0, max_steps=steps, save_steps=10_000)
    peak = result.summary.get("peak_vram_gb") or torch.cuda.max_memory_allocated() / GIB
    shutil.rmtree(root, ignore_errors=True)
    return float(peak)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--estimate-only", action="store_true")
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
    if cuda:
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(tok))
        cases = gpu_cases(max(vocab, 151936))
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
