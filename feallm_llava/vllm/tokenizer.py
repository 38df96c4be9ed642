"""LLaVA's tokenizer as upstream runs it: sentencepiece, text around `<image>` apart, for vLLM.

Upstream LLaVA tokenizes with transformers 4.x's slow `LlamaTokenizer`, and its
`tokenizer_image_token` encodes the text before and after `<image>` as two separate texts
(each gets sentencepiece's leading-space prefix). transformers 5 loads the same
`tokenizer.model` as a `tokenizers` pipeline that keeps every space and adds no prefix
after a special token, so a prompt with `<image>` gets other ids than upstream gave it
(measured on the tiny kit: 3 of ~50 ids differ) and the model answers another prompt.
This class is transformers 5's sentencepiece backend with upstream's splitting at
`<image>`, 4.x's `legacy` and non-legacy (`add_prefix_space`) rules, BOS and decoding;
`plugin.register` makes it vLLM's `--tokenizer-mode feallm_llava`.
"""

from __future__ import annotations

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

TOKENIZER_MODE = "feallm_llava"
IMAGE_TOKEN = "<image>"
SPIECE_UNDERLINE = "\u2581"


class LlavaLlamaTokenizer(SentencePieceBackend):
    """sentencepiece's own encode/decode per text span, BOS first (`add_bos_token`)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("legacy", True)
        self.add_bos_token = kwargs.pop("add_bos_token", True)
        self.add_eos_token = kwargs.pop("add_eos_token", False)
        self.add_prefix_space = kwargs.pop("add_prefix_space", True)
        super().__init__(**kwargs)

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """As upstream's `tokenizer_image_token`: the texts around each `<image>` apart."""
        out: list[str] = []
        for i, part in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                out.append(IMAGE_TOKEN)
            out += self._tokenize_text(part, **kwargs)
        return out

    def _tokenize_text(self, text: str, **kwargs) -> list[str]:
        """transformers 4.x `LlamaTokenizer.tokenize`: non-legacy adds the prefix space itself
        (its sentencepiece model has the dummy prefix turned off) and drops it before a
        special token."""
        if self.legacy or not text:
            return super().tokenize(text, **kwargs)
        text = text.replace(SPIECE_UNDERLINE, " ")
        if self.add_prefix_space:
            text = SPIECE_UNDERLINE + text
        tokens = super().tokenize(text, **kwargs)
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if self.add_eos_token and self.eos_token_id is not None else []
        out = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            out += bos + list(token_ids_1) + eos
        return out

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return (int(self.add_bos_token) + int(self.add_eos_token)) * (2 if pair else 1)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Runs of ordinary pieces through sentencepiece's decode (it restores the spaces
        the pieces stand for), special tokens as they are."""
        special = set(self.all_special_tokens)
        out, run = [], []
        for token in tokens:
            if token in special:
                out.append(self.sp_model.decode(run))
                out.append(token)
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode(run))
        return "".join(out)


class CachedLlavaLlamaTokenizer:
    """What vLLM's tokenizer registry loads (`from_pretrained`): the tokenizer above,
    wrapped in vLLM's cache of its special-token and vocabulary properties."""

    @classmethod
    def from_pretrained(cls, path_or_repo_id, *args, trust_remote_code: bool = False, revision=None,
                        download_dir=None, **kwargs):
        from vllm.tokenizers.hf import get_cached_tokenizer

        for key in ("mistral_format", "truncation_side"):
            kwargs.pop(key, None)
        tokenizer = LlavaLlamaTokenizer.from_pretrained(str(path_or_repo_id), *args, revision=revision,
                                                        cache_dir=download_dir, **kwargs)
        tokenizer.truncation_side = "left"
        return get_cached_tokenizer(tokenizer)
