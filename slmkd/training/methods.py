"""The method registry: every training method, registered in one place.

A training method is a :class:`~slmkd.training.method_spec.MethodSpec`::

    register_method(MethodSpec(
        name="my-method",
        needs_teacher=False,        # load the teacher (eval mode, no grad)?
        build_datasets=my_build,    # (cfg, records, tokenizer) -> (dataset, stats)
        compute_loss=my_loss,       # (trainer, model, inputs, items) -> (loss, metrics)
        make_collator=None,         # (cfg, tokenizer) -> collator; default PaddingCollator
        count_items=None,           # (batch) -> {name: int tensor}; default "supervised"
        stages=(),                  # registered methods run one after another (two-stage)
        config_sections=("models", "data", "train", "generation", "tiny"),
    ))

* ``build_datasets(cfg, records, tokenizer)``: ``records`` are the kept teacher CoT records
  (:func:`slmkd.training.data.load_training_records`); return a map-style dataset of dicts and a
  stats object with ``to_dict()`` (or a dict), stored in ``train_summary.json``.
* ``count_items(batch)``: the token counts that normalise the loss, e.g.
  ``{"supervised": (labels[:, 1:] != -100).sum()}``. The trainer sums them over the micro-batches
  of one optimiser step **and over all processes**, and passes the totals as ``items`` to
  ``compute_loss``. Key ``"supervised"`` is also what the ``min_supervised_tokens`` guard checks.
* ``compute_loss(trainer, model, inputs, items)`` returns ``(loss, metrics)``: ``loss`` is this
  micro-batch's *sum* of token losses divided by the global count (so summing over micro-batches and
  processes gives the token mean of the whole step); ``metrics`` holds detached scalars with the
  same normalisation (``"ce"``, ``"kd"``) and optionally ``"num_nonfinite"``. Do not multiply by the
  number of processes and do not handle NaN: the trainer does both. Useful helpers on ``trainer``:
  :meth:`DistillationTrainer.student_hidden` (final hidden states [B, T, H] and the lm_head weight
  [V, H], without materialising logits), :meth:`DistillationTrainer.teacher_hidden`,
  ``trainer.temperature`` / ``trainer.alpha`` (current epoch's schedule values),
  ``trainer.cfg``, ``trainer.vocab_size`` and :func:`slmkd.training.sft_kd.kd_or_ce_loss`.
* ``stages``: a two-stage method lists the registered methods of its stages;
  :func:`slmkd.training.run.train` runs them in ``{run_dir}/stage{i}/`` (each one a complete,
  resumable run whose student starts from the previous stage's ``final/``) and the parent summary
  points to the last stage's model.

The built-in methods (``sft``, ``kd`` from :mod:`slmkd.training.sft_kd`; ``kd-cached`` from
:mod:`slmkd.training.cached_kd`; ``cascod``, ``cascod-kd``,
``cascod-2stage`` from :mod:`slmkd.training.cascod`) are registered when this module is imported.
The trainer core (:mod:`slmkd.training.trainer`) receives a spec and never imports a method.
"""

from __future__ import annotations

from typing import Any

from slmkd.training.cached_kd import cached_cascod_kd_spec, cached_kd_spec
from slmkd.training.cascod import cascod_specs
from slmkd.training.method_spec import MethodSpec
from slmkd.training.sft_kd import sft_kd_specs

__all__ = ["MethodSpec", "get_method", "register_method", "registered_methods"]

_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Register (or replace) a training method; returns it."""
    if not spec.stages and (spec.build_datasets is None or spec.compute_loss is None):
        raise ValueError(f"Method {spec.name!r} needs build_datasets and compute_loss (or stages).")
    _METHODS[spec.name] = spec
    return spec


def get_method(name: str, cfg: Any = None) -> MethodSpec:
    """The registered method ``name``; with ``cfg.kd.teacher_source == "cached"``, ``kd`` reads
    the teacher from the cache (the ``kd-cached`` method under the name ``kd``), and so does
    ``cascod-kd`` (:func:`slmkd.training.cached_kd.cached_cascod_kd_spec`)."""
    if name not in _METHODS:
        raise ValueError(f"Unknown training method {name!r}; registered: {sorted(_METHODS)}.")
    source = getattr(getattr(cfg, "kd", None), "teacher_source", "live")
    if source == "cached" and name == "kd":
        return cached_kd_spec("kd")
    if source == "cached" and name == "cascod-kd":
        return cached_cascod_kd_spec("cascod-kd")
    return _METHODS[name]


def registered_methods() -> list[str]:
    return sorted(_METHODS)


for _spec in (*sft_kd_specs(), cached_kd_spec(), *cascod_specs()):
    register_method(_spec)
