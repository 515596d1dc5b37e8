"""How far a quantised teacher's next-token distributions drift from the full-precision teacher's.

:func:`teacher_quantization_drift` compares two causal LMs (e.g. the bf16/fp32 teacher and its
4-bit NF4 load) position by position on the same token sequences (the teacher's CoT examples):
per-token ``KL(p_full ‖ p_q)`` (nats; mean, 99th percentile, max) and how often both pick the
same next token. Preflight and the CoT statistics can print it when
``cfg.models.teacher_load_in_4bit`` is set: the KD target is ``p_q``, not ``p_full``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["teacher_quantization_drift"]


def _scored_positions(batch: Mapping[str, Any]) -> torch.Tensor:
    """Boolean ``(B, T-1)``: positions ``t`` whose prediction of token ``t+1`` is scored — the
    supervised ones (``labels[:, t+1] != -100``) when labels are given, else every attended
    position whose next token is attended too."""
    if batch.get("labels") is not None:
        return batch["labels"][:, 1:] != -100
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(batch["input_ids"])
    return (mask[:, 1:] != 0) & (mask[:, :-1] != 0)


@torch.no_grad()
def teacher_quantization_drift(full_model: Any, q_model: Any, batches: Iterable[Mapping[str, Any]],
                               *, vocab_size: int | None = None) -> dict[str, float]:
    """Per-token drift of ``q_model`` from ``full_model`` over ``batches``.

    Args:
        full_model, q_model: causal LMs with the same tokenizer (``model(input_ids=...,
            attention_mask=...).logits``); each runs on its own device.
        batches: dicts with ``input_ids`` ``(B, T)``, optional ``attention_mask`` and ``labels``
            (``-100`` = not scored; see :func:`_scored_positions`).
        vocab_size: compare only the first ``vocab_size`` logit columns (default: the smaller
            of the two models' widths), as the KD loss does.

    Returns ``{"mean_kl", "p99_kl", "max_kl", "argmax_agreement", "num_tokens"}``: ``KL(p_full ‖
    p_q)`` in nats per scored token (softmax at temperature 1, computed in fp32) and the fraction
    of scored tokens whose argmax is the same in both models.
    """
    kls: list[torch.Tensor] = []
    agree = 0
    for batch in batches:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        pos = _scored_positions(batch)
        if not bool(pos.any()):
            continue
        logits = []
        for model in (full_model, q_model):
            dev = next(model.parameters()).device
            out = model(input_ids=ids.to(dev),
                        attention_mask=None if mask is None else mask.to(dev), use_cache=False)
            logits.append(out.logits[:, :-1].float().cpu())
        zf, zq = logits
        v = min(zf.shape[-1], zq.shape[-1]) if vocab_size is None else int(vocab_size)
        zf, zq = zf[pos][:, :v], zq[pos][:, :v]
        lf, lq = zf.log_softmax(-1), zq.log_softmax(-1)
        kls.append((lf.exp() * (lf - lq)).sum(-1).clamp_min(0.0))
        agree += int((zf.argmax(-1) == zq.argmax(-1)).sum())
    if not kls:
        return {"mean_kl": float("nan"), "p99_kl": float("nan"), "max_kl": float("nan"),
                "argmax_agreement": float("nan"), "num_tokens": 0}
    kl = torch.cat(kls).double()
    return {"mean_kl": float(kl.mean()), "p99_kl": float(torch.quantile(kl, 0.99)),
            "max_kl": float(kl.max()), "argmax_agreement": agree / kl.numel(),
            "num_tokens": int(kl.numel())}
