"""Training monitor: a JSONL log of the training metrics, VRAM figures and live plots.

Every ``log_every`` optimiser steps the trainer logs (one JSON object per line in
``{run_dir}/log.jsonl``): ``step``, ``epoch``, ``loss``, ``ce``, ``kd``, ``temperature``,
``alpha``, ``grad_norm``, ``learning_rate``, ``tokens_per_s``, ``skipped_batches`` and, on CUDA,
``vram_allocated_gb``, ``vram_reserved_gb``, ``vram_peak_gb``. :class:`TrainingMonitor` appends
them (main process only) and redraws three figures — loss/CE/KD, gradient norm, VRAM — saved as
PNG in ``{run_dir}/plots/`` and, with ``live_plot=True`` inside a notebook, shown inline and
updated in place (``IPython.display`` with a display id). Figures use matplotlib's object API
(no pyplot state), so they work headless with the Agg backend. A log line that cannot be
written (a full Drive) is kept in memory and retried at the next log; training goes on.

:func:`release_trainer` breaks the reference cycles that kept a finished run's model and trainer
(GPU memory) alive until the next ``gc.collect()``; :func:`free_memory` collects and empties the
CUDA cache.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import json
import logging
import math
import os
import time
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"
PLOT_FILES = {"loss": "loss.png", "grad_norm": "grad_norm.png", "vram": "vram.png"}


def vram_stats() -> dict[str, float]:
    """CUDA memory of the current device in GB (empty dict without CUDA)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return {}
    if not torch.cuda.is_available():
        return {}
    g = 1024**3
    return {"vram_allocated_gb": torch.cuda.memory_allocated() / g,
            "vram_reserved_gb": torch.cuda.memory_reserved() / g,
            "vram_peak_gb": torch.cuda.max_memory_allocated() / g}


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


def append_log(path: str | os.PathLike, entry: dict[str, Any]) -> None:
    """Append one JSON line (non-finite floats become null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({k: _clean(v) for k, v in entry.items()}, sort_keys=True) + "\n")
        f.flush()


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All entries of a log.jsonl (a torn last line from a crash is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def truncate_log(path: str | os.PathLike, max_step: int) -> int:
    """Keep only entries with ``step <= max_step`` (used on resume: no duplicate steps).
    Returns how many entries were removed."""
    from slmkd.fileio import atomic_write_text

    entries = read_log(path)
    keep = [e for e in entries if int(e.get("step", 0)) <= max_step]
    if len(keep) != len(entries) or (Path(path).is_file() and entries == []):
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in keep)
        atomic_write_text(path, text)
    return len(entries) - len(keep)


def _series(entries: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for e in entries:
        v = e.get(key)
        if v is not None and "step" in e:
            xs.append(e["step"])
            ys.append(v)
    return xs, ys


def make_figures(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """matplotlib Figures (object API, Agg-safe): loss/CE/KD, grad norm, VRAM (if logged)."""
    from matplotlib.figure import Figure

    figs: dict[str, Any] = {}
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for key in ("loss", "ce", "kd"):
        xs, ys = _series(entries, key)
        if xs:
            ax.plot(xs, ys, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    if ax.lines:
        ax.legend()
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.16, top=0.9)
    figs["loss"] = fig

    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    xs, ys = _series(entries, "grad_norm")
    ax.plot(xs, ys, color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("grad norm (pre-clip)")
    ax.set_title("gradient norm")
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.16, top=0.9)
    figs["grad_norm"] = fig

    if any("vram_allocated_gb" in e for e in entries):
        fig = Figure(figsize=(6, 3))
        ax = fig.subplots()
        for key in ("vram_allocated_gb", "vram_reserved_gb", "vram_peak_gb"):
            xs, ys = _series(entries, key)
            ax.plot(xs, ys, label=key.replace("vram_", "").replace("_gb", ""))
        ax.set_xlabel("step")
        ax.set_ylabel("GB")
        ax.set_title("CUDA memory")
        ax.legend()
        fig.subplots_adjust(left=0.14, right=0.97, bottom=0.16, top=0.9)
        figs["vram"] = fig
    return figs


def save_plots(entries: list[dict[str, Any]], plots_dir: str | os.PathLike) -> list[Path]:
    """Write the figures as PNG under ``plots_dir``; returns their paths."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in make_figures(entries).items():
        p = plots_dir / PLOT_FILES[name]
        tmp = p.with_name(f".{p.name}.tmp.png")
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, p)
        paths.append(p)
    return paths


class LivePlot:
    """Inline figures in a notebook, updated in place (no-op outside IPython)."""

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}

    def update(self, entries: list[dict[str, Any]]) -> None:
        try:
            from IPython import get_ipython
            from IPython.display import Image, display
        except ImportError:  # pragma: no cover
            return
        if get_ipython() is None:
            return
        for name, fig in make_figures(entries).items():
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=80)
            img = Image(data=buf.getvalue(), format="png")
            if name in self._handles:
                self._handles[name].update(img)
            else:
                self._handles[name] = display(img, display_id=True)


class TrainingMonitor(TrainerCallback):
    """Appends every training log to ``{run_dir}/log.jsonl`` and redraws the plots.

    Only the main process writes. Plots are redrawn at most every ``min_interval_s`` seconds
    (drawing costs ~0.1 s per figure) and always at the end of training.
    """

    def __init__(self, run_dir: str | os.PathLike, live_plot: bool = False,
                 min_interval_s: float = 15.0):
        self.run_dir = Path(run_dir)
        self.log_path = self.run_dir / LOG_NAME
        self.plots_dir = self.run_dir / "plots"
        self.live = LivePlot() if live_plot else None
        self.min_interval_s = min_interval_s
        self._last_draw = time.time()
        self._unwritten: list[dict[str, Any]] = []
        self._write_failed = False

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D401
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        if "train_runtime" in logs:
            return
        entry = {"step": state.global_step, "epoch": state.epoch, **logs}
        entry.pop("total_flos", None)
        self._unwritten.append(entry)
        if not self._flush():
            return
        if time.time() - self._last_draw >= self.min_interval_s:
            self.redraw()

    def _flush(self) -> bool:
        """Append the entries not yet written; a failing write (a full Drive) is said once and
        retried at the next log, never raised: training goes on."""
        while self._unwritten:
            try:
                append_log(self.log_path, self._unwritten[0])
            except OSError as e:
                if not self._write_failed:
                    self._write_failed = True
                    logger.warning("Cannot write %s (%s); the log lines are kept in memory and "
                                   "written when it works again.", self.log_path, e)
                return False
            self._unwritten.pop(0)
        self._write_failed = False
        return True

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._flush()
            self.redraw()

    def redraw(self) -> None:
        self._last_draw = time.time()
        entries = read_log(self.log_path)
        if not entries:
            return
        try:
            save_plots(entries, self.plots_dir)
            if self.live is not None:
                self.live.update(entries)
        except Exception as e:  # noqa: BLE001 — a plot must never stop training
            logger.warning("Could not draw training plots: %s", e)


# -- memory of a finished run ----------------------------------------------------------------------
def _refers_to(fn: Any, target: Any, depth: int = 0) -> bool:
    """True when the callable ``fn`` (through bound methods, closures, ``__wrapped__``) holds
    ``target``."""
    if fn is None or depth > 5:
        return False
    if isinstance(fn, types.MethodType):
        return fn.__self__ is target or _refers_to(fn.__func__, target, depth + 1)
    if isinstance(fn, functools.partial):
        return any(a is target for a in fn.args) or _refers_to(fn.func, target, depth + 1)
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            v = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if v is target or (callable(v) and _refers_to(v, target, depth + 1)):
            return True
    return _refers_to(getattr(fn, "__wrapped__", None), target, depth + 1)


def release_trainer(trainer: Any, callbacks: Iterable[Any] = ()) -> None:
    """Break the reference cycles that kept a finished run's model and trainer alive until the
    next ``gc.collect()`` (GPU memory held between runs): callbacks pointing at the trainer,
    forward hooks and the guarded ``optimizer.step`` whose closures hold it, methods bound to
    their own module (accelerate's autocast forward), and the trainer's and accelerator's
    references to model, teacher, optimizer and data."""
    import torch

    handler = getattr(trainer, "callback_handler", None)
    for cb in (*callbacks, *getattr(handler, "callbacks", ())):
        if getattr(cb, "trainer", None) is trainer:
            cb.trainer = None
    modules: list[torch.nn.Module] = []
    for name in ("model", "model_wrapped", "teacher"):
        m = getattr(trainer, name, None)
        if isinstance(m, torch.nn.Module):
            modules.extend(m.modules())
    for mod in {id(m): m for m in modules}.values():
        for hooks in (mod._forward_hooks, mod._forward_pre_hooks):
            for hid, fn in list(hooks.items()):
                if _refers_to(fn, trainer):
                    hooks.pop(hid, None)
                    getattr(mod, "_forward_hooks_with_kwargs", {}).pop(hid, None)
                    getattr(mod, "_forward_hooks_always_called", {}).pop(hid, None)
                    getattr(mod, "_forward_pre_hooks_with_kwargs", {}).pop(hid, None)
        for attr in ("forward", "_original_forward"):
            v = vars(mod).get(attr)
            if v is not None and _refers_to(v, mod):
                with contextlib.suppress(AttributeError):
                    delattr(mod, attr)
    opt = getattr(trainer, "optimizer", None)
    for o in (opt, getattr(opt, "optimizer", None)):
        if o is not None and "step" in vars(o) and _refers_to(vars(o)["step"], trainer):
            delattr(o, "step")
    acc = getattr(trainer, "accelerator", None)
    if acc is not None:
        with contextlib.suppress(Exception):
            acc.free_memory()
    for name in ("model", "model_wrapped", "teacher", "optimizer", "lr_scheduler",
                 "train_dataset", "eval_dataset", "data_collator"):
        if name in vars(trainer):
            with contextlib.suppress(Exception):
                setattr(trainer, name, None)
    for name in ("model", "optimizer", "lr_scheduler", "train_dataloader", "eval_dataloader"):
        if handler is not None and name in vars(handler):
            setattr(handler, name, None)


def free_memory() -> None:
    """``gc.collect()``, then ``torch.cuda.empty_cache()`` when CUDA is there."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
