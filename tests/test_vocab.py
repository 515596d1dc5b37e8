"""Vocab alignment and both KD losses at the real Qwen sizes, with tiny random Qwen2 models.

The tokenizer is the real Qwen2 one vendored in ``tests/fixtures/qwen2-tokenizer`` (Apache-2.0,
LICENSE beside it), extended to Qwen2.5's 151,665 tokens by :func:`qwen25_tokenizer`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slmkd.losses import fused_kd_loss, kd_loss
from slmkd.vocab import align_teacher_logits, ensure_vocab_alignment

transformers = pytest.importorskip("transformers")

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "qwen2-tokenizer"
QWEN2_TOKENS = 151_646
QWEN25_TOKENS = 151_665
STUDENT_ROWS = 151_936  # Qwen2.5 0.5B-3B
TEACHER_ROWS = 152_064  # Qwen2.5 7B and up
#: The 19 special tokens Qwen2.5 adds after Qwen2's, ids 151,646-151,664, in order.
QWEN25_EXTRA_SPECIAL = [
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]


def qwen2_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def qwen25_tokenizer():
    """The vendored Qwen2 tokenizer extended to Qwen2.5's 151,665 tokens."""
    tok = qwen2_tokenizer()
    tok.add_tokens([transformers.AddedToken(t, special=True, normalized=False)
                    for t in QWEN25_EXTRA_SPECIAL], special_tokens=True)
    return tok


def tiny_qwen2(rows: int, hidden: int, tie: bool, seed: int = 0):
    cfg = transformers.Qwen2Config(
        vocab_size=rows, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok25():
    return qwen25_tokenizer()


@pytest.fixture(scope="module")
def models():
    return tiny_qwen2(STUDENT_ROWS, 16, tie=True, seed=0), tiny_qwen2(TEACHER_ROWS, 32, tie=False,
                                                                        seed=1)


def test_fixture_tokenizer_sizes(tok25):
    assert (TOKENIZER_DIR / "LICENSE").exists()
    assert len(qwen2_tokenizer()) == QWEN2_TOKENS
    assert len(tok25) == QWEN25_TOKENS
    ids = tok25.convert_tokens_to_ids(QWEN25_EXTRA_SPECIAL)
    assert ids == list(range(QWEN2_TOKENS, QWEN25_TOKENS))
    assert tok25("<tool_call>x</tool_call>")["input_ids"][0] == 151_657


# ---------------------------------------------------------------------------------------------
# ensure_vocab_alignment / align_teacher_logits
# ---------------------------------------------------------------------------------------------
def test_alignment_is_noop_when_rows_cover_tokenizer(tok25, models, caplog):
    for model, rows in zip(models, (STUDENT_ROWS, TEACHER_ROWS)):
        before = model.get_input_embeddings().weight.detach().clone()
        with caplog.at_level(logging.INFO, logger="slmkd.vocab"):
            report = ensure_vocab_alignment(model, tok25)
        assert report.action == "none" and not report.changed
        assert report.rows_before == report.rows_after == rows
        assert report.padding_rows == rows - QWEN25_TOKENS
        assert torch.equal(model.get_input_embeddings().weight, before)
        assert "unchanged" in str(report) and "unchanged" in caplog.text


@pytest.mark.parametrize("tie", [True, False])
def test_alignment_grows_with_mean_rows_and_never_shrinks(tok25, tie):
    rows = QWEN2_TOKENS  # a checkpoint sized for the Qwen2 tokenizer exactly
    model = tiny_qwen2(rows, 8, tie=tie)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    report = ensure_vocab_alignment(model, tok25)
    assert report.action == "grown" and report.changed
    assert (report.rows_before, report.rows_after) == (rows, QWEN25_TOKENS)
    w_in = model.get_input_embeddings().weight
    w_out = model.get_output_embeddings().weight
    assert w_in.shape[0] == QWEN25_TOKENS and w_out.shape[0] == QWEN25_TOKENS
    assert (w_in is w_out) == tie
    torch.testing.assert_close(w_in[:rows], old_in)
    torch.testing.assert_close(w_out[:rows], old_out)
    new = w_in[rows:]
    torch.testing.assert_close(new, old_in.mean(0).expand_as(new), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w_out[rows:], old_out.mean(0).expand_as(new), rtol=1e-6,
                               atol=1e-7)
    assert model.config.vocab_size == QWEN25_TOKENS
    # the model still runs on the new ids; a second call is a no-op (never shrinks)
    ids = torch.tensor([[1, QWEN25_TOKENS - 1]])
    assert model(ids).logits.shape[-1] == QWEN25_TOKENS
    again = ensure_vocab_alignment(model, qwen2_tokenizer())
    assert again.action == "none" and again.rows_after == QWEN25_TOKENS


def test_alignment_pad_to_multiple(tok25):
    model = tiny_qwen2(QWEN2_TOKENS, 8, tie=True)
    report = ensure_vocab_alignment(model, tok25, pad_to_multiple_of=64)
    assert report.rows_after == 151_680 and report.padding_rows == 15


def test_align_teacher_logits():
    t = torch.randn(2, 3, 10)
    dropped = align_teacher_logits(t, 7)
    assert dropped.shape == (2, 3, 7) and torch.equal(dropped, t[..., :7])
    padded = align_teacher_logits(t, 12)
    assert padded.shape == (2, 3, 12) and torch.equal(padded[..., :10], t)
    assert torch.isneginf(padded[..., 10:]).all()
    p = torch.softmax(padded, -1)
    assert torch.equal(p[..., 10:], torch.zeros(2, 3, 2))
    with pytest.raises(ValueError):
        align_teacher_logits(t, 0)


# ---------------------------------------------------------------------------------------------
# both losses at the real sizes
# ---------------------------------------------------------------------------------------------
def _batch(tok):
    texts = [
        [{"role": "user", "content": "What is 12 + 30?"},
         {"role": "assistant", "content": "12 + 30 = 42. <tool_call>calc</tool_call> #### 42"}],
        [{"role": "user", "content": "Is 7 prime?"},
         {"role": "assistant", "content": "Yes."}],
    ]
    rows = []
    for conv in texts:
        prompt = tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(conv, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        f_ids = tok(full, add_special_tokens=False)["input_ids"]
        assert f_ids[:len(p_ids)] == p_ids
        rows.append((f_ids, len(p_ids)))
    seq = max(len(f) for f, _ in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((2, seq), pad)
    labels = torch.full((2, seq), -100)
    for i, (f, n_prompt) in enumerate(rows):
        ids[i, :len(f)] = torch.tensor(f)
        labels[i, n_prompt:len(f)] = torch.tensor(f[n_prompt:])
    assert int(labels.max()) >= QWEN2_TOKENS  # a Qwen2.5-only special token is supervised
    return ids, labels


def _reference(s, t, labels, v, temperature, alpha):
    y = labels[:, 1:]
    m = y != -100
    zs = s[:, :-1][m][:, :v].double().clamp(-50, 50)
    zt = t[:, :-1][m][:, :v].double().clamp(-50, 50)
    ce = F.cross_entropy(zs, y[m], reduction="sum")
    logp = torch.log_softmax(zt / temperature, -1)
    kd = temperature**2 * (logp.exp() * (logp - torch.log_softmax(zs / temperature, -1))).sum()
    n = int(m.sum())
    return ((1 - alpha) * ce + alpha * kd) / n, ce / n, kd / n, n


def test_losses_at_real_sizes(tok25, models):
    student, teacher = models
    ids, labels = _batch(tok25)
    v = len(tok25)
    with torch.no_grad():
        hs = student.model(input_ids=ids).last_hidden_state
        ht = teacher.model(input_ids=ids).last_hidden_state
    ws = student.lm_head.weight
    wt = teacher.lm_head.weight.detach()
    assert ws.shape == (STUDENT_ROWS, 16) and wt.shape == (TEACHER_ROWS, 32)
    s_logits = (hs @ ws.detach().T).requires_grad_()
    t_logits = ht @ wt.T
    # padding columns (>= len(tokenizer)) poisoned: must not matter
    with torch.no_grad():
        s_logits[..., v:] = float("nan")
        t_logits[..., v:] = float("inf")

    temperature, alpha = 2.0, 0.5
    out = kd_loss(s_logits, t_logits, labels, temperature=temperature, alpha=alpha, vocab_size=v)
    s64 = s_logits.detach().double().requires_grad_()
    ref, ce, kd, n = _reference(s64, t_logits, labels, v, temperature, alpha)
    assert out.num_tokens == n and out.num_nonfinite == 0
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce.double(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kd.double(), kd, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    ref.backward()
    assert float(s_logits.grad[..., v:].abs().sum()) == 0.0
    torch.testing.assert_close(s_logits.grad.double(), s64.grad, rtol=1e-5, atol=1e-8)

    # fused: gradients w.r.t. hidden states and the (tied) lm-head weight
    hs_g = hs.clone().requires_grad_()
    student.zero_grad(set_to_none=True)
    fo = fused_kd_loss(hs_g, ws, ht, wt, labels, temperature=temperature, alpha=alpha,
                       vocab_size=v)
    fo.loss.backward()
    h64 = hs.double().requires_grad_()
    w64 = ws.detach().double().requires_grad_()
    fref, *_ = _reference(h64 @ w64.T, ht.double() @ wt.double().T, labels, v, temperature,
                          alpha)
    fref.backward()
    torch.testing.assert_close(fo.loss.double(), fref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs_g.grad.double(), h64.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(ws.grad.double(), w64.grad, rtol=1e-5, atol=1e-8)
    assert float(ws.grad[v:].abs().sum()) == 0.0
    assert student.get_input_embeddings().weight.grad is ws.grad  # tied


def test_default_vocab_is_min_of_both_at_real_sizes(models):
    student, teacher = models
    ids = torch.randint(0, QWEN25_TOKENS, (1, 6))
    labels = ids.clone()
    with torch.no_grad():
        hs = student.model(input_ids=ids).last_hidden_state
        ht = teacher.model(input_ids=ids).last_hidden_state
    out = fused_kd_loss(hs, student.lm_head.weight.detach(), ht,
                        teacher.lm_head.weight.detach(), labels, alpha=1.0)
    s = hs @ student.lm_head.weight.detach().T
    t = ht @ teacher.lm_head.weight.detach().T
    ref, *_ = _reference(s, t, labels, STUDENT_ROWS, 1.0, 1.0)
    assert math.isclose(float(out.loss), float(ref), rel_tol=1e-5, abs_tol=1e-7)
