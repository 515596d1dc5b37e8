"""Numerically stable, memory-bounded knowledge-distillation losses.

Two entry points compute the same quantity:

* :func:`kd_loss` from full logits ``(B, T, Vs)`` / ``(B, T, Vt)``;
* :func:`fused_kd_loss` from final hidden states and lm-head weights, never materialising the
  full logits of either model.

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

Implementation: supervised rows are gathered first, processed ``chunk_size`` rows at a time in
fp32 (fp64 when given fp64), and the analytic gradient w.r.t. the student logits
(``dCE/dz = softmax(zs) - onehot(y)``, ``dKD/dz = T·(softmax(zs/T) - softmax(zt/T))``, zero where
the clamp is active) is computed in the forward pass chunk by chunk, so no ``(N, V)`` fp32
tensor is ever alive. Non-finite values (NaN → ``-M``, ±inf → ``±M``) at supervised positions
below ``V`` are counted in ``num_nonfinite``; values at ignored positions or at columns ``>= V``
are never read, so they cannot poison the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["KDLossOutput", "kd_loss", "fused_kd_loss", "default_chunk_size"]

IGNORE_INDEX = -100
#: Target number of elements of one fp32 ``(chunk, V)`` working buffer (64 MiB in fp32).
CHUNK_ELEMENTS = 1 << 24
#: Rows of a low-precision weight upcast at once on devices without a bf16→fp32 matmul.
_WEIGHT_BLOCK_ELEMENTS = 1 << 24


@dataclass
class KDLossOutput:
    """Result of :func:`kd_loss` / :func:`fused_kd_loss`.

    Attributes:
        loss: scalar ``(1 - α)·CE + α·KD``; the only differentiable field.
        ce: scalar ``Σ CE_i / D`` (detached).
        kd: scalar ``Σ KD_i / D`` (detached; 0 without a teacher).
        num_tokens: number of supervised positions in this call.
        num_nonfinite: number of non-finite logits met in the supervised rows below ``V``
            (student and teacher together), before they were replaced and clamped.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    num_tokens: int
    num_nonfinite: int


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk: ``max(16, min(1024, 2**24 // vocab_size))``.

    Each fp32 ``(chunk, V)`` working buffer is then about 64 MiB (110 rows at V = 151,936);
    a chunk holds about four of them.
    """
    return max(16, min(1024, CHUNK_ELEMENTS // max(1, int(vocab_size))))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Cfg:
    temperature: float
    w_ce: float  # (1 - alpha) / D
    w_kd: float  # alpha / D
    max_logit_abs: float
    vocab: int  # V
    teacher_vocab: int  # columns of the teacher used: min(V, Vt) (0 without a teacher)
    chunk: int
    compute_dtype: torch.dtype


_OUT_DTYPE_MM: dict[str, bool] = {}


def _has_out_dtype_mm(device: torch.device) -> bool:
    """Whether ``torch.mm(bf16, bf16, out_dtype=float32)`` works on this device type."""
    key = device.type
    if key not in _OUT_DTYPE_MM:
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
            ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except Exception:  # noqa: BLE001 - any failure means "not available"
            ok = False
        _OUT_DTYPE_MM[key] = ok
    return _OUT_DTYPE_MM[key]


def _is_low_precision(dtype: torch.dtype) -> bool:
    return dtype not in (torch.float32, torch.float64)


def _block_rows(hidden: int) -> int:
    return max(256, _WEIGHT_BLOCK_ELEMENTS // max(1, hidden))


def _logits(x: torch.Tensor, w: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """``x @ w.T`` for ``x (n, H)``, ``w (V, H)`` as a fresh ``(n, V)`` tensor of dtype ``cd``,
    accumulated (and, for low-precision weights, returned) in fp32 or better."""
    x = x.to(w.dtype)
    if not _is_low_precision(w.dtype):
        return (x @ w.t()).to(cd)
    if _has_out_dtype_mm(w.device):
        return torch.mm(x, w.t(), out_dtype=torch.float32).to(cd)
    # No bf16 x bf16 -> fp32 matmul here (CPU): upcast the weight a block of rows at a time.
    out = torch.empty(x.shape[0], w.shape[0], dtype=cd, device=w.device)
    xf = x.to(cd)
    step = _block_rows(w.shape[1])
    for v0 in range(0, w.shape[0], step):
        out[:, v0:v0 + step] = xf @ w[v0:v0 + step].to(cd).t()
    return out


def _backprop_linear(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                     grad_w: torch.Tensor | None, need_x: bool) -> torch.Tensor | None:
    """For ``z = x @ w.T`` with ``dL/dz = g (n, V)``: add ``g.T @ x`` into ``grad_w (V, H)``
    (in ``grad_w``'s dtype, fp32 accumulation inside the product) and return ``g @ w``
    ``(n, H)`` in ``g``'s dtype when ``need_x``."""
    cd = g.dtype
    if not _is_low_precision(w.dtype) or _has_out_dtype_mm(w.device):
        gl = g.to(w.dtype)
        gx = None
        if need_x:
            gx = (torch.mm(gl, w, out_dtype=torch.float32) if _is_low_precision(w.dtype)
                  else gl @ w).to(cd)
        if grad_w is not None:
            grad_w.addmm_(gl.t(), x.to(w.dtype))
        return gx
    xf = x.to(cd)
    gx = torch.zeros(g.shape[0], w.shape[1], dtype=cd, device=g.device) if need_x else None
    step = _block_rows(w.shape[1])
    for v0 in range(0, w.shape[0], step):
        gb = g[:, v0:v0 + step]
        if gx is not None:
            gx.addmm_(gb, w[v0:v0 + step].to(cd))
        if grad_w is not None:
            grad_w[v0:v0 + step].add_(gb.t() @ xf)
    return gx


def _sanitize(z: torch.Tensor, m: float, track_mask: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Clamp ``z`` (owned, modified in place) to ``[-m, m]`` (NaN → ``-m``, ±inf → ``±m``).

    Returns ``(z, row_max, inactive, n_nonfinite)``; ``inactive`` marks entries where the clamp
    is active (gradient zero), ``None`` (with ``n_nonfinite`` ``None``) when nothing needed fixing.
    """
    lo, hi = torch.aminmax(z, dim=-1)
    if bool(((lo >= -m) & (hi <= m)).all()):  # NaN fails both comparisons
        return z, hi, None, None
    finite = torch.isfinite(z)
    n_bad = finite.numel() - finite.sum()
    inactive = None
    if track_mask:
        inactive = z < -m
        inactive |= z > m
        inactive |= finite.logical_not_()
    del finite
    z.nan_to_num_(nan=-m, posinf=m, neginf=-m).clamp_(-m, m)
    return z, z.amax(dim=-1), inactive, n_bad


def _chunk(zs: torch.Tensor, zt: torch.Tensor | None, y: torch.Tensor, cfg: _Cfg,
           need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loss sums and gradient for one chunk.

    Args:
        zs: student logits ``(n, V)`` (owned; overwritten).
        zt: teacher logits ``(n, Vt')`` with ``Vt' <= V`` (owned; overwritten) or ``None``.
        y: targets ``(n,)`` in ``[0, V)``.

    Returns:
        ``(Σ CE_i, Σ KD_i, n_nonfinite, g)`` where ``g (n, V) = w_ce·dCE/dzs + w_kd·dKD/dzs``
        (``None`` unless ``need_grad``).
    """
    m, t = cfg.max_logit_abs, cfg.temperature
    inv_t = 1.0 / t
    zs, ms, inactive, bad_s = _sanitize(zs, m, need_grad)
    nonfinite = torch.zeros((), dtype=torch.int64, device=zs.device)
    if bad_s is not None:
        nonfinite += bad_s
    # student softmax (unnormalised) and CE
    p = zs - ms[:, None]
    p.exp_()
    s = p.sum(-1)
    ce = ms + s.log() - zs.gather(1, y[:, None]).squeeze(1)
    ce_sum = ce.sum(dtype=torch.float64)
    kd_sum = torch.zeros((), dtype=torch.float64, device=zs.device)
    g = None
    if zt is None:
        if need_grad:
            g = p.mul_((cfg.w_ce / s)[:, None])
    else:
        vt = zt.shape[1]
        zt, mt, _, bad_t = _sanitize(zt, m, False)
        if bad_t is not None:
            nonfinite += bad_t
        pt = zt - mt[:, None]
        if t != 1.0:
            pt.mul_(inv_t)
        pt.exp_()
        st = pt.sum(-1)
        # KD_i = T²·[ <p_t, zt - zs>/T - (mt - ms)/T + log(sq / st) ]
        zt.sub_(zs[:, :vt])
        dot = torch.linalg.vecdot(pt, zt) / st
        del zt
        if t == 1.0:
            q, sq = p, s
        else:
            q = zs.sub_(ms[:, None]).mul_(inv_t).exp_()
            sq = q.sum(-1)
        kd = (t * t) * (inv_t * (dot - (mt - ms)) + (sq / st).log())
        kd_sum = kd.sum(dtype=torch.float64)
        if need_grad:
            if t == 1.0:
                g = p.mul_(((cfg.w_ce + cfg.w_kd) / s)[:, None])
            else:
                g = p.mul_((cfg.w_ce / s)[:, None])
                g.addcmul_(q, (cfg.w_kd * t / sq)[:, None])
            g[:, :vt].addcmul_(pt, (-cfg.w_kd * t / st)[:, None])
    if g is not None:
        rows = torch.arange(g.shape[0], device=g.device)
        g[rows, y] -= cfg.w_ce
        if inactive is not None:
            g.masked_fill_(inactive, 0.0)
    return ce_sum, kd_sum, nonfinite, g


def _supervised(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices ``b*T + t`` (``t < T-1``) with ``labels[b, t+1] != ignore_index`` and
    their targets."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be (B, T), got {tuple(labels.shape)}")
    bsz, seq = labels.shape
    shifted = labels[:, 1:]
    b, t = (shifted != ignore_index).nonzero(as_tuple=True)
    rows = b * seq + t
    return rows, shifted[b, t].long()


def _divisor(num_items_in_batch: Any, n_local: int) -> float:
    if num_items_in_batch is None:
        return float(n_local)
    d = float(num_items_in_batch.item() if torch.is_tensor(num_items_in_batch)
              else num_items_in_batch)
    if n_local > 0 and not d > 0:
        raise ValueError(f"num_items_in_batch={d} must be positive when there are "
                         f"{n_local} supervised tokens")
    return d


def _make_cfg(*, temperature: float, alpha: float, max_logit_abs: float, vs: int,
              vt: int | None, vocab_size: int | None, divisor: float,
              chunk_size: int | None, cd: torch.dtype) -> _Cfg:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature} must be a positive finite number")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    if not (max_logit_abs > 0 and math.isfinite(max_logit_abs)):
        raise ValueError(f"max_logit_abs={max_logit_abs} must be a positive finite number")
    if vt is None and alpha > 0:
        raise ValueError("alpha > 0 needs a teacher")
    v = (min(vs, vt) if vt is not None else vs) if vocab_size is None else int(vocab_size)
    if not 1 <= v <= vs:
        raise ValueError(f"vocab_size={v} must lie in [1, {vs}] (the student's vocabulary)")
    chunk = default_chunk_size(v) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    d = divisor if divisor > 0 else 1.0
    return _Cfg(temperature=float(temperature), w_ce=(1.0 - alpha) / d, w_kd=alpha / d,
                max_logit_abs=float(max_logit_abs), vocab=v,
                teacher_vocab=0 if vt is None else min(v, vt), chunk=chunk, compute_dtype=cd)


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return (torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors)
            else torch.float32)


def _check_targets(y: torch.Tensor, v: int) -> None:
    if y.numel() and bool(((y < 0) | (y >= v)).any()):
        bad = y[(y < 0) | (y >= v)][:5].tolist()
        raise ValueError(f"supervised labels must lie in [0, vocab_size={v}); got e.g. {bad}")


def _finish(ce_sum: torch.Tensor, kd_sum: torch.Tensor, divisor: float, alpha: float,
            cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = divisor if divisor > 0 else 1.0
    ce = (ce_sum / d).to(cd)
    kd = (kd_sum / d).to(cd)
    loss = ((1.0 - alpha) * ce_sum / d + alpha * kd_sum / d).to(cd)
    return loss, ce, kd


def _scaled(grad: torch.Tensor | None, grad_output: torch.Tensor) -> torch.Tensor | None:
    if grad is None:
        return None
    if bool(grad_output == 1):
        return grad
    return grad * grad_output.to(grad.dtype)


# ---------------------------------------------------------------------------------------------
# kd_loss: full logits
# ---------------------------------------------------------------------------------------------
class _KDLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                rows: torch.Tensor, targets: torch.Tensor, cfg: _Cfg, alpha: float,
                divisor: float, need_grad: bool, stats: dict[str, int]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vs = student_logits.shape[-1]
        s_flat = student_logits.reshape(-1, vs)[:, :cfg.vocab]
        t_flat = None
        if teacher_logits is not None:
            t_flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])[:, :cfg.teacher_vocab]
        grad = None
        if need_grad:
            grad = torch.zeros(student_logits.shape, dtype=student_logits.dtype,
                               device=student_logits.device)
            g_flat = grad.view(-1, vs)[:, :cfg.vocab]
        cd = cfg.compute_dtype
        ce_sum = torch.zeros((), dtype=torch.float64, device=student_logits.device)
        kd_sum = torch.zeros_like(ce_sum)
        nonfinite = torch.zeros((), dtype=torch.int64, device=student_logits.device)
        with torch.no_grad():
            for c0 in range(0, rows.numel(), cfg.chunk):
                r = rows[c0:c0 + cfg.chunk]
                zs = s_flat.index_select(0, r).to(cd)
                zt = None if t_flat is None else t_flat.index_select(0, r).to(cd)
                c, k, nf, g = _chunk(zs, zt, targets[c0:c0 + cfg.chunk], cfg, need_grad)
                del zs, zt
                ce_sum += c
                kd_sum += k
                nonfinite += nf
                if g is not None:
                    g_flat.index_copy_(0, r, g.to(grad.dtype))
                del g
        stats["num_nonfinite"] = int(nonfinite)
        loss, ce, kd = _finish(ce_sum, kd_sum, divisor, alpha, cd)
        ctx.grad = grad
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        if ctx.grad is None and ctx.needs_input_grad[0]:
            raise RuntimeError("kd_loss: gradient already consumed (backward twice?)")
        g = _scaled(ctx.grad, grad_loss)
        ctx.grad = None
        return g, None, None, None, None, None, None, None, None


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
        max_logit_abs: clamp bound ``M``; the gradient is zero where the clamp is active.
        vocab_size: ``V``, the real vocabulary (tokenizer length); columns ``>= V`` are excluded
            from both softmaxes. Default ``min(Vs, Vt)``. Teacher columns missing below ``V``
            get probability zero.
        num_items_in_batch: ``D``, supervised tokens of the whole accumulated batch (as
            ``transformers.Trainer`` passes it); default the local count.
        chunk_size: supervised rows per chunk; default :func:`default_chunk_size` (``V``).
        ignore_index: label value that is not supervised.

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
    rows, targets = _supervised(labels.to(student_logits.device), ignore_index)
    n = int(rows.numel())
    divisor = _divisor(num_items_in_batch, n)
    cfg = _make_cfg(temperature=temperature, alpha=alpha, max_logit_abs=max_logit_abs,
                    vs=student_logits.shape[-1],
                    vt=None if teacher_logits is None else teacher_logits.shape[-1],
                    vocab_size=vocab_size, divisor=divisor, chunk_size=chunk_size,
                    cd=_compute_dtype(student_logits, teacher_logits))
    _check_targets(targets, cfg.vocab)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    stats: dict[str, int] = {}
    teacher = None if teacher_logits is None else teacher_logits.detach()
    loss, ce, kd = _KDLossFn.apply(student_logits, teacher, rows, targets, cfg, alpha,
                                   divisor, need_grad, stats)
    return KDLossOutput(loss=loss, ce=ce, kd=kd, num_tokens=n,
                        num_nonfinite=stats["num_nonfinite"])


# ---------------------------------------------------------------------------------------------
# fused_kd_loss: hidden states + lm-head weights
# ---------------------------------------------------------------------------------------------
class _FusedKDLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor | None,
                wt: torch.Tensor | None, rows: torch.Tensor, targets: torch.Tensor, cfg: _Cfg,
                alpha: float, divisor: float, need_h: bool, need_w: bool,
                stats: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h_flat = hs.reshape(-1, hs.shape[-1])
        ws_v = ws[:cfg.vocab]
        ht_flat = None if ht is None else ht.reshape(-1, ht.shape[-1])
        wt_v = None if wt is None else wt[:cfg.teacher_vocab]
        need_grad = need_h or need_w
        grad_h = torch.zeros(h_flat.shape, dtype=hs.dtype, device=hs.device) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=ws.dtype, device=ws.device) if need_w else None
        cd = cfg.compute_dtype
        ce_sum = torch.zeros((), dtype=torch.float64, device=hs.device)
        kd_sum = torch.zeros_like(ce_sum)
        nonfinite = torch.zeros((), dtype=torch.int64, device=hs.device)
        with torch.no_grad():
            for c0 in range(0, rows.numel(), cfg.chunk):
                r = rows[c0:c0 + cfg.chunk]
                x = h_flat.index_select(0, r)
                zs = _logits(x, ws_v, cd)
                zt = None if ht_flat is None else _logits(ht_flat.index_select(0, r), wt_v, cd)
                c, k, nf, g = _chunk(zs, zt, targets[c0:c0 + cfg.chunk], cfg, need_grad)
                del zs, zt
                ce_sum += c
                kd_sum += k
                nonfinite += nf
                if g is not None:
                    gw_v = None if grad_w is None else grad_w[:cfg.vocab]
                    gx = _backprop_linear(g, x, ws_v, gw_v, need_h)
                    del g
                    if gx is not None:
                        grad_h.index_copy_(0, r, gx.to(grad_h.dtype))
        stats["num_nonfinite"] = int(nonfinite)
        loss, ce, kd = _finish(ce_sum, kd_sum, divisor, alpha, cd)
        ctx.grads = (None if grad_h is None else grad_h.view(hs.shape), grad_w)
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        if ctx.grads is None:
            raise RuntimeError("fused_kd_loss: gradient already consumed (backward twice?)")
        gh, gw = ctx.grads
        ctx.grads = None
        return (_scaled(gh, grad_loss), _scaled(gw, grad_loss),
                None, None, None, None, None, None, None, None, None, None)


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
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> KDLossOutput:
    """:func:`kd_loss` of ``s = h_s @ W_s.T`` and ``t = h_t @ W_t.T`` without full logits.

    Shapes: ``student_hidden (B, T, Hs)``, ``student_lm_head_weight (Vs, Hs)``,
    ``teacher_hidden (B, T, Ht)``, ``teacher_lm_head_weight (Vt, Ht)`` (``Ht`` may differ from
    ``Hs``, ``Vt`` from ``Vs``), ``labels (B, T)``. Keyword arguments and math as in
    :func:`kd_loss`; without a teacher (both ``None``) it is plain CE and needs ``alpha == 0``.

    For each chunk of supervised rows the forward pass computes the logits of both models
    (fp32 accumulation, only the first ``V`` weight rows), the loss, the analytic gradient ``g``
    w.r.t. the student logits, then ``grad_h = g @ W_s`` and ``grad_W_s += g.T @ h``. Only
    ``grad_h`` (like ``student_hidden``) and ``grad_W_s`` (like the weight, accumulated in its
    dtype once per chunk) are kept; backward scales them by the incoming gradient. The teacher
    gets no gradient. Peak extra memory: those two gradients plus ``O(chunk_size · V)`` fp32.
    """
    if student_hidden.dim() != 3:
        raise ValueError(f"student_hidden must be (B, T, Hs), got {tuple(student_hidden.shape)}")
    if student_lm_head_weight.dim() != 2 or \
            student_lm_head_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student_lm_head_weight {tuple(student_lm_head_weight.shape)} must be "
                         f"(Vs, {student_hidden.shape[-1]})")
    if (teacher_hidden is None) != (teacher_lm_head_weight is None):
        raise ValueError("give both teacher_hidden and teacher_lm_head_weight, or neither")
    if teacher_hidden is not None:
        if teacher_hidden.shape[:2] != student_hidden.shape[:2]:
            raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} and student_hidden "
                             f"{tuple(student_hidden.shape)} differ in (B, T)")
        if teacher_lm_head_weight.dim() != 2 or \
                teacher_lm_head_weight.shape[1] != teacher_hidden.shape[-1]:
            raise ValueError(f"teacher_lm_head_weight {tuple(teacher_lm_head_weight.shape)} "
                             f"must be (Vt, {teacher_hidden.shape[-1]})")
    if labels.shape != student_hidden.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must be (B, T) = "
                         f"{tuple(student_hidden.shape[:2])}")
    rows, targets = _supervised(labels.to(student_hidden.device), ignore_index)
    n = int(rows.numel())
    divisor = _divisor(num_items_in_batch, n)
    cfg = _make_cfg(temperature=temperature, alpha=alpha, max_logit_abs=max_logit_abs,
                    vs=student_lm_head_weight.shape[0],
                    vt=None if teacher_lm_head_weight is None else teacher_lm_head_weight.shape[0],
                    vocab_size=vocab_size, divisor=divisor, chunk_size=chunk_size,
                    cd=_compute_dtype(student_hidden, student_lm_head_weight, teacher_hidden,
                                      teacher_lm_head_weight))
    _check_targets(targets, cfg.vocab)
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and student_hidden.requires_grad
    need_w = grad_on and student_lm_head_weight.requires_grad
    stats: dict[str, int] = {}
    ht = None if teacher_hidden is None else teacher_hidden.detach()
    wt = None if teacher_lm_head_weight is None else teacher_lm_head_weight.detach()
    loss, ce, kd = _FusedKDLossFn.apply(student_hidden, student_lm_head_weight, ht, wt, rows,
                                        targets, cfg, alpha, divisor, need_h, need_w, stats)
    return KDLossOutput(loss=loss, ce=ce, kd=kd, num_tokens=n,
                        num_nonfinite=stats["num_nonfinite"])
