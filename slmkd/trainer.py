"""Distillation training on :class:`transformers.Trainer`: methods, schedules, guards, resume.

Method registry (how CasCoD and any new method plug in)
-------------------------------------------------------
A training method is a :class:`MethodSpec` registered with :func:`register_method`::

    register_method(MethodSpec(
        name="my-method",
        needs_teacher=False,        # load the teacher (eval mode, no grad)?
        build_datasets=my_build,    # (cfg, records, tokenizer) -> (dataset, stats)
        compute_loss=my_loss,       # (trainer, model, inputs, items) -> (loss, metrics)
        make_collator=None,         # (cfg, tokenizer) -> collator; default PaddingCollator
        count_items=None,           # (batch) -> {name: int tensor}; default "supervised"
        stages=(),                  # registered methods run one after another (two-stage)
        config_sections=("models", "data", "train", "generation", "tiny"),
    ))

* ``build_datasets(cfg, records, tokenizer)``: ``records`` are the kept teacher CoT records
  (:func:`slmkd.training_data.load_training_records`); return a map-style dataset of dicts and a
  stats object with ``to_dict()`` (or a dict), stored in ``train_summary.json``.
* ``count_items(batch)``: the token counts that normalise the loss, e.g.
  ``{"supervised": (labels[:, 1:] != -100).sum()}``. The trainer sums them over the micro-batches
  of one optimiser step **and over all processes**, and passes the totals as ``items`` to
  ``compute_loss``. Key ``"supervised"`` is also what the ``min_supervised_tokens`` guard checks.
* ``compute_loss(trainer, model, inputs, items)`` returns ``(loss, metrics)``: ``loss`` is this
  micro-batch's *sum* of token losses divided by the global count (so summing over micro-batches and
  processes gives the token mean of the whole step); ``metrics`` holds detached scalars with the
  same normalisation (``"ce"``, ``"kd"``) and optionally ``"num_nonfinite"``. Do not multiply by the
  number of processes and do not handle NaN: the trainer does both. Useful helpers on ``trainer``:
  :meth:`DistillationTrainer.student_hidden` (final hidden states [B, T, H] and the lm_head weight
  [V, H], without materialising logits), :meth:`DistillationTrainer.teacher_hidden`,
  ``trainer.temperature`` / ``trainer.alpha`` (current epoch's schedule values),
  ``trainer.cfg``, ``trainer.vocab_size`` and :func:`kd_or_ce_loss` (the ``kd``/``sft`` loss).
* ``stages``: a two-stage method lists the registered methods of its stages; :func:`train` runs
  them in ``{run_dir}/stage{i}/`` (each one a complete, resumable run whose student starts from the
  previous stage's ``final/``) and the parent summary points to the last stage's model.

Methods ``sft`` and ``kd`` are defined here; ``slmkd.cascod`` registers the CasCoD methods and is
imported lazily by :func:`get_method`.

Loss (``kd``): with student/teacher final hidden states ``h_s, h_t`` and lm_head weights
``W_s, W_t``, :func:`slmkd.losses.fused_kd_loss` computes, in vocabulary chunks and over the
supervised positions ``S`` of the step (``N = |S|`` summed over micro-batches and processes),
``L = (1 - α) · CE(W_s h_s, y) + α · T² · KL(softmax(W_t h_t / T) ‖ softmax(W_s h_s / T))``,
each term ``(1/N) Σ_{t∈S}``; ``sft`` is the same with ``α = 0`` and no teacher.

Guards: an optimiser step whose global supervised-token count is below ``min_supervised_tokens``,
whose loss is non-finite on any micro-batch of any process, or whose gradient norm is
non-finite, is skipped: the gradients are dropped, the optimiser and the LR scheduler do not step
(AdamW with zero gradients would still move the weights through momentum and weight decay).
Skips are counted (saved in every checkpoint) and described when ``cfg.train.debug_nan``
(``SLM_KD_DEBUG_NAN=1``); the fraction is reported at the end and flagged when ≥ 1 %.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from slmkd.checkpoint import DriveSyncer, select_resume_checkpoint, write_manifest
from slmkd.monitor import LOG_NAME, TrainingMonitor, read_log, save_plots, truncate_log, vram_stats
from slmkd.runtime import atomic_write_json, read_json
from slmkd.training_data import META_KEYS, PaddingCollator, build_sft_examples, count_supervised

if TYPE_CHECKING:  # pragma: no cover
    from slmkd.config import ExperimentConfig

logger = logging.getLogger(__name__)

SUMMARY_NAME = "train_summary.json"
CONFIG_NAME = "config.json"
RUN_META_NAME = "run.json"
STATE_NAME = "slmkd_state.json"
FINAL_DIR = "final"
SKIP_WARN_FRACTION = 0.01
#: fault injection for the kill -9 test: SIGKILL this process at the end of that optimiser step
FAULT_KILL_ENV = "SLMKD_FAULT_KILL_AT_STEP"
#: settings that do not change the trained weights (never part of the resume check)
OPERATIONAL_KEYS = frozenset({
    "train.log_every", "train.save_steps", "train.save_total_limit",
    "train.dataloader_num_workers", "train.debug_nan", "train.local_checkpoint_dir",
    "generation.batch_size", "generation.backend", "generation.shard_size",
    "models.trust_remote_code",
})


class RunConfigMismatchError(RuntimeError):
    """An existing run directory was made with another configuration."""


# =============================================================================================
# method registry
# =============================================================================================
Items = dict[str, torch.Tensor]


@dataclass
class MethodSpec:
    """A training method (see the module docstring)."""

    name: str
    needs_teacher: bool
    build_datasets: Callable[..., tuple[Any, Any]] | None = None
    compute_loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
    make_collator: Callable[[Any, Any], Callable] | None = None
    count_items: Callable[[dict[str, Any]], Items] | None = None
    stages: tuple[str, ...] = ()
    config_sections: tuple[str, ...] = ("models", "data", "train", "kd", "generation", "tiny")
    description: str = ""


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Register (or replace) a training method; returns it."""
    if not spec.stages and (spec.build_datasets is None or spec.compute_loss is None):
        raise ValueError(f"Method {spec.name!r} needs build_datasets and compute_loss (or stages).")
    _METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The registered method ``name`` (imports :mod:`slmkd.cascod` for the CasCoD methods)."""
    if name not in _METHODS:
        with contextlib.suppress(ImportError):
            import slmkd.cascod  # noqa: F401 — registers its methods
    if name not in _METHODS:
        raise ValueError(f"Unknown training method {name!r}; registered: {sorted(_METHODS)}.")
    return _METHODS[name]


def registered_methods() -> list[str]:
    with contextlib.suppress(ImportError):
        import slmkd.cascod  # noqa: F401
    return sorted(_METHODS)


def default_count_items(batch: dict[str, Any]) -> Items:
    """``{"supervised": labels[:, 1:] != -100 summed}`` — the tokens that reach the loss."""
    return {"supervised": count_supervised(batch["labels"])}


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
    )
    metrics = {"ce": out.ce.detach(), "kd": out.kd.detach(),
               "num_nonfinite": torch.as_tensor(out.num_nonfinite)}
    return out.loss, metrics


def _sft_loss(trainer, model, inputs, items):
    return kd_or_ce_loss(trainer, model, inputs, items, use_teacher=False)


def _kd_loss(trainer, model, inputs, items):
    return kd_or_ce_loss(trainer, model, inputs, items, use_teacher=True)


register_method(MethodSpec(
    name="sft", needs_teacher=False, build_datasets=build_cot_datasets, compute_loss=_sft_loss,
    config_sections=("models", "data", "train", "generation", "tiny"),
    description="CoT distillation: cross-entropy on the teacher's chain of thought."))
register_method(MethodSpec(
    name="kd", needs_teacher=True, build_datasets=build_cot_datasets, compute_loss=_kd_loss,
    description="Logit KD on the teacher's CoT: (1-α)·CE + α·T²·KL, per-epoch T and α."))


# =============================================================================================
# guard state
# =============================================================================================
@dataclass
class GuardState:
    """Optimiser-step accounting: steps taken, skipped (by reason), and details when debugging."""

    steps: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    details: list[dict[str, Any]] = field(default_factory=list)

    @property
    def skipped_fraction(self) -> float:
        return self.skipped / self.steps if self.steps else 0.0

    def record(self, skipped: bool, reason: str | None = None,
               detail: dict[str, Any] | None = None) -> None:
        self.steps += 1
        if skipped:
            self.skipped += 1
            self.reasons[reason or "unknown"] = self.reasons.get(reason or "unknown", 0) + 1
            if detail is not None and len(self.details) < 200:
                self.details.append(detail)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuardState:
        return cls(steps=int(d.get("steps", 0)), skipped=int(d.get("skipped", 0)),
                   reasons=dict(d.get("reasons", {})), details=list(d.get("details", [])))


# =============================================================================================
# the Trainer subclass
# =============================================================================================
class DistillationTrainer(Trainer):
    """:class:`transformers.Trainer` with a registered method's loss, global token normalisation,
    skip guards, per-epoch schedules, extra log metrics and Drive-synced checkpoints."""

    def __init__(self, *args: Any, spec: MethodSpec, cfg: ExperimentConfig, teacher: Any = None,
                 vocab_size: int, guard: GuardState | None = None,
                 syncer: DriveSyncer | None = None, run_state: dict[str, Any] | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.cfg = cfg
        self.teacher = teacher
        self.vocab_size = int(vocab_size)
        self.guard = guard or GuardState()
        self.syncer = syncer
        self.run_state = run_state or {}
        self.temperature, self.alpha = cfg.schedule_for_epoch(0)
        # our losses are already normalised over the whole accumulated (global) batch
        self.loss_is_scaled_for_ga = True
        self.debug_nan = bool(cfg.train.debug_nan)
        self._count_items = spec.count_items or default_count_items
        self._captured: dict[int, torch.Tensor] = {}
        self._hooked: set[int] = set()
        self._step_flags: dict[str, Any] = {}
        self._step_metrics: dict[str, torch.Tensor] = {}
        self._win = self._new_window()
        self._last_grad_norm: Any = None
        import inspect

        from slmkd import losses

        self.loss_accepts_chunk_size = "chunk_size" in inspect.signature(
            losses.fused_kd_loss).parameters
        self._reset_step()

    # -- hidden states without logits -----------------------------------------------------
    @staticmethod
    def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
        m = model
        while hasattr(m, "module") and not hasattr(m, "lm_head"):  # DDP / accelerate wrappers
            m = m.module
        if hasattr(m, "get_base_model"):  # peft
            m = m.get_base_model()
        return m

    @staticmethod
    def _decoder(lm: torch.nn.Module) -> torch.nn.Module:
        dec = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
        if dec is None and hasattr(lm, "get_decoder"):
            dec = lm.get_decoder()
        if dec is None:
            raise TypeError(f"Cannot find the decoder of {type(lm).__name__}.")
        return dec

    def student_hidden(self, model: torch.nn.Module, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final (normed) hidden states [B, T, H] and lm_head weight [V, H] of the student.

        The forward goes through the (possibly DDP/FSDP-wrapped) model so gradient
        synchronisation works, with ``logits_to_keep=1`` (one position of logits); the decoder
        output is captured by a forward hook."""
        lm = self._causal_lm(model)
        dec = self._decoder(lm)
        key = id(dec)
        if key not in self._hooked:
            def hook(_mod, _inp, out, _key=key):
                self._captured[_key] = out[0] if isinstance(out, tuple) else out.last_hidden_state
            dec.register_forward_hook(hook)
            self._hooked.add(key)
        self._captured.pop(key, None)
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1,
              use_cache=False)
        hidden = self._captured.pop(key)
        return hidden, lm.get_output_embeddings().weight

    @torch.no_grad()
    def teacher_hidden(self, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher final hidden states [B, T, H_t] and lm_head weight [V_t, H_t] (eval, no grad)."""
        if self.teacher is None:
            raise RuntimeError(
                f"Method {self.spec.name!r} asked for the teacher but none is loaded.")
        self.teacher.eval()
        dec = self._decoder(self.teacher)
        dev = next(self.teacher.parameters()).device
        out = dec(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev),
                  use_cache=False)
        return out.last_hidden_state, self.teacher.get_output_embeddings().weight

    # -- token counts over the accumulated, global batch ----------------------------------
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Items | None:
        if not batch_samples:
            return None
        totals: dict[str, torch.Tensor] = {}
        for b in batch_samples:
            for k, v in self._count_items(b).items():
                totals[k] = totals.get(k, 0) + torch.as_tensor(v, dtype=torch.long)
        keys = sorted(totals)
        vec = torch.stack([totals[k].reshape(()) for k in keys]).to(device)
        if self.accelerator.num_processes > 1:
            vec = self.accelerator.reduce(vec, reduction="sum")
        return {k: vec[i] for i, k in enumerate(keys)}

    # -- loss ------------------------------------------------------------------------------
    def _zero_loss(self, model: torch.nn.Module) -> torch.Tensor:
        """0 connected to every trainable parameter (all get a zero gradient: DDP-safe)."""
        terms = [p.reshape(-1)[:1].sum() for p in model.parameters() if p.requires_grad]
        return torch.stack(terms).sum() * 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        meta = {k: inputs.pop(k) for k in list(inputs) if k in META_KEYS}
        items = num_items_in_batch
        if not isinstance(items, dict):
            items = {k: torch.as_tensor(v).to(self.args.device)
                     for k, v in self._count_items(inputs).items()}
        sup = int(items.get("supervised", torch.tensor(1 << 30)))
        local = self._count_items(inputs)
        self._step_flags["supervised"] = sup
        self._win["input_tokens"] += int(inputs["attention_mask"].sum())
        if sup < max(self.cfg.train.min_supervised_tokens, 1):
            self._step_flags["low_tokens"] = True
            loss = self._zero_loss(model)
        else:
            loss, metrics = self.spec.compute_loss(self, model, inputs, items)
            if not bool(torch.isfinite(loss.detach())):
                self._step_flags["nonfinite"] = self._step_flags.get("nonfinite", 0) + 1
                if self.debug_nan:
                    self._step_flags.setdefault("micro", []).append({
                        "example_ids": meta.get("example_id"),
                        "loss": float(loss.detach()),
                        **{k: (float(v) if torch.as_tensor(v).numel() == 1 else None)
                           for k, v in metrics.items()},
                        "local_supervised": {k: int(v) for k, v in local.items()},
                        "temperature": self.temperature, "alpha": self.alpha})
                loss = self._zero_loss(model)
            else:
                self._step_metrics["loss"] = self._step_metrics.get("loss", 0.0) + loss.detach()
                for k, v in metrics.items():  # every scalar metric (ce, kd, rationale_ce, ...)
                    v = torch.as_tensor(v).detach().float()
                    if k != "num_nonfinite" and v.numel() == 1:
                        self._step_metrics[k] = self._step_metrics.get(k, 0.0) + v
        if self.accelerator.num_processes > 1:
            # DDP/FSDP average gradients over processes; our loss is already a global mean
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    # -- grad norm and the guarded optimiser step -------------------------------------------
    def _get_grad_norm(self, model, grad_norm=None):
        gn = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._last_grad_norm = gn
        return gn

    def _reset_step(self) -> None:
        self._step_flags = {}
        self._step_metrics = {}

    def _new_window(self) -> dict[str, Any]:
        return {"loss": 0.0, "ce": 0.0, "kd": 0.0, "steps": 0, "input_tokens": 0,
                "t0": time.time()}

    def _decide_skip(self) -> tuple[bool, str | None]:
        flags = self._step_flags
        nonfinite = torch.tensor(float(flags.get("nonfinite", 0)), device=self.args.device)
        if self.accelerator.num_processes > 1:
            nonfinite = self.accelerator.reduce(nonfinite, reduction="sum")
        if flags.get("low_tokens"):
            return True, "too_few_supervised_tokens"
        if float(nonfinite) > 0:
            return True, "nonfinite_loss"
        gn = self._last_grad_norm
        if gn is not None and not bool(torch.isfinite(torch.as_tensor(gn, dtype=torch.float32))):
            return True, "nonfinite_grad_norm"
        return False, None

    def _guarded_optimizer_step(self, original_step: Callable, acc_opt: Any, closure=None):
        skip, reason = self._decide_skip()
        detail = None
        if skip:
            if hasattr(acc_opt, "_is_overflow"):
                acc_opt._is_overflow = True  # accelerate: the LR scheduler does not step either
            for group in acc_opt.param_groups:
                for p in group["params"]:
                    p.grad = None
            detail = {"step": self.state.global_step + 1, "reason": reason,
                      "supervised_tokens": self._step_flags.get("supervised"),
                      "grad_norm": None if self._last_grad_norm is None
                      else float(self._last_grad_norm),
                      "micro_batches": self._step_flags.get("micro", [])}
            if self.debug_nan and self.args.should_log:
                print(f"[slmkd guard] skipped optimiser step {detail['step']}: "
                      f"{json.dumps(detail, default=str)}", file=sys.stderr, flush=True)
            result = None
        else:
            if hasattr(acc_opt, "_is_overflow"):
                acc_opt._is_overflow = False
            result = original_step(closure) if closure is not None else original_step()
            for k, v in self._step_metrics.items():
                self._win[k] = self._win.get(k, 0.0) + v
            self._win["steps"] += 1
        self.guard.record(skip, reason, detail if self.debug_nan or skip else None)
        self._reset_step()
        return result

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # called once the optimizer is final (accelerate-wrapped): install the guard first
        opt = optimizer or self.optimizer
        if opt is not None and not getattr(opt, "_slmkd_guarded", False):
            original = opt.step

            def step(opt_self, closure=None, _orig=original):
                return self._guarded_optimizer_step(_orig, opt_self, closure)

            opt.step = types.MethodType(step, opt)  # a bound method: torch's LR scheduler wraps it
            opt._slmkd_guarded = True
        return super().create_scheduler(num_training_steps, optimizer=optimizer)

    # -- logging ------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and "train_runtime" not in logs:
            w = self._win
            extra = sorted(k for k in w if k not in ("loss", "ce", "kd", "steps", "input_tokens", "t0"))
            keys = ["loss", "ce", "kd", *extra]
            vec = torch.tensor([float(w[k]) for k in keys] + [float(w["input_tokens"])],
                               device=self.args.device)
            if self.accelerator.num_processes > 1:
                vec = self.accelerator.reduce(vec, reduction="sum")
            n = max(w["steps"], 1)
            dt = max(time.time() - w["t0"], 1e-9)
            logs["loss"] = float(vec[0]) / n
            logs["ce"] = float(vec[1]) / n
            if self.spec.needs_teacher or float(vec[2]) != 0.0:
                logs["kd"] = float(vec[2]) / n
            for i, k in enumerate(extra, start=3):
                logs[k] = float(vec[i]) / n
            logs["temperature"] = float(self.temperature)
            logs["alpha"] = float(self.alpha)
            logs["tokens_per_s"] = float(vec[-1]) / dt
            logs["skipped_batches"] = self.guard.skipped
            logs.update(vram_stats())
            self._win = self._new_window()
        super().log(logs, start_time)

    # -- checkpoints ----------------------------------------------------------------------
    def slmkd_state(self) -> dict[str, Any]:
        return {"guard": self.guard.to_dict(), "global_step": self.state.global_step,
                "temperature": self.temperature, "alpha": self.alpha, **self.run_state}

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        ckpt = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            atomic_write_json(ckpt / STATE_NAME, self.slmkd_state())
            write_manifest(ckpt)
            if self.syncer is not None:
                self.syncer.submit(ckpt)
        self.accelerator.wait_for_everyone()


class ScheduleCallback(TrainerCallback):
    """Sets ``trainer.temperature`` and ``trainer.alpha`` from the per-epoch schedules
    (``cfg.kd.temperature_schedule[e]``, ``cfg.kd.alpha_schedule[e]``, e = completed epochs)."""

    def __init__(self, trainer: DistillationTrainer | None = None):
        self.trainer = trainer

    def _update(self, state) -> None:
        if self.trainer is not None:
            epoch = int(state.epoch or 0)
            t, a = self.trainer.cfg.schedule_for_epoch(epoch)
            self.trainer.temperature, self.trainer.alpha = t, a

    def on_train_begin(self, args, state, control, **kwargs):
        self._update(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._update(state)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True  # the final losses are always logged
        kill_at = os.environ.get(FAULT_KILL_ENV)
        if kill_at and state.global_step == int(kill_at):
            if self.trainer is not None and self.trainer.syncer is not None:
                self.trainer.syncer.wait(60)
            os.kill(os.getpid(), signal.SIGKILL)


# =============================================================================================
# runs
# =============================================================================================
@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    summary: dict[str, Any]


def run_dir_for(cfg: ExperimentConfig, method: str, student: str, seed: int) -> Path:
    """``{drive_root}/runs/{method}/{student_slug}/seed{N}``."""
    from slmkd.modeling import model_slug
    from slmkd.runtime import get_drive_root

    return get_drive_root(cfg) / "runs" / method / model_slug(cfg.student_name(student)) / \
        f"seed{int(seed)}"


def is_run_complete(run_dir: str | os.PathLike) -> bool:
    """True when ``train_summary.json`` (written last) exists and its final model folder too."""
    p = Path(run_dir) / SUMMARY_NAME
    if not p.is_file():
        return False
    try:
        s = read_json(p)
    except ValueError:
        return False
    return (Path(run_dir) / s.get("final_model_dir", FINAL_DIR)).is_dir()


def local_checkpoint_dir(cfg: ExperimentConfig, run_dir: Path) -> Path:
    """Fast local disk folder for this run's checkpoints (unique per run directory)."""
    from slmkd.runtime import local_scratch_dir

    base = Path(cfg.train.local_checkpoint_dir) if cfg.train.local_checkpoint_dir \
        else local_scratch_dir() / "checkpoints"
    h = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:10]
    parts = Path(run_dir).parts[-3:]
    return base / ("__".join(parts) + f"-{h}")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_identity(cfg: ExperimentConfig, spec: MethodSpec, student_name: str, seed: int,
                 max_steps: int) -> dict[str, Any]:
    """Everything that determines the trained weights (compared on resume)."""
    d = cfg.to_dict()
    ident = {f"{k}": v for k, v in _flat({s: d[s] for s in spec.config_sections if s in d}).items()
             if k not in OPERATIONAL_KEYS}
    if not spec.needs_teacher:
        ident = {k: v for k, v in ident.items()
                 if k not in ("models.teacher_load_in_4bit",)}
    ident.update({"method": spec.name, "student": student_name, "seed": int(seed),
                  "max_steps": int(max_steps)})
    return ident


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
            for k in keys if old.get(k) != new.get(k)]


def _say(msg: str) -> None:
    print(msg, flush=True)
    logger.info(msg)


def _build_training_args(cfg: ExperimentConfig, out_dir: Path, seed: int, max_steps: int,
                         save_steps: int, device: torch.device) -> TrainingArguments:
    kw = cfg.train.training_arguments_kwargs()
    kw.update(max_steps=max_steps, save_steps=save_steps, save_total_limit=None)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    optim = kw.pop("optim")
    if optim.endswith("bnb_8bit"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise RuntimeError(f"train.optim={optim!r} needs bitsandbytes: pip install "
                               "bitsandbytes (CUDA only), or use adamw_torch.") from None
    return TrainingArguments(
        output_dir=str(out_dir), seed=int(seed), data_seed=int(seed), optim=optim,
        save_strategy="steps", logging_strategy="steps", report_to="none",
        remove_unused_columns=False, bf16=use_bf16, use_cpu=device.type == "cpu",
        gradient_checkpointing_kwargs={"use_reentrant": False} if kw["gradient_checkpointing"]
        else None,
        ddp_find_unused_parameters=False, disable_tqdm=False, logging_nan_inf_filter=False,
        save_only_model=False, dataloader_pin_memory=device.type == "cuda", **kw)


def _apply_lora(cfg: ExperimentConfig, model: Any) -> Any:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise RuntimeError("train.use_lora=True needs peft: pip install peft") from None
    lcfg = LoraConfig(r=cfg.train.lora_r, lora_alpha=cfg.train.lora_alpha, lora_dropout=0.0,
                      task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"])
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, lcfg)


def train(cfg: ExperimentConfig, method: str, student: str, seed: int, *,
          run_dir: str | os.PathLike | None = None, max_steps: int | None = None,
          save_steps: int | None = None, force: bool = False, live_plot: bool = False,
          init_model: str | os.PathLike | None = None) -> TrainResult:
    """Train ``student`` with ``method`` and ``seed``; resume when a checkpoint exists.

    Args:
        cfg: the experiment config.
        method: a registered method (``sft``, ``kd``, ``cascod``, ``cascod-2stage``, ``cascod-kd``).
        student: a key of ``cfg.models`` (``student_small``) or a model name.
        run_dir: default :func:`run_dir_for`.
        max_steps, save_steps: override ``cfg.train.max_steps`` / ``cfg.train.save_steps``.
        force: resume (or retrain a finished run) even when the saved config differs.
        live_plot: draw the loss/grad-norm/VRAM plots inline (notebooks).
        init_model: start from these weights instead of the student's (two-stage methods).

    Returns a :class:`TrainResult`; ``{run_dir}/train_summary.json`` is written last.
    """
    spec = get_method(method)
    student_name = cfg.student_name(student)
    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(cfg, method, student, seed)
    max_steps = int(cfg.train.max_steps if max_steps is None else max_steps)
    save_steps = int(cfg.train.save_steps if save_steps is None else save_steps)
    if spec.stages:
        return _train_staged(cfg, spec, student, seed, run_dir=run_dir, max_steps=max_steps,
                             save_steps=save_steps, force=force, live_plot=live_plot)

    from accelerate import PartialState

    state = PartialState()
    ident = run_identity(cfg, spec, student_name, seed, max_steps)
    if init_model is not None:
        ident["init_model"] = str(init_model)
    run_meta_path = run_dir / RUN_META_NAME
    fresh = False
    if run_meta_path.is_file():
        old = read_json(run_meta_path).get("identity", {})
        diffs = _diff(old, ident)
        if diffs and not force:
            raise RunConfigMismatchError(
                f"{run_dir} was trained with another configuration:\n  " + "\n  ".join(diffs)
                + "\nResume with the original settings, choose another --run-dir, or pass "
                "--force (force=True) to continue with the new settings.")
        if diffs:
            _say(f"--force: continuing {run_dir} with a changed configuration: {diffs}")
            fresh = is_run_complete(run_dir)
    if is_run_complete(run_dir) and not fresh:
        summary = read_json(run_dir / SUMMARY_NAME)
        _say(f"{run_dir} is already complete (train_summary.json); nothing to do.")
        return TrainResult(run_dir, run_dir / summary.get("final_model_dir", FINAL_DIR), summary)

    t_start = time.time()
    from transformers import set_seed

    from slmkd.modeling import load_causal_lm, load_tokenizer
    from slmkd.training_data import load_training_records

    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            (run_dir / SUMMARY_NAME).unlink(missing_ok=True)
    state.wait_for_everyone()

    tokenizer = load_tokenizer(student_name, cfg)
    with state.main_process_first():
        records, cot_path = load_training_records(cfg)
    dataset, data_stats = spec.build_datasets(cfg, records, tokenizer)
    if len(dataset) == 0:
        raise ValueError(f"No training example survived for {method}: {data_stats}")
    stats_dict = data_stats.to_dict() if hasattr(data_stats, "to_dict") else dict(data_stats)
    desc = data_stats.summary() if hasattr(data_stats, "summary") else stats_dict
    _say(f"[{method}] data: {desc}")

    device = state.device
    set_seed(int(seed))
    student_dtype = torch.float32
    if cfg.train.use_lora and device.type == "cuda":
        student_dtype = torch.bfloat16
    model = load_causal_lm(str(init_model) if init_model else student_name, cfg, role="student",
                           for_training=True, device=device, dtype=student_dtype)
    model.config.use_cache = False
    teacher = None
    if spec.needs_teacher:
        teacher = load_causal_lm(cfg.teacher, cfg, role="teacher", device=device)
    with contextlib.suppress(ImportError):
        from slmkd.vocab import ensure_vocab_alignment

        ensure_vocab_alignment(model, tokenizer)
        if teacher is not None:
            ensure_vocab_alignment(teacher, tokenizer)
    if cfg.train.use_lora:
        model = _apply_lora(cfg, model)

    local_dir = local_checkpoint_dir(cfg, run_dir)
    drive_ckpt_dir = run_dir / "checkpoints"
    args = _build_training_args(cfg, local_dir, seed, max_steps, save_steps, device)

    # -- resume ----------------------------------------------------------------------------
    guard = GuardState()
    resume = None
    if not fresh:
        resume = select_resume_checkpoint([local_dir, drive_ckpt_dir],
                                          report=_say if state.is_main_process else logger.debug)
    if resume is not None:
        st = read_json(resume / STATE_NAME) if (resume / STATE_NAME).is_file() else {}
        guard = GuardState.from_dict(st.get("guard", {}))
        step = int(st.get("global_step", 0))
        if state.is_main_process:
            truncate_log(run_dir / LOG_NAME, step)
        _say(f"[{method}] resuming from {resume} (step {step}, {guard.skipped} skipped so far)")
    elif state.is_main_process:
        (run_dir / LOG_NAME).unlink(missing_ok=True)
    if state.is_main_process:
        cfg.save(run_dir / CONFIG_NAME)
        atomic_write_json(run_meta_path, {"identity": ident, "cot_dir": cot_path,
                                          "local_checkpoint_dir": str(local_dir)})
    state.wait_for_everyone()

    syncer = DriveSyncer(drive_ckpt_dir, keep_last=cfg.train.save_total_limit) \
        if state.is_main_process else None
    collator = (spec.make_collator(cfg, tokenizer) if spec.make_collator
                else PaddingCollator(tokenizer.pad_token_id,
                                     pad_to_multiple_of=8 if device.type == "cuda" else None))
    sched_cb = ScheduleCallback()
    trainer = DistillationTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator,
        processing_class=tokenizer, spec=spec, cfg=cfg, teacher=teacher,
        vocab_size=len(tokenizer), guard=guard, syncer=syncer,
        callbacks=[sched_cb, TrainingMonitor(run_dir, live_plot=live_plot)])
    sched_cb.trainer = trainer
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    finally:
        if syncer is not None:
            syncer.close(timeout=600)

    # -- final model, summary (last) ----------------------------------------------------------
    final_dir = run_dir / FINAL_DIR
    if state.is_main_process:
        tmp = run_dir / f".tmp-{FINAL_DIR}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        to_save = trainer.model
        if cfg.train.use_lora and hasattr(to_save, "merge_and_unload"):
            to_save = to_save.merge_and_unload()
        to_save.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
        entries = read_log(run_dir / LOG_NAME)
        last = next((e for e in reversed(entries) if e.get("loss") is not None), {})
        if not (run_dir / "plots" / "loss.png").is_file():
            with contextlib.suppress(Exception):
                save_plots(entries, run_dir / "plots")
        frac = trainer.guard.skipped_fraction
        summary = {
            "method": method, "student": student_name, "seed": int(seed),
            "dataset": cfg.generation.dataset, "final_model_dir": FINAL_DIR,
            "steps": int(trainer.state.global_step),
            "optimizer_steps_taken": trainer.guard.steps - trainer.guard.skipped,
            "skipped_batches": trainer.guard.skipped, "skipped_fraction": frac,
            "skipped_reasons": trainer.guard.reasons, "skipped_flagged": frac >= SKIP_WARN_FRACTION,
            "final_loss": last.get("loss"), "final_ce": last.get("ce"), "final_kd": last.get("kd"),
            "wall_time_s": time.time() - t_start, "data": stats_dict, "cot_dir": cot_path,
            "resumed_from": str(resume) if resume is not None else None,
            "drive_sync_failures": syncer.failures if syncer is not None else [],
            "teacher": cfg.teacher if spec.needs_teacher else None,
            "peak_vram_gb": vram_stats().get("vram_peak_gb"),
        }
        atomic_write_json(run_dir / SUMMARY_NAME, summary)
        flag = "  <-- FLAG: >= 1% of batches skipped" if frac >= SKIP_WARN_FRACTION else ""
        _say(f"[{method}] done: {summary['steps']} steps, final loss {summary['final_loss']}, "
             f"skipped {trainer.guard.skipped} ({100 * frac:.2f}%){flag}\n"
             f"  model: {final_dir}\n  log: {run_dir / LOG_NAME}\n  plots: {run_dir / 'plots'}")
    state.wait_for_everyone()
    summary = read_json(run_dir / SUMMARY_NAME)
    return TrainResult(run_dir, final_dir, summary)


def _train_staged(cfg: ExperimentConfig, spec: MethodSpec, student: str, seed: int, *,
                  run_dir: Path, max_steps: int, save_steps: int, force: bool,
                  live_plot: bool) -> TrainResult:
    """Run each stage as its own resumable run in ``{run_dir}/stage{i}``; the student of stage
    i+1 starts from stage i's ``final/``. The parent summary points to the last stage's model."""
    from accelerate import PartialState

    t0 = time.time()
    prev: Path | None = None
    results = []
    for i, stage in enumerate(spec.stages, start=1):
        res = train(cfg, stage, student, seed, run_dir=run_dir / f"stage{i}", max_steps=max_steps,
                    save_steps=save_steps, force=force, live_plot=live_plot, init_model=prev)
        prev = res.final_dir
        results.append(res)
    last = results[-1].summary
    summary = {
        "method": spec.name, "student": cfg.student_name(student), "seed": int(seed),
        "dataset": cfg.generation.dataset, "cot_dir": last.get("cot_dir"),
        "final_model_dir": os.path.relpath(results[-1].final_dir, run_dir),
        "steps": sum(int(r.summary["steps"]) for r in results),
        "skipped_batches": sum(int(r.summary["skipped_batches"]) for r in results),
        "final_loss": last.get("final_loss"), "final_ce": last.get("final_ce"),
        "final_kd": last.get("final_kd"), "wall_time_s": time.time() - t0,
        "stages": [{"method": s, "run_dir": os.path.relpath(r.run_dir, run_dir),
                    "summary": r.summary} for s, r in zip(spec.stages, results, strict=True)],
    }
    total = sum(r.summary.get("optimizer_steps_taken", 0) + r.summary["skipped_batches"]
                for r in results)
    summary["skipped_fraction"] = summary["skipped_batches"] / total if total else 0.0
    if PartialState().is_main_process:
        cfg.save(run_dir / CONFIG_NAME)
        atomic_write_json(run_dir / SUMMARY_NAME, summary)
    PartialState().wait_for_everyone()
    return TrainResult(run_dir, results[-1].final_dir, summary)


# =============================================================================================
# CLI
# =============================================================================================
def _train_command(args: argparse.Namespace) -> int:
    from slmkd.config import load_config

    overrides = {}
    if args.drive_root:
        overrides["drive_root"] = args.drive_root
    cfg = load_config(args.profile, config_file=args.config, overrides=overrides or None)
    res = train(cfg, args.method, args.student, args.seed, run_dir=args.run_dir,
                max_steps=args.max_steps, save_steps=args.save_steps, force=args.force)
    print(json.dumps({"run_dir": str(res.run_dir), "final_dir": str(res.final_dir),
                      "steps": res.summary.get("steps"),
                      "skipped_fraction": res.summary.get("skipped_fraction")}))
    return 0


def add_train_command(subparsers: Any) -> argparse.ArgumentParser:
    """``slmkd train --method M --student S --seed N [...]``."""
    p = subparsers.add_parser("train", help="train a student (sft, kd, cascod, ...); resumes")
    p.add_argument("--method", required=True,
                   choices=["sft", "kd", "cascod", "cascod-2stage", "cascod-kd"])
    p.add_argument("--student", required=True,
                   help="student_primary / student_small or a model name")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--profile", default=None, help="config profile (default $SLMKD_PROFILE)")
    p.add_argument("--config", default=None, help="JSON config file")
    p.add_argument("--drive-root", default=None)
    p.add_argument("--run-dir", default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--save-steps", type=int, default=None)
    p.add_argument("--force", action="store_true",
                   help="resume even if the saved config differs")
    p.set_defaults(func=_train_command)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slmkd.trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_command(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

__all__ = ["MethodSpec", "register_method", "get_method", "registered_methods",
           "DistillationTrainer", "ScheduleCallback", "GuardState", "TrainResult", "train",
           "run_dir_for", "is_run_complete", "add_train_command", "kd_or_ce_loss",
           "default_count_items", "build_cot_datasets", "RunConfigMismatchError"]
