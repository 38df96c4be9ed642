"""FEALLM as a vLLM model plugin (imported only where vLLM is installed: `.venv-vllm`).

- `plugin.register`: the `vllm.general_plugins` entry point (model class, tokenizer mode).
- `model.FeallmLlavaForConditionalGeneration`: vLLM's CLIP and Llama around this
  package's FEALLM projector (`feallm_llava.model`), N + 1 tokens an image.
- `processing`: LLaVA-1.5's square padding and CLIP preprocessing, the image placeholders.
- `tokenizer`: upstream LLaVA's sentencepiece tokenization under transformers 5.

The folder it serves is written by `feallm export-vllm` (`integration.export_vllm`).
"""
