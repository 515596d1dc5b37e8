"""Student training examples from the teacher's chain-of-thought records, and the padding collator.

One example per kept teacher CoT record (``keep == True``)::

    prompt     = build_prompt(student_tokenizer, record)        # chat template + generation prompt
    completion = record["completion"] + EOS                      # the teacher's CoT, supervised
    input_ids  = prompt_ids ⊕ completion_ids                     # [T]
    labels     = [-100] * len(prompt_ids) ⊕ completion_ids       # [T], aligned with input_ids

(the loss shifts internally: position ``t`` predicts ``labels[t + 1]``). The end of a completion is
never cut: an over-long example loses prompt tokens from the left, or is dropped when the
completion alone does not fit; an example with fewer than ``min_supervised_tokens`` supervised
tokens is dropped. Every drop and every left-truncation is counted in :class:`DataStats`.

The collator pads a list of examples dynamically to the longest one in the batch (optionally to a
multiple of 8 for tensor cores): ``input_ids`` with the pad id, ``labels`` with -100,
``attention_mask`` 1 on real tokens. Any other list-of-int field (e.g. CasCoD's segment ids) is
padded with 0; non-list fields (ids) are collected into a Python list.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from slmkd.data.prompts import IGNORE_INDEX, DropReason, build_prompt, tokenize_example
from slmkd.data.records import Record

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from slmkd.config import ExperimentConfig

logger = logging.getLogger(__name__)

#: Batch keys that are metadata, not model inputs (popped before the forward pass).
META_KEYS = ("example_id",)


@dataclass
class DataStats:
    """What became of the CoT records on their way to the loss."""

    num_records: int = 0
    num_examples: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    prompt_truncated: int = 0
    prompt_tokens_dropped: int = 0
    supervised_tokens: int = 0
    max_length: int = 0

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["num_dropped"] = self.num_dropped
        return d

    def summary(self) -> str:
        s = f"{self.num_examples}/{self.num_records} examples"
        if self.dropped:
            parts = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items()))
            s += f" (dropped: {parts})"
        if self.prompt_truncated:
            s += f", {self.prompt_truncated} prompts left-truncated"
        return s + f", {self.supervised_tokens} supervised tokens"


class ExampleDataset:
    """A map-style dataset over a list of example dicts (``torch.utils.data.Dataset`` protocol)."""

    def __init__(self, examples: Sequence[dict[str, Any]]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]


def record_from_cot(rec: dict[str, Any]) -> Record:
    """The :class:`Record` a CoT record was generated from (for :func:`build_prompt`)."""
    return Record(id=str(rec["id"]), dataset=rec.get("dataset", "gsm8k"), task=rec.get("task"),
                  split="train", question=rec["question"], answer=str(rec.get("gold", "")))


def build_sft_examples(
    records: Iterable[dict[str, Any]],
    tokenizer: Any,
    max_length: int,
    min_supervised_tokens: int,
    bbh_prompts: dict[str, str] | None = None,
) -> tuple[ExampleDataset, DataStats]:
    """Tokenise kept CoT records into ``{"input_ids", "labels", "example_id"}`` examples.

    Records with ``keep == False`` are counted as ``not_kept``; records missing a field as
    ``bad_record``; the rest go through :func:`slmkd.data.prompts.tokenize_example`.
    """
    stats = DataStats(max_length=max_length)
    drops: Counter[str] = Counter()
    out: list[dict[str, Any]] = []
    for rec in records:
        stats.num_records += 1
        if not rec.get("keep", True):
            drops["not_kept"] += 1
            continue
        try:
            prompt = build_prompt(tokenizer, record_from_cot(rec), bbh_prompts)
            completion = rec["completion"]
        except (KeyError, TypeError) as e:
            drops["bad_record"] += 1
            logger.debug("bad CoT record %s: %s", rec.get("id"), e)
            continue
        ex = tokenize_example(tokenizer, prompt, completion, max_length, min_supervised_tokens)
        if isinstance(ex, DropReason):
            drops[ex.reason] += 1
            continue
        if ex.prompt_tokens_dropped:
            stats.prompt_truncated += 1
            stats.prompt_tokens_dropped += ex.prompt_tokens_dropped
        stats.supervised_tokens += ex.num_supervised
        out.append({"input_ids": ex.input_ids, "labels": ex.labels, "example_id": str(rec["id"])})
    stats.num_examples = len(out)
    stats.dropped = dict(drops)
    return ExampleDataset(out), stats


class PaddingCollator:
    """Dynamic padding to the longest example of the batch (right padding).

    Output: ``input_ids`` [B, T] (pad id), ``attention_mask`` [B, T] (1 on tokens), ``labels``
    [B, T] (-100 on padding); other list-of-int fields [B, T] padded with 0; other fields as lists.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if not features:
            raise ValueError("PaddingCollator got an empty batch.")
        length = max(len(f["input_ids"]) for f in features)
        m = self.pad_to_multiple_of
        if m:
            length = ((length + m - 1) // m) * m
        batch: dict[str, Any] = {}
        keys = list(features[0].keys())
        for key in keys:
            values = [f[key] for f in features]
            if isinstance(values[0], (list, tuple)) and all(isinstance(v, int) for v in values[0]):
                fill = (self.pad_token_id if key == "input_ids"
                        else IGNORE_INDEX if key == "labels" else 0)
                t = torch.full((len(values), length), fill, dtype=torch.long)
                for i, v in enumerate(values):
                    t[i, : len(v)] = torch.as_tensor(v, dtype=torch.long)
                batch[key] = t
            else:
                batch[key] = values
        if "attention_mask" not in batch:
            mask = torch.zeros((len(features), length), dtype=torch.long)
            for i, f in enumerate(features):
                mask[i, : len(f["input_ids"])] = 1
            batch["attention_mask"] = mask
        return batch


def count_supervised(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that reach the loss: ``(labels[:, 1:] != -100).sum()`` (the loss shifts by one)."""
    return labels[..., 1:].ne(IGNORE_INDEX).sum()


def load_training_records(cfg: ExperimentConfig, dataset: str | None = None
                          ) -> tuple[list[dict[str, Any]], str]:
    """The kept teacher CoT records for ``dataset`` (default ``cfg.generation.dataset``) and the
    CoT folder they came from. Raises ``FileNotFoundError`` naming the command to run when the
    folder has no complete output (the faces — ``slmkd run``/``train``, the notebooks — generate
    it first in the tiny profile), ``ValueError`` when no record was kept."""
    from slmkd.teacher.store import cot_dir, load_cot_records

    dataset = dataset or cfg.generation.dataset
    cdir = cot_dir(cfg, dataset, cfg.teacher)
    if not _cot_complete(cdir):
        raise FileNotFoundError(
            f"No complete teacher CoT in {cdir}: run notebook 01_teacher_cot "
            f"(or `slmkd generate-cot --profile {cfg.profile}`) first.")
    records = load_cot_records(cdir, kept_only=True)
    if not records:
        raise ValueError(f"The teacher CoT in {cdir} has no kept record: nothing to train on.")
    return records, str(cdir)


def _cot_complete(cdir: Any) -> bool:
    from pathlib import Path

    cdir = Path(cdir)
    return (cdir / "cot_stats.json").is_file() and any(cdir.glob("shard-*.jsonl"))


def example_length(item: dict[str, Any]) -> int:
    """The padded width an example needs: ``len(input_ids)``, or for a CasCoD pair the longer of
    its rationale and answer rows (the collator pads both to one width)."""
    if "input_ids" in item:
        return len(item["input_ids"])
    return max(len(item["rationale_input_ids"]), len(item["answer_input_ids"]))


class SeededLengthGroupedSampler:
    """Length-grouped sampling (``transformers.trainer_pt_utils.get_length_grouped_indices``:
    a random permutation cut into mega-batches of 50 steps, each sorted by length, so one step's
    examples have similar lengths and little padding), seeded by ``seed`` and the epoch.

    The order of epoch ``e`` depends only on ``(seed, e)`` — not on the global RNG — so a run
    resumed mid-epoch (``set_epoch`` is called by the Trainer's dataloader; the already-seen
    batches are skipped) sees the same order as an uninterrupted one. ``group`` is the number of
    examples per optimiser step (per-device batch × gradient accumulation × processes)."""

    def __init__(self, lengths: Sequence[int], group: int, seed: int) -> None:
        self.lengths = [int(n) for n in lengths]
        self.group, self.seed, self.epoch = int(group), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.group, generator=g))
