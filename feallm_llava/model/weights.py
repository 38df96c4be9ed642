"""Reading and writing the weight files upstream LLaVA's training produces.

Upstream writes pickled `mm_projector.bin` / `non_lora_trainables.bin`. Loading a pickle
can run code, so everything here loads with `torch.load(weights_only=True)` or from
`.safetensors`, and every `.bin` we see written gets a `.safetensors` twin beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

PROJECTOR_FILE = "mm_projector"
NON_LORA_FILE = "non_lora_trainables"


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write `state` as safetensors (tensors made contiguous, on CPU, unshared)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)  # a crash mid-write never leaves a torn file under the real name
    return path


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a weight file without unpickling code: `.safetensors`, or `.bin` weights-only."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    twin = path.with_suffix(".safetensors")
    if twin.exists():
        from safetensors.torch import load_file

        return load_file(str(twin))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no weight file {path}") from None
    except Exception as err:  # pickle.UnpicklingError and friends: say which file
        raise ValueError(f"{path}: not a plain tensor file ({err}); refusing to unpickle it") from err

