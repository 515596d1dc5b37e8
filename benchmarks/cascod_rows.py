"""CasCoD step time: one row per pair (shared) beside the authors' stacked rows, in one run.

One forward + backward of the ``cascod`` loss (:func:`slmkd.training.cascod._cascod_loss`) on
the same batch of pairs, collated by :class:`slmkd.training.cascod.CasCoDCollator` with
``share_rows=True`` (each pair's rationale read off its answer row: ``B`` rows) and
``share_rows=False`` (rationale rows stacked on the answer rows: ``2B``). The two layouts
alternate; the script prints the median of each, their ratio, the loss difference (it must be
~0: the layouts compute the same loss) and, on CUDA, the peak memory of each.

Pairs are synthetic token ids shaped like GSM8K CoTs with the Qwen2 tokenizer (prompt ~150,
rationale ~190, cue 3, answer ~4 tokens: ``benchmarks/planner_vs_measured.py --token-stats``);
weights are random (the step's cost does not depend on them)::

    python benchmarks/cascod_rows.py --tiny            # CPU, scaled-down shapes
    python benchmarks/cascod_rows.py --student 1.5b    # CUDA, the real student shape (bf16)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import QWEN25, TINY  # noqa: E402


class _Trainer:
    """What ``_cascod_loss`` reads off the trainer."""

    def __init__(self, cfg, vocab_size):
        self.cfg, self.vocab_size, self.temperature, self.alpha = cfg, vocab_size, 1.0, 0.0

    def student_hidden(self, model, ids, mask):
        out = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return out, model.get_output_embeddings().weight


def make_pairs(n: int, vocab: int, prompt: int, rationale: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    eos, items = 2, []
    for _ in range(n):
        p = int(prompt * (0.8 + 0.4 * torch.rand((), generator=g)))
        r = int(rationale * (0.6 + 0.8 * torch.rand((), generator=g)))
        q = torch.randint(3, vocab, (p,), generator=g).tolist()
        rat = torch.randint(3, vocab, (r,), generator=g).tolist()
        cue = torch.randint(3, vocab, (3,), generator=g).tolist()
        ans = torch.randint(3, vocab, (4,), generator=g).tolist()
        r_ids = q + rat + [eos]
        a_ids = q + rat + cue + ans + [eos]
        items.append({"rationale_input_ids": r_ids,
                      "rationale_labels": [-100] * p + rat + [eos],
                      "answer_input_ids": a_ids,
                      "answer_labels": [-100] * (p + r + 3) + ans + [eos]})
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", choices=["1.5b", "3b"], default="1.5b")
    ap.add_argument("--tiny", action="store_true", help="scaled-down shapes (CPU)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=150)
    ap.add_argument("--rationale-tokens", type=int, default=190)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None, help="write the JSON result here too")
    a = ap.parse_args()

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slmkd.config import load_config
    from slmkd.training.cascod import CasCoDCollator, _cascod_loss

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = (TINY if a.tiny else QWEN25)[a.student]
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**shape, attn_implementation="sdpa"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model.to(dev, dtype)
    model.config.use_cache = False
    vocab = shape["vocab_size"] - 8
    prompt, rationale = ((a.prompt_tokens, a.rationale_tokens) if not a.tiny
                         else (a.prompt_tokens // 4, a.rationale_tokens // 4))
    items = make_pairs(a.batch_size, vocab, prompt, rationale)
    cfg = load_config("tiny", environ={})
    trainer = _Trainer(cfg, vocab)
    batches = {}
    for share in (True, False):
        b = CasCoDCollator(pad_token_id=0, pad_to_multiple_of=8, share_rows=share)(items)
        batches[share] = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in b.items()}

    def step(share: bool) -> tuple[float, float, float]:
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss, _ = _cascod_loss(trainer, model, batches[share], {})
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
        model.zero_grad(set_to_none=True)
        return dt, float(loss), peak

    for share in (True, False):  # warm-up
        step(share)
    times = {True: [], False: []}
    losses, peaks = {}, {}
    for _ in range(a.repeats):
        for share in (True, False):
            dt, lv, pk = step(share)
            times[share].append(dt)
            losses[share], peaks[share] = lv, pk
    med = {s: statistics.median(t) for s, t in times.items()}
    rows = {s: int(batches[s]["input_ids"].shape[0]) for s in (True, False)}
    toks = {s: int(batches[s]["attention_mask"].sum()) for s in (True, False)}
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "student": ("tiny-" if a.tiny else "") + a.student, "batch_pairs": a.batch_size,
           "rows_shared": rows[True], "rows_stacked": rows[False],
           "tokens_shared": toks[True], "tokens_stacked": toks[False],
           "median_s_shared": med[True], "median_s_stacked": med[False],
           "speedup": med[False] / med[True],
           "loss_shared": losses[True], "loss_stacked": losses[False],
           "peak_gib_shared": peaks[True], "peak_gib_stacked": peaks[False],
           "repeats": a.repeats, "date": time.strftime("%Y-%m-%d")}
    print(f"cascod step, {res['student']} on {res['device']}, {a.batch_size} pairs "
          f"(median of {a.repeats}):")
    print(f"  stacked (authors' concat) {rows[False]} rows, {toks[False]} tokens: "
          f"{med[False] * 1e3:9.1f} ms   peak {peaks[False]:.2f} GiB")
    print(f"  shared (one row per pair) {rows[True]} rows, {toks[True]} tokens: "
          f"{med[True] * 1e3:9.1f} ms   peak {peaks[True]:.2f} GiB")
    print(f"  speed-up {res['speedup']:.2f}x; loss {losses[True]:.6f} vs {losses[False]:.6f}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
