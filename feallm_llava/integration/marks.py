"""The one marker scheme of everything the integration wraps in llava (and transformers).

Hooks and shims replace functions, methods and classes of modules they do not own, and
must apply once however often they are armed (every `register()`, every re-import).
`mark(wrapper, original, tag)` records on the wrapper what it wraps and which hook made
it; `is_marked(obj, tag)` walks the chain of wrappers stacked on a name, in any order.
Tags are the hook's or shim's name: `train()` carries two shims, `_save_checkpoint` a
shim and a registry hook. `functools.wraps` copies the inner wrapper's marks onto the
outer one; `mark` overwrites them, so the chain stays true.
"""

from __future__ import annotations

import functools

_ORIGINAL = "__feallm_wraps__"
_TAG = "__feallm_tag__"


def mark(wrapper, original, tag: str):
    """Record that `wrapper` (made by hook `tag`) stands in for `original`; return it."""
    setattr(wrapper, _ORIGINAL, original)
    setattr(wrapper, _TAG, tag)
    return wrapper


def is_marked(obj, tag: str) -> bool:
    """Whether hook `tag` made `obj` or one of the wrappers stacked under it."""
    seen = set()
    while _TAG in _own_attrs(obj) and id(obj) not in seen:
        if getattr(obj, _TAG) == tag:
            return True
        seen.add(id(obj))
        obj = getattr(obj, _ORIGINAL)
    return False


def original_of(obj):
    """What `obj` wraps (itself when it is not a wrapper)."""
    return getattr(obj, _ORIGINAL) if _TAG in _own_attrs(obj) else obj


def _own_attrs(obj) -> dict:
    """The object's own attributes: a subclass of a marked class is not itself marked."""
    try:
        return vars(obj)
    except TypeError:  # objects without __dict__ carry no marks
        return {}


def wrap(owner, name: str, tag: str, make) -> None:
    """Replace `owner.<name>` by `make(original)`, once: hook `tag` marks what it made.

    A function's wrapper takes the original's name, docstring and signature
    (`functools.update_wrapper`); a class stands in for a class as it is.
    """
    original = getattr(owner, name)
    if is_marked(original, tag):
        return
    wrapper = make(original)
    if not isinstance(original, type):
        functools.update_wrapper(wrapper, original)
    setattr(owner, name, mark(wrapper, original, tag))
