"""``kd`` from a cached teacher (``kd.teacher_source = "cached"``, or the method ``kd-cached``).

No teacher is loaded: for every supervised position the teacher's top-k logits and its
log-normaliser at the epoch's temperature come from the cache written by ``slmkd cache-teacher``
(:mod:`slmkd.teacher.cache`), and the loss is the bucket KL of
:func:`slmkd.losses.fused_topk_kd_loss`::

    L = (1 - α)·CE + α·T²·KL_bucket(p_t^T ‖ p_s^T)     (token means over the step, as ``kd``)

``KL_bucket`` is the KL between the (k+1)-bucket coarse-grainings (the teacher's top-k tokens
and one tail bucket) of the two distributions: a lower bound of the full KL, exact as k → V.

``cascod-kd`` from the cache (:func:`cached_cascod_kd_spec`): the rationale example ``q → r``
is a prefix of the cached CoT example ``q → r, a`` (same prompt, the completion cut before the
answer marker), and a causal teacher's logits at a position depend only on the tokens before it,
so the rationale row's teacher rows are the first ``n_r`` cached rows of its record — exact, not
an approximation. A record whose rationale tokens are not a prefix of its cached tokens (a BPE
merge across the cut, or a prompt truncated differently) is dropped and counted
(``cache_prefix_mismatch``). The loss is :func:`slmkd.losses.fused_cascod_loss` with
``teacher_topk``: one fused call, ``(1-α_c)·[(1-α)·CE + α·T²·KL_bucket](q→r) + α_c·CE(q,r→a)``.
"""

from __future__ import annotations

from typing import Any

import torch

from slmkd.training.method_spec import Items, MethodSpec
from slmkd.training.sft_kd import build_cot_datasets

__all__ = ["build_cached_cascod_datasets", "cached_cascod_kd_loss", "cached_cascod_kd_spec",
           "cached_kd_loss", "cached_kd_spec"]


def _cache_for(trainer: Any) -> Any:
    cache = getattr(trainer, "_teacher_cache", None)
    if cache is None:
        from slmkd.teacher.cache import load_teacher_cache
        from slmkd.training.data import load_training_records

        records, _ = load_training_records(trainer.cfg)
        cache = load_teacher_cache(trainer.cfg, records, trainer.vocab_size)
        trainer._teacher_cache = cache
    return cache


def cached_kd_loss(trainer: Any, model: torch.nn.Module, inputs: dict[str, Any],
                   items: Items) -> tuple[torch.Tensor, dict[str, Any]]:
    """``compute_loss`` of ``kd`` with the teacher read from the cache (see the module docstring).

    The batch's rows are right-padded examples; their cached rows are concatenated in batch-row
    order, which is the row-major order of :func:`slmkd.losses.supervised_positions`."""
    import inspect

    from slmkd.losses import fused_topk_kd_loss

    cache = _cache_for(trainer)
    ids_l, vals_l, lz_l = [], [], []
    for i, ex_id in enumerate(inputs["cache_key"]):
        n_tok = int(inputs["attention_mask"][i].sum())
        ids, vals, lz = cache.get(ex_id, trainer.temperature,
                                  inputs["input_ids"][i, :n_tok].tolist())
        ids_l.append(ids)
        vals_l.append(vals)
        lz_l.append(lz)
    hs, ws = trainer.student_hidden(model, inputs["input_ids"], inputs["attention_mask"])
    dev = hs.device
    kw: dict[str, Any] = {}
    if trainer.loss_accepts_chunk_size:
        kw["chunk_size"] = trainer.cfg.kd.chunk_size
    if "nonfinite" in inspect.signature(fused_topk_kd_loss).parameters:
        kw["nonfinite"] = ("sanitize" if getattr(trainer.cfg.train, "nonfinite", "skip")
                           == "sanitize" else "report")
    out = fused_topk_kd_loss(
        hs, ws, inputs["labels"], torch.cat(ids_l).to(dev), torch.cat(vals_l).to(dev),
        torch.cat(lz_l).to(dev), temperature=trainer.temperature, alpha=trainer.alpha,
        max_logit_abs=trainer.cfg.kd.max_logit_abs, vocab_size=trainer.vocab_size,
        num_items_in_batch=items.get("supervised"), **kw)
    metrics = {"ce": out.ce.detach(), "kd": out.kd.detach(),
               "num_nonfinite": torch.as_tensor(out.num_nonfinite)}
    for key in ("num_nonfinite_student", "num_nonfinite_teacher"):
        if hasattr(out, key):
            metrics[key] = torch.as_tensor(getattr(out, key))
    return out.loss, metrics


def build_cached_datasets(cfg: Any, records: list[dict[str, Any]], tokenizer: Any):
    """The ``kd`` examples plus ``cache_key`` (the example id, kept in the batch for the cache
    lookup: ``example_id`` is metadata the trainer removes before ``compute_loss``)."""
    from slmkd.training.data import ExampleDataset

    ds, stats = build_cot_datasets(cfg, records, tokenizer)
    return ExampleDataset([{**ex, "cache_key": ex["example_id"]} for ex in ds.examples]), stats


def cached_kd_spec(name: str = "kd-cached") -> MethodSpec:
    return MethodSpec(
        name=name, needs_teacher=False, build_datasets=build_cached_datasets,
        compute_loss=cached_kd_loss,
        description="Logit KD from the cached teacher top-k: (1-α)·CE + α·T²·KL_bucket.")


# -- cascod-kd from the cache -------------------------------------------------------------------
def build_cached_cascod_datasets(cfg: Any, records: list[dict[str, Any]], tokenizer: Any):
    """The ``cascod-kd`` pairs plus, per pair, what the cache lookup needs: ``cache_key``,
    ``cache_ids_hash`` (the hash of the tokens the entry was cached with) and ``cache_rows`` (the
    rationale row's supervised positions). When the rationale example is a token prefix of the
    record's full CoT example (:func:`slmkd.data.cot_format.is_supervised_prefix`) the key is the
    record id and the rows are the entry's first ``n_r``; otherwise (a prompt left-truncated
    differently, a BPE merge across the cut) it is the record's separately cached rationale
    example ``{id}#rationale``. Counted in the stats: ``cache_rationale_from_prefix`` /
    ``cache_rationale_separate``. A missing entry is a :class:`TeacherCacheError` naming the
    command that adds it."""
    from slmkd.data import bbh_prompts_for
    from slmkd.data.cot_format import RATIONALE_CACHE_SUFFIX, is_supervised_prefix
    from slmkd.data.prompts import DropReason, build_prompt, tokenize_example
    from slmkd.data.records import record_from_dict
    from slmkd.teacher.cache import TeacherCacheError, input_ids_hash, load_teacher_cache
    from slmkd.training.cascod import _datasets_for

    pairs_ds, stats = _datasets_for("pair")(cfg, records, tokenizer)
    cache = load_teacher_cache(cfg, records, len(tokenizer))
    by_id = {str(r["id"]): r for r in records}
    bbh = bbh_prompts_for(cfg, "bbh") if any(r.get("dataset") == "bbh" for r in records) else None
    keys, from_prefix, missing = [], 0, []
    for rid, r_ex, _a_ex in pairs_ds.pairs:
        rec = by_id[rid]
        full = tokenize_example(tokenizer, build_prompt(tokenizer, record_from_dict(rec), bbh),
                                rec["completion"], cfg.train.max_seq_length,
                                cfg.train.min_supervised_tokens)
        n_r = sum(1 for y in r_ex.labels[1:] if y != -100)
        if not isinstance(full, DropReason) and is_supervised_prefix(r_ex, full):
            key, h = rid, input_ids_hash(list(full.input_ids))
            from_prefix += 1
        else:
            key, h = f"{rid}{RATIONALE_CACHE_SUFFIX}", input_ids_hash(list(r_ex.input_ids))
        if key not in cache.entries:
            missing.append(key)
        keys.append({"cache_key": key, "cache_ids_hash": h, "cache_rows": n_r})
    if missing:
        raise TeacherCacheError(
            f"the teacher cache in {cache.directory} lacks {len(missing)} CasCoD rationale "
            f"entries (e.g. {missing[0]!r}; a cache made before cascod-kd could read it): rerun "
            f"`slmkd cache-teacher --profile {cfg.profile}` (it adds only those)")
    stats.cache_rationale_from_prefix = from_prefix
    stats.cache_rationale_separate = len(keys) - from_prefix
    return _CachedPairDataset(pairs_ds.pairs, keys), stats


class _CachedPairDataset:
    """CasCoD pairs whose items carry the cache lookup keys (passed through by the collator)."""

    def __init__(self, pairs: list[tuple[str, Any, Any]], keys: list[dict[str, Any]]):
        from slmkd.training.cascod import CasCoDPairDataset

        self._pairs = CasCoDPairDataset(pairs, "pair")
        self.pairs = self._pairs.pairs
        self._keys = keys

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self._pairs[i], **self._keys[i]}


def cached_cascod_kd_loss(trainer: Any, model: torch.nn.Module, inputs: dict[str, Any],
                          items: Items) -> tuple[torch.Tensor, dict[str, Any]]:
    """``compute_loss`` of ``cascod-kd`` with the rationale rows' teacher from the cache."""
    from slmkd.losses import fused_cascod_loss
    from slmkd.training.cascod import pair_hidden

    cfg = trainer.cfg
    cache = _cache_for(trainer)
    b = int(inputs["num_rationale_rows"])
    ids_l, vals_l, lz_l = [], [], []
    for key, h, rows in zip(inputs["cache_key"], inputs["cache_ids_hash"], inputs["cache_rows"],
                            strict=True):
        ids, vals, lz = cache.get(key, trainer.temperature, ids_hash=h, rows=int(rows))
        ids_l.append(ids)
        vals_l.append(vals)
        lz_l.append(lz)
    hs, ws = trainer.student_hidden(model, inputs["input_ids"], inputs["attention_mask"])
    dev = hs.device
    out = fused_cascod_loss(
        pair_hidden(hs, inputs), ws, inputs["labels"], b, alpha_cascod=cfg.cascod.alpha_cascod,
        teacher_topk=(torch.cat(ids_l).to(dev), torch.cat(vals_l).to(dev),
                      torch.cat(lz_l).to(dev)),
        temperature=trainer.temperature, alpha=trainer.alpha,
        max_logit_abs=cfg.kd.max_logit_abs, vocab_size=trainer.vocab_size,
        num_rationale_tokens=items.get("rationale"), num_answer_tokens=items.get("answer"),
        chunk_size=cfg.kd.chunk_size,
        nonfinite="sanitize" if cfg.train.nonfinite == "sanitize" else "report")
    ac = cfg.cascod.alpha_cascod
    ce_r, ce_a = out.group_ce[0], out.group_ce[1]
    metrics = {"ce": ((1.0 - ac) * ce_r + ac * ce_a).detach(), "kd": out.group_kd[0].detach(),
               "rationale_ce": ce_r.detach(), "answer_ce": ce_a.detach(),
               "num_nonfinite": torch.as_tensor(out.num_nonfinite),
               "num_nonfinite_student": torch.as_tensor(out.num_nonfinite_student),
               "num_nonfinite_teacher": torch.as_tensor(out.num_nonfinite_teacher)}
    return out.loss, metrics


def cached_cascod_kd_spec(name: str = "cascod-kd") -> MethodSpec:
    """``cascod-kd`` with ``kd.teacher_source = "cached"``: no teacher loaded."""
    from slmkd.training.cascod import _make_pair_collator, count_pair_items

    return MethodSpec(
        name=name, needs_teacher=False, build_datasets=build_cached_cascod_datasets,
        compute_loss=cached_cascod_kd_loss, make_collator=_make_pair_collator,
        count_items=count_pair_items,
        config_sections=("models", "data", "train", "cascod", "generation", "tiny", "kd"),
        description="CasCoD-KD from the cached teacher top-k: (1-α_c)·[(1-α)·CE + "
                    "α·T²·KL_bucket](q→r) + α_c·CE(q,r→a).")
