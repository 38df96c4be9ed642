"""Evaluation: benchmark readers, runners, the text parser, metrics and reports."""
