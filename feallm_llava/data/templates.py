"""Question templates of the three instruction types, kept as package data (`resources/templates/`).

Paper section 3.2: each instruction type has "more than ten question templates"; the
paper's examples are "Please describe the expression in this face." (emotion summary)
and "Please describe the action units in this face." (facial movement description).
FEABench samples its FER and AUD prompts from the summary and movement lists (section
3.3).

File format, one file per type (`summary.json`, `movement.json`, `reasoning.json`):
    {"type": "<type>", "description": "...", "questions": ["...", ...]}
Questions carry no `<image>` token: the builder adds it to the first human turn.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from functools import lru_cache
from pathlib import Path

from feallm_llava.data.records import INSTRUCTION_TYPES
from feallm_llava.resources import resource_path

# The paper: "more than ten" per type.
MIN_QUESTIONS = 12


def templates_dir() -> Path:
    """The packaged templates; FEALLM_TEMPLATES names a folder of your own instead."""
    return Path(os.environ.get("FEALLM_TEMPLATES") or resource_path("templates"))


def _load_file(path: Path, kind: str) -> tuple[str, ...]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: question templates for {kind!r} not found; a templates "
                                f"folder holds {kind}.json (see FEALLM_TEMPLATES)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict) or data.get("type") != kind:
        raise ValueError(f"{path}: expected an object with \"type\": \"{kind}\"")
    questions = data.get("questions")
    if not isinstance(questions, list):
        raise ValueError(f"{path}: \"questions\" must be a list of strings")
    seen: set[str] = set()
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{path}: question {i} is not a non-empty string: {q!r}")
        if "<image>" in q:
            raise ValueError(f"{path}: question {i} contains <image>; the builder adds it")
        if q.strip().lower() in seen:
            raise ValueError(f"{path}: question {i} is a duplicate: {q!r}")
        seen.add(q.strip().lower())
    if len(questions) < MIN_QUESTIONS:
        raise ValueError(f"{path}: {len(questions)} questions; each type needs at least "
                         f"{MIN_QUESTIONS}")
    return tuple(q.strip() for q in questions)


@lru_cache(maxsize=8)
def _load_all(directory: str) -> dict[str, tuple[str, ...]]:
    return {kind: _load_file(Path(directory) / f"{kind}.json", kind) for kind in INSTRUCTION_TYPES}


def load_templates(directory: Path | str | None = None) -> dict[str, tuple[str, ...]]:
    """{type: questions} for summary, movement and reasoning, validated."""
    return dict(_load_all(str(Path(directory) if directory else templates_dir())))


def pick_question(kind: str, key: str, seed: int, *,
                  templates: dict[str, tuple[str, ...]] | None = None) -> str:
    """The question of type `kind` for sample `key`: deterministic in (seed, key, kind).

    Seeded per sample rather than from one running RNG, so a sample's question does not
    change when other samples are added, dropped or processed in another order.
    """
    questions = (templates or load_templates())[kind]
    digest = hashlib.sha256(f"{seed}|{key}|{kind}".encode()).digest()
    return questions[random.Random(digest).randrange(len(questions))]
