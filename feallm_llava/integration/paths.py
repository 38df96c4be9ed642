"""Model paths given to llava: a missing local directory is named, never fetched.

Upstream passes every path to transformers' `from_pretrained`, which takes a path that
does not exist for a model-hub id and fails (or downloads) far from the typo.
"""

from __future__ import annotations

import os


def looks_local(path: str) -> bool:
    """A hub id is `name` or `org/name`; an absolute, ./, ~ or deeper path is local."""
    if os.path.isabs(path) or path.startswith((".", "~")):
        return True
    return len([p for p in path.split("/") if p]) > 2 or path.endswith("/")


def check_model_path(path: str | None, what: str) -> None:
    """Refuse a missing local model path before transformers turns it into a hub request."""
    if path is None or os.path.exists(path):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in {"0", ""}
    if looks_local(path) or offline:
        raise FileNotFoundError(
            f"{what}: no such model directory: {path!r}"
            + (" (HF_HUB_OFFLINE is set, so hub ids are not fetched either)" if offline else "")
            + ". Check the path. A trained checkpoint is the OUTPUT_DIR of launch/pretrain.sh or "
              "launch/finetune_lora.sh; `bash launch/demo.sh` trains a tiny one offline "
              "(runs/demo/train/llava-tiny-feallm-lora, base runs/demo/llm)."
        )
