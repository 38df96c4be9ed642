"""Append-only JSONL files that survive SIGKILL (the annotation cache, predictions.jsonl).

Writing: each record becomes one line, handed to the kernel in a single `write(2)` on an
`O_APPEND` descriptor (a short write, e.g. a nearly full disk, goes on where it stopped),
so a process killed at any moment leaves only whole lines; a machine that dies mid-write
leaves at worst one torn last line without its newline. `fsync` makes lines durable:
after every line (`fsync_each=True`) or when the file is closed.

Reading: only whole lines count; a torn tail is reported (its size in bytes) and left
alone. Opening a `JsonlAppender` cuts such a tail off, so the next line starts clean.
A whole line that is not JSON is never skipped: it raises `DamagedLine` naming file and
line, and the caller says what to do about it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_BLOCK = 1 << 16  # bytes read per step when looking backwards for the last newline


class DamagedLine(ValueError):
    """A whole (newline-terminated) line of a JSONL file that is not JSON."""

    def __init__(self, path: Path, lineno: int, error: ValueError):
        super().__init__(f"{path}:{lineno}: not a JSON line ({error})")
        self.path, self.lineno, self.error = path, lineno, error


def read_lines(path: Path | str) -> tuple[list[tuple[int, Any]], int]:
    """([(line number, parsed value)] of every whole non-blank line, torn tail bytes).

    Line numbers start at 1. A missing file reads as ([], 0). The file is not changed.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
    values: list[tuple[int, Any]] = []
    for lineno, raw in enumerate(data[:end].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            values.append((lineno, json.loads(raw)))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DamagedLine(path, lineno, err) from None
    return values, len(data) - end


def cut_torn_tail(path: Path | str) -> int:
    """Truncate `path` after its last newline (durably); the number of bytes cut."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        keep, end = 0, size
        while end > 0:  # scan back block by block: a large file is not read whole
            start = max(0, end - _BLOCK)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        if keep < size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return size - keep


class LineAppender:
    """Appends whole lines to `path` (created with its folder when missing), each call's
    text in one `write(2)`; a torn tail left by an earlier writer is cut off first.

    Not thread-safe: callers that append from several threads hold their own lock.
    """

    def __init__(self, path: Path | str, *, fsync_each: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync_each = fsync_each
        if self.path.exists():
            cut_torn_tail(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, text: str) -> None:
        """Append `text`, which ends with a newline (one or more whole lines)."""
        if self._fd < 0:
            raise ValueError(f"{self.path}: append after close")
        view = memoryview(text.encode("utf-8"))
        while view:  # a regular file takes it in one call; loop for the rare partial write
            view = view[os.write(self._fd, view):]
        if self.fsync_each:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JsonlAppender(LineAppender):
    """Appends records as whole JSON lines."""

    def __init__(self, path: Path | str, *, sort_keys: bool = False, fsync_each: bool = False):
        super().__init__(path, fsync_each=fsync_each)
        self.sort_keys = sort_keys

    def append(self, record: Any) -> None:
        self.write(json.dumps(record, ensure_ascii=False, sort_keys=self.sort_keys) + "\n")
