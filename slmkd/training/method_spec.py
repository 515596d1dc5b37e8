"""What a training method is: :class:`MethodSpec` (see :mod:`slmkd.training.methods` for how
methods are registered and what each callable receives)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Items", "MethodSpec"]

#: Token counts that normalise a loss: name -> 0-d int tensor (summed over the step).
Items = dict[str, Any]


@dataclass
class MethodSpec:
    """A training method (see the module docstring)."""

    name: str
    needs_teacher: bool
    build_datasets: Callable[..., tuple[Any, Any]] | None = None
    compute_loss: Callable[..., tuple[Any, dict[str, Any]]] | None = None
    make_collator: Callable[[Any, Any], Callable] | None = None
    count_items: Callable[[dict[str, Any]], Items] | None = None
    stages: tuple[str, ...] = ()
    config_sections: tuple[str, ...] = ("models", "data", "train", "kd", "generation", "tiny")
    description: str = ""
