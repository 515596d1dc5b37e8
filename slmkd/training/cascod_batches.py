"""CasCoD batches: a pair's rationale and answer examples, padded into one batch.

:class:`CasCoDCollator` gives a pair one forward row when its rationale example is a token prefix
of its answer example, and the loss reads both terms off it (:func:`pair_hidden`); see
:mod:`slmkd.training.cascod` for the method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from slmkd.data.cot_format import shares_prefix

__all__ = ["CasCoDCollator", "pair_hidden", "rationale_rows"]


def _pad(seqs: Sequence[Sequence[int]], width: int, value: int) -> Any:
    import torch

    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return out


@dataclass
class CasCoDCollator:
    """Right-pads a batch of items to one width.

    **Paired items** share rows: a rationale example whose tokens (before its EOS) are its answer
    example's first tokens (:func:`slmkd.data.cot_format.shares_prefix`; with the Qwen2 tokenizer
    7,470 of 7,470 GSM8K train pairs and 81 of 81 BBH exemplar pairs) needs no row of its own: by
    causality the answer row's hidden states at those positions are the rationale row's, so one
    forward pass over ``B`` rows serves both CasCoD steps (the authors' "concat" forward runs
    ``2B``). Only pairs that do not share (e.g. a prompt left-truncated differently) add a row.

    Output: ``input_ids`` / ``attention_mask`` ``[B + E, L]`` (rows ``0..B-1`` the answer
    examples, then the ``E`` unshared rationale examples); ``labels`` ``[2B, L]`` of the *virtual*
    stacked batch the loss sees — rows ``0..B-1`` the rationale labels (each aligned to the row it
    lives in), rows ``B..2B-1`` the answer labels; ``rationale_row_index`` ``[B]`` (the input row
    of each rationale; :func:`pair_hidden` builds the virtual ``[2B, L, H]``),
    ``num_rationale_rows`` (``B``, 0-d) and ``answer_row_mask`` (``[2B]`` bool).
    ``share_rows=False`` gives every rationale its own row (``E = B``: the unshared layout, same
    loss). Single-kind items → ``input_ids``, ``attention_mask``, ``labels`` ``[B, L]``.
    Padding: ``pad_token_id`` / attention 0 / label −100. ``pad_to_multiple_of`` rounds ``L`` up
    (tensor-core friendly on GPU).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    share_rows: bool = True

    def _width(self, seqs: Sequence[Sequence[int]]) -> int:
        w = max(len(s) for s in seqs)
        m = self.pad_to_multiple_of
        return w if not m else ((w + m - 1) // m) * m

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from slmkd.data.prompts import IGNORE_INDEX

        if not items:
            raise ValueError("empty batch")
        paired = "rationale_input_ids" in items[0]
        if paired:
            b = len(items)
            ids = [it["answer_input_ids"] for it in items]
            r_index: list[int] = []
            for i, it in enumerate(items):
                if self.share_rows and shares_prefix(it["rationale_input_ids"],
                                                     it["answer_input_ids"]):
                    r_index.append(i)
                else:
                    r_index.append(len(ids))
                    ids.append(it["rationale_input_ids"])
            labels = ([it["rationale_labels"] for it in items]
                      + [it["answer_labels"] for it in items])
        else:
            ids = [it["input_ids"] for it in items]
            labels = [it["labels"] for it in items]
        width = self._width(ids)
        attn = torch.zeros((len(ids), width), dtype=torch.long)
        for i, s in enumerate(ids):
            attn[i, : len(s)] = 1
        batch = {"input_ids": _pad(ids, width, self.pad_token_id), "attention_mask": attn,
                 "labels": _pad(labels, width, IGNORE_INDEX)}
        for key in items[0]:  # metadata: the record id; the teacher-cache lookup keys
            if key == "example_id" or key.startswith("cache_"):
                batch[key] = [it[key] for it in items]
        if paired:
            batch["num_rationale_rows"] = torch.tensor(b, dtype=torch.long)
            batch["rationale_row_index"] = torch.tensor(r_index, dtype=torch.long)
            batch["answer_row_mask"] = torch.arange(2 * b) >= b
        return batch


def rationale_rows(inputs: dict[str, Any]) -> Any:
    """The input rows that hold the batch's rationales, in order: ``slice(0, B)`` when every
    pair shares its answer row, else the ``[B]`` index tensor (see :class:`CasCoDCollator`)."""
    import torch

    b = int(inputs["num_rationale_rows"])
    idx = inputs["rationale_row_index"]
    if torch.equal(idx.cpu(), torch.arange(b)):
        return slice(0, b)
    return idx


def pair_hidden(hidden: Any, inputs: dict[str, Any]) -> Any:
    """The virtual stacked batch ``[2B, T, H]`` of the joint loss from the forward pass over the
    collator's ``B + E`` rows: ``cat(hidden[rationale rows], hidden[:B])``. Both halves are views
    of one forward, so each shared row's gradient is the sum of its rationale and answer terms
    (exactly the gradient of the unshared layout, by causality)."""
    import torch

    b = int(inputs["num_rationale_rows"])
    rows = rationale_rows(inputs)
    rat = hidden[rows] if isinstance(rows, slice) else hidden.index_select(
        0, rows.to(hidden.device))
    return torch.cat([rat, hidden[:b]], dim=0)
