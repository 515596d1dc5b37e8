"""The training core: :class:`DistillationTrainer`, a :class:`transformers.Trainer` subclass that
runs a registered method's loss (a :class:`~slmkd.training.method_spec.MethodSpec`), normalises
it by the global token count, guards every optimiser step, applies the per-epoch T/α schedules
and syncs checkpoints to Drive. Runs are set up by :func:`slmkd.training.run.train`.

Guards: an optimiser step whose global supervised-token count is below ``min_supervised_tokens``,
whose loss is non-finite on any micro-batch of any process, or whose gradient norm is
non-finite, is skipped: the gradients are dropped, the optimiser and the LR scheduler do not step
(AdamW with zero gradients would still move the weights through momentum and weight decay).
Skips are counted (saved in every checkpoint) and described when ``cfg.train.debug_nan``
(``SLM_KD_DEBUG_NAN=1``); the fraction is reported at the end and flagged when ≥ 1 %.
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
#: fault injection for the kill -9 test: SIGKILL this process at the end of that optimiser step
FAULT_KILL_ENV = "SLMKD_FAULT_KILL_AT_STEP"


def default_count_items(batch: dict[str, Any]) -> Items:
    """``{"supervised": labels[:, 1:] != -100 summed}`` — the tokens that reach the loss."""
    return {"supervised": count_supervised(batch["labels"])}


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


