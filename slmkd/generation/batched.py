"""Batched greedy generation shared by the teacher (CoT), the evaluator and CasCoD inference.

Two backends produce the same :class:`GenerationOutput` list:

* :func:`generate_batched` — Hugging Face ``model.generate``. Prompts are tokenised once, sorted by
  token length (longest first, so an out-of-memory error shows up in the first batch rather than
  hours in) and cut into buckets of ``batch_size``; each bucket is left-padded to its longest
  prompt, so every row's last prompt token sits at position ``L_b - 1`` and generation appends at
  the same column for all rows. Decoding is greedy (``argmax_v p(v | x_{<t})``) with the KV cache,
  and a row stops at the first end-of-sequence id in :func:`eos_token_ids`.
* :func:`generate_batched_vllm` — the same contract on vLLM (``temperature = 0``), used when
  ``vllm`` is importable and a backend of ``"vllm"`` is asked for.

Shapes: a bucket's ``input_ids`` / ``attention_mask`` are ``[B, L_b]`` (left padded);
``model.generate`` returns ``[B, L_b + T_b]`` with ``T_b <= max_new_tokens``; row ``i``'s new tokens
are ``out[i, L_b:]`` up to (not including) its first EOS id; the rest is padding.

Results always come back in the order of the input prompts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "GenerationOutput",
    "GenerationBatch",
    "eos_token_ids",
    "iter_generate_batched",
    "generate_batched",
    "generate_batched_vllm",
    "resolve_backend",
    "vllm_available",
    "length_sorted_buckets",
]

#: Keep SDPA off cuDNN attention during CUDA generation (see :func:`_sdpa_without_cudnn`).
SDPA_EXCLUDE_CUDNN = True

#: Special tokens that end an assistant turn in ChatML-style templates (Qwen2/2.5).
_EXTRA_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")


@dataclass(frozen=True)
class GenerationOutput:
    """One prompt's result.

    ``text``: the generated continuation decoded without special tokens (EOS excluded);
    ``num_new_tokens``: generated tokens counted up to and including the stopping EOS (padding
    excluded); ``hit_max_new_tokens``: True when no EOS was produced within ``max_new_tokens``
    (the continuation is truncated); ``token_ids``: the generated ids before the stopping EOS
    (what backends are compared on: a detokenizer may hold back an incomplete UTF-8 byte).
    """

    text: str
    num_new_tokens: int
    hit_max_new_tokens: bool
    token_ids: tuple[int, ...] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class GenerationBatch:
    """One finished bucket: ``indices[j]`` is the input position of ``outputs[j]``."""

    indices: list[int]
    outputs: list[GenerationOutput]
    wall_time_s: float


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that stop a row: ``model.generation_config.eos_token_id`` (int or list), the
    tokenizer's ``eos_token_id``, and chat end-of-turn tokens (``<|im_end|>``, ``<|endoftext|>``…)
    that exist in the tokenizer's vocabulary as special tokens. Order preserved, no duplicates.

    Raises ``ValueError`` when none is found (generation would never stop before the limit).
    """
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None) if model is not None else None
    if gen_cfg is not None:
        ids += _as_id_list(getattr(gen_cfg, "eos_token_id", None))
    ids += _as_id_list(getattr(tokenizer, "eos_token_id", None))
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    added = getattr(tokenizer, "get_added_vocab", None)
    if callable(added):
        special |= set(added().keys())
    for tok in _EXTRA_STOP_TOKENS:
        if tok in special:
            tid = tokenizer.convert_tokens_to_ids(tok)
            unk = getattr(tokenizer, "unk_token_id", None)
            if isinstance(tid, int) and tid >= 0 and tid != unk:
                ids.append(tid)
    out: list[int] = []
    for i in ids:
        if i not in out:
            out.append(i)
    if not out:
        raise ValueError(
            "No end-of-sequence token id found on the model's generation_config or the tokenizer; "
            "set tokenizer.eos_token or model.generation_config.eos_token_id."
        )
    return out


def length_sorted_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Input indices sorted by length, longest first (ties by index, so the order is deterministic),
    cut into consecutive buckets of at most ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def _pad_id(tokenizer: Any, eos_ids: list[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else eos_ids[0]


def _model_device(model: Any) -> Any:
    dev = getattr(model, "device", None)
    if dev is not None:
        return dev
    return next(model.parameters()).device


def _sdpa_without_cudnn(device: Any):
    """On CUDA, a context that lets SDPA use flash / memory-efficient / math kernels but not
    cuDNN attention. cuDNN builds an execution plan for every new sequence length, and decoding
    with a KV cache meets a new length at every step of every bucket: measured on an H200 with
    Qwen2.5-7B shapes (bf16, 200 new tokens), batch 64 went from 1,581 to 2,856 generated
    tokens/s and batch 256 from 3,693 to 4,156 (benchmarks/RESULTS.md). A no-op elsewhere."""
    import contextlib

    if not SDPA_EXCLUDE_CUDNN or getattr(device, "type", str(device)) != "cuda":
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def iter_generate_batched(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    desc: str | None = None,
    show_progress: bool = True,
) -> Iterator[GenerationBatch]:
    """Greedy generation bucket by bucket (see the module docstring); yields each finished
    :class:`GenerationBatch` as soon as it is done so callers can persist it (resumability).

    Prompts are full strings (chat template already applied), tokenised without adding special
    tokens. The progress bar shows items/s and the generated tokens/s.
    """
    import torch
    from tqdm.auto import tqdm

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = list(prompts)
    if not prompts:
        return
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise ValueError(f"prompt {i} is empty or not a string: {p!r}")

    eos_ids = eos_token_ids(model, tokenizer)
    eos_set = set(eos_ids)
    pad_id = _pad_id(tokenizer, eos_ids)
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    buckets = length_sorted_buckets([len(e) for e in encoded], batch_size)
    device = _model_device(model)
    was_training = bool(getattr(model, "training", False))
    model.eval()

    bar = tqdm(total=len(prompts), desc=desc or "generate", unit="item", disable=not show_progress)
    total_new = 0
    t_start = time.perf_counter()
    try:
        for bucket in buckets:
            t0 = time.perf_counter()
            seqs = [encoded[i] for i in bucket]
            width = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):  # left padding
                if s:
                    input_ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
                    attention[r, width - len(s) :] = 1
            with torch.inference_mode(), _sdpa_without_cudnn(device):
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    repetition_penalty=1.0,
                    eos_token_id=eos_ids,
                    pad_token_id=pad_id,
                    use_cache=True,
                )
            new = out[:, width:].tolist()
            outputs: list[GenerationOutput] = []
            for row in new:
                stop = next((j for j, t in enumerate(row) if t in eos_set), None)
                if stop is None:
                    gen = row
                    n_new = len(row)
                    hit_max = len(row) >= max_new_tokens
                else:
                    gen = row[:stop]
                    n_new = stop + 1
                    hit_max = False
                text = tokenizer.decode(gen, skip_special_tokens=True)
                outputs.append(GenerationOutput(text, n_new, hit_max, tuple(gen)))
            total_new += sum(o.num_new_tokens for o in outputs)
            bar.update(len(bucket))
            elapsed = max(time.perf_counter() - t_start, 1e-9)
            bar.set_postfix(tok_s=f"{total_new / elapsed:.1f}", refresh=False)
            yield GenerationBatch(list(bucket), outputs, time.perf_counter() - t0)
    finally:
        bar.close()
        if was_training:
            model.train()


def generate_batched(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    desc: str | None = None,
    show_progress: bool = True,
) -> list[GenerationOutput]:
    """Greedy generation for every prompt, returned in input order (see the module docstring)."""
    results: list[GenerationOutput | None] = [None] * len(prompts)
    for batch in iter_generate_batched(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        desc=desc,
        show_progress=show_progress,
    ):
        for i, o in zip(batch.indices, batch.outputs, strict=True):
            results[i] = o
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def vllm_available() -> bool:
    """True when ``import vllm`` would succeed (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str) -> str:
    """``"auto"`` → ``"vllm"`` when vLLM is importable and a CUDA GPU is there, else ``"hf"``;
    ``"hf"`` / ``"vllm"`` as given."""
    if backend != "auto":
        return backend
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        cuda = False
    return "vllm" if cuda and vllm_available() else "hf"


def generate_batched_vllm(
    llm_or_path: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int | None = None,
    desc: str | None = None,
    llm_kwargs: dict[str, Any] | None = None,
    on_batch: Callable[[GenerationBatch], None] | None = None,
    lora_request: Any = None,
    show_progress: bool = True,
) -> list[GenerationOutput]:
    """The :func:`generate_batched` contract on vLLM: greedy (``temperature=0``), stop at the same
    EOS ids, ``skip_special_tokens``. ``llm_or_path`` is a ``vllm.LLM`` or a model path/name (an
    ``LLM`` is then built with ``llm_kwargs``). vLLM schedules its own continuous batches;
    ``batch_size`` here only sets how many prompts are submitted per call (and per ``on_batch``
    callback, for incremental persistence); ``None`` submits all at once. ``lora_request`` (a
    ``vllm.lora.request.LoRARequest``) applies an adapter to every prompt. A path builds a new
    engine per call: reuse one through :class:`slmkd.generation.engines.VLLMEngine`.
    """
    try:
        import vllm
    except ImportError as exc:  # pragma: no cover - exercised via a fake module in tests
        raise ImportError(
            "backend 'vllm' needs the vllm package (pip install vllm); or use backend 'hf'."
        ) from exc

    llm = llm_or_path
    if isinstance(llm_or_path, str):
        llm = vllm.LLM(model=llm_or_path, **(llm_kwargs or {}))
    eos_ids = eos_token_ids(None, tokenizer)
    eos_set = set(eos_ids)
    params = vllm.SamplingParams(
        temperature=0.0,
        max_tokens=max_new_tokens,
        repetition_penalty=1.0,
        stop_token_ids=eos_ids,
        skip_special_tokens=True,
    )
    prompts = list(prompts)
    step = batch_size or max(len(prompts), 1)
    results: list[GenerationOutput] = []
    for k in range(0, len(prompts), step):
        t0 = time.perf_counter()
        chunk = prompts[k : k + step]
        kw = {"lora_request": lora_request} if lora_request is not None else {}
        # the tokens HF generation sees (the chat template already holds the special tokens):
        # vLLM would otherwise tokenize the text itself, with add_special_tokens=True
        ids = tokenizer(list(chunk), add_special_tokens=False)["input_ids"]
        outs = llm.generate([{"prompt_token_ids": list(x)} for x in ids], params,
                            use_tqdm=show_progress, **kw)
        batch_out = []
        for o in outs:
            c = o.outputs[0]
            n = len(c.token_ids)
            hit = getattr(c, "finish_reason", None) == "length"
            ids = tuple(int(t) for t in c.token_ids if int(t) not in eos_set)
            batch_out.append(GenerationOutput(c.text, n, hit, ids))
        results.extend(batch_out)
        if on_batch is not None:
            on_batch(
                GenerationBatch(list(range(k, k + len(chunk))), batch_out, time.perf_counter() - t0)
            )
    return results
