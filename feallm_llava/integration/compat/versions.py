"""What is installed: the facts the shims' `needed` predicates decide on."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable


def transformers_version() -> tuple[int, int]:
    from importlib.metadata import version

    major, minor = version("transformers").split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def transformers_at_least(major: int, minor: int) -> Callable[[], bool]:
    """A `needed` predicate: the installed transformers is `major.minor` or newer."""
    def needed() -> bool:
        return transformers_version() >= (major, minor)
    return needed


def flash_attn_available() -> bool:
    if importlib.util.find_spec("flash_attn") is None:
        return False
    import torch

    return torch.cuda.is_available()
