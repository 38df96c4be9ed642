"""Temporal smoothing of a video's per-frame readings (`feallm analyze --smooth K`).

A face's expression and each AU at a sampled frame become the vote of the same face
(`face_id`) over a centred window of K sampled frames (K odd: the frame, (K-1)/2 before
and (K-1)/2 after): the most frequent expression, and an AU active when most frames that
know it say so. A tie goes to the value of the frame nearest the centre (the frame itself
first, then the earlier of two equally near). Only values a frame answered itself are
smoothed: a frame whose answer named no expression, or no AU at all, or failed, keeps its
empty cell. Frames where the face was not found are not in its window; a window is cut
at the ends of the video.

With probabilities (`probabilities`: a label column -> its probability columns), the
vote is on them: the window's mean probabilities, their argmax for the expression (of
`p_<Expression>` columns) and mean >= 0.5 for an AU (its `AUxx_p`), over the frames of the
window that have them; the probability columns themselves stay each frame's own.

A frame is released once the K // 2 frames after it are answered (or the video ended):
rows still reach the output as frames finish, K // 2 frames late. The per-frame values
every vote reads are kept beside the rows (`raw`), never overwritten, and can be read
back from a results file's raw answers, so a resumed run smooths the frames after the
interrupt as an uninterrupted one would.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Unit = TypeVar("Unit")

# Per face of a frame: column -> its own (unsmoothed) value; a frame's readings are
# {face_id: {column: value}}.
Readings = dict[int, dict[str, object]]


def vote(values: Sequence[object]) -> object:
    """The most frequent known value of `values` (ordered nearest to the centre first);
    ties go to the nearest; None when none is known."""
    known = [v for v in values if v is not None and v != ""]
    if not known:
        return None
    counts = Counter(known)
    best = max(counts.values())
    return next(v for v in known if counts[v] == best)


def _centre_first(i: int, lo: int, hi: int) -> list[int]:
    order = [i]
    for d in range(1, max(i - lo, hi - i) + 1):
        order += [j for j in (i - d, i + d) if lo <= j <= hi]
    return order


class Smoother(Generic[Unit]):
    """Holds a video's answered frames until their window is complete, then smooths them.

    `push(unit)` takes the next frame (in order) and returns the frames now ready, in
    order; `finish()` returns the rest. `readings(unit)` gives a frame's own values,
    `apply(unit, smoothed)` writes {face_id: {column: value}} into its rows; `resumed(unit)`
    marks a frame already written (it is read by the votes, never changed)."""

    def __init__(self, window: int, readings: Callable[[Unit], Readings],
                 apply: Callable[[Unit, Readings], None], resumed: Callable[[Unit], bool],
                 probabilities: dict[str, tuple[str, ...]] | None = None):
        if window < 0 or (window > 1 and window % 2 == 0):
            raise ValueError(f"--smooth wants an odd window of frames (3, 5, ...) or 0 for none, got {window}")
        self.half = window // 2
        self.readings, self.apply, self.resumed = readings, apply, resumed
        self.probabilities = probabilities or {}
        self._p_columns = {c for cols in self.probabilities.values() for c in cols}
        self.units: list[Unit] = []
        self.cached: list[Readings] = []
        self.next = 0   # position in `units` of the next frame to release

    def push(self, unit: Unit) -> list[Unit]:
        self.units.append(unit)
        self.cached.append(self.readings(unit))
        return self._release(lambda pos: pos + self.half < len(self.units))

    def finish(self) -> list[Unit]:
        return self._release(lambda pos: pos < len(self.units))

    def _release(self, ready) -> list[Unit]:
        out = []
        while self.next < len(self.units) and ready(self.next):
            i = self.next
            if self.half and not self.resumed(self.units[i]):
                self.apply(self.units[i], self._smoothed(i))
            out.append(self.units[i])
            self.next += 1
        drop = max(0, self.next - self.half)   # keep the frames later windows still read
        if drop:
            del self.units[:drop], self.cached[:drop]
            self.next -= drop
        return out

    def _smoothed(self, i: int) -> Readings:
        order = _centre_first(i, max(0, i - self.half), min(len(self.units) - 1, i + self.half))
        out: Readings = {}
        for face_id, own in self.cached[i].items():
            out[face_id] = {}
            window = [self.cached[j].get(face_id, {}) for j in order]
            for column, value in own.items():
                if value is None or value == "" or column in self._p_columns:
                    continue
                by_mean = self._mean_vote(column, window)
                out[face_id][column] = by_mean if by_mean is not None else vote([r.get(column) for r in window])
        return out

    def _mean_vote(self, column: str, window: list[dict]) -> object:
        """The label the window's mean probabilities give `column`; None without them."""
        columns = self.probabilities.get(column)
        if not columns:
            return None
        rows = [[r.get(c) for c in columns] for r in window]
        rows = [v for v in rows if all(x is not None and x == x for x in v)]  # (NaN: an empty CSV cell)
        if not rows:
            return None
        mean = [sum(v[k] for v in rows) / len(rows) for k in range(len(columns))]
        if len(columns) == 1:
            return int(mean[0] >= 0.5)
        return columns[max(range(len(columns)), key=mean.__getitem__)].removeprefix("p_")
