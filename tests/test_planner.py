"""VRAM planner: parameter counts, the activation model, the breakdown and the recommendation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from slmkd.config import load_config
from slmkd.planner import (
    GIB,
    PRESETS,
    ModelSpec,
    TrainSetup,
    _activation_bytes_per_token_layer,
    estimate_memory,
    model_spec,
    plan_for_config,
    recommend_batch,
    setup_from_config,
)


def _qwen2(hidden=64, layers=2, heads=4, kv=2, inter=160, vocab=300, tie=True):
    cfg = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                      tie_word_embeddings=tie)
    cfg._attn_implementation = "sdpa"
    return cfg


@pytest.mark.parametrize("kw", [{}, {"tie": False}, {"kv": 4}, {"heads": 8, "kv": 1, "layers": 3}])
def test_param_count_matches_transformers(kw):
    cfg = _qwen2(**kw)
    model = Qwen2ForCausalLM(cfg)
    assert ModelSpec.from_config(cfg).num_params == sum(p.numel() for p in model.parameters())


def test_presets_match_published_sizes():
    # Qwen2.5 model cards: 7.61B, 3.09B, 1.54B, 0.49B parameters.
    assert PRESETS["qwen2.5-7b"].num_params == 7_615_616_512
    assert PRESETS["qwen2.5-3b"].num_params == 3_085_938_688
    assert PRESETS["qwen2.5-1.5b"].num_params == 1_543_714_304
    assert round(PRESETS["qwen2.5-0.5b"].num_params / 1e9, 2) == 0.49


def test_model_spec_resolution(tmp_path):
    assert model_spec("Qwen/Qwen2.5-3B-Instruct") is PRESETS["qwen2.5-3b"]
    assert model_spec("Qwen2.5-1.5B") is PRESETS["qwen2.5-1.5b"]
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_qwen2(hidden=32, heads=2, kv=1).to_dict()))
    spec = model_spec(str(folder))
    assert spec.name == "my-model" and spec.hidden_size == 32 and spec.num_kv_heads == 1
    assert model_spec(str(folder / "config.json")).num_params == spec.num_params
    with pytest.raises(ValueError, match="config.json"):
        model_spec("meta-llama/Unknown-13B")
    with pytest.raises(ValueError, match="lacks the field"):
        ModelSpec.from_config({"hidden_size": 8})


def test_tiny_spec_from_profile_and_from_built_config(tmp_path):
    cfg = load_config("tiny", overrides={"drive_root": str(tmp_path)}, environ={})
    spec = model_spec("tiny-qwen2-student-m", cfg)
    assert spec.hidden_size == cfg.tiny.student_m_hidden
    assert spec.num_layers == cfg.tiny.student_m_layers
    teacher = model_spec("tiny-qwen2-teacher", cfg)
    assert teacher.vocab_size > spec.vocab_size  # teacher rows > student rows, as in the world
    built = tmp_path / "tiny" / "models" / "tiny-qwen2-student-m"
    built.mkdir(parents=True)
    (built / "config.json").write_text(json.dumps(_qwen2(hidden=48, heads=4, kv=2).to_dict()))
    assert model_spec("tiny-qwen2-student-m", cfg).hidden_size == 48  # the real config wins


@pytest.mark.parametrize("dtype,padded,autocast", [
    (torch.bfloat16, False, False), (torch.bfloat16, True, False), (torch.float32, True, False),
    (torch.float32, True, True)])
def test_activation_model_matches_saved_tensors(dtype, padded, autocast):
    """The per-token activation formula against what autograd really saves (CPU, SDPA), for pure
    bf16/fp32 models and for fp32 weights under bf16 autocast (what slmkd.trainer runs)."""
    torch.manual_seed(0)
    cfg = _qwen2(hidden=128, layers=2, heads=8, kv=2, inter=352, vocab=500)
    model = Qwen2ForCausalLM(cfg).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    b, s = 2, 48
    ids = torch.randint(0, 500, (b, s))
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, -5:] = 0
    saved: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids, attention_mask=mask if padded else None)
    measured = sum(saved.values())
    spec = ModelSpec.from_config(cfg)
    if autocast:
        setup = TrainSetup(batch_size=b, seq_len=s, act_bytes=2, param_bytes=4, padded=padded)
        # the bf16 weight copies autocast keeps: what the planner counts separately
        measured -= 2 * spec.linear_params()
        final_norm = 4 * 2 * spec.hidden_size
    else:
        a = 2 if dtype == torch.bfloat16 else 4
        setup = TrainSetup(batch_size=b, seq_len=s, act_bytes=a, param_bytes=a, autocast=False,
                           padded=padded)
        final_norm = (4 + 2 * a) * spec.hidden_size
    a = setup.act_bytes
    est = (spec.num_layers * _activation_bytes_per_token_layer(spec, setup) * b * s
           + final_norm * b * s + (b * s * s * a if padded else 0))
    assert measured == pytest.approx(est, rel=0.04)


def _peak_parts(e):
    c = e.components
    persistent = c["student weights"] + c["optimizer states"] + c.get("teacher weights", 0)
    return persistent, c


def test_breakdown_is_consistent_and_options_move_it_the_right_way():
    base = TrainSetup(method="kd", batch_size=4, seq_len=1024, gradient_checkpointing=False)
    e = estimate_memory("Qwen2.5-1.5B", "Qwen2.5-7B", base)
    persistent, c = _peak_parts(e)
    assert persistent < e.peak_allocated < persistent + sum(
        v for k, v in c.items() if k not in ("student weights", "optimizer states",
                                             "teacher weights"))
    # fp32 master weights (slmkd.trainer) with AdamW's two fp32 states; bf16 teacher
    assert c["student weights"] == 4 * PRESETS["qwen2.5-1.5b"].num_params
    assert c["optimizer states"] == 8 * PRESETS["qwen2.5-1.5b"].num_params
    assert c["teacher weights"] == 2 * PRESETS["qwen2.5-7b"].num_params
    assert c["autocast weight copies"] > 0
    bf16 = estimate_memory("Qwen2.5-1.5B", None, base, method="sft", param_bytes=2)
    assert bf16.components["optimizer states"] == 4 * PRESETS["qwen2.5-1.5b"].num_params
    assert bf16.components["autocast weight copies"] == 0
    assert e.total > e.peak_allocated  # CUDA context + fragmentation on top

    ckpt = estimate_memory("Qwen2.5-1.5B", "Qwen2.5-7B", base, gradient_checkpointing=True)
    assert ckpt.components["activations"] < c["activations"] / 5
    q4 = estimate_memory("Qwen2.5-1.5B", "Qwen2.5-7B", base, teacher_4bit=True)
    assert 2.0 < c["teacher weights"] / q4.components["teacher weights"] < 4.0
    adam8 = estimate_memory("Qwen2.5-1.5B", "Qwen2.5-7B", base, optim="adamw_bnb_8bit")
    # 2 B/param, except the embedding the HF Trainer keeps in 32-bit states (8 B/param)
    spec = PRESETS["qwen2.5-1.5b"]
    emb = spec.vocab_size * spec.hidden_size
    assert adam8.components["optimizer states"] == 2 * (spec.num_params - emb) + 8 * emb
    lora = estimate_memory("Qwen2.5-1.5B", "Qwen2.5-7B", base, lora=True, lora_r=16)
    assert lora.components["optimizer states"] < c["optimizer states"] / 20
    bigger = estimate_memory("Qwen2.5-1.5B", "Qwen2.5-7B", base, batch_size=8)
    assert bigger.peak_allocated > e.peak_allocated
    sft = estimate_memory("Qwen2.5-1.5B", "Qwen2.5-7B", base, method="sft")
    assert "teacher weights" not in sft.components and sft.teacher is None
    assert "peak allocated" in e.table() and "teacher" in e.table()


def test_bad_setup_is_rejected():
    with pytest.raises(ValueError, match="method"):
        TrainSetup(method="distill")
    with pytest.raises(ValueError, match="optimizer"):
        TrainSetup(optim="lion")
    with pytest.raises(ValueError, match="batch_size"):
        TrainSetup(batch_size=0)


def test_recommendation_keeps_effective_batch_and_fits():
    setup = TrainSetup(method="kd", seq_len=1024, gradient_checkpointing=True, teacher_4bit=True,
                       optim="adamw_torch_fused")
    r40 = recommend_batch("Qwen2.5-1.5B", "Qwen2.5-7B", setup, 16, 40)
    r80 = recommend_batch("Qwen2.5-1.5B", "Qwen2.5-7B", setup, 16, 80)
    for r in (r40, r80):
        assert r.fits and r.batch_size * r.grad_accum_steps == 16
        assert r.estimate.total <= 0.92 * r.gpu_gib * GIB
    assert r40.batch_size <= r80.batch_size
    # larger micro-batches than the recommendation would not fit on the 40 GB card
    if r40.batch_size < 16:
        nxt = [d for d in (2, 4, 8, 16) if d > r40.batch_size][0]
        over = estimate_memory("Qwen2.5-1.5B", "Qwen2.5-7B", setup, batch_size=nxt)
        assert not over.fits(40 * GIB)
    # nothing fits: the advice names the memory savers still off
    r = recommend_batch("Qwen2.5-7B", "Qwen2.5-7B", TrainSetup(gradient_checkpointing=False),
                        16, 40)
    assert not r.fits and "gradient checkpointing" in r.advice and "4-bit" in r.advice


def test_plan_for_config_profiles():
    cfg = load_config("a100-80g", environ={})
    plan = plan_for_config(cfg, method="kd", gpu=("A100-SXM4-80GB", 79.2))
    d = plan.to_dict()
    assert d["effective_batch"] == cfg.train.batch_size * cfg.train.grad_accum_steps
    assert [r["gpu_gb"] for r in d["recommendations"]] == [40, 80]
    assert d["estimate"]["student"] == "Qwen2.5-3B-Instruct"
    assert "this GPU" in plan.summary()
    json.dumps(d)  # serialisable
    tiny = plan_for_config(load_config("tiny", environ={}), method="sft")
    assert tiny.estimate.total_gib < 2 and tiny.recommendations[0].fits


def test_benchmark_script_runs_on_cpu(tmp_path, capsys):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "planner_vs_measured.py"
    spec = importlib.util.spec_from_file_location("planner_vs_measured", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    rows = mod.main(["--estimate-only", "--out", str(tmp_path / "rows.json")])
    assert len(rows) == 3 and all(r["measured_gib"] is None for r in rows)
    assert rows[1]["estimate_gib"] > rows[0]["estimate_gib"]  # KD adds the teacher
    assert rows[2]["estimate_gib"] < rows[1]["estimate_gib"]  # checkpointing saves memory
    assert "estimates only" in capsys.readouterr().out
    assert json.loads((tmp_path / "rows.json").read_text()) == rows


def test_14b_escalation_preset():
    # Qwen2.5-14B-Instruct model card: 14.7B parameters, 13.1B non-embedding, 48 layers, 40/8 heads
    spec = model_spec("Qwen/Qwen2.5-14B-Instruct")
    assert spec is PRESETS["qwen2.5-14b"] and spec.num_layers == 48 and spec.num_kv_heads == 8
    assert round(spec.num_params / 1e9, 2) == 14.77
    assert round((spec.num_params - spec.embedding_params()) / 1e9, 1) == 13.2  # card: 13.1B
    e = estimate_memory("Qwen2.5-3B", spec, TrainSetup(method="kd"))
    assert e.components["teacher weights"] == 2 * spec.num_params


def test_bnb_embedding_states_add_1_7_gib_for_3b():
    base = TrainSetup(method="sft", optim="adamw_bnb_8bit")
    e = estimate_memory("Qwen2.5-3B", None, base)
    spec = PRESETS["qwen2.5-3b"]
    plain = 2 * spec.num_params
    assert (e.components["optimizer states"] - plain) / GIB == pytest.approx(1.74, abs=0.01)
    assert any("32-bit" in n for n in e.notes)
    lora = estimate_memory("Qwen2.5-3B", None, base, lora=True)  # embeddings frozen under LoRA
    assert lora.components["optimizer states"] == 2 * spec.lora_params(16)


def test_cascod_shares_rows_and_reads_them_twice_in_one_loss_call():
    base = TrainSetup(method="sft", batch_size=4, seq_len=512, grad_accum_steps=4,
                      optim="adamw_torch_fused")
    sft = estimate_memory("Qwen2.5-1.5B", None, base)
    cas = estimate_memory("Qwen2.5-1.5B", None, base, method="cascod")
    spec = PRESETS["qwen2.5-1.5b"]
    assert cas.setup.rows_per_example == 1 and sft.setup.rows_per_example == 1
    assert cas.setup.loss_rows_per_example == 2 and sft.setup.loss_rows_per_example == 1
    assert cas.components["hidden states for the loss"] == 2 * sft.components[
        "hidden states for the loss"]
    assert cas.components["activations"] == sft.components["activations"]
    assert cas.components["recomputed layer (ckpt)"] == sft.components["recomputed layer (ckpt)"]
    assert sft.components["loss lm_head grad buffer"] == 4 * spec.vocab_size * spec.hidden_size
    assert cas.components["loss lm_head grad buffer"] == sft.components["loss lm_head grad buffer"]
    assert cas.peak_allocated > sft.peak_allocated


def test_cached_teacher_drops_the_teacher_for_its_top_k_rows():
    base = TrainSetup(method="kd", batch_size=4, seq_len=1024)
    live = estimate_memory("Qwen2.5-3B", "Qwen2.5-7B", base)
    cached = estimate_memory("Qwen2.5-3B", "Qwen2.5-7B", base, teacher_source="cached")
    assert "teacher weights" not in cached.components
    assert cached.components["teacher cache (top-k rows)"] == 4 * 1024 * (64 * 6 + 3 * 4)
    assert live.total - cached.total > 14 * GIB  # the bf16 7B teacher
    assert "cached" in cached.teacher and "cached" in cached.table()
    assert not cached.setup.loads_teacher and cached.setup.uses_teacher
    with pytest.raises(ValueError, match="teacher_source"):
        TrainSetup(teacher_source="disk")
    r = recommend_batch("Qwen2.5-7B", "Qwen2.5-7B", TrainSetup(), 16, 40)
    assert "cached teacher" in r.advice


def test_accumulation_keeps_gradients_resident():
    """With grad_accum 1 no gradient is alive during the forward pass: a large student fits a
    smaller card at micro-batch = effective batch; the backward's end (all gradients + the last
    recomputed layer) is then the peak."""
    spec = PRESETS["qwen2.5-3b"]
    one = estimate_memory("Qwen2.5-3B", None, TrainSetup(method="sft", batch_size=16,
                                                         grad_accum_steps=1,
                                                         optim="adamw_bnb_8bit"))
    acc = estimate_memory("Qwen2.5-3B", None, TrainSetup(method="sft", batch_size=4,
                                                         grad_accum_steps=4,
                                                         optim="adamw_bnb_8bit"))
    persistent = one.components["student weights"] + one.components["optimizer states"]
    late = one.components["gradients"] + one.components["recomputed layer (ckpt)"]
    assert one.peak_allocated >= persistent + late
    assert one.components["gradients"] == 4 * spec.num_params
    assert one.total < acc.total


def test_setup_from_config_reads_the_cache_settings():
    cfg = load_config("a100-80g", environ={})
    assert setup_from_config(cfg, "kd").teacher_source == "live"
    cfg.kd.teacher_source = "cached"  # the field of the teacher-cache issue (read with getattr)
    cfg.kd.cache_top_k = 32
    s = setup_from_config(cfg, "kd")
    assert s.teacher_source == "cached" and s.cache_top_k == 32
    assert s.cache_temperatures == len(cfg.kd.temperature_schedule)


def test_benchmark_token_stats(tmp_path):
    """``--token-stats`` recomputes the token constants of slmkd.study_plan (a few items here)."""
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    data = root.parent / "shared" / "data"
    if not (data / "qwen2-tokenizer").is_dir() or not (data / "bbh").is_dir():
        pytest.skip("shared/data (Qwen2 tokenizer, GSM8K, BBH) not present")
    path = root / "benchmarks" / "planner_vs_measured.py"
    spec = importlib.util.spec_from_file_location("planner_vs_measured_tok", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    (stats,) = mod.main(["--token-stats", "--limit", "40", "--out", str(tmp_path / "t.json")])
    from slmkd.study_plan import CONSTANTS

    assert set(stats) <= set(CONSTANTS)
    assert 60 < stats["gsm8k_prompt_tokens_mean"] < 200 and stats["bbh_prompt_tokens_mean"] > 300
    assert stats["len_tail_b1"] == 1.0 and stats["len_tail_b64"] > stats["len_tail_b4"] > 1
    assert stats["bbh_completion_tokens_mean"] == pytest.approx(
        CONSTANTS["bbh_completion_tokens_mean"].value, abs=0.1)  # all 81 exemplars, any limit
