"""The errors every `feallm` command turns into one line and an exit status.

Exit status contract of the `feallm` command (and `python -m feallm_llava.bench`):

    0    everything asked for was done
    1    done, but some items failed: they are counted and listed in the output
    2    bad usage or bad input (a missing path, a malformed line, an unknown flag value,
         a server refusing the request): one line naming the file / line / flag
    70   an internal error (a bug): one line; `--debug` shows the traceback
    130  interrupted (Ctrl-C, SIGTERM) after saving what was finished

A traceback is printed only with `--debug` or FEALLM_DEBUG=1.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ITEMS_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


class FeallmError(Exception):
    """An error the user can act on; its message says what was wrong and where."""

    exit_code = EXIT_BAD_INPUT


class UsageError(FeallmError, ValueError):
    """Bad flags or bad input, found before or while the work runs."""
