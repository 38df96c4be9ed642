"""Five-point alignment: the similarity fit, faces rotated by a known angle coming out level,
the templates, and the analysis rows and settings that carry detector and alignment."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from feallm_llava.data.synthetic import Identity, Nuisance, render_face
from feallm_llava.data.synthetic_scene import _face_points
from feallm_llava.serve import yunet
from feallm_llava.serve.align import ALIGNMENTS, align_face, roll_degrees, similarity, template, transform
from feallm_llava.serve.analyzer import Analyzer, Source
from feallm_llava.serve.rows import COLUMNS, LANDMARK_COLUMNS, typed_row

needs_yuface = pytest.mark.skipif(not yunet.yuface_available(), reason="no yuface wheel for this platform")


def _face(roll: float, size: int = 224, subject: int = 3):
    """A synthetic face drawn rotated by `roll` degrees (counter-clockwise), its true points."""
    identity = Identity.sample(np.random.default_rng(subject))
    nuisance = Nuisance(rotation=roll)
    img = render_face({}, identity, np.random.default_rng(1), size=size, nuisance=nuisance)
    _box, points = _face_points(identity, {}, nuisance, size)
    return img, points


def test_similarity_recovers_a_known_rotation_scale_and_shift():
    src = np.asarray(template("affwild2").points)
    a = math.radians(23)
    dst = src @ np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]).T * 1.7 + (5, -9)
    m = similarity(src, dst)
    assert np.allclose(transform(src, m), dst, atol=1e-9)
    assert math.hypot(m[0, 0], m[1, 0]) == pytest.approx(1.7)
    with pytest.raises(ValueError, match="coincide"):
        similarity(np.zeros((5, 2)), dst)


@pytest.mark.parametrize("roll", [-20.0, -6.0, 12.0, 30.0])
def test_a_face_rotated_by_a_known_angle_comes_out_level_on_the_template(roll):
    img, points = _face(roll)
    assert roll_degrees(points) == pytest.approx(-roll, abs=0.01)      # counter-clockwise: the 2nd eye rises
    level_img, level_points = _face(0.0)
    t = template("synthetic")
    m = similarity(np.asarray(points), np.asarray(t.points))
    assert roll_degrees(transform(points, m)) == pytest.approx(0.0, abs=1e-6)
    aligned = np.asarray(align_face(img, points, t), np.float32)
    reference = np.asarray(align_face(level_img, level_points, t), np.float32)
    unaligned = np.asarray(img.resize((t.size, t.size)), np.float32)
    # the pixels agree with the level face's aligned crop, far better than the rotated picture does
    assert np.abs(aligned - reference)[16:-16, 16:-16].mean() < 0.35 * np.abs(unaligned - reference)[16:-16, 16:-16].mean()


@needs_yuface
def test_yunets_landmarks_take_out_most_of_a_known_roll():
    from feallm_llava.serve.detectors import make_detector

    det = make_detector("yunet")
    for roll in (-10.0, 10.0):
        img, points = _face(roll)
        (face,) = det.detect(img)
        m = similarity(np.asarray(face.landmarks), np.asarray(template("affwild2").points))
        residual = roll_degrees(transform(points, m))      # the true eyes after aligning on YuNet's points
        assert abs(residual) < 0.6 * abs(roll), (roll, residual)


def test_templates_have_level_eyes_centred_and_in_face_order():
    for name in ALIGNMENTS[:-1]:
        t = template(name)
        (ex1, ey1), (ex2, ey2), (nx, ny), (mx1, my1), (mx2, my2) = t.points
        assert ey1 == ey2 and my1 == my2 and ex1 < nx < ex2 and mx1 < mx2
        assert (ex1 + ex2) / 2 == pytest.approx(t.size / 2, abs=0.1) and ey1 < ny < my1 < t.size
        assert t.source
    assert template("affwild2").size == 112 and template("rafdb").size == 100
    with pytest.raises(ValueError, match="affwild2, rafdb, synthetic, none"):
        template("vggface")


class _Says:
    """A model that always answers the same: enough for rows and crops."""

    def generate(self, queries):
        return ["Happiness. AU06 and AU12 are active." for _ in queries]


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    skdata = pytest.importorskip("skimage.data")
    return Image.fromarray(skdata.astronaut())


@needs_yuface
def test_rows_carry_the_detector_score_and_landmarks_and_the_settings_name_detector_and_template(astronaut):
    analyzer = Analyzer(_Says())
    (row,) = list(analyzer.iter_rows([Source("a", image=astronaut)], progress=False))
    assert list(row) == list(COLUMNS) and 0.4 <= row["face_score"] <= 1.0
    xs, ys = [row[f"x_{k}"] for k in range(5)], [row[f"y_{k}"] for k in range(5)]
    assert row["face_x"] <= min(xs) and max(xs) <= row["face_x"] + row["face_w"] and ys[0] < ys[2] < ys[3]
    settings = analyzer.settings()
    assert settings["detector"]["name"] == "yunet" and settings["align"]["name"] == "affwild2"
    assert settings["align"]["points"][0] == [38.5, 51.5]
    back = typed_row({k: "" if v is None else str(v) for k, v in row.items()})    # as read back from a CSV
    assert back["face_score"] == row["face_score"] and back["x_2"] == row["x_2"]
    crop = analyzer.crop_of_row(astronaut, row)
    assert crop.size == (112, 112)


def test_haar_rows_leave_the_landmarks_empty_and_keep_the_margin_crop(astronaut):
    analyzer = Analyzer(_Says(), detector="haar", margin=0.25)
    (row,) = list(analyzer.iter_rows([Source("a", image=astronaut)], progress=False))
    assert row["face_score"] > 0 and all(row[c] is None for c in LANDMARK_COLUMNS)
    assert analyzer.settings()["detector"]["name"] == "haar"
    crop = analyzer.crop_of_row(astronaut, row)
    assert crop.size[0] == crop.size[1] == round(max(row["face_w"], row["face_h"]) * 1.5)


def test_align_none_and_no_detect_are_recorded():
    assert Analyzer(None, detector="haar", align="none").settings()["align"] == "none"
    settings = Analyzer(None, detect=False).settings()
    assert settings["detector"] is None and settings["align"] == "none"
    with pytest.raises(ValueError, match="--align"):
        Analyzer(None, detector="haar", align="crooked")


@needs_yuface
def test_the_ui_shows_each_face_as_the_model_saw_it(astronaut, tmp_path):
    from feallm_llava.ui.faces import analyze_file

    astronaut.save(tmp_path / "astronaut.png")
    report = analyze_file(tmp_path / "astronaut.png", _Says(), out_dir=tmp_path)
    ((crop, caption),) = report.crops
    assert crop.size == (112, 112) and caption == "face #0: aligned (affwild2 template)"
