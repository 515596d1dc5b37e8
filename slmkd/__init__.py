"""slmkd — distil chain-of-thought reasoning from a large teacher into small students.

The public API is what this module exports; heavy modules (torch, transformers) are imported
lazily on first use so ``import slmkd`` and the ``slmkd`` CLI start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from slmkd._version import __version__

_EXPORTS: dict[str, str] = {
    # configuration and runtime
    "ExperimentConfig": "slmkd.config", "ConfigError": "slmkd.config",
    "load_config": "slmkd.config", "PROFILES": "slmkd.config",
    "get_drive_root": "slmkd.runtime", "in_colab": "slmkd.runtime",
    "pick_device": "slmkd.runtime", "pick_dtype": "slmkd.runtime",
    "model_slug": "slmkd.layout", "load_causal_lm": "slmkd.modeling",
    "load_tokenizer": "slmkd.modeling", "resolve_model_path": "slmkd.modeling",
    # data
    "Record": "slmkd.data", "load_gsm8k": "slmkd.data", "load_bbh": "slmkd.data",
    "load_bbh_cot_prompts": "slmkd.data", "build_prompt": "slmkd.data",
    "tokenize_example": "slmkd.data",
    # tiny world
    "ensure_tiny_world": "slmkd.tiny",
    # losses and vocab
    "kd_loss": "slmkd.losses", "fused_kd_loss": "slmkd.losses", "KDLossOutput": "slmkd.losses",
    "ensure_vocab_alignment": "slmkd.vocab", "align_teacher_logits": "slmkd.vocab",
    # stages
    "generate_cot": "slmkd.teacher", "load_cot_records": "slmkd.teacher",
    "cot_dir": "slmkd.layout",
    "train": "slmkd.training", "run_dir_for": "slmkd.layout",
    "split_rationale_answer": "slmkd.data.cot_format", "cascaded_generate": "slmkd.generation",
    "error_propagation": "slmkd.evaluation",
    "evaluate_model": "slmkd.evaluation", "evaluate_run": "slmkd.evaluation",
    "extract_answer": "slmkd.scoring", "is_correct": "slmkd.scoring",
    "score_output": "slmkd.scoring",
    "write_report": "slmkd.report",
    "preflight": "slmkd.preflight", "estimate_vram": "slmkd.planner",
    "plan_study_budget": "slmkd.study_plan",
    "config_panel": "slmkd.widgets",
    "run_study": "slmkd.pipeline",
}

__all__ = ["__version__", *_EXPORTS]


def _tiny_world(cfg: Any) -> Any:
    from slmkd.tiny import ensure_tiny_world

    return ensure_tiny_world(cfg)


# The composition root: the tiny world (a stand-in for the Hub, built above data and modeling)
# is registered here, so ``slmkd.data`` and ``slmkd.modeling`` find it without importing it.
from slmkd import worlds as _worlds  # noqa: E402

_worlds.register_world("tiny", _tiny_world)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slmkd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
