"""DISFA (Mavadati et al., 2013), zero-shot AUD (paper Tab. 5).

Labels: `ActionUnit_Labels/<SN>/<SN>_au<N>.txt`, one `frame,intensity` line per frame
(intensity 0..5, frames from 1). Present = intensity >= 2 (the usual DISFA protocol). A frame missing from one of the evaluated AU files is
dropped and counted.

Evaluated AUs: those DISFA shares with FEALLM's 12: 1, 2, 4, 6, 12, 25, 26. Sampling:
every `--sample-every`-th (default 50 = 2 %, paper section 5.3) frame of each subject.

Images: DISFA ships videos; users extract the frames themselves. Default layout:
`Images/<SN>/<frame>.jpg` under the data root, i.e. `--image-folder <root>/Images` and
`--frame-pattern "{subject}/{frame}.jpg"` with the label file's 1-based frame number.
Frames written 0-based or zero-padded: e.g. "{subject}/{frame0:05d}.png".
"""

from __future__ import annotations

import re
from pathlib import Path

from feallm_llava.eval.readers import DISFA_FOLDS, FaceRecord, ReaderOptions, ReadResult, frame_layout, frame_path, sample_counted

LABEL_DIR = Path("ActionUnit_Labels")
DISFA_AUS: tuple[int, ...] = (1, 2, 4, 6, 12, 25, 26)  # shared with labels.AUS
DEFAULT_PATTERN = "{subject}/{frame}.jpg"
PRESENT_FROM = 2  # intensity >= 2 (FACS level B) counts as present

_SUBJECT = re.compile(r"^SN\d+$")


def _read_au_file(path: Path) -> dict[int, int]:
    """frame -> intensity."""
    if not path.is_file():
        raise FileNotFoundError(f"DISFA: label file {path} not found (every subject needs one per "
                                f"evaluated AU: {list(DISFA_AUS)})")
    out: dict[int, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not parts[0].isdigit() or not parts[1].isdigit() or int(parts[1]) > 5:
            raise ValueError(f"{path}:{lineno}: expected 'frame,intensity' with intensity 0..5, got {line!r}")
        out[int(parts[0])] = int(parts[1])
    return out


def read(root: Path, options: ReaderOptions) -> ReadResult:
    layout = frame_layout(root, options, bench="DISFA", label_dir=LABEL_DIR, folds=DISFA_FOLDS,
                          image_root=root / "Images", pattern=DEFAULT_PATTERN)
    label_dir = layout.label_dir

    result = ReadResult([])
    subjects = sorted(p.name for p in label_dir.iterdir() if p.is_dir() and _SUBJECT.match(p.name))
    if not subjects:
        raise FileNotFoundError(f"DISFA: no SN<nnn>/ folder in {label_dir}")
    for subject in subjects:
        if not layout.keeps(subject):
            continue
        per_au = {au: _read_au_file(label_dir / subject / f"{subject}_au{au}.txt") for au in DISFA_AUS}
        all_frames = sorted(set().union(*per_au.values()))
        frames = [f for f in all_frames if all(f in v for v in per_au.values())]
        result.dropped["frame missing from an AU file"] += len(all_frames) - len(frames)
        sampled = sample_counted(frames, options.sample_every, result)
        source = label_dir / subject / f"{subject}_au{DISFA_AUS[0]}.txt"
        for frame in sampled:
            result.records.append(FaceRecord(
                id=f"{subject}_{frame}",
                image=frame_path(layout.image_root, layout.pattern, subject=subject, frame=frame),
                source=f"{source} (frame {frame})",
                gt_aus=frozenset(au for au in DISFA_AUS if per_au[au][frame] >= PRESENT_FROM),
                subject=subject))
    if not result.records:
        raise ValueError(f"DISFA: no frame left in {label_dir} (folds {list(options.folds) or 'all'}, "
                         f"dropped: {dict(result.dropped)})")
    return result
