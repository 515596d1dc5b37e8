"""Small helpers shared by the numbered notebooks: the config they all resolve the same way,
the FAST (smoke-test) sizes used in CI, and inline display of the figures a stage wrote."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from slmkd.config import ExperimentConfig

FAST_ENV = "SLMKD_NB_FAST"

#: Smoke-test sizes (``SLMKD_NB_FAST=1``, the default on the tiny profile): every stage runs for
#: real but briefly, so the six notebooks execute in a few minutes on 2 CPU cores. The numbers
#: they produce mean nothing; ``slmkd run --profile tiny`` is the full tiny study.
FAST_OVERRIDES: dict[str, Any] = {
    "train.max_steps": 12,
    "train.save_steps": 6,
    "train.log_every": 3,
    "generation.limit": 48,
    "generation.keep_incorrect": True,  # a briefly trained tiny teacher is often wrong
    "evaluation.gsm8k_limit": 24,
    "evaluation.bbh_limit": 3,
}
FAST_TINY_OVERRIDES: dict[str, Any] = {
    # ~300 teacher steps: the least that reliably learns the answer format, so some teacher
    # CoTs pass the filters (a 60-step teacher loops and none would be kept to train on)
    "tiny.num_train": 600,
    "tiny.num_test": 60,
    "tiny.teacher_pretrain_steps": 300,
    "evaluation.batch_size": 24,
}


def fast_mode(profile: str, environ: dict[str, str] | None = None) -> bool:
    """``$SLMKD_NB_FAST`` if set (1/0), else True exactly for the tiny profile."""
    environ = os.environ if environ is None else environ
    raw = environ.get(FAST_ENV)
    if raw is None or raw.strip() == "":
        return profile == "tiny"
    return raw.strip().lower() in ("1", "true", "yes", "on")


def notebook_config(profile: str, overrides: dict[str, Any] | None = None,
                    fast: bool = False) -> ExperimentConfig:
    """The config every notebook resolves identically: profile → the parameters cell's
    ``overrides`` (``None`` values mean "the profile's value") → FAST sizes → ``SLM_KD_*``
    environment overrides (applied by :func:`slmkd.config.load_config`)."""
    from slmkd.config import load_config

    ov = {k: v for k, v in (overrides or {}).items() if v is not None}
    if fast:
        ov.update(FAST_OVERRIDES)
        if profile == "tiny":
            ov.update(FAST_TINY_OVERRIDES)
    return load_config(profile=profile, overrides=ov)


def show_figures(paths: Iterable[str | os.PathLike] | str | os.PathLike | None) -> list[Path]:
    """Display PNG files (or every PNG in a folder) inline; print their paths outside IPython.

    Missing files are reported, not fatal. Returns the files shown."""
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.png")))
        elif p.is_file():
            files.append(p)
        else:
            print(f"(figure not found: {p})")
    try:
        from IPython import get_ipython
        from IPython.display import Image, display

        inline = get_ipython() is not None
    except ImportError:  # pragma: no cover
        inline = False
    for f in files:
        if inline:
            display(Image(filename=str(f)))
        else:
            print(f"figure: {f}")
    return files


def train_grid(cfg: ExperimentConfig, methods: Iterable[str], seeds: Iterable[int],
               live_plot: bool = True) -> dict[tuple[str, str, int], Any]:
    """Train every method × ``cfg.students`` × seed (each resumes by itself), print one summary
    line per run and show the last run's plots. Returns ``{(method, student, seed): TrainResult}``.

    With ``cfg.train.background_final_copy`` each run's ``final/`` is copied to Drive while the
    next run trains; the grid waits for the last copy before it returns."""
    from slmkd.pipeline import ensure_tiny_cot
    from slmkd.training import train, wait_for_final_copies

    ensure_tiny_cot(cfg)
    background = bool(getattr(cfg.train, "background_final_copy", False))
    results: dict[tuple[str, str, int], Any] = {}
    for method in methods:
        for student in cfg.students:
            for seed in seeds:
                results[(method, student, seed)] = train(cfg, method, student, seed,
                                                         live_plot=live_plot,
                                                         background_copy=background)
    done = {r.run_dir.resolve(): r for r in wait_for_final_copies()}
    results = {k: done.get(r.run_dir.resolve(), r) for k, r in results.items()}
    for (method, student, seed), r in results.items():
        s = r.summary
        kd = f", KD {s['final_kd']:.4g}" if s.get("final_kd") is not None else ""
        loss = "n/a" if s.get("final_loss") is None else f"{s['final_loss']:.4g}"
        print(f"{method} {cfg.student_name(student)} seed {seed}: {s['steps']} steps, final loss "
              f"{loss}{kd}, skipped {s['skipped_batches']} ({100 * s['skipped_fraction']:.2f}%)"
              f" -> {r.final_dir}")
    if results:
        show_figures(list(results.values())[-1].run_dir / "plots")
    return results


__all__ = ["FAST_ENV", "FAST_OVERRIDES", "FAST_TINY_OVERRIDES", "fast_mode", "notebook_config",
           "show_figures", "train_grid"]
