"""Temporary probe (not part of the project): where does HF generate spend a decode step?"""
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import generate as g

dev = torch.device("cuda")
tok = g.build_tokenizer()
model = g.build_model(g.QWEN25_7B, dev, torch.bfloat16)
print("attn impl:", model.config._attn_implementation)
tok.padding_side = "left"
prompts = g.make_prompts(tok, 64, 150)
enc = tok(prompts, add_special_tokens=False, return_tensors="pt", padding=True).to(dev)
kw = dict(max_new_tokens=64, do_sample=False, eos_token_id=[152063], pad_token_id=0)

def timed(label, **extra):
    torch.cuda.synchronize(); t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, **kw, **extra)
    torch.cuda.synchronize(); dt = time.perf_counter() - t
    n = out.shape[1] - enc["input_ids"].shape[1]
    print(f"{label}: {dt:.2f}s for {n} steps = {1000 * dt / n:.1f} ms/step", flush=True)

timed("dynamic warm")
timed("dynamic")
with torch.inference_mode():
    ids = enc["input_ids"]
    out = model(**enc, use_cache=True)
    past = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)
    am = torch.cat([enc["attention_mask"], torch.ones_like(nxt)], 1)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20):
        o = model(input_ids=nxt, attention_mask=am, past_key_values=past, use_cache=True)
        nxt = o.logits[:, -1:].argmax(-1)
        am = torch.cat([am, torch.ones_like(nxt)], 1)
    torch.cuda.synchronize()
    print(f"raw forward decode: {1000 * (time.perf_counter() - t) / 20:.1f} ms/step", flush=True)
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=[152063], pad_token_id=0)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
try:
    timed("static+compile 1st", cache_implementation="static")
    timed("static+compile 2nd", cache_implementation="static")
except Exception as e:
    print("static failed:", type(e).__name__, str(e)[:300])
