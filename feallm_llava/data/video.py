"""Safe video reading: sampled frames of a video file as RGB PIL images, with their frame
number and time, or a `VideoError` that names the file and says what was wrong.

The decoder is OpenCV's FFmpeg backend (`cv2.VideoCapture(path, cv2.CAP_FFMPEG)`, in the
`opencv-python-headless` wheel: offline, no system FFmpeg needed). What `VideoReader` does:

- refuses before decoding: missing, empty (0 bytes) and directory paths, and files the
  backend cannot open (not a video, an unknown codec, an MP4/MOV cut short: its index,
  the `moov` box, is written at the end and a cut file has none; `mp4_cut_short` says so);
- samples frames: every `every`-th decoded frame, or `fps` frames per second of the
  frames' own timestamps (the first frame at or after each multiple of 1/fps), from
  `start` to `end` seconds; frames between are grabbed (decoded, never converted);
- gives each frame its time from its presentation timestamp, so a variable-frame-rate
  file gets its true times (`notes` says the file is one); frame numbers count decoded
  frames from 0;
- ends with `VideoError` when decoding stops well before the frame count the container
  declares (a truncated or damaged file) or before any frame could be decoded; every
  frame yielded before is whole: the last frame decoded before such a cut may be torn and
  is dropped.

FFmpeg's and OpenCV's own log lines about damaged files are silenced (the error says
it once); set OPENCV_FFMPEG_LOGLEVEL to see them.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from PIL import Image

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"})
DEFAULT_FPS = 2.0   # frames analysed per second when no sampling is given (see Sampling)
_EPS = 1e-4         # seconds: timestamps are rounded by the container's time base


class VideoError(ValueError):
    """An input that is not a usable video (or stops being one); `path` names it, `reason` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


@dataclass(frozen=True)
class Sampling:
    """Which frames of a video are analysed: `every` N-th frame or `fps` per second (one of
    them; neither means DEFAULT_FPS), between `start` and `end` seconds."""

    every: int | None = None
    fps: float | None = None
    start: float = 0.0
    end: float | None = None

    def __post_init__(self):
        if self.every is not None and self.fps is not None:
            raise ValueError("give --every or --fps, not both")
        if self.every is not None and self.every < 1:
            raise ValueError(f"--every must be >= 1, got {self.every}")
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"--fps must be > 0, got {self.fps}")
        if self.start < 0:
            raise ValueError(f"--start must be >= 0 seconds, got {self.start}")
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"--end ({self.end}) must be after --start ({self.start})")
        if self.every is None and self.fps is None:
            object.__setattr__(self, "fps", DEFAULT_FPS)

    def as_dict(self) -> dict:
        return {"every": self.every, "fps": self.fps, "start": self.start, "end": self.end}

    def interval(self, video_fps: float | None) -> float | None:
        """Seconds between sampled frames (nominal), None when the video's rate is unknown."""
        if self.fps is not None:
            return 1.0 / self.fps if not video_fps else max(1.0 / self.fps, 1.0 / video_fps)
        return self.every / video_fps if video_fps else None


@dataclass(frozen=True)
class VideoFrame:
    index: int                      # decoded frame number, from 0
    time_s: float                   # presentation time, seconds from the first frame
    image: Image.Image | None       # RGB; None where the caller did not want it decoded


@dataclass
class VideoInfo:
    fps: float | None               # nominal rate the container declares (None: unknown)
    frame_count: int | None         # frames the container declares or estimates
    width: int
    height: int
    codec: str

    @property
    def duration_s(self) -> float | None:
        return self.frame_count / self.fps if self.fps and self.frame_count else None


def _quiet_ffmpeg() -> None:
    # Read by OpenCV when its FFmpeg backend starts: AV_LOG_QUIET unless the user chose.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


class _QuietOpenCV:
    """OpenCV's own warnings (`can't be used to capture by name`) off while opening."""

    def __enter__(self):
        import cv2

        self.logging = getattr(getattr(cv2, "utils", None), "logging", None)
        if self.logging is not None:
            self.level = self.logging.getLogLevel()
            self.logging.setLogLevel(self.logging.LOG_LEVEL_ERROR)
        return self

    def __exit__(self, *exc):
        if self.logging is not None:
            self.logging.setLogLevel(self.level)


def mp4_cut_short(path: Path) -> str | None:
    """For an ISO media file (MP4/MOV/M4V): why it cannot be played, when the reason is that
    it was cut short (a top-level box runs past the end of the file, or no `moov` box);
    None when its box structure is whole or it is no ISO media file."""
    size = path.stat().st_size
    kinds = []
    with path.open("rb") as f:
        pos = 0
        while pos + 8 <= size:
            f.seek(pos)
            head = f.read(16)
            box, kind = struct.unpack(">I4s", head[:8])
            if box == 1 and len(head) == 16:
                box = struct.unpack(">Q", head[8:16])[0]
            elif box == 0:
                box = size - pos
            if not kind.isascii() or box < 8:
                return None if not kinds else f"damaged MP4 box structure at byte {pos}"
            kinds.append(kind.decode("ascii"))
            if kinds[0] != "ftyp":
                return None
            if pos + box > size:
                missing = "" if "moov" in kinds else "; it has no 'moov' index (written at the end of the file)"
                return (f"truncated MP4: its '{kinds[-1]}' box runs {pos + box - size} bytes past the end "
                        f"of the file{missing}")
            pos += box
    if kinds and kinds[0] == "ftyp" and "moov" not in kinds:
        return "MP4 without a 'moov' index (the file was cut short or never finished)"
    return None


class VideoReader:
    """An opened video. `frames(sampling)` yields its sampled frames; `notes` collects what a
    user should know about the file (variable frame rate, timestamps replaced)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        label = str(path)
        if not self.path.exists():
            raise VideoError(label, "no such file")
        if self.path.is_dir():
            raise VideoError(label, "is a directory, not a video file")
        if self.path.stat().st_size == 0:
            raise VideoError(label, "empty file (0 bytes)")
        _quiet_ffmpeg()
        import cv2

        with _QuietOpenCV():
            cap = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            reason = mp4_cut_short(self.path)
            raise VideoError(label, reason or "not a video OpenCV's FFmpeg backend can open (another kind of "
                                              "file, damaged, or a codec it lacks)")
        self._cap = cap
        fps = cap.get(cv2.CAP_PROP_FPS)
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC))
        self.info = VideoInfo(
            fps=fps if math.isfinite(fps) and 0 < fps < 10_000 else None,
            frame_count=int(count) if math.isfinite(count) and count > 0 else None,
            width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            codec="".join(chr((fourcc >> 8 * i) & 0xFF) for i in range(4)).strip("\0 ") or "?")
        self.notes: list[str] = []
        self.frames_decoded = 0

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------
    def _timestamps(self) -> Iterator[tuple[int, float]]:
        """(frame number, time) of every decodable frame, grabbing (decoding) each."""
        import cv2

        cap, fps = self._cap, self.info.fps
        previous, replaced = None, 0
        index = 0
        while cap.grab():
            t = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            if previous is not None and not t > previous:   # no timestamp, or out of order
                t = previous + (1.0 / fps if fps else 0.0)
                replaced += 1
            self.frames_decoded = index + 1
            yield index, t
            previous = t
            index += 1
        if replaced:
            self.notes.append(f"{replaced} frame(s) without a usable timestamp: their time is the previous "
                              f"frame's plus one frame at the declared rate")

    def _retrieve(self) -> Image.Image:
        import cv2

        ok, bgr = self._cap.retrieve()
        if not ok or bgr is None:
            raise VideoError(self.path, f"frame {self.frames_decoded - 1} could not be converted")
        return Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def frames(self, sampling: Sampling, want_image=lambda index: True) -> Iterator[VideoFrame]:
        """The sampled frames in order; `want_image(index)` False leaves a frame's image None
        (not converted). Raises VideoError at the end when the file stops short."""
        held: VideoFrame | None = None
        deltas: list[float] = []
        t0 = previous = next_t = None
        n_from_start = 0
        stopped_at_end = False
        for index, t in self._timestamps():
            if t0 is None:
                t0 = t  # times count from the first frame (containers may start later)
            t -= t0
            if previous is not None:
                deltas.append(t - previous)
            previous = t
            if t < sampling.start - _EPS:
                continue
            if sampling.end is not None and t > sampling.end + _EPS:
                stopped_at_end = True
                break
            if sampling.every is not None:
                take = n_from_start % sampling.every == 0
            else:
                next_t = sampling.start if next_t is None else next_t
                take = t >= next_t - _EPS
                while next_t <= t + _EPS:
                    next_t += 1.0 / sampling.fps
            n_from_start += 1
            if held is not None:   # the frame after it decoded: it is whole
                yield held
                held = None
            if take:
                held = VideoFrame(index, t, self._retrieve() if want_image(index) else None)
        self._note_variable_rate(deltas)
        cut = None if stopped_at_end else self._cut_short(previous)
        if cut and held is not None and held.index == self.frames_decoded - 1:
            cut += f"; its last decoded frame ({held.index}) may be torn and was left out"
            held = None
        if held is not None:
            yield held
        if cut:
            raise VideoError(self.path, cut)

    def _cut_short(self, last_t: float | None) -> str | None:
        """Why decoding stopped early, when it did (frames and time both well short of what
        the container declares), else None."""
        declared, fps, got = self.info.frame_count, self.info.fps, self.frames_decoded
        if got == 0:
            return "no frame could be decoded (damaged, truncated, or a codec OpenCV's FFmpeg lacks)"
        if not declared or not fps:
            return None
        tolerance = max(2, round(0.02 * declared))
        end_t = (last_t or 0.0) + 1.0 / fps
        if got < declared - tolerance and end_t < declared / fps - tolerance / fps:
            return (f"truncated or damaged video: decoding stopped after {got} of the {declared} frames "
                    f"its container declares ({end_t:.2f} of {declared / fps:.2f} s)")
        return None

    def _note_variable_rate(self, deltas: list[float]) -> None:
        if len(deltas) < 2 or any("variable frame rate" in n for n in self.notes):
            return
        ordered = sorted(deltas)
        typical = ordered[len(ordered) // 2]
        lo, hi = ordered[0], ordered[-1]
        if typical > 0 and (hi - lo) > 0.25 * typical + 2e-3:
            self.notes.append(f"variable frame rate (frames {1000 * lo:.0f} to {1000 * hi:.0f} ms apart): time_s "
                              f"is each frame's own timestamp; --fps samples by time, --every counts frames")

