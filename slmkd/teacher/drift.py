"""How far a quantised teacher's next-token distributions drift from the full-precision teacher's.

:func:`teacher_quantization_drift` compares two causal LMs (e.g. the bf16/fp32 teacher and its
4-bit NF4 load) position by position on the same token sequences (the teacher's CoT examples):
per-token ``KL(p_full ‖ p_q)`` (nats; mean, 99th percentile, max) and how often both pick the
same next token.

:func:`measure_cot_drift` runs it for the configured teacher on its own kept CoT (the training
tokenisation, supervised positions only) and stores the figures beside the CoT
(``{cot_dir}/teacher_4bit_drift.json``); ``slmkd generate-cot`` (notebook 01) measures it when
``cfg.models.teacher_load_in_4bit`` is set, and preflight prints it (:func:`read_cot_drift`): with
a 4-bit teacher the KD target is ``p_q``, not ``p_full``, and no other tool reports by how much.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["DRIFT_FILE", "describe_drift", "measure_cot_drift", "read_cot_drift",
           "teacher_quantization_drift"]

DRIFT_FILE = "teacher_4bit_drift.json"


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


# -- on the teacher's CoT, stored beside it ------------------------------------------------------
def _drift_key(cfg: Any, records: list[dict[str, Any]], num_records: int) -> dict[str, Any]:
    from slmkd.layout import model_slug
    from slmkd.teacher.cache import _cot_hash

    return {"teacher": model_slug(cfg.teacher), "num_records": int(num_records),
            "max_seq_length": int(cfg.train.max_seq_length), "cot_hash": _cot_hash(records)}


def read_cot_drift(cfg: Any, dataset: str | None = None) -> dict[str, Any] | None:
    """The stored drift of the configured teacher's NF4 load on its CoT, or None."""
    from slmkd.fileio import read_json
    from slmkd.layout import cot_dir

    p = cot_dir(cfg, dataset) / DRIFT_FILE
    try:
        return read_json(p) if p.is_file() else None
    except ValueError:
        return None


def describe_drift(d: dict[str, Any]) -> str:
    """One line: ``mean KL 0.0013 nat/token (p99 0.030, max 0.4), argmax agreement 99.55 %``."""
    return (f"4-bit NF4 teacher vs full precision on {d['num_tokens']:,} CoT tokens of "
            f"{d['num_records_used']} records: mean KL {d['mean_kl']:.4f} nat/token (p99 "
            f"{d['p99_kl']:.3f}, max {d['max_kl']:.2f}), argmax agreement "
            f"{100 * d['argmax_agreement']:.2f}%")


def measure_cot_drift(cfg: Any, dataset: str | None = None, *, num_records: int = 64,
                      batch_size: int = 8, force: bool = False, full_model: Any = None,
                      q_model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """:func:`teacher_quantization_drift` of the teacher's 4-bit NF4 load from its full-precision
    load on the first ``num_records`` kept CoT records (by id), written to
    ``{cot_dir}/teacher_4bit_drift.json`` and returned; an existing file for the same teacher,
    CoT and sample is returned without loading anything (``force``: measure again).

    The models are loaded one after the other only if not passed (tests): the full teacher in
    the configured dtype, the NF4 one through :func:`slmkd.modeling.load_causal_lm` with
    ``teacher_load_in_4bit``; both stay on the same device (a 7B teacher needs ~15 GB + ~5 GB).
    """
    import dataclasses
    import time

    from slmkd.fileio import atomic_write_json
    from slmkd.layout import cot_dir
    from slmkd.teacher.cache import _examples, pad_batch
    from slmkd.teacher.store import load_cot_records

    directory = cot_dir(cfg, dataset)
    records = sorted(load_cot_records(directory, kept_only=True), key=lambda r: str(r["id"]))
    if not records:
        raise FileNotFoundError(f"no kept teacher CoT in {directory}: run `slmkd generate-cot "
                                f"--profile {cfg.profile}` first")
    key = _drift_key(cfg, records, num_records)
    old = read_cot_drift(cfg, dataset)
    if old is not None and not force and old.get("key") == key:
        return old
    from slmkd.modeling import load_causal_lm, load_tokenizer

    tokenizer = tokenizer or load_tokenizer(cfg.teacher, cfg, padding_side="right")
    examples = _examples(cfg, records[:num_records], tokenizer)
    batches = [pad_batch(examples[s:s + batch_size], tokenizer.pad_token_id)
               for s in range(0, len(examples), batch_size)]
    t0 = time.time()
    if full_model is None:
        full_cfg = dataclasses.replace(cfg, models=dataclasses.replace(
            cfg.models, teacher_load_in_4bit=False))
        full_model = load_causal_lm(cfg.teacher, full_cfg, role="teacher")
    if q_model is None:
        q_cfg = dataclasses.replace(cfg, models=dataclasses.replace(
            cfg.models, teacher_load_in_4bit=True))
        q_model = load_causal_lm(cfg.teacher, q_cfg, role="teacher")
    d = teacher_quantization_drift(full_model, q_model, batches, vocab_size=len(tokenizer))
    out = {**d, "num_records_used": len(examples), "wall_time_s": round(time.time() - t0, 1),
           "key": key}
    atomic_write_json(directory / DRIFT_FILE, out)
    return out
