"""The training core: :class:`DistillationTrainer`, a :class:`transformers.Trainer` subclass that
runs a registered method's loss (a :class:`~slmkd.training.method_spec.MethodSpec`), normalises
it by the global token count, guards every optimiser step, applies the per-epoch T/α schedules
and syncs checkpoints to Drive. Runs are set up by :func:`slmkd.training.run.train`.

Guards: an optimiser step is skipped (the gradients are dropped, the optimiser and the LR scheduler
do not step: AdamW with zero gradients would still move the weights through momentum and weight
decay) when, on any micro-batch of any process,

* the global supervised-token count is below ``min_supervised_tokens``
  (reason ``too_few_supervised_tokens``);
* a supervised row of the teacher's or the student's logits holds NaN/±inf (``nonfinite_teacher``,
  ``nonfinite_student``; ``nonfinite_logits`` when the method reports only a total), unless
  ``cfg.train.nonfinite == "sanitize"``: then the loss sanitises those rows (NaN → -M, ±inf →
  ±M), the step is taken and the rows are counted in :attr:`GuardState.sanitized`;
* the loss is non-finite for another reason (``nonfinite_loss``);
* the gradient norm is non-finite (``nonfinite_grad_norm``; from the Trainer's own norm, or
  computed here when the Trainer did not compute one).

The decision is one all-reduce of a flag vector per optimiser step, so every process skips the
same steps. Skips are counted by reason (saved in every checkpoint, in ``train_summary.json`` and
as ``skipped_<reason>`` in the log), non-finite skips print one line each, and every skip is
described in full when ``cfg.train.debug_nan`` (``SLM_KD_DEBUG_NAN=1``); the fraction is reported
at the end and flagged when ≥ 1 %.

Supported transformers: :data:`SUPPORTED_TRANSFORMERS` (checked when the trainer is built; see
:func:`check_transformers_version`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerCallback

from slmkd.fileio import atomic_write_json
from slmkd.training.checkpoint import DriveSyncer, write_manifest
from slmkd.training.data import META_KEYS, count_supervised
from slmkd.training.method_spec import Items, MethodSpec
from slmkd.training.monitor import vram_stats

if TYPE_CHECKING:  # pragma: no cover
    from slmkd.config import ExperimentConfig


logger = logging.getLogger(__name__)

STATE_NAME = "slmkd_state.json"
#: the transformers releases whose Trainer internals this module is tested against (setup.py and
#: colab_requirements.txt carry the same range; scripts/ci_floor.sh runs the tests at the floor)
TRANSFORMERS_MIN = "5.0.0"
TRANSFORMERS_BELOW = "6"
SUPPORTED_TRANSFORMERS = f">={TRANSFORMERS_MIN},<{TRANSFORMERS_BELOW}"
#: skip reasons, in the order :meth:`DistillationTrainer._decide_skip` checks them
SKIP_REASONS = ("too_few_supervised_tokens", "nonfinite_teacher", "nonfinite_student",
                "nonfinite_logits", "nonfinite_loss", "nonfinite_grad_norm")
#: fault injection for the kill -9 test: SIGKILL this process at the end of that optimiser step
FAULT_KILL_ENV = "SLMKD_FAULT_KILL_AT_STEP"


class UnsupportedTransformersError(RuntimeError):
    """The installed transformers is outside :data:`SUPPORTED_TRANSFORMERS`."""


def check_transformers_version(version: str | None = None) -> str:
    """Raise :class:`UnsupportedTransformersError` unless ``version`` (default: the installed
    transformers) lies in :data:`SUPPORTED_TRANSFORMERS`; returns the version checked.

    Every 5.x release passes the trainer/loss/resume tests (``scripts/ci_floor.sh`` runs them at
    5.0.0) with the shims in :class:`DistillationTrainer`: the GA scaling flags
    (``loss_is_scaled_for_ga`` in late 5.x, ``model_accepts_loss_kwargs`` before), the
    Accelerator's own GA division turned off (before 5.7), the guard's own gradient check where
    the Trainer hands over no norm (``_get_grad_norm`` from 5.3), and the skip flag set on the
    accelerate wrapper where the LR scheduler is built before the optimizer is wrapped (5.0).
    4.x lacks what the trainer needs (``num_items_in_batch`` before 4.46, Qwen2's
    ``logits_to_keep`` before 4.50, ...) and 6.x is untested."""
    from packaging.version import Version

    if version is None:
        import transformers

        version = transformers.__version__
    v = Version(version)
    if not Version(TRANSFORMERS_MIN) <= Version(v.base_version) < Version(TRANSFORMERS_BELOW):
        raise UnsupportedTransformersError(
            f"slmkd's trainer supports transformers {SUPPORTED_TRANSFORMERS}; found {version}. "
            f"Install a supported release: pip install 'transformers{SUPPORTED_TRANSFORMERS}'")
    return version


def default_count_items(batch: dict[str, Any]) -> Items:
    """``{"supervised": labels[:, 1:] != -100 summed}`` — the tokens that reach the loss."""
    return {"supervised": count_supervised(batch["labels"])}


# =============================================================================================
# guard state
# =============================================================================================
@dataclass
class GuardState:
    """Optimiser-step accounting: steps taken, skipped (by reason), details when debugging, and
    the non-finite logit rows sanitised on steps that were taken (``nonfinite="sanitize"``)."""

    steps: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    details: list[dict[str, Any]] = field(default_factory=list)
    sanitized: dict[str, int] = field(default_factory=dict)

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
                   reasons=dict(d.get("reasons", {})), details=list(d.get("details", [])),
                   sanitized={k: int(v) for k, v in d.get("sanitized", {}).items()})

    def add_sanitized(self, counts: dict[str, int]) -> None:
        for k, v in counts.items():
            if v:
                self.sanitized[k] = self.sanitized.get(k, 0) + int(v)


# =============================================================================================
# the Trainer subclass
# =============================================================================================
class DistillationTrainer(Trainer):
    """:class:`transformers.Trainer` with a registered method's loss, global token normalisation,
    skip guards, per-epoch schedules, extra log metrics and Drive-synced checkpoints."""

    def _get_train_sampler(self, train_dataset=None):
        """``cfg.train.group_by_length``: :class:`slmkd.training.data.SeededLengthGroupedSampler`
        (seeded by ``data_seed`` and the epoch; works for CasCoD pairs, whose items have no
        ``input_ids``; the Trainer's own option is named differently across 5.x). Otherwise the
        Trainer's sampler. Internal hook, proven on transformers 5.0 and 5.24 (ci_floor)."""
        if not getattr(self.cfg.train, "group_by_length", False):
            return super()._get_train_sampler(train_dataset)
        from slmkd.training.data import SeededLengthGroupedSampler, example_length

        ds = train_dataset if train_dataset is not None else self.train_dataset
        group = (self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
                 * max(1, self.args.world_size))
        return SeededLengthGroupedSampler([example_length(ds[i]) for i in range(len(ds))],
                                          group, int(self.args.data_seed or self.args.seed))

    def __init__(self, *args: Any, spec: MethodSpec, cfg: ExperimentConfig, teacher: Any = None,
                 vocab_size: int, guard: GuardState | None = None,
                 syncer: DriveSyncer | None = None, run_state: dict[str, Any] | None = None,
                 **kwargs: Any):
        check_transformers_version()
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.cfg = cfg
        self.teacher = teacher
        self.vocab_size = int(vocab_size)
        self.guard = guard or GuardState()
        self.syncer = syncer
        self.run_state = run_state or {}
        self.temperature, self.alpha = cfg.schedule_for_epoch(0)
        # our losses are already normalised over the whole accumulated (global) batch: late 5.x reads
        # loss_is_scaled_for_ga; before, the Trainer divides by GA unless model_accepts_loss_kwargs
        # (only used there and in the compute_loss/_get_num_items_in_batch we override)
        self.loss_is_scaled_for_ga = True
        self.model_accepts_loss_kwargs = True
        # before 5.7 the Trainer builds its Accelerator with num_steps = GA, and
        # Accelerator.backward divides every loss by it once more (5.7+ passes 1; the Trainer
        # does accumulation and no_sync itself in every 5.x)
        if getattr(self.accelerator, "gradient_accumulation_steps", 1) != 1:
            self.accelerator.gradient_accumulation_steps = 1
        self.sanitize_nonfinite = getattr(cfg.train, "nonfinite", "skip") == "sanitize"
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

        params = inspect.signature(losses.fused_kd_loss).parameters
        self.loss_accepts_chunk_size = "chunk_size" in params
        self.loss_accepts_nonfinite = "nonfinite" in params
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

    def nonfinite_mode(self) -> str:
        """``nonfinite=`` for the losses of :mod:`slmkd.losses`: ``"sanitize"`` when
        ``cfg.train.nonfinite == "sanitize"``, else ``"report"`` (a NaN loss plus per-model row
        counts, which the guard turns into a skipped step)."""
        return "sanitize" if self.sanitize_nonfinite else "report"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        meta = {k: inputs.pop(k) for k in list(inputs) if k in META_KEYS}
        items = num_items_in_batch
        if not isinstance(items, dict):
            items = {k: torch.as_tensor(v).to(self.args.device)
                     for k, v in self._count_items(inputs).items()}
        sup = int(items.get("supervised", torch.tensor(1 << 30)))
        flags = self._step_flags
        flags["supervised"] = sup
        self._win["input_tokens"] += int(inputs["attention_mask"].sum())
        if sup < max(self.cfg.train.min_supervised_tokens, 1):
            flags["too_few_supervised_tokens"] = 1
            loss = self._zero_loss(model)
        else:
            loss, metrics = self.spec.compute_loss(self, model, inputs, items)
            ns, nt, other, finite = self._nonfinite_counts(loss, metrics)
            bad = {"nonfinite_teacher": nt, "nonfinite_student": ns, "nonfinite_logits": other}
            if (any(bad.values()) and not self.sanitize_nonfinite) or not finite:
                if any(bad.values()) and not self.sanitize_nonfinite:
                    for k, v in bad.items():
                        flags[k] = flags.get(k, 0) + v
                else:
                    flags["nonfinite_loss"] = flags.get("nonfinite_loss", 0) + 1
                if self.debug_nan:
                    flags.setdefault("micro", []).append({
                        "example_ids": meta.get("example_id"),
                        "loss": float(loss.detach()),
                        **{k: (float(v) if torch.as_tensor(v).numel() == 1 else None)
                           for k, v in metrics.items()},
                        "local_supervised": {k: int(v) for k, v in self._count_items(inputs).items()},
                        "temperature": self.temperature, "alpha": self.alpha})
                loss = self._zero_loss(model)  # no NaN gradient reaches the other processes
            else:
                if any(bad.values()):  # sanitised by the loss: train on, count the rows
                    san = flags.setdefault("sanitized", {})
                    for k, v in (("teacher", nt), ("student", ns), ("logits", other)):
                        san[k] = san.get(k, 0) + v
                self._step_metrics["loss"] = self._step_metrics.get("loss", 0.0) + loss.detach()
                for k, v in metrics.items():  # every scalar metric (ce, kd, rationale_ce, ...)
                    v = torch.as_tensor(v).detach().float()
                    if not k.startswith("num_nonfinite") and v.numel() == 1:
                        self._step_metrics[k] = self._step_metrics.get(k, 0.0) + v
        if self.accelerator.num_processes > 1:
            # DDP/FSDP average gradients over processes; our loss is already a global mean
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    @staticmethod
    def _nonfinite_counts(loss: torch.Tensor, metrics: dict[str, Any]) -> tuple[int, int, int, bool]:
        """(student rows, teacher rows, rows reported only in the total, loss finite) from a
        method's metrics (``num_nonfinite_student``, ``num_nonfinite_teacher``, ``num_nonfinite``;
        ints or device tensors), read with one host synchronisation."""
        dev = loss.device

        def val(key: str) -> torch.Tensor:
            v = metrics.get(key, 0)
            return torch.as_tensor(v if v is not None else 0, device=dev).detach().float().sum()

        vec = torch.stack([val("num_nonfinite_student"), val("num_nonfinite_teacher"),
                           val("num_nonfinite"),
                           torch.isfinite(loss.detach()).all().float()]).tolist()
        ns, nt, total, finite = (int(x) for x in vec)
        return ns, nt, max(total - ns - nt, 0), bool(finite)

    # -- grad norm and the guarded optimiser step -------------------------------------------
    def _get_grad_norm(self, model, grad_norm=None):
        gn = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._last_grad_norm = gn
        return gn

    def _reset_step(self) -> None:
        self._step_flags = {}
        self._step_metrics = {}
        self._last_grad_norm = None

    def _new_window(self) -> dict[str, Any]:
        return {"loss": 0.0, "ce": 0.0, "kd": 0.0, "steps": 0, "input_tokens": 0,
                "t0": time.time()}

    def _grads_nonfinite(self, params) -> bool:
        """True when a gradient holds NaN/±inf (used when the Trainer computed no grad norm)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return False
        norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else \
            [g.norm() for g in grads]
        return not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())

    def _decide_skip(self, params=()) -> tuple[bool, str | None]:
        """Whether to skip this optimiser step, and why: one all-reduce of the flag vector (every
        process takes the same decision), one host read."""
        flags = self._step_flags
        gn = self._last_grad_norm
        if gn is not None:
            grad_bad = not bool(torch.isfinite(torch.as_tensor(gn, dtype=torch.float32)))
        else:
            grad_bad = self._grads_nonfinite(params)
        local = [float(flags.get(k, 0)) for k in SKIP_REASONS[:-1]] + [float(grad_bad)]
        vec = torch.tensor(local, device=self.args.device)
        if self.accelerator.num_processes > 1:
            vec = self.accelerator.reduce(vec, reduction="sum")
        counts = vec.tolist()
        self._step_flags["counts"] = {k: int(c) for k, c in zip(SKIP_REASONS, counts) if c}
        for reason, c in zip(SKIP_REASONS, counts):
            if c > 0:
                return True, reason
        return False, None

    def _guarded_optimizer_step(self, original_step: Callable, acc_opt: Any, closure=None):
        params = [p for g in acc_opt.param_groups for p in g["params"]]
        skip, reason = self._decide_skip(params)
        detail = None
        # accelerate's AcceleratedOptimizer: with _is_overflow the Trainer does not step the LR
        # scheduler either. The guard wraps that optimizer (5.1+) or, where the scheduler is
        # built before accelerate wraps it (5.0), the inner one: flag the wrapper in both cases.
        flagged = [o for o in {id(o): o for o in (acc_opt, self.optimizer)}.values()
                   if hasattr(o, "_is_overflow")]
        for o in flagged:
            o._is_overflow = skip
        if skip:
            for p in params:
                p.grad = None
            detail = {"step": self.state.global_step + 1, "reason": reason,
                      "counts": self._step_flags.get("counts", {}),
                      "supervised_tokens": self._step_flags.get("supervised"),
                      "grad_norm": None if self._last_grad_norm is None
                      else float(self._last_grad_norm),
                      "micro_batches": self._step_flags.get("micro", [])}
            if self.args.should_log and (self.debug_nan or reason.startswith("nonfinite")):
                msg = (json.dumps(detail, default=str) if self.debug_nan else
                       f"{reason} ({json.dumps(detail['counts'])}); "
                       "set train.debug_nan (SLM_KD_DEBUG_NAN=1) for the examples")
                print(f"[slmkd guard] skipped optimiser step {detail['step']}: {msg}",
                      file=sys.stderr, flush=True)
                logger.warning("skipped optimiser step %s: %s", detail["step"], reason)
            result = None
        else:
            result = original_step(closure) if closure is not None else original_step()
            for k, v in self._step_metrics.items():
                self._win[k] = self._win.get(k, 0.0) + v
            self._win["steps"] += 1
            self.guard.add_sanitized(self._step_flags.get("sanitized", {}))
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
            # a window whose steps were all skipped has no loss (NaN: null in log.jsonl), not 0
            n = w["steps"] if w["steps"] else float("nan")
            dt = max(time.time() - w["t0"], 1e-9)
            logs["loss"] = float(vec[0]) / n
            logs["ce"] = float(vec[1]) / n
            if self.spec.needs_teacher or float(vec[2]) != 0.0 or not w["steps"]:
                logs["kd"] = float(vec[2]) / n
            for i, k in enumerate(extra, start=3):
                logs[k] = float(vec[i]) / n
            logs["temperature"] = float(self.temperature)
            logs["alpha"] = float(self.alpha)
            logs["tokens_per_s"] = float(vec[-1]) / dt
            logs["skipped_batches"] = self.guard.skipped
            for reason, c in self.guard.reasons.items():  # cumulative, by reason
                logs[f"skipped_{reason}"] = c
            for which, c in self.guard.sanitized.items():
                logs[f"sanitized_nonfinite_{which}_rows"] = c
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
        from slmkd.training.checkpoint import FAULT_KILL_IN_COPY_ENV

        kill_in_copy = os.environ.get(FAULT_KILL_IN_COPY_ENV)
        if kill_in_copy and state.global_step == int(kill_in_copy) + 1 and \
                self.trainer is not None and self.trainer.syncer is not None:
            self.trainer.syncer.wait(60)  # the copy of checkpoint-N ends this process
        kill_at = os.environ.get(FAULT_KILL_ENV)
        if kill_at and state.global_step == int(kill_at):
            if self.trainer is not None and self.trainer.syncer is not None:
                self.trainer.syncer.wait(60)
            os.kill(os.getpid(), signal.SIGKILL)


