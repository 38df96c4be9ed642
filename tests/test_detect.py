"""Offline face detection (OpenCV Haar cascade) and square face crops."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from feallm_llava.serve import detect
from feallm_llava.serve.detect import FaceBox, crop_face, detect_faces

skdata = pytest.importorskip("skimage.data", reason="scikit-image ships the astronaut photo")

# Where the cascade finds the astronaut's face (opencv-python-headless 4.14).
ASTRONAUT_FACE = (177, 66, 95, 95)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())        # 512 x 512, public domain


def test_astronaut_has_exactly_one_face_at_the_known_place(astronaut):
    t0 = time.perf_counter()
    faces = detect_faces(astronaut)
    ms = (time.perf_counter() - t0) * 1000
    print(f"detect_faces on 512x512 astronaut: {ms:.0f} ms -> {faces}")
    assert len(faces) == 1
    assert faces[0].iou(ASTRONAUT_FACE) > 0.5
    assert isinstance(faces[0].score, float) and faces[0].score > 0


def test_detection_is_deterministic(astronaut):
    assert detect_faces(astronaut) == detect_faces(astronaut)


def test_blank_image_has_no_face():
    assert detect_faces(Image.new("RGB", (320, 240), (128, 128, 128))) == []


def test_noise_image_has_no_face():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8))
    assert detect_faces(noise) == []


def test_large_image_is_searched_downscaled_and_boxes_come_back_in_its_pixels(astronaut):
    big = astronaut.resize((1536, 1536), Image.Resampling.BICUBIC)
    faces = detect_faces(big)
    assert len(faces) == 1
    assert faces[0].iou(tuple(3 * v for v in ASTRONAUT_FACE)) > 0.5


def test_faces_are_sorted_left_to_right(astronaut):
    face = astronaut.crop((137, 26, 307, 196))              # the face with some context
    canvas = Image.new("RGB", (640, 300), (200, 200, 200))
    canvas.paste(face, (400, 60))
    canvas.paste(face.resize((150, 150)), (40, 20))
    faces = detect_faces(canvas)
    assert len(faces) == 2
    assert faces[0].x < faces[1].x
    assert faces[0].x < 200 and faces[1].x > 400


def test_grayscale_and_rgba_inputs_are_accepted(astronaut):
    assert len(detect_faces(astronaut.convert("L"))) == 1
    assert len(detect_faces(astronaut.convert("RGBA"))) == 1


def test_min_size_above_the_face_finds_nothing(astronaut):
    assert detect_faces(astronaut, min_size=150) == []


def test_missing_cascade_says_which_opencv_to_install(monkeypatch, tmp_path):
    import cv2

    monkeypatch.setattr(cv2.data, "haarcascades", str(tmp_path) + "/")
    monkeypatch.setattr(detect, "_local", type(detect._local)())   # no cached classifier
    with pytest.raises(RuntimeError, match=r"opencv-python-headless<5"):
        detect_faces(Image.new("RGB", (64, 64)))


# --- crop_face ----------------------------------------------------------------------------


def _gradient(w: int = 200, h: int = 120) -> Image.Image:
    # Unique colour per pixel: red = x, green = y.
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    return Image.fromarray(np.stack([xs, ys, np.full_like(xs, 77)], -1).astype(np.uint8))


def test_crop_face_is_a_square_with_the_margin_centred_on_the_box():
    out = crop_face(_gradient(), (80, 40, 40, 30), margin=0.25)
    assert out.size == (60, 60)                         # 40 * (1 + 2 * 0.25)
    r, g, _ = np.asarray(out)[30, 30]
    assert (r, g) == (100, 55)                          # box centre (100, 55)


def test_crop_face_pads_at_the_top_left_border():
    out = np.asarray(crop_face(_gradient(), FaceBox(0, 0, 40, 40, 1.0), margin=0.25,
                               fill=(1, 2, 3)))
    assert out.shape == (60, 60, 3)
    assert tuple(out[0, 0]) == (1, 2, 3) and tuple(out[9, 9]) == (1, 2, 3)
    assert tuple(out[10, 10]) == (0, 0, 77)             # image origin lands 10 px in


def test_crop_face_pads_at_the_bottom_right_border():
    img = _gradient()
    out = np.asarray(crop_face(img, (180, 100, 20, 20), margin=0.5))
    assert out.shape == (40, 40, 3)
    assert tuple(out[-1, -1]) == (0, 0, 0)              # beyond the image
    assert tuple(out[10, 10]) == (180, 100, 77)


def test_crop_face_shift_keeps_the_square_inside_the_image():
    out = np.asarray(crop_face(_gradient(), (0, 0, 40, 40), margin=0.25, border="shift"))
    assert out.shape == (60, 60, 3)
    assert tuple(out[0, 0]) == (0, 0, 77)               # no padding: starts at the image origin


def test_crop_face_larger_than_the_image_is_padded_even_with_shift():
    out = crop_face(_gradient(60, 40), (10, 5, 40, 30), margin=0.5, border="shift")
    assert out.size == (80, 80)


def test_crop_face_resizes_to_the_requested_size(astronaut):
    box = detect_faces(astronaut)[0]
    assert crop_face(astronaut, box, size=112).size == (112, 112)


def test_crop_face_rejects_bad_arguments():
    img = _gradient()
    with pytest.raises(ValueError, match="no area"):
        crop_face(img, (0, 0, 0, 10))
    with pytest.raises(ValueError, match="margin"):
        crop_face(img, (0, 0, 10, 10), margin=-0.1)
    with pytest.raises(ValueError, match="border"):
        crop_face(img, (0, 0, 10, 10), border="wrap")
