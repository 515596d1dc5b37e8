"""Which records a stage uses, resolved from the config in one place.

* GSM8K: ``cfg.data.gsm8k_train/test`` paths, else the tiny world's synthetic files in the tiny
  profile, else the Hub.
* BBH: ``cfg.data.bbh_dir`` or the Hub; ``split="train"`` is the seeded per-task training
  part (``cfg.data.bbh_train_per_task`` items per task) and ``split="test"`` the evaluation pool:
  disjoint by construction (:func:`slmkd.data.records.bbh_train_eval_split`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slmkd.data.bbh import load_bbh, load_bbh_cot_prompts
from slmkd.data.gsm8k import load_gsm8k
from slmkd.data.records import LoadResult, bbh_train_eval_split

if TYPE_CHECKING:  # pragma: no cover
    from slmkd.config import ExperimentConfig


def gsm8k_path(cfg: ExperimentConfig, split: str) -> str | None:
    path = cfg.data.gsm8k_train if split == "train" else cfg.data.gsm8k_test
    if path is None and cfg.is_tiny:
        from slmkd.worlds import world_for

        world = world_for(cfg)
        path = str(world.train_path if split == "train" else world.test_path)
    return path


def load_records(cfg: ExperimentConfig, dataset: str, split: str) -> LoadResult:
    """Records of ``dataset`` (``gsm8k``/``bbh``) for ``split`` (``train``/``test``)."""
    if dataset == "gsm8k":
        return load_gsm8k(split, gsm8k_path(cfg, split))
    if dataset == "bbh":
        full = load_bbh(cfg.data.bbh_dir)
        train, pool = bbh_train_eval_split(full.records, cfg.data.bbh_train_per_task,
                                           cfg.data.bbh_split_seed)
        if split == "train" and not train:
            raise ValueError("BBH has no training split unless cfg.data.bbh_train_per_task > 0.")
        return LoadResult(train if split == "train" else pool, full.skipped)
    raise ValueError(f"Unknown dataset {dataset!r}; known: 'gsm8k', 'bbh'.")


def bbh_prompts_for(cfg: ExperimentConfig, dataset: str) -> dict[str, str] | None:
    """The BBH CoT prompts when ``dataset == "bbh"``, else None (what build_prompt takes)."""
    return load_bbh_cot_prompts(cfg.data.bbh_dir) if dataset == "bbh" else None
