"""predictions.jsonl: append-only, one JSON line per answered item, resumable.

Safety (`feallm_llava.jsonl`): each line goes to the file in one `write(2)` on an
`O_APPEND` descriptor right after its answer arrives, so a run killed at any moment
(SIGKILL included) leaves only whole lines, at most a torn last line without its newline
if the machine itself dies mid-write. Such a tail is ignored on reading and cut off
before the next append. A complete line that is not JSON is an error naming file and
line: it is never skipped.

Resume: a run first reads the file and answers only the items whose id is not in it.
A run that finishes rewrites the file in item order (write to a temporary file, then
an atomic rename), so finished files are deterministic whatever the concurrency.
Sharding (`--num-chunks K --chunk-idx I`, as upstream LLaVA's eval scripts): chunk I
of K contiguous chunks goes to `predictions.<K>_<I>.jsonl`; `merge_shards` checks that
every item was answered exactly once and writes `predictions.jsonl` in item order.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence, TypeVar

from feallm_llava.jsonl import DamagedLine, JsonlAppender, read_lines

PREDICTIONS = "predictions.jsonl"

T = TypeVar("T")


def shard_path(out_dir: Path, num_chunks: int, chunk_idx: int) -> Path:
    """Where chunk `chunk_idx` of `num_chunks` writes; the whole run when num_chunks == 1."""
    if num_chunks == 1:
        return Path(out_dir) / PREDICTIONS
    return Path(out_dir) / f"predictions.{num_chunks}_{chunk_idx}.jsonl"


def chunk(items: Sequence[T], num_chunks: int, chunk_idx: int) -> list[T]:
    """Chunk `chunk_idx` of `num_chunks` contiguous chunks of ceil(n / k) items."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx must be in 0..{num_chunks - 1} for --num-chunks {num_chunks}, got {chunk_idx}")
    size = math.ceil(len(items) / num_chunks)
    return list(items[chunk_idx * size:(chunk_idx + 1) * size])


def read_predictions(path: Path) -> list[dict]:
    """Every whole line of a predictions file, in file order ([] when there is no file).

    A torn last line (no newline: a crash mid-write) is ignored; a whole line that is
    not a JSON object with an "id" raises ValueError naming the line.
    """
    path = Path(path)
    try:
        lines, _torn_bytes = read_lines(path)
    except DamagedLine as e:
        raise ValueError(f"{path}:{e.lineno}: not a JSON line ({e.error}); the file is damaged: "
                         f"fix or delete that line, then rerun to resume") from e.error
    records: list[dict] = []
    for lineno, record in lines:
        if not isinstance(record, dict) or "id" not in record:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with an 'id', got "
                             f"{json.dumps(record, ensure_ascii=False)[:80]!r}")
        records.append(record)
    return records


def answered_ids(records: Iterable[dict]) -> set[str]:
    return {str(r["id"]) for r in records}


def check_same_run(records: Iterable[dict], path: Path, *, bench: str, model: str) -> None:
    """Refuse to resume into a file written for another benchmark or model."""
    for r in records:
        if r.get("bench") != bench or r.get("model") != model:
            raise ValueError(
                f"{path} holds predictions of model {r.get('model')!r} on {r.get('bench')!r} "
                f"(item {r.get('id')!r}), not of {model!r} on {bench!r}; use another --out "
                f"directory or remove that file")


class PredictionWriter:
    """Appends records as whole lines (a torn tail is cut first); a context manager.
    Lines reach the disk (fsync) when the writer closes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = JsonlAppender(self.path)

    def write(self, record: dict) -> None:
        self._file.append(record)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_atomic(target: Path, records: Iterable[dict]) -> None:
    tmp = target.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)  # readers see the old file or the new one, never a mix


def sort_in_item_order(path: Path, item_ids: Sequence[str]) -> None:
    """Rewrite a finished predictions file in item order (concurrent backends append in
    completion order). Lines of ids outside `item_ids` keep their order, after the rest."""
    records = read_predictions(path)
    position = {item_id: n for n, item_id in enumerate(item_ids)}
    ordered = sorted(records, key=lambda r: position.get(str(r["id"]), len(position)))
    if ordered != records:
        _write_atomic(Path(path), ordered)


def merge_shards(out_dir: Path, num_chunks: int, item_ids: Sequence[str]) -> Path:
    """Join the K shard files into predictions.jsonl, in `item_ids` order.

    Raises when an item is unanswered (naming the chunk to rerun) or when a shard holds
    an id that is not an item of this benchmark. A duplicate id (two runs of one chunk)
    keeps its first answer.
    """
    out_dir = Path(out_dir)
    by_id: dict[str, dict] = {}
    for idx in range(num_chunks):
        path = shard_path(out_dir, num_chunks, idx)
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run --num-chunks {num_chunks} --chunk-idx {idx} first")
        for r in read_predictions(path):
            by_id.setdefault(str(r["id"]), r)
    expected = list(item_ids)
    unknown = sorted(set(by_id) - set(expected))
    if unknown:
        raise ValueError(f"shards in {out_dir} hold {len(unknown)} id(s) that are not items of this "
                         f"benchmark run (e.g. {unknown[:3]}); merge with the same --bench/--data/--limit")
    missing = [i for i in expected if i not in by_id]
    if missing:
        size = math.ceil(len(expected) / num_chunks)
        position = {item_id: n for n, item_id in enumerate(expected)}
        chunks = sorted({position[i] // size for i in missing})
        raise ValueError(f"{len(missing)} of {len(expected)} items are unanswered (e.g. {missing[:3]}); "
                         f"rerun --chunk-idx {', '.join(map(str, chunks))} (it resumes), then merge again")
    target = out_dir / PREDICTIONS
    _write_atomic(target, (by_id[i] for i in expected))
    return target
