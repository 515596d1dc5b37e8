"""The Drive-root layout: where every stage reads and writes (the binding contract of
``shared/DESIGN.md``), as pure path functions.

::

    {drive_root}/
      tiny/                                   tiny profile only (the tiny world)
      cot/{dataset}/{teacher_slug}/           01: shard-*.jsonl, cot_stats.json, cot_lengths.png
      runs/{method}/{student_slug}/seed{N}/   02/03: config.json, log.jsonl, plots/, final/, ...
      eval/{model_slug}/{dataset}/            04: predictions.jsonl, summary.json, eval_meta.json
      report/                                 05: report.md, results.csv, *.png

Data flows one way through these folders: CoT → runs → predictions → report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["cot_dir", "eval_dir", "model_slug", "report_dir", "run_dir_for", "run_model_slug",
           "tiny_root"]


def model_slug(name: str) -> str:
    """A stable folder name from a model name or path: ``Qwen/Qwen2.5-1.5B-Instruct`` →
    ``Qwen2.5-1.5B-Instruct``. A path ending in ``final`` (a trained run) is not a good slug:
    callers name runs ``{method}__{student}__seed{N}`` instead (:func:`run_model_slug`)."""
    slug = str(name).rstrip("/").split("/")[-1]
    return "".join(c if (c.isalnum() or c in "._-") else "_" for c in slug)


def _root(cfg: Any) -> Path:
    from slmkd.runtime import get_drive_root

    return get_drive_root(cfg)


def cot_dir(cfg: Any, dataset: str | None = None, teacher: str | None = None) -> Path:
    """``{drive_root}/cot/{dataset}/{teacher_slug}`` (defaults: the config's dataset and teacher)."""
    dataset = dataset or cfg.generation.dataset
    teacher = teacher or cfg.models.teacher_medium
    return _root(cfg) / "cot" / dataset / model_slug(teacher)


def run_dir_for(cfg: Any, method: str, student: str, seed: int) -> Path:
    """``{drive_root}/runs/{method}/{student_slug}/seed{N}`` (``student``: a key of
    ``cfg.models`` or a model name)."""
    return _root(cfg) / "runs" / method / model_slug(cfg.student_name(student)) / \
        f"seed{int(seed)}"


def run_model_slug(method: str, student: str, seed: int) -> str:
    """``{method}__{student_slug}__seed{N}``: the eval folder name of a trained run."""
    return f"{method}__{model_slug(student)}__seed{int(seed)}"


def eval_dir(cfg: Any, model_slug: str, dataset: str) -> Path:
    """``{drive_root}/eval/{model_slug}/{dataset}``."""
    return _root(cfg) / "eval" / model_slug / dataset


def report_dir(cfg: Any = None, drive_root: str | Path | None = None) -> Path:
    """``{drive_root}/report``."""
    return (Path(drive_root) if drive_root is not None else _root(cfg)) / "report"


def tiny_root(cfg: Any) -> Path:
    """``{drive_root}/tiny``: the tiny world (tokenizer, models, synthetic data)."""
    return _root(cfg) / "tiny"
