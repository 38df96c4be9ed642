"""YuNet (libfacedetection, Wu et al. 2023): face boxes, scores and 5 landmarks, offline.

Two ways to run the same network:

- `yuface` (PyPI, BSD-3): libfacedetection compiled with its weights into a 1.1 MB wheel
  with no dependencies, so `pip install` is the whole setup and nothing is downloaded at
  run time. Wheels exist for CPython <= 3.11 on Linux x86_64 and Windows only.
- OpenCV's `cv2.FaceDetectorYN` (opencv-python-headless 4.x) runs YuNet from an ONNX file
  (`face_detection_yunet_2023mar.onnx` of the opencv_zoo), which no PyPI package ships:
  the user passes it with `--detector-model FILE.onnx`. For platforms without the wheel.

Both give the 5 points in image order: the eye on the image's left (the person's right
eye), the other eye, the nose tip, the mouth corner on the image's left, the other corner
(`LANDMARK_NAMES`). Scores are the network's face confidence in [0, 1].
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from PIL import Image

from feallm_llava.serve.detect import FaceBox, keep_best

LANDMARK_NAMES = ("eye_1", "eye_2", "nose", "mouth_1", "mouth_2")

# Below the wheel's own 0.5: synthetic faces (of every tone) scoring 0.45-0.49 were missed at
# 0.5, while 0.4 added no false positive on 120 synthetic clutter pictures (seeds apart from
# the bench's) nor on scikit-image's non-face photos (0.3 did: coffee, hubble_deep_field).
DEFAULT_SCORE = 0.4
# The wheel warns that images beyond 960 px lose accuracy (its network input); larger ones
# are searched downscaled and the boxes mapped back.
MAX_SIDE = 960


def yuface_available() -> bool:
    try:
        import yuface  # noqa: F401
    except ImportError:
        return False
    return True


def _to_bgr(img: Image.Image, max_side: int) -> tuple[np.ndarray, float]:
    rgb = np.asarray(img.convert("RGB"))                              # (H, W, 3) uint8
    height, width = rgb.shape[:2]
    s = min(1.0, max_side / max(height, width))
    if s < 1.0:
        import cv2

        rgb = cv2.resize(rgb, (max(1, round(width * s)), max(1, round(height * s))), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb[:, :, ::-1]), s


def _boxes(raw: np.ndarray, s: float, width: int, height: int, min_score: float) -> list[FaceBox]:
    """raw: (N, 15) float rows of score, x, y, w, h, then 5 (x, y) points, in searched pixels."""
    boxes = []
    for row in raw:
        score = float(row[0])
        if score < min_score:
            continue
        x, y, w, h = (float(v) / s for v in row[1:5])
        x0, y0 = max(0, round(x)), max(0, round(y))
        x1, y1 = min(width, round(x + w)), min(height, round(y + h))
        if x1 <= x0 or y1 <= y0:
            continue
        points = tuple((round(float(row[5 + 2 * k]) / s, 1), round(float(row[6 + 2 * k]) / s, 1)) for k in range(5))
        boxes.append(FaceBox(int(x0), int(y0), int(x1 - x0), int(y1 - y0), round(score, 4), points))
    return keep_best(boxes)


class YuNetWheel:
    """YuNet through the `yuface` wheel (libfacedetection's C++ build, its weights inside)."""

    name = "yunet"
    landmarks = True

    def __init__(self, min_score: float = DEFAULT_SCORE, max_side: int = MAX_SIDE):
        from yuface.yuface import detect  # the raw call: int16 rows, scores in percent

        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"--detector-score must be in [0, 1], got {min_score}")
        self._detect = detect
        self.min_score, self.max_side = min_score, max_side

    def detect(self, img: Image.Image) -> list[FaceBox]:
        bgr, s = _to_bgr(img, self.max_side)
        # rows: score (percent), x, y, w, h, 10 landmark coordinates, one unused value
        raw = np.asarray(self._detect(bgr), np.float32).reshape(-1, 16)[:, :15].copy()
        raw[:, 0] /= 100.0
        return _boxes(raw, s, img.width, img.height, self.min_score)

    def describe(self) -> dict:
        from importlib.metadata import version

        return {"name": self.name, "implementation": f"yuface {version('yuface')} (libfacedetection YuNet)",
                "min_score": self.min_score, "landmarks": list(LANDMARK_NAMES)}


class YuNetOnnx:
    """YuNet from an ONNX file through OpenCV's `FaceDetectorYN` (one detector per thread:
    OpenCV's objects are not shared safely, and it needs the input size before each call)."""

    name = "yunet-onnx"
    landmarks = True

    def __init__(self, model: str | Path, min_score: float = DEFAULT_SCORE, max_side: int = MAX_SIDE):
        import cv2

        self.model = Path(model)
        if not self.model.is_file():
            raise FileNotFoundError(f"--detector-model {self.model}: no such file (YuNet's ONNX file, e.g. "
                                    f"face_detection_yunet_2023mar.onnx from the opencv_zoo)")
        if not hasattr(cv2, "FaceDetectorYN"):
            raise RuntimeError(f"OpenCV {cv2.__version__} has no FaceDetectorYN (needs opencv 4.5.4 or newer)")
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"--detector-score must be in [0, 1], got {min_score}")
        self.min_score, self.max_side = min_score, max_side
        self._local = threading.local()
        try:
            self._net((320, 320))   # read the file now: a bad one fails before any frame
        except cv2.error as err:
            raise ValueError(f"--detector-model {self.model}: OpenCV cannot load it as YuNet ({err.err})") from err

    def _net(self, size: tuple[int, int]):
        import cv2

        net = getattr(self._local, "net", None)
        if net is None:
            net = cv2.FaceDetectorYN.create(str(self.model), "", size, self.min_score, 0.3, 5000)
            self._local.net = net
        net.setInputSize(size)
        return net

    def detect(self, img: Image.Image) -> list[FaceBox]:
        bgr, s = _to_bgr(img, self.max_side)
        _ok, faces = self._net((bgr.shape[1], bgr.shape[0])).detect(bgr)
        if faces is None:
            return []
        # rows: x, y, w, h, 10 landmark coordinates, score -> score first as the wheel's
        raw = np.concatenate([faces[:, 14:15], faces[:, :14]], axis=1)
        return _boxes(raw, s, img.width, img.height, self.min_score)

    def describe(self) -> dict:
        import cv2

        return {"name": self.name, "implementation": f"OpenCV {cv2.__version__} FaceDetectorYN",
                "model": str(self.model), "min_score": self.min_score, "landmarks": list(LANDMARK_NAMES)}
