"""Post-import hooks: run a callback right before or after a named module executes.

Upstream entry points (`python -m llava.serve.model_worker ...`) never import this
package, yet they must see the `feallm` projector and the compatibility shims. The
installed `feallm_llava_autoload.pth` imports the package at interpreter start-up, which
only puts a finder on `sys.meta_path` (no torch, no transformers, no llava import); the
real work happens when llava itself is imported. `FEALLM_LLAVA_AUTOLOAD=0` turns that
off; an explicit `feallm_llava.register()` still works.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading
from collections.abc import Callable
from types import ModuleType

Callback = Callable[[ModuleType], None]

ENV_SWITCH = "FEALLM_LLAVA_AUTOLOAD"

_lock = threading.RLock()
_before: dict[str, list[Callback]] = {}
_after: dict[str, list[Callback]] = {}


class _HookedLoader(importlib.abc.Loader):
    """Wraps the real loader of a watched module and runs the callbacks around it."""

    def __init__(self, loader: importlib.abc.Loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        for callback in list(_before.get(self._name, ())):
            callback(module)
        self._loader.exec_module(module)
        for callback in list(_after.get(self._name, ())):
            callback(module)

    def __getattr__(self, item):  # get_source, get_code, is_package ... for tracebacks/runpy
        return getattr(self._loader, item)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the other finders, then wraps the loader it gets."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _before and fullname not in _after:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _HookedLoader):
                    spec.loader = _HookedLoader(spec.loader, fullname)
                return spec
        return None


_finder = _PostImportFinder()


def _install_finder() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def before_import(name: str, callback: Callback) -> None:
    """Run `callback(module)` before `name` executes (ignored if it is already imported)."""
    with _lock:
        _install_finder()
        if name not in sys.modules:
            _before.setdefault(name, []).append(callback)


def after_import(name: str, callback: Callback) -> None:
    """Run `callback(module)` once `name` has executed; at once if it already has."""
    with _lock:
        _install_finder()
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__spec__", None) is not None and not _initialising(module):
            callback(module)
        else:
            _after.setdefault(name, []).append(callback)


def _initialising(module: ModuleType) -> bool:
    spec = module.__spec__
    return bool(getattr(spec, "_initializing", False))


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in {"0", "false", "no", "off"}

