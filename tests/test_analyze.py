"""`feallm analyze`: faces found, cropped and asked about; one row per face; bad files are rows.

The tiny checkpoint is untrained: these tests check structure and plumbing (boxes, columns,
row per face, errors, batching, files written), never what the answers say.
"""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from feallm_llava.cli import main as cli
from feallm_llava.serve.analyze import analyze, load_backend
from feallm_llava.serve.annotate_png import annotate_image, face_label
from feallm_llava.serve.rows import AU_COLUMNS, COLUMNS, write_results

skdata = pytest.importorskip("skimage.data", reason="scikit-image ships the astronaut photo")

# Where OpenCV's Haar cascade finds the astronaut (opencv-python-headless 4.14).
ASTRONAUT_FACE = (177, 66, 95, 95)
MAX_NEW_TOKENS = 6  # plumbing only: short answers keep the tiny model fast


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    return ix * iy / (aw * ah + bw * bh - ix * iy)


def box(row) -> tuple[int, int, int, int]:
    return tuple(int(row[k]) for k in ("face_x", "face_y", "face_w", "face_h"))


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: tiny kernels gain nothing from threads
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(kit, tmp_path_factory):
    from feallm_llava.tinykit import build_llava

    # "v1" in the name: upstream picks the llava_v1 template the kit was built with
    return build_llava(tmp_path_factory.mktemp("ckpt") / "feallm-llava-v1-tiny", kit)


@pytest.fixture(scope="module")
def backend(checkpoint, one_thread):
    return load_backend(str(checkpoint), device="cpu", max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())  # 512 x 512 RGB, public domain


@pytest.fixture(scope="module")
def photos(tmp_path_factory, astronaut):
    d = tmp_path_factory.mktemp("photos")
    astronaut.save(d / "astronaut.png")
    Image.new("RGB", (320, 240), (128, 128, 128)).save(d / "blank.png")  # no face
    return d


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height (1-bit grey) with a tiny IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- the astronaut

def test_cli_finds_the_astronauts_one_face_and_writes_the_csv(checkpoint, photos, tmp_path, one_thread):
    import pandas as pd

    out = tmp_path / "results.csv"
    rc = cli(["analyze", str(photos / "astronaut.png"), "--model-path", str(checkpoint), "--out", str(out),
              "--device", "cpu", "--max-new-tokens", str(MAX_NEW_TOKENS), "--no-progress"])
    assert rc == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == 1
    row = table.iloc[0]
    assert row["face_id"] == 0 and row["error"] == ""
    assert row["frame"] == 0 and row["time_s"] == 0.0   # a photo is a video of one frame
    assert iou(box(row), ASTRONAUT_FACE) > 0.8, box(row)
    assert row["raw_answer_fer"] != "" or row["raw_answer_aud"] != ""  # the model was asked


def test_api_returns_a_dataframe_with_the_documented_columns(backend, photos):
    import pandas as pd

    frame = analyze([photos / "astronaut.png"], backend=backend, progress=False)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == list(COLUMNS)
    assert AU_COLUMNS == ("AU01", "AU02", "AU04", "AU06", "AU07", "AU10", "AU12", "AU15", "AU23", "AU24",
                          "AU25", "AU26")
    row = frame.iloc[0]
    for col in AU_COLUMNS:  # 0/1, or NA when the AUD answer names no AU at all
        assert pd.isna(row[col]) or row[col] in (0, 1)
    for col in ("raw_answer_fer", "raw_answer_aud", "raw_answer_reasoning"):
        assert isinstance(row[col], str)
    assert row["expression"] == "" or row["expression"] in (
        "Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise")


def test_image_without_a_face_gives_one_row_with_empty_face_id(backend, photos):
    rows = analyze([photos / "blank.png"], backend=backend, progress=False).to_dict(orient="records")
    assert len(rows) == 1
    import pandas as pd

    assert pd.isna(rows[0]["face_id"]) and rows[0]["error"] == ""
    assert rows[0]["raw_answer_fer"] is None  # nothing was asked


def test_require_face_makes_a_faceless_image_an_error_row(backend, photos):
    rows = analyze([photos / "blank.png"], backend=backend, require_face=True, progress=False).to_dict("records")
    assert len(rows) == 1 and "no face found" in rows[0]["error"]


def test_no_detect_takes_the_whole_image_as_one_aligned_face(backend, photos):
    frame = analyze([photos / "blank.png"], backend=backend, detect=False, progress=False)
    assert len(frame) == 1
    assert box(frame.iloc[0]) == (0, 0, 320, 240) and frame.iloc[0]["face_id"] == 0
    assert isinstance(frame.iloc[0]["raw_answer_reasoning"], str)


def test_two_faces_in_one_photo_give_two_rows_left_to_right(backend, astronaut, tmp_path):
    face = astronaut.crop((137, 26, 307, 196))  # the face with some context
    canvas = Image.new("RGB", (640, 300), (200, 200, 200))
    canvas.paste(face, (400, 60))
    canvas.paste(face.resize((150, 150)), (40, 20))
    canvas.save(tmp_path / "two.png")
    frame = analyze([tmp_path / "two.png"], backend=backend, progress=False)
    assert list(frame["face_id"]) == [0, 1]
    assert frame.iloc[0]["face_x"] < frame.iloc[1]["face_x"]


# ----------------------------------------------------------------------------- bad inputs

def test_bad_inputs_give_error_rows_and_convertible_ones_are_analysed(backend, astronaut, tmp_path):
    d = tmp_path
    (d / "empty.jpg").write_bytes(b"")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (d / "notes.txt").write_text("not an image at all\n")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(d / "pixel.png")
    (d / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    astronaut.convert("L").save(d / "gray.png")
    rgba = astronaut.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(d / "rgba.png")
    astronaut.convert("CMYK").save(d / "cmyk.jpg", quality=95)
    grey16 = (np.asarray(astronaut.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(grey16).save(d / "grey16.png")  # mode I;16
    assert Image.open(d / "grey16.png").mode.startswith("I;16")
    names = ["empty.jpg", "corrupt.jpg", "notes.txt", "pixel.png", "bomb.png", "missing.png",
             "gray.png", "rgba.png", "cmyk.jpg", "grey16.png"]

    import pandas as pd

    rows = analyze([d / n for n in names], backend=backend, batch_size=4, progress=False).to_dict("records")

    by_name = {r["input"].rsplit("/", 1)[-1]: r for r in rows}
    assert [r["input"].rsplit("/", 1)[-1] for r in rows] == names  # input order, one row each here
    expected_errors = {
        "empty.jpg": ("empty file",), "corrupt.jpg": ("unreadable image header", "corrupt", "not an image"),
        "notes.txt": ("not an image file",), "pixel.png": ("smaller than the minimum side",),
        "bomb.png": ("decompression-bomb",), "missing.png": ("no such file",),
    }
    for name, fragments in expected_errors.items():
        assert any(f in by_name[name]["error"] for f in fragments), (name, by_name[name]["error"])
        assert by_name[name]["error"].startswith("bad image:")
        assert pd.isna(by_name[name]["frame"]) and pd.isna(by_name[name]["time_s"])  # a row about the whole file
    for name in ("gray.png", "rgba.png", "cmyk.jpg", "grey16.png"):  # converted, face still found
        row = by_name[name]
        assert row["error"] == "", (name, row["error"])
        assert iou(box(row), ASTRONAUT_FACE) > 0.6, (name, box(row))
        assert isinstance(row["raw_answer_fer"], str)


def test_cli_exits_1_when_a_row_has_an_error_and_still_writes_every_row(checkpoint, photos, tmp_path, one_thread):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "r.json"
    rc = cli(["analyze", str(tmp_path / "corrupt.png"), str(photos / "blank.png"), "--no-progress",
              "--model-path", str(checkpoint), "--out", str(out), "--max-new-tokens", str(MAX_NEW_TOKENS)])
    assert rc == 1
    rows = json.loads(out.read_text())
    assert [r["input"].rsplit("/", 1)[-1] for r in rows] == ["corrupt.png", "blank.png"]
    assert rows[0]["error"].startswith("bad image:") and rows[1]["error"] == ""
    assert rows[1]["face_id"] is None and set(rows[1]) == set(COLUMNS)
    assert (rows[0]["frame"], rows[0]["time_s"]) == (None, None) and (rows[1]["frame"], rows[1]["time_s"]) == (0, 0.0)


def test_a_face_whose_generation_fails_gets_an_error_and_the_others_their_answers(backend, photos, astronaut):
    # What a GPU out-of-memory on one batch looks like: the model raises for one image.
    poisoned = Image.new("RGB", (64, 64), (1, 2, 3))

    class FailsOnPoisoned:
        def generate(self, items):
            if any(np.array_equal(np.asarray(i.load_image()), np.asarray(poisoned)) for i in items):
                raise RuntimeError("CUDA out of memory (simulated)")
            return backend.generate(items)

    rows = analyze([poisoned, photos / "astronaut.png"], backend=FailsOnPoisoned(), detect=False,
                   batch_size=6, progress=False).to_dict("records")
    assert len(rows) == 2
    assert "generation failed" in rows[0]["error"] and "out of memory" in rows[0]["error"]
    assert rows[1]["error"] == "" and isinstance(rows[1]["raw_answer_aud"], str)


# ----------------------------------------------------------------------------- batching, dirs, output

def test_answers_do_not_depend_on_the_batch_size(backend, photos, astronaut):
    inputs = [photos / "astronaut.png", astronaut.rotate(8).resize((400, 400)), photos / "blank.png"]
    one = analyze(inputs, backend=backend, batch_size=1, progress=False)
    many = analyze(inputs, backend=backend, batch_size=7, progress=False)
    cols = ["input", "face_id", "raw_answer_fer", "raw_answer_aud", "raw_answer_reasoning"]
    assert _plain_records(one[cols]) == _plain_records(many[cols])


def test_each_answer_lands_in_its_own_face_row_and_column(backend):
    # The untrained model says nearly the same for every face, so the model's real answers
    # are tagged with the crop size and question they were generated for.
    from feallm_llava.serve.rows import DEFAULT_QUESTIONS

    class Tagging:
        def generate(self, items):
            answers = backend.generate(items)
            return [f"{a} <{i.load_image().size[0]}|{i.question}>" for a, i in zip(answers, items)]

    images = [Image.new("RGB", (60 + 10 * k, 50 + 10 * k), (40 * k, 90, 120)) for k in range(4)]
    rows = analyze(images, backend=Tagging(), detect=False, batch_size=5, progress=False).to_dict("records")
    for img, row in zip(images, rows):
        for task, question in DEFAULT_QUESTIONS.items():
            assert row[f"raw_answer_{task}"].endswith(f"<{img.width}|{question}>"), (task, row)


def _plain_records(frame) -> list[dict]:
    import pandas as pd

    return [{k: (None if pd.isna(v) else v) for k, v in r.items()} for r in frame.to_dict("records")]


def test_a_directory_is_searched_recursively_and_files_without_image_suffix_skipped(backend, photos, tmp_path):
    (tmp_path / "sub").mkdir()
    Image.open(photos / "blank.png").save(tmp_path / "sub" / "b.jpg")
    Image.open(photos / "blank.png").save(tmp_path / "a.png")
    (tmp_path / "README.txt").write_text("not a photo")
    frame = analyze(tmp_path, backend=backend, progress=False)
    assert [p.rsplit("/", 2)[-2:] for p in frame["input"]] == [[tmp_path.name, "a.png"], ["sub", "b.jpg"]]


def test_json_output_has_nulls_for_empty_cells(backend, photos, tmp_path):
    frame = analyze([photos / "blank.png"], backend=backend, progress=False)
    rows = json.loads(write_results(frame, tmp_path / "out.json").read_text())
    assert rows[0]["face_id"] is None and rows[0]["AU12"] is None and rows[0]["error"] == ""
    with pytest.raises(ValueError, match=r"\.csv, \.jsonl or \.json"):
        write_results(frame, tmp_path / "out.xlsx")


def test_annotate_writes_a_png_with_the_face_box(backend, photos, tmp_path):
    out = tmp_path / "annotated.png"
    frame = analyze([photos / "astronaut.png"], backend=backend, annotate=out, progress=False)
    img = Image.open(out)
    assert img.size == (512, 512) and img.format == "PNG"
    x, y, w, h = box(frame.iloc[0])
    assert img.getpixel((x + w // 2, y + h - 1)) == (255, 64, 64)  # bottom edge of face 0's box


def test_face_label_names_expression_and_active_aus():
    row = {"face_id": 0, "expression": "Happiness", **{c: 0 for c in AU_COLUMNS}, "AU06": 1, "AU12": 1}
    assert face_label(row) == "#0 Happiness | AU06 AU12"
    unknown = {"face_id": 1, "expression": "", **{c: None for c in AU_COLUMNS}}
    assert face_label(unknown) == "#1 ? | AUs ?"
    img = annotate_image(Image.new("RGB", (200, 200)), [dict(row, face_x=50, face_y=60, face_w=80, face_h=80, error="")])
    assert img.getpixel((90, 139)) == (255, 64, 64)


def test_crop_shift_moves_the_crop_centre_down_by_a_fraction_of_the_box_height():
    from feallm_llava.serve.analyzer import Analyzer
    from feallm_llava.serve.detect import FaceBox

    assert Analyzer(None, crop_shift=0.1)._crop_box(FaceBox(10, 20, 50, 60, 0.0)) == (10, 26, 50, 60)
    assert Analyzer(None).settings()["crop_shift"] == 0.0
    with pytest.raises(ValueError, match="crop-shift"):
        Analyzer(None, crop_shift=0.6)
