"""Per-run set-up time of a training run (the planner's ``run_setup_s``), measured on CPU.

What a training run does before its first step, besides loading the model (the planner counts
that separately, by bytes): tokenise the kept teacher CoT into examples (``sft``/``kd``:
:func:`slmkd.training.sft_kd.build_cot_datasets`; CasCoD: :func:`build_cascod_dataset`, two
examples per record) and build the ``Trainer`` (arguments, accelerate state, optimizer set-up
happens at the first step and is part of the step time).

The examples are the 7,473 GSM8K train items with the gold solution as the "CoT", its rationale
written twice so a completion is ~190 tokens (the planner assumes 200 for the 7B's CoT) — the
real Qwen2 tokenizer from ``shared/data/qwen2-tokenizer``. All of this runs on the CPU of the
Colab VM too, so the figure transfers (Colab's A100 VM has more cores than this machine; the
tokenisation here is a single-threaded Python loop, so the figure is not flattered by cores).

    python3 benchmarks/run_setup.py [--data ../shared/data] [--repeats 3] [--limit N]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cot_records(data_dir: Path, limit: int | None) -> list[dict[str, Any]]:
    """GSM8K train items as kept CoT records (rationale twice, then the answer line)."""
    from slmkd.data import load_gsm8k
    from slmkd.data.prompts import format_final_answer

    recs = load_gsm8k("train", data_dir / "gsm8k" / "train.jsonl").records[:limit]
    return [{"id": r.id, "dataset": "gsm8k", "question": r.question, "gold": r.answer,
             "completion": f"{r.rationale.strip()}\n{r.rationale.strip()}\n"
                           f"{format_final_answer(r.answer)}", "keep": True} for r in recs]


def trainer_setup_s(tokenizer: Any, dataset: Any) -> float:
    """Seconds to construct a ``transformers.Trainer`` over ``dataset`` (tiny Qwen2 model)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainingArguments

    from slmkd.training.data import PaddingCollator

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=64,
                                         intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, report_to=[],
                                 use_cpu=not torch.cuda.is_available(), save_strategy="no")
        Trainer(model=model, args=args, train_dataset=dataset,
                data_collator=PaddingCollator(tokenizer.pad_token_id))
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared"
                   / "data")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="records (default: all 7,473)")
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    from slmkd.config import load_config
    from slmkd.training.cascod import build_cascod_dataset
    from slmkd.training.sft_kd import build_cot_datasets

    tok = AutoTokenizer.from_pretrained(a.data / "qwen2-tokenizer")
    cfg = load_config(profile="a100-80g")
    recs = cot_records(a.data, a.limit)
    sft_s, cas_s = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        ds, stats = build_cot_datasets(cfg, recs, tok)
        sft_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        build_cascod_dataset(tok, recs, max_length=cfg.train.max_seq_length,
                             min_supervised_tokens=cfg.train.min_supervised_tokens,
                             answer_cue=cfg.cascod.answer_cue)
        cas_s.append(time.perf_counter() - t0)
    comp = [len(tok(r["completion"], add_special_tokens=False)["input_ids"]) for r in recs[:500]]
    trainer_s = statistics.median(trainer_setup_s(tok, ds) for _ in range(a.repeats))
    out = {"records": len(recs), "examples": stats.num_examples,
           "completion_tokens_mean_first500": round(statistics.mean(comp), 1),
           "tokenise_sft_kd_s_median": round(statistics.median(sft_s), 2),
           "tokenise_cascod_s_median": round(statistics.median(cas_s), 2),
           "trainer_init_s_median": round(trainer_s, 2)}
    out["run_setup_s_max"] = round(max(out["tokenise_sft_kd_s_median"],
                                       out["tokenise_cascod_s_median"]) + trainer_s, 2)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
