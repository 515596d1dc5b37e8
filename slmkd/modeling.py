"""Model names, slugs and loading (the same ``from_pretrained`` path for Hub, local and tiny models)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from slmkd.config import ExperimentConfig

from slmkd.layout import model_slug

logger = logging.getLogger(__name__)

__all__ = ["ADAPTER_CONFIG", "TINY_PREFIX", "adapter_base_path", "is_adapter_dir", "is_peft_model",
           "is_tiny_name", "load_causal_lm", "load_tokenizer", "model_slug", "resolve_model_path"]

TINY_PREFIX = "tiny-qwen2-"
#: the file that makes a folder a peft adapter (e.g. ``stage2/adapter`` of ``cascod-2stage``)
ADAPTER_CONFIG = "adapter_config.json"


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


def is_adapter_dir(path: str | Path) -> bool:
    """True when ``path`` is a local peft adapter folder (it holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_peft_model(model: Any) -> bool:
    """True for a peft ``PeftModel`` (has adapters that :meth:`disable_adapter` can switch off)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def adapter_base_path(adapter_dir: str | Path) -> str:
    """The base model of a local adapter folder: ``base_model_name_or_path`` of its
    ``adapter_config.json``. A relative value is read relative to the adapter folder first (this
    project writes e.g. ``../../stage1/final``, so a run folder moved as a whole still loads);
    a value that is no folder there is returned as written (a Hub name or an absolute path)."""
    import json

    cfg_file = Path(adapter_dir) / ADAPTER_CONFIG
    base = json.loads(cfg_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{cfg_file} names no base_model_name_or_path")
    if not Path(base).is_absolute():
        local = Path(adapter_dir) / base
        if local.is_dir():
            return str(local.resolve())
    return str(base)


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
    if is_adapter_dir(path) and not any((Path(path) / f).is_file()
                                        for f in ("tokenizer.json", "tokenizer_config.json")):
        path = adapter_base_path(path)  # an adapter saved without its tokenizer: the base's
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

    A local adapter folder (``adapter_config.json``, e.g. ``cascod-2stage``'s ``stage2/adapter``)
    loads its base (:func:`adapter_base_path`) exactly as a plain model, then the adapter on top
    (``peft.PeftModel.from_pretrained``; trainable only with ``for_training``). The result is a
    ``PeftModel``: ``with model.disable_adapter():`` runs the base weights alone.
    """
    path = resolve_model_path(name, cfg)
    if is_adapter_dir(path):
        try:
            from peft import PeftModel
        except ImportError:
            raise RuntimeError(f"{path} is a peft adapter: pip install peft") from None
        base = load_causal_lm(adapter_base_path(path), cfg, role=role, for_training=for_training,
                              device=device, dtype=dtype)
        model = PeftModel.from_pretrained(base, path, is_trainable=bool(for_training)
                                          and role != "teacher")
        model.to(next(base.parameters()).device)
        if role == "teacher" or not for_training:
            model.eval()
            model.requires_grad_(False)
        return model
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
        if device.type not in ("cuda", "cpu"):
            raise RuntimeError(f"teacher_load_in_4bit needs a CUDA GPU or the CPU (bitsandbytes), "
                               f"not {device.type}; turn it off.")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
        # CPU: bitsandbytes >= 0.46.1 has a CPU backend (tests/test_bnb_cpu.py)
        kwargs["device_map"] = {"": "cpu"} if device.type == "cpu" else {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not quantized:
        model.to(device)
    if role == "teacher" or not for_training:
        model.eval()
        model.requires_grad_(False)
    return model
