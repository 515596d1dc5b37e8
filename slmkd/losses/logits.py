""":func:`kd_loss`: the KD loss from full logits (math in :mod:`slmkd.losses`)."""

from __future__ import annotations

from typing import Any

import torch

from slmkd.losses.autograd import (
    _KDLossFn,
)
from slmkd.losses.engine import (
    IGNORE_INDEX,
    KDLossOutput,
    _check_targets,
    _compute_dtype,
    _make_cfg,
    _output,
    _plain_weights,
    supervised_positions,
)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    max_logit_abs: float = 50.0,
    vocab_size: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    nonfinite: str = "report",
) -> KDLossOutput:
    """Distillation loss ``(1 - α)·CE + α·T²·KL(p_t^T ‖ p_s^T)`` from full logits, chunked.

    Math (per supervised position ``i``, ``V = vocab_size``, ``M = max_logit_abs``)::

        zs = clamp(s_i[:V], ±M), zt = clamp(t_i[:min(V, Vt)], ±M)   (fp32, fp64 for fp64 input)
        CE_i = -log softmax(zs)[y_i]
        KD_i = T² · Σ_j p_j (log p_j - log q_j),  p = softmax(zt/T), q = softmax(zs/T)
        loss = (1 - α)·Σ CE_i / D + α·Σ KD_i / D

    Args:
        student_logits: ``(B, T, Vs)``, any float dtype; receives the gradient.
        teacher_logits: ``(B, T, Vt)`` or ``None`` (plain CE, needs ``alpha == 0``); treated as
            a constant (no gradient).
        labels: ``(B, T)`` aligned with the input ids (HF convention, shifted internally:
            position ``t`` predicts ``labels[t + 1]``); ``ignore_index`` marks unsupervised.
        temperature: ``T > 0``.
        alpha: KD weight in ``[0, 1]``.
        max_logit_abs: clamp bound ``M`` (finite logits too); the gradient is zero where the
            clamp is active.
        vocab_size: ``V``, the real vocabulary (tokenizer length); columns ``>= V`` are excluded
            from both softmaxes. Default ``min(Vs, Vt)``. Teacher columns missing below ``V``
            get probability zero.
        num_items_in_batch: ``D``, supervised tokens of the whole accumulated batch (as
            ``transformers.Trainer`` passes it); default the local count.
        chunk_size: supervised rows per chunk; default :func:`default_chunk_size` (``V``, device).
        ignore_index: label value that is not supervised.
        nonfinite: ``"report"`` (NaN loss + counts) or ``"sanitize"`` (see the module doc).

    Returns:
        :class:`KDLossOutput`. With zero supervised tokens ``loss`` is 0, still connected to
        the graph (zero gradient).

    Memory: the gradient w.r.t. ``student_logits`` (same shape and dtype) is computed in the
    forward pass chunk by chunk; besides it only ``O(chunk_size · V)`` fp32 scratch is used.
    """
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be (B, T, Vs), got {tuple(student_logits.shape)}")
    if teacher_logits is not None and teacher_logits.shape[:2] != student_logits.shape[:2]:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} and student_logits "
                         f"{tuple(student_logits.shape)} differ in (B, T)")
    if labels.shape != student_logits.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must be (B, T) = "
                         f"{tuple(student_logits.shape[:2])}")
    dev = student_logits.device
    cfg = _make_cfg(temperature=temperature, alpha=alpha, max_logit_abs=max_logit_abs,
                    vs=student_logits.shape[-1],
                    vt=None if teacher_logits is None else teacher_logits.shape[-1],
                    has_teacher=teacher_logits is not None, vocab_size=vocab_size,
                    chunk_size=chunk_size, cd=_compute_dtype(student_logits, teacher_logits),
                    device=dev, nonfinite=nonfinite)
    rows, targets = supervised_positions(labels.to(dev), ignore_index)
    n = int(rows.numel())
    wts = _plain_weights(n, alpha, num_items_in_batch, dev, teacher_logits is not None)
    _check_targets(targets, cfg.vocab)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    stats: dict[str, Any] = {}
    teacher = None if teacher_logits is None else teacher_logits.detach()
    res = _KDLossFn.apply(student_logits, teacher, rows, targets, cfg, wts, need_grad, stats)
    return _output(res, n, stats, wts)


# ---------------------------------------------------------------------------------------------
# fused_kd_loss: hidden states + lm-head weights
# ---------------------------------------------------------------------------------------------
