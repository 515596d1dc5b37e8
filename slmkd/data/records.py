"""The one record type every dataset is loaded into, and seeded subset / split helpers."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Record:
    """One benchmark item.

    Attributes:
        id: stable identifier, e.g. ``gsm8k-test-00012`` or ``bbh-navigate-0007``.
        dataset: ``"gsm8k"`` or ``"bbh"``.
        task: BBH task name (``None`` for GSM8K).
        split: ``"train"`` / ``"test"`` (BBH has only ``"test"``; see :func:`bbh_train_eval_split`).
        question: the question text exactly as given to the model.
        answer: the gold final answer (GSM8K: a normalised number string).
        rationale: the gold rationale where the dataset has one (GSM8K), else ``None``.
    """

    id: str
    dataset: str
    task: str | None
    split: str
    question: str
    answer: str
    rationale: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        return cls(**{k: d.get(k) for k in ("id", "dataset", "task", "split", "question",
                                              "answer", "rationale")})


@dataclass
class LoadResult:
    """Records that loaded, and ``(record_id_or_line, reason)`` for every one that did not."""

    records: list[Record] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{len(self.records)} records"
        if self.skipped:
            reasons: dict[str, int] = defaultdict(int)
            for _, r in self.skipped:
                reasons[r.split(":")[0]] += 1
            s += f", {len(self.skipped)} skipped (" + ", ".join(
                f"{k}: {v}" for k, v in sorted(reasons.items())) + ")"
        return s


def eval_subset(records: Iterable[Record], limit: int | None, seed: int,
                per_task: bool = False) -> list[Record]:
    """A seeded subset of ``limit`` records (per task when ``per_task``); ``None`` = all.

    The subset depends only on the record ids, ``limit`` and ``seed``, so every method, student
    and training seed is evaluated on exactly the same items. Output is sorted by id.
    """
    records = sorted(records, key=lambda r: r.id)
    if limit is None:
        return records
    groups: dict[str | None, list[Record]] = defaultdict(list)
    for r in records:
        groups[r.task if per_task else None].append(r)
    out: list[Record] = []
    for key in sorted(groups, key=lambda k: k or ""):
        items = groups[key]
        rng = random.Random(f"{seed}:{key}")
        out.extend(items if len(items) <= limit else rng.sample(items, limit))
    return sorted(out, key=lambda r: r.id)


def bbh_train_eval_split(records: Iterable[Record], train_per_task: int,
                         seed: int) -> tuple[list[Record], list[Record]]:
    """Split BBH items per task into a training part and the evaluation pool, disjoint by
    construction — also by question text, since a few BBH tasks repeat a question: a seeded
    permutation of each task's distinct questions; the first ``train_per_task`` questions train."""
    by_task: dict[str | None, dict[str, list[Record]]] = defaultdict(lambda: defaultdict(list))
    for r in sorted(records, key=lambda r: r.id):
        by_task[r.task][r.question].append(r)
    train: list[Record] = []
    pool: list[Record] = []
    for task in sorted(by_task, key=lambda k: k or ""):
        questions = list(by_task[task])
        random.Random(f"bbh-split:{seed}:{task}").shuffle(questions)
        k = min(max(train_per_task, 0), len(questions))
        for i, q in enumerate(questions):
            (train if i < k else pool).extend(by_task[task][q])
    return sorted(train, key=lambda r: r.id), sorted(pool, key=lambda r: r.id)


def record_from_dict(rec: Any) -> Record:
    """A :class:`Record` from a CoT record / predictions row dict (gold answer from ``gold``,
    ``answer`` or ``target``), or the Record itself."""
    if isinstance(rec, Record):
        return rec
    return Record(
        id=str(rec.get("id", "")),
        dataset=str(rec.get("dataset", "gsm8k")),
        task=rec.get("task"),
        split=str(rec.get("split", "train")),
        question=str(rec["question"]),
        answer=str(rec.get("gold", rec.get("answer", rec.get("target", "")))),
        rationale=None,
    )
