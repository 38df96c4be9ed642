"""Face detectors by name: YuNet from the yuface wheel (default, 5 landmarks), YuNet from an
ONNX file through OpenCV, Haar; the explicit fallback where the wheel is missing; the
synthetic group pictures of the fairness bench."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from feallm_llava.data.synthetic_scene import TONES, make_scene
from feallm_llava.serve import detectors, yunet
from feallm_llava.serve.detectors import DEFAULT_DETECTOR, DETECTORS, make_detector

skdata = pytest.importorskip("skimage.data", reason="scikit-image ships the astronaut photo")
needs_yuface = pytest.mark.skipif(not yunet.yuface_available(), reason="no yuface wheel for this platform")


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(detectors, "_warned", set())


def test_the_default_is_yunet_and_every_name_is_listed():
    assert DEFAULT_DETECTOR == "yunet" and DETECTORS == ("yunet", "yunet-onnx", "haar")
    with pytest.raises(ValueError, match="yunet, yunet-onnx, haar"):
        make_detector("retinaface")


@needs_yuface
def test_yunet_finds_the_astronaut_with_five_landmarks_in_face_order(astronaut):
    (face,) = make_detector("yunet").detect(astronaut)
    assert face.iou((177, 66, 95, 95)) > 0.6 and 0.5 <= face.score <= 1.0
    (ex1, ey1), (ex2, ey2), (nx, ny), (mx1, my1), (mx2, my2) = face.landmarks
    assert ex1 < nx < ex2 and mx1 < nx < mx2            # left to right in the image
    assert max(ey1, ey2) < ny < min(my1, my2)            # eyes, then nose, then mouth, top to bottom
    assert all(face.x <= x <= face.x + face.w and face.y <= y <= face.y + face.h for x, y in face.landmarks)


@needs_yuface
def test_yunet_finds_no_face_in_a_blank_or_a_noise_picture():
    det = make_detector("yunet")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (384, 384, 3), dtype=np.uint8))
    assert det.detect(Image.new("RGB", (320, 240), (128, 128, 128))) == [] and det.detect(noise) == []


@needs_yuface
def test_yunet_finds_faces_of_every_skin_tone_in_synthetic_group_pictures():
    det = make_detector("yunet")
    found = {tone: 0 for tone in range(len(TONES))}
    total = dict(found)
    for seed in range(5):
        scene = make_scene(seed, tone_start=seed)
        boxes = det.detect(scene.image)
        for face in scene.faces:
            total[face.tone] += 1
            found[face.tone] += any(b.iou(face.box) >= 0.5 for b in boxes)
    assert all(total.values()), total
    assert all(found[t] >= total[t] - 1 for t in found), (found, total)   # at most one miss per tone


@needs_yuface
def test_large_pictures_are_searched_downscaled_and_boxes_come_back_in_their_pixels(astronaut):
    (small,) = make_detector("yunet").detect(astronaut)
    (big,) = make_detector("yunet").detect(astronaut.resize((1536, 1536), Image.Resampling.BICUBIC))
    assert big.iou(tuple(3 * v for v in small.as_tuple())) > 0.7
    # searched at 960 px, not 3x 512: the points agree within a few percent of the face's width
    assert np.allclose(np.asarray(big.landmarks), 3 * np.asarray(small.landmarks), atol=0.06 * big.w)


def test_haar_stays_available_by_name_and_gives_no_landmarks(astronaut):
    det = make_detector("haar")
    (face,) = det.detect(astronaut)
    assert det.landmarks is False and face.landmarks is None and det.describe()["name"] == "haar"


def test_without_the_wheel_yunet_falls_back_to_haar_and_says_so_once(monkeypatch, caplog, astronaut):
    monkeypatch.setattr(yunet, "yuface_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="feallm_llava.serve.detectors"):
        det = make_detector("yunet")
        make_detector("yunet")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "yuface" in warnings[0] and "Haar" in warnings[0] and "darkest of five skin tones" in warnings[0]
    assert "--detector-model" in warnings[0]
    assert det.name == "haar" and len(det.detect(astronaut)) == 1
    assert det.describe()["fallback_for"] == "yunet" and "yuface" in det.describe()["fallback_reason"]


def test_without_the_wheel_a_given_onnx_file_is_used_and_a_missing_one_named(monkeypatch, tmp_path):
    monkeypatch.setattr(yunet, "yuface_available", lambda: False)
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        make_detector("yunet", model=tmp_path / "nope.onnx")


def test_yunet_onnx_needs_a_model_file_and_rejects_one_opencv_cannot_load(tmp_path):
    with pytest.raises(ValueError, match="--detector-model"):
        make_detector("yunet-onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx graph" * 10)
    with pytest.raises(ValueError, match="cannot load it as YuNet"):
        make_detector("yunet-onnx", model=bad)


def test_scene_truth_lies_on_the_drawn_faces():
    scene = make_scene(3, tone_start=2)
    assert 3 <= len(scene.faces) <= 4 and scene.image.size == (640, 480)
    assert [f.tone for f in scene.faces] == [(2 + k) % 5 for k in range(len(scene.faces))]
    for f in scene.faces:
        x, y, w, h = f.box
        assert 40 <= w <= 160 and abs(f.roll) <= 6.0      # 45-140 px wide faces, boxed after their roll
        (ex1, ey1), (ex2, ey2), nose, m1, m2 = f.landmarks
        assert x < ex1 < ex2 < x + w and y < ey1 < nose[1] < m1[1] < y + h
    assert make_scene(3, tone_start=2).faces == scene.faces     # deterministic


@needs_yuface
def test_bench_detect_prints_recall_per_tone_and_a_verdict_for_the_default_detector(tmp_path, capsys):
    import json

    from feallm_llava.bench.__main__ import main

    assert main(["detect", "--pictures", "3", "--repeats", "1", "--detectors", "yunet,haar",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["detectors"]) == {"yunet", "haar"} and sum(report["faces_per_tone"]) == report["faces"]
    yn = report["detectors"]["yunet"]
    assert len(yn["recall_per_tone"]) == 5 and yn["landmark_error_px"] is not None
    assert report["detectors"]["haar"]["landmark_error_px"] is None
    assert "default detector yunet: worst tone" in out and "x Haar's time per picture" in out
