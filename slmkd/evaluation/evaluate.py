"""Evaluation of one model on GSM8K / BBH: generate, score every item, summarise, resumably.

Each finished generation batch is appended to ``predictions.jsonl`` (see
:mod:`slmkd.evaluation.predictions`), so a rerun continues where it stopped. Every row carries the
three metrics of :func:`slmkd.scoring.score_output` (lm-eval ``strict`` and ``flexible``, slmkd
``lenient``; :func:`slmkd.evaluation.predictions.score_row`); rows of an earlier version are
re-scored from their stored output, never regenerated. CasCoD students decode in two steps
(:func:`slmkd.generation.cascaded_generate`). This module imports nothing heavy at import time.

``eval_meta.json`` records the generation settings (a rerun with different ones is refused), the
system prompt the chat template actually put before the user turn (:func:`chat_system_prompt`)
and the evaluated subset (``limit``, ``subset_seed``, ``n_items``, ``item_ids_hash``); the subset
is descriptive (changing ``limit`` reuses the stored rows), and ``summary.json`` repeats it so
the report can refuse to compare runs evaluated on different items.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from slmkd.data.prompts import FINAL_ANSWER_PREFIX
from slmkd.evaluation.leakage import check_no_leakage, training_questions_for_run
from slmkd.evaluation.predictions import (
    CASCOD_METHODS,
    EVAL_META_FILE,
    PREDICTIONS_FILE,
    SUMMARY_FILE,
    _append_rows,
    _rewrite_rows,
    eval_dir,
    item_ids_hash,
    read_predictions,
    run_model_slug,
    score_row,
    summarize_predictions,
    upgrade_row,
)

logger = logging.getLogger(__name__)
_USE_CONFIG: Any = object()
#: eval_meta keys that describe how the outputs were generated: a rerun that differs in one of
#: them is refused (the other keys -- subset, hash, model_name -- only describe the last run).
GENERATION_KEYS = ("model", "dataset", "method", "max_new_tokens", "cascaded", "answer_cue",
                   "final_answer_prefix", "system_prompt")
_SYSTEM_SENTINEL = "<<slmkd-system-prompt-probe-7f3a>>"


def _resolve_limit(cfg: Any, dataset: str, limit: Any) -> int | None:
    if limit is _USE_CONFIG:
        return cfg.evaluation.gsm8k_limit if dataset == "gsm8k" else cfg.evaluation.bbh_limit
    if limit is not None and int(limit) <= 0:
        return None
    return None if limit is None else int(limit)


def chat_system_prompt(tokenizer: Any, user_text: str) -> str | None:
    """The system text the tokenizer's chat template puts before a lone user turn (``None``: no
    system block, or a template that cannot say).

    The prompt is rendered as evaluation renders it (:func:`slmkd.data.prompts.build_prompt`: one
    user message); its text before the user message is compared with a rendering that has an
    explicit system message: the markup around that message, found in the first rendering,
    encloses the template's own system text (Qwen2.5: "You are Qwen, created by Alibaba Cloud.
    You are a helpful assistant.").
    """
    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    user = {"role": "user", "content": user_text}
    try:
        plain = render([user])
        probe = render([{"role": "system", "content": _SYSTEM_SENTINEL}, user])
    except Exception:  # noqa: BLE001 - templates without a system role raise anything
        return None
    if not isinstance(plain, str) or not isinstance(probe, str):
        return None
    i, s = plain.find(user_text), probe.find(_SYSTEM_SENTINEL)
    u = probe.find(user_text, s + len(_SYSTEM_SENTINEL)) if s >= 0 else -1
    if i < 0 or s < 0 or u < 0:
        return None
    prefix, before, between = plain[:i], probe[:s], probe[s + len(_SYSTEM_SENTINEL):u]
    if (len(prefix) >= len(before) + len(between) and prefix.startswith(before)
            and prefix.endswith(between)):
        text = prefix[len(before):len(prefix) - len(between)].strip()
        return text or None
    return None


def _load_eval_tokenizer(cfg: Any, name: Any, tokenizer_name: str | None) -> Any:
    from slmkd.generation.engines import load_generation_tokenizer

    return load_generation_tokenizer(cfg, name, tokenizer_name)


def _system_prompt_of(cfg: Any, tokenizer: Any, record: Any) -> str | None:
    from slmkd.data.prompts import user_message
    from slmkd.data.sources import bbh_prompts_for

    return chat_system_prompt(tokenizer, user_message(record, bbh_prompts_for(cfg, record.dataset)))


def evaluation_records(cfg: Any, dataset: str, limit: Any = _USE_CONFIG) -> list[Any]:
    """The evaluation items: the test split (BBH: the pool disjoint from any BBH training part)
    reduced to ``limit`` items (BBH: per task) by ``cfg.evaluation.subset_seed``; sorted by id.
    ``limit`` defaults to ``cfg.evaluation.gsm8k_limit`` / ``bbh_limit``; ``None`` = all."""
    from slmkd.data.records import eval_subset
    from slmkd.data.sources import load_records

    if dataset not in ("gsm8k", "bbh"):
        raise ValueError(f"unknown dataset {dataset!r}: expected 'gsm8k' or 'bbh'")
    loaded = load_records(cfg, dataset, "test")
    if not loaded.records:
        raise ValueError(f"no {dataset} evaluation records ({loaded.summary()})")
    return eval_subset(loaded.records, _resolve_limit(cfg, dataset, limit),
                       cfg.evaluation.subset_seed, per_task=(dataset == "bbh"))


def evaluate_model(
    cfg: Any,
    model: Any,
    dataset: str,
    *,
    method: str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    limit: Any = _USE_CONFIG,
    tokenizer: Any = None,
    tokenizer_name: str | None = None,
    model_slug: str | None = None,
    model_name: str | None = None,
    kind: str | None = None,
    student: str | None = None,
    seed: int | None = None,
    train_questions: Iterable[str] | None = None,
    records: Sequence[Any] | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    force: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Generate, score and summarise one model on one dataset; returns the summary dict.

    ``model`` is a model name / local path (loaded only if some item still needs generating), a
    loaded model (then pass ``tokenizer``), or an engine of :mod:`slmkd.generation.engines`
    (then pass ``model_name``; :func:`evaluate_on_datasets` and :func:`evaluate_run` pass one
    lazily opened engine for all datasets, so a model is loaded at most once). Prompts are the
    training chat prompts (:func:`slmkd.data.prompts.build_prompt`); CasCoD methods decode in two steps
    (:func:`slmkd.generation.cascaded_generate`), others greedily
    (:func:`slmkd.generation.iter_generate_batched`, or vLLM with
    ``cfg.evaluation.backend == "vllm"``). Each finished batch is appended to
    ``predictions.jsonl``, so a rerun continues where it stopped (rows of an earlier version are
    re-scored from their stored output and the file rewritten, never regenerated);
    ``summary.json`` is written atomically at the end. With ``train_questions`` the leakage guard
    runs first. ``eval_meta.json`` and the summary record the subset (``limit``,
    ``subset_seed``, ``item_ids_hash``) and the chat template's system prompt.
    """
    import time

    from slmkd.fileio import atomic_write_json
    from slmkd.generation import is_engine
    from slmkd.modeling import model_slug as _slug

    dataset = dataset.lower()
    if is_engine(model):
        if model_name is None:
            raise ValueError("pass model_name= together with an engine")
        name = str(model_name)
    else:
        name = model if isinstance(model, (str, os.PathLike)) else None
    if name is None and tokenizer is None:
        raise ValueError("pass tokenizer= together with a loaded model")
    slug = model_slug or (_slug(str(name)) if name is not None else "model")
    if kind is None:
        kind = "run" if method else ("teacher" if name == cfg.teacher else "base")
    subset = list(records) if records is not None else evaluation_records(cfg, dataset, limit)
    if train_questions is not None:
        check_no_leakage(subset, train_questions)
    out = Path(out_dir) if out_dir is not None else eval_dir(cfg, slug, dataset)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / PREDICTIONS_FILE
    max_new = int(max_new_tokens or cfg.evaluation.max_new_tokens)
    bs = int(batch_size or cfg.evaluation.batch_size)
    cascod = method in CASCOD_METHODS
    meta_path = out / EVAL_META_FILE
    if force:
        for p in (pred_path, out / SUMMARY_FILE, meta_path):
            p.unlink(missing_ok=True)
    old = (json.loads(meta_path.read_text(encoding="utf-8"))
           if meta_path.is_file() and pred_path.is_file() else None)
    done, bad = read_predictions(pred_path)
    pending = [r for r in subset if r.id not in done]
    # the system prompt the chat template adds: rendered with the tokenizer generation uses
    if tokenizer is None and pending:
        tokenizer = _load_eval_tokenizer(cfg, name, tokenizer_name)
    if tokenizer is not None and subset:
        system_prompt, rendered = _system_prompt_of(cfg, tokenizer, subset[0]), True
    elif old is not None and old.get("system_prompt_rendered"):
        system_prompt, rendered = old.get("system_prompt"), True
    else:  # nothing to generate and no tokenizer at hand: not rendered
        system_prompt, rendered = None, False
    limit_used = None if records is not None else _resolve_limit(cfg, dataset, limit)
    ids_hash = item_ids_hash(r.id for r in subset)
    meta = {"model": slug, "model_name": str(name) if name is not None else None,
            "dataset": dataset, "method": method, "max_new_tokens": max_new,
            "cascaded": cascod, "answer_cue": cfg.cascod.answer_cue if cascod else None,
            "final_answer_prefix": FINAL_ANSWER_PREFIX,
            "system_prompt": system_prompt, "system_prompt_rendered": rendered,
            "subset_source": "records" if records is not None else "config",
            "limit": limit_used, "subset_seed": cfg.evaluation.subset_seed,
            "subset_per_task": dataset == "bbh", "n_items": len(subset),
            "item_ids_hash": ids_hash,
            "metrics": {"strict": "lm-eval 0.4.13 strict-match", "flexible":
                        "lm-eval 0.4.13 flexible-extract", "lenient": "slmkd lenient scorer"}}
    if old is not None:
        # compared: the generation keys both runs recorded (a system prompt only when both
        # rendered it)
        both_rendered = rendered and bool(old.get("system_prompt_rendered"))
        keys = [k for k in GENERATION_KEYS
                if k in old and (k != "system_prompt" or both_rendered)]
        diff = {k: (old[k], meta[k]) for k in keys if old[k] != meta[k]}
        if diff:
            raise ValueError(
                f"{pred_path} was produced with different settings {diff}; rerun with "
                "force=True (CLI: --force) to start over, or use another out_dir."
            )
    atomic_write_json(meta_path, meta)

    # rows of an earlier version: re-scored from raw_output (no regeneration), stored again
    rescored = 0
    for rid, row in list(done.items()):
        new, changed = upgrade_row(row, dataset)
        if changed:
            done[rid] = new
            rescored += 1
    if bad or rescored:  # also drops a line cut short by a crash; atomic
        _rewrite_rows(pred_path, done.values())
    t0 = time.perf_counter()
    if pending:
        _generate_into(cfg, model, name, tokenizer, tokenizer_name, dataset, pending, pred_path,
                       done, method=method, batch_size=bs, max_new_tokens=max_new,
                       desc=f"eval {slug} {dataset}", show_progress=show_progress)
    rows = [done[r.id] for r in subset if r.id in done]
    if len(rows) != len(subset):
        raise RuntimeError(f"{len(subset) - len(rows)} items have no prediction in {pred_path}")
    summary = summarize_predictions(rows, dataset, seed=cfg.evaluation.subset_seed)
    assert summary["item_ids_hash"] == ids_hash
    summary.update({
        "model": slug, "model_name": meta["model_name"], "kind": kind, "method": method,
        "student": student, "seed": seed, "subset_seed": cfg.evaluation.subset_seed,
        "limit": (len(subset) if records is not None else limit_used),
        "subset_source": meta["subset_source"], "subset_per_task": meta["subset_per_task"],
        "item_ids_hash": ids_hash, "system_prompt": system_prompt,
        "rescored_rows": rescored,
        "max_new_tokens": max_new, "generated_now": len(pending),
        "wall_time_s": round(time.perf_counter() - t0, 3),
        "leakage_checked": train_questions is not None,
        "predictions": str(pred_path),
    })
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def _generate_into(cfg, model, name, tokenizer, tokenizer_name, dataset, pending, pred_path,
                   done, *, method, batch_size, max_new_tokens, desc, show_progress) -> None:
    """Generate for ``pending`` records and append scored rows batch by batch."""
    from slmkd.data.prompts import build_prompt
    from slmkd.data.sources import bbh_prompts_for

    if tokenizer is None:
        tokenizer = _load_eval_tokenizer(cfg, name, tokenizer_name)
    bbh_prompts = bbh_prompts_for(cfg, dataset)
    prompts = [build_prompt(tokenizer, r, bbh_prompts) for r in pending]

    def rows_for(idx: Sequence[int], texts: Sequence[str], extra: Sequence[dict]) -> list[dict]:
        rows = []
        for i, text, ex in zip(idx, texts, extra, strict=True):
            rec = pending[i]
            row = {"id": rec.id, "dataset": dataset, "task": rec.task, "question": rec.question,
                   "raw_output": text, "target": rec.answer}
            row.update(score_row(dataset, text, rec.answer, task=rec.task, question=rec.question))
            row.update(ex)
            rows.append(row)
            done[rec.id] = row
        return rows

    from slmkd import generation

    def extra_of(outs):
        return [{"num_new_tokens": o.num_new_tokens, "hit_max_new_tokens": o.hit_max_new_tokens}
                for o in outs]

    # one engine serves every call on this model: the one passed in (evaluate_run and
    # evaluate_on_datasets pass one for all datasets), else one opened here and closed after
    own = not generation.is_engine(model)
    if not own:
        engine = model
    elif name is not None:
        engine = generation.open_engine(cfg, str(name), tokenizer=tokenizer,
                                        tokenizer_name=tokenizer_name, batch_size=batch_size,
                                        role="teacher" if name == cfg.teacher else "student")
    else:  # a loaded HF model
        engine = generation.HFEngine(model, tokenizer, batch_size=batch_size)
    try:
        if method in CASCOD_METHODS:
            step = batch_size * 4  # persist every few batches
            for k in range(0, len(prompts), step):
                outs = generation.cascaded_generate(
                    engine, tokenizer, prompts[k:k + step], answer_cue=cfg.cascod.answer_cue,
                    max_new_tokens_rationale=max_new_tokens, batch_size=batch_size,
                    desc=f"{desc} [{k}/{len(prompts)}]", show_progress=show_progress)
                idx = list(range(k, k + len(outs)))
                _append_rows(pred_path, rows_for(
                    idx, [o["full_text"] for o in outs],
                    [{"num_new_tokens": o["num_new_tokens"],
                      "hit_max_new_tokens": bool(o["rationale_hit_max"] or o["answer_hit_max"]),
                      "rationale": o["rationale"]} for o in outs]))
            return

        def on_batch(b):
            _append_rows(pred_path, rows_for(b.indices, [o.text for o in b.outputs],
                                             extra_of(b.outputs)))

        engine.generate(prompts, max_new_tokens=max_new_tokens, desc=desc, on_batch=on_batch,
                        show_progress=show_progress)
    finally:
        if own:
            engine.close()


def open_evaluation_engine(cfg: Any, model: str, *, tokenizer_name: str | None = None,
                           role: str = "student", engines: Any = None) -> Any:
    """A :class:`slmkd.generation.LazyEngine` for ``model`` with ``cfg.evaluation``'s backend
    and batch size: loaded on the first generation, then reused for every dataset; close it
    (or use ``with``) before the next model is loaded. With ``engines`` (a
    :class:`slmkd.generation.EngineSlot`) the engine comes from that slot and stays open
    there for the next model (a vLLM engine then reloads weights instead of restarting)."""
    from slmkd import generation

    if engines is not None:
        def opener():
            return engines.open(cfg, str(model), tokenizer_name=tokenizer_name, role=role)
    else:
        def opener():
            return generation.open_engine(cfg, str(model), tokenizer_name=tokenizer_name,
                                          role=role)
    return generation.LazyEngine(opener, backend=getattr(cfg.evaluation, "backend", "hf"))


def evaluate_on_datasets(cfg: Any, model: str, datasets: Sequence[str] | None = None,
                         engines: Any = None, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """:func:`evaluate_model` of one model on each of ``datasets`` (default
    ``cfg.evaluation.datasets``) with the model loaded at most once (one engine, closed at the
    end, or kept in ``engines``: :func:`open_evaluation_engine`). ``kwargs`` go to
    :func:`evaluate_model`; returns ``{dataset: summary}``."""
    from slmkd.modeling import model_slug

    role = "teacher" if kwargs.get("kind") == "teacher" or model == cfg.teacher else "student"
    kwargs.setdefault("model_slug", model_slug(str(model)))
    out: dict[str, dict[str, Any]] = {}
    with open_evaluation_engine(cfg, model, tokenizer_name=kwargs.get("tokenizer_name"),
                                role=role, engines=engines) as engine:
        for ds in datasets or cfg.evaluation.datasets:
            out[ds] = evaluate_model(cfg, engine, ds, model_name=str(model), **kwargs)
    return out


def read_train_summary(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``run_dir/train_summary.json`` (written last by the trainer: the run is complete)."""
    p = Path(run_dir) / "train_summary.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"{p} not found: the run is not complete. Finish it with notebook 02/03 or "
            "`slmkd train` (it resumes from its last checkpoint).")
    s = json.loads(p.read_text(encoding="utf-8"))
    missing = [k for k in ("method", "student", "seed") if k not in s]
    if missing:
        raise ValueError(f"{p} lacks {missing}")
    return s


def evaluate_run(
    cfg: Any,
    run_dir: str | os.PathLike[str],
    *,
    datasets: Sequence[str] | None = None,
    limit: Any = _USE_CONFIG,
    check_leakage: bool = True,
    force: bool = False,
    show_progress: bool = True,
    engines: Any = None,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Evaluate a trained run on ``datasets`` (default ``cfg.evaluation.datasets``).

    Reads ``train_summary.json`` (method, student, seed, final_model_dir), evaluates
    ``run_dir/final_model_dir`` into ``eval/{method}__{student_slug}__seed{N}/{dataset}/`` and
    returns ``{dataset: summary}``. The leakage guard compares every evaluation question with
    the questions of the run's training data (teacher CoT records and training split).
    ``engines``: an :class:`slmkd.generation.EngineSlot` shared across runs (see
    :func:`open_evaluation_engine`).
    """
    run_dir = Path(run_dir)
    ts = read_train_summary(run_dir)
    method, student, seed = str(ts["method"]), str(ts["student"]), int(ts["seed"])
    final = run_dir / str(ts.get("final_model_dir") or "final")
    if not final.is_dir():
        raise FileNotFoundError(f"final model folder {final} (from train_summary.json) is missing")
    slug = run_model_slug(method, student, seed)
    train_q = training_questions_for_run(cfg, ts) if check_leakage else None
    out: dict[str, dict[str, Any]] = {}
    if "tokenizer" in kwargs or "model" in kwargs:
        raise TypeError("evaluate_run loads the run's model itself")
    with open_evaluation_engine(cfg, str(final), tokenizer_name=student,
                                engines=engines) as engine:
        for ds in datasets or cfg.evaluation.datasets:
            out[ds] = evaluate_model(
                cfg, engine, ds, model_name=str(final), method=method, limit=limit,
                model_slug=slug, kind="run", student=student, seed=seed,
                train_questions=train_q, tokenizer_name=student, force=force,
                show_progress=show_progress, **kwargs)
    return out


def evaluate_study(cfg: Any, run_dirs: Sequence[str | os.PathLike[str]], *, base: bool = True,
                   teacher: bool = True, **kwargs: Any) -> list[dict[str, Any]]:
    """Notebook 04 in one call: every run of ``run_dirs`` (:func:`evaluate_run`), the base
    students (``base``) and the teacher (``teacher``) on ``cfg.evaluation.datasets``, through
    one :class:`slmkd.generation.EngineSlot`, ordered by model: each student's base model,
    then its runs (by method and seed), then the teacher. With vLLM the engine thus starts once
    per architecture and reloads weights for the next model of that architecture; with HF each
    model is loaded once. ``kwargs`` go to each evaluation; returns the per-dataset summaries.
    """
    from slmkd import generation

    runs = [(read_train_summary(d), Path(d)) for d in run_dirs]
    names = [cfg.student_name(s) for s in cfg.students]
    known = set(names)
    order: list[tuple[str, Any]] = []
    for name in names + sorted({str(ts["student"]) for ts, _ in runs} - known):
        if base and name in known:
            order.append(("base", name))
        mine = sorted((r for r in runs if str(r[0]["student"]) == name),
                      key=lambda r: (str(r[0]["method"]), int(r[0]["seed"])))
        order += [("run", d) for _, d in mine]
    if teacher:
        order.append(("teacher", cfg.teacher))
    out: list[dict[str, Any]] = []
    with generation.EngineSlot() as engines:
        for kind, target in order:
            if kind == "run":
                res = evaluate_run(cfg, target, engines=engines, **kwargs)
            else:
                res = evaluate_on_datasets(cfg, target, kind=kind, engines=engines, **kwargs)
            out += res.values()
        logger.info("evaluated %d models: %d engine start(s), %d in-place switch(es)",
                    len(order), engines.opened, engines.switched)
    return out


def format_summary_line(summary: dict[str, Any]) -> str:
    """``model dataset: lenient 52.4% [47.9, 56.8], lm-eval strict 48.0%, flexible 53.2%, n=500``
    (lm-eval strict/flexible; a summary of an earlier version shows the lenient modes)."""
    def pct(x):
        return "n/a" if x is None or x != x else f"{100 * x:.1f}%"

    if "accuracy_strict" in summary:
        tail = (f"lm-eval strict {pct(summary['accuracy_strict'])}, "
                f"flexible {pct(summary['accuracy_flexible'])}")
    else:
        tail = (f"lenient-strict {pct(summary.get('strict_accuracy'))}, "
                f"lenient-flexible {pct(summary.get('flexible_accuracy'))}")
    return (f"{summary['model']} {summary['dataset']}: lenient {pct(summary['accuracy'])} "
            f"[{100 * summary['ci_low']:.1f}, {100 * summary['ci_high']:.1f}], {tail}, "
            f"n={summary['n']}")
