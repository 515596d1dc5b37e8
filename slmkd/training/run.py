"""Running one training job: the run directory, its identity (resume check), the student and
teacher, the :class:`~slmkd.training.trainer.DistillationTrainer`, and two-stage methods.

:func:`train` is the stage's entry point (notebooks 02/03, ``slmkd train``, ``slmkd run``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainingArguments

from slmkd.fileio import atomic_write_json, read_json
from slmkd.layout import run_dir_for
from slmkd.training.checkpoint import DriveSyncer, select_resume_checkpoint
from slmkd.training.data import PaddingCollator
from slmkd.training.method_spec import MethodSpec
from slmkd.training.methods import get_method
from slmkd.training.monitor import LOG_NAME, TrainingMonitor, read_log, save_plots, truncate_log, vram_stats
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
SKIP_WARN_FRACTION = 0.01
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
# runs
# =============================================================================================
@dataclass
class TrainResult:
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
    from slmkd.training.data import load_training_records

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


