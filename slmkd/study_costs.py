"""The study's cost model: every throughput and size constant with its source (one table,
:data:`CONSTANTS`), the devices, and the arithmetic of model weights, KV cache, generation time.

:mod:`slmkd.study_plan` turns these into the per-stage budget of ``slmkd plan``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from slmkd.planner import (
    CUDA_CONTEXT_BYTES,
    FRAGMENTATION,
    GIB,
    NF4_BYTES_PER_PARAM,
    ModelSpec,
    estimate_memory,
    model_spec,
    setup_from_config,
)

if TYPE_CHECKING:  # pragma: no cover
    pass

GB = 1e9  #: storage is counted in decimal GB (Drive and disk quotas); VRAM in GiB
ESCALATION_TEACHER = "Qwen/Qwen2.5-14B-Instruct"
STAGES = ("cot", "cache_teacher", "train_02", "train_03", "evaluate_04", "report_05")
KINDS = ("measured", "derived", "assumed", "spec")

#: Exit-code bits of :attr:`StudyBudget.exit_code`.
EXIT_GPU, EXIT_DISK, EXIT_DRIVE = 1, 2, 4


@dataclass(frozen=True)
class Constant:
    """One throughput/size constant of the plan, with where it comes from."""

    name: str
    value: float
    unit: str
    source: str
    kind: str  # measured | derived | assumed | spec

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_H200 = "NVIDIA H200 (device machine), 2026-11-26"
_GEN = (f"benchmarks/RESULTS.md § generate, {_H200} (commit 1e05b79): HF generate, cuDNN SDPA "
        "excluded, Qwen2.5-7B shapes (random weights), bf16, 200 new tokens, ~150-token prompts, "
        "3 batches per size")
_TOK = ("Qwen2 tokenizer + the chat template over shared/data (dev CPU, 2026-11-26; "
        "`python benchmarks/planner_vs_measured.py --token-stats`)")
_GOLD = ("E[max of b lengths] / mean over the GSM8K-train gold completions (" + _TOK + "); the "
         "teacher CoT is assumed to have the same shape")
_ROW = ("E[max of b rows] / mean row (prompt + completion scaled to the assumed CoT mean), "
        "GSM8K train, " + _TOK + "; random batches (no length grouping), padding to the longest")


def _c(name: str, value: float, unit: str, source: str, kind: str) -> Constant:
    assert kind in KINDS, kind
    return Constant(name, float(value), unit, source, kind)


def _derived_gen_line() -> tuple[float, float]:
    """Per-step time of HF decoding on the H200 as ``fixed + per_row · batch`` through the two
    measured points (batch 64: 2,856 tokens/s; batch 256: 4,156 tokens/s)."""
    t64, t256 = 64 / 2856 * 1e3, 256 / 4156 * 1e3  # ms per decoding step
    per_row = (t256 - t64) / (256 - 64)
    return t64 - 64 * per_row, per_row


_FIXED_MS, _PER_ROW_MS = _derived_gen_line()

_TABLE: list[Constant] = [
    # -- devices --------------------------------------------------------------------------------
    _c("h200_bf16_tflops", 989, "TFLOP/s", "NVIDIA H200 datasheet, dense bf16", "spec"),
    _c("h200_hbm_tbps", 4.8, "TB/s", "NVIDIA H200 datasheet", "spec"),
    _c("a100_bf16_tflops", 312, "TFLOP/s", "NVIDIA A100 datasheet, dense bf16 (SXM)", "spec"),
    _c("a100_80g_hbm_tbps", 2.0, "TB/s", "NVIDIA A100 80GB SXM datasheet (2,039 GB/s)", "spec"),
    _c("a100_40g_hbm_tbps", 1.6, "TB/s", "NVIDIA A100 40GB datasheet (1,555 GB/s)", "spec"),
    _c("a100_80g_usable_gib", 79.2, "GiB",
       "torch.cuda total_memory of an A100-SXM4-80GB (the planner's figure)", "spec"),
    _c("a100_40g_usable_gib", 39.4, "GiB",
       "torch.cuda total_memory of an A100-SXM4-40GB (the planner's figure)", "spec"),
    _c("vram_margin_gib", 1.4, "GiB",
       "headroom kept under the card's total on top of the planner's CUDA context and 8% "
       "fragmentation (issue 13: ≤ 38 GiB on a 39.4 GiB card)", "assumed"),
    # -- generation (HF generate) -----------------------------------------------------------------
    _c("gen_7b_h200_b64_tps", 2856, "tokens/s", _GEN + ", batch 64 (all batches)", "measured"),
    _c("gen_7b_h200_b256_tps", 4156, "tokens/s", _GEN + ", batch 256 (all batches)", "measured"),
    _c("gen_step_fixed_ms_h200", round(_FIXED_MS, 3), "ms/step",
       "decode step = fixed + per_row·batch through the two measured H200 points", "derived"),
    _c("gen_step_per_row_ms_h200", round(_PER_ROW_MS, 5), "ms/step/row",
       "decode step = fixed + per_row·batch through the two measured H200 points", "derived"),
    _c("gen_ref_layers", 28, "layers", "Qwen2.5-7B, the measured shape", "spec"),
    _c("gen_layer_scaling", 1.0, "exponent",
       "another model's step time = the 7B's × (its layers / 28)^x: at batch ≥ 64 the H200 ran "
       "HF decoding at ~6% of its bandwidth and FLOP peaks (per-layer overhead-bound), so the "
       "step cost is taken per layer, not per byte", "assumed"),
    _c("gen_bandwidth_scaling", 1.0, "exponent",
       "an A100 decode step = the H200's × (4.8 TB/s / A100 TB/s)^x (decode-bound generation "
       "scales by memory bandwidth); A100 figures are therefore derived", "assumed"),
    _c("gen_4bit_speed_factor", 0.6, "x bf16",
       "bitsandbytes NF4 decoding dequantises every weight each step", "assumed"),
    _c("gen_kv_copy_factor", 2.0, "x KV cache",
       "HF DynamicCache: cache + concatenated copy; reproduces the H200 peaks 16.6 GiB (b64) and "
       "23.5 GiB (b256) of benchmarks/RESULTS.md from 14.2 GiB of weights", "derived"),
    _c("gen_truncation_rate", 0.005, "fraction",
       "answers that loop to max_new_tokens (a bucket then decodes max_new_tokens steps); "
       "no real CoT was generated yet", "assumed"),
    _c("len_tail_b1", 1.0, "x mean", _GOLD, "measured"),
    _c("len_tail_b4", 1.481, "x mean", _GOLD, "measured"),
    _c("len_tail_b16", 1.959, "x mean", _GOLD, "measured"),
    _c("len_tail_b32", 2.183, "x mean", _GOLD, "measured"),
    _c("len_tail_b64", 2.397, "x mean", _GOLD, "measured"),
    _c("len_tail_b128", 2.607, "x mean", _GOLD, "measured"),
    _c("len_tail_b256", 2.811, "x mean", _GOLD, "measured"),
    _c("len_tail_b512", 2.994, "x mean", _GOLD, "measured"),
    _c("vllm_7b_a100_80g_tps", 2500, "tokens/s",
       "vLLM continuous batching (no bucket tails: a finished sequence frees its slot), "
       "Qwen2.5-7B bf16, ~256 concurrent sequences on an A100 80GB; order of magnitude of public "
       "vLLM throughput benchmarks, NOT measured here (no GPU device was lent since vLLM's "
       "lifecycle landed; benchmarks/vllm_lifecycle.py is the CPU check); other models and cards "
       "scaled by bytes read per decode step (weights + KV of vllm_concurrency sequences) and "
       "bandwidth: slmkd.study_costs.vllm_step_bytes", "assumed"),
    _c("vllm_concurrency", 256, "sequences",
       "vLLM's default max_num_seqs; decode is memory-bound there (a third-party A100 40GB "
       "sweep, Llama-3.1-8B bf16, vLLM 0.23: single-stream decode at ~77% of the bandwidth "
       "roofline, johnmusgrave.com/p/vllm-throughput-latency-sweep-on)", "assumed"),
    _c("vllm_engine_start_s", 60, "s", "vLLM engine start (weights, CUDA graphs, KV blocks)",
       "assumed"),
    _c("cascod_answer_steps", 16, "steps",
       "decode steps of a CasCoD answer pass per bucket ('The answer is N.' + EOS, cap 64)",
       "assumed"),
    _c("prefill_mfu", 0.45, "fraction of peak", "prompt prefill (2·N FLOPs/token)", "assumed"),
    # -- training ---------------------------------------------------------------------------------
    _c("train_mfu", 0.30, "fraction of peak",
       "model FLOPs (6·N_student per token, LoRA 4·N; + 2·N_teacher for live KD) over time on "
       "an A100: HF Trainer, bf16 autocast over fp32 weights, gradient checkpointing (its "
       "recompute is not counted), ~300-token rows, lm-head matmuls of the loss in bf16 (issue "
       "14 item 1). No CUDA train step was measured yet (benchmarks/train_step.py)", "assumed"),
    _c("teacher_forward_mfu", 0.45, "fraction of peak",
       "no-grad bf16 teacher forward (live KD and the cache stage), 2·N FLOPs/token", "assumed"),
    _c("teacher_4bit_forward_factor", 0.6, "x bf16",
       "NF4 matmuls dequantise to bf16 first", "assumed"),
    _c("floor_mfu", 0.50, "fraction of peak",
       "the compute floor of issue 14 (6·N per unpadded training token, 2·N per generated or "
       "prompt token, no teacher forward)", "assumed"),
    _c("row_pad_b1", 1.0, "x mean row", _ROW, "derived"),
    _c("row_pad_b2", 1.178, "x mean row", _ROW, "derived"),
    _c("row_pad_b4", 1.357, "x mean row", _ROW, "derived"),
    _c("row_pad_b8", 1.534, "x mean row", _ROW, "derived"),
    _c("row_pad_b16", 1.702, "x mean row", _ROW, "derived"),
    _c("row_pad_b32", 1.862, "x mean row", _ROW, "derived"),
    _c("row_pad_b64", 2.014, "x mean row", _ROW, "derived"),
    _c("row_pad_length_grouped", 1.016, "x mean row",
       "cfg.train.group_by_length (slmkd.training.data.SeededLengthGroupedSampler, 16 examples "
       "per step, micro-batches of 4 padded to a multiple of 8) over the GSM8K-train rows, 3 "
       "epochs, " + _TOK, "derived"),
    _c("cache_batch_rows", 16, "rows", "rows per teacher forward in the cache stage", "assumed"),
    # -- data -------------------------------------------------------------------------------------
    _c("gsm8k_train_items", 7473, "items", "openai/gsm8k train (shared/data/gsm8k)", "spec"),
    _c("gsm8k_test_items", 1319, "items", "openai/gsm8k test (shared/data/gsm8k)", "spec"),
    _c("bbh_tasks", 27, "tasks", "BIG-Bench Hard (shared/data/bbh)", "spec"),
    _c("bbh_items", 6511, "items", "BIG-Bench Hard, all tasks (shared/data/bbh)", "spec"),
    _c("gsm8k_prompt_tokens_mean", 108.4, "tokens", "GSM8K train prompts, " + _TOK, "measured"),
    _c("gsm8k_prompt_tokens_max", 260, "tokens", "GSM8K train prompts, " + _TOK, "measured"),
    _c("gsm8k_gold_completion_tokens_mean", 94.3, "tokens",
       "gold rationale + 'The answer is N.' + EOS, GSM8K train, " + _TOK, "measured"),
    _c("cot_completion_tokens_mean", 200, "tokens",
       "Qwen2.5-7B-Instruct CoT on GSM8K (≈ 2x the gold rationale, 94.3); no real CoT was "
       "generated yet. Also used for the students' GSM8K answers", "assumed"),
    _c("cot_keep_fraction", 0.90, "fraction",
       "kept CoT records: the 7B teacher's GSM8K accuracy (~91% reported) minus truncated and "
       "looping answers", "assumed"),
    _c("bbh_prompt_tokens_mean", 929.6, "tokens",
       "3-shot CoT prompts of the 2,700-item evaluation subset (100 per task, seed 1234), " + _TOK,
       "measured"),
    _c("bbh_prompt_tokens_max", 2462, "tokens", "same subset, longest prompt, " + _TOK, "measured"),
    _c("bbh_completion_tokens_mean", 164.8, "tokens",
       "mean of the 81 exemplar rationales of the official BBH CoT prompts, " + _TOK, "derived"),
    # -- storage and I/O --------------------------------------------------------------------------
    _c("colab_disk_total_gb", 235.7, "GB", "Colab A100 VM disk (Resources panel)", "assumed"),
    _c("colab_disk_image_used_gb", 35, "GB",
       "used by the Colab image and pip packages before the study starts", "assumed"),
    _c("drive_quota_gb", 100, "GB", "the user's Drive plan (pass drive_free_gb)", "assumed"),
    _c("ckpt_small_files_gb", 0.02, "GB",
       "tokenizer (11 MB), scheduler, RNG and trainer state of a checkpoint", "assumed"),
    _c("final_small_files_gb", 0.012, "GB", "tokenizer and config files of final/", "assumed"),
    _c("cot_bytes_per_record", 2500, "B", "one CoT JSONL record (prompt, completion, fields)",
       "assumed"),
    _c("eval_bytes_per_item", 2000, "B", "one predictions.jsonl row", "assumed"),
    _c("hub_download_gbps", 0.2, "GB/s", "first download of a model from the Hub on Colab",
       "assumed"),
    _c("model_load_gbps", 1.0, "GB/s", "loading safetensors from the local HF cache", "assumed"),
    _c("local_write_gbps", 0.5, "GB/s", "checkpoint and final/ writes to the VM disk", "assumed"),
    _c("drive_write_gbps", 0.08, "GB/s", "copies to the mounted Google Drive", "assumed"),
    _c("run_tokenise_s", 10.0, "s", "per run: tokenise 7,473 CoT records into examples "
       "(sft/kd/stage 1), Qwen2 tokenizer, 2-core CPU under load, benchmarks/run_setup.py, "
       "2026-12-02", "measured"),
    _c("run_tokenise_cascod_s", 22.9, "s", "per run: the same for CasCoD (two examples per "
       "record), benchmarks/run_setup.py, 2026-12-02", "measured"),
    _c("run_cuda_warmup_s", 20, "s", "per run: Trainer set-up (0.01 s measured), CUDA context, "
       "kernel autotuning and allocator warm-up of the first steps", "assumed"),
    _c("report_s", 120, "s", "notebook 05: tables, paired statistics, plots", "assumed"),
    # -- the tiny profile (2-core CPU calibration) ------------------------------------------------
    _c("tiny_world_s", 290, "s", "docs/TINY_CALIBRATION.md (slmkd.pipeline estimates)", "measured"),
    _c("tiny_cot_s", 30, "s", "docs/TINY_CALIBRATION.md", "measured"),
    _c("tiny_train_s", 80, "s", "docs/TINY_CALIBRATION.md, sft/cascod-2stage stage", "measured"),
    _c("tiny_train_kd_s", 150, "s", "docs/TINY_CALIBRATION.md, kd", "measured"),
    _c("tiny_train_cascod_s", 150, "s", "docs/TINY_CALIBRATION.md, cascod", "measured"),
    _c("tiny_eval_s", 5, "s", "docs/TINY_CALIBRATION.md, one model on one dataset", "measured"),
]

#: The one table of throughput/size constants, by name.
CONSTANTS: dict[str, Constant] = {c.name: c for c in _TABLE}


def const(name: str) -> float:
    return CONSTANTS[name].value


def set_constant(name: str, value: float, source: str, kind: str = "measured",
                 unit: str | None = None) -> Constant:
    """Replace a constant (a benchmark that measured it); returns the new entry."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    old = CONSTANTS.get(name)
    if old is None and unit is None:
        raise KeyError(f"Unknown constant {name!r}; give its unit to add it.")
    c = Constant(name, float(value), unit or old.unit, source, kind)
    CONSTANTS[name] = c
    return c


def final_bytes_per_param(cfg: Any) -> int:
    """Bytes per parameter of a saved ``final/`` (``cfg.train.final_dtype``)."""
    dtype = str(getattr(cfg.train, "final_dtype", None) or ("fp32" if cfg.is_tiny else "bf16"))
    return 4 if dtype.lower() in ("fp32", "float32", "float") else 2


def notebook_of(method: str) -> str:
    """The notebook that trains ``method``: 03 for the CasCoD methods, else 02."""
    return "03" if method.startswith("cascod") else "02"


def run_setup_seconds(stage: str) -> float:
    """Seconds a training run spends before its first step, besides loading weights: tokenising
    its examples (CasCoD's joint stages: two per record) plus the CUDA warm-up allowance."""
    two = stage in ("cascod", "cascod-kd")
    return const("run_tokenise_cascod_s" if two else "run_tokenise_s") + const("run_cuda_warmup_s")


def _interp_log2(prefix: str, b: float) -> float:
    """A per-batch-size constant (``{prefix}{b}``) at ``b``, interpolated in log2(b)."""
    pts = sorted((int(k[len(prefix):]), c.value) for k, c in CONSTANTS.items()
                 if k.startswith(prefix) and k[len(prefix):].isdigit())
    b = max(1.0, float(b))
    if b <= pts[0][0]:
        return pts[0][1]
    for (b0, v0), (b1, v1) in zip(pts, pts[1:]):
        if b <= b1:
            f = (math.log2(b) - math.log2(b0)) / (math.log2(b1) - math.log2(b0))
            return v0 + f * (v1 - v0)
    (b0, v0), (b1, v1) = pts[-2], pts[-1]  # extrapolate the last segment
    return v1 + (math.log2(b) - math.log2(b1)) * (v1 - v0) / (math.log2(b1) - math.log2(b0))


# -- devices --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    name: str
    tflops: float
    hbm_tbps: float
    gpu_gib: float | None

    @property
    def flops(self) -> float:
        return self.tflops * 1e12


def device_for(profile: str, gpu_gib: float | None = None) -> Device:
    """The profile's GPU (``gpu_gib`` overrides its memory, e.g. the detected card)."""
    if profile == "a100-40g":
        d = Device("A100 40GB", const("a100_bf16_tflops"), const("a100_40g_hbm_tbps"),
                   const("a100_40g_usable_gib"))
    elif profile == "tiny":
        d = Device("CPU (tiny profile)", 0.0, 0.0, None)
    else:
        d = Device("A100 80GB", const("a100_bf16_tflops"), const("a100_80g_hbm_tbps"),
                   const("a100_80g_usable_gib"))
    if gpu_gib is not None:
        d = Device(d.name, d.tflops, d.hbm_tbps, float(gpu_gib))
    return d


# -- model arithmetic -----------------------------------------------------------------------------
def matmul_params(spec: ModelSpec) -> int:
    """Parameters doing matmuls per token: all but the input embedding, the lm_head included."""
    return spec.num_params - (0 if spec.tie_embeddings else spec.vocab_size * spec.hidden_size)


def weight_bytes(spec: ModelSpec, four_bit: bool = False, param_bytes: int = 2) -> float:
    if four_bit:
        lin = spec.linear_params()
        return lin * NF4_BYTES_PER_PARAM + (spec.num_params - lin) * 2
    return spec.num_params * param_bytes


def kv_bytes_per_token(spec: ModelSpec) -> int:
    return 2 * spec.num_layers * spec.kv_dim * 2  # K and V, bf16


def generation_vram_gib(spec: ModelSpec, batch: int, context: int, four_bit: bool = False) -> float:
    """Card memory of batched HF generation: weights + KV cache (and its copy) + logits."""
    peak = (weight_bytes(spec, four_bit) + batch * context * kv_bytes_per_token(spec)
            * const("gen_kv_copy_factor") + 2 * batch * spec.vocab_size * 4)
    return (peak + CUDA_CONTEXT_BYTES + FRAGMENTATION * peak) / GIB


def forward_vram_gib(spec: ModelSpec, rows: int, seq: int, four_bit: bool = False) -> float:
    """Card memory of a no-grad forward (the cache stage): weights + one layer's transients +
    the final hidden states + fp32 logits of a 1,024-row chunk for the top-k."""
    tokens = rows * seq
    peak = (weight_bytes(spec, four_bit) + tokens * (3 * 2 * spec.intermediate_size
                                                      + 6 * 2 * spec.hidden_size)
            + 3 * 4 * min(tokens, 1024) * spec.vocab_size)
    return (peak + CUDA_CONTEXT_BYTES + FRAGMENTATION * peak) / GIB


def gen_step_seconds(spec: ModelSpec, batch: int, device: Device, four_bit: bool = False) -> float:
    """One HF decoding step of ``batch`` rows (see the ``gen_*`` constants)."""
    ms = const("gen_step_fixed_ms_h200") + const("gen_step_per_row_ms_h200") * batch
    ms *= (const("h200_hbm_tbps") / device.hbm_tbps) ** const("gen_bandwidth_scaling")
    ms *= (spec.num_layers / const("gen_ref_layers")) ** const("gen_layer_scaling")
    if four_bit:
        ms /= const("gen_4bit_speed_factor")
    return ms / 1e3


def expected_decode_steps(mean_len: float, max_new: int, batch: int) -> float:
    """Steps a length-bucketed batch decodes: until its longest answer ends (or max_new)."""
    p_hit = 1 - (1 - const("gen_truncation_rate")) ** batch
    tail = min(float(max_new), mean_len * _interp_log2("len_tail_b", batch))
    return p_hit * max_new + (1 - p_hit) * tail


@dataclass
class GenCost:
    seconds: float
    floor_seconds: float
    generated_tokens: float

    def __add__(self, other: GenCost) -> GenCost:
        return GenCost(self.seconds + other.seconds, self.floor_seconds + other.floor_seconds,
                       self.generated_tokens + other.generated_tokens)


def _scale(spec: ModelSpec, device: Device, four_bit: bool) -> float:
    """Speed of ``spec`` on ``device`` relative to the measured 7B figure (time divisor)."""
    f = (device.hbm_tbps / const("h200_hbm_tbps")) ** const("gen_bandwidth_scaling")
    f *= (const("gen_ref_layers") / spec.num_layers) ** const("gen_layer_scaling")
    return f * (const("gen_4bit_speed_factor") if four_bit else 1.0)


def vllm_step_bytes(spec: ModelSpec, context: float, four_bit: bool = False) -> float:
    """Bytes one vLLM decode step reads: the weights + ``vllm_concurrency`` sequences' KV cache
    at ``context`` tokens each."""
    return weight_bytes(spec, four_bit) + const("vllm_concurrency") * context * \
        kv_bytes_per_token(spec)


def generation_cost(spec: ModelSpec, n: int, batch: int, prompt_mean: float, mean_len: float,
                    max_new: int, device: Device, four_bit: bool = False,
                    backend: str = "hf") -> GenCost:
    """Decoding (bucketed HF generate, or vLLM) + prompt prefill of ``n`` items."""
    if n <= 0:
        return GenCost(0.0, 0.0, 0.0)
    b = max(1, min(int(batch), int(n)))
    if backend == "vllm":
        # continuous batching with CUDA graphs: a decode step reads the weights and the live
        # sequences' KV cache, so another model or card scales by bytes per step and bandwidth
        ctx = prompt_mean + mean_len / 2
        ref = model_spec("qwen2.5-7b")
        tps = (const("vllm_7b_a100_80g_tps")
               * vllm_step_bytes(ref, ctx, False) / vllm_step_bytes(spec, ctx, four_bit)
               * device.hbm_tbps / const("a100_80g_hbm_tbps"))
        decode = n * min(mean_len, max_new) / tps
    else:
        steps = expected_decode_steps(mean_len, max_new, b)
        decode = math.ceil(n / b) * steps * gen_step_seconds(spec, b, device, four_bit)
    flops_tok = 2 * matmul_params(spec)
    prefill = n * prompt_mean * flops_tok / (const("prefill_mfu") * device.flops)
    real = n * min(mean_len, max_new)
    floor = (real + n * prompt_mean) * flops_tok / (const("floor_mfu") * device.flops)
    return GenCost(decode + prefill, floor, real)


# -- training stages ------------------------------------------------------------------------------
def _pad_factor(cfg: Any, batch: int) -> float:
    """Padded / real tokens of a training micro-batch of ``batch`` rows."""
    if getattr(cfg.train, "group_by_length", False):
        return const("row_pad_length_grouped")
    return _interp_log2("row_pad_b", batch)


def _stage_plan(cfg: Any, method: str, stage: str, spec: ModelSpec,
                final_bpp: float) -> dict[str, Any]:
    """Setup, memory estimate, checkpoint and saved-result sizes, epochs and step cap of one
    training stage. ``cascod-2stage``'s stage 2 is a LoRA adapter (``cascod.stage2_lora_r``) on
    the frozen bf16 stage-1 model, with a trainable lm_head copy (V × H, fp32 weights, grads and
    AdamW states) when ``cascod.stage2_train_lm_head``, for ``cascod.stage2_epochs``."""
    tr, cas = cfg.train, cfg.cascod
    if stage == "cascod-stage2":
        extra = spec.vocab_size * spec.hidden_size if cas.stage2_train_lm_head else 0
        setup = setup_from_config(cfg, stage, lora=True, lora_r=cas.stage2_lora_r, param_bytes=2,
                                  extra_trainable_params=extra, optim="adamw_torch")
        epochs, max_steps = cas.stage2_epochs, cas.stage2_max_steps
    else:
        joint = getattr(cas, "stage1_objective", "rationale") == "joint"
        setup = setup_from_config(cfg, ("cascod" if joint else stage) if method == "cascod-2stage"
                                  else method)
        epochs, max_steps = tr.epochs, tr.max_steps
        if stage == "cascod-stage1" and getattr(cas, "stage1_epochs", None) is not None:
            epochs = int(cas.stage1_epochs)
    est = estimate_memory(spec, cfg.teacher if setup.uses_teacher else None, setup, cfg)
    states = est.components["optimizer states"]
    if setup.lora:
        trained = spec.lora_params(setup.lora_r) + setup.extra_trainable_params
        ckpt_b = trained * 4 + states
        final_b = trained * 4 if stage == "cascod-stage2" else spec.num_params * final_bpp
    else:
        ckpt_b = spec.num_params * setup.param_bytes + states
        final_b = spec.num_params * final_bpp
    return {"stage": stage, "setup": setup, "est": est, "epochs": epochs, "max_steps": max_steps,
            "ckpt_gb": ckpt_b / GB + const("ckpt_small_files_gb"),
            "final_gb": final_b / GB + const("final_small_files_gb")}
