"""`feallm export-vllm`: a LLaVA checkpoint (FEALLM or plain `mlp2x_gelu`) as one folder vLLM serves.

Upstream checkpoints are not loadable by vLLM as they are: their config says
`model_type: llava_llama` (unknown to `AutoConfig`), the CLIP tower lives in another
folder (`mm_vision_tower`), a LoRA run holds an adapter plus `non_lora_trainables.bin`,
and the prompt template is chosen by folder name. This module loads the checkpoint with
upstream's own `load_pretrained_model` (so LoRA merging, projector-only checkpoints and
the `feallm` projector behave exactly as in every other tool of ours) and writes:

    config.json              HF LLaVA layout (`model_type: llava`, `vision_config`, `text_config`),
                             architectures ["FeallmLlavaForConditionalGeneration"], every
                             `mm_feallm_*` field, the image-token count (`feallm_image_tokens`)
    model.safetensors        language_model.*, vision_tower.vision_model.*, multi_modal_projector.*
    tokenizer files          the checkpoint's tokenizer plus an `<image>` placeholder token
    preprocessor_config.json the tower's CLIP image processor
    chat_template.jinja      the checkpoint's conversation template (`feallm_conv_template`)
    generation_config.json   greedy by default, the tokenizer's end-of-sequence id

Every weight of the loaded model is placed under exactly one new name, and every weight
the model needs is checked to come from a file (a hub id's from the local HF cache, as the
loader reads it; a missing one is an error naming the file, never a random tensor).
`feallm_llava.vllm` loads the result and fails on any missing or unknown name.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from feallm_llava.errors import UsageError
from feallm_llava.integration.paths import looks_local

ARCHITECTURE = "FeallmLlavaForConditionalGeneration"
IMAGE_TOKEN = "<image>"
PROJECTORS = ("feallm", "mlp2x_gelu")
# transformers' names of the files a full checkpoint keeps its weights in
WEIGHT_GLOBS = ("model*.safetensors", "pytorch_model*.bin")
DTYPES = ("auto", "float32", "float16", "bfloat16")

EXAMPLES = """\
  feallm export-vllm --model-path runs/demo/train/llava-tiny-feallm-lora --model-base runs/demo/llm --out runs/vllm/feallm
  feallm export-vllm --model-path checkpoints/llava-v1.5-7b --out runs/vllm/llava-v1.5-7b --dtype float16
  bash launch/serve_vllm.sh --model runs/vllm/feallm"""


# -- what kind of checkpoint ----------------------------------------------------------------

def _read_config(model_path: Path) -> dict:
    config = model_path / "config.json"
    if not model_path.is_dir():
        raise UsageError(f"{model_path}: no such checkpoint folder (--model-path)")
    if not config.is_file():
        raise UsageError(f"{config}: not found; --model-path must be a LLaVA checkpoint folder")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UsageError(f"{config}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or not data.get("mm_vision_tower"):
        raise UsageError(f"{config}: not a LLaVA checkpoint (no mm_vision_tower); export-vllm takes the "
                         "output folder of llava's train script")
    kind = data.get("mm_projector_type", "linear")
    if kind not in PROJECTORS:
        raise UsageError(f"{config}: mm_projector_type {kind!r} is not exported; supported: {', '.join(PROJECTORS)}")
    return data


def checkpoint_kind(model_path: Path) -> str:
    """'lora' (adapter + non_lora_trainables), 'projector' (mm_projector only) or 'full'."""
    if (model_path / "adapter_config.json").is_file() or any(model_path.glob("non_lora_trainables.*")):
        return "lora"
    if not any(p for g in WEIGHT_GLOBS for p in model_path.glob(g)) and any(model_path.glob("mm_projector.*")):
        return "projector"
    return "full"


def check_inputs(model_path: Path, model_base: Path | None) -> tuple[dict, str]:
    """The checkpoint's config and kind; refuses what cannot be exported, naming the file."""
    config = _read_config(model_path)
    kind = checkpoint_kind(model_path)
    if kind != "full" and model_base is None:
        what = "adapter_config.json" if kind == "lora" and (model_path / "adapter_config.json").is_file() else (
            "non_lora_trainables.bin" if kind == "lora" else "mm_projector.bin")
        raise UsageError(f"{model_path / what}: a {'LoRA' if kind == 'lora' else 'projector-only'} checkpoint "
                         "needs --model-base (the LLM it was trained on)")
    if kind == "full" and model_base is not None:
        raise UsageError(f"{model_path}: a full checkpoint (weights in the folder) takes no --model-base")
    # a hub id is the loader's to resolve (the HF cache, or a download when not offline)
    if model_base is not None and (model_base.exists() or looks_local(str(model_base))) \
            and not (model_base / "config.json").is_file():
        raise UsageError(f"{model_base / 'config.json'}: not found; --model-base must be the LLM's folder")
    # the model name upstream's loader decides by (a Trainer's checkpoint-N: its run folder's too)
    name = model_path.name if not model_path.name.startswith("checkpoint-") else \
        f"{model_path.parent.name}_{model_path.name}"
    if "llava" not in name.lower():
        raise UsageError(f"{model_path}: upstream's loader loads a LLaVA model only when 'llava' is in the "
                         "folder name; rename the folder")
    if kind == "lora" and "lora" not in name.lower():
        raise UsageError(f"{model_path}: upstream's loader merges a LoRA adapter only when 'lora' is in the "
                         "folder name; rename the folder")
    return config, kind


# -- which weights come from a file --------------------------------------------------------

def local_folder(path: str) -> Path:
    """`path` itself, or a hub id's folder in the local HF cache (never fetched: the loader
    reads the same copy), or `path` unchanged when it is neither."""
    folder = Path(path)
    if folder.exists() or looks_local(path):
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return folder


def file_keys(path: Path) -> set[str]:
    """Tensor names in a weight file, without loading the tensors (safetensors) or code (.bin)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    import pickle

    import torch

    try:
        return set(torch.load(path, map_location="meta", weights_only=True, mmap=True))
    except (RuntimeError, pickle.UnpicklingError, OSError) as err:
        raise UsageError(f"{path}: cannot read its tensor names ({err}); a plain tensor file was expected") from err


def _folder_keys(folder: Path) -> tuple[set[str], Path]:
    """All tensor names of a transformers model folder (safetensors preferred) and the file to name."""
    for pattern in WEIGHT_GLOBS:
        files = sorted(folder.glob(pattern))
        if files:
            keys: set[str] = set()
            for f in files:
                keys |= file_keys(f)
            return keys, files[0] if len(files) == 1 else folder
    raise UsageError(f"{folder}: no weight file (model*.safetensors or pytorch_model*.bin)")


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return key


def _adapter_file(folder: Path, stem: str) -> Path:
    for suffix in (".safetensors", ".bin"):
        if (folder / (stem + suffix)).is_file():
            return folder / (stem + suffix)
    raise UsageError(f"{folder / (stem + '.bin')}: not found")


def check_sources(model, model_path: Path, model_base: Path | None, kind: str, tower_path: str) -> dict[str, int]:
    """Every weight of `model` must come from a file; returns how many came from which."""
    state = model.state_dict()
    tower = {k for k in state if k.startswith("model.vision_tower.")}
    projector = {k for k in state if k.startswith("model.mm_projector.")}
    llm = set(state) - tower - projector
    counts = {"llm": len(llm), "projector": len(projector), "vision": len(tower), "unused": 0}

    def require(wanted: set[str], have: set[str], where: Path) -> None:
        missing = sorted(wanted - have)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UsageError(f"{where}: weight {missing[0]} is missing{more}; the export would hold an "
                             "untrained tensor there")

    if kind == "full":
        keys, where = _folder_keys(model_path)
        require(llm | projector, keys, where)
        # in the files but not in the model (upstream's loader ignores them too): said, not exported
        counts["unused"] = len(keys - llm - projector - tower)
    else:
        keys, where = _folder_keys(local_folder(str(model_base)))
        require(llm, keys, where)
        stem = "non_lora_trainables" if kind == "lora" else "mm_projector"
        where = _adapter_file(model_path, stem)
        have = {_strip(k, ("base_model.model.",)) for k in file_keys(where)}
        have = {("model." + k if not k.startswith("model.") else k) for k in have} | {
            "model.mm_projector." + k for k in have}  # projector-only files may hold bare 0.weight ...
        require(projector, have, where)
    tower_dir = local_folder(tower_path)
    if tower_dir.is_dir():
        keys, where = _folder_keys(tower_dir)
        require({_strip(k, ("model.vision_tower.vision_tower.",)) for k in tower}, keys, where)
    return counts


# -- names in the exported folder ----------------------------------------------------------

def export_name(key: str, projector_type: str) -> str:
    """An upstream LlavaLlamaForCausalLM weight name -> its name in the exported folder."""
    if key.startswith("model.vision_tower.vision_tower."):
        return "vision_tower." + key[len("model.vision_tower.vision_tower."):]  # vision_model.*
    if key.startswith("model.mm_projector."):
        rest = key[len("model.mm_projector."):]
        if projector_type == "mlp2x_gelu":  # nn.Sequential(Linear, GELU, Linear) -> linear_1 / linear_2
            index, _, param = rest.partition(".")
            rest = {"0": "linear_1", "2": "linear_2"}[index] + "." + param
        return "multi_modal_projector." + rest
    if key.startswith("lm_head."):
        return "language_model." + key
    if key.startswith("model."):
        return "language_model." + key
    raise ValueError(f"weight {key}: no place for it in the exported model")


def exported_state(model, projector_type: str, dtype) -> dict:
    """The model's weights under their exported names (each placed exactly once)."""
    out = {}
    for key, tensor in model.state_dict().items():
        name = export_name(key, projector_type)
        if name in out:
            raise ValueError(f"weights {key} and another both map to {name}")
        out[name] = tensor.detach().to("cpu", dtype=dtype if tensor.is_floating_point() else tensor.dtype).contiguous().clone()
    return out


# -- config, tokenizer, template -------------------------------------------------------------

def _resolve(layer: int, num_layers: int) -> int:
    """A hidden-state index as a non-negative one (0 = embeddings, k = output of layer k)."""
    return layer if layer >= 0 else num_layers + 1 + layer


def hf_config(model, tower, image_token_id: int, dtype_name: str) -> dict:
    """The exported config.json: HF's LLaVA layout plus the FEALLM fields."""
    from feallm_llava.integration.registry.builders import is_feallm
    from feallm_llava.model.config import FeallmConfig

    cfg = model.config
    full = cfg.to_diff_dict()
    vision = tower.vision_tower.config.to_diff_dict()
    vision.update(model_type="clip_vision_model", torch_dtype=dtype_name)
    text = {k: v for k, v in full.items() if not k.startswith(("mm_", "feallm_")) and k not in (
        "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_padding_side", "tokenizer_model_max_length",
        "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower", "use_mm_proj",
        "_name_or_path", "architectures", "transformers_version", "model_type", "torch_dtype", "dtype")}
    text.update(model_type="llama", architectures=["LlamaForCausalLM"], torch_dtype=dtype_name)
    num_layers = tower.vision_tower.config.num_hidden_layers
    select = _resolve(int(getattr(cfg, "mm_vision_select_layer", -2)), num_layers)
    feallm = is_feallm(cfg)
    extra = FeallmConfig.from_llava_config(cfg).to_llava_attrs() if feallm else {}
    side = tower.config.image_size // tower.config.patch_size
    tokens = side * side + (1 if feallm and extra["mm_feallm_lca"] else 0)
    shallow = [_resolve(i, num_layers) for i in extra.get("mm_feallm_shallow_layers", [])]
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llava",
        "vision_config": vision,
        "text_config": text,
        "image_token_index": image_token_id,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_select_strategy": "default",  # patch tokens: CLS dropped, as LLaVA's "patch"
        # the deep layer first, then the MPP's shallow ones (feallm_llava.vllm reads them in this order)
        "vision_feature_layer": [select, *shallow] if feallm else select,
        "image_seq_length": tokens,
        "tie_word_embeddings": bool(full.get("tie_word_embeddings", False)),
        "torch_dtype": dtype_name,
        # -- FEALLM / upstream LLaVA fields, read by feallm_llava.vllm --
        "mm_projector_type": cfg.mm_projector_type,
        "mm_vision_select_layer": select,
        "mm_vision_select_feature": getattr(cfg, "mm_vision_select_feature", "patch"),
        "image_aspect_ratio": getattr(cfg, "image_aspect_ratio", "pad"),
        "feallm_image_tokens": tokens,
        **extra,
        **({"mm_feallm_shallow_layers": shallow} if feallm else {}),
    }


def chat_template(conv_mode: str) -> str:
    """The Jinja form of upstream's conversation template `conv_mode` (string content: vLLM
    puts `<image>\\n` before the text of a message with an image, as LLaVA's prompts do)."""
    from llava.conversation import SeparatorStyle, conv_templates

    conv = conv_templates[conv_mode]
    user, assistant = conv.roles
    system = json.dumps(conv.system)
    if conv.sep_style == SeparatorStyle.TWO:
        # system + sep; "ROLE: msg" + sep (user) / sep2 (assistant); "ASSISTANT:" left open
        seps = (json.dumps(conv.sep), json.dumps(conv.sep2))
        head = "{{ system }}{{ " + seps[0] + " }}"
        turn = ("{% if m.role == 'user' %}{{ " + json.dumps(user + ": ") + " + m.content + " + seps[0] + " }}"
                "{% elif m.role == 'assistant' %}{{ " + json.dumps(assistant + ": ") + " + m.content + " + seps[1]
                + " }}{% endif %}")
    elif conv.sep_style == SeparatorStyle.SINGLE:
        sep = json.dumps(conv.sep)
        head = "{{ system }}{{ " + sep + " }}"
        turn = ("{% if m.role == 'user' %}{{ " + json.dumps(user + ": ") + " + m.content + " + sep + " }}"
                "{% elif m.role == 'assistant' %}{{ " + json.dumps(assistant + ": ") + " + m.content + " + sep
                + " }}{% endif %}")
    elif conv.sep_style == SeparatorStyle.PLAIN:
        # stage 1's captions: the image, then the text, nothing between them
        return ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{{ m.content | replace('<image>\\n', '<image>') }}"
                "{% elif m.role == 'assistant' %}{{ m.content + " + json.dumps(conv.sep2 or "") + " }}{% endif %}{% endfor %}")
    else:
        raise UsageError(f"conversation template {conv_mode!r} ({conv.sep_style.name}) has no chat-template "
                         "export; pass --conv-mode v1 or another SINGLE/TWO template")
    open_turn = json.dumps(assistant + ":")
    # BOS first: vLLM tokenizes a rendered chat without adding special tokens
    return ("{{ bos_token }}{% set system = " + system + " %}"
            "{% if messages and messages[0].role == 'system' %}{% set system = messages[0].content %}{% endif %}"
            + head +
            "{% for m in messages %}" + turn + "{% endfor %}"
            "{% if add_generation_prompt %}{{ " + open_turn + " }}{% endif %}")


def _answer_end(conv_mode: str) -> str:
    """The text after which the LLaVA runner cuts an answer in template `conv_mode`."""
    from llava.conversation import SeparatorStyle, conv_templates

    conv = conv_templates[conv_mode]
    return conv.sep2 if conv.sep_style in (SeparatorStyle.TWO, SeparatorStyle.LLAMA_2) else conv.sep


def _save_tokenizer(tokenizer, out: Path, template: str) -> int:
    """The tokenizer with `<image>` added (vLLM's placeholder); returns the token's id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out))
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


# -- the export ---------------------------------------------------------------------------

def export(model_path: str | os.PathLike, out: str | os.PathLike, model_base: str | os.PathLike | None = None,
           *, conv_mode: str | None = None, dtype: str = "auto", log=print) -> dict:
    """Export the checkpoint to `out`; returns a summary (counts, tokens, template)."""
    import torch

    from feallm_llava.integration import register

    model_path = Path(model_path)
    base = Path(model_base) if model_base is not None else None
    out = Path(out)
    config, kind = check_inputs(model_path, base)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if out.resolve() == model_path.resolve():
        raise UsageError(f"{out}: --out must differ from --model-path")
    register()
    from llava.conversation import conv_templates
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    from feallm_llava.integration.conv_template import choose

    name = get_model_name_from_path(str(model_path))
    template_name = choose(model_path, name, conv_mode)
    if template_name not in conv_templates:
        raise UsageError(f"unknown --conv-mode {template_name!r}; llava knows {', '.join(conv_templates)}")
    log(f"[export-vllm] loading {model_path} ({kind}{', base ' + str(base) if base else ''}) with upstream's loader")
    tokenizer, model, image_processor, _ = load_pretrained_model(
        str(model_path), str(base) if base else None, name, device="cpu", device_map="cpu")
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    dtype_name = dtype if dtype != "auto" else str(config.get("torch_dtype") or "float16")
    target = getattr(torch, dtype_name)
    counts = check_sources(model, model_path, base, kind, tower.vision_tower_name)

    out.mkdir(parents=True, exist_ok=True)
    state = exported_state(model, model.config.mm_projector_type, target)
    loaded = counts["llm"] + counts["projector"] + counts["vision"]
    if len(state) != loaded:
        raise ValueError(f"{len(state)} exported weights for {loaded} loaded ones")
    from safetensors.torch import save_file

    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    template = chat_template(template_name)
    image_token_id = _save_tokenizer(tokenizer, out, template)
    image_processor.save_pretrained(str(out))
    cfg = hf_config(model, tower, image_token_id, dtype_name)
    cfg["feallm_conv_template"] = template_name
    stop = _answer_end(template_name)
    if stop != tokenizer.eos_token:
        # vLLM stops at EOS only; the LLaVA runner also cuts at the template's separator
        cfg["feallm_stop"] = stop
        log(f"[export-vllm] note: template {template_name} ends answers with {stop!r}, not EOS: "
            f"send stop=[{stop!r}] with each request (recorded as feallm_stop in config.json)")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    summary = {"out": str(out), "kind": kind, "projector": model.config.mm_projector_type,
               "weights": counts, "placed": len(state), "image_tokens": cfg["feallm_image_tokens"],
               "conv_template": template_name, "dtype": dtype_name}
    unused = (f"{counts['unused']} tensors of the checkpoint's files are no weight of the model (upstream's "
              "loader ignores them; not exported)") if counts["unused"] else "none unused"
    log(f"[export-vllm] placed all {len(state)} weights (LLM {counts['llm']}, projector {counts['projector']}, "
        f"CLIP {counts['vision']}); none missing, {unused}; {cfg['feallm_image_tokens']} tokens an image; "
        f"template {template_name}; wrote {out}")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", required=True, type=Path, help="LLaVA checkpoint (feallm or mlp2x_gelu)")
    parser.add_argument("--model-base", type=Path, default=None, help="the LLM of a LoRA or projector-only checkpoint")
    parser.add_argument("--out", required=True, type=Path, help="folder to write (vLLM's --model)")
    parser.add_argument("--conv-mode", default=None,
                        help="conversation template (default: the one the checkpoint was trained with)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weight dtype of the export (auto: the checkpoint's torch_dtype)")


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    export(args.model_path, args.out, args.model_base, conv_mode=args.conv_mode, dtype=args.dtype)
    return 0
