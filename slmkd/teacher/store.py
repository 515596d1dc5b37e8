"""The CoT folder on Drive: JSONL shards written once (temp file + rename), read back with the
first valid line of each id winning; what the training stage reads (:func:`load_cot_records`).

    {drive_root}/cot/{dataset}/{teacher_slug}/shard-00000.jsonl, …, gen_config.json, cot_stats.json
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmkd.layout import cot_dir, model_slug

logger = logging.getLogger(__name__)

__all__ = ["GEN_CONFIG_FILE", "HIST_FILE", "REQUIRED_FIELDS", "SHARD_RE", "STATS_FILE", "ShardScan",
           "cot_dir", "gen_config_hash", "generation_settings", "load_cot_records", "scan_shards"]

SHARD_RE = re.compile(r"^shard-(\d{5,})\.jsonl$")
GEN_CONFIG_FILE = "gen_config.json"
STATS_FILE = "cot_stats.json"
HIST_FILE = "cot_lengths.png"
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "dataset": str,
    "prompt": str,
    "completion": str,
    "gold": str,
    "flags": list,
    "keep": bool,
    "teacher": str,
    "gen_config_hash": str,
    "num_new_tokens": int,
    "hit_max_new_tokens": bool,
}



@dataclass
class ShardScan:
    """The valid records of a CoT folder (first valid line per id wins, in shard order), the
    malformed lines ``(shard name, line number, reason)``, how many valid duplicate lines were
    ignored, the shard indices in use and which shards contain malformed lines."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    malformed: list[tuple[str, int, str]] = field(default_factory=list)
    duplicates: int = 0
    shard_indices: list[int] = field(default_factory=list)
    dirty_shards: set[str] = field(default_factory=set)
    stale_tmp: list[Path] = field(default_factory=list)

    @property
    def next_index(self) -> int:
        return max(self.shard_indices) + 1 if self.shard_indices else 0



def generation_settings(cfg: Any, dataset: str, teacher: str) -> dict[str, Any]:
    """Everything that changes what the teacher generates (batch size and backend do not)."""
    return {
        "teacher": model_slug(teacher),
        "dataset": dataset,
        "decoding": "greedy",
        "max_new_tokens": int(cfg.generation.max_new_tokens),
        "teacher_load_in_4bit": bool(cfg.models.teacher_load_in_4bit),
    }


def gen_config_hash(settings: dict[str, Any]) -> str:
    """First 16 hex digits of SHA-256 over the settings as sorted JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------
def _validate_record(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return "not a JSON object"
    for key, typ in REQUIRED_FIELDS.items():
        if key not in obj:
            return f"missing field {key!r}"
        if not isinstance(obj[key], typ) or (typ is int and isinstance(obj[key], bool)):
            return f"field {key!r} has type {type(obj[key]).__name__}"
    if not obj["id"]:
        return "empty id"
    return None


def _shard_files(directory: Path) -> list[tuple[int, Path]]:
    out = []
    for p in directory.iterdir() if directory.is_dir() else []:
        m = SHARD_RE.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def scan_shards(directory: str | Path) -> ShardScan:
    """Read every ``shard-*.jsonl`` of ``directory`` (see :class:`ShardScan`)."""
    directory = Path(directory)
    scan = ShardScan()
    if not directory.is_dir():
        return scan
    scan.stale_tmp = sorted(p for p in directory.glob(".shard-*.tmp") if p.is_file())
    for idx, path in _shard_files(directory):
        scan.shard_indices.append(idx)
        with open(path, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    scan.malformed.append((path.name, n, f"invalid JSON ({e.msg})"))
                    scan.dirty_shards.add(path.name)
                    continue
                problem = _validate_record(obj)
                if problem:
                    scan.malformed.append((path.name, n, problem))
                    scan.dirty_shards.add(path.name)
                    continue
                if obj["id"] in scan.records:
                    scan.duplicates += 1
                    continue
                scan.records[obj["id"]] = obj
                scan.origin[obj["id"]] = path.name
    return scan


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    from slmkd.fileio import atomic_write_text

    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    atomic_write_text(path, text)


def _rewrite_shard(path: Path, keep_ids: set[str] | None = None, updates: dict | None = None):
    """Rewrite a shard keeping only valid lines (first per id, in ``keep_ids`` if given) with
    ``updates[id]`` merged in; atomic."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if _validate_record(obj) or obj["id"] in seen:
                continue
            if keep_ids is not None and obj["id"] not in keep_ids:
                continue
            seen.add(obj["id"])
            if updates and obj["id"] in updates:
                obj.update(updates[obj["id"]])
            rows.append(obj)
    if rows:
        _write_jsonl(path, rows)
    else:
        path.unlink()


def load_cot_records(
    directory: str | Path, kept_only: bool = True, *, strict: bool = False
) -> list[dict[str, Any]]:
    """The CoT records of a folder, sorted by id; only ``keep`` ones by default.

    Malformed lines are logged and skipped (``strict=True`` raises instead). Raises
    ``FileNotFoundError`` (saying which command makes them) when the folder has no shard.
    """
    directory = Path(directory)
    scan = scan_shards(directory)
    if not scan.shard_indices:
        raise FileNotFoundError(
            f"No CoT shards in {directory}; run notebook 01 or `slmkd generate-cot` first."
        )
    if scan.malformed:
        msg = f"{len(scan.malformed)} malformed CoT line(s) in {directory}: {scan.malformed[:3]}"
        if strict:
            raise ValueError(msg)
        logger.warning("%s (skipped; rerun generate-cot to regenerate them)", msg)
    hashes = {r["gen_config_hash"] for r in scan.records.values()}
    if len(hashes) > 1:
        raise ValueError(f"CoT folder {directory} mixes generation configs {sorted(hashes)}.")
    rows = sorted(scan.records.values(), key=lambda r: r["id"])
    return [r for r in rows if r["keep"]] if kept_only else rows
