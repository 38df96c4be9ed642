"""Offline tiny-model kit: a tokenizer, a Llama LLM and a CLIP tower built from scratch.

Tests, the demo and users' smoke runs need real upstream model classes without a model
hub. `build_kit(dir)` writes, with no network:

  tokenizer/  sentencepiece BPE trained on the fly (`tokenizer.model` +
              `tokenizer_config.json`: LlamaTokenizer, legacy, BOS added), byte fallback
  llm/        a random `LlamaForCausalLM` in HF format, plus the tokenizer files
  clip/       a random 24-layer `CLIPVisionModel` (so CLIP layer indices 3..23 exist)
              with its `CLIPImageProcessor`

`build_llava(dir, kit, projector_type)` then assembles an upstream
`LlavaLlamaForCausalLM` through `initialize_vision_modules` and saves it where
`load_pretrained_model` loads it (the directory name contains "llava").

Everything is cached: a second call with the same settings returns at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from feallm_llava.facs.labels import AU_NAMES, EXPRESSIONS
from feallm_llava.integration import assemble

KIT_VERSION = 1


@dataclass(frozen=True)
class KitSpec:
    vocab_size: int = 1000  # sentencepiece BPE pieces (>= ~300 with byte fallback)
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_intermediate: int = 128
    max_positions: int = 1024
    # Weight init std of the LLM: 1/sqrt(hidden) gives token embeddings of norm ~1, as
    # in a real LLM (Llama-2-7B: std ~0.016 over 4096 dims). HF's default 0.02 gives
    # norm 0.16 here, and image tokens then drown the text (measured: norm 8.9 vs 0.27).
    llm_init_std: float = 0.125
    clip_hidden: int = 32
    clip_layers: int = 24  # as ViT-L/14, so layer indices 3, 8, 13, 18, 23 exist
    clip_heads: int = 2
    clip_intermediate: int = 64
    image_size: int = 56
    patch_size: int = 14  # 56 / 14 -> a 4 x 4 patch grid
    seed: int = 0


@dataclass(frozen=True)
class Kit:
    root: Path
    spec: KitSpec

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def llm(self) -> Path:
        return self.root / "llm"

    @property
    def clip(self) -> Path:
        return self.root / "clip"


def _corpus() -> list[str]:
    """Text the tokenizer learns from: LLaVA's prompt scaffolding and FEA vocabulary."""
    lines = [
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        "USER: <image>\nPlease describe the expression in this face. ASSISTANT:",
        "USER: <image>\nPlease describe the action units in this face. ASSISTANT:",
        "USER: <image>\nWhat is the emotion of this person, and why? ASSISTANT:",
        "The person shows a facial expression. The face is neutral. No action unit is active.",
        "a drawn face with raised brows and a smile, an open mouth and a dropped jaw",
        "the cheeks are raised, the lips are pressed, the eyelids are tightened",
        "This face expresses emotion because the muscles of the brow, the eyes and the mouth move.",
    ]
    for expr in EXPRESSIONS:
        lines.append(f"{expr}. The person looks {expr.lower()}; the expression is {expr}.")
    for au, name in AU_NAMES.items():
        lines.append(f"AU{au} ({name}) is active: the {name.lower()} contributes to the emotion. AU{au:02d} AU {au}")
    return lines * 20


def _train_tokenizer(out: Path, spec: KitSpec) -> None:
    import io

    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        vocab_size=spec.vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity",
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    # legacy=True: with legacy=False this vocabulary trips "tokenization mismatch" in
    # upstream preprocess_v1 and every label gets masked (measured).
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer",
        "legacy": True,
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": spec.max_positions,
        "clean_up_tokenization_spaces": False,
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), use_fast=False)


def _widths(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, int]:
    """A transformer's sizes as transformers' configs name them."""
    return {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads}


def _build_llm(kit: Kit) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = kit.spec
    vocab = len(load_tokenizer(kit.tokenizer))
    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        **_widths(spec.llm_hidden, spec.llm_intermediate, spec.llm_layers, spec.llm_heads),
        vocab_size=vocab, num_key_value_heads=spec.llm_heads,
        max_position_embeddings=spec.max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=None,
        tie_word_embeddings=False, initializer_range=spec.llm_init_std,
    )
    LlamaForCausalLM(config).save_pretrained(kit.llm, safe_serialization=True)
    for f in kit.tokenizer.iterdir():
        shutil.copy(f, kit.llm / f.name)


def _build_clip(kit: Kit) -> None:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    spec = kit.spec
    torch.manual_seed(spec.seed + 1)
    config = CLIPVisionConfig(
        **_widths(spec.clip_hidden, spec.clip_intermediate, spec.clip_layers, spec.clip_heads),
        image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.clip_hidden,
    )
    CLIPVisionModel(config).save_pretrained(kit.clip, safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    ).save_pretrained(kit.clip)


def build_kit(root: Path | str, spec: KitSpec | None = None) -> Kit:
    """Build (or reuse) the kit under `root`. Safe to call from many tests."""
    spec = spec or KitSpec()
    kit = Kit(Path(root), spec)
    stamp = kit.root / "kit.json"
    want = {"version": KIT_VERSION, **asdict(spec)}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return kit
    if kit.root.exists():
        for sub in (kit.tokenizer, kit.llm, kit.clip):
            shutil.rmtree(sub, ignore_errors=True)
    kit.root.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(kit.tokenizer, spec)
    _build_llm(kit)
    _build_clip(kit)
    stamp.write_text(json.dumps(want, indent=2))  # written last: a torn build is rebuilt
    return kit


def llava_model_args(kit: Kit, projector_type: str = "feallm", **overrides):
    """The `ModelArguments` upstream's train script would parse for this kit."""
    return assemble.llava_model_args(kit.llm, kit.clip, projector_type, **overrides)


def build_llava_model(kit: Kit, projector_type: str = "feallm", seed: int = 0, **overrides):
    """An upstream `LlavaLlamaForCausalLM` on the kit, built as train.py builds it."""
    return assemble.build_llava_model(kit.llm, kit.clip, projector_type, seed,
                                      max_length=kit.spec.max_positions, **overrides)


def build_llava(out: Path | str, kit: Kit, projector_type: str = "feallm", seed: int = 0, **overrides) -> Path:
    """Save a full (non-LoRA) LLaVA checkpoint loadable by `load_pretrained_model`."""
    out = Path(out)
    if "llava" not in out.name.lower():
        raise ValueError(f"{out}: upstream's loader needs 'llava' in the directory name")
    stamp = out / "feallm_kit.json"
    want = {"kit": str(kit.root), "projector_type": projector_type, "seed": seed, **{k: repr(v) for k, v in overrides.items()}}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return out
    model = build_llava_model(kit, projector_type, seed, **overrides)
    # The tower is loaded from its own path (mm_vision_tower), as upstream does; its
    # weights in the checkpoint would only be reported as unused at every load.
    state = {k: v for k, v in model.state_dict().items() if ".vision_tower." not in k}
    model.save_pretrained(out, state_dict=state, safe_serialization=True)
    load_tokenizer(kit.tokenizer).save_pretrained(out)
    stamp.write_text(json.dumps(want))
    return out


SAMPLE_COLOURS = {"red": (200, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 210), "yellow": (230, 210, 40)}


def write_sample_data(out: Path | str, n: int = 16, seed: int = 0) -> Path:
    """A few LLaVA-format samples for smoke runs: `pretrain.json` (LCS-558K style,
    conversation `plain`), `finetune.json` (v1 instruction turns) and `images/`."""
    import random

    from PIL import Image, ImageDraw

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pretrain, finetune = [], []
    for i in range(n):
        name = rng.choice(sorted(SAMPLE_COLOURS))
        img = Image.new("RGB", (64, 48), (235, 235, 235))
        x, y = rng.randint(0, 24), rng.randint(0, 12)
        ImageDraw.Draw(img).ellipse((x, y, x + 36, y + 32), fill=SAMPLE_COLOURS[name])
        img.save(out / "images" / f"{i:03d}.jpg", quality=95)
        pretrain.append({"id": f"pre{i:03d}", "image": f"{i:03d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": f"a {name} face on a grey background"}]})
        finetune.append({"id": f"ft{i:03d}", "image": f"{i:03d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nPlease describe the expression in this face."},
            {"from": "gpt", "value": f"Neutral. The {name} face shows no action unit."}]})
    (out / "pretrain.json").write_text(json.dumps(pretrain, indent=1))
    (out / "finetune.json").write_text(json.dumps(finetune, indent=1))
    return out


EXAMPLES = """\
  feallm tiny-kit --out runs/kit                          # tokenizer, llm/, clip/
  feallm tiny-kit --out runs/kit --llava --sample-data runs/kit/data   # plus a full FEALLM checkpoint and samples"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory for the kit")
    parser.add_argument("--llava", action="store_true",
                        help="also save a full tiny LLaVA checkpoint (feallm projector, random weights) in OUT")
    parser.add_argument("--image-size", type=int, default=KitSpec.image_size, help="CLIP input side, pixels")
    parser.add_argument("--sample-data", metavar="DIR", help="also write a few LLaVA-format samples there")


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kit = build_kit(args.out, KitSpec(image_size=args.image_size))
    print(f"tokenizer: {kit.tokenizer}\nllm:       {kit.llm}\nclip:      {kit.clip}")
    if args.sample_data:
        print(f"data:      {write_sample_data(args.sample_data)}")
    if args.llava:
        print(f"llava:     {build_llava(kit.root / 'tiny-llava-v1-feallm', kit)}")
    return 0
