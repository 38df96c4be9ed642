"""Checks on LLaVA conversation JSON samples, before upstream's collator meets them.

Upstream's `LazySupervisedDataset` opens images and asserts on conversations only when a
batch is drawn, and a bad sample crashes the run deep in the collator, hours in. These
checks run once over the whole file and name the sample (index and `id`) and the cause.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

IMAGE_TOKEN = "<image>"  # llava.constants.DEFAULT_IMAGE_TOKEN


@dataclass(frozen=True)
class BadSample:
    index: int
    sample_id: str
    reason: str

    def __str__(self) -> str:
        return f"sample #{self.index} (id {self.sample_id!r}): {self.reason}"


def check_sample(index: int, sample, image_folder: str | None) -> BadSample | None:
    """Why `sample` cannot be trained on, or None when it looks right."""
    sid = str(sample.get("id", index)) if isinstance(sample, dict) else str(index)

    def bad(reason: str) -> BadSample:
        return BadSample(index, sid, reason)

    if not isinstance(sample, dict):
        return bad(f"expected an object, got {type(sample).__name__}")
    convs = sample.get("conversations")
    if not isinstance(convs, list) or len(convs) < 2:
        return bad("'conversations' must be a list of at least one human and one gpt turn")
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in {"human", "gpt"}:
            return bad(f"conversations[{j}] must be {{'from': 'human'|'gpt', 'value': str}}")
    n_tokens = sum(turn["value"].count(IMAGE_TOKEN) for turn in convs)
    if "image" in sample:
        if n_tokens != 1 or IMAGE_TOKEN not in convs[0]["value"]:
            return bad(f"has an image but {n_tokens} '{IMAGE_TOKEN}' tokens; the first human turn needs exactly one")
        path = os.path.join(image_folder or "", sample["image"])
        if not os.path.isfile(path):
            return bad(f"image file not found: {path}")
    elif n_tokens:
        return bad(f"has '{IMAGE_TOKEN}' in its text but no 'image' field")
    return None


def check_samples(samples: list, image_folder: str | None) -> list[BadSample]:
    return [b for i, s in enumerate(samples) if (b := check_sample(i, s, image_folder)) is not None]
