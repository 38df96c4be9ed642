"""Which conversation template a checkpoint was trained with, recorded in its config.json.

Upstream picks the template of a checkpoint from its folder name ("v1" in the name:
`llava_v1`, else `llava_v0`, ...), so a checkpoint trained with `--version v1` in a
folder named `llava-tiny-feallm-lora` is prompted with `llava_v0` and answers wrongly,
without an error. At training time the registry records the template the data were
formatted with as `feallm_conv_template`; every runner of ours, and upstream's CLI,
worker and eval scripts through compat shims, prompt with it unless `--conv-mode` says
otherwise. Checkpoints without the field keep upstream's folder-name rule.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

CONFIG_KEY = "feallm_conv_template"


def trained_template(version: str) -> str:
    """The template upstream's train() formats `--version` data with (its own fallback:
    vicuna_v1 for a version it does not know)."""
    from llava.conversation import conv_templates

    return version if version in conv_templates else "vicuna_v1"


def recorded_template(model_path: str | os.PathLike | None) -> str | None:
    """The template recorded in `model_path/config.json`, or None (none recorded, no such file)."""
    if model_path is None:
        return None
    config = Path(model_path) / "config.json"
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get(CONFIG_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def name_rule(model_name: str) -> str:
    """The template upstream's CLI and eval scripts infer from a model name."""
    name = model_name.lower()
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name:
        return "mistral_instruct"
    if "v1.6-34b" in name:
        return "chatml_direct"
    if "v1" in name:
        return "llava_v1"
    if "mpt" in name:
        return "mpt"
    return "llava_v0"


def same_template(a: str, b: str) -> bool:
    """Whether two template names render the same prompts (`v1` and `llava_v1` do)."""
    from llava.conversation import conv_templates

    if a == b:
        return True
    if a not in conv_templates or b not in conv_templates:
        return False
    x, y = conv_templates[a], conv_templates[b]
    return _shape(x) == _shape(y)


def _shape(conv) -> tuple:
    return conv.system, tuple(conv.roles), conv.sep_style, conv.sep, conv.sep2, conv.version, len(conv.messages)


def choose(model_path, model_name: str, explicit: str | None = None) -> str:
    """The template to prompt a checkpoint with: `explicit` (a warning when it differs from
    the recorded one), else the recorded one, else upstream's folder-name rule."""
    recorded = recorded_template(model_path)
    if explicit:
        if recorded and not same_template(explicit, recorded):
            log.warning("--conv-mode %s differs from %s, the template %s was trained with; using %s",
                        explicit, recorded, model_path, explicit)
        return explicit
    return recorded or name_rule(model_name)


def stop_text(name: str) -> str:
    """Where an answer ends in template `name` (what upstream's clients send as "stop")."""
    from llava.conversation import SeparatorStyle, conv_templates

    conv = conv_templates[name]
    return conv.sep if conv.sep_style in (SeparatorStyle.SINGLE, SeparatorStyle.MPT) else conv.sep2


def retemplate(prompt: str, target: str, max_turns: int = 8) -> tuple[str, str] | None:
    """`prompt` rendered in another chat template, rendered again in `target`: (new prompt,
    the template it was in), or None when it is in `target` already or in no template
    known. `plain` (stage 1's image + caption) has no turns to read and is never taken
    or produced."""
    from llava.conversation import SeparatorStyle, conv_templates

    if target not in conv_templates or conv_templates[target].sep_style == SeparatorStyle.PLAIN:
        return None
    for turns in range(1, max_turns + 1):
        if _pattern(target, turns).fullmatch(prompt):
            return None
    # the most specific templates first: one with a system prompt before one without
    for name, conv in sorted(conv_templates.items(), key=lambda item: -len(item[1].system)):
        if conv.sep_style == SeparatorStyle.PLAIN or same_template(name, target):
            continue
        for turns in range(max_turns, 0, -1):  # most turns first: a message never spans a turn marker
            match = _pattern(name, turns).fullmatch(prompt)
            if match:
                return _render(target, list(match.groups())), name
    return None


_PATTERNS: dict[tuple[str, int], object] = {}


def _pattern(name: str, turns: int):
    """A regex matching template `name` rendered with `turns` human messages (and the
    assistant answers between them), one group per message."""
    import re

    key = (name, turns)
    if key not in _PATTERNS:
        marks = [f"\x00{i}\x00" for i in range(2 * turns - 1)]
        text = _render(name, marks)
        parts = re.split("(\x00\\d+\x00)", text)
        _PATTERNS[key] = re.compile("".join("(.*?)" if part in marks else re.escape(part) for part in parts),
                                    re.DOTALL)
    return _PATTERNS[key]


def _render(name: str, messages: list[str]) -> str:
    """Template `name` with alternating human / assistant `messages`, the last answer open."""
    from llava.conversation import conv_templates

    conv = conv_templates[name].copy()
    for i, message in enumerate(messages):
        conv.append_message(conv.roles[i % 2], message)
    if len(messages) % 2:
        conv.append_message(conv.roles[1], None)
    return conv.get_prompt()
