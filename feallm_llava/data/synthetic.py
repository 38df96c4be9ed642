"""Synthetic FACS faces: drawn faces whose geometry is driven by FEALLM's 12 action units.

No FEALLM weights and no licence-free FER/AU data exist, so the offline demo and the
learning tests train on faces where the truth is known by construction. Each of the 12
AUs of `labels.AUS` moves one part of a procedurally drawn face (PIL polygons), boldly
enough to be seen at 56-112 px (a logistic regression on 28 x 28 pixels reads the
expression of held-out subjects at 0.84 on 24 identities x 40 frames, 0.94 on the demo's
100 x 30):

    AU1  inner brow ends rise, short wrinkles in the centre of the forehead
    AU2  outer brow ends rise, short wrinkles above the outer brows
    AU4  brows lower and knit towards the midline, vertical frown lines between them
    AU6  cheeks rise (rosy cheek patches move up), lower lids rise, crow's feet
    AU7  lids tighten: eyes narrow to slits with thick lid lines
    AU10 upper lip rises in a squared shape showing the upper teeth, nasolabial folds
    AU12 lip corners pulled up and out (smile)
    AU15 lip corners pulled down
    AU23 lips tighten: mouth narrower, red of the lips thinner
    AU24 lips pressed to a thin dark line, creases above and below the lips
    AU25 lips part: dark mouth opening with upper teeth
    AU26 jaw drops: chin lowers (the face lengthens), with AU25 a wide opening

An expression is drawn from its FACS prototype (`labels.PROTOTYPES`) with random
missing and extra AUs, kept only while the prototype stays the unique nearest one (so
the expression label is always recoverable from the AUs). Nuisance variation: identity
(= subject: face shape, eye spacing, skin tone, hair, lips, background) and per frame
(size, position, small rotation, lighting gain, noise, JPEG quality).

`write_affwild2` writes a set in the Aff-Wild2 2022+ (ABAW) native layout, so the demo
runs the real reader and instruction-set builder:

    cropped_aligned/<video>/00001.jpg ...
    EXPR_Classification_Challenge/{Train_Set,Validation_Set}/<video>.txt
    AU_Detection_Challenge/{Train_Set,Validation_Set}/<video>.txt
    synthetic_truth.jsonl       per-frame truth: expression, AU intensities, caption
    SYNTHETIC.json              manifest (parameters); written last = set complete

One video per subject (`synth_007`); validation subjects are disjoint from training
subjects. Everything is deterministic given the seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from feallm_llava.facs.labels import AUS, EXPRESSIONS, PROTOTYPES, check_expression

# Bump when the drawing or the sampling changes: the manifest check then regenerates
# instead of reusing a set drawn by older code.
FORMAT_VERSION = 1

# Aff-Wild2 2022+ headers (ABAW3+ annotation files).
EXPR_HEADER = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
AU_HEADER = ",".join(f"AU{au}" for au in AUS)
EXPR_DIR = "EXPR_Classification_Challenge"
AU_DIR = "AU_Detection_Challenge"
FRAMES_DIR = "cropped_aligned"
SPLIT_DIRS = {"train": "Train_Set", "val": "Validation_Set"}
TRUTH_FILE = "synthetic_truth.jsonl"
MANIFEST_FILE = "SYNTHETIC.json"
# What an interrupted write_affwild2 run may have left behind (safe to overwrite).
_OWN_ENTRIES = {FRAMES_DIR, EXPR_DIR, AU_DIR, TRUTH_FILE, MANIFEST_FILE}

RGB = tuple[int, int, int]

# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass
class SyntheticConfig:
    """Every knob of the generator; defaults are the demo's (bold AUs, moderate nuisance)."""

    supersample: int = 3                 # draw at k x size, then box-downsample (antialiasing)
    # expressions
    p_drop: float = 0.10                 # chance each prototype AU is missing
    p_extra: float = 0.04                # chance each non-prototype AU is added
    # per-AU overrides of p_extra: AU24 is in no prototype restricted to the 12 AUs (only
    # the alternative anger table 4+5+7+24 has it), so it appears only as an extra; a
    # higher rate keeps it frequent enough to learn and to score.
    p_extra_au: dict[int, float] = field(default_factory=lambda: {24: 0.15})
    intensity: tuple[float, float] = (0.55, 1.0)   # intensity of an active AU (1 = apex)
    intensity_jitter: float = 0.05       # frame-to-frame intensity change within a segment
    segment: tuple[int, int] = (1, 3)    # frames per expression segment (min, max)
    # labels like the real data: some frames carry -1 (invalid) rows
    p_invalid_expr: float = 0.03
    p_invalid_au: float = 0.03
    p_missing_image: float = 0.0         # frames listed in the txt files with no jpg
    # identity (= subject)
    aspect: tuple[float, float] = (1.18, 1.42)      # face half-height / half-width
    eye_spacing: tuple[float, float] = (0.88, 1.12)
    # Face half-width / image side. Aff-Wild2's cropped_aligned frames are tight, aligned
    # face crops, so the face fills the frame (the forehead top and the chin of a dropped
    # jaw may touch the border); a pixel probe read held-out expressions at 0.84 with
    # faces this size, 0.72 with faces that left half the frame to background.
    face_scale: tuple[float, float] = (0.35, 0.38)
    # per-frame nuisance
    scale_jitter: float = 0.05           # relative size change
    shift: float = 0.035                 # max centre shift, fraction of the image side
    rotation: float = 6.0                # max in-plane rotation, degrees
    gain: tuple[float, float] = (0.88, 1.12)   # global brightness
    noise: tuple[float, float] = (0.0, 6.0)    # Gaussian noise sigma, 8-bit units
    jpeg_quality: tuple[int, int] = (65, 95)
    # splits
    val_fraction: float = 0.25           # share of subjects written to Validation_Set


# ---------------------------------------------------------------------------------------
# Identity (subject) and per-frame nuisance
# ---------------------------------------------------------------------------------------

# Skin tones from light to dark (sRGB), interpolated; hair and iris palettes.
_SKIN_STOPS: tuple[RGB, ...] = ((246, 215, 192), (226, 180, 145), (190, 135, 95),
                                (140, 95, 62), (98, 64, 44))
_HAIR: tuple[RGB, ...] = ((25, 20, 18), (60, 40, 25), (105, 70, 40), (170, 135, 80),
                          (130, 55, 30), (150, 150, 150))
_IRIS: tuple[RGB, ...] = ((70, 45, 25), (40, 30, 20), (60, 100, 150), (80, 110, 70))


def _lerp(a: Iterable[float], b: Iterable[float], t: float) -> RGB:
    return tuple(round(float(x + (y - x) * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def _scale(c: Iterable[float], f: float) -> RGB:
    return tuple(int(max(0, min(255, round(x * f)))) for x in c)  # type: ignore[return-value]


def _luma(c: Iterable[float]) -> float:
    r, g, b = c
    return 0.299 * r + 0.587 * g + 0.114 * b


@dataclass(frozen=True)
class Identity:
    """One synthetic subject: what stays fixed across that subject's frames."""

    subject: str
    aspect: float              # face half-height / half-width (before jaw drop)
    eye_spacing: float         # multiplies the eye and brow x positions
    face_scale: float          # face half-width as a fraction of the image side
    skin: RGB
    hair: RGB
    brow: RGB
    iris: RGB
    lip: RGB
    lip_thickness: float
    brow_thickness: float
    hairline: float            # face units (negative = above the eyes)
    background: RGB            # top of the vertical background gradient
    background2: RGB           # bottom of the gradient

    @classmethod
    def sample(cls, rng: np.random.Generator, subject: str = "synth_000",
               config: SyntheticConfig | None = None) -> Identity:
        cfg = config or SyntheticConfig()
        t = rng.uniform(0, len(_SKIN_STOPS) - 1)
        i = min(int(t), len(_SKIN_STOPS) - 2)
        skin = _lerp(_SKIN_STOPS[i], _SKIN_STOPS[i + 1], t - i)
        skin = tuple(int(np.clip(c + rng.integers(-8, 9), 0, 255)) for c in skin)
        hair = _HAIR[int(rng.integers(len(_HAIR)))]
        # Brows stay clearly darker than the skin whatever the hair colour, so brow AUs
        # remain visible on every skin tone.
        brow_f = min(0.45 * _luma(skin) / max(_luma(hair), 1.0), 0.75)
        brow = _scale(hair, brow_f)
        lip = _lerp(_scale(skin, 0.72), (175, 55, 65), float(rng.uniform(0.4, 0.6)))
        if abs(_luma(lip) - _luma(skin)) < 40:   # dark skin: darker lips keep the mouth visible
            lip = _scale(_lerp(lip, (120, 30, 40), 0.3), max(_luma(skin) - 40, 25) / max(_luma(lip), 1))
        iris = _IRIS[int(rng.integers(len(_IRIS)))]
        # Background: any colour at least 70 (L1/3) away from the skin, so the face
        # outline (and with it the jaw drop, AU26) is always visible.
        for _ in range(100):
            bg = _lerp(rng.integers(20, 236, size=3), (128, 128, 128), 0.35)
            if sum(abs(a - b) for a, b in zip(bg, skin)) / 3 >= 70:
                break
        bg2 = tuple(int(np.clip(c + rng.integers(-40, 41), 0, 255)) for c in bg)
        return cls(
            subject=subject,
            aspect=float(rng.uniform(*cfg.aspect)),
            eye_spacing=float(rng.uniform(*cfg.eye_spacing)),
            face_scale=float(rng.uniform(*cfg.face_scale)),
            skin=skin, hair=hair, brow=brow, iris=iris, lip=lip,
            lip_thickness=float(rng.uniform(0.85, 1.2)),
            brow_thickness=float(rng.uniform(0.85, 1.2)),
            hairline=float(rng.uniform(-1.12, -1.02)),
            background=bg, background2=bg2,  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class Nuisance:
    """Per-frame variation that carries no label."""

    scale: float = 1.0         # multiplies identity.face_scale
    dx: float = 0.0            # centre shift, fraction of the image side
    dy: float = 0.0
    rotation: float = 0.0      # degrees, counter-clockwise
    gain: float = 1.0          # global brightness
    noise: float = 0.0         # Gaussian sigma, 8-bit units
    jpeg_quality: int = 95     # used by write_affwild2 when saving

    @classmethod
    def none(cls) -> Nuisance:
        """Canonical pose, no noise: what tests and figures use to compare AUs."""
        return cls()

    @classmethod
    def sample(cls, rng: np.random.Generator, config: SyntheticConfig | None = None) -> Nuisance:
        cfg = config or SyntheticConfig()
        return cls(
            scale=float(1.0 + rng.uniform(-cfg.scale_jitter, cfg.scale_jitter)),
            dx=float(rng.uniform(-cfg.shift, cfg.shift)),
            dy=float(rng.uniform(-cfg.shift, cfg.shift)),
            rotation=float(rng.uniform(-cfg.rotation, cfg.rotation)),
            gain=float(rng.uniform(*cfg.gain)),
            noise=float(rng.uniform(*cfg.noise)),
            jpeg_quality=int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)),
        )


# ---------------------------------------------------------------------------------------
# Geometry: face units -> pixels
# ---------------------------------------------------------------------------------------

# Face units: x to the right, y down, origin at the face centre; 1 unit = face half-width.
# Vertical positions below are for an average face and get multiplied by aspect/_ASPECT0.
_ASPECT0 = 1.3
_CENTRE_Y = 0.49            # face centre height, fraction of the image side
_EYE_Y = -0.22
_EYE_X = 0.40
_BROW_Y = -0.50
_NOSE_Y = 0.22
_MOUTH_Y = 0.62
_MOUTH_W = 0.38
_JAW_DROP = 0.45            # chin displacement at AU26 intensity 1

# Where each AU draws, in face units (x0, y0, x1, y1), for the canonical pose. Tests
# check that switching an AU on changes pixels inside its box and nowhere else.
AU_REGIONS: dict[int, tuple[float, float, float, float]] = {
    1: (-0.85, -1.12, 0.85, -0.30),
    2: (-0.85, -1.12, 0.85, -0.30),
    4: (-0.85, -1.00, 0.85, -0.25),
    6: (-1.00, -0.45, 1.00, 0.36),
    7: (-0.75, -0.42, 0.75, -0.02),
    10: (-0.62, 0.08, 0.62, 0.95),
    12: (-0.62, 0.30, 0.62, 0.95),
    15: (-0.62, 0.30, 0.62, 0.95),
    23: (-0.62, 0.30, 0.62, 0.95),
    24: (-0.62, 0.30, 0.62, 1.00),
    25: (-0.62, 0.30, 0.62, 0.95),
    26: (-1.10, 0.15, 1.10, 3.00),
}


@dataclass(frozen=True)
class _Frame:
    """Maps face units to (supersampled) pixels: scale, aspect, rotation, translation."""

    cx: float
    cy: float
    unit: float                # pixels per face unit
    sy: float                  # vertical stretch = aspect / _ASPECT0
    cos: float
    sin: float

    @classmethod
    def make(cls, identity: Identity, nuisance: Nuisance, side: float) -> _Frame:
        a = math.radians(nuisance.rotation)
        return cls(
            cx=side * (0.5 + nuisance.dx),
            cy=side * (_CENTRE_Y + nuisance.dy),
            unit=side * identity.face_scale * nuisance.scale,
            sy=identity.aspect / _ASPECT0,
            cos=math.cos(a), sin=-math.sin(a),   # image y points down
        )

    def pt(self, x: float, y: float) -> tuple[float, float]:
        y = y * self.sy
        return (self.cx + self.unit * (x * self.cos - y * self.sin),
                self.cy + self.unit * (x * self.sin + y * self.cos))

    def pts(self, xs: np.ndarray, ys: np.ndarray) -> list[tuple[float, float]]:
        xs = np.asarray(xs, np.float64)
        ys = np.asarray(ys, np.float64) * self.sy
        px = self.cx + self.unit * (xs * self.cos - ys * self.sin)
        py = self.cy + self.unit * (xs * self.sin + ys * self.cos)
        return list(zip(px.tolist(), py.tolist()))

    def width(self, w: float) -> int:
        return max(1, round(w * self.unit))


def au_region_box(au: int, identity: Identity, size: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of `AU_REGIONS[au]` for the canonical pose at `size`."""
    fr = _Frame.make(identity, Nuisance.none(), float(size))
    x0, y0, x1, y1 = AU_REGIONS[au]
    (px0, py0), (px1, py1) = fr.pt(x0, y0), fr.pt(x1, y1)
    return (max(0, math.floor(px0)), max(0, math.floor(py0)),
            min(size, math.ceil(px1)), min(size, math.ceil(py1)))


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    th = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return cx + rx * np.cos(th), cy + ry * np.sin(th)


def _quad(p0, p1, p2, n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Quadratic curve through p0, p1 (at t=0.5) and p2."""
    t = np.linspace(0, 1, n)
    c = (2 * p1[0] - (p0[0] + p2[0]) / 2, 2 * p1[1] - (p0[1] + p2[1]) / 2)
    xs = (1 - t) ** 2 * p0[0] + 2 * (1 - t) * t * c[0] + t ** 2 * p2[0]
    ys = (1 - t) ** 2 * p0[1] + 2 * (1 - t) * t * c[1] + t ** 2 * p2[1]
    return xs, ys


# ---------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------


def _intensities(aus: Mapping[int, float] | Iterable[int]) -> dict[int, float]:
    if not isinstance(aus, Mapping):
        aus = {au: 1.0 for au in aus}
    out = {}
    for au, v in aus.items():
        if au not in AUS:
            raise ValueError(f"AU{au} is not one of FEALLM's 12 AUs {AUS}")
        out[au] = float(min(max(v, 0.0), 1.0))
    return out


def render_face(aus: Mapping[int, float] | Iterable[int], identity: Identity,
                rng: np.random.Generator, *, size: int = 112,
                nuisance: Nuisance | None = None,
                config: SyntheticConfig | None = None) -> Image.Image:
    """Draw one face (RGB, size x size) showing `aus` ({AU: intensity 0..1}).

    The per-frame nuisance is drawn from `rng` unless given; the same rng state gives
    the same image. JPEG compression (nuisance.jpeg_quality) is applied when saving.
    """
    cfg = config or SyntheticConfig()
    a = _intensities(aus)
    nz = nuisance if nuisance is not None else Nuisance.sample(rng, cfg)
    noise_seed = int(rng.integers(2**31))
    i = lambda au: a.get(au, 0.0)

    k = cfg.supersample
    side = size * k
    fr = _Frame.make(identity, nz, float(side))
    sy = fr.sy

    # background: vertical gradient between the identity's two colours, one column
    # (side, 1, 3) stretched to (side, side, 3)
    ramp = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None, None]
    col = (np.asarray(identity.background, np.float32) * (1 - ramp)
           + np.asarray(identity.background2, np.float32) * ramp)
    canvas = Image.fromarray(np.rint(col).astype(np.uint8), "RGB").resize(
        (side, side), Image.Resampling.NEAREST)
    d = ImageDraw.Draw(canvas)

    skin = identity.skin
    crease = _scale(skin, 0.55)
    shadow = _scale(skin, 0.78)

    def poly(xs, ys, fill):
        d.polygon(fr.pts(xs, ys), fill=fill)

    def line(xs, ys, w, fill):
        d.line(fr.pts(xs, ys), fill=fill, width=fr.width(w), joint="curve")

    # --- head: hair behind, neck, ears, face (AU26 lengthens the lower half) ---
    hu = _ASPECT0                                # upper half-height (scaled by sy in _Frame)
    hl = _ASPECT0 + _JAW_DROP * i(26) / sy       # lower half-height, chin drops with AU26
    poly(*_ellipse(0, -0.05, 1.12, hu * 1.08), identity.hair)
    poly(np.array([-0.5, 0.5, 0.55, -0.55]), np.array([0.6, 0.6, 3.0 / sy, 3.0 / sy]), shadow)
    for s in (-1, 1):
        poly(*_ellipse(s * 1.0, -0.1, 0.11, 0.22, 24), _scale(skin, 0.9))
    th = np.linspace(np.pi, 2 * np.pi, 40)      # upper half (y < 0)
    tl = np.linspace(0, np.pi, 40)              # lower half
    poly(np.concatenate([np.cos(th), np.cos(tl)]),
         np.concatenate([hu * np.sin(th), hl * np.sin(tl)]), skin)
    # fringe: hair from the top of the head down to the hairline curve
    xs = np.linspace(-0.98, 0.98, 30)
    top = -hu * np.sqrt(1 - xs ** 2) - 0.02
    hair_line = identity.hairline + 0.18 * xs ** 2
    keep = hair_line > top
    if keep.any():
        poly(np.concatenate([xs[keep], xs[keep][::-1]]),
             np.concatenate([top[keep], hair_line[keep][::-1]]), identity.hair)

    ex0 = _EYE_X * identity.eye_spacing

    # --- AU6: cheeks rise (rosy patches), infraorbital creases and crow's feet ---
    if i(6) > 0.02:
        blush = _lerp(skin, (225, 90, 95), 0.5)
        for s in (-1, 1):
            ccx, ccy = s * (ex0 + 0.08), 0.14 - 0.14 * i(6)
            poly(*_ellipse(ccx, ccy, 0.22, 0.13, 32), _lerp(skin, blush, i(6)))
            line(*_quad((ccx - 0.2, ccy + 0.06), (ccx, ccy + 0.15), (ccx + 0.2, ccy + 0.06)),
                 0.02 + 0.015 * i(6), _lerp(skin, crease, 0.4 + 0.6 * i(6)))
            cx = s * ex0
            line(*_quad((cx - 0.17, -0.06 - 0.05 * i(6)), (cx, 0.0 - 0.06 * i(6)),
                        (cx + 0.17, -0.06 - 0.05 * i(6))), 0.02 + 0.02 * i(6), crease)
            ox = s * (ex0 + 0.24)
            for ang in (-0.45, 0.0, 0.45):
                line(np.array([ox, ox + s * 0.15 * math.cos(ang) * i(6)]),
                     np.array([_EYE_Y, _EYE_Y + 0.15 * math.sin(ang) * i(6)]),
                     0.022, crease)

    # --- AU10: nasolabial folds deepen ---
    if i(10) > 0.02:
        for s in (-1, 1):
            line(*_quad((s * 0.15, 0.17), (s * 0.30, 0.38), (s * 0.44, 0.66)),
                 0.02 + 0.035 * i(10), _lerp(skin, crease, 0.5 + 0.5 * i(10)))

    # --- AU1 / AU2 forehead wrinkles, AU4 frown lines ---
    if i(1) > 0.02:
        for y in (-0.90, -0.99):
            line(*_quad((-0.12, y + 0.02), (0.0, y - 0.02), (0.12, y + 0.02), 8),
                 0.02 + 0.015 * i(1), _lerp(skin, crease, 0.5 + 0.5 * i(1)))
    if i(2) > 0.02:
        for s in (-1, 1):
            for y in (-0.88, -0.96):
                line(*_quad((s * (ex0 - 0.02), y + 0.03), (s * (ex0 + 0.12), y - 0.01),
                            (s * (ex0 + 0.26), y + 0.04), 8),
                     0.02 + 0.015 * i(2), _lerp(skin, crease, 0.5 + 0.5 * i(2)))
    if i(4) > 0.02:
        for s in (-1, 1):
            line(np.array([s * 0.07, s * 0.05]), np.array([-0.52, -0.34]),
                 0.02 + 0.03 * i(4), _lerp(skin, crease, 0.5 + 0.5 * i(4)))

    # --- brows: AU1 raises the inner ends, AU2 the outer ends, AU4 lowers and knits ---
    thick = 0.10 * identity.brow_thickness
    for s in (-1, 1):
        inner = (s * (ex0 - 0.19 - 0.07 * i(4)), _BROW_Y - 0.24 * i(1) + 0.12 * i(4))
        mid = (s * (ex0 + 0.04), _BROW_Y - 0.07 - 0.10 * i(1) - 0.12 * i(2) + 0.10 * i(4))
        outer = (s * (ex0 + 0.27), _BROW_Y - 0.25 * i(2) + 0.08 * i(4))
        bx, by = _quad(inner, mid, outer)
        taper = np.linspace(1.0, 0.6, bx.size) * thick / 2
        poly(np.concatenate([bx, bx[::-1]]), np.concatenate([by - taper, (by + taper)[::-1]]),
             identity.brow)

    # --- eyes: AU6 pushes the lower lid up, AU7 narrows both lids ---
    ew = 0.20
    eh_up = 0.12 * (1 - 0.5 * i(7)) * (1 - 0.15 * i(6))
    eh_lo = 0.10 * (1 - 0.6 * i(6)) * (1 - 0.6 * i(7))
    t = np.linspace(-1, 1, 21)
    for s in (-1, 1):
        ex = s * ex0
        xs = ex + ew * t
        up = _EYE_Y - eh_up * (1 - t ** 2) ** 0.8
        lo = _EYE_Y + eh_lo * (1 - t ** 2) ** 0.9
        poly(np.concatenate([xs, xs[::-1]]), np.concatenate([up, lo[::-1]]), (238, 236, 230))
        for r, col in ((0.075, identity.iris), (0.035, (10, 10, 10))):
            ct = np.linspace(-r, r, 13)
            half = np.sqrt(np.maximum(r ** 2 - ct ** 2, 0))
            lt = ct / ew
            top = np.maximum(_EYE_Y - half, _EYE_Y - eh_up * (1 - lt ** 2) ** 0.8)
            bot = np.minimum(_EYE_Y + half, _EYE_Y + eh_lo * (1 - lt ** 2) ** 0.9)
            ok = bot > top
            if ok.sum() >= 2:
                poly(np.concatenate([ex + ct[ok], (ex + ct[ok])[::-1]]),
                     np.concatenate([top[ok], bot[ok][::-1]]), col)
        line(xs, up, 0.035 + 0.03 * i(7), (25, 20, 20))
        line(xs, lo, 0.018 + 0.035 * i(7), _scale(crease, 0.8))

    # --- nose (static) ---
    for s in (-1, 1):
        poly(*_ellipse(s * 0.07, _NOSE_Y, 0.045, 0.028, 16), _scale(skin, 0.45))
    line(*_quad((-0.15, _NOSE_Y - 0.05), (0.0, _NOSE_Y + 0.05), (0.15, _NOSE_Y - 0.05), 10),
         0.02, shadow)

    # --- mouth ---
    parted = i(25) > 0.02
    shift = 0.12 * i(26) * (0.0 if parted else 1.0) / sy   # closed jaw drop: mouth moves down
    my = _MOUTH_Y + shift
    mw = _MOUTH_W * (1 - 0.42 * i(23)) + 0.06 * i(12)
    dc = -0.20 * i(12) + 0.17 * i(15)             # corner height change (down > 0)
    gap = (0.10 * i(25) + 0.30 * i(26) / sy) if parted else 0.0
    press = 1 - 0.9 * i(24)
    ut = 0.085 * identity.lip_thickness * (1 - 0.4 * i(23)) * press
    lt_ = 0.11 * identity.lip_thickness * (1 - 0.4 * i(23)) * press
    t = np.linspace(-1, 1, 25)
    xs = mw * t
    meet = my + dc * t ** 2
    prof = (1 - t ** 2) ** 0.6
    ul_lo = meet - 0.25 * gap * prof - 0.13 * i(10) * (1 - t ** 4)   # upper lip, lower edge
    ll_up = meet + 0.75 * gap * prof                                # lower lip, upper edge
    ul_up = ul_lo - ut * np.sqrt(1 - t ** 2) + 0.025 * np.exp(-(t / 0.15) ** 2) * (ut / 0.085)
    ll_lo = ll_up + lt_ * np.sqrt(1 - t ** 2)
    if i(24) > 0.02:   # pressed lips push the chin boss up: a bulging, shaded chin patch
        poly(*_ellipse(0.0, ll_lo.max() + 0.14, 0.27, 0.12, 32),
             _lerp(skin, crease, 0.6 * i(24)))
    if (ll_up - ul_lo).max() > 0.01:
        poly(np.concatenate([xs, xs[::-1]]), np.concatenate([ul_lo, ll_up[::-1]]), (55, 18, 22))
        teeth = np.minimum(ul_lo + 0.075 * (1 - t ** 2) ** 0.3, ll_up)
        m = np.abs(t) <= 0.8
        poly(np.concatenate([xs[m], xs[m][::-1]]), np.concatenate([ul_lo[m], teeth[m][::-1]]),
             (240, 238, 228))
    lip = _lerp(identity.lip, skin, 0.6 * i(24))    # pressed lips roll in: less red shows
    poly(np.concatenate([xs, xs[::-1]]), np.concatenate([ul_up, ul_lo[::-1]]), lip)
    poly(np.concatenate([xs, xs[::-1]]), np.concatenate([ll_up, ll_lo[::-1]]), _scale(lip, 1.08))
    line(xs, ul_lo, 0.022 + 0.045 * i(24), _scale(identity.lip, 0.45))
    if i(24) > 0.02:   # pressed lips bulge: creases above the upper and below the lower lip
        for y0, bow in ((ul_up.min() - 0.07, 0.02), (ll_lo.max() + 0.09, -0.03)):
            line(*_quad((-0.26, y0), (0.0, y0 + bow), (0.26, y0), 8),
                 0.025 + 0.025 * i(24), _lerp(skin, crease, 0.5 + 0.5 * i(24)))

    # --- downsample, lighting gain, noise ---
    img = canvas.resize((size, size), Image.Resampling.BOX)
    if nz.gain != 1.0 or nz.noise > 0:
        arr = np.asarray(img, np.float32) * nz.gain
        if nz.noise > 0:
            arr += np.random.default_rng(noise_seed).normal(0.0, nz.noise, arr.shape)
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")
    return img


# ---------------------------------------------------------------------------------------
# Expressions and captions
# ---------------------------------------------------------------------------------------


# AU pairs never sampled together: lips cannot be pressed (24) and parted (25) at once,
# and in this drawing lip corners pulled up (12) and down (15) cancel to an invisible
# change, so such a label would be unlearnable.
_EXCLUSIVE: tuple[tuple[int, int], ...] = ((12, 15), (24, 25))


def _unique_nearest(active: frozenset[int], expression: str) -> bool:
    """True when `expression`'s prototype is strictly the nearest (symmetric difference)."""
    own = len(active ^ set(PROTOTYPES[expression]))
    return all(len(active ^ set(PROTOTYPES[e])) > own for e in EXPRESSIONS if e != expression)


def sample_expression(rng: np.random.Generator, config: SyntheticConfig | None = None,
                      expression: str | None = None) -> tuple[str, dict[int, float]]:
    """An expression (uniform over the 7 unless given) and its AU intensities.

    Starts from the FACS prototype, drops each prototype AU with `p_drop` and adds each
    other AU with `p_extra` (`p_extra_au` per AU); a draw is kept only if the prototype
    is still the unique nearest one, so the expression stays determined by the AUs, and
    no `_EXCLUSIVE` pair is active (else up to 20 redraws, then the plain prototype).
    """
    cfg = config or SyntheticConfig()
    expr = check_expression(expression) if expression else EXPRESSIONS[int(rng.integers(len(EXPRESSIONS)))]
    proto = PROTOTYPES[expr]
    active = frozenset(proto)
    for _ in range(20):
        cand = frozenset([au for au in proto if rng.random() >= cfg.p_drop]
                         + [au for au in AUS if au not in proto
                            and rng.random() < cfg.p_extra_au.get(au, cfg.p_extra)])
        if _unique_nearest(cand, expr) and not any(a in cand and b in cand for a, b in _EXCLUSIVE):
            active = cand
            break
    aus = {au: float(rng.uniform(*cfg.intensity)) for au in AUS if au in active}
    return expr, aus


# Caption phrases per AU, in the words a FACS coder would use (stage-1 captions).
_AU_PHRASES: dict[int, str] = {
    1: "raised inner brows",
    2: "raised outer brows",
    4: "lowered, knitted brows",
    6: "raised cheeks",
    7: "tightened eyelids",
    10: "a raised upper lip",
    12: "up-turned lip corners",
    15: "down-turned lip corners",
    23: "tightened lips",
    24: "pressed lips",
    25: "parted lips",
    26: "a dropped jaw",
}
_EXPR_ADJ: dict[str, str] = {
    "Neutral": "calm", "Anger": "angry", "Disgust": "disgusted", "Fear": "fearful",
    "Happiness": "happy", "Sadness": "sad", "Surprise": "surprised",
}


def caption(aus: Mapping[int, float] | Iterable[int], expression: str) -> str:
    """A short LCS-558K-style caption: 'a drawn happy face with raised cheeks and up-turned lip corners'."""
    a = {au: v for au, v in _intensities(aus).items() if v > 0}
    adj = _EXPR_ADJ[check_expression(expression)]
    parts = [("slightly " if a[au] < 0.4 else "") + _AU_PHRASES[au] for au in AUS if au in a]
    if not parts:
        return f"a drawn {adj} face with relaxed features"
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"a drawn {adj} face with {body}"


# ---------------------------------------------------------------------------------------
# Aff-Wild2 writer
# ---------------------------------------------------------------------------------------


@dataclass
class SyntheticSet:
    """What write_affwild2 produced."""

    root: Path
    train_videos: list[str]
    val_videos: list[str]
    frames: int                # frames per video (= data lines per txt file)
    images: int                # jpg files written
    seconds: float             # wall time of the generation (0 if reused)
    reused: bool = False       # True when an identical, complete set was already there
    manifest: dict = field(default_factory=dict)


def video_name(index: int) -> str:
    return f"synth_{index:03d}"


def _split_counts(subjects: int, val_fraction: float) -> int:
    if subjects < 2:
        return 0
    return min(subjects - 1, max(1, round(subjects * val_fraction)))


def _check_out_dir(root: Path, manifest: dict) -> bool:
    """True if an identical complete set is already at root; raise if root is foreign."""
    if not root.exists():
        return False
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: exists and is not a directory; choose another --out")
    mpath = root / MANIFEST_FILE
    if mpath.is_file():
        try:
            old = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{mpath}: unreadable manifest ({err}); delete {root} to regenerate") from err
        if old == manifest:
            return True
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        raise FileExistsError(
            f"{root}: holds a synthetic set made with different parameters ({', '.join(diff)}); "
            f"delete it or choose another output directory")
    foreign = sorted(p.name for p in root.iterdir() if p.name not in _OWN_ENTRIES)
    if foreign:
        raise FileExistsError(
            f"{root}: not empty and not a synthetic Aff-Wild2 set (found {', '.join(foreign[:5])}); "
            f"choose an empty or new output directory")
    return False   # an interrupted run of ours: regenerate over it


def _write_video(job) -> tuple[str, str, list[str], list[str], list[str], int]:
    """Draw and save one video's frames; return its label lines and truth lines."""
    root, v, name, split, frames, seed, size, cfg = job
    rng = np.random.default_rng([seed, v])
    identity = Identity.sample(rng, name, cfg)
    vdir = root / FRAMES_DIR / name
    vdir.mkdir(parents=True, exist_ok=True)
    expr_lines, au_lines, truth_lines = [EXPR_HEADER], [AU_HEADER], []
    written, left = 0, 0
    expr, base = "Neutral", {}
    for f in range(1, frames + 1):
        if left == 0:
            expr, base = sample_expression(rng, cfg)
            left = int(rng.integers(cfg.segment[0], cfg.segment[1] + 1))
        left -= 1
        lo, hi = cfg.intensity
        aus = {au: float(np.clip(x + rng.uniform(-cfg.intensity_jitter, cfg.intensity_jitter), lo, hi))
               for au, x in base.items()}
        nz = Nuisance.sample(rng, cfg)
        img = render_face(aus, identity, rng, size=size, nuisance=nz, config=cfg)
        has_image = not (rng.random() < cfg.p_missing_image)
        expr_ok = not (rng.random() < cfg.p_invalid_expr)
        au_ok = not (rng.random() < cfg.p_invalid_au)
        rel = f"{FRAMES_DIR}/{name}/{f:05d}.jpg"
        if has_image:
            img.save(root / rel, "JPEG", quality=nz.jpeg_quality)
            written += 1
        expr_lines.append(str(EXPRESSIONS.index(expr)) if expr_ok else "-1")
        au_lines.append(",".join(("1" if au in aus else "0") if au_ok else "-1" for au in AUS))
        truth_lines.append(json.dumps({
            "video": name, "frame": f, "split": split,
            "image": rel if has_image else None,
            "expression": expr, "expression_index": EXPRESSIONS.index(expr),
            "aus": {f"AU{au:02d}": round(x, 3) for au, x in sorted(aus.items())},
            "caption": caption(aus, expr),
            "expr_label_valid": expr_ok, "au_label_valid": au_ok,
        }) + "\n")
    return name, split, expr_lines, au_lines, truth_lines, written


def write_affwild2(out_dir: str | os.PathLike, subjects: int = 12, frames: int = 60,
                   seed: int = 0, size: int = 112, *, config: SyntheticConfig | None = None,
                   progress: bool = True, workers: int = 1) -> SyntheticSet:
    """Write `subjects` videos of `frames` frames in the Aff-Wild2 2022+ layout.

    Deterministic given (subjects, frames, seed, size, config); each video's content
    depends only on (seed, its index), so adding subjects leaves earlier ones unchanged,
    and `workers` processes draw the same files as one (the demo uses two cores).
    The last round(subjects * val_fraction) subjects form the Validation_Set. If `out_dir`
    already holds the identical complete set it is reused; a set with other parameters or
    any foreign file refuses with FileExistsError.
    """
    if subjects < 1 or frames < 1:
        raise ValueError(f"subjects and frames must be >= 1 (got subjects={subjects}, frames={frames})")
    if size < 32:
        raise ValueError(f"size={size} is too small to draw a face; use >= 32")
    cfg = config or SyntheticConfig()
    root = Path(out_dir)
    manifest = {
        "generator": "feallm_llava.data.synthetic", "format_version": FORMAT_VERSION,
        "layout": "Aff-Wild2 2022+ (ABAW)", "subjects": subjects, "frames": frames,
        "seed": seed, "size": size, "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
    }
    n_val = _split_counts(subjects, cfg.val_fraction)
    names = [video_name(v) for v in range(subjects)]
    train, val = names[: subjects - n_val], names[subjects - n_val:]
    if _check_out_dir(root, manifest):
        return SyntheticSet(root, train, val, frames, 0, 0.0, reused=True, manifest=manifest)
    for entry in _OWN_ENTRIES:
        p = root / entry
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    t0 = time.perf_counter()
    n_images = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=subjects * frames, desc="synthetic faces", unit="frame")
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(root, v, name, "val" if name in val else "train", frames, seed, size, cfg)
            for v, name in enumerate(names)]
    with open(root / TRUTH_FILE, "w") as truth, contextlib.ExitStack() as stack:
        # videos are independent (each has its own rng), so workers draw them in any
        # order; the truth file and the label files are written here, in video order
        mapper = map
        if min(workers, len(jobs)) > 1:
            from concurrent.futures import ProcessPoolExecutor
            mapper = stack.enter_context(ProcessPoolExecutor(min(workers, len(jobs)))).map
        for name, split, expr_lines, au_lines, truth_lines, written in mapper(_write_video, jobs):
            n_images += written
            truth.writelines(truth_lines)
            for top, lines in ((EXPR_DIR, expr_lines), (AU_DIR, au_lines)):
                d = root / top / SPLIT_DIRS[split]
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{name}.txt").write_text("\n".join(lines) + "\n")
            if bar is not None:
                bar.update(frames)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return SyntheticSet(root, train, val, frames, n_images, seconds, manifest=manifest)


def sample_grid(path: str | os.PathLike | None = None, *, size: int = 96, columns: int = 6,
                seed: int = 0, config: SyntheticConfig | None = None) -> Image.Image:
    """A figure: one row per expression (prototype AUs at 0.9), one column per identity.

    The shipped `datasets/samples/synthetic_grid.png` is
    `sample_grid(path, size=96, columns=6, config=SyntheticConfig(noise=(0.0, 0.0)))`
    (noise off only to keep the PNG small).
    """
    cfg = config or SyntheticConfig()
    ids = [Identity.sample(np.random.default_rng([seed, 1000 + c]), f"grid_{c}", cfg)
           for c in range(columns)]
    grid = Image.new("RGB", (columns * size, len(EXPRESSIONS) * size), "white")
    for r, expr in enumerate(EXPRESSIONS):
        aus = {au: 0.9 for au in PROTOTYPES[expr]}
        for c, ident in enumerate(ids):
            rng = np.random.default_rng([seed, r, c])
            grid.paste(render_face(aus, ident, rng, size=size, config=cfg), (c * size, r * size))
    if path is not None:
        grid.save(path)
    return grid
