""":func:`fused_topk_kd_loss` (KD from a cached teacher top-k) and :func:`teacher_topk_from_logits`
(what the cache stores)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from slmkd.losses.autograd import (
    _check_student,
    _FusedKDLossFn,
)
from slmkd.losses.engine import (
    IGNORE_INDEX,
    KDLossOutput,
    _check_targets,
    _compute_dtype,
    _grouped_weights,
    _make_cfg,
    _output,
    _plain_weights,
    supervised_positions,
)


def fused_topk_kd_loss(
    student_hidden: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    teacher_logZ: torch.Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    max_logit_abs: float = 50.0,
    vocab_size: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    nonfinite: str = "report",
    row_weights: torch.Tensor | Sequence[float] | None = None,
    row_groups: torch.Tensor | Sequence[int] | None = None,
    teacher_rows: int | None = None,
) -> KDLossOutput:
    """``(1 - α)·CE + α·T²·KL_bucket`` from the student's hidden states and a teacher top-k cache.

    Inputs: ``student_hidden (B, T, Hs)``, ``student_lm_head_weight (Vs, Hs)``,
    ``labels (B, T)``; for the ``N`` supervised positions (``labels[:, 1:] != ignore_index``,
    row-major order: :func:`supervised_positions`) the teacher's top-k token ids
    ``teacher_topk_ids (N, k)`` (int32/int64, distinct per row, each in ``[0, V)``, else
    ``ValueError``), their logits ``teacher_topk_logits (N, k)`` (fp16/bf16/fp32) and
    ``teacher_logZ (N,)`` = ``logsumexp(z_t / T)`` over the teacher's full real vocabulary at
    this call's temperature (fp32). :func:`teacher_topk_from_logits` computes all three.

    Math, per supervised position (``K`` the k ids, ``T`` the temperature)::

        p_i    = exp(z_t,i / T - logZ_t)                 i ∈ K   (teacher, exact for K)
        p_tail = 1 - Σ_K p_i          (as -expm1(logsumexp_K log p_i), clamped ≥ 0; if rounding
                                       makes Σ_K p_i > 1 the p_i are renormalised, p_tail = 0;
                                       k = V: no tail, p_i = softmax of the k values)
        q      = softmax(clamp(h W_s[:V].T, ±M) / T)     (student, full normaliser over V)
        q_tail = Σ_{j∉K} q_j          (summed directly over the tail columns)
        KL_bucket = Σ_K p_i log(p_i / q_i) + p_tail log(p_tail / q_tail)   (0·log 0 = 0)
        loss   = (1 - α)·Σ CE_i / D + α·T²·Σ KL_bucket,i / D

    ``KL_bucket`` is the KL between the (k+1)-bucket coarse-grainings (K singletons + one tail)
    of the two distributions, so by the data-processing inequality it is a lower bound of the
    full ``KL(p_t^T ‖ q^T)`` (equality iff the student's tail is proportional to the teacher's),
    exact when ``K`` covers the vocabulary (k = V). CE is the ordinary full-softmax CE at T = 1.

    Gradient (analytic, per chunk; ``×T²`` included), for student logit ``zs_j``::

        j ∈ K:  T·(q_j - p_j)          j ∉ K:  T·q_j·(1 - p_tail / q_tail)

    Teacher values are used as given (not clamped: ``logZ_t`` must match them). Non-finite
    cache entries: ``"report"`` counts the row in ``num_nonfinite_teacher`` and makes the loss
    NaN; ``"sanitize"`` drops that row's KD term (CE stays) and counts it. Student logits as in
    :func:`fused_kd_loss`. Memory: ``O(chunk_size·V)`` fp32 plus the gradients; the student's
    logits are computed chunk by chunk and only the ``k`` teacher columns are gathered.
    ``vocab_size`` defaults to ``Vs``; pass the tokenizer length so padding rows are excluded.

    ``row_weights`` / ``row_groups`` / ``num_items_in_batch`` as a list: per-batch-row weights and
    normalisation groups exactly as in :func:`slmkd.losses.fused_kd_loss`; ``teacher_rows`` =
    ``B_t``: only batch rows ``< B_t`` have a teacher (the cache then covers their ``N_t``
    supervised positions, a prefix of the ``N``: the top-k tensors are ``(N_t, k)``), the other
    rows get plain CE. :func:`slmkd.losses.fused_cascod_loss` uses this for CasCoD-KD from the
    cache.
    """
    _check_student(student_hidden, student_lm_head_weight, labels)
    dev = student_hidden.device
    cfg = _make_cfg(temperature=temperature, alpha=alpha, max_logit_abs=max_logit_abs,
                    vs=student_lm_head_weight.shape[0], vt=None, has_teacher=True,
                    vocab_size=vocab_size, chunk_size=chunk_size,
                    cd=_compute_dtype(student_hidden, student_lm_head_weight), device=dev,
                    nonfinite=nonfinite)
    rows, targets = supervised_positions(labels.to(dev), ignore_index)
    n = int(rows.numel())
    bsz, seq = labels.shape
    if teacher_rows is not None and not 0 <= int(teacher_rows) <= bsz:
        raise ValueError(f"teacher_rows={teacher_rows} must lie in [0, {bsz}]")
    if row_weights is None and row_groups is None and \
            (teacher_rows is None or int(teacher_rows) == bsz) and \
            not isinstance(num_items_in_batch, (list, tuple)):
        wts = _plain_weights(n, alpha, num_items_in_batch, dev, True)
    else:
        wts = _grouped_weights(rows, seq, bsz, alpha, row_weights, row_groups,
                               num_items_in_batch, teacher_rows, dev)
    nt = wts.n_teacher
    ids = teacher_topk_ids.to(dev)
    if ids.dim() != 2 or ids.shape[0] != nt or ids.shape[1] < 1 or \
            teacher_topk_logits.shape != ids.shape or tuple(teacher_logZ.shape) != (nt,):
        raise ValueError(f"teacher top-k: ids {tuple(ids.shape)} and logits "
                         f"{tuple(teacher_topk_logits.shape)} must be (N_t={nt}, k), logZ "
                         f"{tuple(teacher_logZ.shape)} must be ({nt},)")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"teacher_topk_ids must be int32/int64, got {ids.dtype}")
    k = ids.shape[1]
    if k > cfg.vocab:
        raise ValueError(f"k={k} exceeds vocab_size={cfg.vocab}")
    ids = ids.long()
    if nt:
        srt = ids.sort(dim=-1).values
        flags = torch.stack([(ids < 0).any(), (ids >= cfg.vocab).any(),
                             (srt[:, 1:] == srt[:, :-1]).any()]).tolist()  # one sync
        if flags[0] or flags[1]:
            raise ValueError(f"teacher_topk_ids must lie in [0, vocab_size={cfg.vocab}) (the "
                             f"student's real vocabulary); got ids in [{int(ids.min())}, "
                             f"{int(ids.max())}]")
        if flags[2]:
            raise ValueError("teacher_topk_ids must be distinct within each row")
    _check_targets(targets, cfg.vocab)
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and student_hidden.requires_grad
    need_w = grad_on and student_lm_head_weight.requires_grad
    stats: dict[str, Any] = {}
    spec = ("topk", ids, teacher_topk_logits.detach().to(dev), teacher_logZ.detach().to(dev))
    res = _FusedKDLossFn.apply(student_hidden, student_lm_head_weight, spec, rows, targets, cfg,
                               wts, need_h, need_w, stats)
    return _output(res, n, stats, wts)


@torch.no_grad()
def teacher_topk_from_logits(
    teacher_logits: torch.Tensor,
    k: int,
    temperatures: Sequence[float],
    vocab_size: int,
    *,
    values_dtype: torch.dtype = torch.float16,
    max_logit_abs: float | None = 50.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cache :func:`fused_topk_kd_loss` reads, from teacher logits ``(N, V_t)``.

    Only the first ``min(vocab_size, V_t)`` columns (the real tokens; the padding rows of the
    lm head are dropped, as ``vocab_size`` does in every loss here) are used. Finite logits are
    clamped to ``±max_logit_abs`` like the live losses do (``None``: no clamp); any non-finite
    logit makes that row's values/log-normalisers NaN, so the loss reports it.

    Returns ``(ids (N, k) int32, values (N, k) values_dtype, logZ (len(temperatures), N) fp32)``
    with ``ids`` sorted by decreasing logit, ``values`` their (clamped) logits and
    ``logZ[j] = logsumexp(z / T_j)`` over the real columns (computed in fp32, rows in chunks).
    """
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher_logits must be (N, V_t), got {tuple(teacher_logits.shape)}")
    v = min(int(vocab_size), teacher_logits.shape[1])
    if not 1 <= int(k) <= v:
        raise ValueError(f"k={k} must lie in [1, {v}]")
    temps = [float(t) for t in temperatures]
    if not temps or not all(t > 0 and math.isfinite(t) for t in temps):
        raise ValueError(f"temperatures={temperatures} must be positive finite numbers")
    n = teacher_logits.shape[0]
    dev = teacher_logits.device
    ids = torch.empty(n, int(k), dtype=torch.int32, device=dev)
    vals = torch.empty(n, int(k), dtype=values_dtype, device=dev)
    logz = torch.empty(len(temps), n, dtype=torch.float32, device=dev)
    for c0 in range(0, n, max(1, int(chunk_size))):
        z = teacher_logits[c0:c0 + chunk_size, :v].float()
        bad = ~torch.isfinite(z).all(-1)
        if max_logit_abs is not None:
            z.clamp_(-max_logit_abs, max_logit_abs)
        z[bad] = float("nan")
        top = z.topk(int(k), dim=-1)
        ids[c0:c0 + chunk_size] = top.indices.to(torch.int32)
        vals[c0:c0 + chunk_size] = top.values.to(values_dtype)
        for j, t in enumerate(temps):
            logz[j, c0:c0 + chunk_size] = torch.logsumexp(z / t, dim=-1)
    return ids, vals, logz
