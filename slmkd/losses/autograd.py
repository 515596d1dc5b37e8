"""The autograd functions of the logit-level and the fused losses (forward computes the
gradients chunk by chunk; backward only scales them)."""

from __future__ import annotations

from typing import Any

import torch

from slmkd.losses.engine import (
    _Cfg,
    _finish,
    _Head,
    _run_chunks,
    _scaled,
    _Weights,
    _Work,
)


class _KDLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                rows: torch.Tensor, targets: torch.Tensor, cfg: _Cfg, wts: _Weights,
                need_grad: bool, stats: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        vs = student_logits.shape[-1]
        s_flat = student_logits.reshape(-1, vs)[:, :cfg.vocab]
        t_flat = None
        if teacher_logits is not None:
            t_flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])[:, :cfg.teacher_vocab]
        grad = g_flat = None
        if need_grad:
            grad = torch.zeros(student_logits.shape, dtype=student_logits.dtype,
                               device=student_logits.device)
            g_flat = grad.view(-1, vs)[:, :cfg.vocab]

        def gather(src: torch.Tensor, r: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            if src.dtype == out.dtype:
                return torch.index_select(src, 0, r, out=out)
            return out.copy_(src.index_select(0, r))

        def student(sl: slice, ws: _Work) -> tuple[torch.Tensor, Any]:
            r = rows[sl]
            return gather(s_flat, r, ws.get("zs", r.numel(), cfg.vocab)), r

        def teacher(sl: slice, ws: _Work) -> tuple:
            r = rows[sl]
            return ("full", gather(t_flat, r, ws.get("zt", r.numel(), cfg.teacher_vocab)))

        def sink(sl: slice, g: torch.Tensor, r: torch.Tensor) -> None:
            g_flat.index_copy_(0, r, g.to(grad.dtype))

        with torch.no_grad():
            res = _run_chunks(n=int(rows.numel()), cfg=cfg, wts=wts, targets=targets,
                              student=student, teacher=None if t_flat is None else teacher,
                              need_grad=need_grad, sink=sink, device=student_logits.device)
        out = _finish(res, wts, cfg, stats)
        ctx.grad = grad
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        if ctx.grad is None and ctx.needs_input_grad[0]:
            raise RuntimeError("kd_loss: gradient already consumed (backward twice?)")
        g = _scaled(ctx.grad, grad_loss)
        ctx.grad = None
        return g, None, None, None, None, None, None, None


class _FusedKDLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hs: torch.Tensor, ws: torch.Tensor, teacher_spec: tuple | None,
                rows: torch.Tensor, targets: torch.Tensor, cfg: _Cfg, wts: _Weights,
                need_h: bool, need_w: bool, stats: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        cd = cfg.compute_dtype
        h_flat = hs.reshape(-1, hs.shape[-1])
        head = _Head(ws, cfg.vocab, cd)
        grad_h = torch.zeros(h_flat.shape, dtype=hs.dtype, device=hs.device) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=ws.dtype, device=ws.device) if need_w else None
        gw_v = None if grad_w is None else grad_w[:cfg.vocab]

        def student(sl: slice, ws: _Work) -> tuple[torch.Tensor, Any]:
            r = rows[sl]
            x = h_flat.index_select(0, r)
            return head.logits(x, ws, "zs"), (r, x)

        teacher = None
        if teacher_spec is not None and teacher_spec[0] == "hidden":
            _, ht, wt = teacher_spec
            ht_flat = ht.reshape(-1, ht.shape[-1])
            head_t = _Head(wt, cfg.teacher_vocab, cd)

            def teacher(sl: slice, ws: _Work) -> tuple:
                r = rows[sl]
                return ("full", head_t.logits(ht_flat.index_select(0, r), ws, "zt"))
        elif teacher_spec is not None:  # ("topk", ids int64, values, logZ) per supervised row
            _, ids, vals, logz = teacher_spec

            def teacher(sl: slice, ws: _Work) -> tuple:
                return ("topk", ids[sl], vals[sl], logz[sl])

        def sink(sl: slice, g: torch.Tensor, rx: Any) -> None:
            r, x = rx
            if gw_v is not None:  # a row with a non-finite hidden state has g = 0 there: keep
                x.nan_to_num_(0.0, 0.0, 0.0)  # 0·NaN out of grad_W (x is our own copy)
            gx = head.backward(g, x, gw_v, need_h)
            if gx is not None:
                grad_h.index_copy_(0, r, gx.to(grad_h.dtype))

        with torch.no_grad():
            res = _run_chunks(n=int(rows.numel()), cfg=cfg, wts=wts, targets=targets,
                              student=student, teacher=teacher, need_grad=need_h or need_w,
                              sink=sink, device=hs.device)
        out = _finish(res, wts, cfg, stats)
        ctx.grads = (None if grad_h is None else grad_h.view(hs.shape), grad_w)
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        if ctx.grads is None:
            raise RuntimeError("fused_kd_loss: gradient already consumed (backward twice?)")
        gh, gw = ctx.grads
        ctx.grads = None
        return (_scaled(gh, grad_loss), _scaled(gw, grad_loss),
                None, None, None, None, None, None, None, None)


def _check_student(student_hidden: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> None:
    if student_hidden.dim() != 3:
        raise ValueError(f"student_hidden must be (B, T, Hs), got {tuple(student_hidden.shape)}")
    if w.dim() != 2 or w.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student_lm_head_weight {tuple(w.shape)} must be "
                         f"(Vs, {student_hidden.shape[-1]})")
    if labels.shape != student_hidden.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must be (B, T) = "
                         f"{tuple(student_hidden.shape[:2])}")
