"""Draw `feallm analyze` results on the image: one box per face, a label with the face id,
the expression and the active AUs (`feallm analyze --annotate out.png`).

Line width and font size scale with the image so labels stay legible on 100 px crops and
on 4000 px photos. Rows without a face (face_id empty) are written as a banner at the top;
a `caption` (e.g. a warning that the model was not trained for such images) goes on a
band added under the image.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from feallm_llava.facs.labels import AUS, au_key

# One colour per face, cycled; chosen to stay visible on skin and on common backgrounds.
PALETTE = ((255, 64, 64), (64, 200, 255), (255, 210, 0), (120, 255, 120), (255, 120, 255), (255, 150, 40))


def face_label(row: dict) -> str:
    """'#0 Happiness | AU06 AU12' (expression '?' when unread, AUs '?' when unknown)."""
    expression = row.get("expression") or "?"
    known = [au for au in AUS if _value(row.get(au_key(au))) is not None]
    if not known:
        aus = "AUs ?"
    else:
        active = [au_key(au) for au in AUS if _value(row.get(au_key(au))) == 1]
        aus = " ".join(active) if active else "no AU"
    return f"#{row.get('face_id')} {expression} | {aus}"


def _value(v):
    """0/1 from an int, a numpy/pandas integer, or None for NA/None."""
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):  # pandas.NA and NaN
        return None


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable built-in font
    except TypeError:
        return ImageFont.load_default()


def annotate_image(img: Image.Image, rows: list[dict], caption: str | None = None) -> Image.Image:
    """A copy of `img` (RGB) with every face row's box and label drawn on it, and `caption`
    on a band below it."""
    out = img.convert("RGB").copy()
    side = min(out.size)
    width = max(2, side // 200)
    font = _font(max(12, side // 30))
    if caption:
        out = _with_caption(out, caption, _font(max(10, side // 40)))
    draw = ImageDraw.Draw(out)
    for row in rows:
        if _value(row.get("face_id")) is None:
            text = row.get("error") or "no face found"
            _label(draw, (0, 0), text, font, (200, 200, 200), above=False)
            continue
        x, y, w, h = (int(row[k]) for k in ("face_x", "face_y", "face_w", "face_h"))
        colour = PALETTE[int(row["face_id"]) % len(PALETTE)]
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=colour, width=width)
        text = face_label(row) if not row.get("error") else f"#{row['face_id']} error"
        _label(draw, (x, y), text, font, colour, above=True)
    return out


def _label(draw: ImageDraw.ImageDraw, at: tuple[int, int], text: str, font, colour, above: bool) -> None:
    """Text on a filled box: above the point when there is room, else below it."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left, bottom - top
    pad = max(2, th // 5)
    x, y = at
    y0 = y - th - 2 * pad if above and y - th - 2 * pad >= 0 else y
    x = max(0, min(x, draw.im.size[0] - tw - 2 * pad))
    draw.rectangle((x, y0, x + tw + 2 * pad, y0 + th + 2 * pad), fill=colour)
    draw.text((x + pad - left, y0 + pad - top), text, fill=(0, 0, 0), font=font)


def _with_caption(img: Image.Image, caption: str, font) -> Image.Image:
    """`img` over a white band holding `caption`, wrapped to the image's width."""
    measure = ImageDraw.Draw(img)
    lines, line = [], ""
    for word in caption.split():
        trial = f"{line} {word}".strip()
        if line and measure.textlength(trial, font=font) > img.width - 8:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    height = sum(measure.textbbox((0, 0), text, font=font)[3] for text in lines) + 4 * (len(lines) + 1)
    out = Image.new("RGB", (img.width, img.height + height), (255, 255, 255))
    out.paste(img, (0, 0))
    draw, y = ImageDraw.Draw(out), img.height + 4
    for text in lines:
        draw.text((4, y), text, fill=(160, 0, 0), font=font)
        y += draw.textbbox((0, 0), text, font=font)[3] + 4
    return out
