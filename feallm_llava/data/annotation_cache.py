"""Append-only JSONL cache of finished annotations, safe against SIGKILL.

One JSON object per line, each with a `key`. A line is written with a single `os.write`
on a file opened with O_APPEND and then fsync'd, so after a crash (even SIGKILL or a
power loss) the file holds whole finished lines plus, at worst, one torn last line; the
torn line is ignored and cut off when the cache is opened again, and the work it stood
for is redone. A damaged line elsewhere is not ours to guess at: opening raises an error
naming the file and line.

Nothing is ever rewritten: a key written twice keeps its last entry (a later run may
replace a fallback by a better answer).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path


class CacheError(ValueError):
    """A cache file that cannot be trusted; names the file and line."""


class AnnotationCache:
    """`key -> entry dict`, loaded from and appended to a JSONL file."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, dict] = {}
        self.torn_lines = 0  # 1 when a torn last line was dropped on open
        self._lock = threading.Lock()
        self._load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        if end < len(data):
            self.torn_lines = 1
            with open(self.path, "r+b") as f:  # cut it off, so the next append starts clean
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for number, raw in enumerate(data[:end].splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise CacheError(f"{self.path}:{number}: damaged cache line ({err}); delete "
                                 f"that line to redo its image, or move the file away to "
                                 f"start over") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
                raise CacheError(f"{self.path}:{number}: cache line without a string \"key\"")
            self._entries[entry["key"]] = entry

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: str) -> dict | None:
        with self._lock:
            return self._entries.get(key)

    def entries(self) -> list[dict]:
        with self._lock:
            return list(self._entries.values())

    def put(self, entry: dict) -> None:
        """Append `entry` (must hold a string "key") durably, then remember it."""
        if not isinstance(entry.get("key"), str):
            raise ValueError(f"cache entry without a string \"key\": {entry!r}")
        line = (json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            view = memoryview(line)
            while view:  # a short write (disk nearly full) goes on where it stopped
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
            self._entries[entry["key"]] = entry

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> "AnnotationCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
