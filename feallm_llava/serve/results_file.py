"""`feallm analyze`'s output file: rows appended as frames finish, resumable.

- `.csv` and `.jsonl`: the rows of each finished frame (a photo is one) are appended in
  one `write(2)` on an `O_APPEND` descriptor (`jsonl.LineAppender`), so an interrupt or a
  kill leaves whole frames only; a torn tail (a machine that died mid-write) is cut off
  when the file is opened again.
- `.json` (one list): held in memory and written atomically when the run ends or is
  interrupted.

`--resume` reads what a file already holds (`previous`: its rows per input, in file
order, and `previous_metadata`) and the run skips what is there: a photo with rows, a
video's finished frames. A CSV resumed must have this version's columns. Without
`--resume`, an existing non-empty file is refused (`--overwrite` starts it again). What the
rows came from (model, template, questions, sampling, smoothing, the videos finished, a
note such as an out-of-domain warning) goes to `<file>.meta.json` beside it, written when
the file is closed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from feallm_llava.errors import UsageError
from feallm_llava.jsonl import DamagedLine, JsonlAppender, LineAppender, cut_torn_tail, read_lines

SUFFIXES = (".csv", ".jsonl", ".json")


class ResultsFile:
    def __init__(self, path: str | os.PathLike, columns: Sequence[str], *, resume: bool = False,
                 overwrite: bool = False):
        self.path = Path(path)
        self.columns = list(columns)
        self.suffix = self.path.suffix.lower()
        if self.suffix not in SUFFIXES:
            raise UsageError(f"--out {self.path}: use a .csv, .jsonl or .json file name")
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if exists and not (resume or overwrite):
            raise UsageError(f"--out {self.path} exists: --resume continues it (its images are not "
                             f"analysed again), --overwrite starts it again")
        if exists and overwrite:
            self.path.unlink()
            exists = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = self._read() if exists else []  # for .json: everything to write
        self.previous: dict[str, list[dict]] = {}
        for row in self.rows:
            self.previous.setdefault(row["input"], []).append(row)
        self.done = set(self.previous)
        self.previous_metadata: dict = self._read_metadata() if exists else {}
        self.metadata: dict = {}  # written to <file>.meta.json on close
        self._appender = None
        if self.suffix == ".jsonl":
            self._appender = JsonlAppender(self.path)
        elif self.suffix == ".csv":
            new = not self.path.is_file() or self.path.stat().st_size == 0
            self._appender = LineAppender(self.path)
            if new:
                self._write_csv([dict(zip(self.columns, self.columns))])
        if self.suffix != ".json":
            self.rows = []  # appended at once: nothing kept in memory

    # -- reading what a file holds -------------------------------------------------------
    def _read(self) -> list[dict]:
        if self.suffix == ".json":
            try:
                rows = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise UsageError(f"{self.path}:{err.lineno}: not a results file ({err.msg}); "
                                 f"--overwrite starts it again") from None
            return rows if isinstance(rows, list) else []
        if self.suffix == ".jsonl":
            try:
                lines, _torn = read_lines(self.path)
            except DamagedLine as err:
                raise UsageError(f"{err}; delete that line or --overwrite") from None
            return [value for _lineno, value in lines if isinstance(value, dict) and "input" in value]
        cut_torn_tail(self.path)  # a CSV row may span lines (quoted newlines); a torn one never ends in one
        with self.path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "input" not in reader.fieldnames:
                raise UsageError(f"{self.path}: not an analyze results file (no 'input' column); "
                                 f"--overwrite starts it again")
            if reader.fieldnames != self.columns:
                missing = [c for c in self.columns if c not in reader.fieldnames]
                raise UsageError(f"{self.path}: its columns are not this version's (missing: "
                                 f"{', '.join(missing) or 'none'}; order or extra ones differ otherwise), so "
                                 f"rows cannot be added to it; --overwrite starts it again, or choose another --out")
            return list(reader)

    def _read_metadata(self) -> dict:
        try:
            meta = json.loads(self.metadata_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}   # missing (a killed run never closed the file) or damaged: rows alone decide
        return meta if isinstance(meta, dict) else {}

    # -- writing ---------------------------------------------------------------------------
    def add(self, rows: list[dict]) -> None:
        """The rows of one finished frame, all at once."""
        rows = [{c: row.get(c) for c in self.columns} for row in rows]
        if self.suffix == ".json":
            self.rows.extend(rows)
        elif self.suffix == ".jsonl":
            for row in rows:
                self._appender.append(row)
        else:
            self._write_csv(rows)

    def _write_csv(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
        self._appender.write(buf.getvalue())  # one write: whole rows

    @property
    def metadata_path(self) -> Path:
        return self.path.with_name(self.path.name + ".meta.json")

    def close(self) -> None:
        if self._appender is not None:
            self._appender.close()
            self._appender = None
        if self.suffix == ".json":
            _write_json(self.path, self.rows)
        if self.metadata:
            _write_json(self.metadata_path, self.metadata)

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_json(path: Path, value) -> None:
    """Atomically: the old file or the new one, never a torn one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, path)
