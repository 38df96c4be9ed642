"""The `feallm` command: one subcommand per pipeline step.

Each subcommand lives in its own module, imported only when it is called (importing
torch for `feallm score` would cost seconds). A module provides `add_arguments(parser)`
and `main(args) -> int`, and may provide `EXAMPLES` (shown under its help) and
`INTERRUPTED` (what to do after Ctrl-C). Exit statuses: `feallm_llava.errors`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback

from feallm_llava import __version__
from feallm_llava.errors import (EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, FeallmError)

COMMANDS: dict[str, tuple[str, str]] = {
    "tiny-kit": ("feallm_llava.tinykit", "build the offline tiny LLaVA kit (tokenizer, LLM, CLIP)"),
    "train-tiny": ("feallm_llava.recipe", "both training stages on the tiny kit, on CPU, through llava's train_mem"),
    "build-dataset": ("feallm_llava.data.build", "build the FEA instruction set from labelled faces"),
    "eval": ("feallm_llava.eval.run", "run a model on FEABench / RAF-DB / AffectNet / BP4D / DISFA"),
    "score": ("feallm_llava.eval.score", "score predictions.jsonl files: tables and plots"),
    "lmms-tasks": ("feallm_llava.eval.lmms_tasks", "write a benchmark as lmms-eval tasks scored by our parser"),
    "analyze": ("feallm_llava.serve.analyze", "per-face expression, AUs and reasoning for photos and videos"),
    "demo": ("feallm_llava.demo", "offline end-to-end run on synthetic FACS faces"),
    "export-vllm": ("feallm_llava.integration.export_vllm", "a LLaVA checkpoint as one folder vLLM serves"),
}

# What the user got wrong (a path, a line of a file, a flag value): one line, exit 2.
INPUT_ERRORS = (FeallmError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                ValueError)

EXIT_STATUS = ("exit status: 0 done; 1 done, some items failed (counted and listed); 2 bad usage "
               "or input; 70 internal error; 130 interrupted after saving what was finished. --debug "
               "(or FEALLM_DEBUG=1) shows tracebacks.")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and shows every default the help text does not name."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default in (None, False, argparse.SUPPRESS) or "default" in text.lower()
                or action.option_strings == [] or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def subcommand_parser(prog: str, description: str, table: dict[str, tuple[str, str]],
                      chosen: str | None = None) -> argparse.ArgumentParser:
    """A parser with one subcommand per `table` entry; only `chosen`'s module is imported."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=EXIT_STATUS,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"feallm-llava {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also FEALLM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command, (module, help_text) in table.items():
        p = sub.add_parser(command, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if command == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            examples = getattr(mod, "EXAMPLES", "").strip("\n")
            p.epilog = "\n\n".join(part for part in (f"examples:\n{examples}" if examples else "",
                                                     p.epilog or "", EXIT_STATUS) if part)
    return parser


def _interrupt_on_sigterm():
    """SIGTERM unwinds like Ctrl-C, so every command saves what it finished; returns the
    handler it replaced."""
    def handler(_signum, _frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def dispatch(prog: str, description: str, table: dict[str, tuple[str, str]], argv: list[str] | None) -> int:
    """Run `table[argv[0]]`'s module (`add_arguments`, then `main`) under the exit-status contract."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FEALLM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]  # accepted before or after the subcommand
    chosen = next((a for a in argv if not a.startswith("-")), None)
    chosen = chosen if chosen in table else None
    args = subcommand_parser(prog, description, table, chosen).parse_args(argv)
    if args.command is None:
        subcommand_parser(prog, description, table).print_help()
        return EXIT_BAD_INPUT
    name = f"{prog.split()[-1]} {args.command}"
    module = importlib.import_module(table[args.command][0])
    previous = _interrupt_on_sigterm()
    try:
        return int(module.main(args) or EXIT_OK)
    except KeyboardInterrupt:
        hint = getattr(module, "INTERRUPTED", "what was finished is saved")
        print(f"\n{name}: interrupted; {hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except INPUT_ERRORS as err:
        if debug:
            traceback.print_exc()
        print(f"{name}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", EXIT_BAD_INPUT)
    except Exception as err:  # a bug: say so in one line, the traceback on request
        if debug:
            traceback.print_exc()
        print(f"{name}: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        signal.signal(signal.SIGTERM, previous)


PROG = ("feallm", "FEALLM for upstream LLaVA")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    return subcommand_parser(*PROG, COMMANDS, command)


def main(argv: list[str] | None = None) -> int:
    return dispatch(*PROG, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
