""":func:`fused_kd_loss` and :func:`fused_cascod_loss`: KD from hidden states and lm-head weights,
without full logits (math in :mod:`slmkd.losses`)."""

from __future__ import annotations

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


def fused_kd_loss(
    student_hidden: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_lm_head_weight: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    max_logit_abs: float = 50.0,
    vocab_size: int | None = None,
    num_items_in_batch: int | torch.Tensor | Sequence[Any] | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    nonfinite: str = "report",
    row_weights: torch.Tensor | Sequence[float] | None = None,
    row_groups: torch.Tensor | Sequence[int] | None = None,
) -> KDLossOutput:
    """:func:`kd_loss` of ``s = h_s @ W_s.T`` and ``t = h_t @ W_t.T`` without full logits.

    Shapes: ``student_hidden (B, T, Hs)``, ``student_lm_head_weight (Vs, Hs)``,
    ``teacher_hidden (B_t, T, Ht)`` with ``B_t <= B`` (usually ``B_t = B``),
    ``teacher_lm_head_weight (Vt, Ht)`` (``Ht`` may differ from ``Hs``, ``Vt`` from ``Vs``),
    ``labels (B, T)``. Keyword arguments and math as in :func:`kd_loss`; without a teacher (both
    ``None``) it is plain CE and needs ``alpha == 0``.

    Row weights, divisor groups, partial teacher (all optional; defaults give the plain loss).
    With ``w_b = row_weights[b]`` (default 1), ``g(b) = row_groups[b]`` in ``[0, G)`` (default
    0), ``D_g`` = ``num_items_in_batch[g]`` (a sequence of ``G`` values, ``None`` entries = the
    local count of group ``g``; a scalar when ``G = 1``), and ``α_b = α`` for ``b < B_t`` (rows
    with a teacher), ``α_b = 0`` otherwise::

        c_i  = w_{b(i)} / D_{g(b(i))}
        loss = Σ_i c_i · [(1 - α_b)·CE_i + α_b·KD_i]          (KD_i only where b < B_t)
        ce   = Σ_i c_i·CE_i,   kd = Σ_i c_i·KD_i
        group_ce[g] = Σ_{i∈g} CE_i / D_g,   group_kd[g] = Σ_{i∈g} KD_i / D_g   (unweighted)

    So rows without a teacher contribute plain CE (weight 1, not ``1 - α``). One call, one
    ``grad_W`` buffer: this is how :func:`fused_cascod_loss` computes CasCoD's two terms.

    For each chunk of supervised rows the forward pass computes the logits of both models
    (fp32 accumulation, only the first ``V`` weight rows; see the module doc for the matmul
    precision and the single weight upcast), the loss, the analytic gradient ``g`` w.r.t. the
    student logits, then ``grad_h = g @ W_s`` and ``grad_W_s += g.T @ h``. Only ``grad_h``
    (like ``student_hidden``) and ``grad_W_s`` (like the weight) are kept; backward scales them
    by the incoming gradient. The teacher gets no gradient. Peak extra memory: those two
    gradients plus ``O(chunk_size · V)`` fp32 (plus the one-off fp32 weight copies where an
    upcast is needed).
    """
    _check_student(student_hidden, student_lm_head_weight, labels)
    if (teacher_hidden is None) != (teacher_lm_head_weight is None):
        raise ValueError("give both teacher_hidden and teacher_lm_head_weight, or neither")
    bsz, seq = labels.shape
    b_t = None
    if teacher_hidden is not None:
        if teacher_hidden.dim() != 3 or teacher_hidden.shape[1] != seq or \
                not 1 <= teacher_hidden.shape[0] <= bsz:
            raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must be (B_t, {seq}, "
                             f"Ht) with 1 <= B_t <= {bsz} (student_hidden "
                             f"{tuple(student_hidden.shape)})")
        if teacher_lm_head_weight.dim() != 2 or \
                teacher_lm_head_weight.shape[1] != teacher_hidden.shape[-1]:
            raise ValueError(f"teacher_lm_head_weight {tuple(teacher_lm_head_weight.shape)} "
                             f"must be (Vt, {teacher_hidden.shape[-1]})")
        b_t = teacher_hidden.shape[0]
    dev = student_hidden.device
    cfg = _make_cfg(temperature=temperature, alpha=alpha, max_logit_abs=max_logit_abs,
                    vs=student_lm_head_weight.shape[0],
                    vt=None if teacher_lm_head_weight is None else teacher_lm_head_weight.shape[0],
                    has_teacher=teacher_hidden is not None, vocab_size=vocab_size,
                    chunk_size=chunk_size,
                    cd=_compute_dtype(student_hidden, student_lm_head_weight, teacher_hidden,
                                      teacher_lm_head_weight), device=dev, nonfinite=nonfinite)
    rows, targets = supervised_positions(labels.to(dev), ignore_index)
    n = int(rows.numel())
    if row_weights is None and row_groups is None and (b_t is None or b_t == bsz) and \
            not isinstance(num_items_in_batch, (list, tuple)):
        wts = _plain_weights(n, alpha, num_items_in_batch, dev, teacher_hidden is not None)
    else:
        wts = _grouped_weights(rows, seq, bsz, alpha if b_t is not None else 0.0, row_weights,
                               row_groups, num_items_in_batch,
                               0 if b_t is None else b_t, dev)
    _check_targets(targets, cfg.vocab)
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and student_hidden.requires_grad
    need_w = grad_on and student_lm_head_weight.requires_grad
    stats: dict[str, Any] = {}
    spec = None if teacher_hidden is None else \
        ("hidden", teacher_hidden.detach(), teacher_lm_head_weight.detach())
    res = _FusedKDLossFn.apply(student_hidden, student_lm_head_weight, spec, rows, targets, cfg,
                               wts, need_h, need_w, stats)
    return _output(res, n, stats, wts)


def fused_cascod_loss(
    student_hidden: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    num_rationale_rows: int,
    *,
    alpha_cascod: float,
    teacher_hidden: torch.Tensor | None = None,
    teacher_lm_head_weight: torch.Tensor | None = None,
    temperature: float = 1.0,
    alpha: float = 0.0,
    max_logit_abs: float = 50.0,
    vocab_size: int | None = None,
    num_rationale_tokens: int | torch.Tensor | None = None,
    num_answer_tokens: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    nonfinite: str = "report",
    teacher_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> KDLossOutput:
    """CasCoD's joint loss ``(1 - α_c)·L_r + α_c·L_a`` in one :func:`fused_kd_loss` call.

    The batch stacks ``B = num_rationale_rows`` rationale rows, then ``B`` answer rows:
    ``student_hidden (2B, T, Hs)``, ``labels (2B, T)``; ``teacher_hidden (B, T, Ht)`` (optional,
    CasCoD-KD) covers the rationale rows only. With ``N_r`` / ``N_a`` =
    ``num_rationale_tokens`` / ``num_answer_tokens`` (default: this batch's counts)::

        L_r = Σ_{i∈R} [(1 - α)·CE_i + α·KD_i] / N_r     (α = 0 without a teacher)
        L_a = Σ_{i∈A} CE_i / N_a
        loss = (1 - α_c)·L_r + α_c·L_a

    i.e. ``row_weights = [1-α_c]*B + [α_c]*B``, ``row_groups = [0]*B + [1]*B``,
    ``num_items_in_batch = (N_r, N_a)``. The result's ``group_ce = (CE_r, CE_a)``,
    ``group_kd = (KD_r, 0)``, ``group_tokens = (n_r, n_a)``; ``ce`` is the joint CE objective
    ``(1-α_c)·CE_r + α_c·CE_a`` and ``L_r = (1-α)·group_ce[0] + α·group_kd[0]``.

    ``teacher_topk = (ids (N_r, k), values (N_r, k), logZ (N_r,))`` instead of the teacher's
    hidden states: the teacher from its cache for the ``N_r`` supervised rationale positions, and
    ``KD_i`` is the bucket KL of :func:`slmkd.losses.fused_topk_kd_loss` (one call, same weights).
    """
    b = int(num_rationale_rows)
    if student_hidden.dim() != 3 or student_hidden.shape[0] != 2 * b or labels.shape[0] != 2 * b:
        raise ValueError(f"expected 2*{b} rows (rationale then answer), got hidden "
                         f"{tuple(student_hidden.shape)} and labels {tuple(labels.shape)}")
    if teacher_hidden is not None and teacher_hidden.shape[0] != b:
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must cover the {b} "
                         f"rationale rows")
    if not 0.0 <= alpha_cascod <= 1.0:
        raise ValueError(f"alpha_cascod={alpha_cascod} must lie in [0, 1]")
    ac = float(alpha_cascod)
    weights = torch.tensor([1.0 - ac] * b + [ac] * b, dtype=torch.float64)
    groups = torch.tensor([0] * b + [1] * b)
    if teacher_topk is not None:
        if teacher_hidden is not None:
            raise ValueError("give teacher_hidden or teacher_topk, not both")
        from slmkd.losses.topk import fused_topk_kd_loss

        t_ids, t_vals, t_logz = teacher_topk
        return fused_topk_kd_loss(
            student_hidden, student_lm_head_weight, labels, t_ids, t_vals, t_logz,
            temperature=temperature, alpha=alpha, max_logit_abs=max_logit_abs,
            vocab_size=vocab_size, num_items_in_batch=[num_rationale_tokens, num_answer_tokens],
            chunk_size=chunk_size, ignore_index=ignore_index, nonfinite=nonfinite,
            row_weights=weights, row_groups=groups, teacher_rows=b)
    return fused_kd_loss(student_hidden, student_lm_head_weight, teacher_hidden,
                         teacher_lm_head_weight, labels, temperature=temperature, alpha=alpha,
                         max_logit_abs=max_logit_abs, vocab_size=vocab_size,
                         num_items_in_batch=[num_rationale_tokens, num_answer_tokens],
                         chunk_size=chunk_size, ignore_index=ignore_index, nonfinite=nonfinite,
                         row_weights=weights, row_groups=groups)


# ---------------------------------------------------------------------------------------------
# KD from a cached teacher top-k
# ---------------------------------------------------------------------------------------------
