"""Models generating text: batched greedy decoding with Hugging Face or vLLM
(:mod:`slmkd.generation.batched`), engines that keep one model loaded across calls and release it
(:mod:`slmkd.generation.engines`) and CasCoD's cascaded inference
(:mod:`slmkd.generation.cascade`).

Stages call these through the package (``from slmkd import generation``;
``generation.iter_generate_batched(...)``), so a test can replace a decoder in one place.
"""

from slmkd.generation.batched import (
    SDPA_EXCLUDE_CUDNN,
    GenerationBatch,
    GenerationOutput,
    eos_token_ids,
    generate_batched,
    generate_batched_vllm,
    iter_generate_batched,
    length_sorted_buckets,
    resolve_backend,
    vllm_available,
)
from slmkd.generation.cascade import cascaded_generate
from slmkd.generation.engines import (
    EngineSlot,
    HFEngine,
    LazyEngine,
    VLLMEngine,
    is_engine,
    open_engine,
    vllm_llm_kwargs,
)

__all__ = ["SDPA_EXCLUDE_CUDNN", "EngineSlot", "GenerationBatch", "GenerationOutput", "HFEngine",
           "LazyEngine", "VLLMEngine", "cascaded_generate", "is_engine", "open_engine", "vllm_llm_kwargs",
           "eos_token_ids", "generate_batched", "generate_batched_vllm", "iter_generate_batched",
           "length_sorted_buckets", "resolve_backend", "vllm_available"]
