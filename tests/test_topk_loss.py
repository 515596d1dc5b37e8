"""fused_topk_kd_loss (KD from a cached teacher top-k) and teacher_topk_from_logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slmkd.losses import (
    fused_kd_loss,
    fused_topk_kd_loss,
    supervised_positions,
    teacher_topk_from_logits,
)

IGNORE = -100


def make_labels(b, t, v, p_ignore=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, v, (b, t), generator=g)
    lab[torch.rand(b, t, generator=g) < p_ignore] = IGNORE
    return lab


def case(vs=37, vt=45, hs=12, ht=20, b=2, t=9, dtype=torch.float32, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, hs, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(vs, hs, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    hT = torch.randn(b, t, ht, generator=g, dtype=torch.float64)
    wT = torch.randn(vt, ht, generator=g, dtype=torch.float64) * scale
    return h, w, hT, wT


def teacher_rows(hT, wT, labels):
    """Teacher logits ``(N, Vt)`` at the supervised positions, in the loss's row order."""
    rows, _ = supervised_positions(labels)
    return (hT.reshape(-1, hT.shape[-1]) @ wT.T)[rows]


def topk_reference(h, w, labels, ids, vals, logz, *, temperature, alpha, vocab_size=None,
                   m=50.0, num_items=None):
    """fp64 naive bucket-KL loss, autograd to ``h`` and ``w``; returns (loss, ce, kd, per-row
    bucket KL, grad_h, grad_w)."""
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    v = vocab_size or w.shape[0]
    rows, y = supervised_positions(labels)
    n = rows.numel()
    d = n if num_items is None else num_items
    zs = (h64.reshape(-1, h.shape[-1]) @ w64.T)[rows][:, :v].clamp(-m, m)
    ce = F.cross_entropy(zs, y, reduction="sum")
    T = temperature
    log_q = torch.log_softmax(zs / T, -1)
    ids = ids.long()
    log_p = vals.double() / T - logz.double()[:, None]
    lse = torch.logsumexp(log_p, -1)
    k = ids.shape[1]
    if k == v:
        log_p = log_p - lse[:, None]
        p_tail = torch.zeros(n, dtype=torch.float64)
    else:
        log_p = log_p - lse.clamp_min(0)[:, None]
        p_tail = (1 - lse.clamp_max(0).exp()).clamp_min(0)
    p = log_p.exp()
    log_qk = log_q.gather(1, ids)
    in_k = torch.zeros(n, v, dtype=torch.bool)
    in_k.scatter_(1, ids, True)
    log_q_tail = torch.logsumexp(log_q.masked_fill(in_k, -math.inf), -1)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-300).log() - log_q_tail),
                       torch.zeros_like(p_tail))
    kl_rows = (p * (log_p - log_qk)).sum(-1) + tail
    kd = T * T * kl_rows.sum()
    loss = ((1 - alpha) * ce + alpha * kd) / d
    loss.backward()
    return loss.detach(), (ce / d).detach(), (kd / d).detach(), kl_rows.detach(), h64.grad, w64.grad


def full_kl_rows(h, w, t_logits, labels, temperature, v, m=50.0):
    rows, _ = supervised_positions(labels)
    zs = (h.detach().double().reshape(-1, h.shape[-1]) @ w.detach().double().T)[rows][:, :v]
    lq = torch.log_softmax(zs.clamp(-m, m) / temperature, -1)
    lp = torch.log_softmax(t_logits[:, :v].double().clamp(-m, m) / temperature, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


# ---------------------------------------------------------------------------------------------
# against the fp64 reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 1.0), (0.7, 0.3), (4.0, 0.0)])
@pytest.mark.parametrize("k", [1, 5, 36])
@pytest.mark.parametrize("vocab_size", [None, 30])
def test_matches_fp64_reference(temperature, alpha, k, vocab_size):
    h, w, hT, wT = case(seed=k)
    v = vocab_size or 37
    labels = make_labels(2, 9, v, seed=k + 1)
    if k > v:
        k = v
    ids, vals, logz = teacher_topk_from_logits(teacher_rows(hT, wT, labels), k, [temperature], v)
    out = fused_topk_kd_loss(h, w, labels, ids, vals, logz[0], temperature=temperature,
                             alpha=alpha, vocab_size=vocab_size, chunk_size=4)
    out.loss.backward()
    loss, ce, kd, _, gh, gw = topk_reference(h, w, labels, ids, vals, logz[0],
                                             temperature=temperature, alpha=alpha,
                                             vocab_size=vocab_size)
    assert out.num_nonfinite == 0 and out.num_tokens == ids.shape[0]
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce.double(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kd.double(), kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad.double(), gw, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_fp64_inputs_exact_and_chunk_invariant(temperature):
    h, w, hT, wT = case(dtype=torch.float64, b=3, t=11, seed=7)
    labels = make_labels(3, 11, 37, seed=8)
    tl = teacher_rows(hT, wT, labels)[:, :37]
    vals, ids = tl.topk(8, dim=-1)
    logz = torch.logsumexp(tl / temperature, -1)
    grads = []
    for chunk in (1, 5, 1000):
        out = fused_topk_kd_loss(h, w, labels, ids.int(), vals, logz, temperature=temperature,
                                 alpha=0.6, chunk_size=chunk, num_items_in_batch=50)
        grads.append((out.loss.detach(), *torch.autograd.grad(out.loss, (h, w))))
    loss, _, _, _, gh, gw = topk_reference(h, w, labels, ids, vals, logz, alpha=0.6,
                                           temperature=temperature, num_items=50)
    for lo, a, b in grads:
        torch.testing.assert_close(lo, loss, rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(a, gh, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b, gw, rtol=1e-9, atol=1e-12)


def test_bf16_student_against_fp64_of_same_values():
    h, w, hT, wT = case(dtype=torch.bfloat16, t=16)
    labels = make_labels(2, 16, 37)
    ids, vals, logz = teacher_topk_from_logits(teacher_rows(hT, wT, labels), 6, [2.0], 37,
                                               values_dtype=torch.bfloat16)
    out = fused_topk_kd_loss(h, w, labels, ids, vals, logz[0], temperature=2.0, chunk_size=5)
    out.loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    loss, *_, gh, gw = topk_reference(h, w, labels, ids, vals, logz[0], temperature=2.0,
                                      alpha=0.5)
    assert abs(float(out.loss.detach()) - float(loss)) <= 1e-2 * abs(float(loss))
    for a, b in ((h.grad, gh), (w.grad, gw)):
        assert float((a.double() - b).norm() / b.norm()) <= 1e-2


def test_directional_finite_differences():
    """gradcheck-style check of the analytic gradient on our own fp64 loss."""
    h, w, hT, wT = case(vs=11, vt=13, hs=5, ht=4, b=2, t=6, dtype=torch.float64, seed=2)
    labels = make_labels(2, 6, 11, seed=3)
    tl = teacher_rows(hT, wT, labels)[:, :11]
    vals, ids = tl.topk(4, dim=-1)
    logz = torch.logsumexp(tl / 2.0, -1)

    def f(hh, ww):
        return fused_topk_kd_loss(hh, ww, labels, ids, vals, logz, temperature=2.0, alpha=0.7,
                                  chunk_size=3).loss

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


# ---------------------------------------------------------------------------------------------
# k = V is the full KD loss; k < V is a lower bound
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 1.0), (3.0, 0.2)])
@pytest.mark.parametrize("vocab_size", [None, 33])
def test_k_equal_v_equals_fused_kd_loss(temperature, alpha, vocab_size):
    h, w, hT, wT = case(vs=37, vt=45, seed=5)  # teacher rows beyond V are dropped
    v = vocab_size or 37
    labels = make_labels(2, 9, v, seed=6)
    hT32, wT32 = hT.float(), wT.float()
    full = fused_kd_loss(h, w, hT32, wT32, labels, temperature=temperature, alpha=alpha,
                         vocab_size=v, chunk_size=4)
    gh_full, gw_full = torch.autograd.grad(full.loss, (h, w))
    ids, vals, logz = teacher_topk_from_logits(teacher_rows(hT32, wT32, labels), v,
                                               [temperature], v, values_dtype=torch.float32)
    out = fused_topk_kd_loss(h, w, labels, ids, vals, logz[0], temperature=temperature,
                             alpha=alpha, vocab_size=v, chunk_size=4)
    gh, gw = torch.autograd.grad(out.loss, (h, w))
    torch.testing.assert_close(out.loss, full.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kd, full.kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce, full.ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, gh_full, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, gw_full, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", range(6))
def test_bucket_kl_is_a_lower_bound_of_full_kl(seed):
    h, w, hT, wT = case(vs=50, vt=50, seed=seed, scale=1.0 + seed)
    labels = make_labels(2, 9, 50, seed=seed)
    tl = teacher_rows(hT, wT, labels)
    full_rows = full_kl_rows(h, w, tl, labels, 2.0, 50)
    prev = None
    z = tl.clamp(-50, 50)
    logz = torch.logsumexp(z / 2.0, -1)  # fp64: consistent with the fp64 values
    for k in (1, 3, 10, 25, 49, 50):
        vals, ids = z.topk(k, dim=-1)
        *_, kl_rows, _, _ = topk_reference(h, w, labels, ids, vals, logz, temperature=2.0,
                                           alpha=1.0)
        assert (kl_rows <= full_rows + 1e-9).all()  # data-processing inequality, row by row
        assert (kl_rows >= -1e-9).all()
        out = fused_topk_kd_loss(h, w, labels, ids, vals, logz, temperature=2.0, alpha=1.0)
        full = fused_kd_loss(h, w, hT.float(), wT.float(), labels, temperature=2.0, alpha=1.0)
        assert float(out.kd) <= float(full.kd) * (1 + 1e-5) + 1e-6
        if prev is not None:  # refining the partition (more buckets) never lowers it
            assert float(out.kd) >= prev - 1e-5
        prev = float(out.kd)
    assert math.isclose(prev, float(full.kd), rel_tol=1e-4)


# ---------------------------------------------------------------------------------------------
# tail edge cases
# ---------------------------------------------------------------------------------------------
def _single_row(v=20, hs=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, 2, hs, generator=g).requires_grad_()
    w = torch.randn(v, hs, generator=g).requires_grad_()
    labels = torch.tensor([[IGNORE, 3]])
    return h, w, labels


@pytest.mark.parametrize("values_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_teacher_mass_on_k_about_one(values_dtype):
    """Top-k logits 50, the rest -50: p_tail underflows / rounds below 0 -> 0, no NaN."""
    h, w, labels = _single_row()
    t = torch.full((1, 20), -50.0)
    t[0, :4] = torch.tensor([50.0, 49.9, 49.5, 48.0])
    ids, vals, logz = teacher_topk_from_logits(t, 4, [1.0, 2.0], 20, values_dtype=values_dtype)
    for j, temp in enumerate((1.0, 2.0)):
        out = fused_topk_kd_loss(h, w, labels, ids, vals, logz[j], temperature=temp, alpha=0.5)
        assert torch.isfinite(out.loss) and out.num_nonfinite == 0
        gh, gw = torch.autograd.grad(out.loss, (h, w))
        assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
        ref, *_, rgh, rgw = topk_reference(h, w, labels, ids, vals, logz[j], temperature=temp,
                                           alpha=0.5)
        torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gw.double(), rgw, rtol=1e-5, atol=1e-6)


def test_rounding_pushes_topk_mass_above_one():
    """Values rounded up (Σ_K p > 1 with the given logZ): renormalised, tail 0, finite."""
    h, w, labels = _single_row()
    vals = torch.tensor([[3.0, 2.0, 1.0]])
    ids = torch.tensor([[0, 5, 7]], dtype=torch.int32)
    logz = torch.logsumexp(vals, -1) - 1e-3  # inconsistent on purpose
    out = fused_topk_kd_loss(h, w, labels, ids, vals, logz, temperature=1.0, alpha=1.0)
    assert torch.isfinite(out.loss) and float(out.kd) >= 0
    ref, *_, rgh, rgw = topk_reference(h, w, labels, ids, vals, logz, temperature=1.0, alpha=1.0)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    gh, gw = torch.autograd.grad(out.loss, (h, w))
    torch.testing.assert_close(gw.double(), rgw, rtol=1e-5, atol=1e-6)


def test_student_equal_to_teacher_gives_zero_kd_and_gradient():
    h, w, labels = _single_row(v=16)
    with torch.no_grad():
        t = (h[:, 0] @ w.T).double()
    ids, vals, logz = teacher_topk_from_logits(t, 5, [2.0], 16, values_dtype=torch.float64)
    out = fused_topk_kd_loss(h.double(), w.double(), labels, ids, vals, logz[0].double(),
                             temperature=2.0, alpha=1.0)
    assert abs(float(out.kd)) < 1e-6
    h64 = h.detach().double().requires_grad_()
    out = fused_topk_kd_loss(h64, w.detach().double(), labels, ids, vals, logz[0].double(),
                             temperature=2.0, alpha=1.0)
    (gh,) = torch.autograd.grad(out.loss, (h64,))
    assert float(gh.abs().max()) < 1e-5


# ---------------------------------------------------------------------------------------------
# ids, shapes, non-finite cache entries
# ---------------------------------------------------------------------------------------------
def test_ids_must_lie_in_the_student_vocabulary_and_be_distinct():
    h, w, labels = _single_row(v=20)
    vals = torch.zeros(1, 3)
    logz = torch.tensor([5.0])
    for bad in ([[1, 2, 20]], [[1, 2, 25]], [[-1, 2, 3]]):  # 20: beyond V (teacher-only row)
        with pytest.raises(ValueError, match="vocab_size"):
            fused_topk_kd_loss(h, w, labels, torch.tensor(bad, dtype=torch.int32), vals, logz)
    with pytest.raises(ValueError, match="vocab_size"):  # id 15 is beyond vocab_size=15
        fused_topk_kd_loss(h, w, labels, torch.tensor([[1, 2, 15]]), vals, logz, vocab_size=15)
    with pytest.raises(ValueError, match="distinct"):
        fused_topk_kd_loss(h, w, labels, torch.tensor([[1, 2, 1]]), vals, logz)
    with pytest.raises(ValueError):  # N mismatch
        fused_topk_kd_loss(h, w, labels, torch.tensor([[1, 2, 3]] * 2), vals.repeat(2, 1), logz)
    with pytest.raises(ValueError):  # float ids
        fused_topk_kd_loss(h, w, labels, torch.tensor([[1.0, 2.0, 3.0]]), vals, logz)
    with pytest.raises(ValueError):  # logZ shape
        fused_topk_kd_loss(h, w, labels, torch.tensor([[1, 2, 3]]), vals, logz[None])
    with pytest.raises(ValueError):
        fused_topk_kd_loss(h, w, labels, torch.tensor([[1, 2, 3]]), vals, logz, nonfinite="x")


def test_nonfinite_cache_entries_report_and_sanitize():
    h, w, hT, wT = case(seed=9)
    labels = make_labels(2, 9, 37, p_ignore=0.0, seed=9)
    ids, vals, logz = teacher_topk_from_logits(teacher_rows(hT, wT, labels), 6, [2.0], 37)
    logz = logz[0].clone()
    vals = vals.clone()
    vals[3, 2] = float("nan")
    logz[7] = float("inf")
    out = fused_topk_kd_loss(h, w, labels, ids, vals, logz, temperature=2.0)
    assert torch.isnan(out.loss)
    assert (out.num_nonfinite_teacher, out.num_nonfinite_student, out.num_nonfinite) == (2, 0, 2)
    gh, gw = torch.autograd.grad(out.loss, (h, w))  # no raise, finite, bad rows masked
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    rows, _ = supervised_positions(labels)
    assert float(gh.reshape(-1, gh.shape[-1])[rows[3]].abs().sum()) == 0.0
    # sanitize: the two rows keep their CE and lose their KD term
    out = fused_topk_kd_loss(h, w, labels, ids, vals, logz, temperature=2.0, nonfinite="sanitize")
    assert torch.isfinite(out.loss) and out.num_nonfinite_teacher == 2
    out.loss.backward()
    keep = torch.ones(ids.shape[0], dtype=torch.bool)
    keep[[3, 7]] = False
    n = ids.shape[0]
    ref_ce, *_ = topk_reference(h, w, labels, ids, vals.nan_to_num(), logz.nan_to_num(posinf=0),
                                temperature=2.0, alpha=0.0)
    lab_keep = labels.clone()
    flat = lab_keep[:, 1:].reshape(-1)
    sup = (flat != IGNORE).nonzero().squeeze(1)
    flat[sup[~keep]] = IGNORE
    lab_keep[:, 1:] = flat.view(lab_keep.shape[0], -1)
    _, _, ref_kd, *_ = topk_reference(h, w, lab_keep, ids[keep], vals[keep], logz[keep],
                                      temperature=2.0, alpha=1.0, num_items=n)
    torch.testing.assert_close(out.loss.double(), 0.5 * ref_ce + 0.5 * ref_kd, rtol=1e-5,
                               atol=1e-6)
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def test_no_supervised_tokens():
    h, w, labels = _single_row()
    labels[:] = IGNORE
    out = fused_topk_kd_loss(h, w, labels, torch.zeros(0, 3, dtype=torch.int32),
                             torch.zeros(0, 3, dtype=torch.float16), torch.zeros(0))
    assert out.num_tokens == 0 and float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert float(h.grad.abs().sum()) == 0.0 and float(w.grad.abs().sum()) == 0.0


# ---------------------------------------------------------------------------------------------
# teacher_topk_from_logits
# ---------------------------------------------------------------------------------------------
def test_topk_helper_restricts_to_real_vocab_and_computes_logz():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 40, generator=g, dtype=torch.float64) * 4
    logits[:, 30:] = 1e3  # padding rows of the lm head (>= vocab_size): must be ignored
    logits[2, 5] = 80.0  # clamped to max_logit_abs like the live losses do
    ids, vals, logz = teacher_topk_from_logits(logits.to(torch.bfloat16), 4, [1.0, 2.0], 30,
                                               chunk_size=3)
    assert ids.dtype == torch.int32 and vals.dtype == torch.float16
    assert logz.dtype == torch.float32 and logz.shape == (2, 7)
    assert ids.shape == vals.shape == (7, 4)
    assert int(ids.max()) < 30
    z = logits.to(torch.bfloat16).float()[:, :30].clamp(-50, 50)
    ref_v, ref_i = z.topk(4, dim=-1)
    assert torch.equal(ids.long(), ref_i)
    torch.testing.assert_close(vals.float(), ref_v, rtol=1e-3, atol=1e-2)
    assert float(vals[2, 0]) == 50.0 and int(ids[2, 0]) == 5
    for j, t in enumerate((1.0, 2.0)):
        torch.testing.assert_close(logz[j], torch.logsumexp(z / t, -1), rtol=1e-6, atol=1e-6)
    assert (vals[:, :-1] >= vals[:, 1:]).all()  # sorted by decreasing logit


def test_topk_helper_nonfinite_rows_and_validation():
    logits = torch.randn(3, 10)
    logits[1, 4] = float("inf")
    ids, vals, logz = teacher_topk_from_logits(logits, 2, [1.0], 10)
    assert torch.isnan(logz[0, 1]) and torch.isfinite(logz[0, [0, 2]]).all()
    assert torch.isnan(vals[1].float()).all()
    with pytest.raises(ValueError):
        teacher_topk_from_logits(logits, 11, [1.0], 10)
    with pytest.raises(ValueError):
        teacher_topk_from_logits(logits, 2, [0.0], 10)
    with pytest.raises(ValueError):
        teacher_topk_from_logits(logits[0], 2, [1.0], 10)
    # vocab_size larger than the teacher's width: only the teacher's columns exist
    ids, _, _ = teacher_topk_from_logits(logits, 10, [1.0], 12)
    assert ids.shape == (3, 10)


# ---------------------------------------------------------------------------------------------
# CasCoD-KD from the cache: one call, rationale rows with the cached teacher, answer rows CE
# ---------------------------------------------------------------------------------------------
def _cascod_case(b=2, t=9, v=33, seed=11):
    h, w, hT, wT = case(vs=37, vt=45, b=2 * b, t=t, seed=seed)
    labels = make_labels(2 * b, t, v, seed=seed + 1)
    return h, w, hT[:b].float(), wT.float(), labels


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.8)])
def test_cascod_topk_at_k_equal_v_equals_live_cascod(temperature, alpha):
    """``fused_cascod_loss(teacher_topk=...)`` with k = V is the live CasCoD-KD loss (values and
    gradients): the cached path has the same weights, groups and normalisers."""
    from slmkd.losses import fused_cascod_loss

    b, v = 2, 33
    h, w, hT, wT, labels = _cascod_case(b=b, v=v)
    kw = dict(alpha_cascod=0.3, temperature=temperature, alpha=alpha, vocab_size=v, chunk_size=4,
              num_rationale_tokens=13, num_answer_tokens=7)
    live = fused_cascod_loss(h, w, labels, b, teacher_hidden=hT, teacher_lm_head_weight=wT, **kw)
    g_live = torch.autograd.grad(live.loss, (h, w))
    ids, vals, logz = teacher_topk_from_logits(teacher_rows(hT, wT, labels[:b]), v,
                                               [temperature], v, values_dtype=torch.float32)
    out = fused_cascod_loss(h, w, labels, b, teacher_topk=(ids, vals, logz[0]), **kw)
    g = torch.autograd.grad(out.loss, (h, w))
    torch.testing.assert_close(out.loss, live.loss, rtol=1e-5, atol=1e-6)
    for a, c in zip(out.group_ce, live.group_ce):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.group_kd[0], live.group_kd[0], rtol=1e-5, atol=1e-6)
    for a, c in zip(g, g_live):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)


def test_cascod_topk_against_fp64_composition():
    """k < V: the one-call loss is ``(1-α_c)·[(1-α)·CE_r + α·KD_r]/N_r + α_c·CE_a/N_a`` with
    ``KD_r`` the fp64 bucket KL of the rationale rows (values and gradients)."""
    from slmkd.losses import fused_cascod_loss

    b, v, k, temp, a, ac, nr, na = 2, 33, 5, 2.0, 0.6, 0.25, 11.0, 6.0
    h, w, hT, wT, labels = _cascod_case(b=b, v=v, seed=3)
    ids, vals, logz = teacher_topk_from_logits(teacher_rows(hT, wT, labels[:b]), k, [temp], v,
                                               values_dtype=torch.float32)
    out = fused_cascod_loss(h, w, labels, b, alpha_cascod=ac, teacher_topk=(ids, vals, logz[0]),
                            temperature=temp, alpha=a, vocab_size=v, chunk_size=3,
                            num_rationale_tokens=nr, num_answer_tokens=na)
    gh, gw = torch.autograd.grad(out.loss, (h, w))
    # reference: the two terms separately in fp64 (rationale rows: bucket KL; answer rows: CE)
    hr = h.detach()[:b].clone().requires_grad_()
    lr, _, _, _, ghr, gwr = topk_reference(hr, w, labels[:b], ids, vals, logz[0],
                                           temperature=temp, alpha=a, vocab_size=v,
                                           num_items=nr)
    ha = h.detach()[b:].double().requires_grad_()
    wa = w.detach().double().requires_grad_()
    rows, y = supervised_positions(labels[b:])
    za = (ha.reshape(-1, ha.shape[-1]) @ wa.T)[rows][:, :v].clamp(-50, 50)
    la = F.cross_entropy(za, y, reduction="sum") / na
    la.backward()
    ref = (1 - ac) * lr + ac * la.detach()
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh[:b].double(), (1 - ac) * ghr, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gh[b:].double(), ac * ha.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), (1 - ac) * gwr + ac * wa.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="N_t="):  # the cache must cover the rationale rows only
        all_ids, all_vals, all_logz = teacher_topk_from_logits(
            teacher_rows(torch.cat([hT, hT]), wT, labels), k, [temp], v)
        fused_cascod_loss(h, w, labels, b, alpha_cascod=ac,
                          teacher_topk=(all_ids, all_vals, all_logz[0]), temperature=temp,
                          alpha=a, vocab_size=v)
