"""Evaluation: benchmark readers, runners, the text parser, metrics and reports; the
benchmarks as lmms-eval tasks (`lmms_tasks`) and lmms-eval's `feallm` model (`lmms_model`)."""
