"""Text-only warm-up of the tiny kit's random LLM: a stand-in for an LLM's pretraining.

FEALLM starts from LLaVA-1.5's Vicuna-7B, an LLM that already writes fluent text. The
tiny kit's Llama is random, so at toy scale the LoRA stage would spend its whole budget
learning to spell. This trains the tiny LLM on the conversation TEXT of the instruction
set (questions and answers in LLaVA's v1 template, the `<image>` token removed), so it
learns the answer formats, but never sees an image: which expression or AU a face shows
is learnt only later, through the FEALLM projector, in stages 1 and 2.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from feallm_llava.data.llava_json import IMAGE_TOKEN


def conversation_texts(data_json: Path | str) -> list[str]:
    """Texts of a LLaVA JSON: v1 conversations, or bare captions for `plain` samples
    (a first human turn that is only `<image>`, as in LCS-558K)."""
    from feallm_llava.inference.llava_runner import render_conversation

    texts = []
    for sample in json.loads(Path(data_json).read_text()):
        turns = sample["conversations"]
        if len(turns) == 2 and not turns[0]["value"].replace(IMAGE_TOKEN, "").strip():
            texts.append(turns[1]["value"])
            continue
        texts.append(render_conversation([(human["value"].replace(IMAGE_TOKEN, "").strip(), gpt["value"])
                                          for human, gpt in zip(turns[0::2], turns[1::2])], "v1"))
    return texts


def warm_up(llm_dir: Path | str, data_jsons: list[Path | str], out_dir: Path | str, *, steps: int = 150,
            batch_size: int = 16, lr: float = 3e-3, seed: int = 0, log_every: int = 25) -> list[float]:
    """Train `llm_dir` on the texts of `data_jsons` for `steps` steps; save to `out_dir`."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir), use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token  # as upstream's train() does for v1
    model = LlamaForCausalLM.from_pretrained(str(llm_dir), dtype=torch.float32)
    texts = [t for path in data_jsons for t in conversation_texts(path)]
    if not texts:
        raise ValueError(f"{data_jsons}: no conversations to warm the LLM up on")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # short linear warm-up, constant, then a linear decay over the last fifth
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 10, max(0.1, 5 * (1 - s / steps))))
    rng = random.Random(seed)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        batch = tokenizer(rng.sample(texts, min(batch_size, len(texts))), return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"   warm-up step {step + 1}/{steps}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in Path(llm_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, tmp / f.name)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # whole or absent: a killed warm-up is redone, never half-used
    return losses
