"""Benchmarks (scripts, not timed tests): `python -m feallm_llava.bench <name> [options]`.

Each benchmark is a module with `add_arguments(parser)` and `main(args) -> int`, listed
by name in `feallm_llava.bench.__main__.BENCHMARKS`.
"""
