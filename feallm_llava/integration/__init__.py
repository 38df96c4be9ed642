"""The llava integration: the one place that knows upstream LLaVA's insides.

- `registry`: `feallm` in llava's builders, train flags, dataset checks, LoRA targets,
  resumable checkpoints.
- `compat`: named shims for upstream on the pinned stack (training, loading, serving).
- `tower`: FEALLM's vision tower as llava's `CLIPVisionTower` subclass.
- `assemble`: an upstream LLaVA model built as llava's train script builds it.
- `marks`: the marker scheme of every wrapper; `paths`: missing model paths named.

`register()` arms the registry and the shims; `import feallm_llava` calls it (lazily,
when llava is imported).
"""

from __future__ import annotations


def register() -> None:
    """Hook `feallm` into llava's builders and arm the compat shims. Idempotent."""
    from feallm_llava.integration.registry import register as arm

    arm()
