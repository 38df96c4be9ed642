"""Serving and analysis: FEALLM checkpoints behind LLaVA's controller / model_worker /
Gradio stack, and `feallm analyze` for photos (face detection in `detect`, then one
row per face with the expression, the 12 AUs and the reasoning)."""
