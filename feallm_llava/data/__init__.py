"""Data: dataset readers, the FEA instruction set and its annotators, synthetic faces.

- `records`: `FaceRecord` (one labelled face), `Annotation` (its three texts),
  `validate_annotation`, `SkipCounter`.
- `affwild2`: Aff-Wild2 reader for both challenge layouts.
- `split`: subject-disjoint split and seeded sampling with per-class caps.
- `templates`: question templates (packaged JSON, `resources/templates/`).
- `annotate_template`: offline, seeded annotator from labels and FACS names.
- `annotate_openai`: GPT-4o annotator (structured output, validation, retries,
  regeneration, fallback, cache, Batch API).
- `annotation_cache`: append-only, crash-safe JSONL cache.
- `build`: the `feallm build-dataset` command.
- `synthetic`: FACS faces drawn from AUs, in Aff-Wild2's layout (the demo's data).
- `images`: safe image loading; `video`: safe video reading (sampled frames, their
  times, truncated files); `llava_json`: LLaVA conversation-file checks.
- `synthetic_video`: the synthetic faces moving and changing expression in a video.

The label spaces and the text parser are one floor down, in `feallm_llava.facs`.
"""
