"""Two-stage methods: each stage is its own resumable run in ``{run_dir}/stage{i}``.

:func:`train` is the training entry point that dispatches: a method with ``stages``
(``cascod-2stage``) runs here (:func:`train_staged`), any other in
:func:`slmkd.training.run.train`.

Stage ``i + 1`` starts from stage ``i``'s model. A stage listed in :data:`ADAPTER_STAGES`
(``cascod-stage2``) is **not** a continued fine-tuning of those weights: it trains a separate
LoRA adapter on the *frozen* previous model (:func:`train_adapter_stage`), with its own learning
rate, epochs and step budget (``cfg.cascod.stage2_learning_rate`` / ``stage2_epochs`` /
``stage2_max_steps``; LoRA ``stage2_lora_r`` / ``stage2_lora_alpha``), and saves only the adapter::

    {run_dir}/stage1/final/                      the stage-1 model (q -> r), never changed again
    {run_dir}/stage2/student_rationales.jsonl    stage-1 greedy rationales (resumable store)
    {run_dir}/stage2/adapter/                    adapter_config.json + adapter_model.safetensors
                                                 + tokenizer; base_model_name_or_path =
                                                 "../../stage1/final" (relative: a moved run
                                                 folder still loads)
    {run_dir}/train_summary.json                 final_model_dir = "stage2/adapter"

:func:`slmkd.modeling.load_causal_lm` loads ``stage2/adapter`` as stage-1 model + adapter (a
``PeftModel``); :func:`slmkd.generation.cascaded_generate` writes the rationale with the adapter
off — exactly the stage-1 weights — and the answer with it on.

CasCoD's stage-2 data (:func:`prepare_stage2_dataset`): a fraction
``cfg.cascod.stage2_student_rationale_fraction`` of the records is conditioned on the stage-1
student's own greedy rationale (target: the gold answer), the rest on the teacher's
(:func:`slmkd.training.cascod.build_stage2_dataset`). The student rationales are generated once
(:func:`ensure_student_rationales`: appended bucket by bucket, a rerun generates only the missing
ids).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmkd.fileio import atomic_write_json, read_json
from slmkd.training.cascod import (
    STAGE2_METHOD,
    STUDENT_RATIONALES_FILE,
    CasCoDPairDataset,
    CasCoDStats,
    _bbh_prompts_for,
    _stage2_candidates,
    build_stage2_dataset,
    select_student_rationale_ids,
)
from slmkd.training.method_spec import MethodSpec
from slmkd.training.methods import get_method
from slmkd.training.run import (
    CHECKPOINTS_DIR,
    CONFIG_NAME,
    SUMMARY_NAME,
    CheckpointSchedule,
    TrainResult,
    _build_training_args,
    _free_memory,
    _say,
    check_run_identity,
    common_summary,
    local_checkpoint_dir,
    open_run_folders,
    prepare_resume,
    release_trainer,
    run_dir_for,
    run_identity,
    run_trainer,
    save_schedule,
    start_syncer,
)
from slmkd.training.run import train as train_single

if TYPE_CHECKING:  # pragma: no cover
    from slmkd.config import ExperimentConfig

logger = logging.getLogger(__name__)

__all__ = ["ADAPTER_DIR", "ADAPTER_STAGES", "LORA_TARGET_MODULES", "ensure_student_rationales",
           "pregenerate_student_rationales", "prepare_stage2_dataset", "read_student_rationales",
           "stage_method", "student_rationale_items", "train", "train_adapter_stage",
           "train_staged"]

#: where an adapter stage saves its result, inside its stage folder
ADAPTER_DIR = "adapter"
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# =============================================================================================
# entry point and orchestration
# =============================================================================================
def train(cfg: ExperimentConfig, method: str, student: str, seed: int, *,
          run_dir: str | os.PathLike | None = None, max_steps: int | None = None,
          save_steps: int | None = None, force: bool = False, live_plot: bool = False,
          init_model: str | os.PathLike | None = None,
          background_copy: bool = False) -> TrainResult:
    """Train ``student`` with ``method`` and ``seed`` (the arguments of
    :func:`slmkd.training.run.train`): a method with stages runs :func:`train_staged` (its first
    stage starts from ``init_model`` when given; its stages copy ``final/`` synchronously, as the
    next stage starts from it), any other :func:`slmkd.training.run.train`."""
    spec = get_method(method)
    if not spec.stages:
        return train_single(cfg, method, student, seed, run_dir=run_dir, max_steps=max_steps,
                            save_steps=save_steps, force=force, live_plot=live_plot,
                            init_model=init_model, background_copy=background_copy)
    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(cfg, method, student, seed)
    max_steps = int(cfg.train.max_steps if max_steps is None else max_steps)
    return train_staged(cfg, spec, student, seed, run_dir=run_dir, max_steps=max_steps,
                        save_steps=save_steps, force=force, live_plot=live_plot,
                        init_model=init_model)


def stage_method(cfg: Any, stage: str) -> str:
    """The method a stage runs: ``cascod-stage1`` is ``cascod`` (the joint loss) when
    ``cfg.cascod.stage1_objective == "joint"``, else itself."""
    if stage == "cascod-stage1" and getattr(cfg.cascod, "stage1_objective", "rationale") == "joint":
        return "cascod"
    return stage


def train_staged(cfg: ExperimentConfig, spec: MethodSpec, student: str, seed: int, *,
                 run_dir: Path, max_steps: int, save_steps: int | None, force: bool,
                 live_plot: bool, init_model: str | os.PathLike | None = None) -> TrainResult:
    """Run each stage as its own resumable run in ``{run_dir}/stage{i}``; stage i+1 starts from
    stage i's model: a plain stage fine-tunes it (:func:`slmkd.training.run.train` with
    ``init_model``), an adapter stage (:data:`ADAPTER_STAGES`) trains a LoRA adapter on it,
    frozen (:func:`train_adapter_stage`). The parent summary points to the last stage's model
    (``stage2/adapter`` for ``cascod-2stage``)."""
    from accelerate import PartialState

    run_dir = Path(run_dir)
    t0 = time.time()
    prev: Path | None = Path(init_model) if init_model is not None else None
    results = []
    stages = [stage_method(cfg, s) for s in spec.stages]
    for i, stage in enumerate(stages, start=1):
        stage_dir = run_dir / f"stage{i}"
        if i > 1 and stage in ADAPTER_STAGES:
            res = train_adapter_stage(cfg, stage, student, seed, run_dir=stage_dir, base_dir=prev,
                                      max_steps=max_steps, save_steps=save_steps, force=force,
                                      live_plot=live_plot)
        else:
            res = train_single(stage1_config(cfg) if i == 1 else cfg, stage, student, seed,
                               run_dir=stage_dir, max_steps=max_steps, save_steps=save_steps,
                               force=force, live_plot=live_plot, init_model=prev)
        if res.summary.get("final_on_drive") is False:  # see slmkd.training.run: rerun later
            _say(f"[{spec.name}] stage {i} is not complete on Drive yet; the next stages wait "
                 "for the rerun that copies it.")
            return res
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
                    "summary": r.summary} for s, r in zip(stages, results, strict=True)],
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
# an adapter stage: LoRA on the frozen previous stage
# =============================================================================================
def stage2_steps(cfg: ExperimentConfig, max_steps: int) -> int:
    """The adapter stage's step budget: ``cfg.cascod.stage2_max_steps`` when > 0, else the run's
    ``max_steps`` (a cap passed to :func:`train`; -1: ``cfg.cascod.stage2_epochs`` epochs)."""
    return int(cfg.cascod.stage2_max_steps) if cfg.cascod.stage2_max_steps > 0 else int(max_steps)


def stage1_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the first stage's own budget in ``train``: ``cfg.cascod.stage1_epochs`` and
    ``cfg.cascod.stage1_learning_rate`` where set (None keeps ``train``'s: ``cfg`` itself, so
    runs recorded before these settings existed resume). The KD schedules are per epoch and
    keep their last value past their end (stage 1 has no KD term)."""
    import dataclasses

    cas = cfg.cascod
    changes: dict[str, Any] = {}
    if getattr(cas, "stage1_epochs", None) is not None:
        changes["epochs"] = int(cas.stage1_epochs)
    if getattr(cas, "stage1_learning_rate", None) is not None:
        changes["learning_rate"] = float(cas.stage1_learning_rate)
    if not changes:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def adapter_stage_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the adapter stage's optimisation settings in ``train``: learning rate
    ``cfg.cascod.stage2_learning_rate``, ``cfg.cascod.stage2_epochs`` epochs (everything else —
    batch size, warm-up ratio, scheduler, clipping, guards — as the run's)."""
    import dataclasses

    tr = dataclasses.replace(cfg.train, learning_rate=float(cfg.cascod.stage2_learning_rate),
                             epochs=int(cfg.cascod.stage2_epochs), use_lora=False)
    return dataclasses.replace(cfg, train=tr)


def apply_stage_lora(cfg: ExperimentConfig, model: Any) -> Any:
    """Freeze ``model`` and wrap it in a fresh LoRA adapter (``cfg.cascod.stage2_lora_r`` /
    ``stage2_lora_alpha``, dropout 0, every attention and MLP projection; with
    ``cfg.cascod.stage2_train_lm_head`` also a trainable copy of the lm_head): only the adapter
    trains, and with the adapter disabled the model is exactly ``model``."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise RuntimeError("cascod-2stage's stage 2 is a LoRA adapter: pip install peft") from None
    model.requires_grad_(False)
    lcfg = LoraConfig(r=int(cfg.cascod.stage2_lora_r), lora_alpha=int(cfg.cascod.stage2_lora_alpha),
                      lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=list(LORA_TARGET_MODULES),
                      modules_to_save=["lm_head"] if getattr(
                          cfg.cascod, "stage2_train_lm_head", False) else None)
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, lcfg)


def _file_sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def train_adapter_stage(cfg: ExperimentConfig, stage: str, student: str, seed: int, *,
                        run_dir: Path, base_dir: Path, max_steps: int, save_steps: int | None,
                        force: bool, live_plot: bool) -> TrainResult:
    """Train a LoRA adapter on the frozen model in ``base_dir`` (the previous stage's ``final/``)
    as the resumable run ``run_dir``; the result is ``{run_dir}/adapter``.

    The run follows :func:`slmkd.training.run.train` — identity check (``run.json``; it records
    the base folder relative to ``run_dir`` and a hash of the base run's summary, so a retrained
    stage 1 is noticed), checkpoints on local disk copied to Drive and resumed from either,
    guards, the loss of ``stage``'s method, checkpoints removed once the run is complete — with
    :func:`adapter_stage_config`'s learning rate and epochs, the step budget of
    :func:`stage2_steps`, and the dataset of ``ADAPTER_STAGES[stage]`` (built with the base
    model before the adapter is added: it may generate with it). The adapter (a few MB to a few
    hundred MB) is written straight into the run folder under a temp name and renamed.
    """

    from accelerate import PartialState

    from slmkd.training.checkpoint import remove_checkpoint_folder

    spec = get_method(stage)
    state = PartialState()
    main = state.is_main_process
    student_name = cfg.student_name(student)
    run_dir, base_dir = Path(run_dir), Path(base_dir)
    steps = stage2_steps(cfg, max_steps)
    ident = run_identity(cfg, spec, student_name, seed, steps)
    ident.update({"adapter": "lora", "init_model": os.path.relpath(base_dir, run_dir),
                  "init_model_summary": _file_sha(base_dir.parent / SUMMARY_NAME)})
    fresh = check_run_identity(run_dir, ident, force)
    local_dir = local_checkpoint_dir(cfg, run_dir)
    drive_ckpt_dir = run_dir / CHECKPOINTS_DIR
    done = open_run_folders(run_dir, local_dir, ADAPTER_DIR, fresh=fresh, main=main)
    if done is not None:
        return done

    summary = _fit_adapter(cfg, spec, stage, student_name, seed, run_dir=run_dir,
                           base_dir=base_dir, local_dir=local_dir, steps=steps,
                           save_steps=save_steps, fresh=fresh, ident=ident, live_plot=live_plot)
    _free_memory()
    final_dir = run_dir / ADAPTER_DIR
    if main:
        atomic_write_json(run_dir / SUMMARY_NAME, summary)  # the stage is complete
        remove_checkpoint_folder(drive_ckpt_dir)
        shutil.rmtree(local_dir, ignore_errors=True)
        _say(f"[{stage}] done: {summary['steps']} steps (LoRA on the frozen {base_dir}), final "
             f"loss {summary['final_loss']}\n  adapter: {final_dir}")
    state.wait_for_everyone()
    return TrainResult(run_dir, final_dir, read_json(run_dir / SUMMARY_NAME))


def _save_adapter(model: Any, tokenizer: Any, final_dir: Path, base_dir: Path) -> None:
    """The adapter weights + ``adapter_config.json`` (base recorded relative to ``final_dir``) +
    the tokenizer + a manifest, under a temp name renamed into ``final_dir``."""

    from slmkd.modeling import ADAPTER_CONFIG
    from slmkd.training.checkpoint import write_manifest

    tmp = final_dir.parent / f".tmp-{final_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
    p = tmp / ADAPTER_CONFIG
    d = json.loads(p.read_text(encoding="utf-8"))
    d["base_model_name_or_path"] = os.path.relpath(base_dir, final_dir)
    atomic_write_json(p, d)
    tokenizer.save_pretrained(tmp)
    write_manifest(tmp, checksums=True)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)


def _fit_adapter(cfg: ExperimentConfig, spec: MethodSpec, stage: str, student_name: str,
                 seed: int, *, run_dir: Path, base_dir: Path, local_dir: Path, steps: int,
                 save_steps: int | None, fresh: bool, ident: dict[str, Any],
                 live_plot: bool) -> dict[str, Any] | None:
    """Load the frozen base, build the data, add the adapter, train, save ``{run_dir}/adapter``;
    returns the summary (None off the main process). Everything holding the model lives in this
    frame and the trainer's reference cycles are broken before it returns."""

    import torch
    from accelerate import PartialState
    from transformers import set_seed

    from slmkd.modeling import load_causal_lm, load_tokenizer
    from slmkd.training.checkpoint import remove_checkpoint_folder
    from slmkd.training.data import PaddingCollator, load_training_records
    from slmkd.training.monitor import TrainingMonitor
    from slmkd.training.trainer import DistillationTrainer, ScheduleCallback

    state = PartialState()
    main = state.is_main_process
    t_start = time.time()
    drive_ckpt_dir = run_dir / CHECKPOINTS_DIR
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            (run_dir / SUMMARY_NAME).unlink(missing_ok=True)
            remove_checkpoint_folder(drive_ckpt_dir)
    state.wait_for_everyone()
    scfg = adapter_stage_config(cfg)
    tokenizer = load_tokenizer(str(base_dir), cfg)
    with state.main_process_first():
        records, cot_path = load_training_records(cfg)
    device = state.device
    meta = {"base_model": ident["init_model"], "base_summary": ident["init_model_summary"]}
    if stage == STAGE2_METHOD and main:  # vLLM before the training model takes the GPU
        pregenerate_student_rationales(cfg, records, tokenizer, base_dir, stage_dir=run_dir,
                                       seed=seed, meta=meta, show_progress=main)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() \
        else torch.float32
    model = load_causal_lm(str(base_dir), cfg, role="student", for_training=False, device=device,
                           dtype=dtype)
    with contextlib.suppress(ImportError):
        from slmkd.vocab import ensure_vocab_alignment

        ensure_vocab_alignment(model, tokenizer)
    with state.main_process_first():  # the main process generates, the others read the store
        dataset, data_stats = ADAPTER_STAGES[stage](
            cfg, records, tokenizer, model, stage_dir=run_dir, seed=seed, meta=meta,
            show_progress=main)
    if len(dataset) == 0:
        raise ValueError(f"No training example survived for {stage}: {data_stats}")
    _say(f"[{stage}] data: {data_stats.summary()}")
    set_seed(int(seed))
    model.config.use_cache = False
    model = apply_stage_lora(cfg, model)

    every_s, every_steps = save_schedule(cfg, save_steps)
    args = _build_training_args(scfg, local_dir, seed, steps, every_steps, device)
    resume, guard = prepare_resume(scfg, stage, run_dir=run_dir, local_dir=local_dir,
                                   fresh=fresh, main=main, ident=ident, cot_path=cot_path)
    syncer = start_syncer(run_dir, local_dir, resume, main)
    sched_cb, ckpt_cb = ScheduleCallback(), CheckpointSchedule(every_s)
    callbacks = [sched_cb, ckpt_cb, TrainingMonitor(run_dir, live_plot=live_plot)]
    trainer = None
    try:
        trainer = DistillationTrainer(
            model=model, args=args, train_dataset=dataset,
            data_collator=PaddingCollator(tokenizer.pad_token_id,
                                          pad_to_multiple_of=8 if device.type == "cuda" else None),
            processing_class=tokenizer, spec=spec, cfg=scfg, teacher=None,
            vocab_size=len(tokenizer), guard=guard, syncer=syncer, callbacks=callbacks)
        sched_cb.trainer = trainer
        run_trainer(trainer, resume, syncer)
        summary = None
        if main:
            _save_adapter(trainer.accelerator.unwrap_model(trainer.model), tokenizer,
                          run_dir / ADAPTER_DIR, base_dir)
            summary = {
                **common_summary(scfg, trainer, method=stage, student_name=student_name,
                                 seed=seed, run_dir=run_dir, t_start=t_start,
                                 stats_dict=data_stats.to_dict(), cot_path=cot_path,
                                 resume=resume, ckpt_cb=ckpt_cb, syncer=syncer),
                "final_model_dir": ADAPTER_DIR,
                "base_model_dir": os.path.relpath(base_dir, run_dir),
                "adapter": {"type": "lora", "r": int(cfg.cascod.stage2_lora_r),
                            "alpha": int(cfg.cascod.stage2_lora_alpha),
                            "learning_rate": float(scfg.train.learning_rate),
                            "epochs": int(scfg.train.epochs), "max_steps": int(steps),
                            "trainable_parameters": sum(p.numel() for p in model.parameters()
                                                        if p.requires_grad)},
                "teacher": None,
            }
        state.wait_for_everyone()
        return summary
    finally:
        if trainer is not None:
            release_trainer(trainer, callbacks)
        trainer = model = dataset = None  # noqa: F841
        callbacks = sched_cb = ckpt_cb = None  # noqa: F841


# =============================================================================================
# CasCoD stage 2: the answer step on teacher and stage-1 student rationales
# =============================================================================================
def read_student_rationales(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], int]:
    """Rows of a student-rationale store by id (first occurrence wins) and the number of
    unreadable lines (a write cut short by a crash leaves at most one; a row whose
    ``rationale`` is not a string counts as unreadable): :func:`slmkd.fileio.read_jsonl_by_id`."""
    from slmkd.fileio import read_jsonl_by_id

    return read_jsonl_by_id(path, valid=lambda row: isinstance(row.get("rationale"), str))


def ensure_student_rationales(
    model: Any,
    tokenizer: Any,
    items: Sequence[tuple[str, str]],
    path: str | os.PathLike,
    *,
    max_new_tokens: int,
    batch_size: int,
    meta: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> dict[str, str]:
    """The model's greedy rationale for every ``(id, prompt)`` of ``items``, generated once.

    ``model`` is an in-memory HF model, or an open engine of :mod:`slmkd.generation.engines`
    (vLLM on the stage-1 folder: :func:`pregenerate_student_rationales`), which generates
    ``8 · batch_size`` prompts per appended chunk.

    ``path`` (a ``.jsonl``: ``{"id", "rationale", "num_new_tokens", "hit_max_new_tokens"}`` per
    line) is appended bucket by bucket (fsynced), so an interrupted call loses at most one bucket
    and a rerun generates only the ids not yet stored (never twice; a torn last line is dropped).
    ``meta`` (e.g. what identifies the generating model and the decoding settings) is kept in
    ``{path}.meta.json``: a store written under another ``meta`` is discarded and regenerated.
    Generation is :func:`slmkd.generation.iter_generate_batched` (greedy, until EOS or
    ``max_new_tokens``); the rationale is the continuation stripped, as in
    :func:`slmkd.generation.cascaded_generate`. Returns ``{id: rationale}`` for ``items``.
    """
    from slmkd import generation
    from slmkd.fileio import append_jsonl, atomic_write_json, atomic_write_jsonl, read_json
    from slmkd.generation.engines import is_engine

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_path = path.with_name(path.name + ".meta.json")
    meta = {"max_new_tokens": int(max_new_tokens), **(meta or {})}
    if path.is_file():
        old = read_json(meta_path) if meta_path.is_file() else None
        if old != meta:
            logger.warning("%s was generated under %s, now %s: regenerating", path, old, meta)
            path.unlink()
    atomic_write_json(meta_path, meta)
    done, bad = read_student_rationales(path)
    if bad:  # rewrite without the line cut short by a crash, atomically
        atomic_write_jsonl(path, done.values())
    seen: set[str] = set()
    pending: list[tuple[str, str]] = []
    for rid, prompt in items:
        rid = str(rid)
        if rid not in done and rid not in seen:
            seen.add(rid)
            pending.append((rid, prompt))
    if pending:
        logger.info("generating %d student rationales into %s (%d stored)", len(pending), path,
                    len(done))
        prompts = [p for _, p in pending]
        if is_engine(model):
            step = max(1, 8 * int(batch_size))
            chunks = ((list(range(i, min(i + step, len(prompts)))),
                       model.generate(prompts[i:i + step], max_new_tokens=max_new_tokens,
                                      adapter=False, desc="stage 2: student rationales",
                                      show_progress=show_progress))
                      for i in range(0, len(prompts), step))
        else:
            chunks = ((b.indices, b.outputs) for b in generation.iter_generate_batched(
                model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                desc="stage 2: student rationales", show_progress=show_progress))
        for indices, outputs in chunks:
            rows = [{"id": pending[i][0], "rationale": o.text.strip(),
                     "num_new_tokens": o.num_new_tokens, "hit_max_new_tokens": o.hit_max_new_tokens}
                    for i, o in zip(indices, outputs, strict=True)]
            append_jsonl(path, rows)
            done.update({r["id"]: r for r in rows})
    return {str(rid): done[str(rid)]["rationale"] for rid, _ in items}


def student_rationale_items(cfg: Any, records: Sequence[dict[str, Any]], tokenizer: Any,
                            seed: int) -> list[tuple[str, str]]:
    """``(id, prompt)`` of the records whose stage-2 example reads the student's own rationale
    (:func:`select_student_rationale_ids` over the records with a clean split)."""
    cands = _stage2_candidates(tokenizer, records, CasCoDStats(), _bbh_prompts_for(cfg, records))
    chosen = select_student_rationale_ids([c[0] for c in cands],
                                          cfg.cascod.stage2_student_rationale_fraction, seed)
    return [(rid, prompt) for rid, prompt, *_ in cands if rid in chosen]


def pregenerate_student_rationales(cfg: Any, records: Sequence[dict[str, Any]], tokenizer: Any,
                                   base_dir: str | os.PathLike, *, stage_dir: str | os.PathLike,
                                   seed: int, meta: dict[str, Any],
                                   show_progress: bool = True) -> bool:
    """Generate stage 2's student rationales with vLLM on the stage-1 folder before the
    training model is loaded, when the evaluation backend resolves to vLLM (``auto`` on CUDA
    with vLLM installed); the in-memory HF model then finds them all stored. Returns whether it
    ran (False: HF generates them later, as before)."""
    from slmkd.generation.batched import resolve_backend
    from slmkd.generation.engines import open_engine

    if resolve_backend(getattr(cfg.evaluation, "backend", "hf")) != "vllm":
        return False
    items = student_rationale_items(cfg, records, tokenizer, seed)
    path = Path(stage_dir) / STUDENT_RATIONALES_FILE
    done, _ = read_student_rationales(path) if path.is_file() else ({}, 0)
    if not items or all(rid in done for rid, _ in items):
        return False
    with open_engine(cfg, str(base_dir), backend="vllm", tokenizer=tokenizer) as engine:
        ensure_student_rationales(
            engine, tokenizer, items, path, max_new_tokens=cfg.evaluation.max_new_tokens,
            batch_size=cfg.evaluation.batch_size, meta=meta, show_progress=show_progress)
    return True


def prepare_stage2_dataset(cfg: Any, records: Sequence[dict[str, Any]], tokenizer: Any,
                           model: Any, *, stage_dir: str | os.PathLike, seed: int,
                           meta: dict[str, Any] | None = None,
                           show_progress: bool = True) -> tuple[CasCoDPairDataset, CasCoDStats]:
    """Stage 2's dataset for :mod:`slmkd.training.staged`: ``model`` is the stage-1 model (no
    adapter yet). Picks ``cfg.cascod.stage2_student_rationale_fraction`` of the records
    (:func:`select_student_rationale_ids`), makes sure their greedy rationales are in
    ``{stage_dir}/student_rationales.jsonl`` (:func:`ensure_student_rationales`, decoded like the
    evaluator: ``cfg.evaluation.max_new_tokens``, ``cfg.evaluation.batch_size``) and builds the
    mixed dataset (:func:`build_stage2_dataset`)."""
    bbh = _bbh_prompts_for(cfg, records)
    items = student_rationale_items(cfg, records, tokenizer, seed)
    rats: dict[str, str] = {}
    if items:
        rats = ensure_student_rationales(
            model, tokenizer, items, Path(stage_dir) / STUDENT_RATIONALES_FILE,
            max_new_tokens=cfg.evaluation.max_new_tokens, batch_size=cfg.evaluation.batch_size,
            meta=meta, show_progress=show_progress)
    return build_stage2_dataset(tokenizer, records, max_length=cfg.train.max_seq_length,
                                student_rationales=rats, answer_cue=cfg.cascod.answer_cue,
                                bbh_prompts=bbh)


#: adapter stages and their dataset builders
#: ``(cfg, records, tokenizer, base_model, *, stage_dir, seed, meta, show_progress)``
ADAPTER_STAGES: dict[str, Callable[..., tuple[Any, Any]]] = {STAGE2_METHOD: prepare_stage2_dataset}
