"""vLLM's entry point (`vllm.general_plugins` in setup.cfg): runs in every vLLM process.

Registers the model class by its import path (vLLM imports it only when a config names
`FeallmLlavaForConditionalGeneration`) and the tokenizer mode `feallm_llava`
(`launch/serve_vllm.sh` passes it: upstream LLaVA's sentencepiece tokenization).
"""

from __future__ import annotations

ARCHITECTURE = "FeallmLlavaForConditionalGeneration"


def register() -> None:
    from vllm import ModelRegistry
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    from feallm_llava.vllm.tokenizer import TOKENIZER_MODE

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "feallm_llava.vllm.model:FeallmLlavaForConditionalGeneration")
    if TOKENIZER_MODE not in TokenizerRegistry.tokenizers:
        TokenizerRegistry.register(TOKENIZER_MODE, "feallm_llava.vllm.tokenizer", "CachedLlavaLlamaTokenizer")
    if TOKENIZER_MODE not in RENDERER_REGISTRY.renderers:
        # a tokenizer mode names its prompt renderer too: HF's chat-template renderer
        RENDERER_REGISTRY.register(TOKENIZER_MODE, "vllm.renderers.hf", "HfRenderer")
