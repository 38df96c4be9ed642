"""The `feallm` command: one subcommand per pipeline step.

Each subcommand lives in its own module, imported only when it is called (importing
torch for `feallm score` would cost seconds). A module provides
`add_arguments(parser)` and `main(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "tiny-kit": ("feallm_llava.tinykit", "build the offline tiny LLaVA kit (tokenizer, LLM, CLIP)"),
    "build-dataset": ("feallm_llava.data.build", "build the FEA instruction set from labelled faces"),
    "eval": ("feallm_llava.eval.run", "run a model on FEABench / RAF-DB / AffectNet / BP4D / DISFA"),
    "score": ("feallm_llava.eval.score", "score predictions.jsonl files: tables and plots"),
    "analyze": ("feallm_llava.serve.analyze", "per-face expression, AUs and reasoning for photos"),
    "demo": ("feallm_llava.demo", "offline end-to-end run on synthetic FACS faces"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feallm", description="FEALLM for upstream LLaVA")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    return int(importlib.import_module(COMMANDS[args.command][0]).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
