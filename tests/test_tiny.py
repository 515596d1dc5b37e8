"""The tiny offline world: tokenizer, Qwen2 models, cached build, teacher pretraining mechanics.

Uses a very short schedule (a 1-layer teacher, 25 steps): it checks the pipeline and that the loss
falls, not the teacher's competence (that is measured by the full build; docs/TINY_CALIBRATION.md).
"""

from __future__ import annotations

import json

import pytest

from slmkd.config import load_config
from slmkd.tiny import (
    IM_END,
    IM_START,
    MODEL_NAMES,
    PAD_TOKEN,
    STUDENT_M_NAME,
    STUDENT_S_NAME,
    TEACHER_NAME,
    WORLD_MARKER,
    ensure_tiny_world,
    extract_final_number,
    load_tiny_world,
    warmup_cosine,
)

FAST = {
    "tiny.num_train": 240, "tiny.num_test": 12, "tiny.teacher_pretrain_steps": 25,
    "tiny.teacher_batch_size": 16, "tiny.teacher_hidden": 48, "tiny.teacher_layers": 1,
    "tiny.teacher_heads": 4, "tiny.teacher_intermediate": 96, "tiny.student_m_hidden": 32,
    "tiny.student_m_layers": 1, "tiny.student_s_hidden": 16, "tiny.student_s_layers": 1,
    "tiny.max_new_tokens": 8, "tiny.num_threads": 1,
}


def fast_cfg(root, **extra):
    return load_config("tiny", overrides={"drive_root": str(root), **FAST, **extra}, environ={})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("drive")
    return fast_cfg(root), ensure_tiny_world(fast_cfg(root), progress=False)


def test_layout_and_teacher_eval(world) -> None:
    cfg, w = world
    assert w.root.name == "tiny" and (w.root / WORLD_MARKER).is_file()
    assert w.train_path.is_file() and w.test_path.is_file()
    assert len(w.train_path.read_text().splitlines()) == 240
    report = json.loads(w.teacher_eval_path.read_text())
    assert report["n"] == 12 and 0.0 <= report["accuracy"] == w.teacher_accuracy <= 1.0
    assert report["steps"] == 25 and report["train_seconds"] > 0
    assert report["final_loss"] < report["first_loss"] - 1.0  # CE falls from ~ln(V)
    for name in MODEL_NAMES:
        assert (w.model_dir(name) / "tokenizer.json").is_file()
        assert not w.model_dir(name).with_name(name + ".tmp").exists()


def test_tokenizer_specials_digits_and_chat_template(world) -> None:
    from transformers import AutoTokenizer

    _, w = world
    tok = AutoTokenizer.from_pretrained(w.tokenizer_dir)
    assert tok.pad_token == PAD_TOKEN and tok.eos_token == IM_END
    assert tok.convert_tokens_to_ids([PAD_TOKEN, IM_START, IM_END]) == [0, 1, 2]
    ids = tok("Tom has 1234 coins.", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["1", "2", "3", "4"]
    assert tok.decode(ids) == "Tom has 1234 coins."
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    full = tok.apply_chat_template([{"role": "system", "content": "S"},
                                    {"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "a"}], tokenize=False)
    assert full == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
                    "<|im_start|>assistant\na<|im_end|>\n")


def test_models_load_like_hub_models_with_the_real_row_mismatch(world) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, w = world
    tok_len = len(AutoTokenizer.from_pretrained(w.tokenizer_dir))
    models = {n: AutoModelForCausalLM.from_pretrained(w.model_dir(n)) for n in MODEL_NAMES}
    rows = {n: m.get_input_embeddings().weight.shape[0] for n, m in models.items()}
    assert rows[TEACHER_NAME] > rows[STUDENT_M_NAME] == rows[STUDENT_S_NAME] > tok_len
    assert all(m.config.model_type == "qwen2" for m in models.values())
    n_params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    assert n_params[TEACHER_NAME] > n_params[STUDENT_M_NAME] > n_params[STUDENT_S_NAME]
    eos = models[STUDENT_S_NAME].generation_config.eos_token_id
    assert 2 in (eos if isinstance(eos, list) else [eos])
    out = models[STUDENT_S_NAME](input_ids=torch.tensor([[1, 5, 9]]))
    assert out.logits.shape == (1, 3, rows[STUDENT_S_NAME])


def test_cached_world_is_reused_and_partial_world_is_rebuilt(world, tmp_path) -> None:
    cfg, w = world
    marker = w.root / WORLD_MARKER
    before = marker.stat().st_mtime_ns
    assert ensure_tiny_world(cfg, progress=False) == w
    assert marker.stat().st_mtime_ns == before  # nothing rebuilt
    assert load_tiny_world(w.root, "other-fingerprint") is None

    root = tmp_path / "partial"
    small = fast_cfg(root, **{"tiny.teacher_pretrain_steps": 2, "tiny.num_train": 40,
                              "tiny.num_test": 2, "tiny.max_new_tokens": 2})
    built = ensure_tiny_world(small, progress=False)
    (built.root / WORLD_MARKER).unlink()  # as if interrupted before the marker
    assert load_tiny_world(built.root) is None
    rebuilt = ensure_tiny_world(small, progress=False)
    assert (rebuilt.root / WORLD_MARKER).is_file() and load_tiny_world(built.root) == rebuilt


def test_helpers() -> None:
    assert extract_final_number("a\nThe answer is 1,234.") == "1234"
    assert extract_final_number("The answer is 3. The answer is 4.") == "4"
    assert extract_final_number("no answer") is None
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.1)


def test_every_stage_tokenizes_exactly_like_the_teacher_was_trained(world) -> None:
    """Regression: transformers 5's AutoTokenizer maps model_type qwen2 to Qwen2Tokenizer, which
    rebuilds the pre-tokenizer; slmkd.modeling.load_tokenizer must keep tokenizer.json as saved."""
    from transformers import PreTrainedTokenizerFast

    from slmkd.modeling import load_tokenizer

    _, w = world
    reference = PreTrainedTokenizerFast(tokenizer_file=str(w.tokenizer_dir / "tokenizer.json"))
    text = "After buying: 14 + 7 = 21 apples.\nThe answer is 21."
    for d in [w.tokenizer_dir] + [w.model_dir(n) for n in MODEL_NAMES]:
        tok = load_tokenizer(str(d))
        assert tok(text, add_special_tokens=False)["input_ids"] == \
            reference(text, add_special_tokens=False)["input_ids"], d
        assert tok.eos_token == IM_END and tok.pad_token == PAD_TOKEN and tok.chat_template
