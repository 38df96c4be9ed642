"""Where `feallm analyze` draws its results besides the rows: annotated pictures
(`--annotate`: a PNG per photo, an MP4 per video) and timelines (`--timeline DIR`: a PNG
per face of each video). Both take the run's frames in order (`analyze.FrameResult`),
resumed ones included, so a resumed run draws whole videos again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from feallm_llava.errors import UsageError
from feallm_llava.facs.labels import AUS, au_key

_KIND_SUFFIX = {False: ".png", True: ".mp4"}   # Source.video -> what its annotation is
_TIMELINE_COLUMNS = ("frame", "time_s", "face_id", "expression", "error", *(au_key(au) for au in AUS))


def _stems(sources: Sequence) -> dict[str, str]:
    """A file-name stem per input: its own, with its position in front when several inputs
    share one (or for in-memory images)."""
    names = [Path(s.label).stem if s.path is not None else "image" for s in sources]
    clash = len(set(names)) < len(names)
    return {s.label: re.sub(r"[^\w.-]+", "_", f"{i:04d}_{n}" if clash or s.path is None else n)
            for i, (s, n) in enumerate(zip(sources, names))}


def annotation_paths(target: str | os.PathLike, sources: Sequence) -> dict[str, Path]:
    """Where each input's annotation goes.

    One input and a target named like its kind (`.png` for a photo, `.mp4` for a video) is
    that file; otherwise the target (minus a `.png` / `.mp4` suffix) is a directory with one
    `<NNNN>_<stem>.png` per photo and `<NNNN>_<stem>.mp4` per video.
    """
    target = Path(target)
    suffix = target.suffix.lower()
    if len(sources) == 1 and suffix in (".png", ".mp4"):
        want = _KIND_SUFFIX[sources[0].video]
        if suffix != want:
            kind = "a video" if sources[0].video else "a photo"
            raise UsageError(f"--annotate {target}: the annotation of {kind} is a {want} file "
                             f"(name it {target.with_suffix(want).name}, or give a directory)")
        target.parent.mkdir(parents=True, exist_ok=True)
        return {sources[0].label: target}
    folder = target.with_suffix("") if suffix in (".png", ".mp4") else target
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, s in enumerate(sources):
        stem = Path(s.label).stem if s.path is not None else "image"
        out[s.label] = folder / f"{i:04d}_{stem}{_KIND_SUFFIX[s.video]}"
    return out


class Annotations:
    """`--annotate`: each photo's PNG when its frame comes, each video's MP4 frame by frame
    (closed at the video's last frame, or by `close` when the run stops)."""

    def __init__(self, target, sources: Sequence, caption: str | None, sampling):
        self.paths = annotation_paths(target, sources)
        self.caption = caption
        self.sampling = sampling
        self.writers: dict = {}

    def add(self, result) -> None:
        from feallm_llava.serve.annotate_png import annotate_image

        label = result.source.label
        if not result.source.video:
            if result.image is not None:
                annotate_image(result.image, result.rows, self.caption).save(self.paths[label], format="PNG")
            return
        if result.image is not None:
            if label not in self.writers:
                from feallm_llava.serve.annotate_video import VideoAnnotator

                info = result.stream.info
                interval = self.sampling.interval(info.fps if info else None)
                self.writers[label] = VideoAnnotator(self.paths[label], 1.0 / interval if interval else 1.0,
                                                     self.caption)
            self.writers[label].add(result.image, result.rows, result.frame, result.time_s)
        if result.last and label in self.writers:
            self.writers.pop(label).close()

    def close(self) -> None:
        while self.writers:
            self.writers.popitem()[1].close()


class Timelines:
    """`--timeline DIR`: collects each video's rows and writes its faces' timelines when it
    ends (what a stopped run had of a video: by `close`, titled partial)."""

    def __init__(self, folder, sources: Sequence, smooth: dict | None):
        self.folder = Path(folder)
        self.stems = _stems(sources)
        self.note = f"expression and AUs smoothed over {smooth['window']} sampled frames" if smooth else None
        self.rows: dict[str, list[dict]] = {}
        self.written: list[Path] = []

    def add(self, result) -> None:
        if not result.source.video:
            return
        label = result.source.label
        self.rows.setdefault(label, []).extend({c: r[c] for c in _TIMELINE_COLUMNS} for r in result.rows)
        if result.last:
            self._write(label, partial=False)

    def _write(self, label: str, partial: bool) -> None:
        from feallm_llava.serve.timeline import write_timelines

        rows = self.rows.pop(label)
        title = Path(label).name + (" (partial: the run stopped)" if partial else "")
        self.written += write_timelines(rows, self.folder, self.stems[label], title, self.note)

    def close(self) -> None:
        for label in list(self.rows):
            self._write(label, partial=True)
