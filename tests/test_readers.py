"""Benchmark readers on tiny trees in each dataset's native layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feallm_llava.facs.labels import AUS, EXPRESSIONS
from feallm_llava.data.templates import load_templates
from feallm_llava.eval.benchmarks import BENCHMARKS, load_items
from feallm_llava.eval.readers import BP4D_FOLDS, DISFA_FOLDS, ReaderOptions
from feallm_llava.eval.readers.bp4d import BP4D_AUS
from feallm_llava.eval.readers.disfa import DISFA_AUS


def _image(path: Path, size=(20, 16), color=(120, 80, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


# -- FEABench -------------------------------------------------------------------------

def _feabench(root: Path, n: int = 3) -> Path:
    records = []
    for i in range(n):
        _image(root / "faces" / f"s{i}.jpg")
        records.append({"id": f"vid{i}_00012", "image": f"faces/s{i}.jpg",
                        "expression": EXPRESSIONS[i], "aus": [AUS[i], 12], "subject": f"vid{i}"})
    (root / "eval.json").write_text(json.dumps(records))
    return root


def test_feabench_asks_fer_and_aud_for_every_image(tmp_path):
    loaded = load_items("feabench", _feabench(tmp_path), seed=0)
    assert [i.id for i in loaded.items] == [f"vid{k}_00012#{t}" for k in range(3) for t in ("fer", "aud")]
    fer, aud = loaded.items[0], loaded.items[1]
    assert fer.task == "fer" and fer.gt_expression == "Neutral" and fer.gt_aus is None
    assert aud.task == "aud" and aud.gt_aus == (1, 12) and aud.au_targets == AUS
    assert fer.image == str((tmp_path / "faces" / "s0.jpg").resolve())


def test_feabench_questions_come_from_summary_and_movement_templates(tmp_path):
    templates = load_templates()
    items = load_items("feabench", _feabench(tmp_path, 6), seed=0).items
    assert all(i.question in templates["summary"] for i in items if i.task == "fer")
    assert all(i.question in templates["movement"] for i in items if i.task == "aud")


def test_feabench_questions_are_seeded_per_item(tmp_path):
    root = _feabench(tmp_path, 6)
    a = [i.question for i in load_items("feabench", root, seed=0).items]
    b = [i.question for i in load_items("feabench", root, seed=0).items]
    c = [i.question for i in load_items("feabench", root, seed=1).items]
    assert a == b
    assert a != c


def test_feabench_resolves_images_against_image_folder_when_given(tmp_path):
    root = _feabench(tmp_path / "ann")
    (root / "eval.json").rename(tmp_path / "eval.json")
    opts = ReaderOptions(image_folder=root)
    items = load_items("feabench", tmp_path / "eval.json", opts).items
    assert items[0].image == str((root / "faces" / "s0.jpg").resolve())


def test_feabench_rejects_an_unknown_expression_naming_the_record(tmp_path):
    root = _feabench(tmp_path)
    records = json.loads((root / "eval.json").read_text())
    records[1]["expression"] = "Contempt"
    (root / "eval.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"record 1 \(id 'vid1_00012'\).*Contempt"):
        load_items("feabench", root)


# -- RAF-DB ---------------------------------------------------------------------------

def _rafdb(root: Path, missing: tuple[str, ...] = ()) -> Path:
    lines = ["train_00001.jpg 5", "test_0001.jpg 4", "test_0002.jpg 1", "test_0003.jpg 7"]
    (root / "EmoLabel").mkdir(parents=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
        stem = line.split()[0][:-4]
        if stem not in missing:
            _image(root / "Image" / "aligned" / f"{stem}_aligned.jpg")
    return root


def test_rafdb_reads_the_test_split_with_its_label_order(tmp_path):
    loaded = load_items("rafdb", _rafdb(tmp_path))
    assert [(i.id, i.gt_expression) for i in loaded.items] == [
        ("test_0001", "Happiness"), ("test_0002", "Surprise"), ("test_0003", "Neutral")]
    assert all(i.task == "fer" for i in loaded.items)
    assert loaded.items[0].image.endswith("Image/aligned/test_0001_aligned.jpg")
    assert loaded.dropped["not in split 'test'"] == 1


def test_rafdb_bad_label_names_file_and_line(tmp_path):
    root = _rafdb(tmp_path)
    path = root / "EmoLabel" / "list_patition_label.txt"
    path.write_text(path.read_text() + "test_0004.jpg 8\n")
    with pytest.raises(ValueError, match=r"list_patition_label.txt:5"):
        load_items("rafdb", root)


def test_missing_image_is_an_error_naming_it(tmp_path):
    root = _rafdb(tmp_path, missing=("test_0002",))
    with pytest.raises(FileNotFoundError, match=r"test_0002_aligned\.jpg.*list_patition_label\.txt:3.*--skip-missing"):
        load_items("rafdb", root)


def test_missing_image_is_a_counted_skip_with_skip_missing(tmp_path):
    loaded = load_items("rafdb", _rafdb(tmp_path, missing=("test_0002",)), skip_missing=True)
    assert [i.id for i in loaded.items] == ["test_0001", "test_0003"]
    assert loaded.dropped["missing image"] == 1


# -- AffectNet ------------------------------------------------------------------------

def _affectnet_csv(root: Path, header: bool = True) -> Path:
    rows = [("1/a.jpg", 0), ("1/b.jpg", 1), ("2/c.jpg", 7), ("2/d.jpg", 6), ("3/e.jpg", 10), ("3/f.jpg", 8)]
    lines = ["subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"]
    lines = lines if header else []
    for name, code in rows:
        lines.append(f"{name},4,2,10,12,1.0;2.0;3.0;4.0,{code},0.5,-0.2")
        _image(root / "Manually_Annotated_Images" / name, size=(30, 20))
    (root / "Manually_Annotated_file_lists").mkdir(parents=True)
    (root / "Manually_Annotated_file_lists" / "validation.csv").write_text("\n".join(lines) + "\n")
    return root


def test_affectnet_csv_keeps_seven_classes_and_counts_contempt_and_others(tmp_path):
    loaded = load_items("affectnet", _affectnet_csv(tmp_path))
    assert [(i.id, i.gt_expression) for i in loaded.items] == [
        ("1/a.jpg", "Neutral"), ("1/b.jpg", "Happiness"), ("2/d.jpg", "Anger")]
    assert loaded.dropped["expression 7 (contempt)"] == 1
    assert loaded.dropped["expression 10 (non-face)"] == 1
    assert loaded.dropped["expression 8 (none)"] == 1


def test_affectnet_csv_crops_the_face_box(tmp_path):
    item = load_items("affectnet", _affectnet_csv(tmp_path)).items[0]
    assert item.crop == (4, 2, 10, 12)
    assert item.load_image().size == (10, 12)


def test_affectnet_csv_without_header_row_is_read_in_documented_order(tmp_path):
    loaded = load_items("affectnet", _affectnet_csv(tmp_path, header=False))
    assert [i.gt_expression for i in loaded.items] == ["Neutral", "Happiness", "Anger"]


def test_affectnet_npy_release(tmp_path):
    ann = tmp_path / "val_set" / "annotations"
    ann.mkdir(parents=True)
    for sid, code in (("0", "3"), ("1", "7"), ("2", "5")):
        np.save(ann / f"{sid}_exp.npy", np.array(code))  # the release stores the code as a string
        np.save(ann / f"{sid}_val.npy", np.array("0.1"))
        _image(tmp_path / "val_set" / "images" / f"{sid}.jpg")
    loaded = load_items("affectnet", tmp_path)
    assert [(i.id, i.gt_expression, i.crop) for i in loaded.items] == [
        ("0", "Surprise", None), ("2", "Disgust", None)]
    assert loaded.dropped["expression 7 (contempt)"] == 1


def test_affectnet_eight_classes_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="contempt is not\\s+among them"):
        load_items("affectnet", _affectnet_csv(tmp_path), ReaderOptions(affectnet_classes=8))


def test_affectnet_without_either_release_says_what_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="validation.csv.*val_set/annotations"):
        load_items("affectnet", tmp_path)


# -- BP4D -----------------------------------------------------------------------------

def _bp4d(root: Path, frames: int = 120, unknown: tuple[int, ...] = (), missing: tuple[int, ...] = (),
          subjects=(("F001", "T1"), ("M011", "T2"))) -> Path:
    """AU_OCC csvs with 100 columns (frame + AU1..AU99, as the release), AU12 on odd frames."""
    (root / "AUCoding" / "AU_OCC").mkdir(parents=True)
    for subject, task in subjects:
        lines = [",".join(str(c) for c in range(100))]
        for f in range(1, frames + 1):
            row = [0] * 100
            row[0] = f
            row[12] = f % 2
            row[3] = 9  # AU3 is never coded in BP4D: 9 there must not drop the frame
            if f in unknown:
                row[4] = 9
            lines.append(",".join(map(str, row)))
            if f not in missing:
                _image(root / subject / task / f"{f}.jpg", size=(8, 8))
        (root / "AUCoding" / "AU_OCC" / f"{subject}_{task}.csv").write_text("\n".join(lines) + "\n")
    return root


def test_bp4d_samples_every_50th_valid_frame_per_sequence(tmp_path):
    loaded = load_items("bp4d", _bp4d(tmp_path, frames=120))
    assert [i.id for i in loaded.items] == ["F001_T1_1", "F001_T1_51", "F001_T1_101",
                                            "M011_T2_1", "M011_T2_51", "M011_T2_101"]
    assert loaded.dropped["not sampled"] == 2 * (120 - 3)
    assert all(i.task == "aud" and i.au_targets == BP4D_AUS for i in loaded.items)
    assert loaded.items[0].gt_aus == (12,) and loaded.items[0].image.endswith("F001/T1/1.jpg")


def test_bp4d_drops_and_counts_frames_with_unknown_code_9(tmp_path):
    loaded = load_items("bp4d", _bp4d(tmp_path, frames=10, unknown=(1, 2)), ReaderOptions(sample_every=1))
    assert loaded.dropped["unknown AU code (9)"] == 4
    assert [i.id for i in loaded.items][:2] == ["F001_T1_3", "F001_T1_4"]


def test_bp4d_fold_filter_keeps_only_that_folds_subjects(tmp_path):
    assert "F001" in BP4D_FOLDS[1] and "M011" in BP4D_FOLDS[2]
    loaded = load_items("bp4d", _bp4d(tmp_path, frames=10), ReaderOptions(folds=(2,)))
    assert {i.id.split("_")[0] for i in loaded.items} == {"M011"}


def test_bp4d_frame_pattern_option_finds_zero_padded_images(tmp_path):
    root = _bp4d(tmp_path, frames=3, missing=(1, 2, 3))
    for f in (1, 2, 3):
        _image(root / "F001" / "T1" / f"{f:04d}.jpg", size=(8, 8))
        _image(root / "M011" / "T2" / f"{f:04d}.jpg", size=(8, 8))
    opts = ReaderOptions(sample_every=1, frame_pattern="{subject}/{task}/{frame:04d}.jpg")
    assert load_items("bp4d", root, opts).items[0].image.endswith("F001/T1/0001.jpg")


def test_bp4d_missing_frames_counted_with_skip_missing(tmp_path):
    root = _bp4d(tmp_path, frames=60, missing=(51,))
    loaded = load_items("bp4d", root, skip_missing=True)
    assert loaded.dropped["missing image"] == 2
    assert [i.id for i in loaded.items] == ["F001_T1_1", "M011_T2_1"]


def test_bp4d_bad_code_names_file_and_line(tmp_path):
    root = _bp4d(tmp_path, frames=3)
    path = root / "AUCoding" / "AU_OCC" / "F001_T1.csv"
    lines = path.read_text().splitlines()
    cells = lines[2].split(",")
    cells[6] = "5"  # AU6 = 5: not a BP4D code
    lines[2] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"F001_T1\.csv:3.*\{6: '5'\}"):
        load_items("bp4d", root)


# -- DISFA ----------------------------------------------------------------------------

def _disfa(root: Path, subjects=("SN001", "SN013"), frames: int = 100, skip_frame_in_au4: int | None = None) -> Path:
    for sn in subjects:
        d = root / "ActionUnit_Labels" / sn
        d.mkdir(parents=True)
        for au in (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26):
            lines = []
            for f in range(1, frames + 1):
                if au == 4 and f == skip_frame_in_au4:
                    continue
                intensity = (f % 6) if au == 12 else (1 if au == 1 else 0)  # AU1 at 1: below threshold
                lines.append(f"{f},{intensity}")
            (d / f"{sn}_au{au}.txt").write_text("\n".join(lines) + "\n")
        for f in range(1, frames + 1):
            _image(root / "Images" / sn / f"{f}.jpg", size=(8, 8))
    return root


def test_disfa_present_means_intensity_two_or_more(tmp_path):
    loaded = load_items("disfa", _disfa(tmp_path, frames=6), ReaderOptions(sample_every=1))
    by_id = {i.id: i.gt_aus for i in loaded.items}
    assert by_id["SN001_1"] == () and by_id["SN001_2"] == (12,) and by_id["SN001_6"] == ()
    assert all(i.au_targets == DISFA_AUS for i in loaded.items)


def test_disfa_samples_two_percent_per_subject(tmp_path):
    loaded = load_items("disfa", _disfa(tmp_path, frames=100))
    assert [i.id for i in loaded.items] == ["SN001_1", "SN001_51", "SN013_1", "SN013_51"]
    assert loaded.items[0].image.endswith("Images/SN001/1.jpg")


def test_disfa_folds_and_frame_missing_from_an_au_file(tmp_path):
    assert "SN001" in DISFA_FOLDS[1]
    root = _disfa(tmp_path, frames=5, skip_frame_in_au4=3)
    loaded = load_items("disfa", root, ReaderOptions(sample_every=1, folds=(1,)))
    assert [i.id for i in loaded.items] == ["SN001_1", "SN001_2", "SN001_4", "SN001_5"]
    assert loaded.dropped["frame missing from an AU file"] == 1


def test_disfa_zero_based_frame_names_via_pattern(tmp_path):
    root = _disfa(tmp_path, subjects=("SN001",), frames=2)
    _image(root / "frames" / "SN001" / "00000.png", size=(8, 8))
    _image(root / "frames" / "SN001" / "00001.png", size=(8, 8))
    opts = ReaderOptions(sample_every=1, image_folder=root / "frames", frame_pattern="{subject}/{frame0:05d}.png")
    assert load_items("disfa", root, opts).items[0].image.endswith("SN001/00000.png")


def test_disfa_missing_au_file_is_named(tmp_path):
    root = _disfa(tmp_path, subjects=("SN001",), frames=2)
    (root / "ActionUnit_Labels" / "SN001" / "SN001_au25.txt").unlink()
    with pytest.raises(FileNotFoundError, match="SN001_au25.txt"):
        load_items("disfa", root)


def test_every_registered_benchmark_has_a_task_and_labels():
    for bench in BENCHMARKS.values():
        assert bench.tasks
        assert ("fer" not in bench.tasks) or bench.expressions == EXPRESSIONS
        assert ("aud" not in bench.tasks) or set(bench.aus) <= set(AUS)
