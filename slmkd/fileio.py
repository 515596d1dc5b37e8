"""Atomic file writes and JSON reads: the one way slmkd writes a file it may later resume from.

A write goes to a temporary file in the destination folder, is fsynced, then renamed over the
target, so a reader (or a rerun after a crash) sees the old file or the new one, never half.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["append_jsonl", "atomic_write_json", "atomic_write_jsonl", "atomic_write_text",
           "read_json", "read_jsonl_by_id"]


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# -- append-only JSONL stores keyed by "id" (predictions, student rationales) ---------------------
def read_jsonl_by_id(path: str | os.PathLike,
                     valid: Any = None) -> tuple[dict[str, dict[str, Any]], int]:
    """Rows of a JSONL file by their ``"id"`` (first occurrence wins) and the number of
    unreadable lines (a write cut short by a crash leaves at most one). ``valid(row) -> bool``
    rejects rows (counted as unreadable). A missing file is ``({}, 0)``."""
    import json

    rows: dict[str, dict[str, Any]] = {}
    bad = 0
    p = Path(path)
    if not p.is_file():
        return rows, 0
    with p.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rid = str(row["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                bad += 1
                continue
            if valid is not None and not valid(row):
                bad += 1
                continue
            rows.setdefault(rid, row)
    return rows, bad


def append_jsonl(path: str | os.PathLike, rows: Any) -> None:
    """Append complete lines in one write, flushed and fsynced (a crash loses at most the batch
    being written, which :func:`read_jsonl_by_id` then drops)."""
    import json

    rows = list(rows)
    if not rows:
        return
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_jsonl(path: str | os.PathLike, rows: Any) -> Path:
    """Replace a JSONL file atomically (e.g. without a line cut short by a crash)."""
    import json

    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                           for r in rows))
