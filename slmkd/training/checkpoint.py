"""Checkpoints: local fast disk → Drive (copy under a temp name, verify, rename), resume selection.

The Trainer writes ``checkpoint-{step}/`` to fast local disk. :func:`write_manifest` then records
every file's size and SHA-256 in ``slmkd_manifest.json`` (written last: a checkpoint without a
manifest is incomplete). :class:`DriveSyncer` copies each checkpoint to Drive in a background
thread::

    checkpoints/.tmp-checkpoint-{step}-{pid}/   copy   (Drive can fail mid-copy: retried, and the
    verify sizes + SHA-256 against the manifest      local copy is never deleted before a verified
    rename → checkpoints/checkpoint-{step}/          Drive copy of a newer checkpoint exists)
    prune to the last N, then write ``latest`` (a one-line pointer) LAST

so training never waits for Drive. :func:`select_resume_checkpoint` looks at local and Drive
folders, newest step first, and returns the first checkpoint that verifies; an incomplete or
corrupt newer one is reported and skipped.
"""

from __future__ import annotations

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
from typing import Any

from slmkd.fileio import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

MANIFEST_NAME = "slmkd_manifest.json"
LATEST_NAME = "latest"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
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


def write_manifest(ckpt_dir: str | os.PathLike, checksums: bool = True) -> dict[str, Any]:
    """Record ``{relative path: {size, sha256}}`` for every file; written atomically, last."""
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


def verify_checkpoint(ckpt_dir: str | os.PathLike, checksums: bool = True) -> tuple[bool, str]:
    """``(ok, reason)``: the manifest exists and every file has its recorded size (and SHA-256)."""
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
            if "sha256" in meta and sha256_file(ckpt_dir / rel) != meta["sha256"]:
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


def publish_checkpoint(local_ckpt: str | os.PathLike, dest_folder: str | os.PathLike,
                       checksums: bool = True) -> Path:
    """Copy ``local_ckpt`` into ``dest_folder`` under a temp name, verify, rename into place."""
    local_ckpt, dest_folder = Path(local_ckpt), Path(dest_folder)
    dest_folder.mkdir(parents=True, exist_ok=True)
    final = dest_folder / local_ckpt.name
    tmp = dest_folder / f".tmp-{local_ckpt.name}-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(local_ckpt, tmp)
        ok, reason = verify_checkpoint(tmp, checksums=checksums)
        if not ok:
            raise OSError(f"copy of {local_ckpt.name} failed verification: {reason}")
        if final.exists():
            old = dest_folder / f".old-{local_ckpt.name}-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class DriveSyncer:
    """Copies finished local checkpoints to Drive in a background thread.

    ``submit(path)`` returns at once. The worker publishes the newest pending checkpoint
    (older pending ones are superseded), retries a failed copy ``retries`` times with back-off,
    keeps the last ``keep_last`` on Drive, writes the ``latest`` pointer last, then prunes the
    local folder to the last ``keep_last`` checkpoints that are not newer than the one published.
    A failure is logged and counted; the local copy is kept.
    """

    def __init__(self, drive_folder: str | os.PathLike, keep_last: int | None = 3,
                 retries: int = 3, checksums: bool = True, backoff_s: float = 2.0):
        self.drive_folder = Path(drive_folder)
        self.keep_last = keep_last
        self.retries = retries
        self.checksums = checksums
        self.backoff_s = backoff_s
        self.published: list[Path] = []
        self.failures: list[str] = []
        self._q: queue.Queue[Path | None] = queue.Queue()
        self._cond = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name="slmkd-drive-sync", daemon=True)
        self._thread.start()

    def submit(self, local_ckpt: str | os.PathLike) -> None:
        with self._cond:
            self._pending += 1
        self._q.put(Path(local_ckpt))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted checkpoint is handled; True if idle."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = None) -> None:
        self.wait(timeout)
        self._q.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            handled, stop = 1, False
            while not self._q.empty():  # only the newest pending checkpoint matters
                nxt = self._q.get()
                if nxt is None:
                    stop = True
                    break
                item, handled = nxt, handled + 1
            try:
                self._publish(item)
            finally:
                with self._cond:
                    self._pending -= handled
                    self._cond.notify_all()
            if stop:
                return

    def _publish(self, local_ckpt: Path) -> None:
        for attempt in range(1, self.retries + 1):
            try:
                dest = publish_checkpoint(local_ckpt, self.drive_folder, checksums=self.checksums)
                prune_checkpoints(self.drive_folder, self.keep_last, keep=[dest])
                atomic_write_text(self.drive_folder / LATEST_NAME, dest.name + "\n")
                self.published.append(dest)
                step = checkpoint_step(local_ckpt) or 0
                local_folder = local_ckpt.parent
                older = [p for s, p in list_checkpoints(local_folder) if s <= step]
                if self.keep_last and len(older) > self.keep_last:
                    for p in older[: len(older) - self.keep_last]:
                        shutil.rmtree(p, ignore_errors=True)
                logger.info("Checkpoint %s copied to %s", local_ckpt.name, dest)
                return
            except Exception as e:  # noqa: BLE001 — Drive errors are many; never kill training
                msg = (f"copy of {local_ckpt} to Drive failed "
                       f"(attempt {attempt}/{self.retries}): {e}")
                logger.warning(msg)
                if attempt == self.retries:
                    self.failures.append(msg)
                else:
                    time.sleep(self.backoff_s * attempt)
