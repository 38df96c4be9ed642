"""The Analyze tab's work, without Gradio: one uploaded photo -> faces, answers, tables.

The same path as `feallm analyze`: `serve.analyzer.Analyzer` loads the file safely
(`data.images.load_rgb`: corrupt, empty, non-image and decompression-bomb files become an
error row), finds the faces with `serve.detectors` (YuNet), aligns each on its landmarks
(`serve.align`) and asks the FER, AU and reasoning questions through the chosen backend,
and reads the answers with the one parser (`fill_answers` -> `facs.parse`). Here those
rows become what the page shows: the photo with boxes (`serve.annotate_png`), the aligned
crop of each face (what the model saw), a summary per face, one table row per face and
AU with its FACS name, and the rows as a CSV file (`serve.rows.COLUMNS`).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from feallm_llava.facs.labels import AU_NAMES, AUS, EXPRESSIONS, au_key
from feallm_llava.serve.analyzer import Analyzer, Source
from feallm_llava.serve.rows import write_results

AU_TABLE_HEADERS = ("AU", "FACS name")   # then one column per face
CELL = {1: "active", 0: "", None: "?"}


@dataclass
class Report:
    """What one analysis gives the page."""

    rows: list[dict]                        # serve.rows.COLUMNS, one per face (or one error row)
    image: Image.Image | None = None        # the photo with boxes and labels, None when unreadable
    csv: Path | None = None                 # the rows as CSV
    message: str = ""                       # markdown: errors, "no face found", the per-face summary
    au_headers: list[str] = field(default_factory=lambda: list(AU_TABLE_HEADERS))
    au_table: list[list[str]] = field(default_factory=list)   # `au_table` rows
    crops: list[tuple[Image.Image, str]] = field(default_factory=list)   # (what the model saw, caption) per face

    @property
    def faces(self) -> list[dict]:
        return [r for r in self.rows if r.get("face_id") is not None]


def analyze_file(path: str | os.PathLike, asker, *, label: str | None = None, out_dir: str | os.PathLike | None = None,
                 batch_size: int = 6) -> Report:
    """Detect, ask and read the faces of the image at `path` through `asker` (an object with
    `generate(queries)`); never raises for a bad file (its reason is in `message`)."""
    from feallm_llava.serve.annotate_png import annotate_image

    path = Path(path)
    source = Source(label or path.name, path=path)
    seen: dict[str, Image.Image] = {}
    analyzer = Analyzer(asker, batch_size=batch_size)
    rows = list(analyzer.iter_rows([source], progress=False,
                                   on_image=lambda _s, img, _rows: seen.setdefault("img", img)))
    img = seen.get("img")
    report = Report(rows, image=annotate_image(img, rows) if img is not None else None)
    if img is not None:
        report.crops = face_crops(analyzer, img, rows)
    report.au_headers, report.au_table = au_table(rows)
    report.message = summary(rows)
    folder = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="feallm-ui-"))
    stem = re.sub(r"[^\w.-]+", "_", Path(source.label).stem)[:60] or "photo"
    report.csv = write_results(rows, folder / f"{stem}_faces.csv")
    return report


def face_crops(analyzer: Analyzer, img: Image.Image, rows: list[dict]) -> list[tuple[Image.Image, str]]:
    """Each face as the model saw it (aligned to the template, or the margin crop of a face
    without landmarks), captioned with its id and how it was framed."""
    how = analyzer.settings()["align"]
    out = []
    for r in rows:
        crop = analyzer.crop_of_row(img, r)
        if crop is None:
            continue
        aligned = isinstance(how, dict) and r.get("x_0") is not None
        out.append((crop, f"face #{r['face_id']}: " + (f"aligned ({how['name']} template)" if aligned
                                                       else "margin crop (no landmarks)")))
    return out


def au_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): one row per AU (AU01 ..., its FACS name), one column per face
    ("active", "" for not active, "?" when the answer named no AU at all)."""
    faces = [r for r in rows if r.get("face_id") is not None]
    headers = [*AU_TABLE_HEADERS, *(f"face #{r['face_id']}" for r in faces)]
    table = [[au_key(au), AU_NAMES[au], *(CELL[_state(r.get(au_key(au)))] for r in faces)] for au in AUS]
    return headers, table


def _state(value) -> int | None:
    return None if value is None else int(value)


def active_aus(row: dict) -> list[str]:
    """'AU06 Cheek Raiser', ... for the AUs the answer says are active."""
    return [f"{au_key(au)} {AU_NAMES[au]}" for au in AUS if _state(row.get(au_key(au))) == 1]


def bar(p: float, width: int = 20) -> str:
    """A probability as a text bar: filled blocks of `width`, then the value."""
    filled = round(max(0.0, min(1.0, p)) * width)
    return f"`{'█' * filled}{'░' * (width - filled)}` {p:.2f}"


def probability_bars(row: dict) -> str:
    """Markdown bars of a face's expression and AU probabilities (empty without them)."""
    lines = [f"{e}: {bar(row[f'p_{e}'])}" for e in EXPRESSIONS if row.get(f"p_{e}") is not None]
    lines += [f"{au_key(au)} {AU_NAMES[au]}: {bar(row[f'{au_key(au)}_p'])}" for au in AUS
              if row.get(f"{au_key(au)}_p") is not None]
    return "  \n".join(lines)


def summary(rows: list[dict]) -> str:
    """Markdown: why nothing came out (bad file, no face), or per face its box, expression,
    active AUs and reasoning."""
    faces = [r for r in rows if r.get("face_id") is not None]
    if not faces:
        error = next((r["error"] for r in rows if r.get("error")), "")
        if error:
            return f"**Could not analyse this file:** {error}"
        return ("**No face found.** The face detector finds roughly frontal faces (measured on faces 45 px "
                "wide and more); try a closer or more frontal photo.")
    parts = [f"**{len(faces)} face(s) found.**"]
    for r in faces:
        head = f"### Face #{r['face_id']}\nBox x={r['face_x']} y={r['face_y']} w={r['face_w']} h={r['face_h']}"
        if r.get("error"):
            parts.append(f"{head}\n\n**Error:** {r['error']}")
            continue
        aus = active_aus(r)
        if all(_state(r.get(au_key(au))) is None for au in AUS):
            au_text = "not read (the answer names no action unit)"
        else:
            au_text = ", ".join(aus) if aus else "none"
        bars = probability_bars(r)
        parts.append(f"{head}\n\n**Expression:** {r.get('expression') or 'not read (the answer names none)'}\n\n"
                     f"**Active AUs:** {au_text}\n\n**Reasoning:** {r.get('reasoning') or '(none)'}"
                     + (f"\n\n**Probabilities:**  \n{bars}" if bars else ""))
    return "\n\n".join(parts)
