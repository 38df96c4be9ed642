"""Serving and analysis: FEALLM checkpoints behind LLaVA's controller / model_worker /
Gradio stack, and `feallm analyze` for photos and videos (face detection in `detect`,
tracking across frames in `track`, then one row per face and frame with the expression,
the 12 AUs and the reasoning; `temporal` smooths them over time, `timeline` and
`annotate_png` / `annotate_video` draw them)."""
