"""FEALLM's web UI (`python -m feallm_llava.ui`, `feallm-ui`): a current Gradio page that
speaks HTTP to upstream LLaVA's controller or to any OpenAI-compatible server.

- `backends`: the two protocols (no torch, no llava: the UI runs in .venv-ui).
- `chat`: a chat history -> the turns and the one image LLaVA-1.5 sees.
- `faces`: the Analyze tab's work through `serve.analyze` (detector, questions, parser).
- `app`: the Gradio page and the command line.

Only `app` imports gradio; the rest runs (and is tested) in the stack's environment too.
"""
