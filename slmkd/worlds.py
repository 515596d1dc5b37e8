"""Local stand-ins for the Hugging Face Hub, by profile: how ``data`` and ``modeling`` find the
tiny world's files without importing the tiny world.

A *world provider* is registered per profile (the package's ``__init__`` registers the tiny one,
so it is in place whenever any ``slmkd`` module is imported); :func:`world_for` calls it with the
config and returns an object with at least ``models_dir`` (models at ``models_dir/<name>``),
``train_path`` and ``test_path`` (GSM8K-format JSONL). Providers build their world on first use
and cache it, so the lookup is cheap after that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["World", "register_world", "registered_worlds", "world_for"]


class World(Protocol):
    models_dir: Any
    train_path: Any
    test_path: Any


_PROVIDERS: dict[str, Callable[[Any], World]] = {}


def register_world(profile: str, provider: Callable[[Any], World]) -> None:
    """Register (or replace) the world provider of ``profile``."""
    _PROVIDERS[profile] = provider


def registered_worlds() -> list[str]:
    return sorted(_PROVIDERS)


def world_for(cfg: Any, kind: str | None = None) -> World:
    """The world ``kind`` (default: the config's profile; ``"tiny"`` for tiny configs) built with
    ``cfg`` (on first use). Raises ``LookupError`` when there is no such world (the real profiles
    load from the Hub or local paths instead)."""
    key = kind or ("tiny" if getattr(cfg, "is_tiny", False) else str(getattr(cfg, "profile", "")))
    if key not in _PROVIDERS:
        raise LookupError(f"{key!r} has no local world (registered: "
                          f"{registered_worlds()}); give model names/paths and data paths instead.")
    return _PROVIDERS[key](cfg)
