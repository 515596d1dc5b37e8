"""``kd`` from a cached teacher (``kd.teacher_source = "cached"``, or the method ``kd-cached``).

No teacher is loaded: for every supervised position the teacher's top-k logits and its
log-normaliser at the epoch's temperature come from the cache written by ``slmkd cache-teacher``
(:mod:`slmkd.teacher.cache`), and the loss is the bucket KL of
:func:`slmkd.losses.fused_topk_kd_loss`::

    L = (1 - α)·CE + α·T²·KL_bucket(p_t^T ‖ p_s^T)     (token means over the step, as ``kd``)

``KL_bucket`` is the KL between the (k+1)-bucket coarse-grainings (the teacher's top-k tokens
and one tail bucket) of the two distributions: a lower bound of the full KL, exact as k → V.
"""

from __future__ import annotations

from typing import Any

import torch

from slmkd.training.method_spec import Items, MethodSpec
from slmkd.training.sft_kd import build_cot_datasets

__all__ = ["cached_kd_spec", "cached_kd_loss"]


def _cache_for(trainer: Any) -> Any:
    cache = getattr(trainer, "_teacher_cache", None)
    if cache is None:
        from slmkd.teacher.cache import load_teacher_cache
        from slmkd.training.data import load_training_records

        records, _ = load_training_records(trainer.cfg)
        cache = load_teacher_cache(trainer.cfg, records, trainer.vocab_size)
        trainer._teacher_cache = cache
    return cache


def cached_kd_loss(trainer: Any, model: torch.nn.Module, inputs: dict[str, Any],
                   items: Items) -> tuple[torch.Tensor, dict[str, Any]]:
    """``compute_loss`` of ``kd`` with the teacher read from the cache (see the module docstring).

    The batch's rows are right-padded examples; their cached rows are concatenated in batch-row
    order, which is the row-major order of :func:`slmkd.losses.supervised_positions`."""
    import inspect

    from slmkd.losses import fused_topk_kd_loss

    cache = _cache_for(trainer)
    ids_l, vals_l, lz_l = [], [], []
    for i, ex_id in enumerate(inputs["cache_key"]):
        n_tok = int(inputs["attention_mask"][i].sum())
        ids, vals, lz = cache.get(ex_id, trainer.temperature,
                                  inputs["input_ids"][i, :n_tok].tolist())
        ids_l.append(ids)
        vals_l.append(vals)
        lz_l.append(lz)
    hs, ws = trainer.student_hidden(model, inputs["input_ids"], inputs["attention_mask"])
    dev = hs.device
    kw: dict[str, Any] = {}
    if trainer.loss_accepts_chunk_size:
        kw["chunk_size"] = trainer.cfg.kd.chunk_size
    if "nonfinite" in inspect.signature(fused_topk_kd_loss).parameters:
        kw["nonfinite"] = ("sanitize" if getattr(trainer.cfg.train, "nonfinite", "skip")
                           == "sanitize" else "report")
    out = fused_topk_kd_loss(
        hs, ws, inputs["labels"], torch.cat(ids_l).to(dev), torch.cat(vals_l).to(dev),
        torch.cat(lz_l).to(dev), temperature=trainer.temperature, alpha=trainer.alpha,
        max_logit_abs=trainer.cfg.kd.max_logit_abs, vocab_size=trainer.vocab_size,
        num_items_in_batch=items.get("supervised"), **kw)
    metrics = {"ce": out.ce.detach(), "kd": out.kd.detach(),
               "num_nonfinite": torch.as_tensor(out.num_nonfinite)}
    for key in ("num_nonfinite_student", "num_nonfinite_teacher"):
        if hasattr(out, key):
            metrics[key] = torch.as_tensor(getattr(out, key))
    return out.loss, metrics


def build_cached_datasets(cfg: Any, records: list[dict[str, Any]], tokenizer: Any):
    """The ``kd`` examples plus ``cache_key`` (the example id, kept in the batch for the cache
    lookup: ``example_id`` is metadata the trainer removes before ``compute_loss``)."""
    from slmkd.training.data import ExampleDataset

    ds, stats = build_cot_datasets(cfg, records, tokenizer)
    return ExampleDataset([{**ex, "cache_key": ex["example_id"]} for ex in ds.examples]), stats


def cached_kd_spec(name: str = "kd-cached") -> MethodSpec:
    return MethodSpec(
        name=name, needs_teacher=False, build_datasets=build_cached_datasets,
        compute_loss=cached_kd_loss,
        description="Logit KD from the cached teacher top-k: (1-α)·CE + α·T²·KL_bucket.")
