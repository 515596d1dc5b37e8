"""Numerically stable, memory-bounded knowledge-distillation losses.

Entry points:

* :func:`kd_loss` from full logits ``(B, T, Vs)`` / ``(B, T, Vt)``;
* :func:`fused_kd_loss` from final hidden states and lm-head weights, never materialising the
  full logits of either model; optional per-example weights and divisor groups, and a teacher
  that covers only the first rows of the batch;
* :func:`fused_cascod_loss`: the CasCoD joint loss (rationale rows + answer rows) in one
  :func:`fused_kd_loss` call (one ``grad_W`` accumulator);
* :func:`fused_topk_kd_loss`: KD from a cached teacher top-k (ids, logits, log-normaliser),
  the KL between (k+1)-bucket coarse-grainings; :func:`teacher_topk_from_logits` writes that
  cache from teacher logits.

Math (for every supervised position ``i``; Hugging Face causal convention: position ``t``
predicts ``labels[t + 1]``, ``-100`` is ignored)::

    zs_i = clamp(s_i[:V], -M, M)          zt_i = clamp(t_i[:min(V, Vt)], -M, M)
    CE_i = -log softmax(zs_i)[y_i]
    KD_i = T² · KL(softmax(zt_i / T) ‖ softmax(zs_i / T))      (the true KL: 0 when zt == zs)
    CE   = Σ_i CE_i / D        KD = Σ_i KD_i / D
    loss = (1 - α)·CE + α·KD

``V`` is ``vocab_size`` (default ``min(Vs, Vt)``): columns ``>= V`` are excluded from both
distributions; teacher columns missing below ``V`` (``Vt < V``) get probability zero. ``M`` is
``max_logit_abs``; ``D`` is ``num_items_in_batch`` when given, else the local supervised count.
The clamp applies to *finite* logits too (``|z| = 1e4`` becomes ``±M``; the gradient is zero
where it is active), so extreme but finite logits give a finite loss.

Non-finite logits (``nonfinite=``):

* ``"report"`` (default): a supervised row (below ``V``) whose student or teacher logits contain
  NaN/±inf is counted (``num_nonfinite_student`` / ``num_nonfinite_teacher``, ``num_nonfinite``
  = their sum) and ``loss``, ``ce``, ``kd`` become NaN, so a guard that skips non-finite losses
  skips the step. The gradient of those rows is zero; the others' is unchanged (and finite).
* ``"sanitize"``: NaN → ``-M``, ±inf → ``±M`` (gradient zero there), the rows are still counted
  and the loss is finite (the pre-``nonfinite`` behaviour: a NaN teacher row becomes a uniform
  target).

Values at ignored positions or at columns ``>= V`` are never read, so they cannot poison the
result and are never counted.

Implementation: supervised rows are gathered first, processed ``chunk_size`` rows at a time in
fp32 (fp64 when given fp64), and the analytic gradient w.r.t. the student logits
(``dCE/dz = softmax(zs) - onehot(y)``, ``dKD/dz = T·(softmax(zs/T) - softmax(zt/T))``, zero where
the clamp is active, i.e. where ``|zs| >= M``) is computed in the forward pass chunk by chunk,
so no ``(N, V)`` fp32 tensor is ever alive; the ``(chunk, V)`` scratch buffers are allocated once
per call and reused by every chunk. No host synchronisation happens per chunk: counts and sums
stay on the device and are read once at the end of the call. The number of syncs per call is
fixed (the supervised-row ``nonzero``, the target range check, one read of the per-group counts
with row groups, one check of the top-k ids, the final read of the non-finite counts, and
``num_items_in_batch.item()`` when it is a tensor).

Matmuls (:func:`fused_kd_loss` and friends): fp32/fp64 weights → plain matmuls in that dtype;
bf16/fp16 weights on a device with ``torch.mm(..., out_dtype=torch.float32)`` (CUDA, torch ≥
2.8) → low-precision matmuls with fp32 accumulation *and fp32 output* (the logits are never
rounded to bf16); the gradient w.r.t. the weight is accumulated with ``addmm_`` into a buffer of
the weight's dtype once per chunk (cuBLAS accumulates in fp32 inside the product; whether it
may use reduced-precision split-K reductions follows the global
``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction``, which this module never
changes). Elsewhere (CPU, older torch) the first ``V`` rows of a low-precision weight are upcast
to fp32 **once per call** (not per chunk; costs one fp32 copy of each weight: 0.93 GB for
151,936 × 1,536, 2.2 GB for the 7B teacher's 3,584 columns) and fp32 matmuls run (on CUDA these
follow ``torch.backends.cuda.matmul.allow_tf32``, off by default).
"""

from slmkd.losses.engine import (  # noqa: F401
    CPU_MAX_CHUNK_ROWS,
    IGNORE_INDEX,
    NONFINITE_MODES,
    KDLossOutput,
    default_chunk_size,
    supervised_positions,
)
from slmkd.losses.fused import fused_cascod_loss, fused_kd_loss
from slmkd.losses.logits import kd_loss
from slmkd.losses.topk import fused_topk_kd_loss, teacher_topk_from_logits

__all__ = ["KDLossOutput", "kd_loss", "fused_kd_loss", "fused_cascod_loss",
           "fused_topk_kd_loss", "teacher_topk_from_logits", "supervised_positions",
           "default_chunk_size", "NONFINITE_MODES"]
