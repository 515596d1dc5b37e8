"""Models generating text: batched greedy decoding with Hugging Face or vLLM
(:mod:`slmkd.generation.batched`) and CasCoD's cascaded inference (:mod:`slmkd.generation.cascade`).

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
    vllm_available,
)
from slmkd.generation.cascade import cascaded_generate

__all__ = ["SDPA_EXCLUDE_CUDNN", "GenerationBatch", "GenerationOutput", "cascaded_generate",
           "eos_token_ids", "generate_batched", "generate_batched_vllm", "iter_generate_batched",
           "length_sorted_buckets", "vllm_available"]
