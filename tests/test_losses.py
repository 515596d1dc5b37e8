"""kd_loss / fused_kd_loss against a naive float64 reference written from the formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slmkd import losses as losses_mod
from slmkd.losses import (
    KDLossOutput,
    default_chunk_size,
    fused_cascod_loss,
    fused_kd_loss,
    fused_topk_kd_loss,
    kd_loss,
    teacher_topk_from_logits,
)
from slmkd.losses import engine as losses_engine

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

IGNORE = -100


# ---------------------------------------------------------------------------------------------
# naive float64 reference, straight from the formula
# ---------------------------------------------------------------------------------------------
def reference(s: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor, *, temperature=1.0,
              alpha=0.5, max_logit_abs=50.0, vocab_size=None, num_items_in_batch=None):
    """Return (loss, ce, kd, n) in float64; autograd flows to ``s``."""
    vs = s.shape[-1]
    v = (min(vs, t.shape[-1]) if t is not None else vs) if vocab_size is None else vocab_size
    y = labels[:, 1:]
    mask = y != IGNORE
    n = int(mask.sum())
    d = n if num_items_in_batch is None else num_items_in_batch
    zs = s[:, :-1][mask][:, :v].double().clamp(-max_logit_abs, max_logit_abs)
    ce_sum = F.cross_entropy(zs, y[mask], reduction="sum")
    if t is not None:
        vt = min(v, t.shape[-1])
        zt = t[:, :-1][mask][:, :vt].double().clamp(-max_logit_abs, max_logit_abs)
        if vt < v:  # teacher lacks columns: probability zero
            zt = torch.cat([zt, zt.new_full((zt.shape[0], v - vt), -math.inf)], dim=-1)
        logp = torch.log_softmax(zt / temperature, dim=-1)
        logq = torch.log_softmax(zs / temperature, dim=-1)
        p = logp.exp()
        kl = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum()
        kd_sum = temperature**2 * kl
    else:
        kd_sum = zs.sum() * 0
    if n == 0:
        z = s.sum() * 0.0
        return z, z.detach(), z.detach(), 0
    loss = (1 - alpha) * ce_sum / d + alpha * kd_sum / d
    return loss, (ce_sum / d).detach(), (kd_sum / d).detach(), n


def make_labels(b, t, v, p_ignore=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, v, (b, t), generator=g)
    lab[torch.rand(b, t, generator=g) < p_ignore] = IGNORE
    return lab


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def logits_case(vs, vt, dtype=torch.float32, scale=3.0, seed=0, b=2, t=9):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, t, vs, generator=g, dtype=torch.float64) * scale).to(dtype)
    tt = (torch.randn(b, t, vt, generator=g, dtype=torch.float64) * scale).to(dtype)
    return s.requires_grad_(), tt


# ---------------------------------------------------------------------------------------------
# kd_loss
# ---------------------------------------------------------------------------------------------
_VOCABS = [(37, 37, None), (37, 45, None), (45, 37, None), (45, 37, 41), (41, 45, 30)]
_T_ALPHA = [(1.0, 0.5), (2.0, 1.0), (5.0, 0.0)]
_KD_CASES = ([(*v, *ta) for v in _VOCABS for ta in _T_ALPHA]
             + [(37, 45, None, t, a) for t in (1.0, 2.0, 5.0) for a in (0.0, 0.5, 1.0)
                if (t, a) not in _T_ALPHA])


@pytest.mark.parametrize("vs,vt,vocab_size,temperature,alpha", _KD_CASES)
def test_kd_loss_matches_reference_fp32(vs, vt, vocab_size, temperature, alpha):
    s, t = logits_case(vs, vt)
    v = vocab_size or min(vs, vt)
    labels = make_labels(2, 9, v, seed=vs + vt)
    out = kd_loss(s, t, labels, temperature=temperature, alpha=alpha, vocab_size=vocab_size,
                  chunk_size=4)
    assert isinstance(out, KDLossOutput)
    s64 = s.detach().double().requires_grad_()
    ref, ce, kd, n = reference(s64, t, labels, temperature=temperature, alpha=alpha,
                               vocab_size=vocab_size)
    assert out.num_tokens == n and out.num_nonfinite == 0
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce.double(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kd.double(), kd, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    ref.backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-7)


def test_kd_loss_fp64_exact_and_zero_when_equal():
    s, _ = logits_case(29, 29, dtype=torch.float64)
    labels = make_labels(2, 9, 29)
    out = kd_loss(s, s.detach().clone(), labels, temperature=2.0, alpha=1.0)
    assert out.loss.dtype == torch.float64
    assert abs(float(out.kd)) < 1e-12
    out.loss.backward()
    assert float(s.grad.abs().max()) < 1e-12


@pytest.mark.parametrize("vs,vt", [(37, 37), (45, 37)])
def test_kd_loss_bf16_against_fp64_of_same_values(vs, vt):
    s, t = logits_case(vs, vt, dtype=torch.bfloat16)
    labels = make_labels(2, 9, min(vs, vt))
    out = kd_loss(s, t, labels, temperature=2.0, alpha=0.5, chunk_size=5)
    assert out.loss.dtype == torch.float32
    s64 = s.detach().double().requires_grad_()
    ref, *_ = reference(s64, t, labels, temperature=2.0, alpha=0.5)
    out.loss.backward()
    ref.backward()
    assert s.grad.dtype == torch.bfloat16
    lo, lr = float(out.loss.detach()), float(ref.detach())
    assert abs(lo - lr) <= 1e-5 * abs(lr) + 1e-6
    assert rel_err(s.grad, s64.grad) <= 1e-2


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunk_size_does_not_change_result(chunk):
    s, t = logits_case(31, 31, seed=3, b=3, t=11)
    labels = make_labels(3, 11, 31, seed=4)
    base = kd_loss(s, t, labels, temperature=2.0, chunk_size=10_000)
    g0 = torch.autograd.grad(base.loss, s)[0]
    out = kd_loss(s, t, labels, temperature=2.0, chunk_size=chunk)
    g1 = torch.autograd.grad(out.loss, s)[0]
    torch.testing.assert_close(out.loss, base.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-8)


def test_all_masked_is_zero_and_differentiable():
    s, t = logits_case(17, 17)
    labels = torch.full((2, 9), IGNORE)
    labels[:, 0] = 3  # position 0 is never a target after the shift
    out = kd_loss(s, t, labels)
    assert out.num_tokens == 0 and float(out.loss.detach()) == 0.0
    assert out.loss.requires_grad
    out.loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    h = torch.randn(2, 9, 8, requires_grad=True)
    w = torch.randn(17, 8, requires_grad=True)
    out = fused_kd_loss(h, w, torch.randn(2, 9, 4), torch.randn(17, 4), labels,
                        num_items_in_batch=5)
    assert float(out.loss.detach()) == 0.0 and not torch.isnan(out.loss.detach())
    out.loss.backward()
    assert float(h.grad.abs().sum()) == 0.0 and float(w.grad.abs().sum()) == 0.0


def test_gradient_accumulation_equivalence():
    s, t = logits_case(23, 27, b=4, t=10, seed=7)
    labels = make_labels(4, 10, 23, seed=8)
    full = kd_loss(s, t, labels, temperature=2.0, alpha=0.5, chunk_size=6)
    g_full = torch.autograd.grad(full.loss, s)[0]
    total = int((labels[:, 1:] != IGNORE).sum())
    g = torch.zeros_like(s)
    loss = 0.0
    for sl in (slice(0, 1), slice(1, 4)):
        s_mb = s.detach()[sl].clone().requires_grad_()
        o = kd_loss(s_mb, t[sl], labels[sl], temperature=2.0, alpha=0.5,
                    num_items_in_batch=torch.tensor(total), chunk_size=5)
        o.loss.backward()
        g[sl] = s_mb.grad
        loss += float(o.loss.detach())
    torch.testing.assert_close(g, g_full, rtol=1e-5, atol=1e-8)
    assert math.isclose(loss, float(full.loss.detach()), rel_tol=1e-5)


def test_grad_output_scaling_and_no_teacher():
    s, t = logits_case(19, 19)
    labels = make_labels(2, 9, 19)
    g1 = torch.autograd.grad(kd_loss(s, t, labels).loss, s)[0]
    g3 = torch.autograd.grad(3.0 * kd_loss(s, t, labels).loss, s)[0]
    torch.testing.assert_close(g3, 3 * g1)
    out = kd_loss(s, None, labels, alpha=0.0)
    s64 = s.detach().double().requires_grad_()
    ref, *_ = reference(s64, None, labels, alpha=0.0)
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert float(out.kd) == 0.0
    with pytest.raises(ValueError):
        kd_loss(s, None, labels, alpha=0.5)


def test_invalid_arguments():
    s, t = logits_case(19, 19)
    labels = make_labels(2, 9, 19)
    for kw in ({"temperature": 0.0}, {"alpha": 1.5}, {"max_logit_abs": -1.0},
               {"vocab_size": 20}, {"chunk_size": 0}):
        with pytest.raises(ValueError):
            kd_loss(s, t, labels, **kw)
    with pytest.raises(ValueError):  # target beyond vocab_size
        kd_loss(s, t, labels.clamp_min(0).fill_(18), vocab_size=10)


def test_default_chunk_size():
    # CUDA (and device=None, what the planner plans for): at least 1,024 rows
    for dev in (None, "cuda", torch.device("cuda", 0)):
        assert default_chunk_size(151_936, dev) == 1024
        assert default_chunk_size(152_064, dev) == 1024
        assert default_chunk_size(1000, dev) == 16384
        assert default_chunk_size(10**9, dev) == 1024
    assert default_chunk_size(151_936) == 1024  # backward-compatible positional call
    # CPU: from the measurement (benchmarks/RESULTS.md)
    assert default_chunk_size(151_936, "cpu") == 1024
    assert default_chunk_size(1000, torch.device("cpu")) == losses_mod.CPU_MAX_CHUNK_ROWS
    assert default_chunk_size(1_000_000, "cpu") == (1 << 28) // 1_000_000
    assert default_chunk_size(10**9, "cpu") == 16


# ---------------------------------------------------------------------------------------------
# extremes
# ---------------------------------------------------------------------------------------------
def test_clamp_gradient_is_zero_where_clamped_and_counts_nonfinite():
    s, t = logits_case(13, 13, scale=1.0)
    labels = make_labels(2, 9, 13, p_ignore=0.0)
    with torch.no_grad():
        s[0, 0, 2] = 1e4
        s[0, 1, 3] = float("nan")
        s[1, 2, 4] = float("-inf")
        t[1, 3, 5] = float("inf")
    out = kd_loss(s, t, labels, temperature=2.0, nonfinite="sanitize")
    assert out.num_nonfinite == 3  # rows: student (0, 1), (1, 2); teacher (1, 3)
    assert out.num_nonfinite_student == 2 and out.num_nonfinite_teacher == 1
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad[0, 0, 2] == 0 and s.grad[0, 1, 3] == 0 and s.grad[1, 2, 4] == 0
    # reference on the sanitised values (NaN -> -M, ±inf -> ±M) agrees away from those entries
    s_ref = s.detach().double().nan_to_num(nan=-50.0, posinf=50.0, neginf=-50.0)
    t_ref = t.double().nan_to_num(nan=-50.0, posinf=50.0, neginf=-50.0)
    s_ref.requires_grad_()
    ref, *_ = reference(s_ref, t_ref, labels, temperature=2.0)
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    ref.backward()
    g = s_ref.grad.clone()
    g[0, 0, 2] = g[0, 1, 3] = g[1, 2, 4] = 0
    torch.testing.assert_close(s.grad.double(), g, rtol=1e-5, atol=1e-7)


_special = st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e4, -1e4, 1e30])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), extra_s=st.integers(0, 4), extra_t=st.integers(0, 4),
       special=_special, temperature=st.sampled_from([1.0, 2.0, 5.0]),
       alpha=st.sampled_from([0.0, 0.5, 1.0]), big=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_extremes_never_poison(seed, extra_s, extra_t, special, temperature, alpha, big, dtype):
    v = 11
    g = torch.Generator().manual_seed(seed)
    scale = 1e4 if big else 3.0
    s = (torch.randn(2, 6, v + extra_s, generator=g) * scale).clamp(-1e4, 1e4)
    t = (torch.randn(2, 6, v + extra_t, generator=g) * scale).clamp(-1e4, 1e4)
    labels = make_labels(2, 6, v, p_ignore=0.4, seed=seed)
    ignored = torch.zeros(2, 6, dtype=torch.bool)
    ignored[:, :-1] = labels[:, 1:] == IGNORE
    ignored[:, -1] = True  # the last position predicts nothing
    s[ignored] = special
    t[ignored] = special
    s[..., v:] = special
    t[..., v:] = special
    s = s.to(dtype).requires_grad_()
    t = t.to(dtype)
    out = kd_loss(s, t, labels, temperature=temperature, alpha=alpha, vocab_size=v, chunk_size=3)
    assert out.num_nonfinite == 0
    assert torch.isfinite(out.loss) and torch.isfinite(out.ce) and torch.isfinite(out.kd)
    out.loss.backward()
    assert torch.isfinite(s.grad).all()
    assert float(s.grad[ignored].abs().sum()) == 0.0
    assert float(s.grad[..., v:].abs().sum()) == 0.0
    # fused with poisoned hidden states at ignored positions and poisoned rows >= v
    h = torch.randn(2, 6, 5, generator=g)
    h[ignored] = special
    w = torch.randn(v + extra_s, 5, generator=g) * (scale / 3)
    w[v:] = special
    ht = torch.randn(2, 6, 3, generator=g)
    ht[ignored] = special
    wt = torch.randn(v + extra_t, 3, generator=g) * (scale / 3)
    wt[v:] = special
    h, w = h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    out = fused_kd_loss(h, w, ht.to(dtype), wt.to(dtype), labels, temperature=temperature,
                        alpha=alpha, vocab_size=v, chunk_size=4)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert float(h.grad[ignored].abs().sum()) == 0.0
    assert float(w.grad[v:].abs().sum()) == 0.0


# ---------------------------------------------------------------------------------------------
# fused_kd_loss
# ---------------------------------------------------------------------------------------------
def fused_case(vs, vt, hs=12, ht=20, dtype=torch.float32, b=2, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(b, t, hs, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    w = (torch.randn(vs, hs, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    hT = torch.randn(b, t, ht, generator=g, dtype=torch.float64).to(dtype)
    wT = (torch.randn(vt, ht, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    return h, w, hT, wT


def fused_reference(h, w, hT, wT, labels, **kw):
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    s = h64 @ w64.T
    t = None if hT is None else hT.double() @ wT.double().T
    loss, ce, kd, n = reference(s, t, labels, **kw)
    if loss.requires_grad:
        loss.backward()
    return loss.detach(), ce, kd, h64.grad, w64.grad


@pytest.mark.parametrize("vs,vt,vocab_size", [(37, 37, None), (37, 45, None), (45, 37, None),
                                              (41, 45, 30), (45, 37, 41)])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 1.0), (5.0, 0.0)])
def test_fused_matches_reference_fp32(vs, vt, vocab_size, temperature, alpha):
    h, w, hT, wT = fused_case(vs, vt)
    labels = make_labels(2, 9, vocab_size or min(vs, vt), seed=vs)
    out = fused_kd_loss(h, w, hT, wT, labels, temperature=temperature, alpha=alpha,
                        vocab_size=vocab_size, chunk_size=4)
    out.loss.backward()
    loss, ce, kd, gh, gw = fused_reference(h, w, hT, wT, labels, temperature=temperature,
                                           alpha=alpha, vocab_size=vocab_size)
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce.double(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kd.double(), kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad.double(), gw, rtol=1e-5, atol=1e-7)


def test_fused_equals_kd_loss_on_same_logits():
    h, w, hT, wT = fused_case(33, 40, dtype=torch.float64)
    labels = make_labels(2, 9, 33)
    a = fused_kd_loss(h, w, hT, wT, labels, temperature=2.0, chunk_size=5)
    s = (h @ w.T)
    b = kd_loss(s, hT @ wT.T, labels, temperature=2.0, chunk_size=3)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-12)
    gh_a, gw_a = torch.autograd.grad(a.loss, (h, w))
    gh_b, gw_b = torch.autograd.grad(b.loss, (h, w))
    torch.testing.assert_close(gh_a, gh_b)
    torch.testing.assert_close(gw_a, gw_b)


@pytest.mark.parametrize("vs,vt", [(37, 37), (37, 45)])
def test_fused_bf16_against_fp64_of_same_values(vs, vt):
    h, w, hT, wT = fused_case(vs, vt, dtype=torch.bfloat16, t=16)
    labels = make_labels(2, 16, min(vs, vt))
    out = fused_kd_loss(h, w, hT, wT, labels, temperature=2.0, alpha=0.5, chunk_size=7)
    out.loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    loss, _, _, gh, gw = fused_reference(h, w, hT, wT, labels, temperature=2.0, alpha=0.5)
    assert abs(float(out.loss.detach()) - float(loss)) <= 1e-2 * abs(float(loss))
    assert rel_err(h.grad, gh) <= 1e-2
    assert rel_err(w.grad, gw) <= 1e-2


def test_fused_gradient_accumulation_equivalence():
    h, w, hT, wT = fused_case(29, 31, b=4, t=8, seed=5)
    labels = make_labels(4, 8, 29, seed=6)
    full = fused_kd_loss(h, w, hT, wT, labels, temperature=2.0, chunk_size=5)
    gh_full, gw_full = torch.autograd.grad(full.loss, (h, w))
    total = int((labels[:, 1:] != IGNORE).sum())
    w2 = w.detach().clone().requires_grad_()
    gh = torch.zeros_like(h)
    for sl in (slice(0, 3), slice(3, 4)):
        h_mb = h.detach()[sl].clone().requires_grad_()
        o = fused_kd_loss(h_mb, w2, hT[sl], wT, labels[sl], temperature=2.0,
                          num_items_in_batch=total, chunk_size=3)
        o.loss.backward()
        gh[sl] = h_mb.grad
    torch.testing.assert_close(gh, gh_full, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(w2.grad, gw_full, rtol=1e-5, atol=1e-8)


def test_fused_without_teacher_is_ce():
    h, w, _, _ = fused_case(21, 21)
    labels = make_labels(2, 9, 21)
    out = fused_kd_loss(h, w, None, None, labels, alpha=0.0)
    out.loss.backward()
    loss, _, _, gh, gw = fused_reference(h, w, None, None, labels, alpha=0.0)
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad.double(), gw, rtol=1e-5, atol=1e-7)


def test_fused_only_weight_or_only_hidden_requires_grad():
    h, w, hT, wT = fused_case(21, 21)
    labels = make_labels(2, 9, 21)
    h2 = h.detach()
    out = fused_kd_loss(h2, w, hT, wT, labels)
    (gw,) = torch.autograd.grad(out.loss, (w,))
    _, _, _, _, gw_ref = fused_reference(h, w, hT, wT, labels)
    torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        out = fused_kd_loss(h, w, hT, wT, labels)
    assert not out.loss.requires_grad


# ---------------------------------------------------------------------------------------------
# non-finite logits: "report" (default) and "sanitize"
# ---------------------------------------------------------------------------------------------
def _poisoned_logits():
    s, t = logits_case(13, 13, scale=1.0)
    labels = make_labels(2, 9, 13, p_ignore=0.0)
    with torch.no_grad():
        s[0, 0, 2] = 1e4  # finite: clamped, not counted
        s[0, 1, 3] = float("nan")
        s[1, 2, 4] = float("-inf")
        t[1, 3, 5] = float("inf")
    return s, t, labels


def test_report_mode_nan_loss_counts_and_clean_gradient():
    s, t, labels = _poisoned_logits()
    out = kd_loss(s, t, labels, temperature=2.0)  # nonfinite="report" is the default
    assert torch.isnan(out.loss) and torch.isnan(out.ce) and torch.isnan(out.kd)
    assert (out.num_nonfinite_student, out.num_nonfinite_teacher, out.num_nonfinite) == (2, 1, 3)
    out.loss.backward()  # must not raise
    assert torch.isfinite(s.grad).all()
    bad = [(0, 1), (1, 2), (1, 3)]
    for b, i in bad:
        assert float(s.grad[b, i].abs().sum()) == 0.0
    # every other row: the same gradient as the sanitised loss (rows are independent)
    s2 = s.detach().clone().requires_grad_()
    kd_loss(s2, t, labels, temperature=2.0, nonfinite="sanitize").loss.backward()
    keep = torch.ones(2, 9, dtype=torch.bool)
    for b, i in bad:
        keep[b, i] = False
    torch.testing.assert_close(s.grad[keep], s2.grad[keep], rtol=0, atol=0)
    assert float(s.grad[0, 0, 2]) == 0.0  # clamp active at the finite 1e4


@pytest.mark.parametrize("nonfinite", ["report", "sanitize"])
def test_finite_extreme_logits_are_finite_and_correct(nonfinite):
    s, t = logits_case(13, 13, scale=1.0)
    labels = make_labels(2, 9, 13, p_ignore=0.0)
    with torch.no_grad():
        s[0, 0, 2], s[1, 1, 5], s[0, 4, 0] = 1e4, -1e4, 7e3
        t[1, 3, 5], t[0, 2, 1] = 1e4, -1e4
    out = kd_loss(s, t, labels, temperature=2.0, nonfinite=nonfinite, chunk_size=4)
    assert out.num_nonfinite == 0 and torch.isfinite(out.loss)
    s64 = s.detach().double().requires_grad_()
    ref, *_ = reference(s64, t, labels, temperature=2.0)  # reference clamps to ±50
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    ref.backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-7)
    assert float(s.grad[0, 0, 2]) == 0.0 and float(s.grad[1, 1, 5]) == 0.0


def test_teacher_nan_hidden_is_reported_not_trained_on():
    h, w, hT, wT = fused_case(37, 37)
    labels = make_labels(2, 9, 37, p_ignore=0.0)
    hT = hT.clone()
    hT[1, 3] = float("nan")  # a supervised position: every teacher logit of that row is NaN
    out = fused_kd_loss(h, w, hT, wT, labels, temperature=2.0, alpha=0.5, chunk_size=4)
    assert torch.isnan(out.loss)
    assert (out.num_nonfinite_teacher, out.num_nonfinite_student, out.num_nonfinite) == (1, 0, 1)
    out.loss.backward()  # gradients are irrelevant (the step is skipped) but must not raise
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert float(h.grad[1, 3].abs().sum()) == 0.0
    gh_report = h.grad.clone()
    # sanitize = the old behaviour: NaN -> -M in every column, i.e. a uniform teacher target
    h.grad = w.grad = None
    out = fused_kd_loss(h, w, hT, wT, labels, temperature=2.0, alpha=0.5, chunk_size=4,
                        nonfinite="sanitize")
    assert torch.isfinite(out.loss) and out.num_nonfinite_teacher == 1
    out.loss.backward()
    t_old = hT.double() @ wT.double().T
    t_old[1, 3] = -50.0
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref, *_ = reference(h64 @ w64.T, t_old, labels, temperature=2.0, alpha=0.5)
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-7)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 3] = False
    torch.testing.assert_close(gh_report[keep], h.grad[keep], rtol=1e-6, atol=1e-8)


def test_student_nan_hidden_is_reported():
    h, w, hT, wT = fused_case(37, 37)
    labels = make_labels(2, 9, 37, p_ignore=0.0)
    with torch.no_grad():
        h[0, 2] = float("nan")
    out = fused_kd_loss(h, w, hT, wT, labels, chunk_size=5)
    assert torch.isnan(out.loss)
    assert (out.num_nonfinite_student, out.num_nonfinite_teacher) == (1, 0)
    out.loss.backward()
    assert torch.isfinite(w.grad).all()
    with pytest.raises(ValueError):
        fused_kd_loss(h, w, hT, wT, labels, nonfinite="ignore")


# ---------------------------------------------------------------------------------------------
# no per-chunk host sync; weights upcast once
# ---------------------------------------------------------------------------------------------
_SYNC_METHODS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero",
                 "cpu", "numpy")


def _count_syncs(monkeypatch, fn) -> int:
    """Calls of the tensor methods that read device data on the host while ``fn`` runs."""
    calls = [0]
    for name in _SYNC_METHODS:
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, **k):
            calls[0] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    try:
        fn()
    finally:
        monkeypatch.undo()
    return calls[0]


def _sync_cases():
    h, w, hT, wT = fused_case(37, 45, b=4, t=12)
    labels = make_labels(4, 12, 37, p_ignore=0.2)
    s, t = logits_case(37, 45, b=4, t=12)
    n = int((labels[:, 1:] != IGNORE).sum())
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(37, generator=g)[:5] for _ in range(n)]).int()
    vals = torch.randn(n, 5, generator=g).half()
    logz = torch.logsumexp(vals.float(), -1) + 1.0
    return {
        "kd_loss": lambda c: kd_loss(s, t, labels, temperature=2.0, chunk_size=c),
        "fused_kd_loss": lambda c: fused_kd_loss(h, w, hT, wT, labels, temperature=2.0,
                                                 chunk_size=c),
        "fused_cascod_loss": lambda c: fused_cascod_loss(
            h, w, labels, 2, alpha_cascod=0.3, teacher_hidden=hT[:2], teacher_lm_head_weight=wT,
            temperature=2.0, alpha=0.5, num_rationale_tokens=torch.tensor(20), chunk_size=c),
        "fused_topk_kd_loss": lambda c: fused_topk_kd_loss(h, w, labels, ids, vals, logz,
                                                           temperature=2.0, chunk_size=c),
    }


@pytest.mark.parametrize("name", ["kd_loss", "fused_kd_loss", "fused_cascod_loss",
                                  "fused_topk_kd_loss"])
def test_no_host_sync_per_chunk(monkeypatch, name):
    fn = _sync_cases()[name]

    def call(chunk):
        def run():
            out = fn(chunk)
            out.loss.backward()
        return run

    one = _count_syncs(monkeypatch, call(10**6))  # one chunk
    many = _count_syncs(monkeypatch, call(2))  # ~20 chunks
    assert many == one, f"{name}: {one} host reads with 1 chunk, {many} with ~20 chunks"
    assert one <= 6


def test_weight_upcast_once_per_call(monkeypatch):
    monkeypatch.setattr(losses_engine, "_has_out_dtype_mm", lambda device: False)  # CPU path
    h, w, hT, wT = fused_case(37, 45, dtype=torch.bfloat16, t=16)
    labels = make_labels(2, 16, 37)
    owner = {w.untyped_storage().data_ptr(): "student", wT.untyped_storage().data_ptr(): "teacher"}
    counts = {"student": 0, "teacher": 0}
    orig = torch.Tensor.to

    def to(self, *a, **k):
        res = orig(self, *a, **k)
        key = owner.get(self.untyped_storage().data_ptr())
        if key is not None and res.dtype != self.dtype:
            counts[key] += 1
        return res

    monkeypatch.setattr(torch.Tensor, "to", to)
    out = fused_kd_loss(h, w, hT, wT, labels, temperature=2.0, chunk_size=3)  # 6 chunks
    out.loss.backward()
    monkeypatch.undo()
    assert counts == {"student": 1, "teacher": 1}
    loss, _, _, gh, gw = fused_reference(h, w, hT, wT, labels, temperature=2.0)
    assert abs(float(out.loss.detach()) - float(loss)) <= 1e-2 * abs(float(loss))
    assert rel_err(h.grad, gh) <= 1e-2 and rel_err(w.grad, gw) <= 1e-2


# ---------------------------------------------------------------------------------------------
# row weights, divisor groups, partial teacher; CasCoD in one call
# ---------------------------------------------------------------------------------------------
def weighted_reference(h, w, hT, wT, labels, *, temperature, alpha, row_weights, row_groups,
                       divisors, vocab_size=None, m=50.0):
    """fp64 naive: loss = Σ_i c_i [(1-α_i) CE_i + α_i KD_i], c_i = w_b / D_g (None = local)."""
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    bsz = labels.shape[0]
    v = vocab_size or (w.shape[0] if wT is None else min(w.shape[0], wT.shape[0]))
    y = labels[:, 1:]
    mask = y != IGNORE
    b_idx = torch.arange(bsz)[:, None].expand_as(y)[mask]
    zs = (h64 @ w64.T)[:, :-1][mask][:, :v].clamp(-m, m)
    ce = F.cross_entropy(zs, y[mask], reduction="none")
    kd = torch.zeros_like(ce)
    has_t = torch.zeros_like(ce, dtype=torch.bool)
    if hT is not None:
        bt = hT.shape[0]
        full_t = torch.zeros(bsz, *hT.shape[1:], dtype=torch.float64)
        full_t[:bt] = hT.double()
        vt = min(v, wT.shape[0])
        zt = (full_t @ wT.double().T)[:, :-1][mask][:, :vt].clamp(-m, m)
        if vt < v:
            zt = torch.cat([zt, zt.new_full((zt.shape[0], v - vt), -math.inf)], -1)
        lp = torch.log_softmax(zt / temperature, -1)
        lq = torch.log_softmax(zs / temperature, -1)
        p = lp.exp()
        kd = temperature**2 * torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)
        has_t = b_idx < bt
    g_idx = torch.as_tensor(row_groups)[b_idx]
    counts = torch.bincount(g_idx, minlength=len(divisors))
    d = torch.tensor([float(c) if x is None else float(x) for x, c in zip(divisors, counts)],
                     dtype=torch.float64).clamp_min(1.0)
    coef = torch.as_tensor(row_weights, dtype=torch.float64)[b_idx] / d[g_idx]
    a = has_t.double() * alpha
    kd = torch.where(has_t, kd, torch.zeros_like(kd))
    loss = (coef * ((1 - a) * ce + a * kd)).sum()
    loss.backward()
    gce = torch.zeros(len(divisors), dtype=torch.float64).index_add_(0, g_idx, ce.detach()) / d
    gkd = torch.zeros(len(divisors), dtype=torch.float64).index_add_(0, g_idx, kd.detach()) / d
    return {"loss": loss.detach(), "ce": (coef * ce).sum().detach(),
            "kd": (coef * kd).sum().detach(), "group_ce": gce, "group_kd": gkd,
            "group_tokens": tuple(int(c) for c in counts), "gh": h64.grad, "gw": w64.grad}


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.3), (3.0, 1.0)])
@pytest.mark.parametrize("bt", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_row_weights_groups_partial_teacher(temperature, alpha, bt, dtype):
    g = torch.Generator().manual_seed(bt)
    h, w, hT, wT = fused_case(37, 45, b=5, t=8, dtype=dtype, seed=bt)
    hT = hT[:bt]
    labels = make_labels(5, 8, 37, seed=bt)
    weights = (torch.rand(5, generator=g, dtype=torch.float64) + 0.2).tolist()
    groups = [0, 2, 1, 0, 2]
    divisors = [None, 17, None]
    out = fused_kd_loss(h, w, hT, wT, labels, temperature=temperature, alpha=alpha,
                        row_weights=weights, row_groups=torch.tensor(groups),
                        num_items_in_batch=divisors, chunk_size=3)
    out.loss.backward()
    ref = weighted_reference(h, w, hT, wT, labels, temperature=temperature, alpha=alpha,
                             row_weights=weights, row_groups=groups, divisors=divisors)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5,
                                                                         "atol": 1e-7}
    for key in ("loss", "ce", "kd", "group_ce", "group_kd"):
        torch.testing.assert_close(getattr(out, key).double(), ref[key], **tol)
    assert out.group_tokens == ref["group_tokens"]
    assert out.num_tokens == sum(ref["group_tokens"])
    torch.testing.assert_close(h.grad.double(), ref["gh"], **tol)
    torch.testing.assert_close(w.grad.double(), ref["gw"], **tol)


def test_fused_weighted_directional_finite_differences():
    """gradcheck-style: <grad, u> against a central difference of our own fp64 loss."""
    h, w, hT, wT = fused_case(11, 13, hs=5, ht=4, b=3, t=6, dtype=torch.float64, seed=3)
    labels = make_labels(3, 6, 11, seed=3)

    def f(hh, ww):
        return fused_kd_loss(hh, ww, hT[:2], wT, labels, temperature=2.0, alpha=0.4,
                             row_weights=[0.7, 0.7, 0.3], row_groups=[0, 0, 1],
                             num_items_in_batch=[None, 9], chunk_size=2).loss

    gh, gw = torch.autograd.grad(f(h, w), (h, w))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        uh = torch.randn(h.shape, generator=g, dtype=torch.float64)
        uw = torch.randn(w.shape, generator=g, dtype=torch.float64)
        eps = 1e-6
        with torch.no_grad():
            fd = (f(h + eps * uh, w + eps * uw) - f(h - eps * uh, w - eps * uw)) / (2 * eps)
        an = (gh * uh).sum() + (gw * uw).sum()
        assert abs(float(fd) - float(an)) <= 1e-6 * max(1.0, abs(float(an)))


def _old_two_call_cascod(h, w, labels, b, *, ac, hT=None, wT=None, temperature=1.0, kd_alpha=0.0,
                         nr=None, na=None, chunk_size=None):
    """What slmkd.training.cascod.cascod_joint_loss computed before fused_cascod_loss."""
    r = fused_kd_loss(h[:b], w, hT, wT, labels[:b], temperature=temperature,
                      alpha=kd_alpha if hT is not None else 0.0, num_items_in_batch=nr,
                      chunk_size=chunk_size)
    a = fused_kd_loss(h[b:], w, None, None, labels[b:], temperature=1.0, alpha=0.0,
                      num_items_in_batch=na, chunk_size=chunk_size)
    return (1 - ac) * r.loss + ac * a.loss, r, a


@pytest.mark.parametrize("with_teacher", [True, False])
@pytest.mark.parametrize("counts", [(None, None), (23, 31)])
def test_cascod_one_call_equals_two_calls(with_teacher, counts):
    b = 3
    h, w, hT, wT = fused_case(41, 45, b=2 * b, t=9, seed=11)
    labels = make_labels(2 * b, 9, 41, seed=12)
    hT = hT[:b] if with_teacher else None
    wT = wT if with_teacher else None
    kd_alpha = 0.5 if with_teacher else 0.0
    nr, na = counts
    out = fused_cascod_loss(h, w, labels, b, alpha_cascod=0.3, teacher_hidden=hT,
                            teacher_lm_head_weight=wT, temperature=2.0, alpha=kd_alpha,
                            num_rationale_tokens=nr, num_answer_tokens=na, chunk_size=4)
    gh1, gw1 = torch.autograd.grad(out.loss, (h, w))
    old, r, a = _old_two_call_cascod(h, w, labels, b, ac=0.3, hT=hT, wT=wT, temperature=2.0,
                                     kd_alpha=kd_alpha, nr=nr, na=na, chunk_size=4)
    gh2, gw2 = torch.autograd.grad(old, (h, w))
    torch.testing.assert_close(out.loss, old, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gh1, gh2, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gw1, gw2, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.group_ce, torch.stack([r.ce, a.ce]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.group_kd[0], r.kd, rtol=1e-6, atol=1e-7)
    assert float(out.group_kd[1]) == 0.0
    assert out.group_tokens == (r.num_tokens, a.num_tokens)
    rationale_loss = (1 - kd_alpha) * out.group_ce[0] + kd_alpha * out.group_kd[0]
    torch.testing.assert_close(rationale_loss, r.loss.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.ce, 0.7 * r.ce + 0.3 * a.ce, rtol=1e-6, atol=1e-7)


def test_cascod_fp64_reference_and_validation():
    b = 2
    h, w, hT, wT = fused_case(29, 33, b=2 * b, t=7, dtype=torch.float64, seed=4)
    labels = make_labels(2 * b, 7, 29, seed=5)
    out = fused_cascod_loss(h, w, labels, b, alpha_cascod=0.25, teacher_hidden=hT[:b],
                            teacher_lm_head_weight=wT, temperature=2.0, alpha=0.6,
                            num_answer_tokens=40, chunk_size=3)
    out.loss.backward()
    ref = weighted_reference(h, w, hT[:b], wT, labels, temperature=2.0, alpha=0.6,
                             row_weights=[0.75, 0.75, 0.25, 0.25], row_groups=[0, 0, 1, 1],
                             divisors=[None, 40])
    torch.testing.assert_close(out.loss, ref["loss"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h.grad, ref["gh"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, ref["gw"], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError):
        fused_cascod_loss(h, w, labels, 3, alpha_cascod=0.3)
    with pytest.raises(ValueError):
        fused_cascod_loss(h, w, labels, b, alpha_cascod=1.3)
    with pytest.raises(ValueError):  # the teacher covers the rationale rows only
        fused_cascod_loss(h, w, labels, b, alpha_cascod=0.3, teacher_hidden=hT,
                          teacher_lm_head_weight=wT, alpha=0.5)
    with pytest.raises(ValueError):
        fused_kd_loss(h, w, None, None, labels, alpha=0.0, row_groups=[0, 3, 1, 0],
                      num_items_in_batch=[3, 4, 5])
    with pytest.raises(ValueError):
        fused_kd_loss(h, w, None, None, labels, alpha=0.0, row_weights=[1.0, 2.0])


def test_topk_helper_exported():
    # the top-k loss and the cache helper live in slmkd.losses (tests: tests/test_topk_loss.py)
    assert callable(fused_topk_kd_loss) and callable(teacher_topk_from_logits)
