"""A run's ``final/`` copied to Drive in the background (one thread, one copy at a time).

:func:`slmkd.training.run.train` with ``background_copy=True`` submits its verified copy of
``final/`` here and returns, so the next run trains while it runs; ``train`` waits for a run's own
pending copy before it touches that run again, and for the copy in flight before it submits the
next (at most one finished ``final/`` waits on local disk). :func:`wait_for_final_copies` is the
barrier for callers (``slmkd.notebook.train_grid`` before it returns). The copy threads are
joined at interpreter exit (:mod:`concurrent.futures`), so a script never exits mid-copy; a
runtime killed mid-copy leaves the run incomplete, exactly as a synchronous copy would.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
#: copies not yet collected by :func:`wait_for_final_copies`, oldest first
_COPIES: list[tuple[Path, Future]] = []


def submit_final_copy(run_dir: str | os.PathLike, fn: Callable[..., Any], *args: Any) -> Future:
    """Run ``fn(*args)`` (the copy of ``run_dir``'s ``final/``) in the copy thread."""
    global _POOL
    with _LOCK:
        if _POOL is None:  # one worker: copies run one at a time, in order
            _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slmkd-final-copy")
        fut = _POOL.submit(fn, *args)
        _COPIES.append((Path(run_dir), fut))
    return fut


def pending_final_copies() -> list[Path]:
    """Run directories whose background ``final/`` copy has not finished."""
    with _LOCK:
        return [d for d, f in _COPIES if not f.done()]


def wait_for_final_copies(run_dir: str | os.PathLike | None = None, *,
                          collect: bool = True) -> list[Any]:
    """Block until the background copies (of ``run_dir`` only, when given) are done; returns
    their results (:class:`slmkd.training.run.TrainResult`; a failed copy: ``final_on_drive``
    False, the local ``final/`` kept and the message printed; an exception is raised here).
    ``collect``: forget the finished copies (else a later call returns them again)."""
    want = None if run_dir is None else Path(run_dir).resolve()
    with _LOCK:
        mine = [(d, f) for d, f in _COPIES if want is None or d.resolve() == want]
    results = [f.result() for _, f in mine]
    if collect:
        with _LOCK:
            for item in mine:
                if item in _COPIES:
                    _COPIES.remove(item)
    return results
