"""Model names, slugs and loading (the same ``from_pretrained`` path for Hub, local and tiny models)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from slmkd.config import ExperimentConfig

from slmkd.layout import model_slug

logger = logging.getLogger(__name__)

__all__ = ["TINY_PREFIX", "is_tiny_name", "load_causal_lm", "load_tokenizer", "model_slug",
           "resolve_model_path"]

TINY_PREFIX = "tiny-qwen2-"


def is_tiny_name(name: str) -> bool:
    return str(name).startswith(TINY_PREFIX)


def resolve_model_path(name: str, cfg: ExperimentConfig | None = None) -> str:
    """Hub names and paths are returned unchanged; tiny names are looked up in the tiny profile's
    world (:func:`slmkd.worlds.world_for`: built once, cached) and return that model's folder."""
    if not is_tiny_name(name):
        return str(name)
    from slmkd.config import load_config

    if cfg is None:
        cfg = load_config("tiny")
    from slmkd.worlds import world_for

    world = world_for(cfg, "tiny")
    path = Path(world.models_dir) / name
    if not path.is_dir():
        raise FileNotFoundError(f"Tiny model {name!r} is not part of the tiny world at {path}.")
    return str(path)


_GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def _declared_tokenizer_class(path: str) -> str | None:
    import json

    f = Path(path) / "tokenizer_config.json"
    if not f.is_file():
        return None
    return json.loads(f.read_text(encoding="utf-8")).get("tokenizer_class")


def load_tokenizer(name: str, cfg: ExperimentConfig | None = None, padding_side: str = "right"):
    """Load the tokenizer of a model; a pad token is guaranteed (eos when the model has none).

    A local folder whose ``tokenizer_config.json`` declares the generic fast class is loaded with
    that class, so its ``tokenizer.json`` is used exactly as saved: transformers 5's AutoTokenizer
    otherwise picks the class registered for the model type (``Qwen2Tokenizer`` for the tiny
    Qwen2 models), which rebuilds the pre-tokenizer and silently changes the tokenisation."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = resolve_model_path(name, cfg)
    if (_declared_tokenizer_class(path) in _GENERIC_TOKENIZER_CLASSES
            and (Path(path) / "tokenizer.json").is_file()):
        tok = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        tok = AutoTokenizer.from_pretrained(
            path, trust_remote_code=bool(cfg and cfg.models.trust_remote_code))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_causal_lm(
    name: str,
    cfg: ExperimentConfig | None = None,
    *,
    role: str = "student",
    for_training: bool = False,
    device: Any = None,
    dtype: Any = None,
):
    """Load a causal LM for ``role`` in {"student", "teacher"}.

    Teachers are put in eval mode with gradients disabled; with
    ``cfg.models.teacher_load_in_4bit`` they are loaded in 4-bit NF4 through bitsandbytes
    (GPU only). Dtype defaults to :func:`slmkd.runtime.pick_dtype`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from slmkd.runtime import pick_device, pick_dtype

    device = torch.device(device) if device is not None else pick_device()
    dtype = dtype or pick_dtype(device)
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if cfg is not None and cfg.models.trust_remote_code:
        kwargs["trust_remote_code"] = True
    quantized = role == "teacher" and cfg is not None and cfg.models.teacher_load_in_4bit
    if quantized:
        if device.type != "cuda":
            raise RuntimeError("teacher_load_in_4bit needs a CUDA GPU (bitsandbytes); turn it off on CPU.")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name, cfg), **kwargs)
    if not quantized:
        model.to(device)
    if role == "teacher" or not for_training:
        model.eval()
        model.requires_grad_(False)
    return model
