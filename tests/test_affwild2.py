"""Aff-Wild2 reader on tiny trees in both native challenge layouts.

`make_affwild2_tree` is also used by the builder tests.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from feallm_llava.data.affwild2 import LabelFileError, detect_layout, read_affwild2
from feallm_llava.facs.labels import AUS, EXPRESSIONS, PROTOTYPES
from feallm_llava.data.records import SkipCounter

AU_HEADER_2022 = ",".join(f"AU{a}" for a in AUS)
AU_HEADER_2020 = "AU1,AU2,AU4,AU6,AU12,AU15,AU20,AU25"
EXPR_HEADER = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
DIRS = {"2022": ("EXPR_Classification_Challenge", "AU_Detection_Challenge", "Train_Set", "Validation_Set"),
        "2020": ("EXPR_Set", "AU_Set", "Training_Set", "Validation_Set")}


def write_face(path: Path, seed: str) -> None:
    """A tiny 32x32 JPEG whose bytes differ per seed (the annotation cache is keyed by them)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (32, 32))
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(32 * 32)])
    image.save(path, quality=90)


def write_video(root: Path, layout: str, video: str, *, expr: list[int] | None = None,
                aus: list[list[int]] | None = None, split: int = 0, images: int | None = None,
                missing: tuple[int, ...] = (), expr_lines: list[str] | None = None,
                au_lines: list[str] | None = None) -> None:
    """One video: its EXPR / AU label files and `cropped_aligned/<video>/NNNNN.jpg` images.

    `images` frames are written (default: as many as label lines), except `missing` ones.
    `expr_lines` / `au_lines` give raw data lines instead (for malformed input).
    """
    expr_dir, au_dir, train, val = DIRS[layout]
    split_dir = (train, val)[split]
    n = 0
    if expr is not None or expr_lines is not None:
        lines = expr_lines if expr_lines is not None else [str(v) for v in expr]
        path = root / expr_dir / split_dir / f"{video}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([EXPR_HEADER] + lines) + "\n")
        n = max(n, len(lines))
    if aus is not None or au_lines is not None:
        header = AU_HEADER_2022 if layout == "2022" else AU_HEADER_2020
        lines = au_lines if au_lines is not None else [",".join(map(str, row)) for row in aus]
        path = root / au_dir / split_dir / f"{video}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([header] + lines) + "\n")
        n = max(n, len(lines))
    for frame in range(1, (images if images is not None else n) + 1):
        if frame not in missing:
            write_face(root / "cropped_aligned" / video / f"{frame:05d}.jpg", f"{video}/{frame}")


def au_row(active) -> list[int]:
    return [int(a in active) for a in AUS]


def make_affwild2_tree(root: Path, videos: list[str] | None = None, frames: int = 7,
                       seed: int = 0) -> Path:
    """A 2022-layout tree where every frame has both labels: expression cycles through the
    7 classes, AUs = the class prototype plus a random extra AU. Videos alternate splits."""
    rng = random.Random(seed)
    videos = videos or ["v1", "v2", "v3", "v4", "v5_left", "v5_right"]
    for k, video in enumerate(videos):
        expr = [(k + i) % 7 for i in range(frames)]
        rows = []
        for value in expr:
            active = set(PROTOTYPES[EXPRESSIONS[value]])
            if rng.random() < 0.5:
                active.add(rng.choice(AUS))
            rows.append(au_row(active))
        write_video(root, "2022", video, expr=expr, aus=rows, split=k % 2)
    return root


# -- the 2022+ layout --------------------------------------------------------------------

def test_2022_layout_joins_expression_and_au_labels_by_frame(tmp_path):
    write_video(tmp_path, "2022", "10-60-1280x720", expr=[4, 0, 6],
                aus=[au_row({6, 12}), au_row(()), au_row({1, 2, 25, 26})])
    records = read_affwild2(tmp_path)
    assert [(r.frame, r.expression, r.active_aus) for r in records] == [
        (1, "Happiness", (6, 12)), (2, "Neutral", ()), (3, "Surprise", (1, 2, 25, 26))]
    assert all(r.has_all_aus and r.subject == r.video == "10-60-1280x720" for r in records)


def test_data_line_i_is_image_i_plus_1(tmp_path):
    write_video(tmp_path, "2022", "vid", expr=[1, 2, 3])
    records = read_affwild2(tmp_path)
    assert [r.image for r in records] == [tmp_path / "cropped_aligned" / "vid" / f"{i:05d}.jpg" for i in (1, 2, 3)]


def test_invalid_expression_and_other_class_are_skipped_and_counted(tmp_path):
    write_video(tmp_path, "2022", "vid", expr=[-1, 7, 5, 7])
    skips = SkipCounter()
    records = read_affwild2(tmp_path, skips=skips)
    assert [(r.frame, r.expression) for r in records] == [(3, "Sadness")]
    assert skips["expr_invalid"] == 1 and skips["expr_other"] == 2


def test_au_row_with_any_minus_one_is_invalid_as_a_whole(tmp_path):
    bad = au_row({6, 12})
    bad[3] = -1
    write_video(tmp_path, "2022", "vid", aus=[bad, au_row({4})])
    skips = SkipCounter()
    records = read_affwild2(tmp_path, skips=skips)
    assert [(r.frame, r.expression, r.active_aus) for r in records] == [(2, None, (4,))]
    assert skips["au_invalid"] == 1


def test_frame_with_only_one_valid_label_keeps_the_other_as_none(tmp_path):
    write_video(tmp_path, "2022", "vid", expr=[4, -1], aus=[[-1] * 12, au_row({6})])
    records = read_affwild2(tmp_path)
    assert [(r.expression, r.aus is None) for r in records] == [("Happiness", True), (None, False)]


def test_missing_images_are_skipped_and_counted(tmp_path):
    write_video(tmp_path, "2022", "vid", expr=[0, 1, 2, 3], missing=(2, 4))
    skips = SkipCounter()
    records = read_affwild2(tmp_path, skips=skips)
    assert [r.frame for r in records] == [1, 3]
    assert skips["missing_image"] == 2
    assert skips.examples["missing_image"][0].endswith("vid/00002.jpg")


def test_video_without_image_folder_counts_every_frame_missing(tmp_path):
    write_video(tmp_path, "2022", "vid", expr=[0, 1], images=0)
    (tmp_path / "cropped_aligned").mkdir(exist_ok=True)
    skips = SkipCounter()
    assert read_affwild2(tmp_path, skips=skips) == []
    assert skips["missing_image"] == 2


def test_videos_of_both_official_splits_are_read(tmp_path):
    write_video(tmp_path, "2022", "a", expr=[0], split=0)
    write_video(tmp_path, "2022", "b", expr=[1], split=1)
    assert {r.video for r in read_affwild2(tmp_path)} == {"a", "b"}


def test_trailing_blank_lines_are_not_frames(tmp_path):
    write_video(tmp_path, "2022", "vid", expr=[0, 1])
    path = tmp_path / "EXPR_Classification_Challenge" / "Train_Set" / "vid.txt"
    path.write_text(path.read_text() + "\n\n")
    assert len(read_affwild2(tmp_path)) == 2


# -- the 2020 layout -----------------------------------------------------------------------

def test_2020_layout_maps_its_8_au_columns_and_leaves_the_other_aus_unknown(tmp_path):
    # columns AU1,AU2,AU4,AU6,AU12,AU15,AU20,AU25
    write_video(tmp_path, "2020", "vid", expr=[4], aus=[[0, 0, 0, 1, 1, 0, 1, 1]])
    (record,) = read_affwild2(tmp_path)
    assert detect_layout(tmp_path).name == "2020"
    assert record.aus == {1: 0, 2: 0, 4: 0, 6: 1, 12: 1, 15: 0, 25: 1}   # AU20 is not one of the 12
    assert record.active_aus == (6, 12, 25)
    assert not record.has_all_aus and 7 not in record.aus and 26 not in record.aus


def test_2022_layout_wins_when_both_layouts_are_present(tmp_path):
    write_video(tmp_path, "2020", "old", expr=[0])
    write_video(tmp_path, "2022", "new", expr=[1])
    assert detect_layout(tmp_path).name == "2022"
    assert [r.video for r in read_affwild2(tmp_path)] == ["new"]
    assert [r.video for r in read_affwild2(tmp_path, layout="2020")] == ["old"]


def test_root_without_label_folders_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="EXPR_Classification_Challenge"):
        read_affwild2(tmp_path)


# -- malformed label files ------------------------------------------------------------------

def test_wrong_au_column_count_names_file_and_line(tmp_path):
    write_video(tmp_path, "2022", "vid", au_lines=[",".join(["0"] * 12), ",".join(["0"] * 11)])
    with pytest.raises(LabelFileError, match=r"vid\.txt:3: expected 12 comma-separated value\(s\), found 11"):
        read_affwild2(tmp_path)


def test_non_numeric_expression_names_file_and_line(tmp_path):
    write_video(tmp_path, "2022", "vid", expr_lines=["0", "happy", "1"])
    with pytest.raises(LabelFileError, match=r"vid\.txt:3: non-numeric"):
        read_affwild2(tmp_path)


def test_out_of_range_values_name_file_and_line(tmp_path):
    write_video(tmp_path, "2022", "vid", expr_lines=["9"])
    with pytest.raises(LabelFileError, match=r"vid\.txt:2: expression 9 outside -1\.\.7"):
        read_affwild2(tmp_path)


def test_bad_lines_can_be_counted_as_skips_instead(tmp_path):
    write_video(tmp_path, "2022", "vid", expr_lines=["0", "x", "1,2", "3"])
    skips = SkipCounter()
    records = read_affwild2(tmp_path, skips=skips, on_bad_line="skip")
    assert [(r.frame, r.expression) for r in records] == [(1, "Neutral"), (4, "Fear")]
    assert skips["bad_label_line"] == 2


def test_blank_line_inside_a_file_is_an_error_not_a_shift(tmp_path):
    write_video(tmp_path, "2022", "vid", expr_lines=["0", "", "1"])
    with pytest.raises(LabelFileError, match=r"vid\.txt:3"):
        read_affwild2(tmp_path)


# -- subjects ---------------------------------------------------------------------------------

def test_left_and_right_videos_are_two_subjects_of_one_person(tmp_path):
    write_video(tmp_path, "2022", "video2_left", expr=[0])
    write_video(tmp_path, "2022", "video2_right", expr=[1])
    left, right = read_affwild2(tmp_path)
    assert (left.subject, right.subject) == ("video2_left", "video2_right")
    assert left.person == right.person == "video2"


def test_sample_tree_has_both_labels_on_every_frame(tmp_path):
    records = read_affwild2(make_affwild2_tree(tmp_path))
    assert len(records) == 42
    assert all(r.expression is not None and r.has_all_aus for r in records)
