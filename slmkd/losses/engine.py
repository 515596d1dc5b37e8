"""The chunked engine shared by every KD loss: configuration, vocabulary chunks, the analytic
per-chunk gradients, row weights, non-finite bookkeeping. Math in :mod:`slmkd.losses`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
NONFINITE_MODES = ("report", "sanitize")
#: CUDA: rows per chunk are ``max(1024, min(16384, CUDA_CHUNK_ELEMENTS // V))``; 1,024 at the
#: Qwen vocabulary (a 0.62 GB fp32 ``(1024, 151936)`` working buffer).
CUDA_CHUNK_ELEMENTS = 1 << 27
#: CPU: rows per chunk are ``max(16, min(CPU_MAX_CHUNK_ROWS, CPU_CHUNK_ELEMENTS // V))``, 1,024
#: at the Qwen vocabulary (measured: 128/256/512/1,024-row chunks took 24.6/22.5/22.2/20.5 s of
#: CPU time for 1,024 tokens at V = 151,936, Hs = 1,536, Ht = 3,584; ``benchmarks/RESULTS.md``).
CPU_CHUNK_ELEMENTS = 1 << 28
CPU_MAX_CHUNK_ROWS = 1024
#: Rows of an upcast weight processed at once when accumulating a low-precision ``grad_W``.
_WEIGHT_BLOCK_ELEMENTS = 1 << 24


@dataclass
class KDLossOutput:
    """Result of the losses of this module.

    Attributes:
        loss: scalar; the only differentiable field. ``(1 - α)·CE + α·KD`` without row
            weights; in general ``Σ_i c_i·[(1 - α_i)·CE_i + α_i·KD_i]`` (see
            :func:`fused_kd_loss`).
        ce: scalar ``Σ_i c_i·CE_i`` (detached; ``Σ CE_i / D`` without row weights).
        kd: scalar ``Σ_i c_i·KD_i`` (detached; 0 without a teacher).
        num_tokens: number of supervised positions in this call.
        num_nonfinite: ``num_nonfinite_student + num_nonfinite_teacher``.
        num_nonfinite_student: supervised rows whose student logits (below ``V``) contain a
            non-finite value.
        num_nonfinite_teacher: supervised rows with a teacher whose teacher logits (or cached
            top-k values / log-normaliser) contain a non-finite value.
        group_ce: ``(G,)`` per divisor group ``Σ_{i∈g} CE_i / D_g`` (unweighted; detached).
        group_kd: ``(G,)`` per group ``Σ_{i∈g} KD_i / D_g`` (detached).
        group_tokens: supervised positions per group in this call.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    num_tokens: int
    num_nonfinite: int
    num_nonfinite_student: int = 0
    num_nonfinite_teacher: int = 0
    group_ce: torch.Tensor | None = None
    group_kd: torch.Tensor | None = None
    group_tokens: tuple[int, ...] | None = None


def default_chunk_size(vocab_size: int, device: torch.device | str | None = None) -> int:
    """Supervised rows per chunk for a vocabulary of ``vocab_size`` on ``device``.

    * CUDA (any non-CPU device) and ``device=None`` (what the planner assumes: the training
      GPU): ``max(1024, min(16384, 2**27 // V))`` — 1,024 rows at V = 151,936 (≈ 0.6 GB per
      fp32 ``(chunk, V)`` buffer, about four alive at once).
    * CPU: ``max(16, min(1024, 2**28 // V))`` — also 1,024 rows at V = 151,936 (the fastest of
      128/256/512/1,024 in a measurement, ``benchmarks/RESULTS.md``: fewer passes over both
      lm-head weights and ``grad_W`` per token); fewer rows only for vocabularies above 262k.

    The losses call it with the device of their inputs.
    """
    v = max(1, int(vocab_size))
    dev_type = "cuda" if device is None else torch.device(device).type
    if dev_type == "cpu":
        return max(16, min(CPU_MAX_CHUNK_ROWS, CPU_CHUNK_ELEMENTS // v))
    return max(1024, min(16384, CUDA_CHUNK_ELEMENTS // v))


def supervised_positions(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The supervised positions of ``labels (B, T)`` in the order every loss here uses.

    Returns ``(rows, targets)``: flat indices ``b*T + t`` (``t < T-1``, row-major, i.e. sorted)
    with ``labels[b, t+1] != ignore_index`` and their targets ``labels[b, t+1]`` (int64). A
    teacher top-k cache for :func:`fused_topk_kd_loss` stores one row per position, in this
    order.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (B, T), got {tuple(labels.shape)}")
    _, seq = labels.shape
    shifted = labels[:, 1:]
    b, t = (shifted != ignore_index).nonzero(as_tuple=True)
    return b * seq + t, shifted[b, t].long()


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Cfg:
    temperature: float
    max_logit_abs: float
    vocab: int  # V
    teacher_vocab: int  # columns of a full teacher used: min(V, Vt) (0 without one)
    chunk: int
    compute_dtype: torch.dtype
    sanitize: bool


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


class _Work:
    """Scratch ``(rows, cols)`` buffers of one call, reused by every chunk (on CPU a fresh
    ``(chunk, V)`` tensor per chunk costs its page faults every time)."""

    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device):
        self.rows, self.dtype, self.device = max(1, rows), dtype, device
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, n: int, cols: int) -> torch.Tensor:
        buf = self.bufs.get(name)
        if buf is None or buf.shape[1] != cols:
            buf = torch.empty(self.rows, cols, dtype=self.dtype, device=self.device)
            self.bufs[name] = buf
        return buf[:n]


class _Head:
    """``x @ W[:v].T`` for chunks of rows and its backward, with the weight prepared once.

    Modes: ``plain`` (fp32/fp64 weight), ``out_dtype`` (low-precision weight, fp32-output
    matmul available), ``upcast`` (low-precision weight upcast to ``cd`` once, here).
    """

    def __init__(self, w: torch.Tensor, v: int, cd: torch.dtype):
        self.w = w[:v]
        self.dtype = w.dtype
        self.cd = cd
        if not _is_low_precision(w.dtype):
            self.mode = "plain"
        elif _has_out_dtype_mm(w.device):
            self.mode = "out_dtype"
        else:
            self.mode = "upcast"
            self.w32 = self.w.to(cd)  # the only upcast of this weight in the call

    def logits(self, x: torch.Tensor, ws: _Work, name: str) -> torch.Tensor:
        """``(n, v)`` logits of dtype ``cd`` (fp32 accumulation or better), written into the
        workspace buffer ``name`` on the plain/upcast paths (CUDA's caching allocator makes a
        fresh tensor cheap on the ``out_dtype`` path)."""
        if self.mode == "out_dtype":
            z = torch.mm(x.to(self.dtype), self.w.t(), out_dtype=torch.float32)
            return z if z.dtype == self.cd else z.to(self.cd)
        w = self.w32 if self.mode == "upcast" else self.w
        xw = x.to(w.dtype)
        out = ws.get(name, x.shape[0], w.shape[0])
        if w.dtype == out.dtype:
            return torch.mm(xw, w.t(), out=out)
        return out.copy_(xw @ w.t())

    def backward(self, g: torch.Tensor, x: torch.Tensor, grad_w: torch.Tensor | None,
                 need_x: bool) -> torch.Tensor | None:
        """For ``z = x @ W.T`` with ``dL/dz = g (n, v)``: ``grad_w (v, H) += g.T @ x`` and
        return ``g @ W`` ``(n, H)`` in ``g``'s dtype when ``need_x``."""
        cd = g.dtype
        if self.mode == "upcast":
            gx = (g @ self.w32) if need_x else None
            if grad_w is not None:
                xf = x.to(cd)
                step = max(256, _WEIGHT_BLOCK_ELEMENTS // max(1, x.shape[1]))
                for v0 in range(0, self.w.shape[0], step):  # bounded fp32 temporaries
                    grad_w[v0:v0 + step].add_(g[:, v0:v0 + step].t() @ xf)
            return gx
        gl = g.to(self.dtype)
        gx = None
        if need_x:
            gx = (torch.mm(gl, self.w, out_dtype=torch.float32) if self.mode == "out_dtype"
                  else gl @ self.w).to(cd)
        if grad_w is not None:
            grad_w.addmm_(gl.t(), x.to(self.dtype))
        return gx


def _prep(z: torch.Tensor, m: float, sanitize: bool
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clamp ``z`` (a buffer, modified in place) to ``[-m, m]`` without any host sync.

    Returns ``(z, row_max, bad_rows)``; ``bad_rows (n,)`` marks rows with a NaN/±inf. With
    ``sanitize`` NaN → ``-m`` (±inf → ±m by the clamp); otherwise NaN entries stay NaN (the row
    is bad: its loss is NaN, its gradient zeroed) and ``row_max`` is a valid softmax shift for
    every good row. Entries at ``±m`` after this (clamped, or sanitised) get a zero gradient
    (``hardtanh_backward``, see :func:`_chunk`).
    """
    lo, hi = torch.aminmax(z, dim=-1)
    bad = torch.isfinite(lo).logical_and_(torch.isfinite(hi)).logical_not_()
    z.clamp_(-m, m)  # ±inf → ±m; NaN stays NaN
    if sanitize:
        z.nan_to_num_(nan=-m)
        row_max = z.amax(dim=-1)
    else:
        row_max = hi.clamp(-m, m)
    return z, row_max, bad


def _exp_shifted(z: torch.Tensor, shift: torch.Tensor, inv_t: float, out: torch.Tensor
                 ) -> torch.Tensor:
    """``out = exp((z - shift) / T)`` (two passes, into ``out``)."""
    if inv_t == 1.0:
        torch.sub(z, shift[:, None], out=out)
    else:
        torch.add((shift * -inv_t)[:, None], z, alpha=inv_t, out=out)
    return out.exp_()


def _chunk(zs: torch.Tensor, teacher: tuple | None, y: torch.Tensor, wce: torch.Tensor,
           wkd: torch.Tensor | None, cfg: _Cfg, need_grad: bool, ws: _Work
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None,
                      torch.Tensor | None]:
    """Per-row losses and gradient for one chunk.

    Args:
        zs: student logits ``(n, V)`` (a buffer; clamped in place, kept until the end).
        teacher: ``None``, ``("full", zt)`` with ``zt (n, Vt')``, ``Vt' <= V`` (a buffer), or
            ``("topk", ids (n, k) int64, values (n, k), logZ (n,))``.
        y: targets ``(n,)`` in ``[0, V)``.
        wce, wkd: per-row weights ``(n,)`` (dtype of ``zs``) of CE_i and KD_i in the loss.
        ws: the call's workspace (buffers ``"p"``, ``"pt"``, ``"q"``).

    Returns:
        ``(CE (n,), KD (n,) or None, bad_student (n,), bad_teacher (n,) or None, g)``, where
        ``g (n, V) = wce·dCE/dzs + wkd·dKD/dzs`` (a workspace buffer; ``None`` unless
        ``need_grad``).
    """
    m, t = cfg.max_logit_abs, cfg.temperature
    inv_t = 1.0 / t
    n, v = zs.shape
    zs, ms, bad_s = _prep(zs, m, cfg.sanitize)
    p = _exp_shifted(zs, ms, 1.0, ws.get("p", n, v))
    s = p.sum(-1)
    ce = ms + s.log() - zs.gather(1, y[:, None]).squeeze(1)
    kd = bad_t = g = None
    if teacher is None:
        if need_grad:
            g = p.mul_((wce / s)[:, None])
    elif teacher[0] == "full":
        zt = teacher[1]
        vt = zt.shape[1]
        zt, mt, bad_t = _prep(zt, m, cfg.sanitize)
        pt = _exp_shifted(zt, mt, inv_t, ws.get("pt", n, vt))
        st = pt.sum(-1)
        # KD_i = T²·[ <p_t, zt - zs>/T - (mt - ms)/T + log(sq / st) ]  (zt is free after this)
        dot = zt.sub_(zs[:, :vt]).mul_(pt).sum(-1) / st
        if t == 1.0:
            q, sq = p, s
        else:  # q into the teacher's buffer (free now) when it is wide enough
            q_out = zt if vt == v and zt.is_contiguous() else ws.get("q", n, v)
            q = _exp_shifted(zs, ms, inv_t, q_out)
            sq = q.sum(-1)
        kd = (t * t) * (inv_t * (dot - (mt - ms)) + (sq / st).log())
        if need_grad:
            if t == 1.0:
                g = p.mul_(((wce + wkd) / s)[:, None])
            else:
                g = p.mul_((wce / s)[:, None])
                g.addcmul_(q, (wkd * t / sq)[:, None])
            g[:, :vt].addcmul_(pt, (-wkd * t / st)[:, None])
    else:
        kd, bad_t, g = _topk_chunk(zs, ms, p, s, teacher, wce, wkd, cfg, need_grad, ws)
    if g is not None:
        rows = torch.arange(n, device=g.device)
        g[rows, y] -= wce
        # zero where the clamp is active (|zs| reached M; sanitised NaN/±inf entries too)
        torch.ops.aten.hardtanh_backward.grad_input(g, zs, -m, m, grad_input=g)
        if not cfg.sanitize:  # report mode: bad rows get no gradient (they are NaN otherwise)
            bad = bad_s if bad_t is None else bad_s | bad_t
            g.masked_fill_(bad[:, None], 0.0)
    return ce, kd, bad_s, bad_t, g


def _topk_chunk(zs: torch.Tensor, ms: torch.Tensor, p: torch.Tensor, s: torch.Tensor,
                teacher: tuple, wce: torch.Tensor, wkd: torch.Tensor, cfg: _Cfg,
                need_grad: bool, ws: _Work
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Bucket KL of one chunk (see :func:`fused_topk_kd_loss`); ``p = exp(zs - ms)``, ``s`` its
    row sums. Per-row teacher quantities are computed in fp64."""
    _, ids, vals, logz = teacher
    t = cfg.temperature
    inv_t = 1.0 / t
    td = torch.float64
    lv, lz = vals.to(td), logz.to(td)
    bad_t = torch.isfinite(lv).all(-1).logical_and_(torch.isfinite(lz)).logical_not_()
    log_pk = lv * inv_t - lz[:, None]  # log p_t,i for i in K
    lse = torch.logsumexp(log_pk, dim=-1)  # log Σ_K p_t,i
    if ids.shape[1] == cfg.vocab:  # K is the whole vocabulary: no tail bucket, Σ_K p = 1
        log_pk = log_pk - lse[:, None]
        lse = torch.zeros_like(lse)
    else:  # renormalise if rounding made Σ_K p > 1
        log_pk = log_pk - lse.clamp_min(0.0)[:, None]
    pk = log_pk.exp()
    p_tail = -torch.expm1(lse.clamp_max(0.0))  # 1 - Σ_K p_t,i ≥ 0, no cancellation
    if cfg.sanitize:  # rows with a non-finite cache entry: no KD term, no KD gradient
        pk = torch.where(bad_t[:, None], 0.0, pk)
        log_pk = torch.where(bad_t[:, None], 0.0, log_pk)
        p_tail = torch.where(bad_t, 0.0, p_tail)
        wkd = torch.where(bad_t, 0.0, wkd)
    zk = zs.gather(1, ids).to(td)
    if t == 1.0:
        q, sq = p, s
    else:
        q = _exp_shifted(zs, ms, inv_t, ws.get("q", *zs.shape))
        sq = q.sum(-1)
    qk = q.gather(1, ids)
    q.scatter_(1, ids, 0.0)
    s_tail = q.sum(-1)  # student tail mass × sq, summed directly (no 1 - Σ_K cancellation)
    if need_grad:
        q.scatter_(1, ids, qk)
    log_sq = sq.to(td).log()
    log_qk = (zk - ms.to(td)[:, None]) * inv_t - log_sq[:, None]
    log_q_tail = s_tail.to(td).log() - log_sq
    kl = (pk * (log_pk - log_qk)).sum(-1)
    kl = kl + torch.where(p_tail > 0, p_tail * (p_tail.log() - log_q_tail), 0.0)
    kd = (t * t) * kl
    if cfg.sanitize:
        kd = torch.where(bad_t, 0.0, kd)
    g = None
    if need_grad:
        cd = zs.dtype
        wkd64 = wkd.to(td)
        st64 = s_tail.to(td)
        ratio = torch.where(st64 > 0, p_tail / torch.where(st64 > 0, st64, 1.0), 0.0)
        # tail columns: wkd·T·(q_j - q_j·p_tail/q_tail) = wkd·T·qexp_j·(1/sq - p_tail/S_tail)
        tail_f = (wkd64 * t) * (1.0 / sq.to(td) - ratio)
        qk64 = qk.to(td)
        wce_s = wce.to(td) / s.to(td)
        if t == 1.0:
            pk_s = qk64
            g = p.mul_((wce_s + tail_f).to(cd)[:, None])
        else:
            pk_s = p.gather(1, ids).to(td)
            g = p.mul_(wce_s.to(cd)[:, None])
            g.addcmul_(q, tail_f.to(cd)[:, None])
        # top-k columns: wce·p_j/s + wkd·T·(q_j - p_t,j)
        gk = pk_s * wce_s[:, None] + (wkd64 * t)[:, None] * (qk64 / sq.to(td)[:, None] - pk)
        g.scatter_(1, ids, gk.to(cd))
    return kd, bad_t, g


def _divisor_value(d: Any, n_local: int) -> float:
    if d is None:
        return float(n_local)
    v = float(d.item() if torch.is_tensor(d) else d)
    if n_local > 0 and not v > 0:
        raise ValueError(f"num_items_in_batch={v} must be positive when there are "
                         f"{n_local} supervised tokens")
    return v


def _make_cfg(*, temperature: float, alpha: float, max_logit_abs: float, vs: int,
              vt: int | None, has_teacher: bool, vocab_size: int | None,
              chunk_size: int | None, cd: torch.dtype, device: torch.device,
              nonfinite: str) -> _Cfg:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature} must be a positive finite number")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    if not (max_logit_abs > 0 and math.isfinite(max_logit_abs)):
        raise ValueError(f"max_logit_abs={max_logit_abs} must be a positive finite number")
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite={nonfinite!r} must be one of {NONFINITE_MODES}")
    if not has_teacher and alpha > 0:
        raise ValueError("alpha > 0 needs a teacher")
    v = (min(vs, vt) if vt is not None else vs) if vocab_size is None else int(vocab_size)
    if not 1 <= v <= vs:
        raise ValueError(f"vocab_size={v} must lie in [1, {vs}] (the student's vocabulary)")
    chunk = default_chunk_size(v, device) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    return _Cfg(temperature=float(temperature), max_logit_abs=float(max_logit_abs), vocab=v,
                teacher_vocab=0 if vt is None else min(v, vt), chunk=chunk, compute_dtype=cd,
                sanitize=nonfinite == "sanitize")


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return (torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors)
            else torch.float32)


def _check_targets(y: torch.Tensor, v: int) -> None:
    """Once per call (one host sync)."""
    if y.numel() and bool(((y < 0) | (y >= v)).any()):
        bad = y[(y < 0) | (y >= v)][:5].tolist()
        raise ValueError(f"supervised labels must lie in [0, vocab_size={v}); got e.g. {bad}")


@dataclass
class _Weights:
    """Per supervised row (device, fp64): ``coef`` c_i, ``w_ce`` c_i·(1 - α_i), ``w_kd`` c_i·α_i;
    ``group`` (int64, ``None`` for one group); host: divisors and local counts per group and
    ``n_teacher``, the supervised rows (a prefix) that have a teacher."""

    coef: torch.Tensor
    w_ce: torch.Tensor
    w_kd: torch.Tensor
    group: torch.Tensor | None
    divisors: list[float]
    counts: list[int]
    n_teacher: int


def _plain_weights(n: int, alpha: float, divisor: Any, device: torch.device,
                   has_teacher: bool) -> _Weights:
    d = _divisor_value(divisor, n)
    d = d if d > 0 else 1.0
    f64 = torch.float64
    coef = torch.full((n,), 1.0 / d, dtype=f64, device=device)
    a = alpha if has_teacher else 0.0
    return _Weights(coef=coef, w_ce=coef * (1.0 - a), w_kd=coef * a, group=None, divisors=[d],
                    counts=[n], n_teacher=n if has_teacher else 0)


def _grouped_weights(rows: torch.Tensor, seq: int, bsz: int, alpha: float,
                     row_weights: Any, row_groups: Any, num_items: Any,
                     teacher_rows: int | None, device: torch.device) -> _Weights:
    """Weights for :func:`fused_kd_loss` with row weights / groups / a partial teacher."""
    f64 = torch.float64
    n = int(rows.numel())
    b_of = torch.div(rows, seq, rounding_mode="floor")
    if row_weights is None:
        w_rows = torch.ones(bsz, dtype=f64, device=device)
    else:
        w_rows = torch.as_tensor(row_weights, dtype=f64).to(device).reshape(-1)
        if w_rows.numel() != bsz:
            raise ValueError(f"row_weights has {w_rows.numel()} entries for {bsz} batch rows")
    scalar_items = not isinstance(num_items, (list, tuple)) and \
        not (torch.is_tensor(num_items) and num_items.dim() > 0)
    if row_groups is None:
        g_rows = None
        n_groups = 1 if scalar_items else len(num_items)
        if n_groups != 1:
            raise ValueError("several num_items_in_batch values need row_groups")
    else:
        g_rows = torch.as_tensor(row_groups).to(device=device, dtype=torch.long).reshape(-1)
        if g_rows.numel() != bsz:
            raise ValueError(f"row_groups has {g_rows.numel()} entries for {bsz} batch rows")
        if scalar_items:
            n_groups = int(g_rows.max()) + 1 if bsz else 1
        else:
            n_groups = len(num_items)
    grp = None if g_rows is None else g_rows[b_of]
    n_t_rows = bsz if teacher_rows is None else int(teacher_rows)
    # one host read: per-group local counts, supervised rows with a teacher, group range
    parts = [torch.bincount(grp.clamp(0, n_groups - 1), minlength=n_groups) if grp is not None
             else torch.tensor([n], device=device),
             (b_of < n_t_rows).sum()[None]]
    if g_rows is not None:
        parts.append(((g_rows < 0) | (g_rows >= n_groups)).sum()[None])
    host = torch.cat(parts).tolist()
    counts, n_teacher = [int(c) for c in host[:n_groups]], int(host[n_groups])
    if g_rows is not None and host[-1]:
        raise ValueError(f"row_groups must lie in [0, {n_groups})")
    if scalar_items:
        items = [num_items] if n_groups == 1 else [None] * n_groups
        if num_items is not None and n_groups != 1:
            raise ValueError(f"{n_groups} row groups need {n_groups} num_items_in_batch values")
    else:
        items = list(num_items.tolist() if torch.is_tensor(num_items) else num_items)
    divisors = []
    for d, c in zip(items, counts):
        v = _divisor_value(d, c)
        divisors.append(v if v > 0 else 1.0)
    dvec = torch.tensor(divisors, dtype=f64, device=device)
    coef = w_rows[b_of] / (dvec[grp] if grp is not None else dvec[0])
    has_t = torch.arange(n, device=device) < n_teacher
    a = has_t.to(f64) * float(alpha)
    return _Weights(coef=coef, w_ce=coef * (1.0 - a), w_kd=coef * a, group=grp,
                    divisors=divisors, counts=counts, n_teacher=n_teacher)


def _spans(n: int, n_teacher: int, chunk: int) -> list[tuple[int, int, bool]]:
    out = [(c0, min(c0 + chunk, n_teacher), True) for c0 in range(0, n_teacher, chunk)]
    out += [(c0, min(c0 + chunk, n), False) for c0 in range(n_teacher, n, chunk)]
    return out


def _run_chunks(*, n: int, cfg: _Cfg, wts: _Weights, targets: torch.Tensor,
                student: Callable[[slice, _Work], tuple[torch.Tensor, Any]],
                teacher: Callable[[slice, _Work], tuple] | None, need_grad: bool,
                sink: Callable[[slice, torch.Tensor, Any], None], device: torch.device
                ) -> tuple[torch.Tensor, ...]:
    """The chunk loop shared by every loss: no host sync inside. Returns device tensors
    ``(loss, ce, kd, group_ce_sum, group_kd_sum, n_bad_student, n_bad_teacher)``."""
    f64 = torch.float64
    cd = cfg.compute_dtype
    n_groups = len(wts.divisors)
    loss = torch.zeros((), dtype=f64, device=device)
    ce_w, kd_w = torch.zeros_like(loss), torch.zeros_like(loss)
    g_ce = torch.zeros(n_groups, dtype=f64, device=device)
    g_kd = torch.zeros_like(g_ce)
    bad_s = torch.zeros((), dtype=torch.int64, device=device)
    bad_t = torch.zeros_like(bad_s)
    ws = _Work(min(cfg.chunk, n), cd, device)
    for c0, c1, has_t in _spans(n, wts.n_teacher if teacher is not None else 0, cfg.chunk):
        sl = slice(c0, c1)
        zs, ctx = student(sl, ws)
        tz = teacher(sl, ws) if has_t else None
        wce = wts.w_ce[sl]
        wkd = wts.w_kd[sl] if has_t else None
        ce, kd, bs, bt, g = _chunk(zs, tz, targets[sl], wce.to(cd),
                                   None if wkd is None else wkd.to(cd), cfg, need_grad, ws)
        del zs, tz
        ce = ce.to(f64)
        coef = wts.coef[sl]
        loss += torch.dot(wce, ce)
        ce_w += torch.dot(coef, ce)
        if wts.group is None:
            g_ce += ce.sum()
        else:
            g_ce.index_add_(0, wts.group[sl], ce)
        bad_s += bs.sum()
        if kd is not None:
            kd = kd.to(f64)
            loss += torch.dot(wkd, kd)
            kd_w += torch.dot(coef, kd)
            if wts.group is None:
                g_kd += kd.sum()
            else:
                g_kd.index_add_(0, wts.group[sl], kd)
            bad_t += bt.sum()
        if g is not None:
            sink(sl, g, ctx)
        del g, ctx
    return loss, ce_w, kd_w, g_ce, g_kd, bad_s, bad_t


def _finish(res: tuple[torch.Tensor, ...], wts: _Weights, cfg: _Cfg, stats: dict[str, Any]
            ) -> tuple[torch.Tensor, ...]:
    """Cast, NaN-out in report mode (device-side), and read the counts once."""
    loss, ce, kd, g_ce, g_kd, bad_s, bad_t = res
    cd = cfg.compute_dtype
    dvec = torch.tensor(wts.divisors, dtype=torch.float64, device=loss.device)
    out = [loss, ce, kd, g_ce / dvec, g_kd / dvec]
    if not cfg.sanitize:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=loss.device)
        any_bad = (bad_s + bad_t) > 0
        out = [torch.where(any_bad, nan, x) for x in out]
    counts = torch.stack([bad_s, bad_t]).tolist()  # the one read of the counts
    stats["num_nonfinite_student"], stats["num_nonfinite_teacher"] = (int(c) for c in counts)
    return tuple(x.to(cd) for x in out)


def _output(res: tuple[torch.Tensor, ...], n: int, stats: dict[str, Any], wts: _Weights
            ) -> KDLossOutput:
    loss, ce, kd, gce, gkd = res
    ns, nt = stats["num_nonfinite_student"], stats["num_nonfinite_teacher"]
    return KDLossOutput(loss=loss, ce=ce, kd=kd, num_tokens=n, num_nonfinite=ns + nt,
                        num_nonfinite_student=ns, num_nonfinite_teacher=nt, group_ce=gce,
                        group_kd=gkd, group_tokens=tuple(wts.counts))


def _scaled(grad: torch.Tensor | None, grad_output: torch.Tensor) -> torch.Tensor | None:
    """``grad·grad_output`` in place (no host sync; ``grad`` is owned)."""
    if grad is None:
        return None
    return grad.mul_(grad_output.to(grad.dtype))


# ---------------------------------------------------------------------------------------------
# kd_loss: full logits
# ---------------------------------------------------------------------------------------------
