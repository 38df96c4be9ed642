"""FEALLM as a plugin for upstream LLaVA (`llava-torch`).

`import feallm_llava` registers the `feallm` vision tower and projector type with
llava's builders and arms the compatibility shims; both happen lazily, when llava
itself is imported, so this import stays cheap (no torch). With
`FEALLM_LLAVA_AUTOLOAD=0` nothing happens until `feallm_llava.register()` is called.
"""

__version__ = "0.1.0"


def register() -> None:
    """Hook `feallm` into llava's builders and arm the compat shims. Idempotent."""
    from feallm_llava import registry

    registry.register()


def _autoregister() -> None:
    from feallm_llava import autoload

    if autoload.enabled():
        register()


_autoregister()
