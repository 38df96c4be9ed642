"""Face boxes, OpenCV's Haar cascade, and square margin crops for `feallm analyze`.

FEALLM is trained on aligned face crops (Aff-Wild2 `cropped_aligned`); photos from the
web (the paper's Fig. 7(c)) need a face found and cropped first. The default detector is
YuNet (`serve.yunet`, with landmarks for `serve.align`); `serve.detectors` picks one by
name. This module holds what they share (`FaceBox`, `keep_best`) and the Haar cascade,
kept by name (`--detector haar`) and as the last fallback.

The Haar cascade: OpenCV's frontal-face Haar cascade (Viola-Jones,
`haarcascade_frontalface_default.xml`), which ships inside the `opencv-python-headless`
4.x wheel (`cv2.data.haarcascades`), so it works offline with no model download; the
5.x wheels no longer ship the cascades, hence the `opencv-python-headless<5` pin
(4.14 finds scikit-image's astronaut at (177, 66, 95, 95) in about 90 ms).
It is deterministic and CPU-only. Its limits: frontal faces only (roughly +-20 degrees of
yaw and in-plane roll), some false positives on textured backgrounds, traded against
misses by `min_neighbors`, no landmarks, and dark skin: on the synthetic fairness bench
(`python -m feallm_llava.bench detect`) it misses most faces of the two darkest tones.

Alternative considered: MediaPipe 0.10.21 bundles BlazeFace, which is better on turned
and small faces, but the wheel pulls jax/jaxlib and opencv-contrib (a second cv2 next
to ours), supports fewer platforms and Python versions, and its 1.x line ships no models
at all; one pinned opencv wheel is the smaller, steadier dependency for an offline tool.
scikit-image's LBP cascade (`skimage.feature.Cascade`) also ships offline, but is much
slower in pure Python at photo sizes.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CASCADE_FILE = "haarcascade_frontalface_default.xml"


@dataclass(frozen=True)
class FaceBox:
    """A face in image pixels: top-left corner, width, height, a detector score and, from a
    landmark detector, 5 points.

    `score` is the detector's own: YuNet's face confidence in [0, 1]; the cascade's level
    weight for Haar (larger = more confident; it ranks boxes of one image and is not a
    probability).
    """

    x: int
    y: int
    w: int
    h: int
    score: float
    # 5 points (x, y) in image pixels, in `serve.yunet.LANDMARK_NAMES` order; None when the
    # detector gives none (Haar)
    landmarks: tuple[tuple[float, float], ...] | None = None

    @property
    def area(self) -> int:
        return self.w * self.h

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.w, self.h)

    def as_dict(self) -> dict:
        return asdict(self)

    def iou(self, other: FaceBox | tuple[int, int, int, int]) -> float:
        ox, oy, ow, oh = other.as_tuple() if isinstance(other, FaceBox) else other
        ix = max(0, min(self.x + self.w, ox + ow) - max(self.x, ox))
        iy = max(0, min(self.y + self.h, oy + oh) - max(self.y, oy))
        inter = ix * iy
        union = self.area + ow * oh - inter
        return inter / union if union > 0 else 0.0


_local = threading.local()   # one classifier per thread: OpenCV objects are not shared safely


def _cascade():
    clf = getattr(_local, "cascade", None)
    if clf is not None:
        return clf
    import cv2

    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = Path(folder) / CASCADE_FILE if folder else None
    if path is None or not path.is_file():
        raise RuntimeError(
            f"OpenCV {cv2.__version__} has no Haar cascade {CASCADE_FILE} "
            f"(looked in {folder!r}); OpenCV 5.x wheels dropped the cascades. Install "
            f"'opencv-python-headless<5', or pass --no-detect for aligned face crops.")
    clf = cv2.CascadeClassifier(str(path))
    if clf.empty():
        raise RuntimeError(f"{path}: OpenCV could not load the Haar cascade (file damaged?); "
                           f"reinstall 'opencv-python-headless<5'")
    _local.cascade = clf
    return clf


# Default smallest face: 30 px (the cascade's 24 px window plus a little), or 4% of the
# image's shorter side on large photos, where smaller hits are mostly background texture
# and too small to read an expression from anyway.
MIN_FACE_PX = 30
MIN_FACE_FRACTION = 0.04


EQUALIZE = ("global", "local", "none")


def detect_faces(img: Image.Image, *, min_size: int | None = None, scale_factor: float = 1.1,
                 min_neighbors: int = 5, max_side: int = 768, equalize: bool | str = True,
                 overlap: float = 0.3) -> list[FaceBox]:
    """Frontal faces in `img`, sorted left to right (then top to bottom).

    min_size: smallest face side in pixels of `img` (default: the larger of MIN_FACE_PX
    and MIN_FACE_FRACTION x the shorter image side). scale_factor / min_neighbors: the
    cascade's pyramid step and the number of overlapping raw hits a face needs (higher =
    fewer false positives). Images larger than `max_side` are searched downscaled (boxes
    are returned in original pixels). equalize: the contrast the cascade sees, "global"
    (True, the default: one histogram equalisation of the whole image), "local" (CLAHE,
    8 x 8 tiles: a face much darker or lighter than the rest of the picture keeps its
    own contrast; on the synthetic faces global equalisation missed the darkest skin
    tones entirely) or "none" (False). Boxes overlapping a higher-scoring one by IoU >
    `overlap`, or lying mostly inside it, are dropped. Deterministic.
    """
    import cv2

    rgb = np.asarray(img.convert("RGB"))                             # (H, W, 3) uint8
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)                     # (H, W)
    height, width = gray.shape
    if min_size is None:
        min_size = max(MIN_FACE_PX, round(MIN_FACE_FRACTION * min(height, width)))
    if min_size < 1 or scale_factor <= 1.0 or min_neighbors < 0:
        raise ValueError(f"need min_size >= 1, scale_factor > 1, min_neighbors >= 0 (got "
                         f"{min_size}, {scale_factor}, {min_neighbors})")
    s = min(1.0, max_side / max(height, width))
    if s < 1.0:
        gray = cv2.resize(gray, (max(1, round(width * s)), max(1, round(height * s))),
                          interpolation=cv2.INTER_AREA)
    mode = {True: "global", False: "none"}.get(equalize, equalize)
    if mode not in EQUALIZE:
        raise ValueError(f"equalize must be one of {', '.join(EQUALIZE)} (got {equalize!r})")
    if mode == "global":
        gray = cv2.equalizeHist(gray)
    elif mode == "local":
        gray = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(gray)
    m = max(1, round(min_size * s))
    rects, _levels, weights = _cascade().detectMultiScale3(
        gray, scaleFactor=scale_factor, minNeighbors=min_neighbors, minSize=(m, m),
        outputRejectLevels=True)
    boxes = []
    for (x, y, w, h), score in zip(np.asarray(rects).reshape(-1, 4), np.asarray(weights).reshape(-1)):
        x0, y0 = max(0, round(x / s)), max(0, round(y / s))
        x1, y1 = min(width, round((x + w) / s)), min(height, round((y + h) / s))
        if x1 > x0 and y1 > y0:
            boxes.append(FaceBox(int(x0), int(y0), int(x1 - x0), int(y1 - y0), float(score)))
    return keep_best(boxes, overlap)


def keep_best(boxes: list[FaceBox], overlap: float = 0.3) -> list[FaceBox]:
    """Boxes overlapping a higher-scoring one by IoU > `overlap`, or lying mostly inside it,
    dropped; the rest sorted left to right (then top to bottom)."""
    kept: list[FaceBox] = []
    for b in sorted(boxes, key=lambda b: (-b.score, b.x, b.y)):
        if all(b.iou(k) <= overlap and _inside(b, k) <= 0.8 for k in kept):
            kept.append(b)
    return sorted(kept, key=lambda b: (b.x, b.y, -b.score))


def _inside(a: FaceBox, b: FaceBox) -> float:
    """Share of the smaller box's area that lies inside the other."""
    ix = max(0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    return ix * iy / max(1, min(a.area, b.area))


def crop_face(img: Image.Image, box: FaceBox | tuple[int, int, int, int], margin: float = 0.25,
              *, size: int | None = None, fill: tuple[int, int, int] = (0, 0, 0),
              border: str = "pad") -> Image.Image:
    """A square crop around `box`, `margin` x the box's longer side added on every side.

    The square is centred on the box. Where it leaves the image, border="pad" fills
    with `fill` (the face stays centred, as in aligned crops); border="shift" moves the
    square inside the image when it fits (falls back to padding when it does not).
    `size` resizes the result to size x size.
    """
    x, y, w, h = box.as_tuple() if isinstance(box, FaceBox) else box
    if w <= 0 or h <= 0:
        raise ValueError(f"face box {(x, y, w, h)} has no area")
    if margin < 0:
        raise ValueError(f"margin must be >= 0 (got {margin})")
    if border not in ("pad", "shift"):
        raise ValueError(f"border must be 'pad' or 'shift' (got {border!r})")
    img = img.convert("RGB")
    W, H = img.size
    side = max(1, round(max(w, h) * (1 + 2 * margin)))
    left = round(x + w / 2 - side / 2)
    top = round(y + h / 2 - side / 2)
    if border == "shift" and side <= W and side <= H:
        left = min(max(left, 0), W - side)
        top = min(max(top, 0), H - side)
    out = Image.new("RGB", (side, side), tuple(fill))
    # the part of the square that lies inside the image, pasted at its offset
    ix0, iy0 = max(left, 0), max(top, 0)
    ix1, iy1 = min(left + side, W), min(top + side, H)
    if ix1 > ix0 and iy1 > iy0:
        out.paste(img.crop((ix0, iy0, ix1, iy1)), (ix0 - left, iy0 - top))
    if size is not None and size != side:
        out = out.resize((size, size), Image.Resampling.BICUBIC)
    return out
