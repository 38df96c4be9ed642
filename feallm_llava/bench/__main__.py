"""Dispatcher: `python -m feallm_llava.bench <name> [options]`.

Adding a benchmark = one entry in BENCHMARKS (name -> module, help) plus that module,
which provides `add_arguments(parser)` and `main(args) -> int`. Modules are imported only
when their benchmark runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS: dict[str, tuple[str, str]] = {
    "projector": ("feallm_llava.bench.projector",
                  "forward time and size: CLIP tower vs mlp2x_gelu vs FEALLM projector"),
    "throughput": ("feallm_llava.bench.throughput", "batched generation throughput of the eval runner"),
    "annotate": ("feallm_llava.bench.annotate", "annotation throughput against a fake OpenAI service"),
}


def build_parser(name: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m feallm_llava.bench",
                                     description="feallm-llava benchmarks")
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for bench, (module, help_text) in BENCHMARKS.items():
        p = sub.add_parser(bench, help=help_text, description=help_text)
        if bench == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv and argv[0] in BENCHMARKS else None
    args = build_parser(name).parse_args(argv)
    if args.benchmark is None:
        build_parser().print_help()
        return 2
    return importlib.import_module(BENCHMARKS[args.benchmark][0]).main(args)


if __name__ == "__main__":
    sys.exit(main())
