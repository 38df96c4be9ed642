"""`python -m feallm_llava.bench video`: how its rows are matched to the drawn faces and
scored, and its refusal of a run without a trained checkpoint. (The bench itself runs on a
trained demo; its figures are in docs/results.md.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from feallm_llava.bench.video import held_out_subjects, main, score_video_rows, training_subjects
from feallm_llava.data.synthetic_video import SyntheticVideo
from feallm_llava.errors import UsageError
from feallm_llava.facs.labels import AUS, au_key

BOXES = ((10, 20, 96, 96), (200, 20, 96, 96))
TRUTH = [  # two people over two frames
    {"frame": 0, "person": 0, "box": BOXES[0], "expression": "Happiness", "aus": [6, 12]},
    {"frame": 0, "person": 1, "box": BOXES[1], "expression": "Sadness", "aus": [1, 4, 15]},
    {"frame": 1, "person": 0, "box": BOXES[0], "expression": "Happiness", "aus": [6, 12]},
    {"frame": 1, "person": 1, "box": BOXES[1], "expression": "Surprise", "aus": [1, 2, 26]},
]


def video() -> SyntheticVideo:
    return SyntheticVideo(Path("clip.mp4"), frames=2, fps=10.0, size=(320, 240), face_size=96, truth=list(TRUTH))


def row(frame: int, face_id: int | None, box, expression: str | None, aus: list[int] | None, error: str = "") -> dict:
    x, y, w, h = box
    out = {"input": "clip.mp4", "frame": frame, "face_id": face_id, "error": error, "expression": expression,
           "face_x": x, "face_y": y, "face_w": w, "face_h": h}
    out.update({au_key(au): None if aus is None else int(au in aus) for au in AUS})
    return out


def test_rows_that_say_the_truth_score_full_marks_and_keep_one_id_per_person():
    rows = [row(t["frame"], t["person"] + 1, t["box"], t["expression"], t["aus"]) for t in TRUTH]
    scores = score_video_rows(rows, [video()])
    assert scores["face_frames_scored"] == scores["truth_face_frames"] == 4 and scores["found"] == 1.0
    present = {au for t in TRUTH for au in t["aus"]}
    assert scores["fe_accuracy"] == 1.0
    assert all(scores["au_f1"][au_key(au)] == (1.0 if au in present else 0.0) for au in AUS)  # 0 where undefined
    assert (scores["people"], scores["extra_ids"], scores["rows_on_majority_id"]) == (2, 0, 1.0)


def test_wrong_answers_missed_faces_stray_boxes_and_id_switches_count():
    shifted = (150, 150, 40, 40)   # on no drawn face
    rows = [row(0, 1, BOXES[0], "Happiness", [6, 12]),
            row(0, 2, BOXES[1], "Anger", [4]),            # wrong expression, one of three AUs
            row(1, 3, BOXES[0], "Happiness", None),       # a new id for person 0; AUs unparsed
            row(1, 9, shifted, "Fear", []),               # no truth under it: not scored
            row(1, None, BOXES[1], None, None, error="bad frame")]
    scores = score_video_rows(rows, [video()])
    assert scores["face_frames_scored"] == 3 and scores["found"] == pytest.approx(3 / 4)
    assert scores["fe_accuracy"] == pytest.approx(2 / 3)
    assert scores["mean_au_f1"] < 1.0 and scores["au_f1"]["AU04"] == pytest.approx(1.0)
    assert scores["au_f1"]["AU06"] == pytest.approx(2 / 3)   # one hit, one unparsed truth
    assert (scores["people"], scores["extra_ids"]) == (2, 1)
    assert scores["rows_on_majority_id"] == pytest.approx(2 / 3)


def test_a_demo_without_a_trained_checkpoint_is_a_usage_error(tmp_path):
    import argparse

    from feallm_llava.bench.video import add_arguments

    (tmp_path / "fea").mkdir()
    (tmp_path / "fea" / "eval.json").write_text('[{"subject": "synth_007"}, {"subject": "synth_012"}, '
                                                '{"subject": "synth_007"}]')
    (tmp_path / "fea" / "train.json").write_text('[{"image": "synth_003/00001.jpg"}, {"image": "synth_000/00002.jpg"}]')
    assert held_out_subjects(tmp_path) == [7, 12] and training_subjects(tmp_path) == [0, 3]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(UsageError, match="no stage-2 checkpoint"):
        main(parser.parse_args(["--demo", str(tmp_path), "--out", str(tmp_path / "out")]))


def test_a_face_box_inside_the_drawn_picture_counts_once_and_a_stray_one_not_at_all():
    from feallm_llava.bench.video import on_picture

    inner = (22, 30, 64, 76)                      # a detector's face box inside the 96 px picture: IoU ~0.53
    assert on_picture(inner, BOXES[0]) and not on_picture(inner, BOXES[1])
    assert not on_picture((10, 20, 20, 20), BOXES[0])   # a small box on the picture: not the face
    twice = [row(0, 1, BOXES[0], "Happiness", [6, 12]), row(0, 5, inner, "Happiness", [6, 12])]
    scores = score_video_rows(twice, [video()])
    assert scores["found"] == pytest.approx(1 / 2) and scores["face_frames_scored"] == 2   # frame 0: 1 of 2 faces
