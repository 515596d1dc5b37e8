"""CasCoD's cascaded inference: rationale first, then the answer conditioned on it.

It is generation, not training: the evaluator and the error-propagation probe call it.

A ``cascod-2stage`` student is a ``PeftModel``: the frozen stage-1 model (which writes the
rationale) plus the stage-2 adapter (which reads the answer off it). :func:`cascaded_generate`
generates the rationale with the adapter switched off (:func:`rationale_model`) and the answer
with it on; plain models are used as they are for both steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from slmkd.data.cot_format import DEFAULT_ANSWER_CUE, join_rationale_cue
from slmkd.generation.batched import generate_batched
from slmkd.modeling import is_peft_model

__all__ = ["cascaded_generate", "rationale_model"]


def rationale_model(model: Any) -> contextlib.AbstractContextManager:
    """The context of the rationale step: ``model.disable_adapter()`` for a peft model (inside
    it the model computes exactly its base weights), a no-op for a plain model."""
    if is_peft_model(model):
        return model.disable_adapter()
    return contextlib.nullcontext()


def cascaded_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    answer_cue: str = DEFAULT_ANSWER_CUE,
    max_new_tokens_rationale: int,
    max_new_tokens_answer: int = 64,
    batch_size: int,
    rationales: Sequence[str] | None = None,
    desc: str | None = None,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Two-step greedy decoding of a CasCoD student.

    1. ``r = greedy(q)`` until EOS (or ``max_new_tokens_rationale``), where ``q`` is the
       chat-templated prompt;
    2. ``a = greedy(q + r + "\\n" + cue)`` until EOS (or ``max_new_tokens_answer``).

    For a peft model step 1 runs with the adapter off (:func:`rationale_model`: the stage-1
    weights of ``cascod-2stage``) and step 2 with it on. ``model`` may also be an open engine
    of :mod:`slmkd.generation.engines` (HF or vLLM; a vLLM adapter is a LoRA request, off for
    step 1). With ``rationales`` given (e.g. the
    teacher's), step 1 is skipped and those are used instead
    (the error-propagation probe). Returns, in prompt order, dicts with ``rationale``,
    ``answer_text`` (the generated continuation after the cue), ``full_text``
    (``r + "\\n" + cue + answer_text``: what answer extraction reads),
    ``rationale_hit_max`` / ``answer_hit_max`` and ``num_new_tokens`` (both steps).
    ``max_new_tokens_answer`` defaults to 64: a GSM8K number needs a few tokens, but BBH
    word-sorting and Dyck answers are lists; the step stops at EOS anyway.
    """
    prompts = list(prompts)
    engine = model if hasattr(model, "generate") and hasattr(model, "backend") else None

    def gen(texts: list[str], max_new: int, adapter: bool, what: str):
        d = (desc or "cascod") + f": {what}"
        if engine is not None:  # an open slmkd.generation.engines engine (HF or vLLM)
            return engine.generate(texts, max_new_tokens=max_new, adapter=adapter, desc=d,
                                   show_progress=show_progress)
        ctx = rationale_model(model) if not adapter else contextlib.nullcontext()
        with ctx:
            return generate_batched(model, tokenizer, texts, max_new_tokens=max_new,
                                    batch_size=batch_size, desc=d, show_progress=show_progress)

    if rationales is None:
        r_out = gen(prompts, max_new_tokens_rationale, False, "rationale")
        rats = [o.text.strip() for o in r_out]
        r_hit = [o.hit_max_new_tokens for o in r_out]
        r_n = [o.num_new_tokens for o in r_out]
    else:
        if len(rationales) != len(prompts):
            raise ValueError(f"{len(rationales)} rationales for {len(prompts)} prompts")
        rats = [str(r).strip() for r in rationales]
        r_hit = [False] * len(prompts)
        r_n = [0] * len(prompts)
    contexts = [join_rationale_cue(r, answer_cue) for r in rats]
    answer_prompts = [p + c for p, c in zip(prompts, contexts, strict=True)]
    a_out = gen(answer_prompts, max_new_tokens_answer, True, "answer")
    return [
        {"rationale": r, "answer_text": a.text, "full_text": c + a.text,
         "rationale_hit_max": rh, "answer_hit_max": a.hit_max_new_tokens,
         "num_new_tokens": rn + a.num_new_tokens}
        for r, c, a, rh, rn in zip(rats, contexts, a_out, r_hit, r_n, strict=True)
    ]
