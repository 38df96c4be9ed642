"""Face tracking across the sampled frames of a video: a stable `face_id` per person.

IoU tracking (the SORT family without its Kalman filter): each detection of a frame is
matched to the live track it overlaps most, greedily by intersection over union, when
that IoU reaches `min_iou`. A track's box is compared where the face was last seen and
where it would be had it kept its last velocity (so a face moving between sampled
frames, or missed for a few frames while moving, is still found); the larger IoU counts.
A track missed for more than `memory` sampled frames ends; a later detection there gets
a new id. New ids count from 0 in order of first appearance, left to right within a frame,
so a photo's faces get 0, 1, ... left to right, as before tracking existed.

The tracker's state is a function of the boxes and ids of the frames it has seen, which
`feallm analyze` writes into its rows: `observe` replays them, so a resumed run gives the
frames after the interrupt the ids an uninterrupted run would have given.
"""

from __future__ import annotations

from dataclasses import dataclass

from feallm_llava.serve.detect import FaceBox

Box = tuple[int, int, int, int]


def iou(a: Box, b: Box) -> float:
    return FaceBox(*a, 0.0).iou(b)


@dataclass
class Track:
    id: int
    box: Box
    step: int                                     # sampled frame at which it was last seen
    velocity: tuple[float, float] = (0.0, 0.0)    # box shift per sampled frame

    def predicted(self, step: int) -> Box:
        gap = step - self.step
        x, y, w, h = self.box
        return (round(x + self.velocity[0] * gap), round(y + self.velocity[1] * gap), w, h)

    def overlap(self, box: Box, step: int) -> float:
        return max(iou(self.box, box), iou(self.predicted(step), box))


class IouTracker:
    """Ids for the faces of consecutive sampled frames; `update` once per frame, in order."""

    def __init__(self, min_iou: float = 0.3, memory: int = 5):
        if not 0.0 < min_iou <= 1.0:
            raise ValueError(f"--track-iou must be in (0, 1], got {min_iou}")
        if memory < 0:
            raise ValueError(f"track memory must be >= 0 sampled frames, got {memory}")
        self.min_iou = min_iou
        self.memory = memory
        self.tracks: dict[int, Track] = {}
        self.next_id = 0
        self.step = -1

    def _advance(self) -> int:
        self.step += 1
        self.tracks = {i: t for i, t in self.tracks.items() if self.step - t.step <= self.memory + 1}
        return self.step

    def update(self, boxes: list[FaceBox] | list[Box]) -> list[int]:
        """The id of each box of the next sampled frame (same order as `boxes`)."""
        step = self._advance()
        boxes = [b.as_tuple() if isinstance(b, FaceBox) else tuple(b) for b in boxes]
        pairs = sorted(((t.overlap(b, step), -t.id, k, t.id) for k, b in enumerate(boxes)
                        for t in self.tracks.values()), reverse=True)
        ids: list[int | None] = [None] * len(boxes)
        taken: set[int] = set()
        for score, _tie, k, track_id in pairs:
            if score < self.min_iou:
                break
            if ids[k] is None and track_id not in taken:
                ids[k] = track_id
                taken.add(track_id)
        for k in range(len(boxes)):   # boxes come left to right: new faces get ids in that order
            if ids[k] is None:
                ids[k] = self.next_id
                self.next_id += 1
        self._place(step, boxes, ids)
        return ids  # type: ignore[return-value]

    def observe(self, boxes: list[Box], ids: list[int]) -> None:
        """Replay a frame whose ids are known (a resumed run's finished frames)."""
        step = self._advance()
        self._place(step, [tuple(b) for b in boxes], list(ids))
        if ids:
            self.next_id = max(self.next_id, max(ids) + 1)

    def _place(self, step: int, boxes: list[Box], ids: list[int]) -> None:
        for box, track_id in zip(boxes, ids):
            old = self.tracks.get(track_id)
            velocity = (0.0, 0.0)
            if old is not None and step > old.step:
                velocity = ((box[0] - old.box[0]) / (step - old.step), (box[1] - old.box[1]) / (step - old.step))
            self.tracks[track_id] = Track(track_id, box, step, velocity)
