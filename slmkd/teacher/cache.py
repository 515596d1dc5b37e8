"""The teacher off the GPU: one forward over every kept CoT, its top-k logits cached on Drive.

``slmkd cache-teacher`` (notebook 01, after the CoT) runs the teacher once over prompt +
completion of every kept CoT record and stores, for each supervised position ``i`` (the rows
:func:`slmkd.losses.supervised_positions` gives, in that order), what
:func:`slmkd.losses.fused_topk_kd_loss` needs to distil without the teacher::

    ids    (n_i, k)  int32    the teacher's top-k token ids over the real vocabulary
    values (n_i, k)  fp16     their logits (clamped to ±kd.max_logit_abs like the live loss)
    logz   (S, n_i)  fp32     logsumexp(z / T_s) over the full real vocabulary, one row per
                              temperature T_s of cfg.kd.temperature_schedule

Files (``{drive_root}/cot/{dataset}/{teacher_slug}/teacher_cache/``)::

    shard-00000.safetensors   one generation batch: tensors "{id}/ids", "{id}/values", "{id}/logz"
    shard-00000.json          its index: ids, positions per id, input-ids hash per id, sha256 of
                              the .safetensors file (written last: a shard without it is ignored)
    cache_meta.json           what the cache is valid for (teacher, k, temperatures, vocab size,
                              max length, CoT hash); another setting is refused, not mixed
    cache_stats.json          bytes per token, k, coverage (mean top-k mass) per T, time

Resumable like the CoT shards: every file is written to a temporary name and renamed; a rerun
verifies each shard's hash, drops broken ones and caches only the missing ids (kill -9 + rerun =
the same cache, no duplicates). The tokenisation is the training one
(:func:`slmkd.data.prompts.tokenize_example` on :func:`slmkd.data.prompts.build_prompt`), and
each record's input-ids hash is stored so training can refuse a cache made with other tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmkd.config import ConfigError
from slmkd.fileio import atomic_write_json, read_json
from slmkd.teacher.store import load_cot_records

logger = logging.getLogger(__name__)

__all__ = ["CACHE_DIR_NAME", "CacheResult", "TeacherCache", "TeacherCacheError", "cache_teacher",
           "cache_dir", "cache_settings", "input_ids_hash", "load_teacher_cache"]

CACHE_DIR_NAME = "teacher_cache"
META_FILE = "cache_meta.json"
STATS_FILE = "cache_stats.json"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.json$")


class TeacherCacheError(ConfigError):
    """The teacher cache is missing or was made with other settings."""


@dataclass
class CacheResult:
    cache_dir: Path
    stats: dict[str, Any]
    num_cached_now: int


def cache_dir(cfg: Any, dataset: str | None = None, teacher: str | None = None) -> Path:
    """``{cot_dir}/teacher_cache``."""
    from slmkd.layout import cot_dir

    return cot_dir(cfg, dataset, teacher) / CACHE_DIR_NAME


def input_ids_hash(input_ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, input_ids)).encode()).hexdigest()[:16]


def _cot_hash(records: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: str(r["id"])):
        h.update(f"{r['id']}|{r.get('gen_config_hash', '')}\n".encode())
    return h.hexdigest()[:16]


def cache_settings(cfg: Any, records: list[dict[str, Any]], vocab_size: int,
                   teacher: str | None = None) -> dict[str, Any]:
    """What a cache is valid for; training compares it with its own config."""
    from slmkd.layout import model_slug

    return {"teacher": model_slug(teacher or cfg.teacher), "k": int(cfg.kd.cache_top_k),
            "temperatures": [float(t) for t in cfg.kd.temperature_schedule],
            "vocab_size": int(vocab_size), "max_seq_length": int(cfg.train.max_seq_length),
            "min_supervised_tokens": int(cfg.train.min_supervised_tokens),
            "max_logit_abs": float(cfg.kd.max_logit_abs), "cot_hash": _cot_hash(records),
            "teacher_load_in_4bit": bool(cfg.models.teacher_load_in_4bit)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _scan(directory: Path) -> tuple[dict[str, dict[str, Any]], list[int]]:
    """Valid shards' entries ``id -> {"shard", "n", "input_ids_hash"}`` (first wins) and the
    shard indices in use; a shard whose index or hash does not check out is ignored."""
    entries: dict[str, dict[str, Any]] = {}
    used: list[int] = []
    for p in sorted(directory.glob("shard-*.json")):
        m = _SHARD_RE.match(p.name)
        if not m:
            continue
        used.append(int(m.group(1)))
        data = directory / p.name.replace(".json", ".safetensors")
        try:
            idx = read_json(p)
            ok = data.is_file() and _sha256(data) == idx["sha256"]
        except (ValueError, KeyError, OSError):
            ok = False
        if not ok:
            logger.warning("teacher cache: %s does not match its hash; its ids are cached again", p)
            continue
        for rid, n, ih in zip(idx["ids"], idx["positions"], idx["input_ids_hash"], strict=True):
            entries.setdefault(str(rid), {"shard": data.name, "n": int(n), "input_ids_hash": ih})
    return entries, used


def _examples(cfg: Any, records: list[dict[str, Any]], tokenizer: Any, *,
              rationales: bool = False) -> list[dict[str, Any]]:
    """The training tokenisation of each kept record (same drops as the trainer's). With
    ``rationales``, also CasCoD's rationale example of each record whose rationale is not a token
    prefix of the full example (:func:`slmkd.data.cot_format.is_supervised_prefix`: e.g. a prompt
    left-truncated differently), under ``{id}#rationale``: cascod-kd from the cache then has
    exact teacher rows for every rationale row."""
    from slmkd.data import bbh_prompts_for
    from slmkd.data.cot_format import (
        RATIONALE_CACHE_SUFFIX,
        SplitCoT,
        is_supervised_prefix,
        rationale_example,
        split_cot,
    )
    from slmkd.data.prompts import DropReason, build_prompt, tokenize_example
    from slmkd.data.records import record_from_dict

    bbh = bbh_prompts_for(cfg, "bbh") if any(r.get("dataset") == "bbh" for r in records) else None
    out = []
    for rec in records:
        try:
            prompt = build_prompt(tokenizer, record_from_dict(rec), bbh)
        except (KeyError, TypeError):
            continue
        ex = tokenize_example(tokenizer, prompt, rec["completion"], cfg.train.max_seq_length,
                              cfg.train.min_supervised_tokens)
        if isinstance(ex, DropReason):
            continue
        out.append({"id": str(rec["id"]), "input_ids": ex.input_ids, "labels": ex.labels})
        split = split_cot(rec["completion"]) if rationales else None
        if isinstance(split, SplitCoT):
            r_ex = rationale_example(tokenizer, prompt, split.rationale, cfg.train.max_seq_length,
                                     cfg.train.min_supervised_tokens)
            if not isinstance(r_ex, DropReason) and not is_supervised_prefix(r_ex, ex):
                out.append({"id": f"{rec['id']}{RATIONALE_CACHE_SUFFIX}",
                            "input_ids": r_ex.input_ids, "labels": r_ex.labels})
    return out


def pad_batch(examples: list[dict[str, Any]], pad_token_id: int | None) -> dict[str, Any]:
    """Right-pad ``{"input_ids", "labels"}`` examples to one width: ``input_ids`` (pad id, 0 when
    the tokenizer has none), ``labels`` (−100), ``attention_mask`` — long tensors ``(B, T)``."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    pad = 0 if pad_token_id is None else int(pad_token_id)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.as_tensor(e["input_ids"])
        labels[i, :n] = torch.as_tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _write_shard(directory: Path, index: int, rows: list[dict[str, Any]]) -> None:
    import os

    from safetensors.torch import save_file

    data = directory / f"shard-{index:05d}.safetensors"
    tmp = directory / f".{data.name}.tmp"
    tensors = {}
    for r in rows:
        tensors[f"{r['id']}/ids"] = r["ids"].contiguous()
        tensors[f"{r['id']}/values"] = r["values"].contiguous()
        tensors[f"{r['id']}/logz"] = r["logz"].contiguous()
    save_file(tensors, str(tmp))
    os.replace(tmp, data)
    atomic_write_json(directory / f"shard-{index:05d}.json", {
        "ids": [r["id"] for r in rows], "positions": [int(r["ids"].shape[0]) for r in rows],
        "input_ids_hash": [r["input_ids_hash"] for r in rows], "sha256": _sha256(data)})


def cache_teacher(cfg: Any, dataset: str | None = None, *, teacher: str | None = None,
                  force: bool = False, max_batches: int | None = None, model: Any = None,
                  tokenizer: Any = None, batch_size: int | None = None,
                  show_progress: bool = True, rationales: bool | None = None) -> CacheResult:
    """Cache the teacher's top-k logits for every kept CoT record of ``dataset`` (resumable).

    ``rationales`` (default: ``"cascod-kd"`` in ``cfg.methods``): also cache CasCoD's rationale
    examples that are not token prefixes of their CoT example (``{id}#rationale``; with Qwen's
    tokenizer nearly all are not — ``".\n"`` is one token — so this about doubles the cache),
    which ``cascod-kd`` from the cache needs; a rerun with it adds only those.

    ``model``/``tokenizer`` may be passed (tests); otherwise the teacher is loaded as the
    evaluator and the CoT stage load it. Returns the cache folder and its statistics.
    """
    import torch

    from slmkd.layout import cot_dir as _cot_dir
    from slmkd.losses import supervised_positions, teacher_topk_from_logits
    from slmkd.modeling import load_causal_lm, load_tokenizer

    dataset = dataset or cfg.generation.dataset
    teacher = teacher or cfg.teacher
    records = load_cot_records(_cot_dir(cfg, dataset, teacher), kept_only=True)
    if not records:
        raise FileNotFoundError(f"no kept teacher CoT in {_cot_dir(cfg, dataset, teacher)}: "
                                f"run `slmkd generate-cot --profile {cfg.profile}` first")
    tokenizer = tokenizer or load_tokenizer(teacher, cfg, padding_side="right")
    settings = cache_settings(cfg, records, len(tokenizer), teacher)
    out = cache_dir(cfg, dataset, teacher)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META_FILE
    if meta_path.is_file():
        old = read_json(meta_path)
        if old != settings:
            if not force:
                diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
                raise TeacherCacheError(
                    f"{out} was cached with other settings {diff}; rerun with --force "
                    "(force=True) to replace it")
            for p in out.iterdir():
                p.unlink()
    for p in out.glob(".*.tmp"):
        p.unlink()
    atomic_write_json(meta_path, settings)
    if rationales is None:
        rationales = "cascod-kd" in list(getattr(cfg, "methods", []) or [])
    examples = _examples(cfg, records, tokenizer, rationales=bool(rationales))
    done, used = _scan(out)
    pending = [e for e in examples if e["id"] not in done]
    temps = settings["temperatures"]
    t0 = time.perf_counter()
    cached_now = 0
    if pending:
        if model is None:
            model = load_causal_lm(teacher, cfg, role="teacher", for_training=False)
        model.eval()
        dev = next(model.parameters()).device
        head = model.get_output_embeddings().weight
        bs = int(batch_size or max(1, cfg.train.batch_size))
        nxt = max(used) + 1 if used else 0
        pending.sort(key=lambda e: len(e["input_ids"]))  # length-bucketed batches
        batches = [pending[i:i + bs] for i in range(0, len(pending), bs)]
        for bi, batch in enumerate(batches):
            if max_batches is not None and bi >= max_batches:
                break
            t = pad_batch(batch, tokenizer.pad_token_id)
            ids, labels, mask = t["input_ids"], t["labels"], t["attention_mask"]
            with torch.no_grad():
                hidden = model.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)
                                     ).last_hidden_state
                rows, _ = supervised_positions(labels)
                h = hidden.reshape(-1, hidden.shape[-1])[rows.to(dev)]
                logits = h.to(head.dtype) @ head.t()
                top_ids, top_vals, logz = teacher_topk_from_logits(
                    logits, settings["k"], temps, settings["vocab_size"],
                    max_logit_abs=settings["max_logit_abs"])
            per_row = (labels[:, 1:] != -100).sum(1).tolist()
            rows_out, start = [], 0
            for e, n in zip(batch, per_row, strict=True):
                rows_out.append({"id": e["id"], "ids": top_ids[start:start + n].cpu(),
                                 "values": top_vals[start:start + n].cpu(),
                                 "logz": logz[:, start:start + n].cpu(),
                                 "input_ids_hash": input_ids_hash(e["input_ids"])})
                start += n
            _write_shard(out, nxt, rows_out)
            nxt += 1
            cached_now += len(batch)
            if show_progress:
                logger.info("teacher cache: %d/%d batches", bi + 1, len(batches))
    stats = _stats(out, settings, len(examples), time.perf_counter() - t0)
    return CacheResult(out, stats, cached_now)


def _stats(out: Path, settings: dict[str, Any], num_examples: int, wall: float) -> dict[str, Any]:
    import torch
    from safetensors import safe_open

    from slmkd.data.cot_format import RATIONALE_CACHE_SUFFIX

    entries, _ = _scan(out)
    n_rat = sum(k.endswith(RATIONALE_CACHE_SUFFIX) for k in entries)
    tokens = sum(e["n"] for e in entries.values())
    nbytes = sum(p.stat().st_size for p in out.glob("shard-*.safetensors"))
    mass = [0.0] * len(settings["temperatures"])
    seen = 0
    for shard in sorted({e["shard"] for e in entries.values()}):
        with safe_open(str(out / shard), framework="pt") as f:
            keys = {k.rsplit("/", 1)[0] for k in f.keys()}
            for rid in keys:
                v = f.get_tensor(f"{rid}/values").float()
                lz = f.get_tensor(f"{rid}/logz")
                for j, t in enumerate(settings["temperatures"]):
                    mass[j] += torch.exp(torch.logsumexp(v / t, -1) - lz[j]).sum().item()
                seen += v.shape[0]
    old = read_json(out / STATS_FILE) if (out / STATS_FILE).is_file() else {}
    stats = {
        **{k: settings[k] for k in ("teacher", "k", "temperatures", "vocab_size")},
        "records": len(entries) - n_rat, "rationale_examples": n_rat,
        "examples": num_examples, "complete": len(entries) >= num_examples,
        "tokens": tokens, "bytes": nbytes, "bytes_per_token": nbytes / tokens if tokens else 0.0,
        "coverage": {str(t): (mass[j] / seen if seen else None)
                     for j, t in enumerate(settings["temperatures"])},
        "wall_time_s": round(float(old.get("wall_time_s", 0.0)) + wall, 3),
    }
    atomic_write_json(out / STATS_FILE, stats)
    return stats


@dataclass
class TeacherCache:
    """Read access to a complete teacher cache (training side)."""

    directory: Path
    settings: dict[str, Any]
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    _open: dict[str, Any] = field(default_factory=dict, repr=False)

    def temperature_index(self, temperature: float) -> int:
        for j, t in enumerate(self.settings["temperatures"]):
            if abs(t - float(temperature)) < 1e-9:
                return j
        raise TeacherCacheError(f"temperature {temperature} is not in the cache's schedule "
                                f"{self.settings['temperatures']}")

    def get(self, example_id: str, temperature: float, input_ids: list[int] | None = None, *,
            ids_hash: str | None = None, rows: int | None = None):
        """``(ids (n, k), values (n, k), logz (n,))`` of one example at ``temperature``.

        ``input_ids`` (or their :func:`input_ids_hash`, ``ids_hash``) are checked against the
        tokens the example was cached with; ``rows`` keeps the first ``rows`` supervised
        positions (a prefix of the example: CasCoD's rationale row)."""
        from safetensors import safe_open

        e = self.entries.get(str(example_id))
        if e is None:
            raise TeacherCacheError(f"example {example_id!r} is not in the teacher cache "
                                    f"{self.directory}: rerun `slmkd cache-teacher`")
        if ids_hash is None and input_ids is not None:
            ids_hash = input_ids_hash(list(input_ids))
        if rows is not None and not 0 <= int(rows) <= int(e["n"]):
            raise TeacherCacheError(f"example {example_id!r}: {rows} rows asked, "
                                    f"{e['n']} cached")
        if ids_hash is not None and ids_hash != e["input_ids_hash"]:
            raise TeacherCacheError(f"example {example_id!r} was cached with other tokens "
                                    "(tokenizer or max_seq_length changed): rerun "
                                    "`slmkd cache-teacher --force`")
        f = self._open.get(e["shard"])
        if f is None:
            f = self._open[e["shard"]] = safe_open(str(self.directory / e["shard"]),
                                                   framework="pt")
        j = self.temperature_index(temperature)
        n = int(e["n"]) if rows is None else int(rows)
        return (f.get_tensor(f"{example_id}/ids")[:n], f.get_tensor(f"{example_id}/values")[:n],
                f.get_tensor(f"{example_id}/logz")[j][:n])


def load_teacher_cache(cfg: Any, records: list[dict[str, Any]], vocab_size: int,
                       dataset: str | None = None) -> TeacherCache:
    """The cache for ``cfg``'s teacher, k, temperature schedule and these CoT records; a missing,
    incomplete or mismatched cache is a :class:`TeacherCacheError` naming the command to run."""
    out = cache_dir(cfg, dataset)
    cmd = f"`slmkd cache-teacher --profile {cfg.profile}` (notebook 01, last section)"
    if not (out / META_FILE).is_file() or not (out / STATS_FILE).is_file():
        raise TeacherCacheError(f"kd.teacher_source='cached' but there is no teacher cache in "
                                f"{out}: run {cmd} first")
    want = cache_settings(cfg, records, vocab_size)
    have = read_json(out / META_FILE)
    diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
    if diff:
        raise TeacherCacheError(f"the teacher cache in {out} was made with other settings "
                                f"{diff}: rerun {cmd} with --force")
    entries, _ = _scan(out)
    if not read_json(out / STATS_FILE).get("complete"):
        raise TeacherCacheError(f"the teacher cache in {out} is incomplete "
                                f"({len(entries)} records): rerun {cmd} to finish it")
    return TeacherCache(out, have, entries)


def read_stats(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / STATS_FILE).read_text(encoding="utf-8"))
