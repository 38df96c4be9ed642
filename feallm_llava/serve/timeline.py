"""Timeline PNGs of a video's analysis, one per tracked face (`feallm analyze --timeline DIR`).

Each picture has time (seconds) across and two panels that share it:

- the expression band: one coloured stretch per sampled frame where the face was read,
  in the colour of its expression (legend beside it; light grey: the answer named none);
- the AU heat map: one row per AU (AU01 ... AU26, FACS names beside), dark where the AU
  is active, light where it is not, hatched grey where the answer named no AU at all.

A column spans from halfway to the previous sampled frame to halfway to the next, so
frames sampled unevenly (variable frame rate, `--fps`) keep their true times; frames
where the face was not found (or had an error) stay white. Drawn with matplotlib's Agg
backend through a bare Figure (no pyplot, no display).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from feallm_llava.facs.labels import AU_NAMES, AUS, EXPRESSIONS, au_key

# One colour per expression (matplotlib's tab10 order, Neutral grey), in EXPRESSIONS order.
EXPRESSION_COLOURS = {
    "Neutral": "#9e9e9e", "Anger": "#d62728", "Disgust": "#8c564b", "Fear": "#9467bd",
    "Happiness": "#ffbf00", "Sadness": "#1f77b4", "Surprise": "#2ca02c",
}
UNREAD = "#e6e6e6"


def _num(value) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _edges(times: Sequence[float]) -> np.ndarray:
    """Column edges: halfway between neighbouring times, the ends half a step out."""
    t = np.asarray(times, dtype=float)
    if len(t) == 1:
        return np.array([t[0] - 0.5, t[0] + 0.5])
    mid = (t[1:] + t[:-1]) / 2
    return np.concatenate([[t[0] - (mid[0] - t[0])], mid, [t[-1] + (t[-1] - mid[-1])]])


def face_ids(rows: Sequence[dict]) -> list[int]:
    return sorted({int(f) for f in (_num(r.get("face_id")) for r in rows) if f is not None})


def draw_timeline(rows: Sequence[dict], face_id: int, title: str = ""):
    """A matplotlib Figure for one face of one video's rows (all its sampled frames)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    frames: dict[int, float] = {}
    for r in rows:  # every sampled frame of the video, with or without this face
        frame, t = _num(r.get("frame")), _num(r.get("time_s"))
        if frame is not None and t is not None:
            frames[int(frame)] = t
    order = sorted(frames)
    column = {f: k for k, f in enumerate(order)}
    edges = _edges([frames[f] for f in order])
    expression = np.full(len(order), -2.0)               # -2: face absent, -1: unread, else index
    aus = np.full((len(AUS), len(order)), np.nan)        # NaN: absent or unknown
    unknown = np.zeros((len(AUS), len(order)), dtype=bool)
    for r in rows:
        if _num(r.get("face_id")) != face_id or _num(r.get("frame")) is None or r.get("error"):
            continue
        k = column[int(_num(r["frame"]))]
        name = r.get("expression") or ""
        expression[k] = EXPRESSIONS.index(name) if name in EXPRESSIONS else -1
        for a, au in enumerate(AUS):
            value = _num(r.get(au_key(au)))
            aus[a, k] = value if value is not None else np.nan
            unknown[a, k] = value is None

    fig = Figure(figsize=(max(6.0, min(18.0, 3.0 + 0.12 * len(order))), 5.2), dpi=100)
    band, heat = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 5], "hspace": 0.08})
    for k in range(len(order)):
        if expression[k] == -2:
            continue
        colour = UNREAD if expression[k] == -1 else EXPRESSION_COLOURS[EXPRESSIONS[int(expression[k])]]
        band.axvspan(edges[k], edges[k + 1], color=colour, lw=0)
    band.set_yticks([])
    band.set_ylabel("FE", rotation=0, ha="right", va="center")
    shown = [e for e in EXPRESSIONS if (expression == EXPRESSIONS.index(e)).any()]
    band.legend(handles=[Patch(color=EXPRESSION_COLOURS[e], label=e) for e in shown]
                + ([Patch(color=UNREAD, label="unread")] if (expression == -1).any() else []),
                loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, frameon=False)
    band.set_title(title, fontsize=9, loc="left")

    heat.pcolormesh(edges, np.arange(len(AUS) + 1), np.ma.masked_invalid(aus), cmap="Blues",
                    vmin=-0.25, vmax=1.0, shading="flat")
    ys, xs = np.nonzero(unknown & (expression[None, :] != -2))
    for a, k in zip(ys, xs):
        heat.add_patch(Rectangle((edges[k], a), edges[k + 1] - edges[k], 1, facecolor=UNREAD,
                                 hatch="///", edgecolor="#b0b0b0", lw=0))
    heat.set_yticks(np.arange(len(AUS)) + 0.5)
    heat.set_yticklabels([f"{au_key(au)} {AU_NAMES[au]}" for au in AUS], fontsize=7)
    heat.set_ylim(len(AUS), 0)
    heat.set_xlim(edges[0], edges[-1])
    heat.set_xlabel("time (s)")
    fig.subplots_adjust(left=0.2, right=0.86, top=0.92, bottom=0.1)
    return fig


def write_timelines(rows: Sequence[dict], folder: str | os.PathLike, stem: str, title: str = "",
                    note: str | None = None) -> list[Path]:
    """One PNG per face of one video's rows: `folder/<stem>_face<id>.png`; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^\w.-]+", "_", stem)[:80] or "video"
    written = []
    for face_id in face_ids(rows):
        n = sum(_num(r.get("face_id")) == face_id for r in rows)
        head = f"{title}  face #{face_id} ({n} frame(s))" + (f"\n{note}" if note else "")
        fig = draw_timeline(rows, face_id, head)
        path = folder / f"{safe}_face{face_id}.png"
        fig.savefig(path, format="png", bbox_inches="tight")
        written.append(path)
    return written
