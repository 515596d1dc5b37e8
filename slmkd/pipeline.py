"""The whole study in one call (``slmkd run``): teacher CoT → train every student × method × seed →
evaluate (runs, base students, teacher) → report.

Every stage writes its outputs under the Drive root and is skipped when they are already
complete, so rerunning the same command after any interruption continues where it stopped
(the stages themselves resume mid-way: CoT shards, training checkpoints, prediction files).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from slmkd.config import ExperimentConfig

logger = logging.getLogger(__name__)

# Rough per-stage durations in seconds, used only for the plan printed before a run.
# tiny: measured on a 2-core CPU (docs/TINY_CALIBRATION.md); a100: order-of-magnitude figures.
_ESTIMATES: dict[str, dict[str, float]] = {
    "tiny": {"world": 290.0, "cot": 30.0, "train": 80.0, "train_kd": 150.0, "train_cascod": 150.0,
             "eval": 5.0},
    "gpu": {"world": 0.0, "cot": 900.0, "train": 3600.0, "train_kd": 5400.0,
            "train_cascod": 4500.0, "eval": 600.0},
}


@dataclass
class Stage:
    """One unit of work in the plan."""

    kind: str  # world | cot | train | eval | report
    label: str
    done: bool
    estimate_s: float
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyResult:
    report_path: Path | None
    headline: str
    stages: list[Stage]
    wall_time_s: float


def _est(cfg: ExperimentConfig, key: str) -> float:
    return _ESTIMATES["tiny" if cfg.is_tiny else "gpu"][key]


def plan_study(cfg: ExperimentConfig, methods: list[str] | None = None,
               students: list[str] | None = None, seeds: list[int] | None = None) -> list[Stage]:
    """The ordered list of stages, each marked done when its output is already complete."""
    from slmkd.evaluation import eval_dir
    from slmkd.modeling import model_slug
    from slmkd.runtime import get_drive_root
    from slmkd.teacher import cot_dir, is_cot_complete
    from slmkd.training import is_run_complete, run_dir_for

    methods = list(methods or cfg.methods)
    student_names = [cfg.student_name(s) for s in (students or cfg.students)]
    seeds = list(seeds or cfg.seeds)
    root = get_drive_root(cfg)
    stages: list[Stage] = []
    if cfg.is_tiny:
        marker = root / "tiny" / "world.json"
        stages.append(Stage("world", "tiny world (tokenizer, models, teacher pretraining)",
                            marker.is_file(), 0.0 if marker.is_file() else _est(cfg, "world")))
    dataset = cfg.generation.dataset
    cdir = cot_dir(cfg, dataset, cfg.teacher)
    stages.append(Stage("cot", f"teacher CoT: {model_slug(cfg.teacher)} on {dataset} train",
                        is_cot_complete(cfg, cdir), _est(cfg, "cot")))
    if "kd-cached" in methods or (cfg.kd.teacher_source == "cached"
                                  and any(m in methods for m in ("kd", "cascod-kd"))):
        from slmkd.teacher.cache import STATS_FILE, cache_dir

        stats = cache_dir(cfg, dataset, cfg.teacher) / STATS_FILE
        done = stats.is_file() and bool(json.loads(stats.read_text()).get("complete"))
        rationales = "cascod-kd" in methods and cfg.kd.teacher_source == "cached"
        st = json.loads(stats.read_text()) if done else {}
        done = done and (not rationales or st.get("rationale_examples", 0) > 0
                         or st.get("examples", 0) > st.get("records", 0))
        stages.append(Stage("cache", f"teacher top-{cfg.kd.cache_top_k} cache over the CoT", done,
                            _est(cfg, "cot") / 4, {"rationales": rationales}))
    for student in student_names:
        for method in methods:
            for seed in seeds:
                rd = run_dir_for(cfg, method, student, seed)
                key = ("train_cascod" if method.startswith("cascod")
                       else "train_kd" if method == "kd" else "train")
                stages.append(Stage("train", f"train {method} {model_slug(student)} seed{seed}",
                                    is_run_complete(rd), _est(cfg, key),
                                    {"method": method, "student": student, "seed": seed,
                                     "run_dir": rd}))
    eval_targets: list[tuple[str, dict[str, Any]]] = []
    for s in student_names:
        eval_targets.append((model_slug(s), {"model": s, "kind": "base"}))
    eval_targets.append((model_slug(cfg.teacher), {"model": cfg.teacher, "kind": "teacher"}))
    for st in [s for s in stages if s.kind == "train"]:
        p = st.params
        slug = f"{p['method']}__{model_slug(p['student'])}__seed{p['seed']}"
        eval_targets.append((slug, {"run_dir": p["run_dir"], "kind": "run"}))
    for slug, params in eval_targets:
        for ds in cfg.evaluation.datasets:
            done = (eval_dir(cfg, slug, ds) / "summary.json").is_file()
            est = _est(cfg, "eval") * (2 if "cascod" in slug else 1)
            stages.append(Stage("eval", f"evaluate {slug} on {ds}", done, est,
                                {**params, "dataset": ds}))
    for st in [s for s in stages if s.kind == "train" and s.params["method"].startswith("cascod")]:
        p = st.params
        slug = f"{p['method']}__{model_slug(p['student'])}__seed{p['seed']}"
        for ds in cfg.evaluation.datasets:
            out = eval_dir(cfg, slug, ds) / "error_propagation.json"
            stages.append(Stage("errprop", f"error propagation {slug} on {ds}", out.is_file(),
                                _est(cfg, "eval") * 2,
                                {"run_dir": p["run_dir"], "dataset": ds, "out": out,
                                 "teacher_preds": eval_dir(cfg, model_slug(cfg.teacher), ds)
                                 / "predictions.jsonl"}))
    stages.append(Stage("report", "report (tables, paired statistics, plots)", False, 5.0))
    return stages


def format_plan(cfg: ExperimentConfig, stages: list[Stage]) -> str:
    from slmkd.runtime import get_drive_root

    todo = [s for s in stages if not s.done]
    # runs (train + their evaluations) share cfg.parallel_runs workers
    par = max(1, cfg.parallel_runs)
    total = sum(s.estimate_s / (par if s.kind in ("train", "eval") else 1) for s in todo)
    lines = [f"slmkd study plan — profile {cfg.profile}, outputs under {get_drive_root(cfg)}",
             f"  {len(stages)} stages, {len(stages) - len(todo)} already complete, "
             f"{len(todo)} to run; estimated {total / 60:.1f} min on this hardware"
             + (" (tiny profile, 2-core CPU calibration)" if cfg.is_tiny
                else " (rough GPU estimate)")]
    by_kind: dict[str, list[Stage]] = {}
    for s in stages:
        by_kind.setdefault(s.kind, []).append(s)
    for kind, group in by_kind.items():
        n_todo = sum(not s.done for s in group)
        lines.append(f"  - {kind:6s} {len(group):3d} ({n_todo} to run)"
                     + (f": {group[0].label}" if len(group) == 1 else
                        f": e.g. {group[0].label}"))
    return "\n".join(lines)


def _run_stage(cfg: ExperimentConfig, stage: Stage) -> None:
    if stage.kind == "world":
        from slmkd.tiny import ensure_tiny_world

        world = ensure_tiny_world(cfg)
        print(f"tiny teacher held-out accuracy: {world.teacher_accuracy:.1%}")
    elif stage.kind == "cot":
        from slmkd.teacher import generate_cot

        generate_cot(cfg)
    elif stage.kind == "cache":
        from slmkd.teacher.cache import cache_teacher

        res = cache_teacher(cfg, rationales=bool(stage.params.get("rationales")))
        print(f"teacher cache: {res.stats['bytes_per_token']:.0f} bytes/token, coverage "
              f"{res.stats['coverage']}")
    elif stage.kind == "train":
        from slmkd.training import train

        p = stage.params
        train(cfg, p["method"], p["student"], p["seed"])
    elif stage.kind == "eval":
        from slmkd.evaluation import evaluate_model, evaluate_run

        p = stage.params
        if p["kind"] == "run":
            evaluate_run(cfg, p["run_dir"], datasets=[p["dataset"]])
        else:
            evaluate_model(cfg, p["model"], p["dataset"], kind=p["kind"])
    elif stage.kind == "errprop":
        _error_propagation(cfg, stage.params)


def _error_propagation(cfg: ExperimentConfig, p: dict[str, Any]) -> None:
    """CasCoD: the student's answer accuracy given the teacher's rationale vs its own, on the
    evaluation items (teacher rationales from the teacher's evaluation predictions)."""
    import json

    from slmkd.data import bbh_prompts_for
    from slmkd.evaluation import error_propagation, read_predictions, read_train_summary
    from slmkd.fileio import atomic_write_json
    from slmkd.modeling import load_causal_lm, load_tokenizer

    rows = [json.loads(line) for line in Path(p["teacher_preds"]).read_text().splitlines()
            if line.strip()]
    summary = read_train_summary(p["run_dir"])
    final = str(Path(p["run_dir"]) / summary["final_model_dir"])
    tok = load_tokenizer(final, cfg, padding_side="left")
    model = load_causal_lm(final, cfg, role="student")
    res = error_propagation(model, tok, rows, answer_cue=cfg.cascod.answer_cue,
                            max_new_tokens_rationale=cfg.evaluation.max_new_tokens,
                            batch_size=cfg.evaluation.batch_size,
                            bbh_prompts=bbh_prompts_for(cfg, p["dataset"]), show_progress=False,
                            own_rows=read_predictions(Path(p["out"]).with_name("predictions.jsonl"))[0])
    res.pop("rows", None)
    atomic_write_json(p["out"], res)


def error_propagation_for_run(cfg: ExperimentConfig, run_dir: str | Path, dataset: str,
                              force: bool = False) -> dict[str, Any]:
    """Answer accuracy of a CasCoD run given the teacher's rationale vs its own, on the evaluation
    items (needs the run's and the teacher's ``predictions.jsonl``: notebook 04). Written to
    ``eval/{run}/{dataset}/error_propagation.json``; returns it."""
    from slmkd.evaluation import read_train_summary
    from slmkd.fileio import read_json
    from slmkd.layout import eval_dir, model_slug, run_model_slug

    s = read_train_summary(run_dir)
    out = eval_dir(cfg, run_model_slug(s["method"], s["student"], s["seed"]), dataset) / \
        "error_propagation.json"
    if force or not out.is_file():
        _error_propagation(cfg, {"run_dir": run_dir, "dataset": dataset, "out": out,
                                 "teacher_preds": eval_dir(cfg, model_slug(cfg.teacher), dataset)
                                 / "predictions.jsonl"})
    return read_json(out)


def _run_job_in_worker(cfg_dict: dict[str, Any], stages: list[Stage]) -> list[str]:
    """Worker-process entry: run one run's stages (train, then its evaluations) in order."""
    from slmkd.config import config_from_dict

    cfg = config_from_dict(cfg_dict)
    for stage in stages:
        _run_stage(cfg, stage)
    return [s.label for s in stages]


def _exit_with_parent(parent: int, interval_s: float = 2.0) -> None:
    """Worker side: end this process when the study's process is gone (e.g. killed), so no
    orphaned run keeps writing while a rerun resumes the same run directory."""
    import os
    import threading

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="slmkd-parent-watch").start()


def _worker_init(parent: int) -> None:
    import os

    os.environ["TQDM_DISABLE"] = "1"  # one progress bar: the study's, in the parent
    _exit_with_parent(parent)
    import torch

    torch.set_num_threads(1)


def _run_parallel(cfg: ExperimentConfig, todo: list[Stage], bar: Any) -> None:
    """Run every run's train+eval chain as one job, ``cfg.parallel_runs`` at a time, in
    spawned worker processes (one torch thread each); the rest runs here, in order."""
    import multiprocessing as mp
    import os
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    chains: dict[str, list[Stage]] = {}
    for s in todo:
        if s.kind == "train":
            chains[str(s.params["run_dir"])] = [s]
        elif s.kind == "eval" and s.params.get("kind") == "run":
            chains.setdefault(str(s.params["run_dir"]), []).append(s)
    local = [s for s in todo if not any(s in c for c in chains.values())]
    before = [s for s in local if s.kind in ("world", "cot")]
    last = [s for s in local if s.kind == "errprop"]  # needs the runs and the teacher's eval
    after = [s for s in local if s not in before and s not in last]
    for stage in before:
        bar.set_postfix_str(stage.label[:60])
        _run_stage(cfg, stage)
        bar.update(1)
    cfg_dict = cfg.to_dict()
    with ProcessPoolExecutor(max_workers=cfg.parallel_runs, mp_context=mp.get_context("spawn"),
                             initializer=_worker_init, initargs=(os.getpid(),)) as pool:
        pending = {pool.submit(_run_job_in_worker, cfg_dict, chain): chain
                   for chain in chains.values()}
        # meanwhile, base-model and teacher evaluations run here (they do not need the runs)
        for stage in after:
            bar.set_postfix_str(stage.label[:60])
            _run_stage(cfg, stage)
            bar.update(1)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                chain = pending.pop(fut)
                fut.result()  # a failed run fails the study loudly
                bar.write(f"done: {chain[0].label}")
                bar.update(len(chain))
    for stage in last:
        bar.set_postfix_str(stage.label[:60])
        _run_stage(cfg, stage)
        bar.update(1)


def run_study(cfg: ExperimentConfig, methods: list[str] | None = None,
              students: list[str] | None = None, seeds: list[int] | None = None,
              ) -> StudyResult:
    """Run (or continue) the whole study and write the report. Returns where it is.

    With ``cfg.parallel_runs > 1`` each run's training and evaluation go to one of that many
    worker processes (one torch thread each): on a 2-core CPU this doubles the throughput of the
    tiny study, whose models are too small to use two threads well."""
    from tqdm.auto import tqdm

    from slmkd.report import build_report
    from slmkd.runtime import get_drive_root, set_cpu_threads

    set_cpu_threads()
    t0 = time.time()
    stages = plan_study(cfg, methods, students, seeds)
    print(format_plan(cfg, stages), flush=True)
    todo = [s for s in stages if not s.done and s.kind != "report"]
    bar = tqdm(total=len(todo), desc="study", unit="stage")
    if cfg.parallel_runs > 1 and sum(s.kind == "train" for s in todo) > 1:
        _run_parallel(cfg, todo, bar)
    else:
        for stage in todo:
            bar.set_postfix_str(stage.label[:60])
            t = time.time()
            _run_stage(cfg, stage)
            logger.info("%s: %.1f s", stage.label, time.time() - t)
            bar.update(1)
    bar.close()
    report = build_report(cfg, get_drive_root(cfg))
    report_path, headline = report.path, report.headline
    wall = time.time() - t0
    print(f"\nreport: {report_path}\n{headline}\nstudy finished in {wall / 60:.1f} min", flush=True)
    return StudyResult(Path(report_path) if report_path else None, headline, stages, wall)


def ensure_tiny_cot(cfg: ExperimentConfig) -> bool:
    """Tiny profile: generate the teacher CoT when it is missing (what a user who calls
    ``slmkd train`` or notebook 02 first expects offline). Returns True when it generated; the
    real profiles are left alone (training then refuses, naming notebook 01)."""
    if not cfg.is_tiny:
        return False
    from slmkd.teacher import cot_dir, is_cot_complete

    if is_cot_complete(cfg, cot_dir(cfg, cfg.generation.dataset, cfg.teacher)):
        return False
    from slmkd.teacher import generate_cot

    logger.warning("No complete teacher CoT for the tiny profile: generating it now.")
    generate_cot(cfg, dataset=cfg.generation.dataset)
    return True
