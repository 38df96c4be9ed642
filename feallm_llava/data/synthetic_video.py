"""Synthetic FACS videos: the faces of `data.synthetic` moving across a frame and changing
expression over time, written with OpenCV's VideoWriter, with the truth of every frame.

For the video tests and the video benchmark: each person is a synthetic subject
(`Identity`, the same one `write_affwild2` draws for that subject index and seed, so a
demo's held-out subjects can appear in a video), drawn as its square face picture (the
framing the demo's model was trained on: `render_face` with the demo's per-frame
nuisance) pasted at a position that moves linearly from `start` to `end`. Its expression
changes every `segment` frames (`sample_expression`: a FACS prototype with random missing
and extra AUs, intensities jittered per frame as in `write_affwild2`). A person can be
left out of given frames (`hidden`), to test what a tracker does with missed faces.

The container follows the file name: `.mp4` / `.mov` / `.m4v` MPEG-4 Part 2 ('mp4v'),
`.avi` / `.mkv` Motion JPEG (an AVI cut short still plays up to the cut), `.webm` VP8.
Deterministic given the arguments.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from feallm_llava.data.synthetic import Identity, Nuisance, SyntheticConfig, render_face, sample_expression, video_name

FOURCC = {".mp4": "mp4v", ".mov": "mp4v", ".m4v": "mp4v", ".avi": "MJPG", ".mkv": "MJPG", ".webm": "VP80"}


@dataclass(frozen=True)
class Person:
    """One face of a synthetic video: subject `subject` of a `write_affwild2(seed=seed)` set,
    its face picture's top-left corner moving from `start` to `end` (pixels)."""

    subject: int
    start: tuple[int, int]
    end: tuple[int, int]
    hidden: frozenset[int] = frozenset()   # frames where the person is not drawn
    seed: int = 0

    @property
    def name(self) -> str:
        return video_name(self.subject)

    def at(self, frame: int, frames: int) -> tuple[int, int]:
        u = frame / max(1, frames - 1)
        return (round(self.start[0] + u * (self.end[0] - self.start[0])),
                round(self.start[1] + u * (self.end[1] - self.start[1])))


@dataclass
class SyntheticVideo:
    path: Path
    frames: int
    fps: float
    size: tuple[int, int]
    face_size: int
    truth: list[dict] = field(default_factory=list)   # one entry per drawn face and frame

    def truth_of(self, frame: int) -> list[dict]:
        return [t for t in self.truth if t["frame"] == frame]


def write_synthetic_video(path: str | os.PathLike, people: Sequence[Person], *, frames: int = 24, fps: float = 8.0,
                          size: tuple[int, int] = (320, 240), face_size: int = 96, segment: tuple[int, int] = (6, 10),
                          seed: int = 0, config: SyntheticConfig | None = None) -> SyntheticVideo:
    """Draw and write the video; returns its truth: per frame and drawn person, the box of
    its face picture, the expression and the active AUs (with intensities)."""
    import cv2

    cfg = config or SyntheticConfig()
    path = Path(path)
    fourcc = FOURCC.get(path.suffix.lower())
    if fourcc is None:
        raise ValueError(f"{path}: name it {', '.join(sorted(FOURCC))}")
    width, height = size
    identities = [Identity.sample(np.random.default_rng([p.seed, p.subject]), p.name, cfg) for p in people]
    rngs = [np.random.default_rng([seed, 7919, k, p.subject]) for k, p in enumerate(people)]
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    background = np.rint(np.array([150, 160, 170], np.float32) * (1 - ramp) + np.array([95, 100, 110]) * ramp)
    background = np.broadcast_to(background, (height, width, 3)).astype(np.uint8)

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*fourcc), float(fps), (width, height))
    if not writer.isOpened():
        raise OSError(f"{path}: OpenCV's FFmpeg backend cannot write {fourcc} here")
    video = SyntheticVideo(path, frames, fps, size, face_size)
    state = [{"left": 0, "expression": "Neutral", "aus": {}} for _ in people]
    try:
        for f in range(frames):
            canvas = Image.fromarray(background.copy())
            for k, (person, identity, rng) in enumerate(zip(people, identities, rngs)):
                s = state[k]
                if s["left"] == 0:
                    s["expression"], s["aus"] = sample_expression(rng, cfg)
                    s["left"] = int(rng.integers(segment[0], segment[1] + 1))
                s["left"] -= 1
                lo, hi = cfg.intensity
                aus = {au: float(np.clip(x + rng.uniform(-cfg.intensity_jitter, cfg.intensity_jitter), lo, hi))
                       for au, x in s["aus"].items()}
                face = render_face(aus, identity, rng, size=face_size, nuisance=Nuisance.sample(rng, cfg), config=cfg)
                if f in person.hidden:
                    continue
                x, y = person.at(f, frames)
                canvas.paste(face, (x, y))
                video.truth.append({"frame": f, "time_s": f / fps, "person": k, "subject": person.name,
                                    "box": (x, y, face_size, face_size), "expression": s["expression"],
                                    "aus": sorted(aus), "intensity": {f"AU{au:02d}": round(v, 3)
                                                                      for au, v in sorted(aus.items())}})
            writer.write(np.ascontiguousarray(np.asarray(canvas)[:, :, ::-1]))
    finally:
        writer.release()
    return video


def two_people(frames: int, size: tuple[int, int] = (320, 240), face_size: int = 96,
               subjects: Iterable[int] = (7, 11), hidden: Sequence[Iterable[int]] = ((), ())) -> list[Person]:
    """Two faces that move towards each other's side without meeting: one from the top left
    down and to the right, one from the bottom right up and to the left."""
    width, height = size
    a, b = list(subjects)
    margin = 8
    dx = max(0, min(50, (width - 2 * face_size - 2 * margin - 8) // 2))
    dy = max(0, height - face_size - 2 * margin - 30)
    return [Person(a, (margin, margin), (margin + dx, margin + dy), frozenset(hidden[0])),
            Person(b, (width - face_size - margin, height - face_size - margin),
                   (width - face_size - margin - dx, height - face_size - margin - dy), frozenset(hidden[1]))]
