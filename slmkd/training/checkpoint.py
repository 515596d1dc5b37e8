"""Checkpoints: local fast disk → Drive (copy under a temp name, verify, rename), resume selection,
and the storage policy's bookkeeping (one checkpoint per run on each side, stale copies, a full
Drive).

The Trainer writes ``checkpoint-{step}/`` to fast local disk. :func:`write_manifest` then records
every file's size in ``slmkd_manifest.json`` (written last: a checkpoint without a manifest is
incomplete); that is all the training thread does. :class:`DriveSyncer` (a background thread)
adds the SHA-256 of every file to the manifest, then copies the checkpoint to Drive::

    checkpoints/.tmp-checkpoint-{step}-{pid}-{tid}/   copy (file by file, cancellable)
    verify sizes + SHA-256 against the manifest        (Drive can fail mid-copy: retried; a full
    rename → checkpoints/checkpoint-{step}/             Drive is not retried and said once)
    ``latest`` (a one-line pointer), then every other checkpoint on Drive is removed

so Drive holds one resumable checkpoint per run (two for the moment between the rename and the
removal) and training never waits for Drive. Locally, when a checkpoint is submitted, every
older local one is removed except the one being copied. :func:`select_resume_checkpoint` looks
at local and Drive folders, newest step first, and returns the first checkpoint that verifies;
an incomplete or corrupt newer one is reported and skipped. :func:`remove_stale_copies` removes
the ``.tmp-*`` / ``.old-*`` folders a copy cut by a disconnect leaves behind.

When: :func:`save_schedule` / :class:`CheckpointSchedule` (every ``cfg.train.save_every_minutes``
of training, and/or every ``save_steps`` where set; never at the last step). The final model:
:func:`save_final_model` (in ``cfg.train.final_dtype``, with a manifest, so its copy to Drive is
verified like a checkpoint's by :func:`publish_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from slmkd.fileio import atomic_write_json, atomic_write_text, read_json

if TYPE_CHECKING:  # pragma: no cover
    from slmkd.config import ExperimentConfig

logger = logging.getLogger(__name__)

MANIFEST_NAME = "slmkd_manifest.json"
LATEST_NAME = "latest"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: name prefixes of partial copies (a copy or a replacement cut by a crash or a disconnect)
STALE_PREFIXES = (".tmp-", ".old-")
_CHUNK = 16 << 20
#: fault injection for the resume tests: ``"N"`` SIGKILLs this process half-way through the first
#: file of the Drive copy of ``checkpoint-N`` (a Colab disconnect during a checkpoint copy)
FAULT_KILL_IN_COPY_ENV = "SLMKD_FAULT_KILL_IN_COPY_OF"
GB = 1e9


class CopyCancelled(Exception):  # noqa: N818 — a control-flow signal, not an error
    """A copy was cancelled (the run is complete; the copy no longer matters)."""


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise CopyCancelled()


def sha256_file(path: str | os.PathLike, cancel: threading.Event | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            _check(cancel)
            b = f.read(_CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """``.../checkpoint-120`` → 120; anything else → None."""
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(folder: str | os.PathLike | None) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``checkpoint-*`` folders in ``folder``, oldest first."""
    if folder is None or not Path(folder).is_dir():
        return []
    out = []
    for p in Path(folder).iterdir():
        step = checkpoint_step(p)
        if step is not None and p.is_dir():
            out.append((step, p))
    return sorted(out)


def write_manifest(ckpt_dir: str | os.PathLike, checksums: bool = False) -> dict[str, Any]:
    """Record ``{relative path: {size[, sha256]}}`` for every file; written atomically, last.

    By default sizes only (fast: this runs on the training thread after each save); the
    checksums are added by :func:`add_checksums` in :class:`DriveSyncer`'s thread before the
    copy, or here with ``checksums=True``."""
    ckpt_dir = Path(ckpt_dir)
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(ckpt_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith("."):
            rel = p.relative_to(ckpt_dir).as_posix()
            files[rel] = {"size": p.stat().st_size}
            if checksums:
                files[rel]["sha256"] = sha256_file(p)
    manifest = {"format": 1, "step": checkpoint_step(ckpt_dir), "files": files,
                "created": time.time()}
    atomic_write_json(ckpt_dir / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(ckpt_dir: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(ckpt_dir) / MANIFEST_NAME
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None


def add_checksums(ckpt_dir: str | os.PathLike,
                  cancel: threading.Event | None = None) -> dict[str, Any]:
    """Fill in the SHA-256 of every manifest entry that has none (rewrites the manifest)."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    if manifest is None:
        raise OSError(f"{ckpt_dir} has no readable manifest")
    missing = [rel for rel, meta in manifest["files"].items() if "sha256" not in meta]
    for rel in missing:
        manifest["files"][rel]["sha256"] = sha256_file(ckpt_dir / rel, cancel)
    if missing:
        atomic_write_json(ckpt_dir / MANIFEST_NAME, manifest)
    return manifest


def manifest_bytes(ckpt_dir: str | os.PathLike) -> int:
    """Bytes the manifest lists (the folder's size when there is no manifest)."""
    m = read_manifest(ckpt_dir)
    if m is None:
        return dir_bytes(ckpt_dir)
    return sum(int(meta.get("size", 0)) for meta in m["files"].values())


def dir_bytes(path: str | os.PathLike) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def verify_checkpoint(ckpt_dir: str | os.PathLike, checksums: bool = True,
                      cancel: threading.Event | None = None) -> tuple[bool, str]:
    """``(ok, reason)``: the manifest exists and every file has its recorded size (and SHA-256,
    where the manifest has one)."""
    ckpt_dir = Path(ckpt_dir)
    mpath = ckpt_dir / MANIFEST_NAME
    if not ckpt_dir.is_dir():
        return False, "missing folder"
    if not mpath.is_file():
        return False, "no manifest (incomplete: interrupted while saving or copying)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        return False, f"unreadable manifest ({e})"
    if not files:
        return False, "empty manifest"
    for rel, meta in files.items():
        p = ckpt_dir / rel
        if not p.is_file():
            return False, f"missing file {rel}"
        size = p.stat().st_size
        if size != meta["size"]:
            return False, f"{rel} has {size} bytes, expected {meta['size']} (truncated?)"
    if checksums:
        for rel, meta in files.items():
            if "sha256" in meta and sha256_file(ckpt_dir / rel, cancel) != meta["sha256"]:
                return False, f"{rel} checksum mismatch (corrupt)"
    return True, "ok"


def select_resume_checkpoint(
    folders: Iterable[str | os.PathLike | None],
    checksums: bool = True,
    report: Callable[[str], None] | None = None,
) -> Path | None:
    """The newest checkpoint over ``folders`` that verifies, or None.

    Candidates are ordered by step (newest first; at equal steps the earlier folder — local disk —
    wins). Every newer candidate that fails verification is reported with its reason.
    """
    report = report or logger.warning
    cands: list[tuple[int, int, Path]] = []
    for rank, folder in enumerate(folders):
        for step, path in list_checkpoints(folder):
            cands.append((step, -rank, path))
    for _step, _, path in sorted(cands, reverse=True):
        ok, reason = verify_checkpoint(path, checksums=checksums)
        if ok:
            return path
        report(f"Checkpoint {path} is not usable ({reason}); falling back to an older one.")
    return None


def read_latest(folder: str | os.PathLike) -> str | None:
    p = Path(folder) / LATEST_NAME
    return p.read_text().strip() if p.is_file() else None


def prune_checkpoints(folder: str | os.PathLike, keep_last: int | None,
                      keep: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (never the ones in ``keep``)."""
    if not keep_last or keep_last <= 0:
        return []
    protected = {Path(k).resolve() for k in keep}
    cks = list_checkpoints(folder)
    removed = []
    for _, path in cks[: max(0, len(cks) - keep_last)]:
        if path.resolve() in protected:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def remove_stale_copies(folder: str | os.PathLike,
                        names: Iterable[str] | None = None) -> list[tuple[Path, int]]:
    """Remove the ``.tmp-*`` / ``.old-*`` folders (or files) directly under ``folder`` —
    partial copies left by a crash or a disconnect — whose name (after the prefix) starts with
    one of ``names`` (default: any). Returns ``(path, bytes)`` of each one removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        prefix = next((s for s in STALE_PREFIXES if p.name.startswith(s)), None)
        if prefix is None:
            continue
        if names is not None and not any(p.name[len(prefix):].startswith(n) for n in names):
            continue
        size = dir_bytes(p) if p.is_dir() else p.stat().st_size
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        out.append((p, size))
    return out


def remove_checkpoint_folder(folder: str | os.PathLike) -> int:
    """Remove every checkpoint, the ``latest`` pointer and stale copies under ``folder`` (and
    the folder when it is then empty). Returns the bytes removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    total = sum(b for _, b in remove_stale_copies(folder))
    for _, p in list_checkpoints(folder):
        total += dir_bytes(p)
        shutil.rmtree(p, ignore_errors=True)
    (folder / LATEST_NAME).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # something else lives there: left alone
    return total


# -- copies --------------------------------------------------------------------------------------
def copy_file(src: str | os.PathLike, dst: str | os.PathLike,
              cancel: threading.Event | None = None) -> None:
    """Copy one file in chunks (cancellable between chunks). An ``OSError`` (e.g. ``ENOSPC`` on a
    full Drive) propagates with its errno."""
    kill_in = os.environ.get(FAULT_KILL_IN_COPY_ENV)
    kill = bool(kill_in) and f".tmp-checkpoint-{kill_in}-" in str(dst)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while True:
            _check(cancel)
            b = fi.read(_CHUNK)
            if not b:
                break
            if kill:  # pragma: no cover - the process ends here (tests/test_resume.py)
                import signal

                fo.write(b[: len(b) // 2])
                fo.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            fo.write(b)
        fo.flush()
        os.fsync(fo.fileno())


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike,
              cancel: threading.Event | None = None) -> None:
    """Copy the folder ``src`` to ``dst`` (created) file by file with :func:`copy_file`."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=False)
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        for d in sorted(dirs):
            (dst / rel / d).mkdir(exist_ok=True)
        for f in sorted(files):
            _check(cancel)
            copy_file(Path(root) / f, dst / rel / f, cancel)


def publish_checkpoint(local_ckpt: str | os.PathLike, dest_folder: str | os.PathLike,
                       checksums: bool = True, cancel: threading.Event | None = None,
                       name: str | None = None) -> Path:
    """Copy ``local_ckpt`` (which has a manifest) to ``dest_folder/name`` (default its own name)
    under a temp name, verify it against the manifest, rename it into place (replacing an older
    folder of that name). The temp copy is removed on any failure."""
    local_ckpt, dest_folder = Path(local_ckpt), Path(dest_folder)
    name = name or local_ckpt.name
    final = dest_folder / name
    tmp = dest_folder / f".tmp-{name}-{os.getpid()}-{threading.get_ident()}"
    try:
        dest_folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        copy_tree(local_ckpt, tmp, cancel)
        ok, reason = verify_checkpoint(tmp, checksums=checksums, cancel=cancel)
        if not ok:
            raise OSError(f"copy of {local_ckpt.name} failed verification: {reason}")
        if final.exists():
            old = dest_folder / f".old-{name}-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def is_no_space(exc: BaseException | None) -> bool:
    """True for ``ENOSPC`` / ``EDQUOT`` anywhere in the exception's chain."""
    seen = 0
    codes = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in codes:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def fmt_bytes(n: float) -> str:
    """``12.3 GB`` / ``45.6 MB`` / ``7.8 kB`` (decimal units, as Drive quotas are given)."""
    for unit, f in (("GB", 1e9), ("MB", 1e6)):
        if abs(n) >= f:
            return f"{n / f:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system of ``path`` (its nearest existing parent), or None."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def describe_free(path: str | os.PathLike) -> str:
    free = free_bytes(path)
    return "unknown free space" if free is None else f"{fmt_bytes(free)} free"


# -- the Drive syncer ------------------------------------------------------------------------------
class DriveSyncer:
    """Copies finished local checkpoints to Drive in a background thread.

    ``submit(path)`` returns at once (after removing the local checkpoints older than ``path``,
    except the one being copied). The worker publishes the newest pending checkpoint (older
    pending ones are superseded): it adds the SHA-256s to the manifest, copies, verifies, writes
    the ``latest`` pointer, then removes the other checkpoints on Drive (keeps ``keep_last``,
    default 1). A failed copy is retried ``retries`` times with back-off; a full Drive
    (``ENOSPC``/``EDQUOT``) is not retried. The first failure gives one clear message through
    ``report`` (what was needed, what is free, which step Drive can resume from); later ones
    are logged. The local copy of a failed checkpoint is kept until a newer one arrives.

    ``close(cancel=True)`` (the run is complete) drops pending checkpoints and stops a copy in
    progress; its partial copy on Drive is removed.
    """

    def __init__(self, drive_folder: str | os.PathLike, keep_last: int | None = 1,
                 retries: int = 3, checksums: bool = True, backoff_s: float = 2.0,
                 report: Callable[[str], None] | None = None):
        self.drive_folder = Path(drive_folder)
        self.keep_last = keep_last
        self.retries = retries
        self.checksums = checksums
        self.backoff_s = backoff_s
        self.report = report or logger.warning
        self.published: list[Path] = []
        self.failures: list[str] = []
        self.cancelled: list[Path] = []
        #: the newest complete checkpoint on Drive (the step a new runtime resumes from; sizes
        #: checked here, the SHA-256s when a run resumes from it)
        self.drive_checkpoint: Path | None = next(
            (p for _, p in reversed(list_checkpoints(self.drive_folder))
             if verify_checkpoint(p, checksums=False)[0]), None)
        self._failing = False
        self._q: queue.Queue[Path | None] = queue.Queue()
        self._cond = threading.Condition()
        self._lock = threading.Lock()
        self._busy: Path | None = None
        self._newest: Path | None = None
        self._cancel = threading.Event()
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name="slmkd-drive-sync", daemon=True)
        self._thread.start()

    # -- API -------------------------------------------------------------------------------
    def submit(self, local_ckpt: str | os.PathLike) -> None:
        local_ckpt = Path(local_ckpt)
        with self._cond:
            self._pending += 1
        with self._lock:
            self._q.put(local_ckpt)
            if self._newest is None or \
                    (checkpoint_step(local_ckpt) or 0) >= (checkpoint_step(self._newest) or 0):
                self._newest = local_ckpt
            victims = self._older_local(local_ckpt)
        for p in victims:
            shutil.rmtree(p, ignore_errors=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted checkpoint is handled; True if idle."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = None, cancel: bool = False) -> None:
        """Stop the worker: after the pending copies (``timeout``), or at once (``cancel``)."""
        if cancel:
            self._cancel.set()
        else:
            self.wait(timeout)
        self._q.put(None)
        self._thread.join(timeout=60 if cancel else 5)

    @property
    def resumable(self) -> str:
        """Which step a new runtime resumes from (what Drive holds), in words."""
        if self.drive_checkpoint is None:
            return "nothing on Drive yet: a new runtime would restart this run from step 0"
        return f"{self.drive_checkpoint.name} (step {checkpoint_step(self.drive_checkpoint)})"

    # -- worker ----------------------------------------------------------------------------
    def _older_local(self, newest: Path) -> list[Path]:
        step = checkpoint_step(newest)
        if step is None:
            return []
        return [p for s, p in list_checkpoints(newest.parent)
                if s < step and p != self._busy]

    def _run(self) -> None:
        while True:
            item = self._q.get()
            stop = item is None
            handled = 0 if item is None else 1
            with self._lock:  # only the newest pending checkpoint matters
                while not self._q.empty():
                    nxt = self._q.get()
                    if nxt is None:
                        stop = True
                        continue
                    handled += 1
                    if item is None or (checkpoint_step(nxt) or 0) >= (checkpoint_step(item) or 0):
                        item = nxt
                self._busy = item
            try:
                if item is not None:
                    if self._cancel.is_set():
                        self.cancelled.append(item)
                    else:
                        self._publish(item)
            finally:
                with self._lock:
                    self._busy = None
                    victims = self._older_local(self._newest) if self._newest is not None else []
                for p in victims:  # superseded while it was being copied
                    shutil.rmtree(p, ignore_errors=True)
                with self._cond:
                    self._pending -= handled
                    self._cond.notify_all()
            if stop:
                return

    def _publish(self, local_ckpt: Path) -> None:
        if not local_ckpt.is_dir():
            return  # superseded and removed before the copy started
        for attempt in range(1, self.retries + 1):
            try:
                if self.checksums:
                    add_checksums(local_ckpt, self._cancel)
                dest = publish_checkpoint(local_ckpt, self.drive_folder,
                                          checksums=self.checksums, cancel=self._cancel)
                atomic_write_text(self.drive_folder / LATEST_NAME, dest.name + "\n")
                self._prune_drive(dest)
                self.published.append(dest)
                self.drive_checkpoint = dest
                if self._failing:
                    self._failing = False
                    self.report(f"Drive copies work again: {dest.name} copied to {dest}.")
                logger.info("Checkpoint %s copied to %s", local_ckpt.name, dest)
                return
            except CopyCancelled:
                self.cancelled.append(local_ckpt)
                return
            except Exception as e:  # noqa: BLE001 — Drive errors are many; never kill training
                full = is_no_space(e)
                msg = (f"copy of {local_ckpt} to Drive failed "
                       f"(attempt {attempt}/{self.retries}): {e}")
                logger.warning(msg)
                if full or attempt == self.retries:
                    self.failures.append(msg)
                    self._say_failure(local_ckpt, e, full)
                    return
                time.sleep(self.backoff_s * attempt)

    def _prune_drive(self, dest: Path) -> None:
        """Keep ``dest`` and the ``keep_last - 1`` newest older checkpoints; a newer one (left by
        an earlier session: it failed verification, or this run would have resumed from it) goes
        too."""
        if not self.keep_last or self.keep_last <= 0:
            return
        step = checkpoint_step(dest) or 0
        cks = [(s, p) for s, p in list_checkpoints(self.drive_folder) if p != dest]
        older = [p for s, p in cks if s < step]
        victims = [p for s, p in cks if s >= step] + older[: max(0, len(older) - self.keep_last + 1)]
        for p in victims:
            shutil.rmtree(p, ignore_errors=True)

    def _say_failure(self, local_ckpt: Path, exc: BaseException, full: bool) -> None:
        if self._failing:
            return  # said once; the later failures are in the log and in ``failures``
        self._failing = True
        need = fmt_bytes(manifest_bytes(local_ckpt))
        why = "Drive is full" if full else "the copy failed"
        old = ""
        if self.drive_checkpoint is not None:
            old = (f" (the previous one, {fmt_bytes(dir_bytes(self.drive_checkpoint))}, is "
                   "removed only once the new one is verified)")
        advice = (f"Free at least {need} on Drive: the next checkpoint is copied then."
                  if full else "The next checkpoint is tried again.")
        self.report(
            f"WARNING: {why} ({type(exc).__name__}: {exc}). {local_ckpt.name} needs {need} "
            f"on Drive{old}; {describe_free(self.drive_folder)} at {self.drive_folder}. Training "
            f"goes on; the checkpoint stays on local disk ({local_ckpt}), which does not survive "
            f"the runtime. Resumable from Drive: {self.resumable}. {advice}")


# -- checkpoint cadence, the final model -----------------------------------------------------------
def save_schedule(cfg: ExperimentConfig, save_steps: int | None = None) -> tuple[float, int]:
    """``(every_s, every_steps)`` of the run's checkpoints (0 = not by that measure).

    ``cfg.train.save_every_minutes > 0``: by wall time, and by steps only where the user set a
    step interval (the ``save_steps`` argument, or ``cfg.train.save_steps`` changed from its
    default). ``save_every_minutes == 0``: every ``save_steps`` (default ``cfg.train.save_steps``).
    """
    minutes = max(float(getattr(cfg.train, "save_every_minutes", 0.0) or 0.0), 0.0)
    if save_steps is not None:
        steps = int(save_steps)
    else:
        steps = int(cfg.train.save_steps)
        default = next((f.default for f in dataclasses.fields(cfg.train) if f.name == "save_steps"),
                       None)
        if minutes > 0 and steps == default:
            steps = 0
    return minutes * 60.0, max(steps, 0)


class CheckpointSchedule(TrainerCallback):
    """Checkpoints by wall time: ``control.should_save`` once ``every_s`` seconds of training
    have passed since the last save (on top of the Trainer's step-based ones), and no checkpoint
    at the last step (the run is complete there: ``final/`` is saved instead). Under
    ``torch.distributed`` rank 0's clock decides for every rank."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic):
        self.every_s = float(every_s)
        self.clock = clock
        self._last = clock()
        self.saved_steps: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_save = False
        elif self.every_s > 0 and self._due(args):
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self._last = self.clock()
        self.saved_steps.append(int(state.global_step))

    def _due(self, args) -> bool:
        due = self.clock() - self._last >= self.every_s
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([int(due)], device=args.device)
            dist.broadcast(flag, src=0)
            due = bool(flag.item())
        return due


_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _cast_state_dict(model: Any, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The model's state dict with floating tensors cast to ``dtype`` (CPU copies; tensors that
    share storage stay shared, so tied weights are saved once); None when nothing changes. The
    model itself is not touched."""
    sd = model.state_dict()
    if all(not v.is_floating_point() or v.dtype == dtype for v in sd.values()):
        return None
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple[Any, ...], torch.Tensor] = {}
    for k, v in sd.items():
        if v.is_floating_point() and v.dtype != dtype:
            key = (v.device, v.data_ptr(), tuple(v.shape), tuple(v.stride()))
            if key not in seen:
                seen[key] = v.detach().to(device="cpu", dtype=dtype)
            out[k] = seen[key]
        else:
            out[k] = v
    return out


def save_final_model(model: Any, tokenizer: Any, out_dir: str | os.PathLike,
                     final_dtype: str = "bf16") -> Path:
    """Save ``model`` and ``tokenizer`` to ``out_dir`` with weights in ``final_dtype`` ("bf16"
    or "fp32") without changing the in-memory model, plus a manifest with SHA-256s (to verify its
    copy); written under a temp name and renamed into place."""
    if final_dtype not in _DTYPES:
        raise ValueError(f"final_dtype={final_dtype!r}; choose one of {sorted(_DTYPES)}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    sd = _cast_state_dict(model, _DTYPES[final_dtype])
    model.save_pretrained(tmp, safe_serialization=True,
                          **({"state_dict": sd} if sd is not None else {}))
    if sd is not None:
        del sd
        cfg_path = tmp / "config.json"
        if cfg_path.is_file():  # save_pretrained records the in-memory dtype
            c = read_json(cfg_path)
            name = str(_DTYPES[final_dtype]).removeprefix("torch.")
            c["dtype"] = name
            if "torch_dtype" in c:
                c["torch_dtype"] = name
            atomic_write_json(cfg_path, c)
    tokenizer.save_pretrained(tmp)
    write_manifest(tmp, checksums=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
