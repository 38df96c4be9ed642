"""Five-point similarity alignment: a detected face warped onto the template of the crops a
checkpoint was trained on (`--align`).

FEALLM's training crops are aligned, not boxed: Aff-Wild2's `cropped_aligned` frames
(112 x 112) and RAF-DB's `aligned` images (100 x 100) were made by a similarity transform
(rotation, uniform scale, translation) that puts the eyes, the nose tip and the mouth
corners of every face at fixed points. Aligning a detected face to the same points gives
the model the framing it learned, level eyes whatever the head's roll, and no
detector-specific box offset to calibrate.

Templates (`TEMPLATES`, points in `serve.yunet.LANDMARK_NAMES` order: the eye on the
image's left, the other eye, the nose tip, the mouth corner on the image's left, the
other one; pixels of a `size` x `size` crop):

- `affwild2` (112 px): the 5-point layout of the widely used ArcFace 112 x 112 alignment
  convention (eyes about 35 px apart at y ~ 51.5, nose tip at ~ 71.5, mouth corners at
  ~ 92), written here mirror-symmetric about x = 56 and rounded to half pixels. That
  convention is the one 112-px face crops such as Aff-Wild2's `cropped_aligned` follow
  (its size and face placement; the ABAW organisers do not publish their template).
- `rafdb` (100 px): the same layout scaled to RAF-DB's 100 x 100 aligned images (RAF-DB
  aligns on the same five points; its exact template is not published either).
- `synthetic` (112 px): for the demo's checkpoints, where YuNet finds the five points on
  the demo's training pictures (`data.synthetic`, 112 px): the median over 300 pictures
  drawn like the training frames (random identities, expressions and per-frame nuisance),
  made mirror-symmetric. Measured with the detector rather than read off the renderer's
  geometry because a template is where the detector's points fall on the training crops:
  YuNet puts the cartoon eyes about 5 px higher and 2 px further apart than the drawn eye
  centres, and crops aligned to the drawn positions read expressions worse (docs/results.md).

`none` keeps the square margin crop around the detector's box (`serve.detect.crop_face`),
which is also what a face without landmarks (the Haar cascade's) gets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

ALIGNMENTS = ("affwild2", "rafdb", "synthetic", "none")
DEFAULT_ALIGN = "affwild2"


@dataclass(frozen=True)
class Template:
    name: str
    size: int                                     # the crop's side, pixels
    points: tuple[tuple[float, float], ...]       # 5 (x, y), LANDMARK_NAMES order
    source: str                                   # where the points come from (for OUT.meta.json)

    def as_dict(self) -> dict:
        return {"name": self.name, "size": self.size, "points": [list(p) for p in self.points],
                "source": self.source}


_ARCFACE_LIKE_112 = ((38.5, 51.5), (73.5, 51.5), (56.0, 71.5), (41.5, 92.0), (70.5, 92.0))


# YuNet's points on the demo's 112-px training pictures (`python -m feallm_llava.bench detect
# --measure-synthetic-template` prints them again)
_SYNTHETIC_112 = ((37.5, 41.0), (74.5, 41.0), (56.0, 60.0), (40.5, 76.5), (71.5, 76.5))


def template(name: str) -> Template:
    """The template called `name` (`ALIGNMENTS` other than none)."""
    if name == "affwild2":
        return Template(name, 112, _ARCFACE_LIKE_112,
                        "ArcFace 112x112 5-point convention, made mirror-symmetric (Aff-Wild2 cropped_aligned size)")
    if name == "rafdb":
        return Template(name, 100, tuple((round(x * 100 / 112, 2), round(y * 100 / 112, 2))
                                         for x, y in _ARCFACE_LIKE_112),
                        "the affwild2 layout scaled to RAF-DB's 100x100 aligned images")
    if name == "synthetic":
        return Template(name, 112, _SYNTHETIC_112,
                        "YuNet's points on the demo's training pictures (data.synthetic), median of 300, symmetric")
    raise ValueError(f"--align must be one of {', '.join(ALIGNMENTS)}, got {name!r}")


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2 x 3 similarity (rotation, uniform scale, translation) that maps the points
    `src` (N, 2) onto `dst` (N, 2) with the least squared error (Umeyama 1991, no
    reflection)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two (N, 2) point sets with N >= 2, got {src.shape} and {dst.shape}")
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    var = (s ** 2).sum() / len(src)
    if var <= 1e-12:
        raise ValueError("the landmarks coincide: no alignment")
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))            # (2, 2) covariance
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rot = u @ sign @ vt
    scale = (sig * np.diag(sign)).sum() / var
    return np.hstack([scale * rot, (md - scale * rot @ ms)[:, None]])   # (2, 3)


def transform(points, matrix: np.ndarray) -> np.ndarray:
    """`points` (N, 2) through a 2 x 3 affine matrix."""
    p = np.asarray(points, np.float64)
    return p @ matrix[:, :2].T + matrix[:, 2]


def align_face(img: Image.Image, landmarks, name_or_template: str | Template = DEFAULT_ALIGN, *,
               size: int | None = None) -> Image.Image:
    """The face whose 5 `landmarks` (image pixels, LANDMARK_NAMES order) are given, warped
    so that they land on the template's points; size x size (default: the template's),
    black outside the image, as in the aligned crops of the datasets."""
    import cv2

    t = name_or_template if isinstance(name_or_template, Template) else template(name_or_template)
    out = t.size if size is None else size
    dst = np.asarray(t.points, np.float64) * (out / t.size)
    m = similarity(np.asarray(landmarks, np.float64).reshape(5, 2), dst)
    rgb = np.asarray(img.convert("RGB"))
    warped = cv2.warpAffine(rgb, m, (out, out), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                            borderValue=(0, 0, 0))
    return Image.fromarray(warped)


def roll_degrees(landmarks) -> float:
    """The angle of the line from the first eye to the second, degrees (0 = level; positive
    = the second eye lower in the image)."""
    p = np.asarray(landmarks, np.float64).reshape(5, 2)
    dx, dy = p[1] - p[0]
    return float(np.degrees(np.arctan2(dy, dx)))
