"""Safe image loading: every input kind becomes 8-bit RGB or an ImageError naming the file."""

from __future__ import annotations

import io
import pickle
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from feallm_llava.data.images import ImageError, expand2square, load_rgb


def _png(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A PNG written by hand: signature, IHDR, one IDAT holding zlib(`raw`), IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def _save(tmp_path, img: Image.Image, name: str, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


# --- conversions -----------------------------------------------------------------------


def test_rgb_jpeg_loads_unchanged_in_size(tmp_path):
    path = _save(tmp_path, Image.new("RGB", (40, 30), (200, 10, 10)), "a.jpg")
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (40, 30)


def test_grayscale_becomes_rgb_with_equal_channels(tmp_path):
    arr = np.tile(np.arange(0, 250, 5, dtype=np.uint8), (20, 1))           # (20, 50)
    img = load_rgb(_save(tmp_path, Image.fromarray(arr, "L"), "g.png"))
    out = np.asarray(img)
    assert img.mode == "RGB" and out.shape == (20, 50, 3)
    assert np.array_equal(out[..., 0], arr) and np.array_equal(out[..., 2], arr)


def test_one_bit_image_becomes_black_and_white_rgb(tmp_path):
    im = Image.new("1", (20, 20), 0)
    im.putpixel((3, 3), 1)
    out = np.asarray(load_rgb(_save(tmp_path, im, "b.png")))
    assert tuple(out[3, 3]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 0)


def test_rgba_is_composited_on_the_background(tmp_path):
    im = Image.new("RGBA", (20, 20), (0, 0, 255, 0))                       # transparent
    im.putpixel((5, 5), (255, 0, 0, 255))                                  # opaque red
    out = np.asarray(load_rgb(_save(tmp_path, im, "t.png"), background=(10, 20, 30)))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[5, 5]) == (255, 0, 0)


def test_la_is_composited_on_the_background(tmp_path):
    im = Image.new("LA", (20, 20), (100, 0))
    im.putpixel((1, 1), (50, 255))
    out = np.asarray(load_rgb(_save(tmp_path, im, "la.png")))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (50, 50, 50)


def test_palette_with_transparent_index_is_composited(tmp_path):
    im = Image.new("P", (20, 20), 0)
    im.putpalette([0, 255, 0] + [255, 0, 0] * 255)
    im.putpixel((2, 2), 1)
    path = _save(tmp_path, im, "p.gif", transparency=0)
    out = np.asarray(load_rgb(path, background=(7, 7, 7)))
    assert tuple(out[0, 0]) == (7, 7, 7) and tuple(out[2, 2]) == (255, 0, 0)


def test_palette_without_transparency_becomes_rgb(tmp_path):
    im = Image.new("P", (20, 20), 1)
    im.putpalette([0, 0, 0, 12, 34, 56] + [0, 0, 0] * 254)
    out = np.asarray(load_rgb(_save(tmp_path, im, "p.png")))
    assert tuple(out[0, 0]) == (12, 34, 56)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = _save(tmp_path, Image.new("CMYK", (20, 20), (255, 0, 0, 0)), "c.jpg", quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    r, g, b = np.asarray(load_rgb(path))[10, 10].tolist()
    assert r < 30 and g > 220 and b > 220                                   # cyan


def test_sixteen_bit_grayscale_png_is_scaled_to_eight_bits(tmp_path):
    # 20 x 20, big-endian 16-bit samples; columns cycle through 0, 32896, 65535
    vals = [0, 32896, 65535] * 7
    raw = b"".join(b"\x00" + struct.pack(">20H", *vals[:20]) for _ in range(20))
    path = tmp_path / "g16.png"
    path.write_bytes(_png(20, 20, 16, 0, raw))
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    out = np.asarray(load_rgb(path))
    assert out[0, :3, 0].tolist() == [0, 128, 255]
    assert out.dtype == np.uint8 and out.shape == (20, 20, 3)


def test_sixteen_bit_rgb_png_becomes_eight_bit_rgb(tmp_path):
    px = struct.pack(">3H", 65535, 32896, 0)
    raw = b"".join(b"\x00" + px * 20 for _ in range(20))
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png(20, 20, 16, 2, raw))
    out = np.asarray(load_rgb(path))
    assert out.dtype == np.uint8 and tuple(out[4, 4]) == (255, 128, 0)


def test_thirty_two_bit_integer_image_is_scaled(tmp_path):
    arr = np.full((20, 20), 65535, np.int32)
    arr[0, 0] = 0
    out = np.asarray(load_rgb(_save(tmp_path, Image.fromarray(arr, "I"), "i.tif")))
    assert out[0, 0, 0] == 0 and out[5, 5, 0] == 255


def test_float_image_in_unit_range_is_scaled(tmp_path):
    arr = np.full((20, 20), 0.5, np.float32)
    arr[0, 0] = np.nan
    out = np.asarray(load_rgb(_save(tmp_path, Image.fromarray(arr, "F"), "f.tif")))
    assert out[5, 5, 0] == 128 and out[0, 0, 0] == 0


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6                                                        # rotate 90 CW
    path = _save(tmp_path, im, "o.jpg", exif=exif.tobytes())
    assert load_rgb(path).size == (20, 40)
    assert load_rgb(path, exif_transpose=False).size == (40, 20)


def test_bytes_and_file_objects_are_accepted(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (20, 20), 9).save(buf, "PNG")
    assert load_rgb(buf.getvalue()).mode == "RGB"
    buf.seek(0)
    assert load_rgb(buf).size == (20, 20)


# --- refusals --------------------------------------------------------------------------


def test_decompression_bomb_is_refused_without_decoding(tmp_path):
    # 20000 x 20000 1-bit PNG header with a tiny IDAT: ~100 bytes on disk. Decoding it
    # would need 400 Mpx; the refusal must come from the header alone.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(20000, 20000, 1, 0, b"\x00" * 64))
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="decompression-bomb") as err:
        load_rgb(path)
    assert time.perf_counter() - t0 < 1.0
    assert err.value.path == str(path) and "bomb.png" in str(err.value)


def test_image_over_max_pixels_is_refused_by_our_own_limit(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_png(9000, 9000, 1, 0, b"\x00" * 64))                # 81 Mpx: under Pillow's
    with pytest.raises(ImageError, match=r"9000x9000 = 81\.0 Mpx.*not decoded"):
        load_rgb(path)
    with pytest.raises(ImageError, match="over the limit"):
        load_rgb(_save(tmp_path, Image.new("RGB", (200, 200)), "s.png"), max_pixels=10_000)


def test_tiny_image_is_refused_and_min_side_is_configurable(tmp_path):
    path = _save(tmp_path, Image.new("RGB", (1, 1)), "pixel.png")
    with pytest.raises(ImageError, match=r"1x1, smaller than the minimum side"):
        load_rgb(path)
    assert load_rgb(path, min_side=1).size == (1, 1)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_rgb(path)
    with pytest.raises(ImageError, match="empty input"):
        load_rgb(b"", name="upload.jpg")


def test_non_image_file_is_refused(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="not an image file") as err:
        load_rgb(path)
    assert "notes.jpg" in str(err.value)


def test_truncated_image_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    full = _save(tmp_path, Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)), "full.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageError, match="corrupt or truncated") as err:
        load_rgb(cut)
    assert "cut.png" in str(err.value)


def test_corrupt_jpeg_body_is_refused(tmp_path):
    good = _save(tmp_path, Image.new("RGB", (64, 64), (1, 2, 3)), "good.jpg").read_bytes()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good[:200])
    with pytest.raises(ImageError, match="bad.jpg"):
        load_rgb(bad)


def test_missing_file_and_directory_are_refused(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_rgb(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a directory"):
        load_rgb(tmp_path)


def test_image_error_is_a_value_error_that_survives_pickling():
    err = ImageError("x/y.png", "broken")
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, str(back)) == ("x/y.png", "broken", "x/y.png: broken")


# --- expand2square ---------------------------------------------------------------------


def test_expand2square_centres_a_wide_image_and_fills_the_padding():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    out = expand2square(img, (1, 2, 3))
    arr = np.asarray(out)
    assert out.size == (40, 40)
    assert tuple(arr[0, 0]) == (1, 2, 3) and tuple(arr[39, 39]) == (1, 2, 3)
    assert (arr[10:30] == (255, 0, 0)).all() and tuple(arr[9, 5]) == (1, 2, 3)


def test_expand2square_centres_a_tall_image():
    out = np.asarray(expand2square(Image.new("RGB", (11, 30), (0, 255, 0)), (0, 0, 0)))
    assert out.shape == (30, 30, 3)
    assert (out[:, 9:20] == (0, 255, 0)).all() and (out[:, :9] == 0).all() and (out[:, 20:] == 0).all()


def test_expand2square_returns_a_square_image_as_is():
    img = Image.new("RGB", (16, 16))
    assert expand2square(img, (0, 0, 0)) is img


def test_expand2square_rejects_a_fill_of_the_wrong_shape():
    with pytest.raises(ValueError, match="3 integers"):
        expand2square(Image.new("RGB", (4, 2)), (0.5, 0.5, 0.5))
