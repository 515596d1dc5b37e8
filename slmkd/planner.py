"""VRAM planner: an estimate of peak GPU memory for one training step, and a batch recommendation.

Everything is derived from the model *configs* (no weights, no Hub access): known presets for the
Qwen2.5 family, a local ``config.json`` when a path is given, or the tiny profile's dimensions.

Parameter count of a Qwen2-architecture decoder (hidden ``H``, layers ``L``, heads ``n_h``, kv heads
``n_kv``, head dim ``d = H / n_h``, intermediate ``I``, vocabulary rows ``V``)::

    per layer  = H·(n_h·d) + 2·H·(n_kv·d)  (q, k, v; + biases n_h·d + 2·n_kv·d)
               + (n_h·d)·H                 (o_proj, no bias)
               + 3·H·I                     (gate, up, down)
               + 2·H                       (two RMSNorm weights)
    total      = V·H (embedding) + L·per_layer + H (final norm) [+ V·H lm_head when untied]

Peak allocated memory of a training step (bytes; ``b`` micro-batch, ``s`` sequence length,
``a`` activation bytes — 2 for bf16)::

    persistent = student weights + optimizer states + teacher weights
    backward   = saved activations + autocast's bf16 weight copies + final hidden states (+ grad)
                 + the loss's lm_head gradient buffer(s) + chunked-loss working set
                 + teacher hidden states (or the cached teacher's top-k rows)
                 + gradients already accumulated (grad_accum_steps > 1)
    late       = gradients + the last layer's recomputed activations (end of the backward pass)
    step       = gradients + the optimizer's transient buffers (foreach AdamW: one state copy)
    peak       = persistent + max(backward, late, step)

With ``grad_accum_steps == 1`` no gradient is resident during the forward pass (the Trainer
frees them after each optimizer step), which is what lets a large student fit a small card at
micro-batch = effective batch.

Method-specific terms:

* ``cascod`` / ``cascod-kd``: every example gives two rows (rationale and answer) stacked in one
  batch of one width, so the student runs ``2·b`` rows, and the loss is called twice (rationale
  rows, answer rows): two lm_head gradient buffers ``[V, H]`` live until the backward pass.
  ``cascod-kd`` runs the teacher on the ``b`` rationale rows only.
* bitsandbytes 8-bit AdamW: the HF Trainer registers every ``nn.Embedding`` for 32-bit states
  (``optim_bits=32``), so the input embedding keeps 8 B/param (+1.7 GiB for Qwen2.5-3B).
* ``teacher_source="cached"`` (``kd``, ``cascod-kd``): no teacher is loaded; the loss reads the
  cached top-k ids (int32) and values (bf16) plus one fp32 normaliser per temperature of each
  supervised token.
* LoRA: the base model in bf16, fp32 adapters and their states; the lm_head is frozen, so the
  loss keeps no lm_head gradient.

Saved activations per token and layer (transformers' Qwen2, SDPA attention, padding mask present
so K/V are repeated to ``n_h`` heads)::

    2 RMSNorms   2·(4H + 2aH)         fp32 upcast of the input, the normalised bf16 tensor
                                      (for the weight's grad) and the output (next Linear's input);
                 2·(4H + 4H) + 5aH    under bf16 autocast over fp32 weights (slmkd.trainer)
    attention    4·a·(n_h·d)          q, k, v (repeated) and the attention output
    MLP          4·a·I                gate, silu(gate), up, silu·up

With gradient checkpointing only each layer's input (``a·H`` per token) is kept, plus one layer's
activations while it is recomputed. ``torch.cuda.max_memory_allocated`` measures exactly the
"peak allocated" figure; the CUDA context and the allocator's fragmentation come on top of it and
are reported separately (``overhead``), so the total is what ``nvidia-smi`` would show.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from slmkd.config import ExperimentConfig

GIB = 1024**3

#: Bytes per parameter for the student's optimizer states, by ``TrainingArguments.optim`` name.
#: ``None`` means "two states in the parameter dtype" (torch AdamW keeps states like the params).
OPTIMIZER_STATE_BYTES: dict[str, float | None] = {
    "adamw_torch": None,
    "adamw_torch_fused": None,
    "adamw_hf": None,
    "adamw_apex_fused": None,
    "adamw_bnb_8bit": 2.0,
    "adamw_8bit": 2.0,
    "paged_adamw_8bit": 2.0,
    "paged_adamw_32bit": 8.0,
    "adafactor": 0.05,  # factored second moment: O(rows + cols), negligible
    "sgd": 0.0,
}
#: Optimizers that allocate one state-sized temporary during ``step()`` (torch's foreach AdamW).
FOREACH_OPTIMIZERS = {"adamw_torch", "adamw_hf"}
#: bitsandbytes 8-bit optimizers: the HF Trainer keeps ``nn.Embedding`` params in 32-bit states.
BNB_8BIT_OPTIMIZERS = {"adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit"}
#: Bytes per parameter of the 32-bit states bitsandbytes keeps for embeddings (two fp32 states).
BNB_EMBEDDING_STATE_BYTES = 8.0

#: NF4 with double quantisation: 4 bits + absmax (8 bits / 64 values, itself quantised) ≈ 4.13 bits.
NF4_BYTES_PER_PARAM = 4.127 / 8
#: CUDA context + cuBLAS workspace, not counted by ``torch.cuda.max_memory_allocated``.
CUDA_CONTEXT_BYTES = int(0.6 * GIB)
#: Caching-allocator fragmentation (reserved − allocated at the peak), as a fraction of the peak.
FRAGMENTATION = 0.08
#: Fraction of the card the recommendation is allowed to fill.
SAFETY_FRACTION = 0.92

METHODS_WITH_TEACHER = {"kd", "cascod-kd"}
#: Methods whose loss reads each row twice (CasCoD's rationale and answer terms).
METHODS_WITH_PAIRED_ROWS = {"cascod", "cascod-kd"}
KNOWN_METHODS = ("sft", "kd", "cascod", "cascod-2stage", "cascod-kd", "cascod-stage1",
                 "cascod-stage2")
TEACHER_SOURCES = ("live", "cached")
#: Bytes of the cached teacher per supervised token and kept id: int32 id + bf16 value.
CACHE_BYTES_PER_ID = 4 + 2
#: Bytes per supervised token and temperature of the cached normaliser (fp32).
CACHE_BYTES_PER_TEMPERATURE = 4


@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers of a Qwen2-style decoder-only model."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool
    head_dim: int | None = None
    attention_bias: bool = True

    def __post_init__(self) -> None:
        for f in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                  "vocab_size"):
            if int(getattr(self, f)) < 1:
                raise ValueError(
                    f"ModelSpec {self.name!r}: {f} must be >= 1, got {getattr(self, f)}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelSpec {self.name!r}: num_heads ({self.num_heads}) must be a "
                             f"multiple of num_kv_heads ({self.num_kv_heads}).")

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.dim_head

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.dim_head

    def layer_params(self) -> int:
        h, q, kv, i = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        n = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
        if self.attention_bias:
            n += q + 2 * kv
        return n

    def linear_params(self) -> int:
        """Parameters inside the decoder layers' Linear modules (what 4-bit quantises)."""
        h, q, kv, i = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        return self.num_layers * (h * q + 2 * h * kv + q * h + 3 * h * i)

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    @property
    def num_params(self) -> int:
        return self.embedding_params() + self.num_layers * self.layer_params() + self.hidden_size

    def lora_params(self, r: int) -> int:
        """LoRA adapters of rank ``r`` on q, k, v, o, gate, up, down: ``r·(in + out)`` each."""
        h, q, kv, i = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        per_layer = r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))
        return self.num_layers * per_layer

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> ModelSpec:
        """From a ``config.json`` path/folder, a dict, or a ``transformers.PretrainedConfig``."""
        if isinstance(config, (str, os.PathLike)):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"No config.json at {path}.")
            data = json.loads(path.read_text())
            name = name or path.parent.name
        elif isinstance(config, dict):
            data = config
        else:
            data = config.to_dict()
        try:
            return cls(
                name=name or str(data.get("_name_or_path") or data.get("model_type") or "model"),
                hidden_size=int(data["hidden_size"]),
                num_layers=int(data["num_hidden_layers"]),
                num_heads=int(data["num_attention_heads"]),
                num_kv_heads=int(data.get("num_key_value_heads") or data["num_attention_heads"]),
                intermediate_size=int(data["intermediate_size"]),
                vocab_size=int(data["vocab_size"]),
                tie_embeddings=bool(data.get("tie_word_embeddings", False)),
                head_dim=data.get("head_dim"),
                attention_bias=bool(data.get("attention_bias", data.get("model_type") == "qwen2")),
            )
        except KeyError as e:
            raise ValueError(f"Model config for {name!r} lacks the field {e.args[0]!r}.") from None


#: Known architectures (from the models' public config.json files), keyed by lower-case slug.
PRESETS: dict[str, ModelSpec] = {
    # the seed study's escalation teacher (4-bit, or bf16 with device_map="auto")
    "qwen2.5-14b": ModelSpec("Qwen2.5-14B-Instruct", 5120, 48, 40, 8, 13824, 152064, False),
    "qwen2.5-7b": ModelSpec("Qwen2.5-7B-Instruct", 3584, 28, 28, 4, 18944, 152064, False),
    "qwen2.5-3b": ModelSpec("Qwen2.5-3B-Instruct", 2048, 36, 16, 2, 11008, 151936, True),
    "qwen2.5-1.5b": ModelSpec("Qwen2.5-1.5B-Instruct", 1536, 28, 12, 2, 8960, 151936, True),
    "qwen2.5-0.5b": ModelSpec("Qwen2.5-0.5B-Instruct", 896, 24, 14, 2, 4864, 151936, True),
}


def _preset_key(name: str) -> str:
    slug = str(name).rstrip("/").split("/")[-1].lower()
    return slug.removesuffix("-instruct")


def _tiny_spec(name: str, cfg: ExperimentConfig | None) -> ModelSpec:
    """A tiny model's spec: its built config.json if the tiny world exists, else ``cfg.tiny``."""
    from slmkd.config import load_config

    cfg = cfg or load_config("tiny")
    root = cfg.drive_root or os.environ.get("SLMKD_DRIVE_ROOT")
    if root:
        cj = Path(root) / "tiny" / "models" / name / "config.json"
        if cj.is_file():
            return ModelSpec.from_config(cj, name=name)
    t = cfg.tiny
    if name.endswith("teacher"):
        h, layers, heads, kv, inter = (t.teacher_hidden, t.teacher_layers, t.teacher_heads,
                                       t.teacher_kv_heads, t.teacher_intermediate)
        rows = t.bpe_vocab_size + t.student_extra_rows + t.teacher_extra_rows
    else:
        small = name.endswith("-s")
        h = t.student_s_hidden if small else t.student_m_hidden
        layers = t.student_s_layers if small else t.student_m_layers
        heads, kv, inter = t.student_heads, t.student_kv_heads, h * t.student_intermediate_ratio
        rows = t.bpe_vocab_size + t.student_extra_rows
    return ModelSpec(name, h, layers, heads, kv, inter, rows, True)


def model_spec(name_or_path: str | os.PathLike | ModelSpec,
               cfg: ExperimentConfig | None = None) -> ModelSpec:
    """Resolve a model to its :class:`ModelSpec` without the Hub.

    Order: a ModelSpec is returned as is → a local folder/``config.json`` → a Qwen2.5 preset
    (``Qwen/Qwen2.5-3B-Instruct``, ``Qwen2.5-3B``…) → a ``tiny-qwen2-*`` name.
    """
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    name = str(name_or_path)
    p = Path(name).expanduser()
    if (p.is_dir() and (p / "config.json").is_file()) or (p.is_file() and p.suffix == ".json"):
        return ModelSpec.from_config(p, name=p.name if p.is_dir() else p.parent.name)
    key = _preset_key(name)
    if key in PRESETS:
        return PRESETS[key]
    if name.startswith("tiny-qwen2-"):
        return _tiny_spec(name, cfg)
    raise ValueError(
        f"Unknown model {name!r} for the VRAM planner: known presets are "
        f"{sorted(s.name for s in PRESETS.values())}; for another model pass a local folder "
        "holding its config.json."
    )


@dataclass(frozen=True)
class TrainSetup:
    """The knobs that decide the memory of one training step."""

    method: str = "kd"
    batch_size: int = 4
    seq_len: int = 1024
    grad_accum_steps: int = 1
    teacher_4bit: bool = False
    optim: str = "adamw_torch"
    lora: bool = False
    lora_r: int = 16
    gradient_checkpointing: bool = True
    chunk_size: int = 1024
    param_bytes: int = 4  # fp32 master weights (slmkd.trainer's full fine-tuning) or 2 (bf16)
    act_bytes: int = 2
    autocast: bool = True  # bf16 autocast over fp32 weights (Trainer bf16=True)
    padded: bool = True  # a padding mask is present → K/V repeated to all heads in SDPA
    teacher_source: str = "live"  # "cached": KD reads the teacher's top-k from disk
    cache_top_k: int = 64
    cache_temperatures: int = 3  # normalisers stored per token (one per scheduled temperature)
    #: fp32-trained parameters beside LoRA adapters (cascod-2stage stage 2's lm_head copy, V × H)
    extra_trainable_params: int = 0

    def __post_init__(self) -> None:
        if self.method not in KNOWN_METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose from {list(KNOWN_METHODS)}.")
        for f in ("batch_size", "seq_len", "grad_accum_steps", "chunk_size", "cache_top_k",
                  "cache_temperatures"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}.")
        if self.optim not in OPTIMIZER_STATE_BYTES:
            raise ValueError(f"Unknown optimizer {self.optim!r} for the planner; known: "
                             f"{sorted(OPTIMIZER_STATE_BYTES)}.")
        if self.teacher_source not in TEACHER_SOURCES:
            raise ValueError(f"Unknown teacher_source {self.teacher_source!r}; choose from "
                             f"{list(TEACHER_SOURCES)}.")

    @property
    def uses_teacher(self) -> bool:
        """The method distils from a teacher (live or cached)."""
        return self.method in METHODS_WITH_TEACHER

    @property
    def loads_teacher(self) -> bool:
        """The teacher model sits on the GPU during training (live KD)."""
        return self.uses_teacher and self.teacher_source == "live"

    #: student forward rows per example: 1 for every method (a CasCoD pair shares one row:
    #: :class:`slmkd.training.cascod.CasCoDCollator`)
    rows_per_example = 1

    @property
    def loss_rows_per_example(self) -> int:
        """Rows of hidden states the loss reads per example (CasCoD: the shared row twice)."""
        return 2 if self.method in METHODS_WITH_PAIRED_ROWS else 1

    @property
    def cache_bytes_per_token(self) -> int:
        """Bytes of the cached teacher per supervised token."""
        return (self.cache_top_k * CACHE_BYTES_PER_ID
                + self.cache_temperatures * CACHE_BYTES_PER_TEMPERATURE)


@dataclass
class MemoryEstimate:
    """Peak memory of one training step, with its parts (bytes)."""

    student: str
    teacher: str | None
    setup: TrainSetup
    components: dict[str, int]
    peak_allocated: int
    overhead: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """What the card must hold: peak allocated + CUDA context + fragmentation."""
        return self.peak_allocated + self.overhead

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    @property
    def peak_allocated_gib(self) -> float:
        return self.peak_allocated / GIB

    def fits(self, gpu_bytes: float, safety: float = SAFETY_FRACTION) -> bool:
        return self.total <= gpu_bytes * safety

    def to_dict(self) -> dict[str, Any]:
        return {
            "student": self.student,
            "teacher": self.teacher,
            "setup": asdict(self.setup),
            "components_gib": {k: round(v / GIB, 3) for k, v in self.components.items()},
            "peak_allocated_gib": round(self.peak_allocated_gib, 3),
            "overhead_gib": round(self.overhead / GIB, 3),
            "total_gib": round(self.total_gib, 3),
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """A small text table of the breakdown."""
        s = self.setup
        head = (f"{s.method} | student {self.student}"
                + (f" | teacher {self.teacher}"
                   f"{' (4-bit)' if s.teacher_4bit and s.loads_teacher else ''}"
                   if self.teacher else "")
                + f" | batch {s.batch_size} x seq {s.seq_len} | {s.optim}"
                + (f" | LoRA r={s.lora_r}" if s.lora else "")
                + (" | grad-ckpt" if s.gradient_checkpointing else ""))
        lines = [head]
        for k, v in self.components.items():
            if v:
                lines.append(f"  {k:<28}{v / GIB:9.2f} GiB")
        lines.append(f"  {'= peak allocated':<28}{self.peak_allocated_gib:9.2f} GiB")
        lines.append(f"  {'+ CUDA context/fragment.':<28}{self.overhead / GIB:9.2f} GiB")
        lines.append(f"  {'= total on the card':<28}{self.total_gib:9.2f} GiB")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _activation_bytes_per_token_layer(spec: ModelSpec, setup: TrainSetup) -> float:
    """Saved activations of one decoder layer, bytes per token (see the module docstring).

    Under bf16 autocast over fp32 weights the residual stream and the RMSNorms stay fp32
    (``2·(4H + 4H)``) and each Linear saves its own bf16 cast of its input (q, k, v: 3·2H;
    gate, up: 2·2H)."""
    a = setup.act_bytes
    h, q, i = spec.hidden_size, spec.q_dim, spec.intermediate_size
    kv = q if setup.padded else spec.kv_dim
    if setup.autocast and setup.param_bytes == 4:
        norms = 2 * (4 * h + 4 * h) + 5 * a * h
    else:
        norms = 2 * (4 * h + 2 * a * h)
    attn = a * (2 * q + 2 * kv) + 4 * spec.num_heads  # q, k, v, out + fp32 logsumexp per head
    mlp = 4 * a * i
    return norms + attn + mlp


def estimate_memory(
    student: ModelSpec | str,
    teacher: ModelSpec | str | None = None,
    setup: TrainSetup | None = None,
    cfg: ExperimentConfig | None = None,
    **setup_kwargs: Any,
) -> MemoryEstimate:
    """Estimate the peak memory of one optimizer step (bytes, with a breakdown).

    ``setup_kwargs`` override fields of ``setup`` (e.g. ``batch_size=8``). The teacher is only
    counted for methods that use one (``kd``, ``cascod-kd``), and only when it is loaded
    (``teacher_source="live"``); a cached teacher costs its top-k rows instead.
    """
    setup = replace(setup or TrainSetup(), **setup_kwargs)
    st = model_spec(student, cfg)
    te = model_spec(teacher, cfg) if (teacher is not None and setup.loads_teacher) else None
    a, pb = setup.act_bytes, setup.param_bytes
    rows = setup.batch_size * setup.rows_per_example
    tokens = rows * setup.seq_len  # student tokens (CasCoD: rationale + answer rows)
    teacher_tokens = setup.batch_size * setup.seq_len  # kd: all rows; cascod-kd: rationale rows
    v = st.vocab_size
    notes: list[str] = []
    comp: dict[str, int] = {}

    # -- student parameters, gradients, optimizer states --------------------------------------
    comp["student weights"] = st.num_params * pb
    trainable = st.lora_params(setup.lora_r) if setup.lora else st.num_params
    trainable += setup.extra_trainable_params
    if setup.lora:
        comp["student weights"] += trainable * 4  # adapters kept in fp32 by PEFT
    tb = 4 if setup.lora else pb
    mixed = setup.autocast and pb == 4
    # autocast keeps a bf16 copy of every trainable Linear weight (the tied lm_head included)
    # for the whole forward/backward
    comp["autocast weight copies"] = (
        (st.linear_params() + st.vocab_size * st.hidden_size) * a if mixed and not setup.lora
        else 0)
    per_state = OPTIMIZER_STATE_BYTES[setup.optim]
    state_bytes = 2 * tb if per_state is None else per_state
    states = trainable * state_bytes
    if setup.optim in BNB_8BIT_OPTIMIZERS and not setup.lora:
        # the HF Trainer overrides nn.Embedding params to 32-bit states under bitsandbytes
        emb = st.vocab_size * st.hidden_size
        extra = emb * (BNB_EMBEDDING_STATE_BYTES - state_bytes)
        states += extra
        notes.append(f"8-bit AdamW: the embedding ({params_human(emb)} params) keeps 32-bit "
                     f"states (+{extra / GIB:.2f} GiB)")
    comp["optimizer states"] = int(states)
    grads = trainable * tb
    step_temp = trainable * tb if setup.optim in FOREACH_OPTIMIZERS else 0

    # -- activations ---------------------------------------------------------------------------
    per_layer = _activation_bytes_per_token_layer(st, setup)
    if setup.gradient_checkpointing:
        saved = st.num_layers * a * st.hidden_size * tokens
        recompute = per_layer * tokens  # one layer re-run during backward, plus its grads
        recompute += 2 * a * max(st.intermediate_size, st.q_dim) * tokens
        last_layer = recompute
    else:
        saved = st.num_layers * per_layer * tokens
        recompute = 0
        last_layer = per_layer * tokens  # the first layer's activations, freed last
    final_norm = (4 * st.hidden_size + 2 * a * st.hidden_size) * tokens
    mask = rows * setup.seq_len**2 * a if setup.padded else 0
    comp["activations"] = int(saved + final_norm + mask)
    comp["recomputed layer (ckpt)"] = int(recompute)

    # -- the fused, chunked loss ---------------------------------------------------------------
    # slmkd.trainer never materialises the logits: the loss gets the final hidden states
    # [tokens, H] (fp32 under autocast, + their gradient) and the lm_head weight, and computes
    # logits chunk by chunk; one chunk's fp32 working set: logits, (log-)softmax and its
    # gradient, plus the teacher's logits and softmax for KD.
    chunk = min(setup.chunk_size, tokens)
    hb = 4 if mixed else a
    comp["hidden states for the loss"] = (2 * hb * tokens * st.hidden_size
                                          * setup.loss_rows_per_example)
    n_fp32 = 4 if setup.uses_teacher else 3
    comp["loss working set (chunk)"] = n_fp32 * 4 * chunk * v
    # slmkd.losses computes the lm_head weight's gradient [V, H] (in the weight's dtype) during
    # the forward and holds it until backward (CasCoD: one fused call for both terms); a frozen
    # lm_head (LoRA) needs none
    comp["loss lm_head grad buffer"] = ((4 * v * st.hidden_size if setup.extra_trainable_params
                                         else 0) if setup.lora else pb * v * st.hidden_size)
    if setup.loss_rows_per_example > 1:
        notes.append(f"{setup.method}: {rows} rows per micro-batch, each read by the loss twice "
                     f"(rationale and answer terms share the row)")

    # -- teacher -------------------------------------------------------------------------------
    if te is not None:
        if te.vocab_size < v:
            notes.append(f"teacher vocab {te.vocab_size} < student vocab {v}")
        if setup.teacher_4bit:
            w = te.linear_params() * NF4_BYTES_PER_PARAM + (te.num_params - te.linear_params()) * 2
        else:
            w = te.num_params * a  # the teacher is loaded in bf16 (slmkd.modeling.pick_dtype)
        comp["teacher weights"] = int(w)
        comp["teacher hidden states"] = a * teacher_tokens * te.hidden_size
        # transient of the no-grad forward is freed before the student's backward: not counted.
    elif setup.uses_teacher:
        comp["teacher cache (top-k rows)"] = teacher_tokens * setup.cache_bytes_per_token
        notes.append(f"teacher cached: top-{setup.cache_top_k} per token, no teacher on the GPU")

    persistent = comp["student weights"] + comp["optimizer states"] + comp.get("teacher weights", 0)
    grads_resident = grads if setup.grad_accum_steps > 1 else 0
    backward = (comp["activations"] + comp["recomputed layer (ckpt)"]
                + comp["autocast weight copies"]
                + comp["hidden states for the loss"] + comp["loss lm_head grad buffer"]
                + comp["loss working set (chunk)"]
                + comp.get("teacher hidden states", 0) + comp.get("teacher cache (top-k rows)", 0)
                + grads_resident)
    late = grads + last_layer
    step = grads + step_temp
    comp["gradients"] = int(grads)
    comp["optimizer step transient"] = int(step_temp)
    peak = int(persistent + max(backward, late, step))
    overhead = int(CUDA_CONTEXT_BYTES + FRAGMENTATION * peak)
    if not setup.gradient_checkpointing and saved > 0.5 * peak:
        notes.append("activations dominate: gradient checkpointing would cut them ~"
                     f"{per_layer / (a * st.hidden_size):.0f}x")
    teacher_name = te.name if te else None
    if te is None and setup.uses_teacher and teacher is not None:
        teacher_name = f"{model_spec(teacher, cfg).name} (cached top-{setup.cache_top_k})"
    return MemoryEstimate(st.name, teacher_name, setup, comp, peak, overhead, notes)


@dataclass
class Recommendation:
    """A micro-batch × accumulation that keeps the effective batch and fits the card."""

    gpu_gib: float
    batch_size: int
    grad_accum_steps: int
    estimate: MemoryEstimate
    fits: bool
    advice: str = ""

    def line(self) -> str:
        status = "fits" if self.fits else "does NOT fit"
        text = (f"{self.gpu_gib:>4.0f} GB: batch {self.batch_size} x accum {self.grad_accum_steps}"
                f" -> {self.estimate.total_gib:.1f} GiB ({status})")
        return text + (f"; {self.advice}" if self.advice else "")


def recommend_batch(
    student: ModelSpec | str,
    teacher: ModelSpec | str | None,
    setup: TrainSetup,
    effective_batch: int,
    gpu_gib: float,
    cfg: ExperimentConfig | None = None,
    safety: float = SAFETY_FRACTION,
) -> Recommendation:
    """Largest micro-batch dividing ``effective_batch`` whose estimate fits ``gpu_gib`` (GB)."""
    if effective_batch < 1:
        raise ValueError(f"effective_batch must be >= 1, got {effective_batch}.")
    gpu_bytes = gpu_gib * GIB  # an "80 GB" A100 reports 80 GiB, a "40 GB" one 39.4 (safety margin)
    divisors = [d for d in range(effective_batch, 0, -1) if effective_batch % d == 0]
    est = None
    for b in divisors:
        est = estimate_memory(student, teacher, setup, cfg, batch_size=b,
                              grad_accum_steps=effective_batch // b)
        if est.fits(gpu_bytes, safety):
            return Recommendation(gpu_gib, b, effective_batch // b, est, True)
    assert est is not None
    advice = []
    if not setup.gradient_checkpointing:
        advice.append("enable gradient checkpointing")
    if setup.loads_teacher:
        advice.append("train from a cached teacher (kd.teacher_source='cached')")
    if setup.loads_teacher and not setup.teacher_4bit:
        advice.append("load the teacher in 4-bit")
    if setup.optim in FOREACH_OPTIMIZERS:
        advice.append("use optim='adamw_torch_fused' (no step transient)")
    if setup.optim in ("adamw_torch", "adamw_torch_fused", "adamw_hf"):
        advice.append("use optim='adamw_bnb_8bit'")
    if not setup.lora:
        advice.append("use LoRA")
    advice.append(f"or shorten max_seq_length (now {setup.seq_len})")
    return Recommendation(gpu_gib, 1, effective_batch, est, False, "try: " + ", ".join(advice))


def _loss_default_chunk(cfg: ExperimentConfig) -> int:
    """The rows per chunk the loss uses when ``cfg.kd.chunk_size`` is None (Qwen vocabulary)."""
    from slmkd.losses import default_chunk_size

    return default_chunk_size(151_936)


def setup_from_config(cfg: ExperimentConfig, method: str = "kd", **overrides: Any) -> TrainSetup:
    """The :class:`TrainSetup` a config implies (GPU dtypes: bf16 weights and activations)."""
    tr = cfg.train
    values: dict[str, Any] = dict(
        method=method, batch_size=tr.batch_size, seq_len=tr.max_seq_length,
        grad_accum_steps=tr.grad_accum_steps, teacher_4bit=cfg.models.teacher_load_in_4bit,
        optim=tr.optim if tr.optim in OPTIMIZER_STATE_BYTES else "adamw_torch",
        lora=tr.use_lora, lora_r=tr.lora_r, gradient_checkpointing=tr.gradient_checkpointing,
        chunk_size=cfg.kd.chunk_size or _loss_default_chunk(cfg),
        # slmkd.trainer: fp32 student + bf16 autocast; with LoRA the student is loaded in bf16
        param_bytes=2 if tr.use_lora else 4,
        teacher_source=str(getattr(cfg.kd, "teacher_source", "live") or "live"),
        cache_top_k=int(getattr(cfg.kd, "cache_top_k", 64) or 64),
        cache_temperatures=max(1, len(cfg.kd.temperature_schedule)),
    )
    values.update(overrides)
    return TrainSetup(**values)


@dataclass
class VramPlan:
    """The estimate for the configured setting, and recommendations for 40 GB and 80 GB cards."""

    estimate: MemoryEstimate
    recommendations: list[Recommendation]
    effective_batch: int
    gpu_name: str | None = None
    gpu_total_gib: float | None = None

    def summary(self) -> str:
        lines = [self.estimate.table(),
                 f"  recommendations (effective batch {self.effective_batch} kept):"]
        lines += ["    " + r.line() for r in self.recommendations]
        if self.gpu_total_gib is not None:
            ok = self.estimate.fits(self.gpu_total_gib * GIB)
            lines.append(f"  this GPU ({self.gpu_name}): {self.gpu_total_gib:.1f} GiB -> the "
                         f"configured setting {'fits' if ok else 'does NOT fit'}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimate": self.estimate.to_dict(),
            "effective_batch": self.effective_batch,
            "recommendations": [
                {"gpu_gb": r.gpu_gib, "batch_size": r.batch_size,
                 "grad_accum_steps": r.grad_accum_steps,
                 "total_gib": round(r.estimate.total_gib, 2),
                 "fits": r.fits, "advice": r.advice}
                for r in self.recommendations
            ],
            "gpu_name": self.gpu_name,
            "gpu_total_gib": self.gpu_total_gib,
        }


def plan_for_config(
    cfg: ExperimentConfig,
    method: str = "kd",
    student: str | None = None,
    gpu_sizes_gb: tuple[float, ...] = (40, 80),
    gpu: tuple[str, float] | None = None,
    **overrides: Any,
) -> VramPlan:
    """Plan for ``cfg``: the estimate at the configured batch, and per card size a batch × accum.

    Args:
        student: a key (``student_small``) or a model name; default the first of ``cfg.students``.
        gpu: optional ``(name, total_gib)`` of the GPU present, to say whether the setting fits.
        overrides: :class:`TrainSetup` fields to change (``seq_len=2048``…).
    """
    student_name = cfg.student_name(student or cfg.students[0])
    setup = setup_from_config(cfg, method, **overrides)
    teacher = cfg.models.teacher_medium if setup.uses_teacher else None
    est = estimate_memory(student_name, teacher, setup, cfg)
    eff = setup.batch_size * setup.grad_accum_steps
    recs = [recommend_batch(student_name, teacher, setup, eff, g, cfg) for g in gpu_sizes_gb]
    return VramPlan(est, recs, eff, gpu[0] if gpu else None, gpu[1] if gpu else None)


def estimate_vram(cfg: ExperimentConfig, method: str = "kd", student: str | None = None,
                  **kwargs: Any) -> VramPlan:
    """Public name (``slmkd.estimate_vram``) of :func:`plan_for_config`."""
    return plan_for_config(cfg, method=method, student=student, **kwargs)


def params_human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


__all__ = [
    "GIB", "ModelSpec", "PRESETS", "TrainSetup", "TEACHER_SOURCES", "MemoryEstimate",
    "Recommendation", "VramPlan",
    "model_spec", "estimate_memory", "estimate_vram", "recommend_batch", "setup_from_config",
    "plan_for_config",
    "params_human",
]
