"""Inference backends: how a question about an image becomes an answer.

- `llava_runner.LlavaBackend`: a LLaVA checkpoint (FEALLM or any upstream projector)
  loaded with upstream's `load_pretrained_model`, prompted with upstream's conversation
  templates, batched greedy decoding. The only module outside the llava integration
  that calls llava, and only its public loader, templates and image helpers.
- `openai_client.OpenAIBackend`: any OpenAI-compatible chat endpoint (vLLM, SGLang, an API).

Both answer `Query` objects; `feallm eval`, `feallm analyze`, the demo and the benchmarks
share them.
"""

from __future__ import annotations

from typing import Protocol

from PIL import Image


class Query(Protocol):
    """What a backend reads from a question: an id for messages, the text, the image.

    A query may also carry `image` (the path of its file) and `crop` (a face box, or
    None): the OpenAI client then sends an uncropped file's own bytes.
    """

    id: str
    question: str

    def load_image(self) -> Image.Image: ...
