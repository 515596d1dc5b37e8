"""Throughput of teacher CoT generation: generated tokens/s of ``slmkd.generation`` backends.

Measures :func:`slmkd.generation.generate_batched` (HF ``generate``: left padding, KV cache,
greedy) — and the vLLM backend when ``vllm`` is importable — at several batch sizes on a randomly
initialised Qwen2 model, and extrapolates the wall time for GSM8K train
(7,473 questions x ~200 generated tokens).

    python3 benchmarks/generate.py --config tiny                    # CPU, seconds
    python3 benchmarks/generate.py --config qwen2.5-7b --device cuda   # GPU, Qwen2.5-7B shapes

Random weights never emit EOS on purpose, so every row generates ``--new-tokens`` tokens: the
figures are decode throughput at a fixed length (``tokens/s = sum of generated tokens / wall
time``), an upper bound for real CoT, where a bucket runs until its longest answer ends.
Prompts are synthetic, ``--prompt-tokens`` long (GSM8K prompts with the chat template are about
150 tokens). The tokenizer is a small BPE one (only throughput matters; ids outside it decode to
nothing).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GSM8K_TRAIN = 7473
TOKENS_PER_ANSWER = 200

# Qwen2.5-7B-Instruct's architecture (config.json of the Hub model).
QWEN25_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                 rope_theta=1e6, tie_word_embeddings=False, max_position_embeddings=32768,
                 rms_norm_eps=1e-6)


def tiny_shape() -> dict:
    """The tiny teacher's architecture (slmkd.config.TinyConfig defaults), vocab 512."""
    from slmkd.config import TinyConfig

    t = TinyConfig()
    return dict(hidden_size=t.teacher_hidden, num_hidden_layers=t.teacher_layers,
                num_attention_heads=t.teacher_heads, num_key_value_heads=t.teacher_kv_heads,
                intermediate_size=t.teacher_intermediate, vocab_size=512, rope_theta=1e4,
                tie_word_embeddings=True, max_position_embeddings=4096)


def build_tokenizer():
    from slmkd.tiny import train_tokenizer

    corpus = ["Tom has 3 apples and buys 4 more. How many apples does he have? 3 + 4 = 7",
              "Solve the problem step by step. The answer is 7.", "You are a helpful assistant."]
    return train_tokenizer(corpus * 50, 300)


def build_model(shape: dict, device, dtype):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    shape = dict(shape)
    theta = shape.pop("rope_theta")
    cfg = Qwen2Config(**shape, rope_theta=theta, use_cache=True)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    # EOS outside the sampled range of a random model is astronomically rare; count anyway
    model.generation_config = GenerationConfig(eos_token_id=[shape["vocab_size"] - 1],
                                               pad_token_id=0, do_sample=False)
    return model


def make_prompts(tokenizer, n: int, prompt_tokens: int) -> list[str]:
    """Chat-templated prompts of 0.7x to 1.3x ``prompt_tokens`` tokens (digits are one token
    each), so buckets differ in width as real ones do."""
    out = []
    mean = prompt_tokens
    for i in range(n):
        prompt_tokens = int(mean * (0.7 + 0.6 * ((i * 37) % 100) / 100))
        head = f"Question {i}: Tom has {i % 97} apples. Numbers:"
        ids = tokenizer.apply_chat_template([{"role": "user", "content": head}], tokenize=True,
                                            add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        pad = max(prompt_tokens - len(ids), 0)
        digits = " ".join(str((i * 7 + k) % 10) for k in range(pad // 2))
        out.append(tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{head} {digits}"}], tokenize=False,
            add_generation_prompt=True))
    return out


def bench_hf(model, tokenizer, prompts, batch_size: int, new_tokens: int, sync) -> dict:
    """Throughput over all batches, plus the steady state without the first batch (which pays
    for new kernel shapes: cuBLAS/cuDNN plans, allocator growth)."""
    from slmkd.generation import iter_generate_batched

    sync()
    t0 = time.perf_counter()
    per_batch = []
    for b in iter_generate_batched(model, tokenizer, prompts, max_new_tokens=new_tokens,
                                   batch_size=batch_size, desc=f"hf bs={batch_size}",
                                   show_progress=False):
        sync()
        per_batch.append((sum(o.num_new_tokens for o in b.outputs), len(b.outputs),
                          time.perf_counter() - t0 - sum(w for _, _, w in per_batch)))
    wall = time.perf_counter() - t0
    toks = sum(t for t, _, _ in per_batch)
    items = sum(n for _, n, _ in per_batch)
    r = {"items": items, "tokens": toks, "wall_s": wall, "tok_s": toks / wall,
         "items_s": items / wall, "steady_tok_s": None}
    if len(per_batch) > 1:
        rest = per_batch[1:]
        r["steady_tok_s"] = sum(t for t, _, _ in rest) / sum(w for _, _, w in rest)
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=["tiny", "qwen2.5-7b"], default="tiny")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:0 … (auto: cuda if any)")
    ap.add_argument("--batch-sizes", default=None, help="comma list (tiny: 1,8,32; 7b: 32,128,256)")
    ap.add_argument("--batches-per-size", type=int, default=1,
                    help="prompts per measurement = batch size x this")
    ap.add_argument("--new-tokens", type=int, default=None, help="tiny: 32; 7b: 200")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="tiny: 60; 7b: 150")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (1 avoids spin-wait on a busy machine)")
    ap.add_argument("--cudnn-sdpa", action="store_true",
                    help="let SDPA use cuDNN attention (slmkd.generation excludes it by default: "
                         "it builds a plan per sequence length)")
    ap.add_argument("--no-vllm", action="store_true")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import slmkd.generation

    slmkd.generation.SDPA_EXCLUDE_CUDNN = not args.cudnn_sdpa

    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                       else ("cpu" if args.device == "auto" else args.device))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        args.dtype, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    big = args.config == "qwen2.5-7b"
    sizes = [int(x) for x in (args.batch_sizes or ("32,128,256" if big else "1,8,32")).split(",")]
    new_tokens = args.new_tokens or (200 if big else 32)
    prompt_tokens = args.prompt_tokens or (150 if big else 60)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    tok = build_tokenizer()
    t0 = time.perf_counter()
    shape = QWEN25_7B if big else tiny_shape()
    model = build_model(shape, dev, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"model: {args.config} random init, {n_params / 1e6:,.1f}M params, {dtype}, on {name} "
          f"(built in {time.perf_counter() - t0:.1f}s); torch {torch.__version__}; "
          f"{torch.get_num_threads()} CPU threads; prompt ~{prompt_tokens} tokens, "
          f"{new_tokens} new tokens; cuDNN SDPA {'allowed' if args.cudnn_sdpa else 'excluded'}")

    warm = make_prompts(tok, min(sizes), prompt_tokens)
    bench_hf(model, tok, warm, min(sizes), min(8, new_tokens), sync)  # warm-up (kernels, allocator)
    rows = []
    for bs in sizes:
        prompts = make_prompts(tok, bs * args.batches_per_size, prompt_tokens)
        try:
            r = bench_hf(model, tok, prompts, bs, new_tokens, sync)
        except torch.OutOfMemoryError:
            print(f"hf bs={bs}: out of memory")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if dev.type == "cuda":
            r["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        rows.append(("hf", bs, r))

    from slmkd.generation import vllm_available

    vllm_note = "vllm: not installed"
    if not args.no_vllm and vllm_available() and dev.type == "cuda":
        vllm_note = "vllm: see rows (model saved to a temp folder)"
        import tempfile

        from slmkd.generation import generate_batched_vllm

        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            tok.save_pretrained(d)
            del model
            torch.cuda.empty_cache()
            import vllm

            llm = vllm.LLM(model=d, dtype="bfloat16", seed=0)
            for bs in sizes:
                prompts = make_prompts(tok, bs * args.batches_per_size, prompt_tokens)
                t = time.perf_counter()
                outs = generate_batched_vllm(llm, tok, prompts, max_new_tokens=new_tokens)
                wall = time.perf_counter() - t
                toks = sum(o.num_new_tokens for o in outs)
                rows.append(("vllm", bs, {"items": len(outs), "tokens": toks, "wall_s": wall,
                                          "tok_s": toks / wall, "items_s": len(outs) / wall,
                                          "steady_tok_s": None}))

    print()
    print("| backend | batch | items | gen tokens | wall s | items/s | gen tokens/s | "
          "steady tokens/s** | peak GiB | GSM8K-train min* |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for backend, bs, r in rows:
        minutes = GSM8K_TRAIN * TOKENS_PER_ANSWER / r["tok_s"] / 60
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        steady = f"{r['steady_tok_s']:.1f}" if r.get("steady_tok_s") else "-"
        print(f"| {backend} | {bs} | {r['items']} | {r['tokens']} | {r['wall_s']:.2f} | "
              f"{r['items_s']:.2f} | {r['tok_s']:.1f} | {steady} | {peak} | {minutes:.1f} |")
    print(f"\n* minutes for {GSM8K_TRAIN} GSM8K train questions x {TOKENS_PER_ANSWER} generated "
          f"tokens at that throughput (all batches). ** without the first batch of that size "
          f"(needs --batches-per-size >= 2). {vllm_note}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
