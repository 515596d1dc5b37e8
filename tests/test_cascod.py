"""Tests for CasCoD (slmkd.data.cot_format, slmkd.training.cascod, slmkd.training.staged,
slmkd.generation.cascade, slmkd.evaluation.propagation): splitting, example masks, joint loss,
cascaded inference with the stage-2 adapter, the error-propagation probe, training."""

from __future__ import annotations

import pytest

from slmkd.data.cot_format import (
    SplitCoT,
    answer_target,
    join_rationale_cue,
    split_cot,
    split_rationale_answer,
)
from slmkd.training.cascod import (
    build_answer_example,
    build_cascod_dataset,
    build_rationale_example,
)

# -- splitting ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("3 + 4 = 7.\n7 * 2 = 14.\nThe answer is 14.", ("3 + 4 = 7.\n7 * 2 = 14.", "14")),
        ("She pays 2.5 each.\nThe answer is 3.5.", ("She pays 2.5 each.", "3.5")),
        ("Step one.\nThe answer is -12", ("Step one.", "-12")),
        ("Step one.\nthe answer is 1,000.  \n", ("Step one.", "1,000")),
        # BBH CoTs: the marker follows the last sentence on the same line, after "So".
        ("Sentence is about a dog. The options say (A). So the answer is (A).",
         ("Sentence is about a dog. The options say (A).", "(A)")),
        ("True and False is False. So, the answer is False.",
         ("True and False is False.", "False")),
        ("Therefore, the answer is Yes.", None),  # nothing before the marker: empty rationale
    ],
)
def test_split_clean(completion, expected):
    assert split_rationale_answer(completion) == expected


@pytest.mark.parametrize(
    ("completion", "reason"),
    [
        ("3 + 4 = 7 so we get 7.", "marker_missing"),
        ("The answer is 7.\nWait.\nThe answer is 8.", "marker_repeated"),
        ("I think the answer is 7 but let me check. 3+4=7. So the answer is 7.", "marker_repeated"),
        ("3 + 4 = 7.\nThe answer is .", "empty_answer"),
        ("3 + 4 = 7.\nThe answer is", "empty_answer"),
        ("3 + 4 = 7.\nThe answer is 7.\nI hope this helps!", "text_after_answer"),
        ("The answer is 7.", "empty_rationale"),
        (None, "not_text"),
    ],
)
def test_split_dropped_with_reason(completion, reason):
    assert split_cot(completion) == reason
    assert split_rationale_answer(completion) is None


def test_marker_not_matched_inside_words():
    # "Also the answer is" must not strip "Al" + "so" as a connective.
    res = split_cot("Also the answer is 5.")
    assert isinstance(res, SplitCoT) and res.rationale == "Also" and res.answer == "5"


def test_cue_and_target_reassemble_the_cot():
    cot = "3 + 4 = 7.\n7 * 2 = 14.\nThe answer is 14."
    r, a = split_rationale_answer(cot)
    assert join_rationale_cue(r, "The answer is") + answer_target(a) == cot


# -- examples and label masks --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from slmkd.tiny import train_tokenizer

    texts = ["Solve the problem step by step. The answer is 14.", "Question: what is 3 + 4 * 2?",
             "You are a helpful assistant.", "3 + 4 = 7.\n7 * 2 = 14.\n"] * 20
    return train_tokenizer(texts, vocab_size=300)


def _prompt(tok, question="What is 3 + 4, times 2?"):
    from slmkd.data import Record, build_prompt

    return build_prompt(tok, Record("x", "gsm8k", None, "train", question, "14"))


def _supervised(ex):
    return [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != -100]


def test_rationale_example_mask(tok):
    prompt = _prompt(tok)
    r = "3 + 4 = 7.\n7 * 2 = 14."
    ex = build_rationale_example(tok, prompt, r, max_length=512, min_supervised_tokens=1)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(r + "\n", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == p_ids + r_ids + [tok.eos_token_id]
    assert ex.labels == [-100] * len(p_ids) + r_ids + [tok.eos_token_id]
    # the supervised text is exactly the rationale, its line break and EOS: no answer, no cue
    assert tok.decode(_supervised(ex)[:-1]) == r + "\n"
    assert "answer" not in tok.decode(_supervised(ex)).lower()


def test_answer_example_mask(tok):
    prompt = _prompt(tok)
    r = "3 + 4 = 7.\n7 * 2 = 14."
    ex = build_answer_example(tok, prompt, r, "14", max_length=512, answer_cue="The answer is")
    ctx = prompt + r + "\nThe answer is"
    c_ids = tok(ctx, add_special_tokens=False)["input_ids"]
    a_ids = tok(" 14.", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == c_ids + a_ids + [tok.eos_token_id]
    assert ex.labels == [-100] * len(c_ids) + a_ids + [tok.eos_token_id]
    assert tok.decode(_supervised(ex)[:-1]) == " 14."
    # the rationale and cue are context only
    assert tok.decode(ex.input_ids[: len(c_ids)]).endswith("14.\nThe answer is")
    # answers are short: the run-wide minimum for CoTs does not apply to them
    assert ex.num_supervised == len(a_ids) + 1 < 8


def test_build_dataset_counts_drops(tok):
    recs = [
        {"id": "a", "dataset": "gsm8k", "task": None, "question": "What is 3 + 4?",
         "completion": "3 + 4 = 7.\nThe answer is 7."},
        {"id": "b", "dataset": "gsm8k", "task": None, "question": "What is 1 + 1?",
         "completion": "1 + 1 = 2."},  # marker missing
        {"id": "c", "dataset": "gsm8k", "task": None, "question": "What is 1 + 2?",
         "completion": "The answer is 3.\n1 + 2 = 3.\nThe answer is 3."},  # twice
        {"id": "d", "dataset": "gsm8k", "task": None, "question": "What is 2 + 2?",
         "completion": "2 + 2 = 4.\nThe answer is ."},  # empty answer
        {"id": "e", "dataset": "gsm8k", "task": None, "question": "What is 2 + 3?",
         "completion": "5.\nThe answer is 5."},  # rationale below min_supervised_tokens
    ]
    ds, stats = build_cascod_dataset(tok, recs, max_length=512, min_supervised_tokens=4)
    assert len(ds) == stats.kept == 1 and stats.total == 5
    assert dict(stats.dropped) == {"split:marker_missing": 1, "split:marker_repeated": 1,
                                   "split:empty_answer": 1,
                                   "rationale:too_few_supervised_tokens": 1}
    item = ds[0]
    assert item["example_id"] == "a"
    assert set(item) == {"example_id", "rationale_input_ids", "rationale_labels",
                         "answer_input_ids", "answer_labels"}
    assert set(ds.with_kind("answer")[0]) == {"example_id", "input_ids", "labels"}
    assert ds.with_kind("answer")[0]["input_ids"] == item["answer_input_ids"]
    assert ds.with_kind("rationale")[0]["labels"] == item["rationale_labels"]
    assert stats.rationale_tokens == sum(t != -100 for t in item["rationale_labels"])
    assert stats.answer_tokens == sum(t != -100 for t in item["answer_labels"])
    # a budget that fits q + r but not q + r + cue + a: only the answer prompt loses tokens
    n_r = len(item["rationale_input_ids"])
    _, st2 = build_cascod_dataset(tok, recs[:1], max_length=n_r, min_supervised_tokens=4)
    assert st2.kept == 1 and st2.rationale_prompt_truncated == 0
    assert st2.answer_prompt_truncated == 1 and st2.prompt_tokens_dropped > 0
    assert st2.to_dict()["num_dropped"] == 0


def _pairs_dataset(tok, n=3, max_length=512):
    recs = [{"id": str(i), "dataset": "gsm8k", "task": None, "question": f"What is {i} + 4?",
             "completion": f"{i} + 4 = {i + 4}." + " ok." * i + f"\nThe answer is {i + 4}."}
            for i in range(n)]
    ds, _ = build_cascod_dataset(tok, recs, max_length=max_length, min_supervised_tokens=1)
    return ds


def _virtual(batch):
    """The collator's batch as the stacked ``[2B]`` rows the joint loss sees (rationale rows,
    then answer rows): the inputs of a direct per-row computation."""
    from slmkd.training.cascod import pair_hidden

    ids = pair_hidden(batch["input_ids"].unsqueeze(-1), batch).squeeze(-1)
    mask = pair_hidden(batch["attention_mask"].unsqueeze(-1), batch).squeeze(-1)
    return ids, mask, batch["labels"]


@pytest.mark.parametrize("share", [True, False])
def test_collator_gives_a_pair_one_row_when_the_rationale_is_a_prefix(tok, share):
    from slmkd.data.cot_format import shares_prefix
    from slmkd.training.cascod import CasCoDCollator

    ds = _pairs_dataset(tok)
    items = [ds[i] for i in range(3)]
    assert all(shares_prefix(it["rationale_input_ids"], it["answer_input_ids"]) for it in items)
    batch = CasCoDCollator(pad_token_id=tok.pad_token_id, share_rows=share)(items)
    b = 3
    assert batch["input_ids"].shape[0] == (b if share else 2 * b)
    assert batch["labels"].shape[0] == 2 * b and int(batch["num_rationale_rows"]) == b
    assert batch["rationale_row_index"].tolist() == ([0, 1, 2] if share else [3, 4, 5])
    assert batch["answer_row_mask"].tolist() == [False] * 3 + [True] * 3
    assert batch["example_id"] == ["0", "1", "2"]
    rows = batch["rationale_row_index"].tolist()
    for i, item in enumerate(items):
        a_ids, a_lab = item["answer_input_ids"], item["answer_labels"]
        r_ids, r_lab = item["rationale_input_ids"], item["rationale_labels"]
        assert batch["input_ids"][i, :len(a_ids)].tolist() == a_ids
        assert batch["attention_mask"][i].sum().item() == len(a_ids)
        assert (batch["input_ids"][i, len(a_ids):] == tok.pad_token_id).all()
        assert batch["labels"][b + i, :len(a_lab)].tolist() == a_lab
        # the rationale row: its tokens before EOS are the row's first tokens, its labels
        # (EOS included) sit at the same indices
        assert batch["input_ids"][rows[i], :len(r_ids) - 1].tolist() == r_ids[:-1]
        assert batch["labels"][i, :len(r_lab)].tolist() == r_lab
        assert (batch["labels"][i, len(r_lab):] == -100).all()
        # rationale and answer targets never share a position of the shared row
        if share:
            both = batch["labels"][i].ne(-100) & batch["labels"][b + i].ne(-100)
            assert not both.any()


def test_collator_gives_an_unshared_pair_its_own_row(tok):
    """A pair whose answer prompt was left-truncated (the rationale is no longer its prefix)
    gets a rationale row of its own; the others keep sharing."""
    from slmkd.data.cot_format import shares_prefix
    from slmkd.training.cascod import CasCoDCollator

    full = _pairs_dataset(tok)
    n_a = len(full[0]["answer_input_ids"])
    short = _pairs_dataset(tok, max_length=n_a - 2)  # item 0's answer prompt loses 2 tokens
    items = [short[0], full[1], full[2]]
    assert not shares_prefix(items[0]["rationale_input_ids"], items[0]["answer_input_ids"])
    batch = CasCoDCollator(pad_token_id=tok.pad_token_id)(items)
    assert batch["input_ids"].shape[0] == 4
    assert batch["rationale_row_index"].tolist() == [3, 1, 2]
    r_ids = items[0]["rationale_input_ids"]
    assert batch["input_ids"][3, :len(r_ids)].tolist() == r_ids


# -- joint loss ----------------------------------------------------------------------------------
def _direct_ce_sum(logits, labels):
    """Σ over supervised positions of -log softmax(logits_t)[labels_{t+1}], and the count."""
    import torch.nn.functional as F

    lg, lab = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    return F.cross_entropy(lg.float(), lab, ignore_index=-100, reduction="sum"), lab.ne(-100).sum()


def test_joint_loss_matches_direct_computation(tok):
    import torch
    from _tiny_lm import make_model

    from slmkd.training.cascod import CasCoDCollator, cascod_joint_loss

    recs = [{"id": str(i), "dataset": "gsm8k", "task": None, "question": f"What is {i} + 4?",
             "completion": f"{i} + 4 = {i + 4}." + " ok." * i + f"\nThe answer is {i + 4}."}
            for i in range(3)]
    ds, _ = build_cascod_dataset(tok, recs, max_length=512, min_supervised_tokens=1)
    batch = CasCoDCollator(pad_token_id=tok.pad_token_id)([ds[i] for i in range(3)])
    model = make_model(tok, seed=3)
    model.eval()
    ids, mask, labels = _virtual(batch)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = model(input_ids=ids, attention_mask=mask).logits
    w = model.get_output_embeddings().weight
    v = len(tok)
    alpha = 0.3
    out = cascod_joint_loss(hidden, w, labels, 3, alpha_cascod=alpha, vocab_size=v,
                            max_logit_abs=1e4, chunk_size=7)
    sr, nr = _direct_ce_sum(logits[:3, :, :v], labels[:3])
    sa, na = _direct_ce_sum(logits[3:, :, :v], labels[3:])
    expected = (1 - alpha) * sr / nr + alpha * sa / na
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rationale_ce, sr / nr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.answer_ce, sa / na, rtol=1e-5, atol=1e-5)
    assert int(out.rationale_tokens) == int(nr) and int(out.answer_tokens) == int(na)
    # step-level normalisation: the counts of the whole optimiser step divide each term's sum
    out2 = cascod_joint_loss(hidden, w, labels, 3, alpha_cascod=alpha, vocab_size=v,
                             max_logit_abs=1e4, num_rationale_tokens=2 * nr,
                             num_answer_tokens=4 * na)
    torch.testing.assert_close(out2.loss, (1 - alpha) * sr / (2 * nr) + alpha * sa / (4 * na),
                               rtol=1e-5, atol=1e-5)
    # α_c = 0 ignores the answer rows entirely; α_c = 1 the rationale rows
    o0 = cascod_joint_loss(hidden, w, labels, 3, alpha_cascod=0.0, vocab_size=v, max_logit_abs=1e4)
    torch.testing.assert_close(o0.loss, sr / nr, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        cascod_joint_loss(hidden[:5], w, labels[:5], 3, vocab_size=v)


def test_joint_loss_kd_term_on_rationale_rows(tok):
    import torch
    import torch.nn.functional as F
    from _tiny_lm import make_model

    from slmkd.training.cascod import CasCoDCollator, cascod_joint_loss

    recs = [{"id": str(i), "dataset": "gsm8k", "task": None, "question": f"What is {i} + 5?",
             "completion": f"{i} + 5 = {i + 5}.\nThe answer is {i + 5}."} for i in range(2)]
    ds, _ = build_cascod_dataset(tok, recs, max_length=512, min_supervised_tokens=1)
    batch = CasCoDCollator(pad_token_id=tok.pad_token_id)([ds[i] for i in range(2)])
    student, teacher = make_model(tok, seed=1), make_model(tok, seed=2, hidden=48)
    ids, mask, labels = _virtual(batch)
    with torch.no_grad():
        hs = student.model(input_ids=ids, attention_mask=mask).last_hidden_state
        ls = student(input_ids=ids, attention_mask=mask).logits
        ht = teacher.model(input_ids=ids[:2], attention_mask=mask[:2]).last_hidden_state
        lt = teacher(input_ids=ids[:2], attention_mask=mask[:2]).logits
    v, t, a, ac = len(tok), 2.0, 0.5, 0.1
    out = cascod_joint_loss(hs, student.get_output_embeddings().weight, labels, 2,
                            alpha_cascod=ac, teacher_hidden=ht,
                            teacher_weight=teacher.get_output_embeddings().weight,
                            temperature=t, kd_alpha=a, vocab_size=v, max_logit_abs=1e4)
    sel = labels[:2, 1:].ne(-100)
    s_log = F.log_softmax(ls[:2, :-1, :v][sel] / t, -1)
    t_log = F.log_softmax(lt[:, :-1, :v][sel] / t, -1)
    kl = (t_log.exp() * (t_log - s_log)).sum() / sel.sum()
    sr, nr = _direct_ce_sum(ls[:2, :, :v], labels[:2])
    sa, na = _direct_ce_sum(ls[2:, :, :v], labels[2:])
    expected = (1 - ac) * ((1 - a) * sr / nr + a * t * t * kl) + ac * sa / na
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-5)


class _StubTrainer:
    """What the cascod loss reads off the trainer: cfg, schedules, vocab size, hidden states."""

    def __init__(self, cfg, vocab_size):
        self.cfg, self.vocab_size, self.temperature, self.alpha = cfg, vocab_size, 1.0, 0.0

    def student_hidden(self, model, ids, mask):
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, model.get_output_embeddings().weight


@pytest.mark.parametrize(("overrides", "alpha"), [({}, 0.1), ({"cascod.alpha_cascod": 0.7}, 0.7)])
def test_cascod_training_loss_uses_the_configured_alpha(tok, overrides, alpha):
    """The loss the trainer optimises for ``cascod`` is (1-α_c)·CE_r + α_c·CE_a with α_c from the
    config; the default config gives the authors' 0.9 / 0.1 mix."""
    import torch
    from _tiny_lm import make_model

    from slmkd.config import load_config
    from slmkd.training.cascod import CasCoDCollator, _cascod_loss

    recs = [{"id": str(i), "dataset": "gsm8k", "task": None, "question": f"What is {i} + 4?",
             "completion": f"{i} + 4 = {i + 4}." + " ok." * i + f"\nThe answer is {i + 4}."}
            for i in range(3)]
    ds, _ = build_cascod_dataset(tok, recs, max_length=512, min_supervised_tokens=1)
    batch = CasCoDCollator(pad_token_id=tok.pad_token_id)([ds[i] for i in range(3)])
    batch.pop("example_id")
    model = make_model(tok, seed=3)
    cfg = load_config("tiny", overrides={**overrides, "kd.max_logit_abs": 1e4}, environ={})
    with torch.no_grad():
        loss, m = _cascod_loss(_StubTrainer(cfg, len(tok)), model, batch, {})
        ids, mask, _ = _virtual(batch)
        logits = model(input_ids=ids, attention_mask=mask).logits
    sr, nr = _direct_ce_sum(logits[:3, :, :len(tok)], batch["labels"][:3])
    sa, na = _direct_ce_sum(logits[3:, :, :len(tok)], batch["labels"][3:])
    torch.testing.assert_close(loss, (1 - alpha) * sr / nr + alpha * sa / na, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m["rationale_ce"], sr / nr, rtol=1e-5, atol=1e-5)
    assert abs(float(sr / nr) - float(sa / na)) > 1e-3  # the two terms differ: α_c matters


class _StubKDTrainer(_StubTrainer):
    def __init__(self, cfg, vocab_size, teacher):
        super().__init__(cfg, vocab_size)
        self.teacher, self.temperature, self.alpha = teacher, 2.0, 0.5

    def teacher_hidden(self, ids, mask):
        import torch

        with torch.no_grad():
            h = self.teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return h, self.teacher.get_output_embeddings().weight


@pytest.mark.parametrize("method", ["cascod", "cascod-kd"])
@pytest.mark.parametrize("truncate_first", [False, True])
def test_shared_rows_give_the_unshared_loss_and_gradients_in_float64(tok, method, truncate_first):
    """One row per pair (the rationale read off its answer row) is exact: in float64 the joint
    loss, its parts and every parameter gradient equal those of the unshared layout (2B rows,
    the authors' stacking), with and without a live teacher, also in a batch where one pair
    does not share. A misplaced EOS label, a wrong row index or a missing half of the gradient
    breaks the equality."""
    import torch
    from _tiny_lm import make_model

    from slmkd.config import load_config
    from slmkd.training.cascod import (
        CasCoDCollator,
        _cascod_kd_loss,
        _cascod_loss,
        cascod_joint_loss,
    )

    full = _pairs_dataset(tok)
    items = [full[i] for i in range(3)]
    if truncate_first:
        items[0] = _pairs_dataset(tok, max_length=len(full[0]["answer_input_ids"]) - 2)[0]
    cfg = load_config("tiny", overrides={"kd.max_logit_abs": 1e4, "cascod.alpha_cascod": 0.3},
                      environ={})
    model = make_model(tok, seed=3).double()
    teacher = make_model(tok, seed=4, hidden=48).double()
    if method == "cascod":
        trainer, fn = _StubTrainer(cfg, len(tok)), _cascod_loss
    else:
        trainer, fn = _StubKDTrainer(cfg, len(tok), teacher), _cascod_kd_loss
    results = []
    for share in (True, False):
        batch = CasCoDCollator(pad_token_id=tok.pad_token_id, share_rows=share)(items)
        batch.pop("example_id")
        model.zero_grad()
        loss, m = fn(trainer, model, batch, {})
        loss.backward()
        results.append((batch["input_ids"].shape[0], loss.detach(),
                        {k: v.detach() for k, v in m.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
    # the reference, built without the collator: rationale rows then answer rows, padded by hand
    seqs = [it["rationale_input_ids"] for it in items] + [it["answer_input_ids"] for it in items]
    labs = [it["rationale_labels"] for it in items] + [it["answer_labels"] for it in items]
    width = max(map(len, seqs))
    ids = torch.tensor([s_ + [tok.pad_token_id] * (width - len(s_)) for s_ in seqs])
    mask = torch.tensor([[1] * len(s_) + [0] * (width - len(s_)) for s_ in seqs])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labs])
    model.zero_grad()
    hs, w = trainer.student_hidden(model, ids, mask)
    ht, wt = trainer.teacher_hidden(ids[:3], mask[:3]) if method == "cascod-kd" else (None, None)
    ref = cascod_joint_loss(hs, w, labels, 3, alpha_cascod=0.3, teacher_hidden=ht,
                            teacher_weight=wt, temperature=trainer.temperature,
                            kd_alpha=trainer.alpha if ht is not None else 0.0,
                            max_logit_abs=1e4, vocab_size=len(tok))
    ref.loss.backward()
    results.append((6, ref.loss.detach(), {"rationale_ce": ref.rationale_ce.detach(),
                                           "answer_ce": ref.answer_ce.detach(),
                                           "kd": torch.as_tensor(ref.kd).detach()},
                    {n: p.grad.clone() for n, p in model.named_parameters()}))
    (rows_s, loss_s, m_s, g_s), (rows_u, loss_u, m_u, g_u), ref_r = results
    assert rows_s == (4 if truncate_first else 3) and rows_u == 6
    for _, loss_x, m_x, g_x in (results[1], ref_r):  # shared vs unshared and vs the reference
        loss_u, m_u, g_u = loss_x, m_x, g_x
        torch.testing.assert_close(loss_s, loss_u, rtol=1e-12, atol=1e-12)
        for k in ("rationale_ce", "answer_ce", "kd"):
            torch.testing.assert_close(m_s[k].double(), m_u[k].double(), rtol=1e-12, atol=1e-12)
        for name, g in g_u.items():
            # rtol 1e-6, not 1e-12: Qwen2RMSNorm computes in float32 whatever the model dtype,
            # so summing the two halves' gradients before or after the norms' backward differs
            # at float32 rounding (measured: <= 2^-32 absolute on gradients of ~0.1)
            torch.testing.assert_close(g_s[name], g, rtol=1e-6, atol=1e-9, msg=name)
    if method == "cascod-kd":
        assert float(m_s["kd"]) > 1e-3  # the teacher term is really there


# -- cascaded inference --------------------------------------------------------------------------
def test_cascaded_generate_appends_cue_then_answers(tok):
    from _tiny_lm import make_model

    from slmkd.generation import cascaded_generate, generate_batched

    model = make_model(tok, seed=5)
    prompts = [_prompt(tok, "What is 3 + 4?"), _prompt(tok, "What is 10 + 4 + 5?")]
    outs = cascaded_generate(model, tok, prompts, answer_cue="The answer is",
                             max_new_tokens_rationale=12, max_new_tokens_answer=5, batch_size=2,
                             show_progress=False)
    step1 = generate_batched(model, tok, prompts, max_new_tokens=12, batch_size=2,
                             show_progress=False)
    step2 = generate_batched(model, tok, [p + o.text.strip() + "\nThe answer is"
                                          for p, o in zip(prompts, step1, strict=True)],
                             max_new_tokens=5, batch_size=2, show_progress=False)
    for o, r, a in zip(outs, step1, step2, strict=True):
        assert o["rationale"] == r.text.strip()
        assert o["answer_text"] == a.text
        assert o["full_text"] == r.text.strip() + "\nThe answer is" + a.text
        assert o["num_new_tokens"] == r.num_new_tokens + a.num_new_tokens
        assert o["rationale_hit_max"] == r.hit_max_new_tokens


def _lora(model, seed=0):
    """``model`` wrapped in a LoRA adapter whose weights are random (not the no-op init), so the
    adapter visibly changes what the model generates."""
    import torch

    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=64, lora_dropout=0.0, init_lora_weights=False,
                          target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    return peft.get_peft_model(model, cfg)


def test_cascaded_generate_rationale_from_base_answer_from_adapter(tok):
    from _tiny_lm import make_model

    from slmkd.generation import cascaded_generate, generate_batched

    # a random "stage-1" model that writes varied text, and a random adapter on top of it
    model = _lora(_lora(make_model(tok, seed=5), seed=1).merge_and_unload(), seed=11)
    prompts = [_prompt(tok, "What is 3 + 4?"), _prompt(tok, "What is 10 + 4 + 5?"),
               _prompt(tok, "What is 1 + 1?")]
    kw = dict(batch_size=3, show_progress=False)
    with model.disable_adapter():
        base_r = generate_batched(model, tok, prompts, max_new_tokens=12, **kw)
    adapter_r = generate_batched(model, tok, prompts, max_new_tokens=12, **kw)
    # the toggle matters: with the adapter on the model writes other rationales
    assert all(o.text.strip() for o in base_r)
    assert [o.text for o in base_r] != [o.text for o in adapter_r]
    ctx = [p + o.text.strip() + "\nThe answer is" for p, o in zip(prompts, base_r, strict=True)]
    adapter_a = generate_batched(model, tok, ctx, max_new_tokens=5, **kw)
    with model.disable_adapter():
        base_a = generate_batched(model, tok, ctx, max_new_tokens=5, **kw)
    assert [o.text for o in adapter_a] != [o.text for o in base_a]

    outs = cascaded_generate(model, tok, prompts, answer_cue="The answer is",
                             max_new_tokens_rationale=12, max_new_tokens_answer=5, **kw)
    assert [o["rationale"] for o in outs] == [o.text.strip() for o in base_r]
    assert [o["answer_text"] for o in outs] == [o.text for o in adapter_a]
    # given rationales (the probe's teacher rationales): the answer step has the adapter on
    given = cascaded_generate(model, tok, prompts, rationales=[o["rationale"] for o in outs],
                              answer_cue="The answer is", max_new_tokens_rationale=12,
                              max_new_tokens_answer=5, **kw)
    assert [o["answer_text"] for o in given] == [o.text for o in adapter_a]
    # the adapter is on again afterwards
    again = generate_batched(model, tok, prompts, max_new_tokens=12, **kw)
    assert [o.text for o in again] == [o.text for o in adapter_r]


def test_error_propagation_counts(tok, monkeypatch):
    """A scripted student: its own rationale is wrong for the second question; it always reads
    the answer off whatever rationale it is given (the last number before the cue)."""
    import re

    import slmkd.generation.cascade as gen
    from slmkd.evaluation import error_propagation
    from slmkd.generation import GenerationOutput

    own = {"What is 3 + 4?": "3 + 4 = 7.", "What is 5 + 5?": "5 + 5 = 11."}

    def fake(model, tokenizer, prompts, *, max_new_tokens, batch_size, desc=None,
             show_progress=True):
        out = []
        for p in prompts:
            if p.endswith("The answer is"):
                last = re.findall(r"\d+", p.rsplit("\nThe answer is", 1)[0])[-1]
                out.append(GenerationOutput(f" {last}.", 3, False))
            else:
                q = next(q for q in own if q in p)
                out.append(GenerationOutput(own[q], 8, False))
        return out

    monkeypatch.setattr(gen, "generate_batched", fake)
    recs = [
        {"id": "1", "dataset": "gsm8k", "question": "What is 3 + 4?", "gold": "7",
         "completion": "3 + 4 = 7.\nThe answer is 7."},
        {"id": "2", "dataset": "gsm8k", "question": "What is 5 + 5?", "target": "10",
         "raw_output": "5 + 5 = 10.\nThe answer is 10."},
        {"id": "3", "dataset": "gsm8k", "question": "What is 5 + 5?", "gold": "10",
         "completion": "no marker here"},
    ]
    res = error_propagation(None, tok, recs, max_new_tokens_rationale=16, batch_size=4,
                            show_progress=False)
    assert res["n"] == 2 and res["skipped"] == {"split:marker_missing": 1}
    assert res["acc_teacher_rationale"] == 1.0 and res["acc_own_rationale"] == 0.5
    assert res["propagation_gap"] == 0.5
    assert (res["both_correct"], res["only_teacher_rationale"], res["only_own_rationale"],
            res["neither"]) == (1, 1, 0, 0)
    assert res["rows"][1]["own_rationale_pred"] == "11"
    assert res["own_generated"] == 2 and res["own_reused"] == 0


def test_error_propagation_reuses_stored_own_rows(tok, monkeypatch):
    """With the student's stored evaluation rows, only the answers given the teacher's
    rationale are generated; records without a stored row still get their own generated."""
    import re

    import slmkd.generation.cascade as gen
    from slmkd.evaluation import error_propagation
    from slmkd.generation import GenerationOutput

    calls: list[list[str]] = []

    def fake(model, tokenizer, prompts, *, max_new_tokens, batch_size, desc=None,
             show_progress=True):
        calls.append(list(prompts))
        out = []
        for p in prompts:
            if p.endswith("The answer is"):
                last = re.findall(r"\d+", p.rsplit("\nThe answer is", 1)[0])[-1]
                out.append(GenerationOutput(f" {last}.", 3, False))
            else:
                out.append(GenerationOutput("5 + 5 = 12.", 8, False))
        return out

    monkeypatch.setattr(gen, "generate_batched", fake)
    recs = [{"id": str(i), "dataset": "gsm8k", "question": f"What is {i} + 5?", "gold": str(i + 5),
             "completion": f"{i} + 5 = {i + 5}.\nThe answer is {i + 5}."} for i in range(4)]
    # the evaluator's rows: right for 0 and 2, wrong for 1 (2 has no raw_output-free fallback)
    stored = [{"id": "0", "raw_output": "0 + 5 = 5.\nThe answer is 5.", "rationale": "0 + 5 = 5."},
              {"id": "1", "raw_output": "1 + 5 = 7.\nThe answer is 7.", "rationale": "1 + 5 = 7."},
              {"id": "2", "full_text": "2 + 5 = 7.\nThe answer is 7."},
              {"id": "99", "raw_output": "unrelated"}]
    res = error_propagation(None, tok, recs, max_new_tokens_rationale=16, batch_size=8,
                            show_progress=False, own_rows=stored)
    n_gen = sum(len(c) for c in calls)
    rationale_calls = [p for c in calls for p in c if not p.endswith("The answer is")]
    # 4 teacher-rationale answers + record 3's own rationale and answer: 6 prompts, not 12
    assert n_gen == 6 and len(rationale_calls) == 1 and "What is 3 + 5?" in rationale_calls[0]
    assert res["own_reused"] == 3 and res["own_generated"] == 1
    assert res["acc_teacher_rationale"] == 1.0
    assert [r["own_rationale_correct"] for r in res["rows"]] == [True, False, True, False]
    assert res["rows"][1]["own_output"] == stored[1]["raw_output"]
    # a mapping id -> row works the same way and nothing is left to generate
    calls.clear()
    by_id = {r["id"]: r for r in stored} | {"3": {"raw_output": "3 + 5 = 8.\nThe answer is 8."}}
    res2 = error_propagation(None, tok, recs, max_new_tokens_rationale=16, batch_size=8,
                             show_progress=False, own_rows=by_id)
    assert sum(len(c) for c in calls) == 4 and res2["own_generated"] == 0
    assert res2["acc_own_rationale"] == 0.75


# -- stage 2 of cascod-2stage: data -------------------------------------------------------------
def test_stage2_dataset_mixes_student_rationales_with_gold_targets(tok):
    from slmkd.data import Record, build_prompt
    from slmkd.training.cascod import build_stage2_dataset, select_student_rationale_ids

    # the teacher's answers are off by one (kept anyway, e.g. keep_incorrect): gold != teacher
    recs = [{"id": f"r{i}", "dataset": "gsm8k", "task": None, "question": f"What is {i} + 4?",
             "gold": str(i + 4), "completion": f"{i} + 4 = {i + 5}.\nThe answer is {i + 5}."}
            for i in range(10)]
    ids = [r["id"] for r in recs]
    chosen = select_student_rationale_ids(ids, 0.5, seed=1)
    assert len(chosen) == 5 and chosen == select_student_rationale_ids(ids[::-1], 0.5, seed=1)
    assert select_student_rationale_ids(ids, 0.2, seed=1) < chosen  # nested across fractions
    assert select_student_rationale_ids(ids, 0.5, seed=2) != chosen
    assert select_student_rationale_ids(ids, 0.0, seed=1) == set()
    student = {rid: f"{rid} student says 99." for rid in chosen}
    ds, st = build_stage2_dataset(tok, recs, max_length=512, student_rationales=student)
    ref, _ = build_cascod_dataset(tok, recs, max_length=512, min_supervised_tokens=1, kind="answer")
    assert len(ds) == 10 and (st.student_rationale_rows, st.teacher_rationale_rows) == (5, 5)
    assert st.to_dict()["student_rationale_rows"] == 5
    for i, rec in enumerate(recs):
        item = ds[i]
        assert item["example_id"] == rec["id"]
        if rec["id"] in chosen:  # q + student rationale + cue -> the gold answer
            prompt = build_prompt(tok, Record(rec["id"], "gsm8k", None, "train", rec["question"],
                                              rec["gold"]))
            want = build_answer_example(tok, prompt, student[rec["id"]], rec["gold"], 512)
            assert item["input_ids"] == want.input_ids and item["labels"] == want.labels
            assert tok.decode(_supervised(want)[:-1]) == f" {i + 4}."
        else:  # exactly the teacher-rationale example of the joint method
            assert item == ref[i]
            assert tok.decode([t for t in item["labels"] if t != -100][:-1]) == f" {i + 5}."


def test_student_rationales_resume_without_duplicates(tok, tmp_path, monkeypatch):
    """Generated bucket by bucket into the store; an interrupted call keeps its finished buckets,
    a torn last line is dropped, a rerun generates only the missing ids (each id once), a
    complete store generates nothing, and a store of another model (meta) is regenerated."""
    import json

    from slmkd import generation
    from slmkd.generation import GenerationBatch, GenerationOutput
    from slmkd.training.staged import ensure_student_rationales, read_student_rationales

    calls: list[list[str]] = []
    stop_after = {"buckets": None}

    class Interrupted(Exception):
        pass

    def fake(model, tokenizer, prompts, *, max_new_tokens, batch_size, desc=None,
             show_progress=True):
        calls.append(list(prompts))
        for b, k in enumerate(range(0, len(prompts), batch_size)):
            if stop_after["buckets"] is not None and b >= stop_after["buckets"]:
                raise Interrupted
            idx = list(range(k, min(k + batch_size, len(prompts))))
            yield GenerationBatch(idx, [GenerationOutput(f" r({prompts[i]}) ", 3, False)
                                        for i in idx], 0.0)

    monkeypatch.setattr(generation, "iter_generate_batched", fake)
    items = [(f"id{i}", f"q{i}") for i in range(7)]
    path = tmp_path / "stage2" / "student_rationales.jsonl"
    kw = dict(max_new_tokens=8, batch_size=2, meta={"base": "a"}, show_progress=False)
    stop_after["buckets"] = 2
    with pytest.raises(Interrupted):
        ensure_student_rationales(None, tok, items, path, **kw)
    assert sorted(read_student_rationales(path)[0]) == ["id0", "id1", "id2", "id3"]
    with path.open("a") as f:
        f.write('{"id": "id4", "ratio')  # a write cut short by a crash
    assert read_student_rationales(path)[1] == 1

    stop_after["buckets"] = None
    calls.clear()
    out = ensure_student_rationales(None, tok, items + [("id0", "q0")], path, **kw)
    assert calls == [["q4", "q5", "q6"]]
    assert out == {f"id{i}": f"r(q{i})" for i in range(7)}
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert sorted(ids) == [f"id{i}" for i in range(7)]  # each once, no torn line
    calls.clear()
    assert ensure_student_rationales(None, tok, items[:3], path, **kw) == \
        {f"id{i}": f"r(q{i})" for i in range(3)}
    assert calls == []
    # another stage-1 model (or decoding setting): the old store is not reused
    out = ensure_student_rationales(None, tok, items[:3], path, **{**kw, "meta": {"base": "b"}})
    assert calls == [["q0", "q1", "q2"]] and len(path.read_text().splitlines()) == 3


# -- trainer registry ----------------------------------------------------------------------------
def test_methods_registered_with_the_trainer():
    pytest.importorskip("torch")
    from slmkd import training as T

    assert {"cascod", "cascod-2stage", "cascod-kd"} <= set(T.registered_methods())
    joint, kd, two = (T.get_method(m) for m in ("cascod", "cascod-kd", "cascod-2stage"))
    assert not joint.needs_teacher and kd.needs_teacher and not two.needs_teacher
    assert two.stages == ("cascod-stage1", "cascod-stage2")
    assert "cascod" in joint.config_sections and "kd" in kd.config_sections
    assert "kd" not in joint.config_sections  # KD schedules do not change a cascod run


# -- training end to end (tiny world of tests/_train_world.py) -----------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("slmkd.losses")
    from _train_world import build_world

    torch.set_num_threads(1)
    return build_world(tmp_path_factory.mktemp("cascodworld"), n_records=48)


def _cfg(world, **extra):
    from _train_world import make_cfg

    return make_cfg(world, **extra)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _subprocess_cascod(world, run_dir, env_extra, method="cascod", max_steps=6, **extra):
    """``train(method, max_steps, save_steps=2)`` in a child process (so it can be SIGKILLed):
    the test world's config (+ ``extra`` overrides), no CLI (the CLI's tiny profile would build
    the real tiny world)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    here = Path(__file__).resolve().parent
    pp = os.pathsep.join(x for x in (str(repo), os.environ.get("PYTHONPATH", "")) if x)
    env = {**os.environ, "PYTHONPATH": pp, "OMP_NUM_THREADS": "1", **env_extra}
    for k in [k for k in env if k.startswith("SLM_KD_")]:
        env.pop(k)
    code = (f"import sys; sys.path.insert(0, {str(here)!r}); import torch; "
            "torch.set_num_threads(1); from _train_world import make_cfg; "
            "from slmkd.training.staged import train; "
            f"train(make_cfg({str(world)!r}, **{extra!r}), {method!r}, 'student_small', 3, "
            f"run_dir={str(run_dir)!r}, max_steps={max_steps}, save_steps=2)")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cascod_train_and_kill9_resume_is_bit_identical(world, tmp_path):
    import torch

    from slmkd.training import FAULT_KILL_ENV, train
    from slmkd.training.monitor import read_log

    # uninterrupted reference, in process (also the end-to-end check of `cascod`)
    ref = train(_cfg(world), "cascod", "student_small", 3, run_dir=tmp_path / "ref",
                max_steps=6, save_steps=2)
    s = ref.summary
    assert s["method"] == "cascod" and s["steps"] == 6 and s["skipped_batches"] == 0
    assert s["data"]["kept"] == 48 and s["final_model_dir"] == "final"
    log = read_log(tmp_path / "ref" / "log.jsonl")
    assert all(e["loss"] > 0 for e in log if "loss" in e)
    init = _weights(world / "models" / "kdtest-student")
    w_ref = _weights(ref.final_dir)
    assert any(not torch.equal(init[k], w_ref[k]) for k in init)

    # killed with SIGKILL at the end of step 5 (checkpoint-4 on "Drive"), then resumed
    run = tmp_path / "killed"
    killed = _subprocess_cascod(world, run, {FAULT_KILL_ENV: "5"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (run / "train_summary.json").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "checkpoint-4"
    res = train(_cfg(world), "cascod", "student_small", 3, run_dir=run, max_steps=6,
                save_steps=2)
    assert res.summary["resumed_from"].endswith("checkpoint-4")
    w = _weights(res.final_dir)
    assert w.keys() == w_ref.keys()
    for k in w:
        assert torch.equal(w[k], w_ref[k]), k
    steps = [e["step"] for e in read_log(run / "log.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_cascod_kd_end_to_end(world, tmp_path):
    from slmkd.training import train

    res = train(_cfg(world), "cascod-kd", "student_small", 0, run_dir=tmp_path / "r",
                max_steps=2)
    s = res.summary
    assert s["method"] == "cascod-kd" and s["steps"] == 2 and s["teacher"]
    assert s["final_kd"] is not None and s["final_kd"] > 0
    assert (res.final_dir / "model.safetensors").is_file()


def _rationale_batch(cfg, tok, n=8):
    """A fixed batch of rationale examples (q -> r) of the world's records."""
    from slmkd.training.data import PaddingCollator, load_training_records

    ds, _ = build_cascod_dataset(tok, load_training_records(cfg)[0][:n], max_length=128,
                                 min_supervised_tokens=1, kind="rationale")
    return PaddingCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))])


def _answer_ce(model, batch):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lab = batch["labels"][:, 1:]
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab.reshape(-1),
                                 ignore_index=-100))


def test_cascod_2stage_keeps_the_stage1_rationale_step(world, tmp_path):
    """Stage 2 cannot erase stage 1: the final model's rationale step (what cascaded inference
    runs: adapter off) computes exactly stage 1's logits, while its answer step (adapter on) has
    learned (lower answer CE than stage 1). Fails on the first design (stage 2 = full fine-tuning
    of the same weights on q,r→a: a plain model whose rationale logits moved)."""
    import json
    import shutil

    import torch

    from slmkd.generation.cascade import rationale_model
    from slmkd.modeling import load_causal_lm, load_tokenizer
    from slmkd.training import is_run_complete
    from slmkd.training.data import PaddingCollator, load_training_records
    from slmkd.training.staged import train  # the entry point of staged methods

    cfg = _cfg(world)
    run = tmp_path / "two"
    res = train(cfg, "cascod-2stage", "student_small", 0, run_dir=run, max_steps=3)
    s = res.summary
    tok = load_tokenizer(str(run / "stage1" / "final"), cfg)
    batch = _rationale_batch(cfg, tok)
    kw = dict(device="cpu", dtype=torch.float32)
    stage1 = load_causal_lm(str(run / "stage1" / "final"), cfg, **kw)
    final = load_causal_lm(str(run / s["final_model_dir"]), cfg, **kw)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        want = stage1(input_ids=ids, attention_mask=mask).logits
        with rationale_model(final):
            got = final(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    # the answer step is the trained adapter: lower CE than stage 1 on q,r -> a
    a_ds, _ = build_cascod_dataset(tok, load_training_records(cfg)[0][:16], max_length=128,
                                   min_supervised_tokens=1, kind="answer")
    a_batch = PaddingCollator(tok.pad_token_id)([a_ds[i] for i in range(len(a_ds))])
    assert _answer_ce(final, a_batch) < _answer_ce(stage1, a_batch) - 0.02
    # cascaded inference on the loaded run: the rationales are stage 1's greedy ones
    from slmkd.data import build_prompt
    from slmkd.data.records import record_from_dict
    from slmkd.generation import cascaded_generate, generate_batched

    prompts = [build_prompt(tok, record_from_dict(r)) for r in load_training_records(cfg)[0][:3]]
    outs = cascaded_generate(final, tok, prompts, max_new_tokens_rationale=8,
                             max_new_tokens_answer=4, batch_size=3, show_progress=False)
    r1 = generate_batched(stage1, tok, prompts, max_new_tokens=8, batch_size=3, show_progress=False)
    assert [o["rationale"] for o in outs] == [o.text.strip() for o in r1]

    # layout: stage1/final + stage2/adapter (base recorded relative to the adapter folder)
    assert s["final_model_dir"] == "stage2/adapter" and is_run_complete(run)
    assert [st["method"] for st in s["stages"]] == ["cascod-stage1", "cascod-stage2"]
    adapter_cfg = json.loads((run / "stage2" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "../../stage1/final"
    s2 = s["stages"][1]["summary"]
    assert s2["adapter"]["learning_rate"] == cfg.cascod.stage2_learning_rate != cfg.train.learning_rate
    assert s2["steps"] == 3 and s2["data"]["student_rationale_rows"] == 24  # 0.5 of 48
    stored = (run / "stage2" / "student_rationales.jsonl").read_text().splitlines()
    assert len({json.loads(line)["id"] for line in stored}) == len(stored) == 24
    # rerunning a complete run does nothing
    again = train(cfg, "cascod-2stage", "student_small", 0, run_dir=run, max_steps=3)
    assert again.summary["steps"] == s["steps"] == 6
    # another stage-2 setting retrains stage 2 only (with --force), on the stored rationales
    from slmkd.training import RunConfigMismatchError

    cfg2 = _cfg(world, **{"cascod.stage2_learning_rate": 1e-3})
    with pytest.raises(RunConfigMismatchError, match="stage2_learning_rate"):
        train(cfg2, "cascod-2stage", "student_small", 0, run_dir=run, max_steps=3)
    before = (run / "stage2" / "student_rationales.jsonl").read_text()
    redo = train(cfg2, "cascod-2stage", "student_small", 0, run_dir=run, max_steps=3, force=True)
    r1, r2 = (st["summary"] for st in redo.summary["stages"])
    assert r1["wall_time_s"] == s["stages"][0]["summary"]["wall_time_s"]  # stage 1 untouched
    assert r2["adapter"]["learning_rate"] == 1e-3 and r2["wall_time_s"] != s2["wall_time_s"]
    assert (run / "stage2" / "student_rationales.jsonl").read_text() == before
    final = load_causal_lm(str(run / s["final_model_dir"]), cfg, **kw)

    # a run folder moved as a whole (a Drive folder renamed) still loads as stage 1 + adapter
    moved = tmp_path / "elsewhere" / "two"
    moved.parent.mkdir()
    shutil.move(str(run), str(moved))
    m2 = load_causal_lm(str(moved / s["final_model_dir"]), cfg, **kw)
    with torch.no_grad():
        assert torch.equal(m2(input_ids=ids, attention_mask=mask).logits,
                           final(input_ids=ids, attention_mask=mask).logits)
    assert load_tokenizer(str(moved / s["final_model_dir"]), cfg)("3 + 4")["input_ids"] == \
        tok("3 + 4")["input_ids"]


@pytest.mark.slow
def test_stage2_student_rationales_come_from_the_vllm_engine_before_training(world, tmp_path,
                                                                             monkeypatch):
    """When the evaluation backend resolves to vLLM, stage 2's student rationales are generated
    by an engine on ``stage1/final`` (adapter off), closed before the training model loads; the
    in-memory HF model then generates nothing. (A fake vLLM engine: HF on the same folder.)"""
    from slmkd import generation
    from slmkd.generation import batched, engines
    from slmkd.modeling import load_causal_lm
    from slmkd.training import staged
    from slmkd.training.staged import read_student_rationales, train

    opened: list[dict] = []

    class FakeVLLM(engines.HFEngine):
        backend = "vllm"

        def generate(self, prompts, *, max_new_tokens, adapter=True, **kw):
            opened[-1]["prompts"] += len(prompts)
            opened[-1]["adapter"].add(adapter)
            return super().generate(prompts, max_new_tokens=max_new_tokens, adapter=adapter, **kw)

        def close(self):
            opened[-1]["closed"] = True
            super().close()

    def fake_open(cfg, name, *, backend=None, tokenizer=None, **kw):
        assert backend == "vllm"
        opened.append({"name": str(name), "prompts": 0, "adapter": set(), "closed": False})
        return FakeVLLM(load_causal_lm(str(name), cfg, for_training=False), tokenizer,
                        batch_size=8)

    hf_calls: list[int] = []
    real_iter = generation.iter_generate_batched

    def counting_iter(model, *a, **kw):
        if not opened or opened[-1]["closed"]:  # the in-memory training model generating
            hf_calls.append(1)
        return real_iter(model, *a, **kw)

    load_calls: list[bool] = []
    assert not hasattr(staged, "load_causal_lm")  # imported at call time: patchable below
    import slmkd.modeling as modeling

    real_modeling_load = modeling.load_causal_lm

    def recording_load(name, cfg, *a, **kw):
        if str(name).endswith("final") and not kw.get("for_training", True):
            load_calls.append(bool(opened) and opened[-1]["closed"])
        return real_modeling_load(name, cfg, *a, **kw)

    monkeypatch.setattr(batched, "resolve_backend", lambda b: "vllm")
    monkeypatch.setattr(engines, "open_engine", fake_open)
    monkeypatch.setattr(generation, "iter_generate_batched", counting_iter)
    monkeypatch.setattr(modeling, "load_causal_lm", recording_load)
    cfg = _cfg(world, **{"cascod.stage2_student_rationale_fraction": 0.25})
    res = train(cfg, "cascod-2stage", "student_small", 0, run_dir=tmp_path / "two", max_steps=2)
    (eng,) = opened
    assert eng["name"].endswith("stage1/final") and eng["adapter"] == {False} and eng["closed"]
    stored, bad = read_student_rationales(tmp_path / "two" / "stage2" / "student_rationales.jsonl")
    assert bad == 0 and len(stored) == eng["prompts"] > 0
    import json

    s2 = json.loads((tmp_path / "two" / "stage2" / "train_summary.json").read_text())
    assert s2["data"]["student_rationale_rows"] == len(stored) == 12  # 25 % of 48
    assert res.run_dir == tmp_path / "two"
    assert hf_calls == []  # the training model generated nothing
    assert load_calls and all(load_calls)  # the stage-2 base loaded after the engine closed


def test_cascod_2stage_joint_stage1_is_the_joint_cascod_run(world, tmp_path):
    """``cascod.stage1_objective = "joint"``: stage 1 trains the joint CasCoD loss — its weights
    are bit-identical to a ``cascod`` run's (same seed, steps, config) — and stage 2 is the
    adapter on it; the default ("rationale") trains q -> r only and differs."""
    import torch

    from slmkd.training.run import train as train_single
    from slmkd.training.staged import stage_method, train

    cfg = _cfg(world, **{"cascod.stage1_objective": "joint"})
    assert stage_method(cfg, "cascod-stage1") == "cascod"
    res = train(cfg, "cascod-2stage", "student_small", 0, run_dir=tmp_path / "two", max_steps=3)
    assert [st["method"] for st in res.summary["stages"]] == ["cascod", "cascod-stage2"]
    joint = train_single(cfg, "cascod", "student_small", 0, run_dir=tmp_path / "joint",
                         max_steps=3)
    a = _weights(tmp_path / "two" / "stage1" / "final")
    b = _weights(joint.final_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    seq = train_single(_cfg(world), "cascod-stage1", "student_small", 0,
                       run_dir=tmp_path / "seq", max_steps=3)
    c = _weights(seq.final_dir)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "two" / res.summary["final_model_dir"]).is_dir()


def test_stage1_config_is_the_run_config_unless_stage1_has_its_own_budget(world):
    from slmkd.training.staged import stage1_config

    plain = _cfg(world, **{"cascod.stage1_epochs": None})
    assert stage1_config(plain) is plain  # old runs keep their identity and resume
    cfg = _cfg(world, **{"cascod.stage1_epochs": 5, "cascod.stage1_learning_rate": 1e-3})
    one = stage1_config(cfg)
    assert (one.train.epochs, one.train.learning_rate) == (5, 1e-3)
    assert (cfg.train.epochs, cfg.train.learning_rate) == (1, 3e-3)  # not mutated
    assert one.train.batch_size == cfg.train.batch_size and one.cascod == cfg.cascod


def test_cascod_2stage_stage1_trains_its_own_epochs_and_learning_rate(world, tmp_path):
    """Stage 1 runs ``cascod.stage1_epochs`` epochs at ``cascod.stage1_learning_rate`` (48
    pairs, batch 8: 6 steps per epoch), the adapter stage its own budget; the stage-1 run
    records the budget it trained with (so a changed stage-1 budget is a different run)."""
    import json

    from slmkd.training.staged import train

    cfg = _cfg(world, **{"cascod.stage1_epochs": 2, "cascod.stage1_learning_rate": 1e-3,
                         "cascod.stage2_max_steps": 2})
    run = tmp_path / "two"
    res = train(cfg, "cascod-2stage", "student_small", 0, run_dir=run, max_steps=-1)
    s1, s2 = (st["summary"] for st in res.summary["stages"])
    assert s1["steps"] == 2 * 6 and s2["steps"] == 2
    saved = json.loads((run / "stage1" / "config.json").read_text())
    assert saved["train"]["epochs"] == 2 and saved["train"]["learning_rate"] == 1e-3
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 1


def test_cascod_2stage_adapter_stage_kill9_resume_is_bit_identical(world, tmp_path):
    """Stage 2 (the adapter) killed with SIGKILL mid-way resumes from its checkpoint to the same
    adapter as an uninterrupted run; the stored student rationales are reused, not redone."""
    import json

    import torch
    from safetensors.torch import load_file

    from slmkd.training import FAULT_KILL_ENV
    from slmkd.training.staged import train

    extra = {"cascod.stage2_max_steps": 6}  # stage 1: 2 steps, so only stage 2 reaches step 5
    ref = train(_cfg(world, **extra), "cascod-2stage", "student_small", 3,
                run_dir=tmp_path / "ref", max_steps=2, save_steps=2)
    assert ref.summary["stages"][1]["summary"]["steps"] == 6
    run = tmp_path / "killed"
    killed = _subprocess_cascod(world, run, {FAULT_KILL_ENV: "5"}, method="cascod-2stage",
                                max_steps=2, **extra)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (run / "stage1" / "train_summary.json").is_file()
    assert not (run / "stage2" / "train_summary.json").exists()
    assert (run / "stage2" / "checkpoints" / "latest").read_text().strip() == "checkpoint-4"
    store = run / "stage2" / "student_rationales.jsonl"
    before = store.read_text()
    res = train(_cfg(world, **extra), "cascod-2stage", "student_small", 3, run_dir=run,
                max_steps=2, save_steps=2)
    s2 = res.summary["stages"][1]["summary"]
    assert s2["resumed_from"].endswith("checkpoint-4") and s2["steps"] == 6
    assert store.read_text() == before
    w = load_file(str(res.final_dir / "adapter_model.safetensors"))
    w_ref = load_file(str(ref.final_dir / "adapter_model.safetensors"))
    assert w.keys() == w_ref.keys() and w
    for k in w:
        assert torch.equal(w[k], w_ref[k]), k
    assert json.loads((res.final_dir / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "../../stage1/final"


def test_with_the_qwen2_tokenizer_every_gsm8k_and_bbh_pair_shares_one_row():
    """The real path: with Qwen2's tokenizer the rationale example is a token prefix of the
    answer example for every GSM8K train item (gold solutions written as CoTs: the vendored
    subset, and all 7,470 splittable items when ``../shared`` is there) and for every BBH CoT
    exemplar, so CasCoD's step runs one row per pair (what ``slmkd plan`` assumes). (The tiny
    world's tokenizer merges across the prompt/rationale boundary: its pairs take two rows.)"""
    import json
    import re
    from pathlib import Path

    from transformers import AutoTokenizer

    here = Path(__file__).parent
    tok = AutoTokenizer.from_pretrained(here / "fixtures" / "qwen2-tokenizer")
    shared = here.resolve().parents[1] / "shared" / "data"
    gsm = shared / "gsm8k" / "train.jsonl"
    gsm = gsm if gsm.is_file() else here / "fixtures" / "gsm8k" / "train.jsonl"
    bbh = shared / "bbh" / "cot-prompts"
    bbh = bbh if bbh.is_dir() else here / "fixtures" / "bbh" / "cot-prompts"
    recs = []
    for i, line in enumerate(gsm.read_text().splitlines()):
        d = json.loads(line)
        sol, ans = d["answer"].split("####")
        cot = re.sub(r"<<.*?>>", "", sol).strip() + f"\nThe answer is {ans.strip()}."
        recs.append({"id": f"g{i}", "dataset": "gsm8k", "task": None, "question": d["question"],
                     "answer": ans.strip(), "completion": cot})
    for f in sorted(bbh.glob("*.txt")):
        for j, block in enumerate(f.read_text().split("\n\nQ: ")[1:]):
            if "A: Let's think step by step." in block:
                q, a = block.split("A: Let's think step by step.", 1)
                recs.append({"id": f"{f.stem}{j}", "dataset": "gsm8k", "task": None,
                             "question": q.strip(), "answer": "", "completion": a.strip()})
    ds, stats = build_cascod_dataset(tok, recs, max_length=2048, min_supervised_tokens=1)
    assert stats.kept >= 0.99 * len(recs) and stats.kept > 50
    assert stats.shared_rows == stats.kept, stats.summary()
