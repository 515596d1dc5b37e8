"""Experiment configuration: nested dataclasses, named profiles, ``SLM_KD_*`` overrides, validation.

Field names mirror :class:`transformers.TrainingArguments` where the two overlap
(``learning_rate``, ``dataloader_num_workers``, ``warmup_ratio``, ``weight_decay``,
``lr_scheduler_type``, ``gradient_checkpointing``, ``optim``, ``save_steps``, ``save_total_limit``,
``max_steps``); :meth:`TrainConfig.training_arguments_kwargs` gives the exact mapping for the rest
(``epochs`` → ``num_train_epochs``, ``batch_size`` → ``per_device_train_batch_size``,
``grad_accum_steps`` → ``gradient_accumulation_steps``, ``clip_grad_norm`` → ``max_grad_norm``,
``log_every`` → ``logging_steps``).

Resolution order (later wins): dataclass defaults → profile → config file (JSON) → explicit
overrides → ``SLM_KD_*`` environment variables (each one logged when it changes a value).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PROFILE_ENV = "SLMKD_PROFILE"
DEFAULT_PROFILE = "a100-80g"
METHODS = ("sft", "kd", "kd-cached", "cascod", "cascod-2stage", "cascod-kd")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and how to fix it."""


@dataclass
class ModelConfig:
    """The model hierarchy. Values are Hub names, local paths, or ``tiny-qwen2-*`` names."""

    teacher_medium: str = "Qwen/Qwen2.5-7B-Instruct"
    student_primary: str = "Qwen/Qwen2.5-3B-Instruct"
    student_small: str = "Qwen/Qwen2.5-1.5B-Instruct"
    teacher_load_in_4bit: bool = False
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Where the data comes from. ``None`` means the Hugging Face Hub."""

    gsm8k_train: str | None = None
    gsm8k_test: str | None = None
    bbh_dir: str | None = None
    bbh_train_per_task: int = 0
    bbh_split_seed: int = 0


@dataclass
class TrainConfig:
    """Optimisation and run-management settings shared by every training method."""

    learning_rate: float = 3e-5
    epochs: int = 3
    batch_size: int = 4
    grad_accum_steps: int = 4
    clip_grad_norm: float = 0.5
    dataloader_num_workers: int = 2
    log_every: int = 20
    save_steps: int = 200
    save_total_limit: int = 3
    max_steps: int = -1
    max_seq_length: int = 1024
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"
    gradient_checkpointing: bool = True
    optim: str = "adamw_torch_fused"
    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    min_supervised_tokens: int = 8
    debug_nan: bool = False
    local_checkpoint_dir: str | None = None
    #: wall-time checkpoint interval (minutes); 0 = every ``save_steps`` steps only
    save_every_minutes: float = 30.0
    #: dtype of the saved ``final/`` model: "bf16" (half the Drive space) or "fp32"
    final_dtype: str = "bf16"
    #: ``slmkd.notebook.train_grid``: copy each run's ``final/`` to Drive in a background thread
    #: while the next run trains (at most one copy in flight; the run is complete once it is
    #: verified); False: the run waits for its copy
    background_final_copy: bool = True
    #: a non-finite value in either model's supervised logits: "skip" the step (counted, logged)
    #: or "sanitize" it (NaN -> -M, clamp) and train on
    nonfinite: str = "skip"
    #: draw each optimiser step's examples from a pool of similar lengths (less padding:
    #: slmkd.training.data.SeededLengthGroupedSampler, deterministic per seed and epoch)
    group_by_length: bool = False

    def training_arguments_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`transformers.TrainingArguments` (names mapped).

        ``warmup_ratio`` is passed as such on transformers 4.x and as a fractional
        ``warmup_steps`` on 5.x, which removed the separate argument."""
        import dataclasses as _dc

        from transformers import TrainingArguments

        has_ratio = "warmup_ratio" in {f.name for f in _dc.fields(TrainingArguments)}
        warmup = ({"warmup_ratio": self.warmup_ratio} if has_ratio
                  else {"warmup_steps": self.warmup_ratio})
        return {**warmup,
            "learning_rate": self.learning_rate,
            "num_train_epochs": self.epochs,
            "per_device_train_batch_size": self.batch_size,
            "gradient_accumulation_steps": self.grad_accum_steps,
            "max_grad_norm": self.clip_grad_norm,
            "dataloader_num_workers": self.dataloader_num_workers,
            "logging_steps": self.log_every,
            "save_steps": self.save_steps,
            "save_total_limit": self.save_total_limit,
            "max_steps": self.max_steps,
            "weight_decay": self.weight_decay,
            "lr_scheduler_type": self.lr_scheduler_type,
            "gradient_checkpointing": self.gradient_checkpointing,
            "optim": self.optim,
        }


@dataclass
class KDConfig:
    """Logit distillation: per-epoch schedules (one value per epoch) and loss guards."""

    temperature_schedule: list[float] = field(default_factory=lambda: [2.0, 1.5, 1.0])
    alpha_schedule: list[float] = field(default_factory=lambda: [0.5, 0.4, 0.3])
    max_logit_abs: float = 50.0
    chunk_size: int | None = None  # None: the loss picks rows per chunk from the vocab size
    #: where the teacher's logits come from: "live" (teacher on the GPU) or "cached"
    #: (``slmkd cache-teacher``: top-k logits + log-normalisers per supervised token)
    teacher_source: str = "live"
    cache_top_k: int = 64


@dataclass
class CasCoDConfig:
    """CasCoD (Dai et al., EMNLP 2024). ``alpha_cascod`` = weight of the answer term (authors': 0.1)."""

    alpha_cascod: float = 0.1
    answer_cue: str = "The answer is"
    #: cascod-2stage, stage 1: "rationale" (the sequential reading: q -> r only) or "joint" (the
    #: joint CasCoD loss, then the stage-2 adapter). Tiny study, 8 seeds, stage 1 at 3 epochs:
    #: without the answer term its rationale CE ends ~2x higher (see ``stage1_epochs``)
    stage1_objective: str = "rationale"
    #: cascod-2stage, stage 1's own budget (None: ``train.epochs`` / ``train.learning_rate``).
    #: Tiny profile: 6 epochs, i.e. as many forward rows as joint CasCoD's 3 epochs of two rows
    #: per pair (the tiny tokenizer never shares a pair's row; twice joint's optimiser steps).
    #: GPU profiles: None, since with Qwen2's tokenizer joint CasCoD's pairs share one row, so
    #: 3 epochs already match its forward rows and steps. Tiny study, 8 seeds: at 3 epochs
    #: the cascade trailed joint CasCoD by 9.1 pts (stage 1's rationale CE ~2x joint's); at 6 it
    #: leads by 4.1 pts, 95 % CI [1.8, 6.5] (99.4 vs 95.3 %)
    stage1_epochs: int | None = None
    stage1_learning_rate: float | None = None
    #: cascod-2stage, stage 2: a LoRA adapter on the frozen stage-1 model (q, r -> a)
    stage2_learning_rate: float = 2e-4
    stage2_epochs: int = 1
    stage2_max_steps: int = -1
    stage2_lora_r: int = 16
    stage2_lora_alpha: int = 32
    #: stage 2 also trains its own copy of the lm_head (peft ``modules_to_save``; the base keeps
    #: the original, so adapter off = stage 1 exactly). Without it the adapter plateaus on the
    #: answer's fixed tokens (tiny: loss 2.1, " " and "." at ~0.7 % each; with it 0.02): the
    #: frozen stage-1 head cannot be steered there by LoRA alone. Costs V × H trainable
    #: parameters (3B: 311 M, ~5 GB with fp32 AdamW states) and a V × H adapter file.
    stage2_train_lm_head: bool = True
    #: fraction of stage-2 examples whose rationale is the stage-1 student's own greedy one
    stage2_student_rationale_fraction: float = 0.5


@dataclass
class GenerationConfig:
    """Teacher chain-of-thought generation (notebook 01)."""

    dataset: str = "gsm8k"
    max_new_tokens: int = 512
    batch_size: int = 64
    backend: str = "hf"
    keep_incorrect: bool = False
    limit: int | None = None
    repetition_ngram: int = 8
    repetition_max_repeats: int = 4
    shard_size: int = 256


@dataclass
class EvalConfig:
    """Evaluation (notebook 04). Limits: ``None`` = full set; subsets are fixed by ``subset_seed``."""

    datasets: list[str] = field(default_factory=lambda: ["gsm8k", "bbh"])
    gsm8k_limit: int | None = 500
    bbh_limit: int | None = 100
    subset_seed: int = 1234
    batch_size: int = 64
    max_new_tokens: int = 512
    backend: str = "hf"
    #: vLLM (backend "vllm"): the share of the card one engine may reserve (weights + KV cache;
    #: one engine at a time: slmkd.generation.engines closes it before the next model)
    vllm_gpu_memory_utilization: float = 0.85
    #: vLLM context length (None: the model's; 4096 covers BBH's 3-shot prompts + 512 new tokens)
    vllm_max_model_len: int | None = 4096
    #: vLLM weights dtype ("auto": the checkpoint's, bf16 for Qwen2.5)
    vllm_dtype: str = "auto"


@dataclass
class TinyConfig:
    """The tiny offline world (CPU): tokenizer, tiny Qwen2 models, synthetic arithmetic task.

    Calibrated on a 2-core CPU (docs/TINY_CALIBRATION.md). Task: ``start ± a ± b`` with start in
    [min_start, max_start] and a, b in [1, max_operand]. Changing any field rebuilds the world.
    """

    seed: int = 0
    num_train: int = 11000
    num_test: int = 300
    min_start: int = 10
    max_start: int = 20
    max_operand: int = 9
    bpe_vocab_size: int = 1024
    teacher_hidden: int = 128
    teacher_layers: int = 2
    teacher_heads: int = 4
    teacher_kv_heads: int = 2
    teacher_intermediate: int = 384
    student_m_hidden: int = 96
    student_m_layers: int = 2
    student_s_hidden: int = 64
    student_s_layers: int = 2
    student_heads: int = 4
    student_kv_heads: int = 2
    student_intermediate_ratio: int = 3
    teacher_extra_rows: int = 128
    student_extra_rows: int = 64
    teacher_pretrain_steps: int = 1800
    teacher_batch_size: int = 32
    teacher_learning_rate: float = 5e-3
    teacher_warmup_ratio: float = 0.05
    max_seq_length: int = 128
    max_position_embeddings: int = 512
    eval_batch_size: int = 300
    max_new_tokens: int = 48
    num_threads: int = 1


@dataclass
class ExperimentConfig:
    """The whole study's configuration. ``to_dict()`` is saved as ``config.json`` in every run."""

    profile: str = DEFAULT_PROFILE
    drive_root: str | None = None
    seeds: list[int] = field(default_factory=lambda: [42, 123, 456])
    students: list[str] = field(default_factory=lambda: ["student_primary", "student_small"])
    methods: list[str] = field(default_factory=lambda: ["sft", "kd", "cascod"])
    # `slmkd run`: trainings run at once, each train+evaluate job in its own worker process
    # (CPU: one thread each). 1 = sequential, in-process (the GPU profiles).
    parallel_runs: int = 1
    models: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    cascod: CasCoDConfig = field(default_factory=CasCoDConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    tiny: TinyConfig = field(default_factory=TinyConfig)

    # -- convenience -------------------------------------------------------------------------
    @property
    def is_tiny(self) -> bool:
        return self.profile == "tiny"

    @property
    def teacher(self) -> str:
        return self.models.teacher_medium

    def student_name(self, key_or_name: str) -> str:
        """``"student_small"`` → its model name; any other string is returned unchanged."""
        if key_or_name in ("student_primary", "student_small", "teacher_medium"):
            return getattr(self.models, key_or_name)
        return key_or_name

    def student_names(self) -> list[str]:
        return [self.student_name(s) for s in self.students]

    def schedule_for_epoch(self, epoch: int) -> tuple[float, float]:
        """(temperature, alpha) for a 0-based epoch; epochs past the schedule keep the last value."""
        i = min(max(int(epoch), 0), len(self.kd.temperature_schedule) - 1)
        return self.kd.temperature_schedule[i], self.kd.alpha_schedule[i]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | os.PathLike) -> Path:
        from slmkd.fileio import atomic_write_text

        return atomic_write_text(Path(path), self.to_json() + "\n")

    def fingerprint(self, sections: list[str] | None = None) -> str:
        """Short hash of the config (or of some top-level sections), for change detection."""
        d = self.to_dict()
        if sections is not None:
            d = {k: d[k] for k in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A deep copy with dotted-path overrides, e.g. ``replace(**{"train.max_steps": 10})``."""
        new = copy.deepcopy(self)
        apply_overrides(new, changes)
        validate(new)
        return new


# -- profiles --------------------------------------------------------------------------------
# Each profile is a dict of dotted-path overrides applied on top of the dataclass defaults.
PROFILES: dict[str, dict[str, Any]] = {
    # 80 GB: 8-bit AdamW states keep one 3B checkpoint at 20 GB (37 GB with fp32 states), so the
    # study's Drive peak stays under 100 GB (`slmkd plan`: 94.7 GB; 111 GB with fp32 states).
    # Both GPU profiles: vLLM for the teacher's CoT and the evaluation when it is installed
    # (backend "auto"; one engine per model, closed before the next: slmkd.generation.engines),
    # length-grouped training batches.
    "a100-80g": {"train.optim": "adamw_bnb_8bit", "generation.batch_size": 256,
                 "evaluation.batch_size": 128, "generation.backend": "auto",
                 "evaluation.backend": "auto", "train.group_by_length": True},
    # 40 GB: LoRA (r 16) on every student, so every method x student fits <= 38 GiB with the
    # bf16 teacher live (`slmkd plan --profile a100-40g`): the teacher that writes the CoT, the
    # KD teacher and the evaluated teacher are one model in one precision. LoRA's lr is higher.
    "a100-40g": {"train.use_lora": True, "train.lora_r": 16, "train.lora_alpha": 32,
                 "train.learning_rate": 2e-4, "train.optim": "adamw_torch_fused",
                 "train.batch_size": 4, "train.grad_accum_steps": 4,
                 "models.teacher_load_in_4bit": False, "generation.batch_size": 128,
                 "evaluation.batch_size": 48, "generation.backend": "auto",
                 "evaluation.backend": "auto", "evaluation.vllm_gpu_memory_utilization": 0.80,
                 "train.group_by_length": True},
    "tiny": {
        # Calibrated on a 2-core CPU: docs/TINY_CALIBRATION.md (student-s, h64 x 2 layers, reached
        # 94% with plain CE after 1,000 steps of batch 32 at lr 5e-3; 500-600 steps stay < 15%).
        # 3 epochs over ~10.5k kept teacher CoTs (tiny.num_train=11000) = ~1,000 steps per run.
        "models.teacher_medium": "tiny-qwen2-teacher",
        "models.student_primary": "tiny-qwen2-student-m",
        "models.student_small": "tiny-qwen2-student-s",
        "students": ["student_small"],
        "parallel_runs": 2,
        "train.learning_rate": 5e-3,
        "train.epochs": 3,
        "train.batch_size": 32,
        "train.grad_accum_steps": 1,
        "train.dataloader_num_workers": 0,
        "train.save_every_minutes": 0.0,  # step-based checkpoints: deterministic tests
        "train.final_dtype": "fp32",  # CPU: no bf16 speed to gain, and exact comparisons
        "cascod.stage1_epochs": 6,  # rows-matched to cascod's 3 epochs x 2 rows (CasCoDConfig)
        "cascod.stage2_learning_rate": 5e-3,
        "cascod.stage2_epochs": 3,  # 1 epoch under-trains the tiny answer adapter (CE 2.44)
        "train.log_every": 50,
        "train.save_steps": 500,
        "train.max_seq_length": 128,
        "train.warmup_ratio": 0.05,
        "train.weight_decay": 0.0,
        "train.lr_scheduler_type": "cosine",
        "train.gradient_checkpointing": False,
        "train.optim": "adamw_torch",
        "train.min_supervised_tokens": 4,
        "generation.max_new_tokens": 48,
        "generation.batch_size": 512,
        "evaluation.datasets": ["gsm8k"],
        "evaluation.gsm8k_limit": 300,
        "evaluation.batch_size": 300,
        "evaluation.max_new_tokens": 48,
        "kd.chunk_size": 4096,
    },
}

# Environment variables users already rely on: name → (dotted path, type).
ENV_OVERRIDES: dict[str, tuple[str, type]] = {
    "SLM_KD_DEBUG_NAN": ("train.debug_nan", bool),
    "SLM_KD_CLIP_GRAD_NORM": ("train.clip_grad_norm", float),
    "SLM_KD_MAX_LOGIT_ABS": ("kd.max_logit_abs", float),
    "SLM_KD_MIN_SUPERVISED_TOKENS": ("train.min_supervised_tokens", int),
    "SLM_KD_LOG_EVERY": ("train.log_every", int),
}

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


def parse_env_value(name: str, raw: str, typ: type) -> Any:
    """Parse one environment value; raise :class:`ConfigError` naming the variable if it fails."""
    text = raw.strip()
    if typ is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no).")
    try:
        return typ(text)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {typ.__name__}.") from None


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``SLM_KD_*`` overrides present in the environment, as dotted-path → parsed value."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name, (path, typ) in ENV_OVERRIDES.items():
        if name in environ:
            out[path] = parse_env_value(name, environ[name], typ)
    return out


def _set_path(cfg: Any, path: str, value: Any) -> Any:
    obj = cfg
    parts = path.split(".")
    for p in parts[:-1]:
        if not hasattr(obj, p):
            raise ConfigError(f"Unknown config section {p!r} in {path!r}.")
        obj = getattr(obj, p)
    if not dataclasses.is_dataclass(obj) or parts[-1] not in {f.name for f in dataclasses.fields(obj)}:
        raise ConfigError(f"Unknown config field {path!r}.")
    old = getattr(obj, parts[-1])
    setattr(obj, parts[-1], copy.deepcopy(value))
    return old


def apply_overrides(cfg: ExperimentConfig, overrides: dict[str, Any], source: str = "") -> None:
    """Apply dotted-path overrides (``{"train.learning_rate": 1e-4}``) in place."""
    for path, value in overrides.items():
        old = _set_path(cfg, path, value)
        if source and old != value:
            logger.warning("%s overrides %s: %r -> %r", source, path, old, value)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def validate(cfg: ExperimentConfig) -> None:
    """Raise :class:`ConfigError` with a clear message for any inconsistent value."""
    kd, tr = cfg.kd, cfg.train
    if cfg.profile not in PROFILES:
        raise ConfigError(f"Unknown profile {cfg.profile!r}; choose one of {sorted(PROFILES)}.")
    if tr.epochs < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {tr.epochs}.")
    for name in ("temperature_schedule", "alpha_schedule"):
        sched = getattr(kd, name)
        if len(sched) != tr.epochs:
            raise ConfigError(
                f"kd.{name} has {len(sched)} values but train.epochs={tr.epochs}: "
                "give exactly one value per epoch."
            )
    for i, t in enumerate(kd.temperature_schedule):
        if not t > 0:
            raise ConfigError(f"kd.temperature_schedule[{i}]={t}: temperatures must be > 0.")
    for i, a in enumerate(kd.alpha_schedule):
        if not 0.0 <= a <= 1.0:
            raise ConfigError(f"kd.alpha_schedule[{i}]={a}: alpha must lie in [0, 1].")
    if not 0.0 <= cfg.cascod.alpha_cascod <= 1.0:
        raise ConfigError(f"cascod.alpha_cascod={cfg.cascod.alpha_cascod} must lie in [0, 1].")
    if not kd.max_logit_abs > 0:
        raise ConfigError(f"kd.max_logit_abs={kd.max_logit_abs} must be > 0.")
    if kd.chunk_size is not None and kd.chunk_size < 1:
        raise ConfigError(f"kd.chunk_size={kd.chunk_size} must be >= 1.")
    positive = {"train.learning_rate": tr.learning_rate, "train.batch_size": tr.batch_size,
                "train.grad_accum_steps": tr.grad_accum_steps, "train.log_every": tr.log_every,
                "train.save_steps": tr.save_steps, "train.max_seq_length": tr.max_seq_length,
                "generation.max_new_tokens": cfg.generation.max_new_tokens,
                "generation.batch_size": cfg.generation.batch_size,
                "evaluation.batch_size": cfg.evaluation.batch_size,
                "evaluation.max_new_tokens": cfg.evaluation.max_new_tokens}
    for name, v in positive.items():
        if not v > 0:
            raise ConfigError(f"{name}={v} must be > 0.")
    if not tr.clip_grad_norm > 0:
        raise ConfigError(f"train.clip_grad_norm={tr.clip_grad_norm} must be > 0.")
    if tr.min_supervised_tokens < 0:
        raise ConfigError(f"train.min_supervised_tokens={tr.min_supervised_tokens} must be >= 0.")
    if tr.dataloader_num_workers < 0:
        raise ConfigError("train.dataloader_num_workers must be >= 0.")
    for name, lim in (("gsm8k_limit", cfg.evaluation.gsm8k_limit),
                      ("bbh_limit", cfg.evaluation.bbh_limit)):
        if lim is not None and lim < 1:
            raise ConfigError(f"evaluation.{name}={lim} must be >= 1 or None (full set).")
    for d in cfg.evaluation.datasets:
        if d not in ("gsm8k", "bbh"):
            raise ConfigError(f"evaluation.datasets contains {d!r}; known: 'gsm8k', 'bbh'.")
    if cfg.generation.dataset not in ("gsm8k", "bbh"):
        raise ConfigError(f"generation.dataset={cfg.generation.dataset!r}; known: 'gsm8k', 'bbh'.")
    for b in (cfg.generation.backend, cfg.evaluation.backend):
        if b not in ("hf", "vllm", "auto"):
            raise ConfigError(f"Unknown generation backend {b!r}; choose 'hf', 'vllm' or 'auto' "
                              "(vLLM when it is installed and a CUDA GPU is there, else HF).")
    for m in cfg.methods:
        if m not in METHODS:
            raise ConfigError(f"Unknown method {m!r}; choose from {list(METHODS)}.")
    if not cfg.seeds:
        raise ConfigError("seeds must not be empty.")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds contains duplicates: {cfg.seeds}.")
    if not cfg.students:
        raise ConfigError("students must not be empty.")
    if cfg.parallel_runs < 1:
        raise ConfigError(f"parallel_runs={cfg.parallel_runs} must be >= 1.")
    if tr.save_every_minutes < 0:
        raise ConfigError(f"train.save_every_minutes={tr.save_every_minutes} must be >= 0.")
    if tr.final_dtype not in ("bf16", "fp32"):
        raise ConfigError(f"train.final_dtype={tr.final_dtype!r}; choose 'bf16' or 'fp32'.")
    if tr.nonfinite not in ("skip", "sanitize"):
        raise ConfigError(f"train.nonfinite={tr.nonfinite!r}; choose 'skip' or 'sanitize'.")
    if kd.teacher_source not in ("live", "cached"):
        raise ConfigError(f"kd.teacher_source={kd.teacher_source!r}; choose 'live' or 'cached'.")
    if kd.cache_top_k < 1:
        raise ConfigError(f"kd.cache_top_k={kd.cache_top_k} must be >= 1.")
    if not 0.0 <= cfg.cascod.stage2_student_rationale_fraction <= 1.0:
        raise ConfigError("cascod.stage2_student_rationale_fraction="
                          f"{cfg.cascod.stage2_student_rationale_fraction} must lie in [0, 1].")
    if cfg.cascod.stage1_objective not in ("rationale", "joint"):
        raise ConfigError(f"cascod.stage1_objective={cfg.cascod.stage1_objective!r}; choose "
                          "'rationale' or 'joint'.")
    if (cfg.cascod.stage1_epochs is not None and int(cfg.cascod.stage1_epochs) < 1) or (
            cfg.cascod.stage1_learning_rate is not None and cfg.cascod.stage1_learning_rate <= 0):
        raise ConfigError("cascod.stage1_epochs must be >= 1 and cascod.stage1_learning_rate > 0 "
                          "(or None: train.epochs / train.learning_rate).")
    if cfg.cascod.stage2_epochs < 1 or cfg.cascod.stage2_learning_rate <= 0:
        raise ConfigError("cascod.stage2_epochs must be >= 1 and cascod.stage2_learning_rate > 0.")


def load_config(
    profile: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> ExperimentConfig:
    """Resolve the experiment configuration.

    Args:
        profile: ``a100-80g`` (defaults), ``a100-40g`` or ``tiny``; default ``$SLMKD_PROFILE`` or
            ``a100-80g``.
        config_file: optional JSON file, either nested like ``config.json`` or flat dotted paths.
        overrides: dotted-path overrides, e.g. ``{"train.learning_rate": 1e-4}``.
        environ: environment mapping (default ``os.environ``); ``SLM_KD_*`` win over everything
            and are logged.
    """
    environ = os.environ if environ is None else environ
    profile = profile or environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    if profile not in PROFILES:
        raise ConfigError(f"Unknown profile {profile!r}; choose one of {sorted(PROFILES)}.")
    cfg = ExperimentConfig(profile=profile)
    apply_overrides(cfg, PROFILES[profile])
    if config_file is not None:
        data = json.loads(Path(config_file).read_text())
        data.pop("profile", None)
        apply_overrides(cfg, _flatten(data))
    if overrides:
        apply_overrides(cfg, overrides)
    if cfg.drive_root is None and environ.get("SLMKD_DRIVE_ROOT"):
        cfg.drive_root = environ["SLMKD_DRIVE_ROOT"]
    apply_overrides(cfg, env_overrides(environ), source="environment")
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Rebuild a config saved with :meth:`ExperimentConfig.to_dict` (e.g. a run's config.json)."""
    cfg = ExperimentConfig(profile=data.get("profile", DEFAULT_PROFILE))
    rest = {k: v for k, v in data.items() if k != "profile"}
    apply_overrides(cfg, _flatten(rest))
    return cfg
