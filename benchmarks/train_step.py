"""KD training-step benchmark: tokens/s, model FLOPs utilisation and peak VRAM.

Randomly initialised models with the real Qwen2.5 configurations — teacher Qwen2.5-7B-Instruct,
student Qwen2.5-1.5B- or 3B-Instruct — trained for a few dozen ``kd`` steps through the project's
own :class:`slmkd.training.DistillationTrainer` (teacher forward under no_grad, student forward +
backward with gradient checkpointing, fused chunked KD loss, clipping, AdamW), bf16 autocast,
batch ``B × L`` tokens (default 4 × 512, a quarter prompt (masked), the rest supervised).

    MFU = (6 · N_student + 2 · N_teacher) · tokens / step_time / peak_flops   (N_teacher = 0 for
                                                                              sft, kd-cached)

with ``N`` the parameters doing matmuls (embedding lookups excluded, the lm_head included) and the
GPU's dense bf16 peak from ``--peak-tflops`` (defaults: H100 SXM 989, H200 989, A100 312).
Step time is the median over the measured steps (after ``--warmup``). On CPU (or with
``--tiny``) scaled-down configurations run so the script is tested.

Usage::

    python benchmarks/train_step.py --student 1.5b                      # H100 target
    python benchmarks/train_step.py --student 3b --optim adamw_bnb_8bit
    python benchmarks/train_step.py --student 3b --lora
    python benchmarks/train_step.py --tiny --steps 2                    # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN25 = {
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
               tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=1e6,
               rms_norm_eps=1e-6),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
               tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6,
               rms_norm_eps=1e-6),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                 tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6),
}
TINY = {
    "7b": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=1100,
               tie_word_embeddings=False, max_position_embeddings=512),
    "3b": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=1060,
               tie_word_embeddings=True, max_position_embeddings=512),
    "1.5b": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1060,
                 tie_word_embeddings=True, max_position_embeddings=512),
}
TOKENIZER_LEN = {"real": 151665, "tiny": 1000}
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l4": 121.0, "t4": 65.0}


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that do matmuls: all, minus the input embedding, plus the lm_head if tied."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings().weight
    return total - emb.numel() + (out.numel() if out is emb else 0)


def default_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name().lower()
    for key, v in PEAK_TFLOPS.items():
        if key in name:
            return v
    return None


class _Timer:
    def __init__(self, device):
        self.device = device
        self.times: list[float] = []
        self._t = 0.0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer._sync()
                timer._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer._sync()
                timer.times.append(time.perf_counter() - timer._t)

        return CB()


class _MemoryCache:
    """Stands in for :class:`slmkd.teacher.cache.TeacherCache`: the same random top-k rows
    (distinct ids, fp16 values, fp32 normaliser) for every example."""

    def __init__(self, n: int, k: int, vocab: int, temperatures) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)]
                               ).to(torch.int32)
        self.vals = torch.randn(n, k, generator=g).to(torch.float16) * 3
        self.logz = torch.logsumexp(self.vals.float(), -1) + 2.0

    def get(self, example_id, temperature, input_ids=None, **kw):
        return self.ids, self.vals, self.logz


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import Qwen2Config, Qwen2ForCausalLM, TrainingArguments

    from slmkd.config import load_config
    from slmkd.training import DistillationTrainer, GuardState, get_method
    from slmkd.training.data import ExampleDataset, PaddingCollator

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    tiny = args.tiny or device.type == "cpu"
    cfgs = TINY if tiny else QWEN25
    vocab = TOKENIZER_LEN["tiny" if tiny else "real"]
    seq = args.seq_len if not tiny else min(args.seq_len, 64)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def build(key: str, dtype: torch.dtype) -> Qwen2ForCausalLM:
        c = Qwen2Config(**cfgs[key], torch_dtype=str(dtype).split(".")[-1])
        c._attn_implementation = "sdpa"
        with torch.device(device):
            m = Qwen2ForCausalLM(c).to(dtype)
        return m

    method = args.method
    teacher = None
    if method == "kd":
        teacher = build("7b", torch.bfloat16 if bf16 else torch.float32).eval()
        teacher.requires_grad_(False)
    student_dtype = torch.bfloat16 if (args.lora and bf16) else torch.float32
    student = build(args.student, student_dtype)
    student.config.use_cache = False
    n_t = matmul_params(teacher) if teacher is not None else 0
    n_s = matmul_params(student)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        student.enable_input_require_grads()
        student = get_peft_model(student, LoraConfig(
            r=args.lora_r, lora_alpha=2 * args.lora_r, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"]))

    g = torch.Generator().manual_seed(0)
    prompt = seq // 4
    n_examples = args.batch_size * (args.steps + args.warmup)
    examples = []
    for _ in range(n_examples):
        ids = torch.randint(0, vocab, (seq,), generator=g).tolist()
        ex = {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}
        if method == "kd-cached":
            ex["cache_key"] = str(len(examples))
        examples.append(ex)
    cfg = load_config("tiny" if tiny else None, environ={})
    out_dir = tempfile.mkdtemp(prefix="slmkd_bench_")
    targs = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, max_steps=args.steps + args.warmup,
        learning_rate=1e-5, max_grad_norm=1.0, bf16=bf16, use_cpu=device.type == "cpu",
        gradient_checkpointing=not args.no_grad_ckpt,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim=args.optim, save_strategy="no", report_to="none", logging_steps=10**6,
        remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    timer = _Timer(device)
    trainer = DistillationTrainer(
        model=student, args=targs, train_dataset=ExampleDataset(examples),
        data_collator=PaddingCollator(0), spec=get_method(method), cfg=cfg, teacher=teacher,
        vocab_size=vocab, guard=GuardState(), callbacks=[timer.callback()])
    if method == "kd-cached":  # a top-k cache in memory (the Drive reads are not timed)
        trainer._teacher_cache = _MemoryCache(seq - prompt, args.cache_top_k, vocab,
                                              cfg.kd.temperature_schedule)
    trainer.train()
    measured = timer.times[args.warmup:] or timer.times
    step_s = statistics.median(measured)
    tokens = args.batch_size * seq
    flops = (6 * n_s + 2 * n_t) * tokens
    peak = args.peak_tflops or default_peak(device)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "configs": "tiny (scaled down)" if tiny else "Qwen2.5 real",
        "method": method, "student": args.student, "optim": args.optim,
        "lora": bool(args.lora),
        "gradient_checkpointing": not args.no_grad_ckpt, "bf16": bf16,
        "batch": [args.batch_size, seq], "steps_measured": len(measured),
        "student_matmul_params": n_s, "teacher_matmul_params": n_t,
        "step_time_s": step_s, "tokens_per_s": tokens / step_s,
        "achieved_tflops": flops / step_s / 1e12, "peak_tflops": peak,
        "mfu": (flops / step_s / 1e12) / peak if peak else None,
        "peak_vram_gb": torch.cuda.max_memory_allocated() / 1024**3
        if device.type == "cuda" else None,
        "skipped_steps": trainer.guard.skipped,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", choices=["1.5b", "3b"], default="1.5b")
    p.add_argument("--method", choices=["kd", "sft", "kd-cached"], default="kd",
                   help="kd: 7B teacher live; sft: no teacher; kd-cached: top-k rows in memory")
    p.add_argument("--cache-top-k", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=30, help="measured steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--optim", default="adamw_torch",
                   help="adamw_torch, adamw_torch_fused, adamw_bnb_8bit, ...")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--no-grad-ckpt", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the GPU (default by name: H100/H200 989, A100 312)")
    p.add_argument("--tiny", action="store_true", help="scaled-down configs (also on CPU)")
    p.add_argument("--out", default=None, help="write the JSON result here too")
    args = p.parse_args(argv)
    res = run(args)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
