"""Synthetic FACS faces: every AU is drawn where FACS puts it, and the Aff-Wild2 layout parses."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feallm_llava.data.synthetic import (
    AU_HEADER,
    EXPR_HEADER,
    Identity,
    Nuisance,
    SyntheticConfig,
    au_region_box,
    caption,
    render_face,
    sample_expression,
    sample_grid,
    write_affwild2,
)
from feallm_llava.facs.labels import AUS, EXPRESSIONS, PROTOTYPES
from feallm_llava.facs.parse import parse

SIZE = 112


def _identities() -> list[Identity]:
    # A light and a dark skin tone, different face shapes.
    return [Identity.sample(np.random.default_rng([7, k]), f"t{k}") for k in (0, 4)]


def _canonical(aus: dict[int, float], identity: Identity) -> np.ndarray:
    img = render_face(aus, identity, np.random.default_rng(0), size=SIZE, nuisance=Nuisance.none())
    return np.asarray(img, np.int16)


def _changed(a: np.ndarray, b: np.ndarray, threshold: int = 40) -> np.ndarray:
    """(H, W) bool: pixels where some channel moved by more than `threshold`."""
    return np.abs(a - b).max(axis=2) > threshold


def test_render_face_is_deterministic_given_the_rng_state():
    ident = _identities()[0]
    a = render_face({12: 0.8, 6: 0.7}, ident, np.random.default_rng(3), size=SIZE)
    b = render_face({12: 0.8, 6: 0.7}, ident, np.random.default_rng(3), size=SIZE)
    c = render_face({12: 0.8, 6: 0.7}, ident, np.random.default_rng(4), size=SIZE)
    assert a.size == (SIZE, SIZE) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))   # nuisance differs


@pytest.mark.parametrize("au", AUS)
def test_each_au_changes_pixels_inside_its_region_only(au):
    for ident in _identities():
        changed = _changed(_canonical({}, ident), _canonical({au: 1.0}, ident))
        x0, y0, x1, y1 = au_region_box(au, ident, SIZE)
        inside = np.zeros_like(changed)
        inside[max(0, y0 - 2): y1 + 2, max(0, x0 - 2): x1 + 2] = True   # 2 px antialiasing
        assert changed.sum() >= 25, f"AU{au} changed only {changed.sum()} pixels on {ident.subject}"
        outside = int((changed & ~inside).sum())
        assert outside == 0, f"AU{au} changed {outside} pixels outside its region on {ident.subject}"


def test_every_pair_of_aus_looks_different():
    ident = _identities()[0]
    imgs = {au: _canonical({au: 1.0}, ident) for au in AUS}
    for i, a in enumerate(AUS):
        for b in AUS[i + 1:]:
            n = int(_changed(imgs[a], imgs[b]).sum())
            assert n >= 25, f"AU{a} and AU{b} differ in only {n} pixels"


def test_intensity_scales_the_change():
    ident = _identities()[0]
    neutral = _canonical({}, ident)
    weak = _changed(neutral, _canonical({12: 0.3}, ident)).sum()
    strong = _changed(neutral, _canonical({12: 1.0}, ident)).sum()
    assert strong > weak


def test_unknown_au_is_refused():
    with pytest.raises(ValueError, match="AU9"):
        render_face({9: 1.0}, _identities()[0], np.random.default_rng(0), size=SIZE)


def test_sampled_expressions_stay_uniquely_nearest_to_their_prototype():
    rng = np.random.default_rng(0)
    cfg = SyntheticConfig(p_drop=0.2, p_extra=0.1)
    seen, perturbed = set(), 0
    for _ in range(700):
        expr, aus = sample_expression(rng, cfg)
        seen.add(expr)
        active = set(aus)
        own = len(active ^ set(PROTOTYPES[expr]))
        perturbed += own > 0
        for other in EXPRESSIONS:
            if other != expr:
                assert len(active ^ set(PROTOTYPES[other])) > own, (expr, sorted(active))
        assert not {12, 15} <= active and not {24, 25} <= active
        lo, hi = cfg.intensity
        assert all(lo <= v <= hi for v in aus.values())
    assert seen == set(EXPRESSIONS)
    assert perturbed > 50   # random missing / extra AUs do happen


def test_every_au_is_frequent_enough_to_learn():
    rng = np.random.default_rng(1)
    counts = dict.fromkeys(AUS, 0)
    for _ in range(2000):
        for au in sample_expression(rng)[1]:
            counts[au] += 1
    rare = {au: n / 2000 for au, n in counts.items() if n / 2000 < 0.08}
    assert not rare, f"AUs active in under 8% of frames: {rare}"


def test_the_one_parser_reads_every_caption_back():
    rng = np.random.default_rng(0)
    for _ in range(200):
        expression = EXPRESSIONS[int(rng.integers(len(EXPRESSIONS)))]
        aus = {int(au): float(rng.uniform(0.1, 1.0)) for au in AUS if rng.random() < 0.3}
        read = parse(caption(aus, expression), AUS)
        assert (read.expression, sorted(read.aus)) == (expression, sorted(aus))


def test_a_garbled_caption_reads_as_what_it_says():
    # "tightened lips" must not be read from "tightened eyelids", nor AU4 from "brows" alone
    read = parse("a drawn angry face with tightened eyelids and brows and", AUS)
    assert (read.expression, sorted(read.aus)) == ("Anger", [7])
    read = parse("a drawn face with lowered, knitted brows and a dropped jaw jaw", AUS)
    assert (read.expression, sorted(read.aus)) == (None, [4, 26])


def test_caption_names_the_expression_and_each_au():
    text = caption({1: 0.9, 12: 0.8}, "Happiness")
    assert text == "a drawn happy face with raised inner brows and up-turned lip corners"
    assert caption({}, "Neutral") == "a drawn calm face with relaxed features"
    assert "slightly parted lips" in caption({25: 0.2, 26: 0.9}, "Surprise")


def _read_rows(path: Path) -> tuple[str, list[str]]:
    lines = path.read_text().splitlines()
    return lines[0], lines[1:]


def test_written_layout_parses_as_affwild2(tmp_path):
    cfg = SyntheticConfig(p_invalid_expr=0.2, p_invalid_au=0.2)
    res = write_affwild2(tmp_path / "aw2", subjects=4, frames=12, seed=1, size=64,
                         config=cfg, progress=False)
    root = res.root
    assert res.train_videos == ["synth_000", "synth_001", "synth_002"]
    assert res.val_videos == ["synth_003"]
    n_invalid_expr = n_invalid_au = 0
    for split, videos in (("Train_Set", res.train_videos), ("Validation_Set", res.val_videos)):
        for v in videos:
            header, rows = _read_rows(root / "EXPR_Classification_Challenge" / split / f"{v}.txt")
            assert header == EXPR_HEADER and len(rows) == 12
            assert all(int(r) in range(-1, 7) for r in rows)
            n_invalid_expr += rows.count("-1")
            header, rows = _read_rows(root / "AU_Detection_Challenge" / split / f"{v}.txt")
            assert header == AU_HEADER and len(rows) == 12
            for r in rows:
                vals = [int(x) for x in r.split(",")]
                assert len(vals) == 12
                assert set(vals) <= {0, 1} or set(vals) == {-1}
                n_invalid_au += vals[0] == -1
            frames = sorted(p.name for p in (root / "cropped_aligned" / v).iterdir())
            assert frames == [f"{i:05d}.jpg" for i in range(1, 13)]
            with Image.open(root / "cropped_aligned" / v / "00001.jpg") as im:
                assert im.size == (64, 64) and im.format == "JPEG"
    assert n_invalid_expr > 0 and n_invalid_au > 0
    # The truth file agrees with the label files line by line.
    truth = [json.loads(x) for x in (root / "synthetic_truth.jsonl").read_text().splitlines()]
    assert len(truth) == 4 * 12
    _, rows = _read_rows(root / "AU_Detection_Challenge" / "Train_Set" / "synth_001.txt")
    for t, r in zip([t for t in truth if t["video"] == "synth_001"], rows):
        if t["au_label_valid"]:
            assert r == ",".join("1" if f"AU{au:02d}" in t["aus"] else "0" for au in AUS)
        else:
            assert r == ",".join(["-1"] * 12)


def test_same_seed_writes_identical_files_with_any_number_of_workers(tmp_path):
    a = write_affwild2(tmp_path / "a", subjects=3, frames=5, seed=3, size=48, progress=False).root
    b = write_affwild2(tmp_path / "b", subjects=3, frames=5, seed=3, size=48, progress=False,
                       workers=2).root
    c = write_affwild2(tmp_path / "c", subjects=3, frames=5, seed=4, size=48, progress=False).root
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    jpg = Path("cropped_aligned/synth_000/00001.jpg")
    assert (a / jpg).read_bytes() != (c / jpg).read_bytes()


def test_adding_subjects_leaves_earlier_videos_unchanged(tmp_path):
    a = write_affwild2(tmp_path / "a", subjects=2, frames=4, seed=0, size=48, progress=False).root
    b = write_affwild2(tmp_path / "b", subjects=3, frames=4, seed=0, size=48, progress=False).root
    for i in range(1, 5):
        rel = f"cropped_aligned/synth_000/{i:05d}.jpg"
        assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_missing_images_are_listed_but_not_written(tmp_path):
    cfg = SyntheticConfig(p_missing_image=0.4)
    res = write_affwild2(tmp_path / "m", subjects=1, frames=20, seed=0, size=48,
                         config=cfg, progress=False)
    jpgs = list((res.root / "cropped_aligned" / "synth_000").glob("*.jpg"))
    assert 0 < len(jpgs) < 20 and res.images == len(jpgs)
    _, rows = _read_rows(res.root / "EXPR_Classification_Challenge" / "Train_Set" / "synth_000.txt")
    assert len(rows) == 20


def test_identical_existing_set_is_reused(tmp_path):
    first = write_affwild2(tmp_path / "s", subjects=2, frames=3, seed=0, size=48, progress=False)
    again = write_affwild2(tmp_path / "s", subjects=2, frames=3, seed=0, size=48, progress=False)
    assert not first.reused and again.reused


def test_set_with_other_parameters_is_refused(tmp_path):
    write_affwild2(tmp_path / "s", subjects=2, frames=3, seed=0, size=48, progress=False)
    with pytest.raises(FileExistsError, match="seed"):
        write_affwild2(tmp_path / "s", subjects=2, frames=3, seed=1, size=48, progress=False)


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        write_affwild2(tmp_path, subjects=1, frames=2, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_interrupted_run_is_regenerated(tmp_path):
    root = tmp_path / "s"
    (root / "cropped_aligned" / "synth_000").mkdir(parents=True)
    (root / "cropped_aligned" / "synth_000" / "00001.jpg").write_bytes(b"partial")
    res = write_affwild2(root, subjects=1, frames=2, size=48, progress=False)
    with Image.open(root / "cropped_aligned" / "synth_000" / "00001.jpg") as im:
        im.load()
    assert res.images == 2 and (root / "SYNTHETIC.json").is_file()


def test_writer_makes_hundreds_of_frames_in_seconds(tmp_path):
    t0 = time.perf_counter()
    res = write_affwild2(tmp_path / "speed", subjects=3, frames=100, seed=0, size=112, progress=False)
    seconds = time.perf_counter() - t0
    fps = res.images / seconds
    print(f"synthetic writer: {res.images} frames at 112 px in {seconds:.2f} s = {fps:.0f} frames/s")
    assert res.images == 300
    assert seconds < 15, f"{fps:.0f} frames/s is too slow"


def test_sample_grid_shows_one_row_per_expression(tmp_path):
    path = tmp_path / "grid.png"
    grid = sample_grid(path, size=64, columns=5)
    assert grid.size == (5 * 64, len(EXPRESSIONS) * 64)
    with Image.open(path) as im:
        assert im.size == grid.size


def test_shipped_sample_grid_is_small_and_complete():
    path = Path(__file__).resolve().parents[1] / "datasets" / "samples" / "synthetic_grid.png"
    assert path.stat().st_size < 200_000
    with Image.open(path) as im:
        assert im.size[1] == len(EXPRESSIONS) * im.size[0] // 6
