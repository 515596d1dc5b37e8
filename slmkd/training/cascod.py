"""CasCoD: cascading decomposed chain-of-thought distillation (Dai et al., EMNLP 2024).

Plain CoT distillation trains the student on ``q → r ⊕ a`` (question → rationale followed by the
final answer) with one cross-entropy. Because the answer tokens ``a`` sit in the same target as
the rationale, the student can learn a *shortcut*: predict ``a`` from ``q`` directly (surface
features of the question) and treat ``r`` as decoration. CasCoD decomposes the CoT into two
learning problems and cascades them:

* **rationale step** ``q → r``: the target is the rationale only; the answer is *absent*, so the
  student cannot fit the answer from the question here;
* **answer step** ``q, r → a``: the prompt already contains the full rationale followed by an
  answer cue (``"The answer is"``), so the answer must be read off the rationale.

Training objective (the authors' joint form, one model, paired examples in every step)::

    L = (1 - α_c) · L_rationale + α_c · L_answer,
    L_rationale = (1 / N_r) Σ_{t ∈ T_r} -log p(y_t | y_<t)    (token mean over rationale targets)
    L_answer    = (1 / N_a) Σ_{t ∈ T_a} -log p(y_t | y_<t)    (token mean over answer targets)

with ``α_c = cfg.cascod.alpha_cascod``. **The default α_c = 0.1 is the value of the authors'
training script** (``alpha=0.1`` in their ``run_distilled_cot.sh``: "alpha * answer loss +
(1-alpha) * rloss"), so 90 % of the weight is on the rationale. Like the authors' "concat"
forward, each step computes both terms from one forward pass; where the authors stack the rationale
rows and the answer rows (``2B`` rows), :class:`CasCoDCollator` gives a pair one row when its
rationale example is a token prefix of its answer example (the rationale target ends with the line
break that precedes the cue, :func:`slmkd.data.cot_format.rationale_target`): ``B`` rows, the same
loss and gradients by causality, about half the step's compute.

Methods built on this module (registered by :mod:`slmkd.training.methods`):

* ``cascod`` — the joint loss above;
* ``cascod-2stage`` — the sequential reading, built so that stage 2 cannot undo stage 1: stage 1
  trains ``q → r`` only (full fine-tuning, ``stage1/final``); stage 2 trains a separate LoRA
  adapter on the *frozen* stage-1 model on ``q, r → a`` only, with its own learning rate, epochs
  and step budget (``cfg.cascod.stage2_*``), saved as ``stage2/adapter`` (the run's final model:
  :func:`slmkd.modeling.load_causal_lm` loads it as stage-1 model + adapter). Cascaded inference
  writes the rationale with the adapter off (exactly the stage-1 weights) and the answer with it
  on. Stage 2's inputs mix the teacher's rationales with the stage-1 student's own greedy ones
  (:func:`build_stage2_dataset`; fraction ``cfg.cascod.stage2_student_rationale_fraction``,
  targets: the gold answer), generated once and stored in ``stage2/student_rationales.jsonl``
  (:func:`slmkd.training.staged.ensure_student_rationales`, resumable), so the
  answer step is trained on the rationales it will actually read at test time. (The first
  version continued full fine-tuning of the same weights on ``q, r → a`` with stage 1's lr and
  epochs: ~1,000 steps of 3–5 supervised tokens erased the rationale generation, 1.1 % on the
  tiny study.) ``cfg.cascod.stage1_objective = "joint"`` makes stage 1 the joint loss above
  (then the adapter): on the tiny study (8 seeds) stage 1 without the answer term ends with a
  ~2x higher rationale CE at equal steps (0.031–0.044 vs 0.012–0.017; α_c = 0 through the joint
  path: 0.031), and the sequential two-stage trails joint CasCoD by 9.1 pts (95 % CI
  [−16.4, −1.8]). Orchestration: :mod:`slmkd.training.staged`;
* ``cascod-kd`` — ours (no public implementation combines the two): the rationale term becomes the
  logit-KD loss of :func:`slmkd.losses.fused_kd_loss` on the teacher's own rationale tokens
  (``(1-α)·CE + α·T²·KL`` with the per-epoch temperature / alpha schedules and the same guards);
  the answer term stays a plain CE.

Inference is cascaded (:func:`slmkd.generation.cascaded_generate`): greedy ``r`` from ``q`` until
EOS, append the answer cue, greedy ``a``. :func:`slmkd.evaluation.error_propagation` compares
answer accuracy given the teacher's rationale with the accuracy given the student's own rationale.

Answer cue: the authors' data use "Therefore, the answer is" as both the split marker and the cue.
This project's final-answer line is ``"The answer is N."`` (:data:`slmkd.data.prompts.
FINAL_ANSWER_PREFIX`), so the cue is ``cfg.cascod.answer_cue = "The answer is"``, placed on its own
line after the rationale: the cascaded output ``r + "\\nThe answer is" + " N."`` is then exactly
the format the evaluator's answer extraction expects.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from slmkd.data.cot_format import (
    DEFAULT_ANSWER_CUE,
    SPLIT_REASONS,
    SplitCoT,
    answer_target,
    join_rationale_cue,
    shares_prefix,
    split_cot,
    split_rationale_answer,
)
from slmkd.data.records import record_from_dict
from slmkd.training.cascod_batches import CasCoDCollator, pair_hidden, rationale_rows
from slmkd.training.method_spec import MethodSpec

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ALPHA_CASCOD",
    "DEFAULT_ANSWER_CUE",
    "CASCOD_METHODS",
    "SplitCoT",
    "split_cot",
    "split_rationale_answer",
    "join_rationale_cue",
    "answer_target",
    "build_rationale_example",
    "build_answer_example",
    "CasCoDPairDataset",
    "CasCoDCollator",
    "pair_hidden",
    "rationale_rows",
    "build_cascod_dataset",
    "CasCoDLossOutput",
    "token_mean_ce",
    "cascod_joint_loss",
    "SPLIT_REASONS",
    "cascod_specs",
    "STAGE2_METHOD",
    "STUDENT_RATIONALES_FILE",
    "select_student_rationale_ids",
    "build_stage2_dataset",
]

#: The authors' training-script value (``alpha=0.1`` in ``shell/run_distilled_cot.sh``).
DEFAULT_ALPHA_CASCOD = 0.1
CASCOD_METHODS = ("cascod", "cascod-2stage", "cascod-kd")
#: the stage of ``cascod-2stage`` trained as a LoRA adapter on the frozen stage-1 model
STAGE2_METHOD = "cascod-stage2"
#: the stage-1 student's greedy rationales for stage 2, in ``{run_dir}/stage2/``
STUDENT_RATIONALES_FILE = "student_rationales.jsonl"

# -- examples ------------------------------------------------------------------------------------
def build_rationale_example(
    tokenizer: Any, prompt: str, rationale: str, max_length: int, min_supervised_tokens: int
) -> Any:
    """Rationale example ``q → r``: input ``prompt + rationale + eos``; labels on ``rationale +
    eos`` only (−100 on the prompt). Returns a ``TokenizedExample`` or a ``DropReason``
    (:func:`slmkd.data.cot_format.rationale_example`, which the teacher cache uses too)."""
    from slmkd.data.cot_format import rationale_example

    return rationale_example(tokenizer, prompt, rationale, max_length, min_supervised_tokens)


def build_answer_example(
    tokenizer: Any,
    prompt: str,
    rationale: str,
    answer: str,
    max_length: int,
    answer_cue: str = DEFAULT_ANSWER_CUE,
    min_supervised_tokens: int = 1,
) -> Any:
    """Answer example ``q, r → a``: input ``prompt + r + "\\n" + cue + " a." + eos``; labels on
    ``" a." + eos`` only. ``min_supervised_tokens`` defaults to 1 because answers are short by
    nature (a number, "(A)"): the run-wide minimum is meant for whole CoTs and would drop them
    all. Returns a ``TokenizedExample`` or a ``DropReason``."""
    from slmkd.data.prompts import tokenize_example

    return tokenize_example(
        tokenizer,
        prompt + join_rationale_cue(rationale, answer_cue),
        answer_target(answer),
        max_length,
        min_supervised_tokens,
    )


@dataclass
class CasCoDStats:
    """What :func:`build_cascod_dataset` kept and dropped, with reasons."""

    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    rationale_prompt_truncated: int = 0
    answer_prompt_truncated: int = 0
    prompt_tokens_dropped: int = 0
    rationale_tokens: int = 0
    answer_tokens: int = 0
    #: stage 2 of ``cascod-2stage``: answer examples conditioned on the teacher's rationale /
    #: on the stage-1 student's own greedy rationale (target: the gold answer)
    teacher_rationale_rows: int = 0
    student_rationale_rows: int = 0
    #: cascod-kd from the teacher cache: rationale rows read as a prefix of the record's cached
    #: CoT rows / from the record's separately cached rationale example
    cache_rationale_from_prefix: int = 0
    cache_rationale_separate: int = 0
    #: pairs whose rationale example is a token prefix of their answer example: one forward row
    #: serves both steps (:class:`CasCoDCollator`); the others take two rows
    shared_rows: int = 0

    def summary(self) -> str:
        s = f"CasCoD examples: kept {self.kept}/{self.total}"
        if self.dropped:
            parts = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items()))
            s += f" (dropped: {parts})"
        if self.student_rationale_rows:
            s += (f", answer step given {self.teacher_rationale_rows} teacher / "
                  f"{self.student_rationale_rows} student rationales")
        if self.rationale_prompt_truncated or self.answer_prompt_truncated:
            s += (f", prompts left-truncated: {self.rationale_prompt_truncated} rationale / "
                  f"{self.answer_prompt_truncated} answer examples")
        if self.rationale_tokens and self.kept and self.shared_rows < self.kept:
            s += (f", one row per pair for {self.shared_rows}/{self.kept} (the others' rationale "
                  f"is not a token prefix of their answer example: two rows)")
        return s + (f", supervised tokens: {self.rationale_tokens} rationale / "
                    f"{self.answer_tokens} answer")

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "kept": self.kept, "dropped": dict(self.dropped),
                "num_dropped": sum(self.dropped.values()),
                "rationale_prompt_truncated": self.rationale_prompt_truncated,
                "answer_prompt_truncated": self.answer_prompt_truncated,
                "prompt_tokens_dropped": self.prompt_tokens_dropped,
                "rationale_tokens": self.rationale_tokens, "answer_tokens": self.answer_tokens,
                "teacher_rationale_rows": self.teacher_rationale_rows,
                "student_rationale_rows": self.student_rationale_rows,
                "cache_rationale_from_prefix": self.cache_rationale_from_prefix,
                "cache_rationale_separate": self.cache_rationale_separate,
                "shared_rows": self.shared_rows}


class CasCoDPairDataset:
    """A map-style dataset of paired examples; item ``i`` is
    ``{"rationale_input_ids", "rationale_labels", "answer_input_ids", "answer_labels",
    "example_id"}`` (lists of ints, and the record id). ``kind="rationale"`` / ``"answer"`` makes
    items plain single examples ``{"input_ids", "labels", "example_id"}`` of that kind (the stages
    of ``cascod-2stage``; padded by :class:`slmkd.training_data.PaddingCollator`)."""

    def __init__(self, pairs: Sequence[tuple[str, Any, Any]], kind: str = "pair") -> None:
        if kind not in ("pair", "rationale", "answer"):
            raise ValueError(f"kind must be 'pair', 'rationale' or 'answer', got {kind!r}")
        self.pairs = list(pairs)
        self.kind = kind

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rid, r_ex, a_ex = self.pairs[i]
        if self.kind == "rationale":
            return {"input_ids": r_ex.input_ids, "labels": r_ex.labels, "example_id": rid}
        if self.kind == "answer":
            return {"input_ids": a_ex.input_ids, "labels": a_ex.labels, "example_id": rid}
        return {"rationale_input_ids": r_ex.input_ids, "rationale_labels": r_ex.labels,
                "answer_input_ids": a_ex.input_ids, "answer_labels": a_ex.labels,
                "example_id": rid}

    def with_kind(self, kind: str) -> CasCoDPairDataset:
        return CasCoDPairDataset(self.pairs, kind)


def build_cascod_dataset(
    tokenizer: Any,
    records: Iterable[Any],
    *,
    max_length: int,
    min_supervised_tokens: int,
    answer_cue: str = DEFAULT_ANSWER_CUE,
    bbh_prompts: dict[str, str] | None = None,
    kind: str = "pair",
) -> tuple[CasCoDPairDataset, CasCoDStats]:
    """Paired CasCoD examples from kept teacher CoT records (dicts with ``question``,
    ``completion``, ``dataset``, ``task``, ``id``).

    For each record: split the completion (:func:`split_cot`), build the rationale example
    (``build_prompt(q) → r``) and the answer example (``build_prompt(q) + r + cue → a``). A record
    is dropped — and counted under its reason — when the split fails or either example is dropped by
    :func:`slmkd.data.prompts.tokenize_example`; the pair is all-or-nothing so both terms of the
    joint loss see the same records.
    """
    from slmkd.data.prompts import DropReason, build_prompt

    stats = CasCoDStats()
    pairs: list[tuple[str, Any, Any]] = []
    for rec in records:
        stats.total += 1
        if isinstance(rec, dict) and not rec.get("keep", True):
            stats.dropped["not_kept"] += 1
            continue
        rid = str(rec.get("id", stats.total - 1)) if isinstance(rec, dict) else str(rec.id)
        completion = rec.get("completion") if isinstance(rec, dict) else None
        split = split_cot(completion)
        if not isinstance(split, SplitCoT):
            stats.dropped[f"split:{split}"] += 1
            continue
        try:
            prompt = build_prompt(tokenizer, record_from_dict(rec), bbh_prompts)
        except (KeyError, TypeError) as exc:
            stats.dropped["prompt_error"] += 1
            logger.debug("record %s: no prompt (%s)", rid, exc)
            continue
        r_ex = build_rationale_example(tokenizer, prompt, split.rationale, max_length,
                                       min_supervised_tokens)
        if isinstance(r_ex, DropReason):
            stats.dropped[f"rationale:{r_ex.reason}"] += 1
            continue
        a_ex = build_answer_example(tokenizer, prompt, split.rationale, split.answer, max_length,
                                    answer_cue)
        if isinstance(a_ex, DropReason):
            stats.dropped[f"answer:{a_ex.reason}"] += 1
            continue
        stats.prompt_tokens_dropped += r_ex.prompt_tokens_dropped + a_ex.prompt_tokens_dropped
        stats.rationale_prompt_truncated += bool(r_ex.prompt_tokens_dropped)
        stats.answer_prompt_truncated += bool(a_ex.prompt_tokens_dropped)
        stats.rationale_tokens += r_ex.num_supervised
        stats.answer_tokens += a_ex.num_supervised
        stats.shared_rows += shares_prefix(r_ex, a_ex)
        pairs.append((rid, r_ex, a_ex))
        stats.kept += 1
    if stats.dropped:
        logger.info(stats.summary())
    return CasCoDPairDataset(pairs, kind), stats


# -- stage 2 of cascod-2stage: the answer step on teacher and student rationales ------------------
def select_student_rationale_ids(ids: Iterable[str], fraction: float, seed: int) -> set[str]:
    """The ``round(fraction · n)`` ids whose stage-2 example uses the student's own rationale:
    the first ones in the order of ``sha256(f"{seed}:{id}")`` (deterministic, independent of the
    record order, nested across fractions)."""
    ids = sorted({str(i) for i in ids})
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must lie in [0, 1]")
    k = int(round(fraction * len(ids)))
    order = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    return set(order[:k])


def _stage2_candidates(tokenizer: Any, records: Iterable[Any], stats: CasCoDStats,
                       bbh_prompts: dict[str, str] | None
                       ) -> list[tuple[str, str, SplitCoT, str]]:
    """``(id, prompt, teacher split, gold answer)`` of every kept record with a clean split."""
    from slmkd.data.prompts import build_prompt

    out = []
    for rec in records:
        stats.total += 1
        if not rec.get("keep", True):
            stats.dropped["not_kept"] += 1
            continue
        rid = str(rec.get("id", stats.total - 1))
        split = split_cot(rec.get("completion"))
        if not isinstance(split, SplitCoT):
            stats.dropped[f"split:{split}"] += 1
            continue
        try:
            r = record_from_dict(rec)
            prompt = build_prompt(tokenizer, r, bbh_prompts)
        except (KeyError, TypeError) as exc:
            stats.dropped["prompt_error"] += 1
            logger.debug("record %s: no prompt (%s)", rid, exc)
            continue
        out.append((rid, prompt, split, r.answer.strip() or split.answer))
    return out


def build_stage2_dataset(
    tokenizer: Any,
    records: Iterable[Any],
    *,
    max_length: int,
    student_rationales: Mapping[str, str] | None = None,
    answer_cue: str = DEFAULT_ANSWER_CUE,
    bbh_prompts: dict[str, str] | None = None,
) -> tuple[CasCoDPairDataset, CasCoDStats]:
    """Stage-2 answer examples ``q, r → a`` (``CasCoDPairDataset`` of kind ``"answer"``).

    A record whose id is in ``student_rationales`` is conditioned on that (the stage-1 student's
    own greedy) rationale with the **gold** answer as the target; the others on the teacher's
    rationale with the teacher's answer, exactly as :func:`build_cascod_dataset`. A student
    example that cannot be built falls back to the teacher's (counted under ``student:<reason>``).
    """
    from slmkd.data.prompts import DropReason

    stats = CasCoDStats()
    student_rationales = student_rationales or {}
    pairs: list[tuple[str, Any, Any]] = []
    for rid, prompt, split, gold in _stage2_candidates(tokenizer, records, stats, bbh_prompts):
        a_ex: Any = None
        if rid in student_rationales:
            a_ex = build_answer_example(tokenizer, prompt, student_rationales[rid], gold,
                                        max_length, answer_cue)
            if isinstance(a_ex, DropReason):
                stats.dropped[f"student:{a_ex.reason}"] += 1
                a_ex = None
            else:
                stats.student_rationale_rows += 1
        if a_ex is None:
            a_ex = build_answer_example(tokenizer, prompt, split.rationale, split.answer,
                                        max_length, answer_cue)
            if isinstance(a_ex, DropReason):
                stats.dropped[f"answer:{a_ex.reason}"] += 1
                continue
            stats.teacher_rationale_rows += 1
        stats.prompt_tokens_dropped += a_ex.prompt_tokens_dropped
        stats.answer_prompt_truncated += bool(a_ex.prompt_tokens_dropped)
        stats.answer_tokens += a_ex.num_supervised
        pairs.append((rid, None, a_ex))
        stats.kept += 1
    if stats.dropped:
        logger.info(stats.summary())
    return CasCoDPairDataset(pairs, "answer"), stats


# -- losses --------------------------------------------------------------------------------------
@dataclass
class CasCoDLossOutput:
    """The joint loss and its parts (scalars; ``loss`` carries the gradient).

    ``rationale_loss``: the rationale term before the ``(1 - α_c)`` weight — a CE, or for
    ``cascod-kd`` ``(1-α)·CE + α·T²·KL``; ``rationale_ce`` / ``answer_ce``: the CE parts;
    ``kd``: the rationale KD part (0 without a teacher); token counts; non-finite chunks seen.
    """

    loss: Any
    rationale_loss: Any
    rationale_ce: Any
    answer_ce: Any
    kd: Any
    rationale_tokens: Any
    answer_tokens: Any
    num_nonfinite: int
    num_nonfinite_student: int = 0
    num_nonfinite_teacher: int = 0


def _fused_kwargs(chunk_size: int | None) -> dict[str, Any]:
    import inspect

    from slmkd.losses import fused_kd_loss

    if chunk_size is not None and "chunk_size" in inspect.signature(fused_kd_loss).parameters:
        return {"chunk_size": int(chunk_size)}
    return {}


def token_mean_ce(hidden: Any, weight: Any, labels: Any, *, vocab_size: int | None = None,
                  num_items: Any = None, max_logit_abs: float = 50.0,
                  chunk_size: int | None = None) -> Any:
    """``(1/N) Σ_{t∈S} -log softmax(W h_t)[y_{t+1}]`` without materialising all logits: the
    ``α = 0`` case of :func:`slmkd.losses.fused_kd_loss` (same clamp and guards). ``hidden``
    [B, T, H], ``weight`` [V, H], ``labels`` [B, T] (unshifted, −100 ignored); ``N`` =
    ``num_items`` (default: this batch's supervised count). Returns the ``KDLossOutput``."""
    from slmkd.losses import fused_kd_loss

    return fused_kd_loss(hidden, weight, None, None, labels, temperature=1.0, alpha=0.0,
                         max_logit_abs=max_logit_abs, vocab_size=vocab_size,
                         num_items_in_batch=num_items, **_fused_kwargs(chunk_size))


def cascod_joint_loss(
    student_hidden: Any,
    student_weight: Any,
    labels: Any,
    num_rationale_rows: int,
    *,
    alpha_cascod: float = DEFAULT_ALPHA_CASCOD,
    teacher_hidden: Any = None,
    teacher_weight: Any = None,
    temperature: float = 1.0,
    kd_alpha: float = 0.0,
    max_logit_abs: float = 50.0,
    vocab_size: int | None = None,
    num_rationale_tokens: Any = None,
    num_answer_tokens: Any = None,
    chunk_size: int | None = None,
    nonfinite: str = "report",
) -> CasCoDLossOutput:
    """``L = (1 - α_c)·L_r + α_c·L_a`` on a stacked batch (rows ``< B`` rationale, ``≥ B`` answer).

    Shapes: ``student_hidden`` [2B, T, H] (final normed hidden states), ``student_weight`` [V, H]
    (lm_head), ``labels`` [2B, T] (unshifted; −100 off target), ``B = num_rationale_rows``.
    ``L_r = (1/N_r) Σ_{t∈S_r} ℓ_t`` and ``L_a = (1/N_a) Σ_{t∈S_a} CE_t`` where ``N_r`` / ``N_a``
    default to this batch's counts; the trainer passes the counts of the whole optimiser step
    (all micro-batches and processes), so summing the returned losses over micro-batches gives
    each term's token mean over the step. ``ℓ_t`` is the CE, or with ``teacher_hidden`` [B, T, H_t]
    / ``teacher_weight`` [V_t, H_t] the KD loss ``(1 - α)·CE + α·T²·KL(p_t^T ‖ p_s^T)`` of
    :func:`slmkd.losses.fused_kd_loss` (α = ``kd_alpha``, T = ``temperature``), computed on the
    rationale rows only: the teacher's own rationale tokens.
    """
    from slmkd.losses import fused_cascod_loss

    b = int(num_rationale_rows)
    if student_hidden.shape[0] != 2 * b or labels.shape[0] != 2 * b:
        raise ValueError(f"expected 2*{b} rows (rationale then answer), got hidden "
                         f"{tuple(student_hidden.shape)} and labels {tuple(labels.shape)}")
    if not 0.0 <= alpha_cascod <= 1.0:
        raise ValueError(f"alpha_cascod={alpha_cascod} must lie in [0, 1]")
    use_kd = teacher_hidden is not None
    # one fused call over the stacked rows: one pass over the lm head, one grad_W accumulator
    out = fused_cascod_loss(
        student_hidden, student_weight, labels, b, alpha_cascod=alpha_cascod,
        teacher_hidden=teacher_hidden if use_kd else None,
        teacher_lm_head_weight=teacher_weight if use_kd else None, temperature=temperature,
        alpha=kd_alpha if use_kd else 0.0, max_logit_abs=max_logit_abs, vocab_size=vocab_size,
        num_rationale_tokens=num_rationale_tokens, num_answer_tokens=num_answer_tokens,
        chunk_size=chunk_size, nonfinite=nonfinite)
    a = kd_alpha if use_kd else 0.0
    return CasCoDLossOutput(
        loss=out.loss, rationale_loss=((1.0 - a) * out.group_ce[0] + a * out.group_kd[0]),
        rationale_ce=out.group_ce[0], answer_ce=out.group_ce[1], kd=out.group_kd[0],
        rationale_tokens=out.group_tokens[0], answer_tokens=out.group_tokens[1],
        num_nonfinite=int(out.num_nonfinite),
        num_nonfinite_student=int(out.num_nonfinite_student),
        num_nonfinite_teacher=int(out.num_nonfinite_teacher),
    )


# -- trainer integration -------------------------------------------------------------------------
def count_pair_items(batch: dict[str, Any]) -> dict[str, Any]:
    """Token counts of a stacked CasCoD batch: ``rationale`` and ``answer`` supervised tokens
    (``labels[:, 1:] != -100``) and their sum ``supervised`` (what the low-token guard checks)."""
    from slmkd.training.data import count_supervised

    b = int(batch["num_rationale_rows"])
    nr = count_supervised(batch["labels"][:b])
    na = count_supervised(batch["labels"][b:])
    return {"rationale": nr, "answer": na, "supervised": nr + na}


def _bbh_prompts_for(cfg: Any, records: Sequence[dict[str, Any]]) -> dict[str, str] | None:
    if any(r.get("dataset") == "bbh" for r in records):
        from slmkd.data import load_bbh_cot_prompts

        return load_bbh_cot_prompts(cfg.data.bbh_dir)
    return None


def _datasets_for(kind: str):
    def build(cfg: Any, records: Sequence[dict[str, Any]], tokenizer: Any):
        return build_cascod_dataset(
            tokenizer, records, max_length=cfg.train.max_seq_length,
            min_supervised_tokens=cfg.train.min_supervised_tokens,
            answer_cue=cfg.cascod.answer_cue, bbh_prompts=_bbh_prompts_for(cfg, records),
            kind=kind)

    build.__name__ = f"build_cascod_{kind}_dataset"
    return build


def _make_pair_collator(cfg: Any, tokenizer: Any) -> CasCoDCollator:
    import torch

    return CasCoDCollator(tokenizer.pad_token_id,
                          pad_to_multiple_of=8 if torch.cuda.is_available() else None)


def _joint_compute_loss(trainer: Any, model: Any, inputs: dict[str, Any], items: dict[str, Any],
                        *, use_teacher: bool) -> tuple[Any, dict[str, Any]]:
    """``compute_loss`` of ``cascod`` / ``cascod-kd`` (see :class:`MethodSpec`)."""
    import torch

    cfg = trainer.cfg
    b = int(inputs["num_rationale_rows"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    hs, ws = trainer.student_hidden(model, ids, mask)
    ht = wt = None
    if use_teacher:  # the teacher only for the rows holding rationales (KD on those tokens)
        rows = rationale_rows(inputs)
        ht, wt = trainer.teacher_hidden(ids[rows], mask[rows])
    out = cascod_joint_loss(
        pair_hidden(hs, inputs), ws, inputs["labels"], b, alpha_cascod=cfg.cascod.alpha_cascod,
        teacher_hidden=ht, teacher_weight=wt, temperature=trainer.temperature,
        kd_alpha=trainer.alpha if use_teacher else 0.0, max_logit_abs=cfg.kd.max_logit_abs,
        vocab_size=trainer.vocab_size, num_rationale_tokens=items.get("rationale"),
        num_answer_tokens=items.get("answer"), chunk_size=cfg.kd.chunk_size,
        nonfinite="sanitize" if cfg.train.nonfinite == "sanitize" else "report")
    ac = cfg.cascod.alpha_cascod
    metrics = {
        # "ce": the joint cross-entropy objective (both terms' CE with the α_c weights)
        "ce": ((1.0 - ac) * out.rationale_ce + ac * out.answer_ce).detach(),
        "kd": torch.as_tensor(out.kd).detach(),
        "rationale_ce": out.rationale_ce.detach(),
        "answer_ce": out.answer_ce.detach(),
        "num_nonfinite": torch.as_tensor(out.num_nonfinite),
        # the trainer's guard skips the step by model (nonfinite_student / nonfinite_teacher)
        "num_nonfinite_student": torch.as_tensor(out.num_nonfinite_student),
        "num_nonfinite_teacher": torch.as_tensor(out.num_nonfinite_teacher),
    }
    return out.loss, metrics


def _cascod_loss(trainer, model, inputs, items):
    return _joint_compute_loss(trainer, model, inputs, items, use_teacher=False)


def _cascod_kd_loss(trainer, model, inputs, items):
    return _joint_compute_loss(trainer, model, inputs, items, use_teacher=True)


def _stage_ce_loss(trainer, model, inputs, items):
    from slmkd.training.sft_kd import kd_or_ce_loss

    return kd_or_ce_loss(trainer, model, inputs, items, use_teacher=False)


def cascod_specs() -> tuple[MethodSpec, ...]:
    """``cascod``, ``cascod-kd``, ``cascod-2stage`` and its two stages (``cascod-stage1`` q→r,
    ``cascod-stage2`` q,r→a); registered by :mod:`slmkd.training.methods`."""
    base = ("models", "data", "train", "cascod", "generation", "tiny")
    return (
        MethodSpec(
            name="cascod", needs_teacher=False, build_datasets=_datasets_for("pair"),
            compute_loss=_cascod_loss, make_collator=_make_pair_collator,
            count_items=count_pair_items, config_sections=base,
            description="CasCoD (joint): (1-α_c)·CE(q→r) + α_c·CE(q,r→a), α_c = 0.1 (authors')."),
        MethodSpec(
            name="cascod-kd", needs_teacher=True, build_datasets=_datasets_for("pair"),
            compute_loss=_cascod_kd_loss, make_collator=_make_pair_collator,
            count_items=count_pair_items, config_sections=base + ("kd",),
            description="CasCoD with logit KD on the rationale term: "
                        "(1-α_c)·[(1-α)·CE + α·T²·KL](q→r) + α_c·CE(q,r→a)."),
        MethodSpec(
            # no "cascod" section: stage 1 (q -> r) does not depend on alpha_cascod or on the
            # stage-2 settings (answer_cue only decides rare pair drops), so a stage-2 ablation
            # reuses the stage-1 run
            name="cascod-stage1", needs_teacher=False, build_datasets=_datasets_for("rationale"),
            compute_loss=_stage_ce_loss,
            config_sections=tuple(s for s in base if s != "cascod"),
            description="CasCoD two-stage, stage 1: CE on q→r."),
        MethodSpec(
            name=STAGE2_METHOD, needs_teacher=False, build_datasets=_datasets_for("answer"),
            compute_loss=_stage_ce_loss, config_sections=base,
            description="CasCoD two-stage, stage 2: CE on q,r→a (teacher rationales); inside "
                        "cascod-2stage a LoRA adapter on the frozen stage-1 model, on teacher "
                        "and student rationales (slmkd.training.staged)."),
        MethodSpec(
            name="cascod-2stage", needs_teacher=False, stages=("cascod-stage1", STAGE2_METHOD),
            config_sections=base,
            description="CasCoD sequential: stage 1 q→r; stage 2 a LoRA adapter for q,r→a on the "
                        "frozen stage-1 model (rationale: adapter off; answer: adapter on)."),
    )
