"""The ``slmkd`` command line: every subcommand's arguments live here, and each command imports
only its own stage when it runs (``slmkd --help`` and ``slmkd config`` start without torch).

Subcommands: ``config``, ``preflight``, ``plan``, ``tiny``, ``generate-cot``, ``cache-teacher``,
``train``, ``evaluate``, ``report``, ``run``. Stage modules never import this file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

_COMMANDS: dict[str, str] = {
    "config": "print the resolved configuration as JSON",
    "preflight": "GPU, Drive, versions, env overrides and the VRAM plan",
    "plan": "the study's budget before anything runs: hours, VRAM per run, disk and Drive",
    "tiny": "build (or show) the cached tiny offline world",
    "generate-cot": "generate, filter and store teacher chain-of-thought (notebook 01)",
    "cache-teacher": "cache the teacher's top-k logits over the CoT once (KD without the teacher)",
    "train": "train one student: sft, kd, cascod, cascod-2stage, cascod-kd (02/03)",
    "evaluate": "evaluate a run or a model on GSM8K/BBH (notebook 04)",
    "report": "tables, seed x item statistics and plots across seeds (notebook 05)",
    "run": "the whole study: CoT -> train -> evaluate -> report (resumable)",
}


def add_profile_args(parser: argparse.ArgumentParser) -> None:
    """``--profile``, ``--config`` and ``--drive-root``: shared by every stage."""
    parser.add_argument("--profile", default=None,
                        help="a100-80g (default), a100-40g or tiny; default $SLMKD_PROFILE")
    parser.add_argument("--config", default=None, help="JSON file of config values")
    parser.add_argument("--drive-root", default=None,
                        help="folder every stage reads/writes (default $SLMKD_DRIVE_ROOT)")


def config_from_args(args: argparse.Namespace, **overrides):
    """Resolve the config from the shared arguments (+ dotted-path overrides that are not None)."""
    from slmkd.config import load_config

    ov = {k: v for k, v in overrides.items() if v is not None}
    if getattr(args, "drive_root", None):
        ov["drive_root"] = args.drive_root
    return load_config(profile=getattr(args, "profile", None),
                       config_file=getattr(args, "config", None), overrides=ov)


def _use_config() -> Any:
    from slmkd.evaluation.evaluate import _USE_CONFIG

    return _USE_CONFIG


def _ensure_tiny_cot(cfg: Any) -> None:
    """Tiny profile only: generate the teacher CoT first when it is missing (the real profiles
    refuse with the command to run, see :func:`slmkd.training.data.load_training_records`)."""
    from slmkd.pipeline import ensure_tiny_cot

    ensure_tiny_cot(cfg)


# -- config, tiny ---------------------------------------------------------------------------------
def _config_command(args: argparse.Namespace) -> int:
    print(config_from_args(args).to_json())
    return 0


def add_config_command(subparsers: Any) -> None:
    p = subparsers.add_parser("config", help=_COMMANDS["config"])
    add_profile_args(p)
    p.set_defaults(func=_config_command)


def _tiny_command(args: argparse.Namespace) -> int:
    from slmkd.runtime import get_drive_root
    from slmkd.tiny import ensure_tiny_world

    cfg = config_from_args(args)
    if cfg.profile != "tiny":
        cfg = cfg.replace(profile="tiny")
    print(f"drive root: {get_drive_root(cfg)}")
    world = ensure_tiny_world(cfg, force=bool(getattr(args, "force", False)))
    print(world)
    return 0


def add_tiny_command(subparsers: Any) -> None:
    p = subparsers.add_parser("tiny", help=_COMMANDS["tiny"])
    add_profile_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if a world is cached")
    p.set_defaults(func=_tiny_command, profile="tiny")


# -- plan -------------------------------------------------------------------------------------------
def _plan_command(args: argparse.Namespace) -> int:
    from slmkd.study_plan import detect_resources, plan_study_budget

    cfg = config_from_args(args)
    found = detect_resources(cfg.drive_root) if args.detect else {}
    budget = plan_study_budget(
        cfg, gpu_gib=args.gpu_gib if args.gpu_gib is not None else found.get("gpu_gib"),
        disk_free_gb=args.disk_gb if args.disk_gb is not None else found.get("disk_free_gb"),
        drive_free_gb=args.drive_gb if args.drive_gb is not None else found.get("drive_free_gb"),
        methods=args.methods.split(",") if args.methods else None)
    print(json.dumps(budget.to_json(), indent=2) if args.json else budget.format())
    return budget.exit_code


def add_plan_command(subparsers: Any) -> None:
    """``slmkd plan [--profile P] [--json] [--gpu-gib G] [--disk-gb D] [--drive-gb D] [--detect]``;
    exit status: 0 fits, else bits 1 GPU, 2 local disk, 4 Drive."""
    p = subparsers.add_parser("plan", help=_COMMANDS["plan"])
    add_profile_args(p)
    p.add_argument("--methods", default=None, help="comma-separated (default: the config's)")
    p.add_argument("--gpu-gib", type=float, default=None, help="card memory (default: profile's)")
    p.add_argument("--disk-gb", type=float, default=None, help="free local disk (default ~200)")
    p.add_argument("--drive-gb", type=float, default=None, help="free Drive space (default 100)")
    p.add_argument("--detect", action="store_true",
                   help="use this machine's GPU, free disk and free Drive space")
    p.add_argument("--json", action="store_true", help="print the budget as JSON")
    p.set_defaults(func=_plan_command)


# -- stages -----------------------------------------------------------------------------------------
def _generate_cot_command(args: argparse.Namespace) -> int:
    from slmkd.teacher import generate_cot

    cfg = config_from_args(
        args,
        **{
            "generation.dataset": args.dataset,
            "generation.max_new_tokens": args.max_new_tokens,
            "generation.batch_size": args.batch_size,
            "generation.backend": args.backend,
            "generation.keep_incorrect": True if args.keep_incorrect else None,
        },
    )
    generate_cot(cfg, dataset=args.dataset, teacher=args.teacher, output_dir=args.output,
                 limit=args.limit, force=args.force, max_batches=args.max_batches)
    if cfg.models.teacher_load_in_4bit and args.output is None and args.teacher is None:
        from slmkd.teacher.drift import describe_drift, measure_cot_drift

        print(describe_drift(measure_cot_drift(cfg, args.dataset)))
    return 0


def add_generate_cot_command(subparsers: Any) -> None:
    """``slmkd generate-cot [--profile P] [--output DIR] [--limit N] [--dataset gsm8k|bbh]
    [--teacher NAME] [--force] …``"""
    p = subparsers.add_parser(
        "generate-cot", help="generate teacher chain-of-thought (resumable, filtered)",
        description="Greedy teacher CoT for the training set, written as JSONL shards with "
                    "flags and statistics. Rerunning continues where it stopped.")
    add_profile_args(p)
    p.add_argument("--output", default=None, help="output folder (default {drive}/cot/DS/TEACHER)")
    p.add_argument("--limit", type=int, default=None, help="only the first N training items")
    p.add_argument("--dataset", choices=["gsm8k", "bbh"], default=None)
    p.add_argument("--teacher", default=None, help="teacher model name or path")
    p.add_argument("--force", action="store_true",
                   help="delete an existing output made with other settings and regenerate")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--backend", choices=["hf", "vllm"], default=None)
    p.add_argument("--keep-incorrect", action="store_true",
                   help="keep CoT whose answer differs from the gold answer")
    p.add_argument("--max-batches", type=int, default=None,
                   help="stop after N batches (rerun to continue)")
    p.set_defaults(func=_generate_cot_command)


def _cache_teacher_command(args: argparse.Namespace) -> int:
    from slmkd.teacher.cache import cache_teacher

    cfg = config_from_args(args, **{"kd.cache_top_k": args.top_k})
    res = cache_teacher(cfg, dataset=args.dataset, teacher=args.teacher, force=args.force,
                        max_batches=args.max_batches, batch_size=args.batch_size)
    print(json.dumps({"cache_dir": str(res.cache_dir), **res.stats}, indent=2))
    return 0


def add_cache_teacher_command(subparsers: Any) -> None:
    """``slmkd cache-teacher [--profile P] [--top-k K] [--force] …`` (resumable)."""
    p = subparsers.add_parser("cache-teacher", help=_COMMANDS["cache-teacher"])
    add_profile_args(p)
    p.add_argument("--dataset", choices=["gsm8k", "bbh"], default=None)
    p.add_argument("--teacher", default=None, help="teacher model name or path")
    p.add_argument("--top-k", type=int, default=None, help="default: kd.cache_top_k")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-batches", type=int, default=None,
                   help="stop after N batches (rerun to continue)")
    p.add_argument("--force", action="store_true", help="replace a cache made with other settings")
    p.set_defaults(func=_cache_teacher_command)


def _train_command(args: argparse.Namespace) -> int:
    from slmkd.training import train

    cfg = config_from_args(args)
    student = args.student or cfg.students[0]
    _ensure_tiny_cot(cfg)
    res = train(cfg, args.method, student, args.seed, run_dir=args.run_dir,
                max_steps=args.max_steps, save_steps=args.save_steps, force=args.force)
    print(json.dumps({"run_dir": str(res.run_dir), "final_dir": str(res.final_dir),
                      "steps": res.summary.get("steps"),
                      "skipped_fraction": res.summary.get("skipped_fraction")}))
    return 0


def add_train_command(subparsers: Any) -> argparse.ArgumentParser:
    """``slmkd train --method M --student S --seed N [...]``."""
    p = subparsers.add_parser("train", help="train a student (sft, kd, cascod, ...); resumes")
    p.add_argument("--method", required=True,
                   choices=["sft", "kd", "kd-cached", "cascod", "cascod-2stage", "cascod-kd"])
    p.add_argument("--student", default=None,
                   help="student_primary / student_small or a model name (default: the "
                        "profile's first student, as `slmkd run` does)")
    p.add_argument("--seed", type=int, required=True)
    add_profile_args(p)
    p.add_argument("--run-dir", default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--save-steps", type=int, default=None)
    p.add_argument("--force", action="store_true",
                   help="resume even if the saved config differs")
    p.set_defaults(func=_train_command)
    return p


def _evaluate_command(args: argparse.Namespace) -> int:
    from slmkd.evaluation import evaluate_on_datasets, evaluate_run, format_summary_line

    cfg = config_from_args(args)
    datasets = [args.dataset] if args.dataset else list(cfg.evaluation.datasets)
    limit = _use_config() if args.limit is None else (None if args.limit <= 0 else args.limit)
    kw = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    if args.run_dir:
        results = evaluate_run(cfg, args.run_dir, datasets=datasets, limit=limit,
                               force=args.force, **kw)
    else:
        results = evaluate_on_datasets(cfg, args.model, datasets, limit=limit, force=args.force,
                                       **kw)  # the model is loaded once for all datasets
    for s in results.values():
        print(format_summary_line(s))
        print(f"  -> {Path(s['predictions']).parent}")
    return 0


def add_evaluate_command(subparsers: Any) -> None:
    """``slmkd evaluate --run-dir DIR | --model NAME [--dataset gsm8k|bbh] [--limit N]``."""
    p = subparsers.add_parser(
        "evaluate", help="evaluate a trained run or a base/teacher model on GSM8K / BBH")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--run-dir", default=None, help="a complete run folder (train_summary.json)")
    g.add_argument("--model", default=None, help="a model name or path (base student, teacher)")
    p.add_argument("--dataset", choices=["gsm8k", "bbh"], default=None,
                   help="default: cfg.evaluation.datasets")
    p.add_argument("--limit", type=int, default=None,
                   help="items (BBH: per task); default from the config; 0 = all")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--force", action="store_true", help="discard earlier predictions")
    add_profile_args(p)
    p.set_defaults(func=_evaluate_command)


def _report_command(args: argparse.Namespace) -> int:
    from slmkd.report import build_report

    cfg = config_from_args(args)
    res = build_report(cfg, args.drive_root)
    print(res.headline)
    print(f"report: {res.path}")
    return 0


def add_report_command(subparsers: Any) -> None:
    """``slmkd report [--drive-root DIR]``."""
    p = subparsers.add_parser("report", help=_COMMANDS["report"])
    add_profile_args(p)
    p.set_defaults(func=_report_command)


def _preflight_command(args: argparse.Namespace) -> int:
    from slmkd.preflight import preflight, print_preflight

    cfg = config_from_args(args)
    report = preflight(cfg, method=args.method, student=args.student, mount=True)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_preflight(report)
    return 1 if (args.strict and report["warnings"]) else 0


def add_preflight_command(subparsers: Any) -> None:
    """``slmkd preflight [--profile P] [--method M] [--student S] [--json] [--strict]``."""
    p = subparsers.add_parser(
        "preflight", help="check GPU, Drive, versions and overrides; plan VRAM for a method")
    add_profile_args(p)
    p.add_argument("--method", default="kd", help="method to plan VRAM for (default kd)")
    p.add_argument("--student", default=None,
                   help="student key or model name (default: the first of the config's students)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 when there are warnings")
    p.set_defaults(func=_preflight_command)


def _run_command(args: argparse.Namespace) -> int:
    import os

    from slmkd.pipeline import run_study

    if args.profile is None and not os.environ.get("SLMKD_PROFILE"):
        args.profile = "tiny"  # the main job's default: the tiny study, offline on a CPU
    overrides: dict[str, Any] = {}
    if args.max_steps is not None:
        overrides["train.max_steps"] = args.max_steps
    if args.eval_limit is not None:
        overrides["evaluation.gsm8k_limit"] = args.eval_limit
        overrides["evaluation.bbh_limit"] = args.eval_limit
    if args.cot_limit is not None:
        overrides["generation.limit"] = args.cot_limit
    cfg = config_from_args(args, **overrides)
    run_study(cfg, methods=args.methods, students=args.students, seeds=args.seeds)
    return 0


def add_run_command(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="the whole study: teacher CoT → train → evaluate → report (resumable)")
    add_profile_args(p)
    p.add_argument("--methods", nargs="+", default=None,
                   help="sft kd cascod cascod-2stage cascod-kd (default: config's methods)")
    p.add_argument("--students", nargs="+", default=None,
                   help="student keys (student_primary, student_small) or model names")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="cap training steps per run")
    p.add_argument("--eval-limit", type=int, default=None, help="items per dataset (BBH: per task)")
    p.add_argument("--cot-limit", type=int, default=None, help="teacher CoT items")
    p.set_defaults(func=_run_command)


_ADDERS = {
    "config": add_config_command, "preflight": add_preflight_command, "plan": add_plan_command,
    "tiny": add_tiny_command, "generate-cot": add_generate_cot_command,
    "cache-teacher": add_cache_teacher_command,
    "train": add_train_command, "evaluate": add_evaluate_command, "report": add_report_command,
    "run": add_run_command,
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand (``command`` is accepted for compatibility)."""
    from slmkd._version import __version__

    parser = argparse.ArgumentParser(
        prog="slmkd", description="Distil chain-of-thought reasoning into small students.")
    parser.add_argument("--version", action="version", version=f"slmkd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        _ADDERS[name](sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from slmkd.config import ConfigError
    from slmkd.runtime import set_cpu_threads

    set_cpu_threads()
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as e:
        print(f"slmkd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
