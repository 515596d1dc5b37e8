"""Running one training job: the run directory, its identity (resume check), the student and
teacher, the :class:`~slmkd.training.trainer.DistillationTrainer`, and the storage policy.

:func:`train` runs one single-stage method (two-stage methods: :func:`slmkd.training.staged.train`,
which dispatches and runs each stage through this one).

Storage policy (a run directory lives on Drive; local disk dies with the runtime):

* checkpoints are written to local disk every ``cfg.train.save_every_minutes`` of training
  (:class:`CheckpointSchedule`) and/or every ``save_steps`` steps when those are set, never at
  the last step; :class:`~slmkd.training.checkpoint.DriveSyncer` hashes and copies each one to
  ``{run_dir}/checkpoints/`` in the background. Drive keeps one resumable checkpoint (the new one
  verified before the old one is removed), local disk the newest one (plus the one being copied
  and the one being written). A resumed run needs only what is on Drive.
* a failed copy or a full Drive gives one message (needed, free, the step Drive resumes from);
  training goes on locally.
* at the end, ``final/`` is saved in ``cfg.train.final_dtype`` on local disk, copied to Drive and
  verified, ``train_summary.json`` written (the run is complete), then every checkpoint of the
  run is removed from Drive and local disk; logs, plots and summary stay.
* ``train(..., background_copy=True)`` (notebooks' :func:`slmkd.notebook.train_grid`): that copy
  runs in a background thread while the caller goes on (the next run trains); at most one is in
  flight (the next run's copy waits for it), a run whose copy is pending is waited for before it
  is trained or resumed again, and :func:`wait_for_final_copies` waits for all (before
  evaluation). Until its copy is verified the run is not complete, exactly as above: a runtime
  that ends mid-copy loses nothing the synchronous copy would have kept.
* when Drive cannot take ``final/``, it stays on local disk (``{local}/final`` and
  ``final_pending.json``) with a message, the run is not complete and its Drive checkpoint is
  kept. Rerunning the same command copies the local ``final/`` (no training) when it is still
  there, else resumes from Drive.
* ``.tmp-*`` / ``.old-*`` partial copies of the run are removed when it starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainingArguments

from slmkd.fileio import atomic_write_json, read_json
from slmkd.layout import run_dir_for
from slmkd.training.checkpoint import (
    CheckpointSchedule,
    CopyCancelled,
    DriveSyncer,
    checkpoint_step,
    describe_free,
    dir_bytes,
    fmt_bytes,
    is_no_space,
    list_checkpoints,
    publish_checkpoint,
    remove_checkpoint_folder,
    remove_stale_copies,
    save_final_model,
    save_schedule,
    select_resume_checkpoint,
    verify_checkpoint,
)
from slmkd.training.data import PaddingCollator
from slmkd.training.final_copy import submit_final_copy, wait_for_final_copies
from slmkd.training.method_spec import MethodSpec
from slmkd.training.methods import get_method
from slmkd.training.monitor import (
    LOG_NAME,
    TrainingMonitor,
    read_log,
    release_trainer,
    save_plots,
    truncate_log,
    vram_stats,
)
from slmkd.training.monitor import free_memory as _free_memory
from slmkd.training.trainer import (
    STATE_NAME,
    DistillationTrainer,
    GuardState,
    ScheduleCallback,
)

if TYPE_CHECKING:  # pragma: no cover
    from slmkd.config import ExperimentConfig

logger = logging.getLogger(__name__)

SUMMARY_NAME = "train_summary.json"
CONFIG_NAME = "config.json"
RUN_META_NAME = "run.json"
FINAL_DIR = "final"
CHECKPOINTS_DIR = "checkpoints"
#: on local disk, beside a ``final/`` that Drive could not take: the run's summary and identity
PENDING_NAME = "final_pending.json"
SKIP_WARN_FRACTION = 0.01
NO_STEP_SAVES = 10**9
#: settings that do not change the trained weights (never part of the resume check)
OPERATIONAL_KEYS = frozenset({
    "train.log_every", "train.save_steps", "train.save_total_limit",
    "train.dataloader_num_workers", "train.debug_nan", "train.local_checkpoint_dir",
    "train.save_every_minutes", "train.final_dtype", "train.background_final_copy",
    "generation.batch_size", "generation.backend", "generation.shard_size",
    "models.trust_remote_code",
})


class RunConfigMismatchError(RuntimeError):
    """An existing run directory was made with another configuration."""



# =============================================================================================
# runs
# =============================================================================================
@dataclass
class TrainResult:
    """``final_dir`` is ``{run_dir}/final`` once the run is complete; while Drive could not take
    the final model it is the local copy (``summary["final_on_drive"]`` is then False)."""

    run_dir: Path
    final_dir: Path
    summary: dict[str, Any]


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
    """The identity keys that differ. A setting added to the config after the run was recorded
    (absent from ``old``) does not count while it holds its default: new settings default to
    the behaviour that existed before them, so an upgrade mid-study resumes its runs."""
    from slmkd.config import ExperimentConfig

    defaults = _flat(ExperimentConfig().to_dict())
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
            for k in keys if old.get(k) != new.get(k)
            and not (k not in old and k in defaults and new.get(k) == defaults[k])]


def _say(msg: str) -> None:
    print(msg, flush=True)
    logger.info(msg)


def _build_training_args(cfg: ExperimentConfig, out_dir: Path, seed: int, max_steps: int,
                         save_steps: int, device: torch.device) -> TrainingArguments:
    kw = cfg.train.training_arguments_kwargs()
    # save_steps <= 0: no step-based checkpoints (CheckpointSchedule saves by wall time); local
    # checkpoints are pruned by the DriveSyncer, never by the Trainer's rotation (it would remove
    # a checkpoint while it is being copied)
    kw.update(max_steps=max_steps, save_steps=save_steps if save_steps > 0 else NO_STEP_SAVES,
              save_total_limit=None)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    optim = kw.pop("optim")
    if optim.endswith("bnb_8bit"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise RuntimeError(f"train.optim={optim!r} needs bitsandbytes: pip install "
                               "bitsandbytes (CPU and CUDA wheels from 0.46), or use "
                               "adamw_torch.") from None
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


# =============================================================================================
# the run folder (shared with slmkd.training.staged's adapter stage)
# =============================================================================================
def check_run_identity(run_dir: Path, ident: dict[str, Any], force: bool) -> bool:
    """Compare ``ident`` with the identity ``run.json`` recorded: a difference is a
    :class:`RunConfigMismatchError` unless ``force``. Returns True when a finished run is to be
    retrained (forced with a changed identity)."""
    run_meta_path = run_dir / RUN_META_NAME
    if not run_meta_path.is_file():
        return False
    diffs = _diff(read_json(run_meta_path).get("identity", {}), ident)
    if diffs and not force:
        raise RunConfigMismatchError(
            f"{run_dir} was trained with another configuration:\n  " + "\n  ".join(diffs)
            + "\nResume with the original settings, choose another --run-dir, or pass "
            "--force (force=True) to continue with the new settings.")
    if diffs:
        _say(f"--force: continuing {run_dir} with a changed configuration: {diffs}")
        return is_run_complete(run_dir)
    return False


def open_run_folders(run_dir: Path, local_dir: Path, result_name: str, *, fresh: bool,
                     main: bool) -> TrainResult | None:
    """Remove the run's stale partial copies (``.tmp-*`` / ``.old-*``: a copy cut by a crash or
    a disconnect) on Drive and local disk; when the run is already complete (and not to be
    retrained) remove its leftover checkpoints and return its :class:`TrainResult`, else
    None."""
    drive_ckpt_dir = run_dir / CHECKPOINTS_DIR
    if main:
        for folder, names in ((drive_ckpt_dir, None), (run_dir, [result_name]),
                              (local_dir, None)):
            for p, size in remove_stale_copies(folder, names):
                _say(f"removed a stale partial copy {p} ({fmt_bytes(size)}; a copy cut by a "
                     "crash or a disconnect)")
    if not is_run_complete(run_dir) or fresh:
        return None
    summary = read_json(run_dir / SUMMARY_NAME)
    if main:  # a run cut between its summary and the removal of its checkpoints
        freed = remove_checkpoint_folder(drive_ckpt_dir) + dir_bytes(local_dir)
        shutil.rmtree(local_dir, ignore_errors=True)
        if freed:
            _say(f"removed {fmt_bytes(freed)} of checkpoints left by the completed run")
    _say(f"{run_dir} is already complete (train_summary.json); nothing to do.")
    return TrainResult(run_dir, run_dir / summary.get("final_model_dir", result_name), summary)


def prepare_resume(cfg: ExperimentConfig, label: str, *, run_dir: Path, local_dir: Path,
                   fresh: bool, main: bool, ident: dict[str, Any], cot_path: Any
                   ) -> tuple[Path | None, GuardState]:
    """Pick the checkpoint to resume from (the newest valid one on local disk or Drive; none
    when ``fresh``), restore the guard counts from it, cut ``log.jsonl`` back to its step (or
    start a new log), keep only that checkpoint on local disk, and record the run's config and
    identity (``config.json``, ``run.json``). Returns ``(checkpoint or None, guard)``."""
    from accelerate import PartialState

    drive_ckpt_dir = run_dir / CHECKPOINTS_DIR
    guard = GuardState()
    resume = None
    if not fresh:
        resume = select_resume_checkpoint([local_dir, drive_ckpt_dir],
                                          report=_say if main else logger.debug)
    if resume is not None:
        st = read_json(resume / STATE_NAME) if (resume / STATE_NAME).is_file() else {}
        guard = GuardState.from_dict(st.get("guard", {}))
        step = int(st.get("global_step", 0))
        if main:
            truncate_log(run_dir / LOG_NAME, step)
        _say(f"[{label}] resuming from {resume} (step {step}, {guard.skipped} skipped so far)")
    elif main:
        (run_dir / LOG_NAME).unlink(missing_ok=True)
    if main:
        for _, p in list_checkpoints(local_dir):  # older or unusable: local keeps one
            if resume is None or p.resolve() != resume.resolve():
                shutil.rmtree(p, ignore_errors=True)
        cfg.save(run_dir / CONFIG_NAME)
        atomic_write_json(run_dir / RUN_META_NAME, {"identity": ident, "cot_dir": cot_path,
                                                    "local_checkpoint_dir": str(local_dir)})
    PartialState().wait_for_everyone()
    return resume, guard


def start_syncer(run_dir: Path, local_dir: Path, resume: Path | None,
                 main: bool) -> DriveSyncer | None:
    """The main process's :class:`DriveSyncer` to ``{run_dir}/checkpoints``; a local resume
    checkpoint newer than Drive's (e.g. a copy cut by an interrupt) is copied again."""
    if not main:
        return None
    drive_ckpt_dir = run_dir / CHECKPOINTS_DIR
    syncer = DriveSyncer(drive_ckpt_dir, keep_last=1, report=_say)
    if resume is not None and resume.parent.resolve() == local_dir.resolve():
        on_drive = [s for s, _ in list_checkpoints(drive_ckpt_dir)]
        if not on_drive or (checkpoint_step(resume) or 0) > max(on_drive):
            syncer.submit(resume)
    return syncer


def run_trainer(trainer: Any, resume: Path | None, syncer: DriveSyncer | None) -> None:
    """``trainer.train`` (resuming from ``resume``); after a crash let the copy in progress
    finish (bounded; cancelled on Ctrl-C); after success cancel a pending copy (the run is
    complete, its checkpoints are moot)."""
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    except BaseException as e:
        if syncer is not None:
            syncer.close(timeout=600, cancel=isinstance(e, KeyboardInterrupt))
        raise
    if syncer is not None:
        syncer.close(cancel=True)
        if syncer.cancelled:
            logger.info("cancelled the copy of %s: the run is complete",
                        [p.name for p in syncer.cancelled])


def common_summary(cfg: ExperimentConfig, trainer: Any, *, method: str, student_name: str,
                   seed: int, run_dir: Path, t_start: float, stats_dict: dict[str, Any],
                   cot_path: Any, resume: Path | None, ckpt_cb: CheckpointSchedule,
                   syncer: DriveSyncer | None) -> dict[str, Any]:
    """The ``train_summary.json`` fields every run has (steps, skips by reason, sanitised rows,
    final losses from ``log.jsonl``, data statistics, resume point, checkpoints, Drive
    failures, peak VRAM); draws the plots if the monitor did not."""
    entries = read_log(run_dir / LOG_NAME)
    last = next((e for e in reversed(entries) if e.get("loss") is not None), {})
    if not (run_dir / "plots" / "loss.png").is_file():
        with contextlib.suppress(Exception):
            save_plots(entries, run_dir / "plots")
    g = trainer.guard
    frac = g.skipped_fraction
    return {
        "method": method, "student": student_name, "seed": int(seed),
        "dataset": cfg.generation.dataset, "steps": int(trainer.state.global_step),
        "optimizer_steps_taken": g.steps - g.skipped,
        "skipped_batches": g.skipped, "skipped_fraction": frac,
        "skipped_reasons": g.reasons, "skipped_flagged": frac >= SKIP_WARN_FRACTION,
        "sanitized_nonfinite_rows": dict(g.sanitized),
        "final_loss": last.get("loss"), "final_ce": last.get("ce"),
        "final_kd": last.get("kd"), "wall_time_s": time.time() - t_start,
        "data": stats_dict, "cot_dir": cot_path,
        "resumed_from": str(resume) if resume is not None else None,
        "checkpoints_saved": ckpt_cb.saved_steps,
        "drive_sync_failures": syncer.failures if syncer is not None else [],
        "peak_vram_gb": vram_stats().get("vram_peak_gb"),
    }


# =============================================================================================
# the final model on Drive
# =============================================================================================
_FINAL_COPY_RETRIES = 3
_FINAL_COPY_BACKOFF_S = 2.0


def _drive_resumable(drive_ckpt_dir: Path) -> str:
    """The newest complete checkpoint on Drive, in words (sizes checked)."""
    for step, p in reversed(list_checkpoints(drive_ckpt_dir)):
        if verify_checkpoint(p, checksums=False)[0]:
            return f"{p.name} (step {step})"
    return "nothing on Drive: a new runtime would restart this run from step 0"


def _read_pending(local_dir: Path, ident: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of a finished run whose ``final/`` is still only on local disk, or None
    (a pending record of another configuration, or a damaged local final, is removed)."""
    p = local_dir / PENDING_NAME
    if not p.is_file():
        return None
    local_final = local_dir / FINAL_DIR
    try:
        rec = read_json(p)
    except ValueError:
        rec = {}
    ok, why = verify_checkpoint(local_final) if rec.get("identity") == ident else (False, "")
    if ok:
        return dict(rec["summary"])
    _say(f"Ignoring the local final model {local_final} "
         f"({why or 'made with another configuration'}).")
    p.unlink(missing_ok=True)
    shutil.rmtree(local_final, ignore_errors=True)
    return None


def _publish_final(run_dir: Path, local_dir: Path, summary: dict[str, Any],
                   resumable: Callable[[], str]) -> TrainResult:
    """Copy ``{local_dir}/final`` to ``{run_dir}/final`` (verified), write the summary (the run
    is complete), then remove the run's checkpoints on Drive and the local folder. When the copy
    fails, keep everything needed: the local final, the pending record, the Drive checkpoint."""
    local_final = local_dir / FINAL_DIR
    drive_ckpt_dir = run_dir / CHECKPOINTS_DIR
    err: BaseException | None = None
    for attempt in range(1, _FINAL_COPY_RETRIES + 1):
        try:
            publish_checkpoint(local_final, run_dir, checksums=True, name=FINAL_DIR)
            atomic_write_json(run_dir / SUMMARY_NAME, summary)
            err = None
            break
        except (OSError, CopyCancelled, ValueError) as e:
            err = e
            logger.warning("copy of %s to %s failed (attempt %d): %s", local_final, run_dir,
                           attempt, e)
            if is_no_space(e) or attempt == _FINAL_COPY_RETRIES:
                break
            time.sleep(_FINAL_COPY_BACKOFF_S * attempt)
    if err is None:
        freed_drive = remove_checkpoint_folder(drive_ckpt_dir)
        freed_local = dir_bytes(local_dir)
        shutil.rmtree(local_dir, ignore_errors=True)
        _say(f"final model copied to {run_dir / FINAL_DIR} and verified; the run's checkpoints "
             f"are removed ({fmt_bytes(freed_drive)} on Drive, {fmt_bytes(freed_local)} on local "
             "disk, final copy included)")
        return TrainResult(run_dir, run_dir / FINAL_DIR, summary)
    for _, p in list_checkpoints(local_dir):  # the local final supersedes them
        shutil.rmtree(p, ignore_errors=True)
    need_b = dir_bytes(local_final)
    need = fmt_bytes(need_b)
    why = "Drive is full" if is_no_space(err) else "copying it to Drive failed"
    hint = ""
    on_drive = list_checkpoints(drive_ckpt_dir)
    if on_drive and is_no_space(err) and dir_bytes(on_drive[-1][1]) >= need_b:
        hint = (f" (deleting this run's Drive checkpoint {on_drive[-1][1]}, "
                f"{fmt_bytes(dir_bytes(on_drive[-1][1]))}, is enough, but the run cannot resume "
                "then if this runtime ends before the rerun)")
    _say(f"WARNING: the run is trained but NOT complete on Drive: {why} "
         f"({type(err).__name__}: {err}). The final model ({need}) is kept on local disk "
         f"at {local_final}; {describe_free(run_dir)} at {run_dir}. Free at least "
         f"{need} on Drive{hint} and rerun the same command: the final model is copied and the "
         "run marked complete (no training). If this runtime ends before, the local copy is lost "
         f"and the rerun resumes from Drive: {resumable()}.")
    return TrainResult(run_dir, local_final, {**summary, "final_on_drive": False,
                                              "final_local_dir": str(local_final)})


def _publish_in_background(run_dir: Path, local_dir: Path, summary: dict[str, Any],
                           resumable: Callable[[], str]) -> None:
    """:func:`_publish_final` in the copy thread (:mod:`slmkd.training.final_copy`), after the
    copy still in flight: local disk holds at most one finished run's ``final/`` besides the
    training run's files."""
    wait_for_final_copies(collect=False)
    submit_final_copy(run_dir, _publish_final, run_dir, local_dir, summary, resumable)


# =============================================================================================
# train
# =============================================================================================
def train(cfg: ExperimentConfig, method: str, student: str, seed: int, *,
          run_dir: str | os.PathLike | None = None, max_steps: int | None = None,
          save_steps: int | None = None, force: bool = False, live_plot: bool = False,
          init_model: str | os.PathLike | None = None,
          background_copy: bool = False) -> TrainResult:
    """Train ``student`` with ``method`` and ``seed``; resume when a checkpoint exists.

    Args:
        cfg: the experiment config.
        method: a registered single-stage method (``sft``, ``kd``, ``cascod``, ``cascod-kd``, a
            stage of ``cascod-2stage``).
        student: a key of ``cfg.models`` (``student_small``) or a model name.
        run_dir: default :func:`run_dir_for`.
        max_steps: override ``cfg.train.max_steps``.
        save_steps: a step interval for checkpoints (see :func:`save_schedule`).
        force: resume (or retrain a finished run) even when the saved config differs.
        live_plot: draw the loss/grad-norm/VRAM plots inline (notebooks).
        init_model: start from these weights instead of the student's (two-stage methods).
        background_copy: copy ``final/`` to Drive in the background and return at once (one
            process only; see the module's storage policy): the result's ``final_dir`` is where
            the model will be, ``summary["final_copy"]`` is ``"background"``; call
            :func:`wait_for_final_copies` before reading it.

    Returns a :class:`TrainResult`; ``{run_dir}/train_summary.json`` is written last, once
    ``final/`` is on Drive (see the module's storage policy). Model, teacher and trainer are freed
    before it returns.
    """
    spec = get_method(method, cfg)
    student_name = cfg.student_name(student)
    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(cfg, method, student, seed)
    max_steps = int(cfg.train.max_steps if max_steps is None else max_steps)
    if spec.stages:
        raise ValueError(f"{method!r} has stages {list(spec.stages)}: train it with "
                         "slmkd.training.staged.train (which runs each stage here).")

    from accelerate import PartialState

    wait_for_final_copies(run_dir, collect=False)  # this run's copy from an earlier call
    state = PartialState()
    main = state.is_main_process
    ident = run_identity(cfg, spec, student_name, seed, max_steps)
    if init_model is not None:
        ident["init_model"] = str(init_model)
    fresh = check_run_identity(run_dir, ident, force)
    local_dir = local_checkpoint_dir(cfg, run_dir)
    drive_ckpt_dir = run_dir / CHECKPOINTS_DIR
    done = open_run_folders(run_dir, local_dir, FINAL_DIR, fresh=fresh, main=main)
    if done is not None:
        return done

    pending = _read_pending(local_dir, ident) if main and not fresh else None
    if pending is not None:
        _say(f"{run_dir}: this run's final model is on local disk ({local_dir / FINAL_DIR}), "
             "not yet on Drive; copying it (no training).")
        res = _publish_final(run_dir, local_dir, pending, lambda: _drive_resumable(drive_ckpt_dir))
    if state.num_processes > 1:
        pflag = torch.tensor([int(pending is not None)], device=state.device)
        torch.distributed.broadcast(pflag, src=0)
        has_pending = bool(pflag.item())
    else:
        has_pending = pending is not None
    if has_pending:
        state.wait_for_everyone()
        if main:
            return res
        return _result_on_other_rank(run_dir, local_dir)

    summary, syncer = _fit(cfg, spec, method, student_name, seed, run_dir=run_dir,
                           local_dir=local_dir, max_steps=max_steps, save_steps=save_steps,
                           fresh=fresh, ident=ident, live_plot=live_plot, init_model=init_model)
    _free_memory()  # _fit's frame is gone: model, teacher and trainer with it
    if main:
        atomic_write_json(local_dir / PENDING_NAME, {"identity": ident, "summary": summary})
        def resumable() -> str:
            return syncer.resumable if syncer is not None else _drive_resumable(drive_ckpt_dir)

        if background_copy and state.num_processes == 1:
            _publish_in_background(run_dir, local_dir, summary, resumable)
            res = TrainResult(run_dir, run_dir / FINAL_DIR, {**summary, "final_copy": "background"})
            where = f"{res.final_dir} (copying to Drive in the background)"
        else:
            res = _publish_final(run_dir, local_dir, summary, resumable)
            where = str(res.final_dir)
        frac = summary["skipped_fraction"]
        flag = "  <-- FLAG: >= 1% of batches skipped" if frac >= SKIP_WARN_FRACTION else ""
        _say(f"[{method}] done: {summary['steps']} steps, final loss {summary['final_loss']}, "
             f"skipped {summary['skipped_batches']} ({100 * frac:.2f}%){flag}\n"
             f"  model: {where}\n  log: {run_dir / LOG_NAME}\n  plots: {run_dir / 'plots'}")
    state.wait_for_everyone()
    if main:
        return res
    return _result_on_other_rank(run_dir, local_dir)


def _result_on_other_rank(run_dir: Path, local_dir: Path) -> TrainResult:
    if is_run_complete(run_dir):
        s = read_json(run_dir / SUMMARY_NAME)
        return TrainResult(run_dir, run_dir / s.get("final_model_dir", FINAL_DIR), s)
    s = read_json(local_dir / PENDING_NAME)["summary"]
    return TrainResult(run_dir, local_dir / FINAL_DIR, {**s, "final_on_drive": False})


def _fit(cfg: ExperimentConfig, spec: MethodSpec, method: str, student_name: str, seed: int, *,
         run_dir: Path, local_dir: Path, max_steps: int, save_steps: int | None, fresh: bool,
         ident: dict[str, Any], live_plot: bool,
         init_model: str | os.PathLike | None) -> tuple[dict[str, Any] | None, DriveSyncer | None]:
    """Load, train, save ``{local_dir}/final``; returns ``(summary, syncer)`` (summary None
    off the main process). Everything that holds the model lives in this frame, and the trainer's
    reference cycles are broken before it returns (also on an exception)."""
    from accelerate import PartialState
    from transformers import set_seed

    from slmkd.modeling import load_causal_lm, load_tokenizer
    from slmkd.training.data import load_training_records

    state = PartialState()
    main = state.is_main_process
    t_start = time.time()
    drive_ckpt_dir = run_dir / CHECKPOINTS_DIR
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            (run_dir / SUMMARY_NAME).unlink(missing_ok=True)
            remove_checkpoint_folder(drive_ckpt_dir)  # of the finished run being retrained
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

    every_s, every_steps = save_schedule(cfg, save_steps)
    args = _build_training_args(cfg, local_dir, seed, max_steps, every_steps, device)

    resume, guard = prepare_resume(cfg, method, run_dir=run_dir, local_dir=local_dir,
                                   fresh=fresh, main=main, ident=ident, cot_path=cot_path)
    syncer = start_syncer(run_dir, local_dir, resume, main)
    collator = (spec.make_collator(cfg, tokenizer) if spec.make_collator
                else PaddingCollator(tokenizer.pad_token_id,
                                     pad_to_multiple_of=8 if device.type == "cuda" else None))
    sched_cb = ScheduleCallback()
    ckpt_cb = CheckpointSchedule(every_s)
    callbacks = [sched_cb, ckpt_cb, TrainingMonitor(run_dir, live_plot=live_plot)]
    trainer = None
    try:
        trainer = DistillationTrainer(
            model=model, args=args, train_dataset=dataset, data_collator=collator,
            processing_class=tokenizer, spec=spec, cfg=cfg, teacher=teacher,
            vocab_size=len(tokenizer), guard=guard, syncer=syncer, callbacks=callbacks)
        sched_cb.trainer = trainer
        run_trainer(trainer, resume, syncer)

        # -- final model (local disk), summary ------------------------------------------------
        summary = None
        if main:
            to_save = trainer.model
            if cfg.train.use_lora and hasattr(to_save, "merge_and_unload"):
                to_save = to_save.merge_and_unload()
            final_dtype = str(getattr(cfg.train, "final_dtype", "fp32"))
            save_final_model(to_save, tokenizer, local_dir / FINAL_DIR, final_dtype)
            to_save = None
            summary = {
                **common_summary(cfg, trainer, method=method, student_name=student_name,
                                 seed=seed, run_dir=run_dir, t_start=t_start,
                                 stats_dict=stats_dict, cot_path=cot_path, resume=resume,
                                 ckpt_cb=ckpt_cb, syncer=syncer),
                "final_model_dir": FINAL_DIR, "final_dtype": final_dtype,
                "teacher": cfg.teacher if spec.needs_teacher else None,
            }
        state.wait_for_everyone()
        return summary, syncer
    finally:
        if trainer is not None:
            release_trainer(trainer, callbacks)
        # an exception's traceback keeps this frame: drop what holds the model
        trainer = model = teacher = to_save = None  # noqa: F841
        callbacks = sched_cb = collator = dataset = None  # noqa: F841
