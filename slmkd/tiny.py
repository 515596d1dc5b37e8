"""The tiny offline world: tokenizer, tiny Qwen2 models and the synthetic arithmetic task.

Everything a stage needs to run without the Hugging Face Hub, built once under
``{drive_root}/tiny/`` and loaded afterwards with ``from_pretrained`` exactly like Hub models::

    tiny/
      data/train.jsonl, data/test.jsonl     GSM8K-format synthetic problems (disjoint splits)
      tokenizer/                            byte-level BPE, ChatML template, digits one per token
      models/tiny-qwen2-teacher/            Qwen2ForCausalLM, pretrained on data/train.jsonl
      models/tiny-qwen2-student-m/          Qwen2ForCausalLM, random init (seeded)
      models/tiny-qwen2-student-s/          Qwen2ForCausalLM, random init (seeded)
      teacher_eval.json                     the teacher's held-out greedy accuracy and build time
      world.json                            written LAST: the completion marker

Embedding rows mirror the real vocabulary mismatch (Qwen2.5: 152,064 teacher rows >
151,936 student rows > 151,665 tokenizer entries): ``teacher_rows > student_rows > len(tokenizer)``.

Teacher pretraining minimises the token-level cross-entropy of the gold completion
(``rationale + "\\nThe answer is N."`` + ``<|im_end|>``) given the chat prompt,

    L = - (1 / |S|) * sum_{t in S} log p_theta(y_t | y_<t),   S = completion token positions,

with AdamW, linear warm-up then cosine decay, gradient clipping; batches are padded to the longest
sequence in the batch (``input_ids``: [B, T]).

Command line: ``python3 -m slmkd.tiny --drive-root DIR [--force]``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmkd.data.arithmetic import ArithmeticSpec, write_splits

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedTokenizerFast

    from slmkd.config import ExperimentConfig, TinyConfig

TEACHER_NAME = "tiny-qwen2-teacher"
STUDENT_M_NAME = "tiny-qwen2-student-m"
STUDENT_S_NAME = "tiny-qwen2-student-s"
MODEL_NAMES = (TEACHER_NAME, STUDENT_M_NAME, STUDENT_S_NAME)

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
DEFAULT_SYSTEM = "You are a helpful assistant."
WORLD_MARKER = "world.json"
WORLD_FORMAT = 1

# Same shape as Qwen2.5's ChatML template: a default system message, `<|im_start|>role\n...<|im_end|>\n`
# per message, and `<|im_start|>assistant\n` as the generation prompt.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyWorld:
    """Paths of a built tiny world and the teacher's held-out accuracy."""

    root: Path
    tokenizer_dir: Path
    models_dir: Path
    train_path: Path
    test_path: Path
    teacher_accuracy: float
    teacher_eval_path: Path

    def model_dir(self, name: str) -> Path:
        return self.models_dir / name


# ---------------------------------------------------------------------------------------------
# prompts (slmkd.data.prompts is the single source of the prompt format)
# ---------------------------------------------------------------------------------------------
def render_chat(user: str, completion: str | None = None) -> str:
    """The text the ChatML template produces (used to feed the BPE trainer before a tokenizer exists)."""
    text = (f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n{IM_START}user\n{user}{IM_END}\n"
            f"{IM_START}assistant\n")
    return text if completion is None else f"{text}{completion}{IM_END}\n"


def tokenizer_corpus(records: Sequence[Any]) -> list[str]:
    """Chat-rendered train examples, cut at the special tokens (which the BPE never merges)."""
    from slmkd.data.prompts import gold_completion, user_message

    splitter = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    texts: list[str] = []
    for rec in records:
        chat = render_chat(user_message(rec), gold_completion(rec))
        texts.extend(piece for piece in splitter.split(chat) if piece)
    return texts


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------
def train_tokenizer(texts: Sequence[str], vocab_size: int,
                    split_words: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen-style special tokens, digits split one per token.

    Special tokens get ids 0..2 (``<|endoftext|>`` pad, ``<|im_start|>``, ``<|im_end|>`` eos);
    ``vocab_size`` counts them and the 256 byte symbols (training stops earlier when no pair is
    left to merge). Pre-tokenisation: ``Digits(individual_digits=True)`` then ``ByteLevel``.
    With ``split_words=False`` (default) merges may cross word boundaries, so the fixed prompt
    texts and the task's recurring phrases become single tokens (a tiny-world prompt + completion is
    ~52 tokens instead of ~125 with word-level merges), which is what lets the tiny students learn
    within the CPU budget; every digit stays its own token either way.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"bpe vocab_size must be >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END], model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of one tiny Qwen2 model."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab_rows: int


def model_specs(tiny: TinyConfig, tokenizer_len: int) -> list[TinyModelSpec]:
    """Teacher and students; rows: teacher > student > tokenizer length (both students equal)."""
    student_rows = tokenizer_len + tiny.student_extra_rows
    teacher_rows = student_rows + tiny.teacher_extra_rows
    if not teacher_rows > student_rows > tokenizer_len:
        raise ValueError("tiny.student_extra_rows and tiny.teacher_extra_rows must be > 0")
    return [
        TinyModelSpec(TEACHER_NAME, tiny.teacher_hidden, tiny.teacher_layers, tiny.teacher_heads,
                      tiny.teacher_kv_heads, tiny.teacher_intermediate, teacher_rows),
        TinyModelSpec(STUDENT_M_NAME, tiny.student_m_hidden, tiny.student_m_layers,
                      tiny.student_heads, tiny.student_kv_heads,
                      tiny.student_m_hidden * tiny.student_intermediate_ratio, student_rows),
        TinyModelSpec(STUDENT_S_NAME, tiny.student_s_hidden, tiny.student_s_layers,
                      tiny.student_heads, tiny.student_kv_heads,
                      tiny.student_s_hidden * tiny.student_intermediate_ratio, student_rows),
    ]


def build_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast, seed: int,
                max_positions: int) -> Any:
    """A randomly initialised ``Qwen2ForCausalLM`` (seeded, tied embeddings, fp32)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if spec.hidden % spec.heads or spec.heads % spec.kv_heads:
        raise ValueError(f"{spec.name}: hidden % heads and heads % kv_heads must be 0")
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    pad = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = Qwen2Config(
        vocab_size=spec.vocab_rows, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, max_position_embeddings=max_positions,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=pad, eos_token_id=eos,
        pad_token_id=pad, torch_dtype="float32", use_cache=True,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad, do_sample=False,
    )
    return model


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# teacher pretraining and greedy evaluation
# ---------------------------------------------------------------------------------------------


def extract_final_number(text: str) -> str | None:
    """The normalised number after the last ``The answer is`` in ``text``: the evaluator's strict
    GSM8K extraction, so the teacher is scored exactly like every student."""
    from slmkd.scoring import extract_gsm8k

    return extract_gsm8k(text)[0]


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless shuffled index batches (each epoch a fresh permutation; last partial batch kept)."""
    import torch

    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for i in range(0, n, batch_size):
            yield order[i:i + batch_size]


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (input_ids, labels) pairs to the batch's longest: three [B, T] tensors."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(labs)] = torch.tensor(labs)
        attention[i, :len(ids)] = 1
    return input_ids, labels, attention


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine down to ``floor``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def pretrain_teacher(model: Any, tokenizer: Any, records: Sequence[Any], tiny: TinyConfig,
                     progress: bool = True) -> dict[str, Any]:
    """Train ``model`` in place on gold completions (CE on completion tokens + EOS).

    Returns ``{"steps", "losses" (per-step mean CE), "train_seconds", "dropped"}``.
    """
    import torch
    from tqdm.auto import tqdm

    from slmkd.data.prompts import build_prompt, gold_completion, tokenize_example

    examples: list[tuple[list[int], list[int]]] = []
    dropped = 0
    for rec in records:
        ex = tokenize_example(tokenizer, build_prompt(tokenizer, rec), gold_completion(rec),
                              tiny.max_seq_length, 1)
        if ex:
            examples.append((ex.input_ids, ex.labels))
        else:
            dropped += 1
    if not examples:
        raise ValueError("no usable teacher-pretraining examples (raise tiny.max_seq_length)")
    steps = tiny.teacher_pretrain_steps
    warmup = max(1, int(tiny.teacher_warmup_ratio * steps))
    optimizer = torch.optim.AdamW(model.parameters(), lr=tiny.teacher_learning_rate,
                                  betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, steps, warmup))
    generator = torch.Generator().manual_seed(tiny.seed)
    batches = _batches(len(examples), tiny.teacher_batch_size, generator)
    pad_id = tokenizer.pad_token_id
    losses: list[float] = []
    model.train()
    start = time.time()
    bar = tqdm(range(steps), desc="tiny teacher pretraining", disable=not progress)
    for _ in bar:
        input_ids, labels, attention = collate([examples[i] for i in next(batches)], pad_id)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if len(losses) % 20 == 0:
            bar.set_postfix(ce=f"{sum(losses[-20:]) / 20:.3f}")
    model.eval()
    return {"steps": steps, "losses": losses, "train_seconds": time.time() - start,
            "dropped": dropped}


def greedy_accuracy(model: Any, tokenizer: Any, records: Sequence[Any], batch_size: int = 256,
                    max_new_tokens: int = 48, progress: bool = False
                    ) -> tuple[float, list[str]]:
    """Greedy-decode every record's prompt; accuracy of ``The answer is N`` against the gold.

    Returns (accuracy in [0, 1], decoded completions in record order).
    """
    import torch
    from tqdm.auto import tqdm

    from slmkd.data.prompts import build_prompt

    if not records:
        raise ValueError("no records to evaluate")
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    eos_ids = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.pad_token_id]
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in tqdm(range(0, len(records), batch_size), desc="tiny greedy eval",
                          disable=not progress):
                chunk = records[i:i + batch_size]
                enc = tokenizer([build_prompt(tokenizer, r) for r in chunk], return_tensors="pt",
                                padding=True, add_special_tokens=False)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids)
                outputs.extend(tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                      skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    correct = sum(extract_final_number(o) == r.answer for o, r in zip(outputs, records))
    return correct / len(records), outputs


# ---------------------------------------------------------------------------------------------
# the world: build once, cached, locked, completion marker last
# ---------------------------------------------------------------------------------------------
def tiny_fingerprint(tiny: TinyConfig) -> str:
    """Hash of every TinyConfig field: a world built with other settings is rebuilt."""
    payload = json.dumps({"format": WORLD_FORMAT, **asdict(tiny)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tiny_root(cfg: ExperimentConfig) -> Path:
    from slmkd.runtime import get_drive_root

    return get_drive_root(cfg) / "tiny"


def _world_from_marker(root: Path, marker: dict[str, Any]) -> TinyWorld:
    return TinyWorld(
        root=root, tokenizer_dir=root / "tokenizer", models_dir=root / "models",
        train_path=root / "data" / "train.jsonl", test_path=root / "data" / "test.jsonl",
        teacher_accuracy=float(marker["teacher_accuracy"]),
        teacher_eval_path=root / "teacher_eval.json",
    )


def load_tiny_world(root: str | os.PathLike[str], fingerprint: str | None = None
                    ) -> TinyWorld | None:
    """The world under ``root`` if it is complete (and built with ``fingerprint``), else None."""
    root = Path(root)
    try:
        marker = json.loads((root / WORLD_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if fingerprint is not None and marker.get("fingerprint") != fingerprint:
        return None
    world = _world_from_marker(root, marker)
    needed = [world.train_path, world.test_path, world.tokenizer_dir / "tokenizer.json",
              world.teacher_eval_path]
    needed += [world.model_dir(n) / "config.json" for n in MODEL_NAMES]
    return world if all(p.exists() for p in needed) else None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (blocks while another process builds the same world)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _save_model_dir(model: Any, tokenizer: Any, final: Path) -> None:
    """save_pretrained into a temp folder, then rename it into place (atomic on one filesystem)."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_tiny_world(root: str | os.PathLike[str], tiny: TinyConfig, progress: bool = True
                     ) -> TinyWorld:
    """Build every part of the world under ``root`` (no cache check; see ensure_tiny_world)."""
    from transformers import PreTrainedTokenizerFast

    from slmkd.data.gsm8k import load_gsm8k
    from slmkd.fileio import atomic_write_json

    root = Path(root)
    fingerprint = tiny_fingerprint(tiny)
    (root / WORLD_MARKER).unlink(missing_ok=True)
    t0 = time.time()
    spec = ArithmeticSpec(min_start=tiny.min_start, max_start=tiny.max_start,
                          max_operand=tiny.max_operand)
    train_path, test_path = write_splits(root / "data", tiny.num_train, tiny.num_test, tiny.seed,
                                         spec)
    train = load_gsm8k("train", train_path)
    test = load_gsm8k("test", test_path)
    if train.skipped or test.skipped:
        raise RuntimeError(f"generated data failed to load: {train.skipped[:3] + test.skipped[:3]}")

    tok_dir = root / "tokenizer"
    tokenizer = train_tokenizer(tokenizer_corpus(train.records), tiny.bpe_vocab_size)
    tmp = tok_dir.with_name("tokenizer.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(tok_dir, ignore_errors=True)
    os.replace(tmp, tok_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)

    models_dir = root / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    specs = model_specs(tiny, len(tokenizer))
    params: dict[str, int] = {}
    teacher = None
    for i, spec_i in enumerate(specs):
        model = build_model(spec_i, tokenizer, tiny.seed + i, tiny.max_position_embeddings)
        params[spec_i.name] = count_params(model)
        if spec_i.name == TEACHER_NAME:
            teacher = model
        else:
            _save_model_dir(model, tokenizer, models_dir / spec_i.name)
    assert teacher is not None
    with _torch_threads(tiny.num_threads):
        stats = pretrain_teacher(teacher, tokenizer, train.records, tiny, progress)
        _save_model_dir(teacher, tokenizer, models_dir / TEACHER_NAME)
        # evaluate what every later stage loads: the saved model through slmkd's loaders
        from transformers import AutoModelForCausalLM

        from slmkd.modeling import load_tokenizer

        t_eval = time.time()
        saved = AutoModelForCausalLM.from_pretrained(models_dir / TEACHER_NAME)
        accuracy, outputs = greedy_accuracy(saved, load_tokenizer(str(models_dir / TEACHER_NAME)),
                                            test.records, tiny.eval_batch_size, tiny.max_new_tokens)
        eval_seconds = time.time() - t_eval
    losses = stats["losses"]
    report = {
        "accuracy": accuracy, "n": len(test.records), "correct": round(accuracy * len(test.records)),
        "train_seconds": round(stats["train_seconds"], 1), "eval_seconds": round(eval_seconds, 1),
        "total_seconds": round(time.time() - t0, 1), "steps": stats["steps"],
        "batch_size": tiny.teacher_batch_size, "learning_rate": tiny.teacher_learning_rate,
        "first_loss": losses[0], "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "dropped_examples": stats["dropped"], "params": params, "tokenizer_len": len(tokenizer),
        "embedding_rows": {s.name: s.vocab_rows for s in specs},
        "sample_outputs": outputs[:3], "fingerprint": fingerprint,
    }
    atomic_write_json(root / "teacher_eval.json", report)
    marker = {"format": WORLD_FORMAT, "fingerprint": fingerprint, "teacher_accuracy": accuracy,
              "built_seconds": report["total_seconds"], "tiny": asdict(tiny)}
    atomic_write_json(root / WORLD_MARKER, marker)  # completion marker: written last
    print(f"tiny world built in {report['total_seconds']:.0f}s at {root}: teacher held-out "
          f"accuracy {accuracy:.1%} ({report['correct']}/{report['n']}, greedy), "
          f"pretraining {report['train_seconds']:.0f}s")
    return _world_from_marker(root, marker)


def ensure_tiny_world(cfg: ExperimentConfig, force: bool = False, progress: bool = True
                      ) -> TinyWorld:
    """The tiny world of ``cfg`` under ``{drive_root}/tiny/``, built once and cached.

    Idempotent: a complete world (``world.json`` written last, same TinyConfig fingerprint) is
    returned at once; a missing, partial or differently configured one is rebuilt under a file lock,
    so concurrent callers wait for one build instead of racing.
    """
    root = tiny_root(cfg)
    fingerprint = tiny_fingerprint(cfg.tiny)
    if not force:
        world = load_tiny_world(root, fingerprint)
        if world is not None:
            return world
    with _file_lock(root / ".build.lock"):
        if not force:
            world = load_tiny_world(root, fingerprint)
            if world is not None:
                return world
        if (root / WORLD_MARKER).exists():
            logger.warning("tiny world at %s was built with other settings; rebuilding", root)
        return build_tiny_world(root, cfg.tiny, progress)
