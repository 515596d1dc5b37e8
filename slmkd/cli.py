"""The ``slmkd`` command line. Each stage module contributes its subcommand through an
``add_<name>_command(subparsers)`` function; this file only wires them together."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name → (module, function that adds the subparser, one-line help). Only the chosen subcommand's
# module is imported, so ``slmkd --help`` and ``slmkd config`` start without loading torch.
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "config": ("slmkd.cli", "add_config_command", "print the resolved configuration as JSON"),
    "preflight": ("slmkd.preflight", "add_preflight_command",
                  "GPU, Drive, versions, env overrides and the VRAM plan"),
    "tiny": ("slmkd.cli", "add_tiny_command", "build (or show) the cached tiny offline world"),
    "generate-cot": ("slmkd.teacher", "add_generate_cot_command",
                     "generate, filter and store teacher chain-of-thought (notebook 01)"),
    "train": ("slmkd.trainer", "add_train_command",
              "train one student: sft, kd, cascod, cascod-2stage, cascod-kd (02/03)"),
    "evaluate": ("slmkd.evaluation", "add_evaluate_command",
                 "evaluate a run or a model on GSM8K/BBH (notebook 04)"),
    "report": ("slmkd.report", "add_report_command",
               "tables, paired statistics and plots across seeds (notebook 05)"),
    "run": ("slmkd.pipeline", "add_run_command",
            "the whole study: CoT -> train -> evaluate -> report (resumable)"),
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


def _config_command(args: argparse.Namespace) -> int:
    print(config_from_args(args).to_json())
    return 0


def add_config_command(subparsers) -> None:
    p = subparsers.add_parser("config", help=_COMMANDS["config"][2])
    add_profile_args(p)
    p.set_defaults(func=_config_command)


def _tiny_command(args: argparse.Namespace) -> int:
    from slmkd.runtime import get_drive_root
    from slmkd.tiny import ensure_tiny_world

    cfg = config_from_args(args)
    if cfg.profile != "tiny":
        cfg = cfg.replace(profile="tiny")
    print(f"drive root: {get_drive_root(cfg)}")
    world = ensure_tiny_world(cfg)
    print(world)
    return 0


def add_tiny_command(subparsers) -> None:
    p = subparsers.add_parser(
        "tiny", help=_COMMANDS["tiny"][2])
    add_profile_args(p)
    p.set_defaults(func=_tiny_command, profile="tiny")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (all of them when ``command`` is None)."""
    from slmkd._version import __version__

    parser = argparse.ArgumentParser(
        prog="slmkd", description="Distil chain-of-thought reasoning into small students.")
    parser.add_argument("--version", action="version", version=f"slmkd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, func, help_text) in _COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in _COMMANDS), "")
    parser = build_parser(command)
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
