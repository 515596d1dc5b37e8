"""Teacher/student vocabulary alignment.

Qwen2.5 tokenizers have 151,665 tokens while the models carry padded embedding matrices of
151,936 (0.5B-3B) or 152,064 (7B and up) rows. The rows at and above ``len(tokenizer)`` are
padding: the losses in :mod:`slmkd.losses` exclude them via ``vocab_size``.

* :func:`ensure_vocab_alignment` makes sure a model has at least one embedding row per token
  (growing it with mean-initialised rows when needed; it never shrinks).
* :func:`align_teacher_logits` maps full teacher logits onto the student's vocabulary width.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["VocabAlignment", "ensure_vocab_alignment", "align_teacher_logits"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VocabAlignment:
    """What :func:`ensure_vocab_alignment` did.

    Attributes:
        action: ``"none"`` (rows already cover the tokenizer) or ``"grown"``.
        tokenizer_size: ``len(tokenizer)``.
        rows_before: embedding rows before the call.
        rows_after: embedding rows after the call.
        padding_rows: rows beyond the tokenizer after the call (excluded by the losses).
    """

    action: str
    tokenizer_size: int
    rows_before: int
    rows_after: int
    padding_rows: int

    @property
    def changed(self) -> bool:
        return self.action != "none"

    def __str__(self) -> str:
        if self.action == "grown":
            return (f"grew embeddings {self.rows_before} -> {self.rows_after} rows for "
                    f"{self.tokenizer_size} tokens (new rows = mean embedding)")
        return (f"embeddings unchanged: {self.rows_before} rows cover {self.tokenizer_size} "
                f"tokens ({self.padding_rows} padding rows, excluded from the loss)")


def _init_rows_with_mean(weight: torch.Tensor, old_rows: int) -> None:
    with torch.no_grad():
        mean = weight[:old_rows].float().mean(dim=0)
        weight[old_rows:] = mean.to(weight.dtype)


def ensure_vocab_alignment(model: Any, tokenizer: Any, *,
                           pad_to_multiple_of: int | None = None) -> VocabAlignment:
    """Ensure ``model`` has an embedding row for every token of ``tokenizer``.

    When ``rows >= len(tokenizer)`` nothing changes (padding rows are left alone: they are
    excluded from the loss by ``vocab_size``). Otherwise the input embeddings (and an untied
    output embedding / lm head) grow to ``len(tokenizer)`` rows, rounded up to
    ``pad_to_multiple_of`` when given, and every new row is set to the mean of the old rows
    (a new output bias entry to the mean old bias). Never shrinks.

    Args:
        model: a ``transformers`` ``PreTrainedModel`` (``get_input_embeddings``,
            ``resize_token_embeddings``).
        tokenizer: anything with ``len()``.
        pad_to_multiple_of: optional row multiple for the grown matrix.

    Returns:
        A :class:`VocabAlignment` report (also logged at INFO level).
    """
    n_tok = len(tokenizer)
    emb = model.get_input_embeddings()
    rows = int(emb.weight.shape[0])
    if rows >= n_tok:
        report = VocabAlignment("none", n_tok, rows, rows, rows - n_tok)
        logger.info("vocab alignment: %s", report)
        return report
    target = n_tok
    if pad_to_multiple_of:
        k = int(pad_to_multiple_of)
        target = -(-n_tok // k) * k
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    try:
        model.resize_token_embeddings(target, mean_resizing=False)
    except TypeError:  # older transformers without mean_resizing
        model.resize_token_embeddings(target)
    new_in = model.get_input_embeddings()
    _init_rows_with_mean(new_in.weight, rows)
    new_out = model.get_output_embeddings() if out_emb is not None else None
    if new_out is not None and new_out.weight is not new_in.weight:
        out_rows = rows if out_emb is None else int(out_emb.weight.shape[0])
        out_rows = min(out_rows, int(new_out.weight.shape[0]))
        _init_rows_with_mean(new_out.weight, out_rows)
        bias = getattr(new_out, "bias", None)
        if bias is not None and bias.shape[0] > out_rows:
            with torch.no_grad():
                bias[out_rows:] = bias[:out_rows].float().mean().to(bias.dtype)
    after = int(model.get_input_embeddings().weight.shape[0])
    report = VocabAlignment("grown", n_tok, rows, after, after - n_tok)
    logger.info("vocab alignment: %s", report)
    return report


def align_teacher_logits(teacher_logits: torch.Tensor, student_vocab: int, *,
                         fill_value: float = float("-inf")) -> torch.Tensor:
    """Map teacher logits ``(..., Vt)`` onto the student's vocabulary width ``(..., Vs)``.

    Extra teacher columns (``Vt > Vs``) are dropped (a view, no copy); missing ones
    (``Vt < Vs``) are appended with ``fill_value`` (default ``-inf``: probability zero after a
    softmax, i.e. masked; never zero logits). :func:`slmkd.losses.kd_loss` does this internally
    (without the copy), so this is for callers that compute their own loss on full logits.
    """
    vt = teacher_logits.shape[-1]
    vs = int(student_vocab)
    if vs < 1:
        raise ValueError(f"student_vocab={student_vocab} must be positive")
    if vt >= vs:
        return teacher_logits[..., :vs]
    pad = teacher_logits.new_full((*teacher_logits.shape[:-1], vs - vt), fill_value)
    return torch.cat([teacher_logits, pad], dim=-1)
