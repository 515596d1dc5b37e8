"""Generation engines: one loaded model, reused for every call, released on :meth:`close`.

An engine is opened once per model and serves every dataset (and both steps of CasCoD's
cascaded decoding) before it is closed; only then is the next model loaded. This matters for
vLLM: a ``vllm.LLM`` reserves ``gpu_memory_utilization`` of the card for its KV cache until its
engine core is shut down, so a second engine next to a live one cannot start::

    with open_engine(cfg, "runs/kd/.../final") as eng:          # loaded once
        for ds in ("gsm8k", "bbh"):
            outs = eng.generate(prompts[ds], max_new_tokens=512)
    # closed: vLLM's engine core is shut down, its GPU memory released

* :class:`HFEngine` — a loaded ``transformers`` model (a ``PeftModel`` for ``cascod-2stage``)
  through :func:`slmkd.generation.generate_batched` (length-bucketed, greedy);
  ``adapter=False`` runs the base weights (``disable_adapter``).
* :class:`VLLMEngine` — ``vllm.LLM`` (greedy, continuous batching); an adapter folder is served
  as its base model + a LoRA (``enable_lora``; ``adapter=False`` = no ``LoRARequest``, i.e. the
  base weights). :meth:`VLLMEngine.close` shuts the engine core down (its worker process exits),
  then frees what this process holds.

Both return :class:`~slmkd.generation.GenerationOutput` in prompt order and call ``on_batch``
with each finished :class:`~slmkd.generation.GenerationBatch` (the evaluator appends its rows).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Sequence
from typing import Any

from slmkd.generation.batched import GenerationBatch, GenerationOutput

logger = logging.getLogger(__name__)

__all__ = ["EngineSlot", "HFEngine", "LazyEngine", "VLLMEngine", "is_engine",
           "load_generation_tokenizer", "open_engine", "release_cuda_memory", "same_architecture",
           "vllm_llm_kwargs", "vllm_target"]


def release_cuda_memory() -> None:
    """``gc.collect()`` then ``torch.cuda.empty_cache()`` (when CUDA is there)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


class _Engine:
    backend = "?"
    tokenizer: Any = None
    closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"this {self.backend} engine is closed")


class HFEngine(_Engine):
    """A loaded HF causal LM (and its tokenizer) with :func:`iter_generate_batched`."""

    backend = "hf"

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, int(batch_size)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, adapter: bool = True,
                 desc: str | None = None, on_batch: Callable[[GenerationBatch], None] | None = None,
                 show_progress: bool = True) -> list[GenerationOutput]:
        from slmkd import generation  # through the package: a test replaces a decoder there
        from slmkd.generation.cascade import rationale_model

        self._check_open()
        results: list[GenerationOutput | None] = [None] * len(prompts)
        with rationale_model(self.model) if not adapter else contextlib.nullcontext():
            for b in generation.iter_generate_batched(self.model, self.tokenizer, list(prompts),
                                           max_new_tokens=max_new_tokens,
                                           batch_size=self.batch_size, desc=desc,
                                           show_progress=show_progress):
                for i, o in zip(b.indices, b.outputs, strict=True):
                    results[i] = o
                if on_batch is not None:
                    on_batch(b)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.model = None
        self.closed = True
        release_cuda_memory()


class VLLMEngine(_Engine):
    """``vllm.LLM`` over ``model_path`` (greedy), optionally with one LoRA adapter.

    ``submit_size`` prompts are handed to vLLM per ``generate`` call (vLLM batches them itself;
    each chunk is one ``on_batch`` callback, i.e. one append to ``predictions.jsonl``).
    ``llm_kwargs`` go to ``vllm.LLM`` (``gpu_memory_utilization``, ``max_model_len``, ``dtype``,
    ``enforce_eager``, ...). ``llm`` may be passed (tests: a fake).
    """

    backend = "vllm"

    def __init__(self, model_path: str, tokenizer: Any, *, adapter_path: str | None = None,
                 lora_rank: int = 16, submit_size: int | None = None,
                 llm_kwargs: dict[str, Any] | None = None, llm: Any = None) -> None:
        self.tokenizer = tokenizer
        self.submit_size = submit_size
        self.model_path = str(model_path)
        self.adapter_path = adapter_path
        self._lora = None
        self._lora_id = 0
        kw = dict(llm_kwargs or {})
        self.quantized = bool(kw.get("quantization"))
        self.max_lora_rank = max(8, int(lora_rank)) if adapter_path is not None else 0
        if adapter_path is not None:
            kw.update(enable_lora=True, max_loras=1, max_lora_rank=self.max_lora_rank)
        if llm is None:
            import vllm

            llm = vllm.LLM(model=str(model_path), **kw)
        self.llm = llm
        self.switches = 0
        if adapter_path is not None:
            self._set_lora(str(adapter_path))

    def _set_lora(self, adapter_path: str) -> None:
        from vllm.lora.request import LoRARequest

        self._lora_id += 1  # a new id: vLLM caches adapters by id
        self._lora = LoRARequest(f"adapter{self._lora_id}", self._lora_id, adapter_path)
        self.adapter_path = adapter_path

    def switch_to(self, model_path: str, tokenizer: Any, *, adapter_path: str | None = None,
                  lora_rank: int = 16) -> bool:
        """Serve another model from this engine, without a restart (no second engine start:
        weights, CUDA graphs, KV-cache profiling), when that is exact:

        * an adapter on the same base (this engine serves adapters): the next ``LoRARequest``;
        * a full model of the same architecture (:func:`same_architecture`; neither quantised):
          vLLM reloads the weights in place from ``model_path`` (``collective_rpc
          ("reload_weights")``, vLLM >= 0.3x's layerwise reload).

        Then the prefix cache is reset: its blocks hold the old weights' keys and values, and
        the same prompts would otherwise reuse them. Returns False (nothing changed) when the
        model cannot be served this way; the caller then closes this engine and opens one."""
        self._check_open()
        model_path = str(model_path)
        if adapter_path is not None or self.adapter_path is not None:
            if (adapter_path is None or self.adapter_path is None or model_path != self.model_path
                    or int(lora_rank) > self.max_lora_rank):
                return False
            self._set_lora(str(adapter_path))
        else:
            if self.quantized or not same_architecture(self.model_path, model_path):
                return False
            if model_path != self.model_path:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model_path})
        self.llm.reset_prefix_cache()
        self.model_path, self.tokenizer = model_path, tokenizer
        self.switches += 1
        return True

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, adapter: bool = True,
                 desc: str | None = None, on_batch: Callable[[GenerationBatch], None] | None = None,
                 show_progress: bool = True) -> list[GenerationOutput]:
        from slmkd import generation

        self._check_open()
        return generation.generate_batched_vllm(self.llm, self.tokenizer, list(prompts),
                                     max_new_tokens=max_new_tokens, batch_size=self.submit_size,
                                     desc=desc, on_batch=on_batch,
                                     lora_request=self._lora if adapter else None,
                                     show_progress=show_progress)

    def close(self) -> None:
        """Shut vLLM's engine core down (its worker process exits and the GPU memory it reserved
        is released), then drop this process's references."""
        if self.closed:
            return
        llm, self.llm = self.llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            try:
                core.shutdown()
            except Exception as e:  # noqa: BLE001 - closing must not fail the caller
                logger.warning("vLLM engine shutdown: %s", e)
        del llm
        self.closed = True
        release_cuda_memory()


def load_generation_tokenizer(cfg: Any, name: Any, fallback: str | None = None) -> Any:
    """The model folder's own tokenizer (left padding, for batched generation), else
    ``fallback``'s (e.g. the student's, for a run folder saved without one)."""
    from slmkd.modeling import load_tokenizer

    try:
        return load_tokenizer(str(name), cfg, padding_side="left")
    except (OSError, ValueError):
        if not fallback:
            raise
        return load_tokenizer(fallback, cfg, padding_side="left")


def open_engine(cfg: Any, name: str, *, backend: str | None = None, tokenizer: Any = None,
                tokenizer_name: str | None = None, batch_size: int | None = None,
                role: str = "student") -> HFEngine | VLLMEngine:
    """The engine for model ``name`` (a key of ``cfg.models``, a Hub name or a local folder,
    an adapter folder included) with ``backend`` (default ``cfg.evaluation.backend``).

    vLLM settings: ``cfg.evaluation.vllm_gpu_memory_utilization`` and
    ``cfg.evaluation.vllm_max_model_len`` (None: the model's), ``enforce_eager`` off CUDA; an
    adapter folder is its base model + the adapter as a LoRA. HF: loaded with
    :func:`slmkd.modeling.load_causal_lm` for ``role`` (a 4-bit teacher stays 4-bit), decoding in
    batches of ``batch_size`` (default ``cfg.evaluation.batch_size``)."""
    from slmkd.generation.batched import resolve_backend
    from slmkd.modeling import load_causal_lm

    backend = resolve_backend(backend or getattr(cfg.evaluation, "backend", "hf"))
    bs = int(batch_size or cfg.evaluation.batch_size)
    if tokenizer is None:
        tokenizer = load_generation_tokenizer(cfg, name, tokenizer_name)
    if backend == "hf":
        return HFEngine(load_causal_lm(str(name), cfg, role=role, for_training=False), tokenizer,
                        batch_size=bs)
    if backend != "vllm":
        raise ValueError(f"unknown generation backend {backend!r}; choose 'hf' or 'vllm'")

    target = vllm_target(cfg, name)
    if target is None:
        return HFEngine(load_causal_lm(str(name), cfg, role=role, for_training=False),
                        tokenizer, batch_size=bs)
    path, adapter, rank = target
    four_bit = role == "teacher" and bool(getattr(cfg.models, "teacher_load_in_4bit", False))
    return VLLMEngine(str(path), tokenizer, adapter_path=adapter, lora_rank=rank,
                      submit_size=bs * 8, llm_kwargs=vllm_llm_kwargs(cfg, four_bit=four_bit))


def vllm_target(cfg: Any, name: str) -> tuple[str, str | None, int] | None:
    """What vLLM serves for model ``name``: ``(base path, adapter folder or None, LoRA rank)``;
    None when vLLM cannot serve it exactly (an adapter that replaces modules, e.g.
    cascod-2stage's own lm_head copy: vLLM serves LoRA deltas only), i.e. HF serves it."""
    import json
    from pathlib import Path

    from slmkd.modeling import adapter_base_path, is_adapter_dir, resolve_model_path

    path = resolve_model_path(str(name), cfg)
    if not is_adapter_dir(path):
        return str(path), None, 16
    acfg = json.loads((Path(path) / "adapter_config.json").read_text())
    if acfg.get("modules_to_save"):
        logger.warning("%s replaces %s: vLLM cannot serve that as a LoRA; using HF",
                       path, acfg["modules_to_save"])
        return None
    return adapter_base_path(path), str(path), int(acfg.get("r", 16))


#: config keys that decide the shape of every weight and the computation (a reload needs them
#: equal); the rest (names, versions, generation defaults) may differ between runs.
ARCHITECTURE_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "vocab_size", "tie_word_embeddings", "max_position_embeddings",
                     "rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps",
                     "hidden_act", "dtype", "torch_dtype", "sliding_window",
                     "use_sliding_window", "attention_bias", "quantization_config")


def same_architecture(a: str, b: str) -> bool:
    """True when models ``a`` and ``b`` (folders or Hub names) have equal
    :data:`ARCHITECTURE_KEYS` in their ``config.json`` (False when either cannot be read)."""
    if str(a) == str(b):
        return True
    try:
        from transformers import AutoConfig

        ca, cb = (AutoConfig.from_pretrained(str(x)).to_dict() for x in (a, b))
    except (OSError, ValueError) as e:
        logger.info("cannot compare %s and %s: %s", a, b, e)
        return False
    return all(ca.get(k) == cb.get(k) for k in ARCHITECTURE_KEYS)


def vllm_llm_kwargs(cfg: Any, *, four_bit: bool = False) -> dict[str, Any]:
    """``vllm.LLM`` settings from ``cfg.evaluation.vllm_*`` (share of the card, context length,
    dtype), greedy-deterministic seed 0, eager mode off CUDA, bitsandbytes for a 4-bit teacher."""
    import torch

    ev = cfg.evaluation
    kw: dict[str, Any] = {"gpu_memory_utilization": float(getattr(
        ev, "vllm_gpu_memory_utilization", 0.85)), "seed": 0}
    if getattr(ev, "vllm_dtype", "auto") != "auto":
        kw["dtype"] = str(ev.vllm_dtype)
    if getattr(ev, "vllm_max_model_len", None):
        kw["max_model_len"] = int(ev.vllm_max_model_len)
    if not torch.cuda.is_available():
        kw["enforce_eager"] = True
    if four_bit:
        kw["quantization"] = "bitsandbytes"
    return kw


def is_engine(obj: Any) -> bool:
    """True for an engine of this module (or anything with ``generate`` + ``backend``)."""
    return isinstance(obj, _Engine) or (
        hasattr(obj, "generate") and isinstance(getattr(obj, "backend", None), str))


class LazyEngine(_Engine):
    """An engine opened on its first :meth:`generate` (by ``opener()``) and reused after: a
    model whose predictions are all stored already is never loaded. :attr:`opened` counts how
    many times the model was loaded (at most once)."""

    def __init__(self, opener: Callable[[], Any], backend: str) -> None:
        self._opener, self.backend = opener, backend
        self._engine: Any = None
        self.opened = 0

    @property
    def tokenizer(self) -> Any:
        return None if self._engine is None else self._engine.tokenizer

    def generate(self, prompts: Sequence[str], **kw: Any) -> list[GenerationOutput]:
        if self._engine is None:
            self._engine = self._opener()
            self.opened += 1
        return self._engine.generate(prompts, **kw)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


class _Borrowed(_Engine):
    """An :class:`EngineSlot`'s engine lent to one model's evaluation: ``close`` returns it to
    the slot (which keeps it for the next model) instead of shutting it down."""

    def __init__(self, engine: Any) -> None:
        self._engine, self.backend, self.tokenizer = engine, engine.backend, engine.tokenizer

    def generate(self, prompts: Sequence[str], **kw: Any) -> list[GenerationOutput]:
        self._check_open()
        return self._engine.generate(prompts, **kw)

    def close(self) -> None:
        self.closed = True


class EngineSlot:
    """At most one open engine, kept across models: notebook 04 evaluates 20-odd models, and
    a vLLM engine start (weights, CUDA graphs, KV-cache profiling) per model would cost more
    than a weight reload. :meth:`open` serves the next model from the open vLLM engine when
    :meth:`VLLMEngine.switch_to` can (same architecture: weights reloaded in place; same base:
    the next LoRA), else it closes that engine and opens one (:func:`open_engine`). Evaluating
    models grouped by architecture (all 1.5B runs, then all 3B runs) is what makes this pay.

    :attr:`opened` counts engine starts and :attr:`switched` in-place switches. Close the slot
    (or use ``with``) when done: that shuts the last engine down."""

    def __init__(self) -> None:
        self.engine: Any = None
        self.opened = 0
        self.switched = 0

    def __enter__(self) -> EngineSlot:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self, cfg: Any, name: str, *, tokenizer_name: str | None = None,
             role: str = "student") -> _Engine:
        """An engine serving model ``name`` (arguments of :func:`open_engine`); its ``close``
        leaves the engine open in the slot."""
        eng = self.engine
        if isinstance(eng, VLLMEngine) and not eng.closed and role == "student":
            target = vllm_target(cfg, name)
            if target is not None:
                path, adapter, rank = target
                tok = load_generation_tokenizer(cfg, name, tokenizer_name)
                if eng.switch_to(path, tok, adapter_path=adapter, lora_rank=rank):
                    self.switched += 1
                    logger.info("vLLM engine switched to %s in place", name)
                    return _Borrowed(eng)
        self.close()
        self.engine = open_engine(cfg, str(name), tokenizer_name=tokenizer_name, role=role)
        self.opened += 1
        return _Borrowed(self.engine)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
