"""An annotated MP4 of a video's analysis (`feallm analyze clip.mp4 --annotate out.mp4`).

One output frame per sampled frame, drawn as `annotate_png.annotate_image` draws a photo
(a box and '#id Expression | AUs' per face, in the face's colour, which follows its
`face_id` through the video), with the frame number and time in the bottom-left corner
and the run's `--note` on a band below. Played at the sampling rate (a video sampled at
2 frames per second plays in real time); the times printed are the frames' own.

Written with OpenCV's VideoWriter through its FFmpeg backend as MPEG-4 Part 2 ('mp4v'),
the codec every opencv-python wheel can encode (H.264 encoders are not in the wheels);
odd frame sizes are padded by one pixel (the encoder wants even ones). The writer is
released when the video ends or the run is interrupted, so the file plays either way.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from feallm_llava.serve.annotate_png import _font, _label, annotate_image


class VideoAnnotator:
    def __init__(self, path: str | os.PathLike, fps: float, caption: str | None = None):
        self.path = Path(path)
        self.fps = fps if fps and fps > 0 else 1.0
        self.caption = caption
        self.frames = 0
        self._writer = None
        self._size: tuple[int, int] | None = None

    def add(self, img: Image.Image, rows: list[dict], frame: int | None, time_s: float | None) -> None:
        import cv2

        out = annotate_image(img, rows, self.caption)
        if frame is not None:
            draw = ImageDraw.Draw(out)
            font = _font(max(10, min(img.size) // 32))
            stamp = f"frame {frame}" + (f"  {time_s:.2f} s" if time_s is not None else "")
            height = draw.textbbox((0, 0), stamp, font=font)[3]
            _label(draw, (0, img.height - height - 2 * max(2, height // 5)), stamp, font, (235, 235, 235),
                   above=False)
        if self._writer is None:
            self._size = (out.width + out.width % 2, out.height + out.height % 2)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = cv2.VideoWriter(str(self.path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"mp4v"),
                                           float(self.fps), self._size)
            if not self._writer.isOpened():
                self._writer = None
                raise OSError(f"--annotate {self.path}: OpenCV's FFmpeg backend cannot write an MP4 there")
        if out.size != self._size:   # pad to the first frame's (even) size
            padded = Image.new("RGB", self._size, (0, 0, 0))
            padded.paste(out, (0, 0))
            out = padded
        self._writer.write(np.ascontiguousarray(np.asarray(out)[:, :, ::-1]))  # RGB -> BGR
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
