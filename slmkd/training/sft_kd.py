"""The ``sft`` and ``kd`` methods: CoT distillation by cross-entropy, and logit KD on the
teacher's CoT.

Loss (``kd``): with student/teacher final hidden states ``h_s, h_t`` and lm_head weights
``W_s, W_t``, :func:`slmkd.losses.fused_kd_loss` computes, in vocabulary chunks and over the
supervised positions ``S`` of the step (``N = |S|`` summed over micro-batches and processes),
``L = (1 - α) · CE(W_s h_s, y) + α · T² · KL(softmax(W_t h_t / T) ‖ softmax(W_s h_s / T))``,
each term ``(1/N) Σ_{t∈S}``; ``sft`` is the same with ``α = 0`` and no teacher.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from slmkd.training.data import build_sft_examples
from slmkd.training.method_spec import Items, MethodSpec

if TYPE_CHECKING:  # pragma: no cover
    from slmkd.config import ExperimentConfig
    from slmkd.training.trainer import DistillationTrainer

__all__ = ["build_cot_datasets", "kd_or_ce_loss", "sft_kd_specs"]


def build_cot_datasets(cfg: ExperimentConfig, records: list[dict[str, Any]], tokenizer: Any):
    """Dataset of ``prompt → teacher CoT + EOS`` examples (``sft`` and ``kd``)."""
    bbh_prompts = None
    if any(r.get("dataset") == "bbh" for r in records):
        from slmkd.data import load_bbh_cot_prompts

        bbh_prompts = load_bbh_cot_prompts(cfg.data.bbh_dir)
    return build_sft_examples(records, tokenizer, cfg.train.max_seq_length,
                              cfg.train.min_supervised_tokens, bbh_prompts)


def kd_or_ce_loss(trainer: DistillationTrainer, model: torch.nn.Module, inputs: dict[str, Any],
                  items: Items, *, alpha: float | None = None, use_teacher: bool = True,
                  labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(1-α)·CE + α·T²·KL`` over ``labels`` (default ``inputs["labels"]``) via fused_kd_loss;
    ``use_teacher=False`` (or no teacher loaded) gives plain CE (α = 0)."""
    from slmkd.losses import fused_kd_loss

    labels = inputs["labels"] if labels is None else labels
    hs, ws = trainer.student_hidden(model, inputs["input_ids"], inputs["attention_mask"])
    if use_teacher and trainer.teacher is not None:
        ht, wt = trainer.teacher_hidden(inputs["input_ids"], inputs["attention_mask"])
        a = trainer.alpha if alpha is None else alpha
    else:
        ht, wt, a = None, None, 0.0
    out = fused_kd_loss(
        hs, ws, ht, wt, labels, temperature=trainer.temperature, alpha=a,
        max_logit_abs=trainer.cfg.kd.max_logit_abs, vocab_size=trainer.vocab_size,
        num_items_in_batch=items.get("supervised"),
        **({"chunk_size": trainer.cfg.kd.chunk_size} if trainer.loss_accepts_chunk_size else {}),
        **({"nonfinite": trainer.nonfinite_mode()} if trainer.loss_accepts_nonfinite else {}),
    )
    metrics = {"ce": out.ce.detach(), "kd": out.kd.detach(),
               "num_nonfinite": torch.as_tensor(out.num_nonfinite)}
    for key in ("num_nonfinite_student", "num_nonfinite_teacher"):  # the trainer's guard reads them
        if hasattr(out, key):
            metrics[key] = torch.as_tensor(getattr(out, key))
    return out.loss, metrics


def _sft_loss(trainer, model, inputs, items):
    return kd_or_ce_loss(trainer, model, inputs, items, use_teacher=False)


def _kd_loss(trainer, model, inputs, items):
    return kd_or_ce_loss(trainer, model, inputs, items, use_teacher=True)


def sft_kd_specs() -> tuple[MethodSpec, ...]:
    """``sft`` and ``kd``; registered by :mod:`slmkd.training.methods`."""
    return (
    MethodSpec(
        name="sft", needs_teacher=False, build_datasets=build_cot_datasets, compute_loss=_sft_loss,
        config_sections=("models", "data", "train", "generation", "tiny"),
        description="CoT distillation: cross-entropy on the teacher's chain of thought."),
    MethodSpec(
        name="kd", needs_teacher=True, build_datasets=build_cot_datasets, compute_loss=_kd_loss,
        description="Logit KD on the teacher's CoT: (1-α)·CE + α·T²·KL, per-epoch T and α.")
    )
