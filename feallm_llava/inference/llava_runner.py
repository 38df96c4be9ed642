"""Answer queries with a LLaVA checkpoint: upstream loading, batched greedy decoding.

Loading is upstream's `load_pretrained_model(model_path, model_base, model_name)`
(full model, projector-only with a base, or LoRA with a base), so a FEALLM checkpoint
and a plain LLaVA-1.5 one run the same way; the `feallm` projector and the compat
shims are registered first. This module calls llava's public loader, conversation
templates and image helpers only.

Prompts follow upstream's eval scripts: the conversation template `conv_mode` (when not
given: the one the checkpoint records it was trained with, else inferred from the model
name as upstream does; `integration.conv_template`), `<image>\\n` before the
question, `tokenizer_image_token` for the ids, `process_images` for the pixels.

Batching with left padding: upstream `prepare_inputs_labels_for_multimodal` drops the
padded positions (attention_mask == 0), splices the image features in, then pads the
spliced embeddings again on the side named by `config.tokenizer_padding_side`
(default "right", a training setting). For generation every row must end at the same
position, so the backend sets it to "left"; the new attention mask then marks the
padding and generate's position ids count from each row's first real token. Greedy
answers of a batch are the answers each item gets alone (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from feallm_llava.inference import Query

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_name_from_path(model_path: str) -> str:
    """The model name upstream's scripts derive from a checkpoint path (its loader needs
    'llava' in it): the folder's name, `<run>_checkpoint-N` for a Trainer checkpoint."""
    from llava.mm_utils import get_model_name_from_path

    return get_model_name_from_path(str(model_path))


def render_conversation(turns: Sequence[tuple[str, str | None]], conv_mode: str = "v1") -> str:
    """(human, assistant) turns in upstream's template `conv_mode`; an assistant text of
    None leaves that turn open for the model to answer."""
    from llava.conversation import conv_templates

    conv = conv_templates[conv_mode].copy()
    for human, assistant in turns:
        conv.append_message(conv.roles[0], human)
        conv.append_message(conv.roles[1], assistant)
    return conv.get_prompt()


def _batches(items: list[Query], size: int) -> Iterator[list[Query]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class LlavaBackend:
    def __init__(self, model_path: str, model_base: str | None = None, *, conv_mode: str | None = None,
                 device: str | None = None, dtype: str | None = None, max_new_tokens: int = 256):
        from feallm_llava.integration import register

        register()  # the `feallm` projector + compat shims, before llava loads anything
        from llava.conversation import conv_templates
        from llava.model.builder import load_pretrained_model

        from feallm_llava.integration.conv_template import choose

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model_name = model_name_from_path(model_path)
        if "llava" not in self.model_name.lower():
            raise ValueError(f"{model_path}: upstream load_pretrained_model loads a LLaVA model only when "
                             f"'llava' is in the directory name (got {self.model_name!r}); rename the directory")
        self.conv_mode = choose(model_path, self.model_name, conv_mode)
        if self.conv_mode not in conv_templates:
            raise ValueError(f"unknown --conv-mode {self.conv_mode!r}; llava knows {', '.join(conv_templates)}")
        self.tokenizer, self.model, self.image_processor, self.context_len = load_pretrained_model(
            model_path, model_base, self.model_name, device=self.device)
        # The builder loads float16. On CPU that is slow and loses nothing to undo, so the
        # default there is float32; on GPU it stays float16 (upstream's eval setting).
        dtype = dtype or ("float16" if self.device.startswith("cuda") else "float32")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self.dtype = DTYPES[dtype]
        if self.model.dtype != self.dtype:  # (a model dispatched over GPUs stays as loaded)
            self.model.to(dtype=self.dtype)
        self.model.eval()
        self.model.config.tokenizer_padding_side = "left"
        self.max_new_tokens = max_new_tokens
        self.pad_id = next(i for i in (self.tokenizer.pad_token_id, self.tokenizer.unk_token_id,
                                       self.tokenizer.eos_token_id) if i is not None)
        # Answers drop the special tokens before decoding: upstream's slow LLaMA
        # tokenizer rebuilds its list of special tokens for every token it checks with
        # skip_special_tokens=True (~1 ms an answer, as much as a batched decoding step).
        self._special_ids = frozenset(self.tokenizer.all_special_ids)
        self._ids: dict[str, torch.Tensor] = {}  # prompt text -> token ids (plan and generate share them)

    # -- prompt ---------------------------------------------------------------------
    def prompt(self, question: str) -> str:
        """The prompt text; `<image>` stands where the image features go.

        `plain` (stage 1, LCS-558K captions) is what upstream's `preprocess_plain` trains
        on: the image token, then the text, with no separator between them; the
        template's own rendering would add two newlines the model never saw.
        """
        from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
        from llava.conversation import SeparatorStyle, conv_templates

        image_token = DEFAULT_IMAGE_TOKEN
        if getattr(self.model.config, "mm_use_im_start_end", False):
            image_token = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
        text = question.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        if conv_templates[self.conv_mode].sep_style == SeparatorStyle.PLAIN:
            return image_token + text
        return render_conversation([(image_token + "\n" + text, None)], self.conv_mode)

    def _stop_text(self) -> str | None:
        """Text that ends an answer in templates whose turns do not end with </s>."""
        from llava.conversation import SeparatorStyle, conv_templates

        conv = conv_templates[self.conv_mode]
        if conv.sep_style in (SeparatorStyle.TWO, SeparatorStyle.LLAMA_2):
            return conv.sep2
        return conv.sep

    def _batch(self, items: list[Query]):
        """(images, pixels on the model's device and dtype, left-padded prompt ids (B, L), their
        attention mask (B, L)) of one batch."""
        from llava.mm_utils import process_images

        images = [item.load_image() for item in items]
        pixels = process_images(images, self.image_processor, self.model.config)  # (B, 3, H, W) or list
        if isinstance(pixels, list):
            pixels = [p.to(self.model.device, dtype=self.dtype) for p in pixels]
        else:
            pixels = pixels.to(self.model.device, dtype=self.dtype)
        ids = [self.prompt_ids(item) for item in items]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)  # (B, L) left-padded
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, width - len(x):] = x
            mask[row, width - len(x):] = 1
        return images, pixels, input_ids, mask

    # -- generation -----------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, items: list[Query]) -> list[str]:
        """Greedy answers of one batch, in item order."""
        images, pixels, input_ids, attention_mask = self._batch(items)
        width = input_ids.shape[1]
        output = self.model.generate(
            input_ids.to(self.model.device),
            attention_mask=attention_mask.to(self.model.device),
            images=pixels,
            image_sizes=[im.size for im in images],
            do_sample=False, num_beams=1, temperature=None, top_p=None,
            max_new_tokens=self.max_new_tokens,
            use_cache=True,
            pad_token_id=self.pad_id,
        )  # (B, T): only new tokens (generate ran from inputs_embeds), or prompt + new tokens
        output = output.cpu()
        if output.shape[1] >= width and torch.equal(output[:, :width], input_ids):
            output = output[:, width:]
        return [self._decode(row) for row in output]

    # -- scoring ------------------------------------------------------------------------
    def _answer_join(self) -> str:
        """What stands between the open prompt and an answer in the trained text: upstream's
        templates write "ASSISTANT: answer"; `plain` writes the caption right after the image."""
        from llava.conversation import SeparatorStyle, conv_templates

        return "" if conv_templates[self.conv_mode].sep_style == SeparatorStyle.PLAIN else " "

    def continuation_ids(self, item: Query, text: str, complete: bool = False) -> torch.Tensor:
        """The tokens of answer `text` right after `item`'s prompt, as the model was trained
        on them: the prompt and answer are tokenized together and the prompt's ids must be
        a prefix (a tokenizer that merged across the boundary would score other tokens).
        `complete`: the whole answer, with the template's end of turn (`</s>` in v1): a
        whole answer's probability must include its stop, or an answer that is a prefix
        of another would always score at least as high."""
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import tokenizer_image_token

        prompt = self.prompt_ids(item)
        text = text + (self._stop_text() or "") if complete else text
        full = tokenizer_image_token(self.prompt(item.question) + self._answer_join() + text, self.tokenizer,
                                     IMAGE_TOKEN_INDEX, return_tensors="pt")
        if len(full) <= len(prompt) or not torch.equal(full[:len(prompt)], prompt):
            raise ValueError(f"item {item.id!r}: the answer {text!r} does not tokenize as a continuation of the "
                             "prompt (the tokenizer merges across their boundary); it cannot be scored")
        return full[len(prompt):]

    def continuation_logprobs(self, items: list[Query], continuations: Sequence[Sequence[str]],
                              max_rows: int = 64, complete: bool = False) -> list[list[float]]:
        """Summed log-probability of each answer text in `continuations[i]` right after
        item i's prompt, for one batch of items (`continuation_scores`)."""
        return [[lp for lp, _ in row] for row in self.continuation_scores(items, continuations, max_rows, complete)]

    @torch.inference_mode()
    def continuation_scores(self, items: list[Query], continuations: Sequence[Sequence[str]],
                            max_rows: int = 64, complete: bool = False) -> list[list[tuple[float, bool]]]:
        """(summed log-probability, whether greedy decoding gives it) of each answer text
        in `continuations[i]` right after item i's prompt, for one batch of items.

        The image and question run once per item (left-padded, as `generate`); their KV
        cache is then repeated over that item's continuations, which run together
        (right-padded, at most `max_rows` rows a forward, which bounds the repeated
        cache's memory). Summed, not averaged: a mean per token favours long answers.
        """
        from transformers import DynamicCache

        if len(continuations) != len(items):
            raise ValueError(f"{len(items)} items but {len(continuations)} lists of continuations")
        images, pixels, input_ids, mask = self._batch(items)
        device = self.model.device
        _, _, mask, _, embeds, _ = self.model.prepare_inputs_labels_for_multimodal(
            input_ids.to(device), None, mask.to(device), None, None, pixels, image_sizes=[im.size for im in images])
        mask = mask.long()                                          # (B, L') image features spliced in
        positions = (mask.cumsum(-1) - 1).clamp(min=0)              # from each row's first real token
        llm = self.model.get_model()
        prefix = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        first = torch.log_softmax(self.model.lm_head(prefix.last_hidden_state[:, -1]).float(), dim=-1)  # (B, V)
        layers = prefix.past_key_values.to_legacy_cache()           # per layer (K, V): (B, heads, L', d)
        lengths = mask.sum(-1)                                      # (B,) real prefix tokens

        rows = [(i, self.continuation_ids(item, text, complete).to(device))
                for i, (item, texts) in enumerate(zip(items, continuations)) for text in texts]
        scores: list[tuple[float, bool]] = []
        for start in range(0, len(rows), max_rows):
            part = rows[start:start + max_rows]
            index = torch.tensor([i for i, _ in part], device=device)
            span = max(len(t) for _, t in part)
            tokens = torch.full((len(part), span), self.pad_id, dtype=torch.long, device=device)  # (N, T)
            tmask = torch.zeros((len(part), span), dtype=torch.long, device=device)
            for r, (_, t) in enumerate(part):
                tokens[r, :len(t)] = t
                tmask[r, :len(t)] = 1
            cache = DynamicCache.from_legacy_cache(tuple((k[index], v[index]) for k, v in layers))
            out = llm(inputs_embeds=llm.embed_tokens(tokens), past_key_values=cache, use_cache=True,
                      attention_mask=torch.cat([mask[index], tmask], dim=1),
                      position_ids=lengths[index, None] + torch.arange(span, device=device))
            logp = torch.log_softmax(self.model.lm_head(out.last_hidden_state[:, :-1]).float(), dim=-1)  # (N, T-1, V)
            for r, (i, t) in enumerate(part):
                total, greedy = first[i, t[0]], bool(first[i].argmax() == t[0])
                if len(t) > 1:
                    steps = logp[r, torch.arange(len(t) - 1, device=device)]        # (len - 1, V)
                    total = total + steps.gather(1, t[1:, None]).sum()
                    greedy = greedy and bool((steps.argmax(-1) == t[1:]).all())
                scores.append((float(total), greedy))
        out_lists, n = [], 0
        for texts in continuations:
            out_lists.append(scores[n:n + len(texts)])
            n += len(texts)
        return out_lists

    def score(self, items: Iterable[Query], continuations: Sequence[str] | Callable[[Query], Sequence[str]],
              batch_size: int = 8, complete: bool = False) -> Iterator[tuple[Query, list[float]]]:
        """(item, summed log-probabilities of its continuations) pairs, batched as `answer`
        batches; `continuations` is one list for every item, or a function of the item;
        `complete`: whole answers, scored with their end of turn."""
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        pick = continuations if callable(continuations) else (lambda _item: continuations)
        for batch in self._plan(list(items), batch_size):
            yield from zip(batch, self.continuation_logprobs(batch, [list(pick(item)) for item in batch],
                                                             complete=complete))

    def _decode(self, row: torch.Tensor) -> str:
        tokens = row.tolist()
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos in tokens:
            tokens = tokens[:tokens.index(eos)]
        # = decode(tokens, skip_special_tokens=True), the special tokens dropped here
        tokens = [t for t in tokens if t not in self._special_ids]
        text = self.tokenizer.decode(tokens, skip_special_tokens=False).strip()
        stop = self._stop_text()
        if stop and stop in text:
            text = text[:text.index(stop)].strip()
        return text

    def prompt_ids(self, item: Query) -> torch.Tensor:
        """The prompt's token ids, `IMAGE_TOKEN_INDEX` where the image goes (cached per prompt)."""
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import tokenizer_image_token

        prompt = self.prompt(item.question)
        if prompt not in self._ids:
            if len(self._ids) >= 4096:  # questions come from templates; free text would grow it without end
                self._ids.clear()
            self._ids[prompt] = tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
        return self._ids[prompt]

    def prompt_length(self, item: Query) -> int:
        return len(self.prompt_ids(item))

    def answer(self, items: Iterable[Query], batch_size: int = 8) -> Iterator[tuple[Query, str]]:
        """(item, answer) pairs, `batch_size` items per generate call.

        Batches are cut from items of equal prompt length first (benchmarks sample their
        questions from a dozen templates, so these groups are large), then the leftovers
        are batched in length order. An unpadded batch wastes no compute, and transformers
        4.5x builds a 4-D padding mask with torch.vmap at every decoding step of a padded
        batch, which costs more than a tiny model's forward on CPU. Answers do not depend
        on the batching (tested); pairs come in processing order.
        """
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        for batch in self._plan(list(items), batch_size):
            yield from zip(batch, self.generate(batch))

    def _plan(self, items: list[Query], batch_size: int) -> list[list[Query]]:
        if batch_size == 1:
            return [[item] for item in items]
        groups: dict[int, list[Query]] = {}
        for item in items:
            groups.setdefault(self.prompt_length(item), []).append(item)
        batches: list[list[Query]] = []
        leftovers: list[Query] = []
        for length in sorted(groups):
            group = groups[length]
            full = len(group) - len(group) % batch_size
            batches.extend(_batches(group[:full], batch_size))
            leftovers.extend(group[full:])
        return batches + list(_batches(leftovers, batch_size))
