"""Append-only JSONL cache of finished annotations, safe against SIGKILL.

One JSON object per line, each with a `key`, written and fsync'd line by line through
`feallm_llava.jsonl`, so after a crash (even SIGKILL or a power loss) the file holds
whole finished lines plus, at worst, one torn last line; the torn line is ignored and
cut off when the cache is opened again, and the work it stood for is redone. A damaged
line elsewhere is not ours to guess at: opening raises an error naming the file and line.

Nothing is ever rewritten: a key written twice keeps its last entry (a later run may
replace a fallback by a better answer).
"""

from __future__ import annotations

import threading
from pathlib import Path

from feallm_llava.jsonl import DamagedLine, JsonlAppender, read_lines


class CacheError(ValueError):
    """A cache file that cannot be trusted; names the file and line."""


class AnnotationCache:
    """`key -> entry dict`, loaded from and appended to a JSONL file."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._entries: dict[str, dict] = {}
        self.torn_lines = 0  # 1 when a torn last line was dropped on open
        self._lock = threading.Lock()
        self._load()
        # opening cuts the torn line off, so the next append starts clean
        self._file = JsonlAppender(self.path, sort_keys=True, fsync_each=True)

    def _load(self) -> None:
        try:
            lines, torn_bytes = read_lines(self.path)
        except DamagedLine as err:
            raise CacheError(f"{self.path}:{err.lineno}: damaged cache line ({err.error}); delete "
                             f"that line to redo its image, or move the file away to "
                             f"start over") from None
        self.torn_lines = int(torn_bytes > 0)
        for number, entry in lines:
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
        with self._lock:
            self._file.append(entry)
            self._entries[entry["key"]] = entry

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> "AnnotationCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
