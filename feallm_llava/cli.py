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
    "train-tiny": ("feallm_llava.recipe", "both training stages on the tiny kit, on CPU, through llava's train_mem"),
    "build-dataset": ("feallm_llava.data.build", "build the FEA instruction set from labelled faces"),
    "eval": ("feallm_llava.eval.run", "run a model on FEABench / RAF-DB / AffectNet / BP4D / DISFA"),
    "score": ("feallm_llava.eval.score", "score predictions.jsonl files: tables and plots"),
    "analyze": ("feallm_llava.serve.analyze", "per-face expression, AUs and reasoning for photos"),
    "demo": ("feallm_llava.demo", "offline end-to-end run on synthetic FACS faces"),
}


def subcommand_parser(prog: str, description: str, table: dict[str, tuple[str, str]],
                      chosen: str | None = None) -> argparse.ArgumentParser:
    """A parser with one subcommand per `table` entry; only `chosen`'s module is imported."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command, (module, help_text) in table.items():
        p = sub.add_parser(command, help=help_text, description=help_text)
        if command == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def dispatch(prog: str, description: str, table: dict[str, tuple[str, str]], argv: list[str] | None) -> int:
    """Run `table[argv[0]]`'s module: `add_arguments(parser)` then `main(args)`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = argv[0] if argv and argv[0] in table else None
    args = subcommand_parser(prog, description, table, chosen).parse_args(argv)
    if args.command is None:
        subcommand_parser(prog, description, table).print_help()
        return 2
    return int(importlib.import_module(table[args.command][0]).main(args) or 0)


PROG = ("feallm", "FEALLM for upstream LLaVA")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    return subcommand_parser(*PROG, COMMANDS, command)


def main(argv: list[str] | None = None) -> int:
    return dispatch(*PROG, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
