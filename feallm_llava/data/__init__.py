"""Data: label spaces, dataset readers, the FEA instruction set and its annotators.

- `labels`: the 7 expressions, the 12 AUs, FACS names and prototypes.
- `records`: `FaceRecord` (one labelled face), `Annotation` (its three texts),
  `validate_annotation`, `SkipCounter`.
- `affwild2`: Aff-Wild2 reader for both challenge layouts.
- `split`: subject-disjoint split and seeded sampling with per-class caps.
- `templates`: question templates (`datasets/templates/*.json`).
- `annotate_template`: offline, seeded annotator from labels and FACS names.
- `annotate_openai`: GPT-4o annotator (structured output, validation, retries,
  regeneration, fallback, cache, Batch API).
- `annotation_cache`: append-only, crash-safe JSONL cache.
- `build`: the `feallm build-dataset` command.
"""
