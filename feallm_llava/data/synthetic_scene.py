"""Synthetic group pictures for the face-detector fairness bench: faces of every skin tone,
with their true boxes and 5 landmarks.

Each picture (640 x 480 by default) holds 3 or 4 faces of `data.synthetic` over clutter
(rectangles, ellipses, lines and blotches in random colours, some of them skin-like, plus
a soft gradient), each face drawn at its own size (45-140 px wide), roll (up to 6
degrees), expression (`sample_expression`) and lighting gain, with sensor noise on the
whole picture. A face's skin tone is one of the renderer's five stops (`TONES`, light
to dark), cycled so that every tone gets the same number of faces.

A face is cut out of its drawn square without the square's background: it is drawn twice
with the same random state over two different backgrounds, and the pixels that differ
are background (antialiased edges get the matching partial weight). So a detector sees
a head over clutter, not a pasted tile.

Truth per face (`SceneFace`): the face's box (the head ellipse from the brow line's top
to the chin, ears excluded: what face detectors' boxes are trained to cover) and the 5
points in `serve.yunet.LANDMARK_NAMES` order: eye centres, the nostrils' midpoint, the
mouth corners (including the corner shifts of AU12 / AU15 / AU23 / AU26 as the renderer
draws them). Deterministic given the seed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from feallm_llava.data import synthetic as syn

TONES = ("I", "II", "III", "IV", "V")            # the renderer's five skin stops, light to dark
FACE_WIDTH = (45, 140)                           # face (head ellipse) width, pixels
MAX_ROLL = 6.0                                   # degrees, either way


@dataclass(frozen=True)
class SceneFace:
    tone: int                                    # index into TONES
    box: tuple[int, int, int, int]               # x, y, w, h in picture pixels
    landmarks: tuple[tuple[float, float], ...]   # 5 (x, y)
    roll: float                                  # degrees the face was drawn rotated (counter-clockwise)


@dataclass
class Scene:
    image: Image.Image
    faces: list[SceneFace] = field(default_factory=list)


def _identity(rng: np.random.Generator, tone: int) -> syn.Identity:
    """A renderer identity with its skin set to tone stop `tone` (a little jitter)."""
    identity = syn.Identity.sample(rng)
    skin = tuple(int(np.clip(c + rng.integers(-6, 7), 0, 255)) for c in syn._SKIN_STOPS[tone])
    lip = syn._lerp(syn._scale(skin, 0.72), (175, 55, 65), 0.5)
    if abs(syn._luma(lip) - syn._luma(skin)) < 40:   # as the renderer keeps dark-skinned mouths visible
        lip = syn._scale(syn._lerp(lip, (120, 30, 40), 0.3), max(syn._luma(skin) - 40, 25) / max(syn._luma(lip), 1))
    brow = syn._scale(identity.hair, min(0.45 * syn._luma(skin) / max(syn._luma(identity.hair), 1.0), 0.75))
    return dataclasses.replace(identity, skin=skin, lip=lip, brow=brow)


def _face_points(identity: syn.Identity, aus: dict[int, float], nuisance: syn.Nuisance, side: int):
    """Box (x0, y0, x1, y1) and 5 points of the face in its own side x side square."""
    fr = syn._Frame.make(identity, nuisance, float(side))
    i = lambda au: aus.get(au, 0.0)
    sy = fr.sy
    ex = syn._EYE_X * identity.eye_spacing
    parted = i(25) > 0.02
    my = syn._MOUTH_Y + 0.12 * i(26) * (0.0 if parted else 1.0) / sy
    mw = syn._MOUTH_W * (1 - 0.42 * i(23)) + 0.06 * i(12)
    corner_y = my - 0.20 * i(12) + 0.17 * i(15)
    points = (fr.pt(-ex, syn._EYE_Y), fr.pt(ex, syn._EYE_Y), fr.pt(0.0, syn._NOSE_Y),
              fr.pt(-mw, corner_y), fr.pt(mw, corner_y))
    # head ellipse: x in [-1, 1], y from the brows' top (-0.75) to the chin (lowered by AU26)
    chin = syn._ASPECT0 + syn._JAW_DROP * i(26) / sy
    outline = [fr.pt(x, y) for x, y in ((-1, -0.75), (1, -0.75), (-1, chin), (1, chin), (0, chin), (0, -0.75))]
    xs, ys = [p[0] for p in outline], [p[1] for p in outline]
    return (min(xs), min(ys), max(xs), max(ys)), points


def _clutter(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = size
    top, bottom = rng.integers(40, 216, size=3), rng.integers(40, 216, size=3)
    ramp = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    base = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (h, w, 3))
    img = Image.fromarray(np.rint(base).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    skin_like = [syn._SKIN_STOPS[k] for k in range(len(TONES))]
    for _ in range(int(rng.integers(25, 40))):
        colour = (tuple(int(c) for c in skin_like[int(rng.integers(len(skin_like)))]) if rng.random() < 0.25
                  else tuple(int(c) for c in rng.integers(0, 256, size=3)))
        x0, y0 = int(rng.integers(-40, w)), int(rng.integers(-40, h))
        x1, y1 = x0 + int(rng.integers(10, 160)), y0 + int(rng.integers(10, 160))
        kind = rng.random()
        if kind < 0.4:
            d.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind < 0.7:
            d.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            d.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, 9)))
    return img


def _cut_out(identity: syn.Identity, aus: dict[int, float], nuisance: syn.Nuisance, side: int,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(face RGB, alpha) of one face drawn in a side x side square, its background removed."""
    draws = []
    for bg in ((0, 0, 0), (255, 255, 255)):
        who = dataclasses.replace(identity, background=bg, background2=bg)
        draws.append(np.asarray(syn.render_face(aus, who, np.random.default_rng(seed), size=side,
                                                nuisance=nuisance), np.float32))
    on_black, on_white = draws
    alpha = 1.0 - np.clip((on_white - on_black).mean(axis=2) / 255.0, 0.0, 1.0)   # (S, S)
    colour = np.where(alpha[..., None] > 1e-3, on_black / np.maximum(alpha[..., None], 1e-3), 0.0)
    return np.clip(colour, 0, 255), alpha


def make_scene(seed: int, *, size: tuple[int, int] = (640, 480), faces: int | None = None,
               tone_start: int = 0) -> Scene:
    """One picture: `faces` faces (default 3 or 4) whose tones cycle from `tone_start`."""
    rng = np.random.default_rng([seed, 4242])
    w, h = size
    canvas = np.asarray(_clutter(rng, size), np.float32).copy()
    n = int(rng.integers(3, 5)) if faces is None else faces
    placed: list[tuple[int, int, int, int]] = []
    scene_faces = []
    for k in range(n):
        tone = (tone_start + k) % len(TONES)
        identity = _identity(rng, tone)
        expression_rng = np.random.default_rng([seed, k, 17])
        _expression, aus = syn.sample_expression(expression_rng)
        roll = float(rng.uniform(-MAX_ROLL, MAX_ROLL))
        nuisance = syn.Nuisance(rotation=roll)
        width = float(rng.uniform(*FACE_WIDTH))
        # the renderer's face is 2 x face_scale x side wide; pick the side that gives `width`
        side = int(math.ceil(width / (2 * identity.face_scale)))
        (bx0, by0, bx1, by1), points = _face_points(identity, aus, nuisance, side)
        for _try in range(60):
            ox, oy = int(rng.integers(-int(bx0), max(-int(bx0) + 1, w - int(bx1)))), \
                int(rng.integers(-int(by0), max(-int(by0) + 1, h - int(by1))))
            box = (ox + bx0, oy + by0, bx1 - bx0, by1 - by0)
            gap = 0.15 * box[2]
            if all(box[0] + box[2] + gap < p[0] or p[0] + p[2] + gap < box[0] or box[1] + box[3] + gap < p[1]
                   or p[1] + p[3] + gap < box[1] for p in placed):
                break
        else:
            continue   # no free place: fewer faces in this picture
        placed.append(box)
        colour, alpha = _cut_out(identity, aus, nuisance, side, seed * 100 + k)
        gain = float(rng.uniform(0.85, 1.15))
        x0, y0 = max(0, ox), max(0, oy)
        x1, y1 = min(w, ox + side), min(h, oy + side)
        a = alpha[y0 - oy:y1 - oy, x0 - ox:x1 - ox, None]
        canvas[y0:y1, x0:x1] = a * colour[y0 - oy:y1 - oy, x0 - ox:x1 - ox] * gain + (1 - a) * canvas[y0:y1, x0:x1]
        scene_faces.append(SceneFace(
            tone, (round(box[0]), round(box[1]), round(box[2]), round(box[3])),
            tuple((round(px + ox, 2), round(py + oy, 2)) for px, py in points), roll))
    canvas += rng.normal(0.0, float(rng.uniform(2.0, 8.0)), canvas.shape)
    return Scene(Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB"), scene_faces)
