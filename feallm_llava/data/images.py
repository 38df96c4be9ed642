"""Safe image loading: any file a user points us at becomes an 8-bit RGB PIL image or an
`ImageError` that names the file and says what was wrong.

Used by the eval runner, the instruction-set builder and `feallm analyze`, where one bad
file among thousands must give one clear error row, never a crash or a silent black
image. What `load_rgb` does:

- refuses before decoding: missing, empty (0 bytes) and non-image files; images whose
  header declares more than `max_pixels` (decompression-bomb guard: a 20000x20000 PNG is
  a few KB on disk and 1.2 GB decoded; Pillow's own `DecompressionBombError`, raised by
  `Image.open` above 2 x `Image.MAX_IMAGE_PIXELS`, becomes an ImageError too); images
  whose shorter side is under `min_side` (a 1x1 "image" is a tracking pixel, not a face);
- decodes (first frame of animations), applies the EXIF orientation (phone photos);
- converts every mode to RGB: 1/L/P/CMYK/YCbCr -> RGB; transparency (RGBA, LA, PA,
  P or L with a transparent colour) composited over `background`; 16-bit (I;16*) scaled
  by 1/257; 32-bit int (I) and float (F) scaled by their range (see `_to_8bit`).
  16-bit RGB(A) PNGs are already reduced to 8 bits per channel by Pillow on open.

`expand2square` pads to a square with a fill colour, the behaviour of LLaVA's
`image_aspect_ratio == "pad"` (the image centred, the padding filled with the image
processor's mean colour).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 64 Mpx: a 48 Mpx phone photo passes; decoded as RGB that is ~190 MB. Stays below
# Pillow's warning threshold (Image.MAX_IMAGE_PIXELS, ~89 Mpx).
DEFAULT_MAX_PIXELS = 64_000_000
# Smallest accepted side: below this there is no face to analyse.
DEFAULT_MIN_SIDE = 16

Source = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

# What Pillow raises on damaged data (truncated streams, bad chunks, broken zlib/struct
# fields, unsupported mode conversions).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error)


class ImageError(ValueError):
    """An input that is not a usable image; `path` names it, `reason` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):   # picklable across worker processes
        return (type(self), (self.path, self.reason))


def _label(source: Source, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return getattr(source, "name", None) or "<bytes>"


def load_rgb(source: Source, *, max_pixels: int = DEFAULT_MAX_PIXELS,
             min_side: int = DEFAULT_MIN_SIDE, background: tuple[int, int, int] = (255, 255, 255),
             exif_transpose: bool = True, name: str | None = None) -> Image.Image:
    """Load `source` (path, bytes or binary file object) as a decoded 8-bit RGB image.

    Raises ImageError (a ValueError) naming the file for anything unusable; see the
    module docstring for the checks. `name` overrides the label used in errors (for
    bytes input). Images above Pillow's own limit (`Image.MAX_IMAGE_PIXELS`) also need
    that raised: a `max_pixels` above it triggers Pillow's warning, above twice it
    Pillow's refusal.
    """
    label = _label(source, name)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(label, "no such file")
        if path.is_dir():
            raise ImageError(label, "is a directory, not an image file")
        if path.stat().st_size == 0:
            raise ImageError(label, "empty file (0 bytes)")
        fp: str | os.PathLike | BinaryIO = path
    else:
        data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else source.read()
        if not data:
            raise ImageError(label, "empty input (0 bytes)")
        fp = io.BytesIO(data)

    try:
        im = Image.open(fp)
    except Image.DecompressionBombError as err:
        raise ImageError(label, f"refused, not decoded (decompression-bomb guard): {err} "
                                f"Raise PIL.Image.MAX_IMAGE_PIXELS and max_pixels only for "
                                f"trusted files.") from err
    except UnidentifiedImageError as err:
        raise ImageError(label, "not an image file Pillow can identify (corrupt, or another "
                                "kind of file)") from err
    except _DECODE_ERRORS as err:
        raise ImageError(label, f"unreadable image header ({type(err).__name__}: {err})") from err

    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise ImageError(label, f"image is {w}x{h} = {w * h / 1e6:.1f} Mpx, over the limit of "
                                    f"{max_pixels / 1e6:.1f} Mpx (decompression-bomb guard); not "
                                    f"decoded. Pass max_pixels=... to accept it if you trust the file.")
        if min(w, h) < min_side:
            raise ImageError(label, f"image is {w}x{h}, smaller than the minimum side of "
                                    f"{min_side} px; pass min_side=... to accept it")
        try:
            im.load()
            img = ImageOps.exif_transpose(im) if exif_transpose else im
            return _to_rgb(img, background)
        except MemoryError as err:
            raise ImageError(label, f"out of memory decoding a {w}x{h} {im.mode} image; "
                                    f"lower max_pixels") from err
        except _DECODE_ERRORS as err:
            raise ImageError(label, f"corrupt or truncated image data ({type(err).__name__}: "
                                    f"{err})") from err


_TRANSPARENT_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in _TRANSPARENT_MODES or "transparency" in img.info


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale -> 'L'.

    I;16*: / 257 (65535 -> 255). I: as is if within 0..255, / 257 if within 0..65535
    (16-bit data some decoders return as I), else stretched min..max. F: x 255 if within
    0..1, as is if within 0..255, else stretched min..max. NaN -> 0.
    """
    arr = np.asarray(img).astype(np.float64)        # (H, W)
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        out = arr / 257.0
    elif img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        out = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        out = arr
    elif img.mode == "I" and lo >= 0.0 and hi <= 65535.0:
        out = arr / 257.0
    else:
        out = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "L")


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if img.mode == "RGB" and "transparency" not in img.info:
        return img.copy()
    if img.mode in _HIGH_DEPTH_MODES:
        return _to_8bit(img).convert("RGB")
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, tuple(background))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")   # 1, L, P, CMYK, YCbCr, HSV, RGBX; ValueError if unsupported


def expand2square(img: Image.Image, fill: tuple[int, int, int] | int) -> Image.Image:
    """Pad `img` to a square of its longer side, centred, padding filled with `fill`.

    LLaVA's `image_aspect_ratio == "pad"` (fill = the image processor's mean colour in
    0..255). A square image is returned as is.
    """
    w, h = img.size
    if w == h:
        return img
    if isinstance(fill, int):
        fill = (fill,) * len(img.getbands()) if len(img.getbands()) > 1 else fill
    elif len(fill) != len(img.getbands()) or not all(isinstance(c, (int, np.integer)) for c in fill):
        raise ValueError(f"fill {fill!r} must be {len(img.getbands())} integers 0..255 for a "
                         f"{img.mode} image")
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out
