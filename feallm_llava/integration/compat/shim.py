"""What a compat shim is: a named fix for one llava module, and when it is needed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from feallm_llava.integration.marks import wrap


def always() -> bool:
    """For shims that every installed version needs."""
    return True


@dataclass(frozen=True)
class Shim:
    name: str
    module: str  # the llava module it mends
    breaks: str  # what fails without it
    versions: str  # where it is needed
    needed: Callable[[], bool]
    apply: Callable[[ModuleType], None]
    before: bool = False  # run before the module executes (it fails at import)


def shim(module: str, *, versions: str, needed: Callable[[], bool] = always, before: bool = False,
         replaces: str | None = None) -> Callable[[Callable], Shim]:
    """Decorator: the function becomes the Shim named after it.

    Its docstring opens with "Without it: <what fails>." (the table's `breaks`). With
    `replaces="Class.attr"` (or a module attribute) the function is a factory,
    `make(original) -> replacement`, applied once to that attribute of the module;
    without, it is `apply(module)` and does its own work.
    """
    def make(fn: Callable) -> Shim:
        apply = fn if replaces is None else _replacing(replaces, fn.__name__, fn)
        return Shim(fn.__name__, module, _failure(fn), versions, needed, apply, before)
    return make


def _failure(fn: Callable) -> str:
    first = " ".join((fn.__doc__ or "").split("\n\n", 1)[0].split())
    if not first.startswith(_OPENING):
        raise ValueError(f"compat shim {fn.__name__}: its docstring must open with {_OPENING!r} and what fails")
    return first[len(_OPENING):].rstrip(".")


_OPENING = "Without it: "


def _replacing(dotted: str, tag: str, factory: Callable) -> Callable[[ModuleType], None]:
    def apply(module: ModuleType) -> None:
        *path, attr = dotted.split(".")
        owner = module
        for part in path:
            owner = getattr(owner, part)
        wrap(owner, attr, tag, factory)
    return apply
