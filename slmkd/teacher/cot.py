"""Teacher chain-of-thought generation (notebook 01, ``slmkd generate-cot``).

The teacher answers every training question greedily (:mod:`slmkd.generation`); each completion is
checked by :mod:`slmkd.filters` and written, flagged, to JSONL shards::

    {drive_root}/cot/{dataset}/{teacher_slug}/
        shard-00000.jsonl, shard-00001.jsonl, …   one finished generation batch per shard
        gen_config.json                           the generation settings and their hash
        cot_stats.json                            counts per flag, kept, truncation rate, lengths,
                                                  items/s, generated tokens/s, wall time
        cot_lengths.png                           histogram of CoT lengths (tokens)

Record fields: ``id, dataset, task, question, prompt, completion, extracted_answer, gold, flags,
keep, teacher, gen_config_hash`` plus ``num_new_tokens``, ``hit_max_new_tokens``, ``backend``.

Resumability: every shard is written once with a temp file + rename, so a kill -9 at any moment
loses at most the batch in flight and never leaves a partial shard. A rerun reads all shards,
keeps the first valid line of each id, reports malformed lines (and removes them, so their ids
are generated again), and generates only the missing ids. The generation settings (teacher,
dataset, greedy decoding, ``max_new_tokens``, 4-bit loading) are hashed into every record; a run
whose settings or prompts differ from the existing output is refused unless ``force=True``, which
deletes the old output first. Filters are re-applied to every record at the end of each run, so
changing a filter setting (e.g. ``keep_incorrect``) and rerunning updates ``keep`` without
generating anything.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmkd.config import ConfigError
from slmkd.teacher.filters import ALL_FLAGS, FilterConfig, apply_filters
from slmkd.teacher.store import (
    GEN_CONFIG_FILE,
    HIST_FILE,
    STATS_FILE,
    ShardScan,
    _rewrite_shard,
    _shard_files,
    _write_jsonl,
    cot_dir,
    gen_config_hash,
    generation_settings,
    load_cot_records,
    scan_shards,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CoTConfigMismatchError",
    "CoTResult",
    "ShardScan",
    "cot_dir",
    "gen_config_hash",
    "generate_cot",
    "generation_settings",
    "is_cot_complete",
    "load_cot_records",
    "scan_shards",
]


class CoTConfigMismatchError(ConfigError):
    """Existing CoT output was produced with other generation settings than requested."""


@dataclass
class CoTResult:
    """What :func:`generate_cot` did. ``stats`` is the content of ``cot_stats.json``."""

    output_dir: Path
    stats: dict[str, Any]
    num_generated: int
    num_records: int
    num_kept: int
    stats_path: Path
    histogram_path: Path | None


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def _training_records(cfg: Any, dataset: str, limit: int | None):
    """Training records of ``dataset`` (in loader order, first ``limit``), BBH prompts, skipped."""
    from slmkd.data import bbh_train_eval_split, gsm8k_path, load_bbh, load_bbh_cot_prompts, load_gsm8k

    bbh_prompts: dict[str, str] | None = None
    if dataset == "gsm8k":
        loaded = load_gsm8k("train", gsm8k_path(cfg, "train"))
        records, skipped = list(loaded.records), list(loaded.skipped)
    elif dataset == "bbh":
        if cfg.data.bbh_train_per_task <= 0:
            raise ConfigError(
                "BBH has no training split: set data.bbh_train_per_task > 0 (items per task held "
                "out of evaluation for CoT generation)."
            )
        loaded = load_bbh(cfg.data.bbh_dir)
        records, _pool = bbh_train_eval_split(
            loaded.records, cfg.data.bbh_train_per_task, cfg.data.bbh_split_seed
        )
        skipped = list(loaded.skipped)
        bbh_prompts = load_bbh_cot_prompts(cfg.data.bbh_dir)
        no_prompt = [r for r in records if r.task not in bbh_prompts]
        skipped += [(r.id, "missing_cot_prompt") for r in no_prompt]
        records = [r for r in records if r.task in bbh_prompts]
    else:
        raise ConfigError(f"Unknown dataset {dataset!r}; choose 'gsm8k' or 'bbh'.")
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit must be >= 1, got {limit}")
        records = records[:limit]
    return records, bbh_prompts, skipped


# ---------------------------------------------------------------------------------------------
# records, stats, plot
# ---------------------------------------------------------------------------------------------
def _make_record(rec: Any, prompt: str, out: Any, *, teacher_slug: str, h: str, backend: str,
                 fcfg: FilterConfig) -> dict[str, Any]:
    res = apply_filters(rec.dataset, out.text, rec.answer,
                        hit_max_new_tokens=out.hit_max_new_tokens, task=rec.task,
                        question=rec.question, config=fcfg)
    return {
        "id": rec.id,
        "dataset": rec.dataset,
        "task": rec.task,
        "question": rec.question,
        "prompt": prompt,
        "completion": out.text,
        "extracted_answer": res.extracted_answer,
        "gold": rec.answer,
        "flags": res.flags,
        "keep": res.keep,
        "teacher": teacher_slug,
        "gen_config_hash": h,
        "num_new_tokens": int(out.num_new_tokens),
        "hit_max_new_tokens": bool(out.hit_max_new_tokens),
        "backend": backend,
    }


def _refilter(directory: Path, scan: ShardScan, fcfg: FilterConfig) -> int:
    """Re-apply the filters to every stored record; rewrite shards whose records changed."""
    changed: dict[str, dict[str, dict[str, Any]]] = {}
    for rid, r in scan.records.items():
        res = apply_filters(r["dataset"], r["completion"], r["gold"],
                            hit_max_new_tokens=r["hit_max_new_tokens"], task=r.get("task"),
                            question=r.get("question"), config=fcfg)
        new = {"flags": res.flags, "keep": res.keep, "extracted_answer": res.extracted_answer}
        if any(r.get(k) != v for k, v in new.items()):
            r.update(new)
            changed.setdefault(scan.origin[rid], {})[rid] = new
    for shard, updates in changed.items():
        _rewrite_shard(directory / shard, updates=updates)
    return sum(len(u) for u in changed.values())


def _compute_stats(records: list[dict[str, Any]], *, settings: dict[str, Any], h: str,
                   fcfg: FilterConfig, n_target: int, run: dict[str, Any],
                   totals: dict[str, float]) -> dict[str, Any]:
    n = len(records)
    lengths = [r["num_new_tokens"] for r in records]
    flag_counts = {f: sum(f in r["flags"] for r in records) for f in ALL_FLAGS}
    kept = sum(r["keep"] for r in records)
    gen_wall = totals["generation_wall_time_s"]
    return {
        "teacher": settings["teacher"],
        "dataset": settings["dataset"],
        "gen_config_hash": h,
        "generation_settings": settings,
        "filters": fcfg.to_dict(),
        "num_target": n_target,
        "num_records": n,
        "num_kept": kept,
        "kept_fraction": kept / n if n else 0.0,
        "flag_counts": flag_counts,
        "truncation_rate": flag_counts["truncated"] / n if n else 0.0,
        "cot_tokens_mean": statistics.fmean(lengths) if lengths else 0.0,
        "cot_tokens_median": statistics.median(lengths) if lengths else 0.0,
        "cot_tokens_max": max(lengths) if lengths else 0,
        "kept_cot_tokens_mean": (statistics.fmean([r["num_new_tokens"] for r in records
                                                   if r["keep"]]) if kept else 0.0),
        "generated_items_total": int(totals["generated_items"]),
        "generated_tokens_total": int(totals["generated_tokens"]),
        "generation_wall_time_s": gen_wall,
        "items_per_s": totals["generated_items"] / gen_wall if gen_wall > 0 else None,
        "generated_tokens_per_s": totals["generated_tokens"] / gen_wall if gen_wall > 0 else None,
        "last_run": run,
    }


def _plot_lengths(records: list[dict[str, Any]], max_new_tokens: int, path: Path) -> Path | None:
    """Histogram of CoT lengths (generated tokens), kept vs flagged, limit marked; atomic."""
    if not records:
        return None
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    kept = [r["num_new_tokens"] for r in records if r["keep"]]
    flagged = [r["num_new_tokens"] for r in records if not r["keep"]]
    hi = max(max_new_tokens, max(r["num_new_tokens"] for r in records))
    bins = min(50, max(hi, 1))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist([kept, flagged], bins=bins, range=(0, hi + 1), stacked=True,
            label=[f"kept ({len(kept)})", f"flagged ({len(flagged)})"],
            color=["tab:blue", "tab:orange"])
    ax.axvline(max_new_tokens, color="k", ls="--", lw=1, label=f"max_new_tokens={max_new_tokens}")
    ax.set_xlabel("CoT length (generated tokens)")
    ax.set_ylabel("records")
    n_trunc = sum(bool(r["hit_max_new_tokens"]) for r in records)
    ax.set_title(f"Teacher CoT lengths (n={len(records)}, truncated "
                 f"{100 * n_trunc / len(records):.1f}%)")
    ax.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _summary_line(stats: dict[str, Any]) -> str:
    fc = stats["flag_counts"]
    speed = ""
    if stats.get("generated_tokens_per_s"):
        speed = (f"; {stats['items_per_s']:.2f} items/s, "
                 f"{stats['generated_tokens_per_s']:.1f} generated tokens/s")
    return (f"{stats['num_records']} records, {stats['num_kept']} kept "
            f"({100 * stats['kept_fraction']:.1f}%); flags: "
            + ", ".join(f"{k}={v}" for k, v in fc.items())
            + f"; truncation rate {100 * stats['truncation_rate']:.1f}%; CoT tokens mean "
            f"{stats['cot_tokens_mean']:.1f}, median {stats['cot_tokens_median']:.1f}{speed}")


# ---------------------------------------------------------------------------------------------
# main entry point
# ---------------------------------------------------------------------------------------------
def _mismatch_message(directory: Path, old: dict[str, Any] | None, old_hashes: set[str],
                      new: dict[str, Any], h: str, prompt_diff: int) -> str:
    lines = [f"The CoT output in {directory} was generated with different settings than "
             "requested; refusing to mix them."]
    if old is not None and old.get("settings") != new:
        diffs = [f"{k}: {old['settings'].get(k)!r} -> {new.get(k)!r}"
                 for k in sorted(set(old.get("settings", {})) | set(new))
                 if old["settings"].get(k) != new.get(k)]
        lines.append("  changed: " + "; ".join(diffs))
    if old_hashes - {h}:
        lines.append(f"  existing gen_config_hash {sorted(old_hashes)} != requested {h}")
    if prompt_diff:
        lines.append(f"  {prompt_diff} existing record(s) were made from a different prompt")
    lines.append("Use another --output folder, restore the old settings, or pass --force "
                 "(force=True) to delete the existing CoT and regenerate.")
    return "\n".join(lines)


def _clear_output(directory: Path) -> None:
    for _, p in _shard_files(directory):
        p.unlink()
    for name in (GEN_CONFIG_FILE, STATS_FILE, HIST_FILE):
        (directory / name).unlink(missing_ok=True)
    for p in directory.glob(".shard-*.tmp"):
        p.unlink()


def generate_cot(
    cfg: Any,
    dataset: str | None = None,
    teacher: str | None = None,
    output_dir: str | Path | None = None,
    limit: int | None = None,
    *,
    force: bool = False,
    max_batches: int | None = None,
    model: Any = None,
    tokenizer: Any = None,
    show_progress: bool = True,
) -> CoTResult:
    """Generate (or continue generating) teacher CoT for the training set; see the module doc.

    Args:
        cfg: the experiment config (``cfg.generation`` holds the decoding and filter settings).
        dataset: ``"gsm8k"`` or ``"bbh"`` (default ``cfg.generation.dataset``).
        teacher: model name or path (default ``cfg.models.teacher_medium``).
        output_dir: default :func:`cot_dir`.
        limit: the first N training items (default ``cfg.generation.limit``; None = all).
        force: delete an existing output made with other settings instead of refusing.
        max_batches: stop after this many generation batches (time-boxed sessions; rerun to
            continue).
        model, tokenizer: an already loaded teacher (HF backend), else loaded from ``teacher``.
    """
    from slmkd import generation
    from slmkd.fileio import atomic_write_json, read_json
    from slmkd.modeling import load_tokenizer, model_slug, resolve_model_path

    g = cfg.generation
    dataset = dataset or g.dataset
    teacher = teacher or cfg.models.teacher_medium
    limit = limit if limit is not None else g.limit
    backend = generation.resolve_backend(g.backend) if model is None else "hf"
    out_dir = Path(output_dir) if output_dir is not None else cot_dir(cfg, dataset, teacher)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = generation_settings(cfg, dataset, teacher)
    h = gen_config_hash(settings)
    fcfg = FilterConfig.from_cfg(cfg)
    teacher_slug = model_slug(teacher)

    if tokenizer is None:
        tokenizer = load_tokenizer(teacher, cfg)  # tiny names: the registered world (built once)
    records, bbh_prompts, load_skipped = _training_records(cfg, dataset, limit)
    if load_skipped:
        print(f"{len(load_skipped)} training item(s) could not be used: {load_skipped[:3]}")
    from slmkd.data import build_prompt

    prompts = {r.id: build_prompt(tokenizer, r, bbh_prompts) for r in records}

    # -- existing output: consistency checks --------------------------------------------------
    scan = scan_shards(out_dir)
    gen_cfg_path = out_dir / GEN_CONFIG_FILE
    old_cfg = read_json(gen_cfg_path) if gen_cfg_path.is_file() else None
    old_hashes = {r["gen_config_hash"] for r in scan.records.values()}
    if old_cfg is not None:
        old_hashes.add(old_cfg.get("gen_config_hash", ""))
    prompt_diff = sum(1 for rid, r in scan.records.items()
                      if rid in prompts and r["prompt"] != prompts[rid])
    if old_hashes - {h} or prompt_diff:
        if not force:
            raise CoTConfigMismatchError(
                _mismatch_message(out_dir, old_cfg, old_hashes, settings, h, prompt_diff))
        print(f"--force: deleting the existing CoT output in {out_dir}")
        _clear_output(out_dir)
        scan = scan_shards(out_dir)
    atomic_write_json(gen_cfg_path, {"gen_config_hash": h, "settings": settings})

    for p in scan.stale_tmp:
        print(f"removing an unfinished shard left by an interrupted run: {p.name}")
        p.unlink(missing_ok=True)
    if scan.malformed:
        print(f"{len(scan.malformed)} malformed line(s) in existing shards will be regenerated:")
        for shard, n, why in scan.malformed[:10]:
            print(f"  {shard}:{n}: {why}")
        for shard in sorted(scan.dirty_shards):
            _rewrite_shard(out_dir / shard)
    if scan.duplicates:
        print(f"{scan.duplicates} duplicate line(s) ignored (first valid record per id kept)")

    pending = [r for r in records if r.id not in scan.records]
    print(f"CoT {dataset} / {teacher_slug}: {len(records)} items, "
          f"{len(records) - len(pending)} done, {len(pending)} to generate -> {out_dir}")

    # -- generation ---------------------------------------------------------------------------
    next_index = scan.next_index
    run = {"generated_items": 0, "generated_tokens": 0, "wall_time_s": 0.0, "batches": 0,
           "backend": backend, "batch_size": int(g.batch_size), "interrupted": False}

    def flush(batch_records: list[Any], batch_outputs: list[Any]) -> None:
        nonlocal next_index
        rows = [_make_record(r, prompts[r.id], o, teacher_slug=teacher_slug, h=h,
                             backend=backend, fcfg=fcfg)
                for r, o in zip(batch_records, batch_outputs, strict=True)]
        _write_jsonl(out_dir / f"shard-{next_index:05d}.jsonl", rows)
        next_index += 1
        for row in rows:
            scan.records[row["id"]] = row
            scan.origin[row["id"]] = f"shard-{next_index - 1:05d}.jsonl"
        run["generated_items"] += len(rows)
        run["generated_tokens"] += sum(row["num_new_tokens"] for row in rows)
        run["batches"] += 1

    t0 = time.perf_counter()
    try:
        if pending:
            _generate_pending(cfg, teacher, pending, prompts, flush, model=model,
                              tokenizer=tokenizer, max_batches=max_batches,
                              show_progress=show_progress, resolve=resolve_model_path)
    except BaseException:
        run["interrupted"] = True
        print(f"interrupted after {run['batches']} batch(es); {run['generated_items']} new "
              f"record(s) are saved in {out_dir}; rerun to continue")
        raise
    finally:
        run["wall_time_s"] = time.perf_counter() - t0 if pending else 0.0

    # -- refilter, stats, plot ----------------------------------------------------------------
    n_changed = _refilter(out_dir, scan, fcfg)
    if n_changed:
        print(f"filters re-applied: {n_changed} stored record(s) updated")
    totals = {"generated_items": 0.0, "generated_tokens": 0.0, "generation_wall_time_s": 0.0}
    stats_path = out_dir / STATS_FILE
    if stats_path.is_file():
        try:
            old_stats = read_json(stats_path)
            if old_stats.get("gen_config_hash") == h:
                totals = {
                    "generated_items": float(old_stats.get("generated_items_total", 0)),
                    "generated_tokens": float(old_stats.get("generated_tokens_total", 0)),
                    "generation_wall_time_s": float(old_stats.get("generation_wall_time_s", 0)),
                }
        except (OSError, ValueError):
            pass
    totals["generated_items"] += run["generated_items"]
    totals["generated_tokens"] += run["generated_tokens"]
    totals["generation_wall_time_s"] += run["wall_time_s"]
    if run["wall_time_s"] > 0:
        run["items_per_s"] = run["generated_items"] / run["wall_time_s"]
        run["generated_tokens_per_s"] = run["generated_tokens"] / run["wall_time_s"]
    all_records = sorted(scan.records.values(), key=lambda r: r["id"])
    stats = _compute_stats(all_records, settings=settings, h=h, fcfg=fcfg,
                           n_target=len(records), run=run, totals=totals)
    stats["limit"] = limit
    stats["complete"] = all(r.id in scan.records for r in records)
    stats["malformed_lines_found"] = len(scan.malformed)
    stats["load_skipped"] = len(load_skipped)
    atomic_write_json(stats_path, stats)
    hist = _plot_lengths(all_records, int(g.max_new_tokens), out_dir / HIST_FILE)
    print(_summary_line(stats))
    print(f"outputs: {out_dir} (shards, {STATS_FILE}, {HIST_FILE})")
    return CoTResult(output_dir=out_dir, stats=stats, num_generated=run["generated_items"],
                     num_records=stats["num_records"], num_kept=stats["num_kept"],
                     stats_path=stats_path, histogram_path=hist)


def is_cot_complete(cfg: Any, directory: str | Path | None = None, dataset: str | None = None,
                    teacher: str | None = None) -> bool:
    """True when ``directory`` (default :func:`cot_dir`) holds a finished CoT run for the
    configured items: ``cot_stats.json`` (written last by :func:`generate_cot`) says every target
    item is present, its generation-config hash equals the one ``cfg`` gives, and it covers
    ``cfg.generation.limit`` (a run over all items covers any limit)."""
    from slmkd.fileio import read_json

    dataset = dataset or cfg.generation.dataset
    teacher = teacher or cfg.models.teacher_medium
    directory = Path(directory) if directory is not None else cot_dir(cfg, dataset, teacher)
    path = directory / STATS_FILE
    if not path.is_file() or not _shard_files(directory):
        return False
    try:
        stats = read_json(path)
    except (OSError, ValueError):
        return False
    if stats.get("gen_config_hash") != gen_config_hash(generation_settings(cfg, dataset, teacher)):
        return False
    if not stats.get("complete"):
        return False
    have, want = stats.get("limit"), cfg.generation.limit
    return have is None or (want is not None and want <= have)


def _generate_pending(cfg: Any, teacher: str, pending: list[Any], prompts: dict[str, str],
                      flush: Any, *, model: Any, tokenizer: Any, max_batches: int | None,
                      show_progress: bool, resolve: Any) -> None:
    """Run the configured backend over ``pending`` and ``flush`` each finished batch."""
    from slmkd import generation

    g = cfg.generation
    texts = [prompts[r.id] for r in pending]
    desc = f"teacher CoT ({len(pending)})"
    backend = generation.resolve_backend(g.backend)
    if g.backend == "auto" and model is None and backend == "hf":
        print("generation.backend='auto': vLLM is not installed (or no CUDA GPU): the teacher "
              "writes its CoT with HF generate", flush=True)
    if backend == "vllm" and model is None:
        if not generation.vllm_available():
            raise ConfigError("generation.backend='vllm' but vllm is not installed; "
                              "pip install vllm, or set generation.backend='hf'.")
        if cfg.models.teacher_load_in_4bit:
            raise ConfigError("teacher_load_in_4bit is for the HF backend; use backend 'hf'.")
        batches = {"n": 0}

        def on_batch(b: Any) -> None:
            if max_batches is not None and batches["n"] >= max_batches:
                return
            flush([pending[i] for i in b.indices], b.outputs)
            batches["n"] += 1

        chunk = max(int(g.batch_size), int(getattr(g, "shard_size", 0) or 0))
        if max_batches is not None:
            texts = texts[: chunk * max_batches]
        # one engine, shut down at the end: the cache stage and training load the teacher next
        with generation.VLLMEngine(str(resolve(teacher, cfg)), tokenizer, submit_size=chunk,
                                   llm_kwargs=generation.vllm_llm_kwargs(cfg)) as engine:
            engine.generate(texts, max_new_tokens=int(g.max_new_tokens), desc=desc,
                            on_batch=on_batch, show_progress=show_progress)
        return
    if model is None:
        if cfg.models.teacher_load_in_4bit:
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise ConfigError("models.teacher_load_in_4bit needs bitsandbytes "
                                  "(pip install bitsandbytes) and a CUDA GPU; or turn it off.")
        from slmkd.modeling import load_causal_lm

        model = load_causal_lm(teacher, cfg, role="teacher", for_training=False)
    for k, batch in enumerate(generation.iter_generate_batched(
            model, tokenizer, texts, max_new_tokens=int(g.max_new_tokens),
            batch_size=int(g.batch_size), desc=desc, show_progress=show_progress)):
        flush([pending[i] for i in batch.indices], batch.outputs)
        if max_batches is not None and k + 1 >= max_batches:
            break
