"""The results table of `feallm analyze`: one row per face and frame, Py-Feat / LibreFace
style (`COLUMNS`), how the model's answers fill a row, and how rows are read back from a
results file and handed out (a pandas DataFrame, plain dicts, CSV / JSONL / JSON)."""

from __future__ import annotations

import os
from pathlib import Path

from feallm_llava.facs.labels import AUS, EXPRESSIONS, au_key
from feallm_llava.serve.results_file import ResultsFile

AU_COLUMNS: tuple[str, ...] = tuple(au_key(au) for au in AUS)  # AU01 ... AU26 (labels.AUS order)
BOX_COLUMNS = ("face_x", "face_y", "face_w", "face_h")
# The detector's 5 points, Py-Feat / OpenFace style (x_0 ... then y_0 ...): 0 the eye on the
# image's left, 1 the other eye, 2 the nose tip, 3 the mouth corner on the image's left,
# 4 the other one (`serve.yunet.LANDMARK_NAMES`); empty for a detector without landmarks.
LANDMARK_COLUMNS = (*(f"x_{k}" for k in range(5)), *(f"y_{k}" for k in range(5)))
# Probabilities (`inference.scores`), when the backend gives them (the LLaVA runner): each
# frame's own, never smoothed; empty otherwise.
P_EXPRESSION_COLUMNS = tuple(f"p_{e}" for e in EXPRESSIONS)   # p_Neutral ... p_Surprise
P_AU_COLUMNS = tuple(f"{c}_p" for c in AU_COLUMNS)            # AU01_p ... AU26_p
P_COLUMNS = (*P_EXPRESSION_COLUMNS, *P_AU_COLUMNS)
COLUMNS: tuple[str, ...] = (
    "input", "frame", "time_s", "face_id", *BOX_COLUMNS, "face_score", *LANDMARK_COLUMNS,
    "expression", *AU_COLUMNS, *P_COLUMNS, "reasoning",
    "raw_answer_fer", "raw_answer_aud", "raw_answer_reasoning", "error",
)
INT_COLUMNS = ("frame", "face_id", *BOX_COLUMNS, *AU_COLUMNS)
FLOAT_COLUMNS = ("time_s", "face_score", *LANDMARK_COLUMNS, *P_COLUMNS)
SMOOTHED_COLUMNS = ("expression", *AU_COLUMNS)

# Paper section 3.2 gives the first two verbatim as its examples of the emotion-summary and
# facial-movement instructions; the reasoning question is the first of our reasoning
# templates (resources/templates/reasoning.json). All three are overridable.
DEFAULT_QUESTIONS = {
    "fer": "Please describe the expression in this face.",
    "aud": "Please describe the action units in this face.",
    "reasoning": "How do the facial action units in this face lead to its expression?",
}
TASKS = tuple(DEFAULT_QUESTIONS)  # fer, aud, reasoning: up to three answers per face


def empty_row(label: str, frame: int | None = None, time_s: float | None = None) -> dict:
    row = {c: None for c in COLUMNS}
    row.update(input=label, frame=frame, time_s=time_s, error="")
    return row


def fill_answers(row: dict, answers: dict[str, str]) -> None:
    """Parse the answers there are into the row's expression, AU and reasoning columns."""
    from feallm_llava.facs.parse import parse

    for task in TASKS:
        row[f"raw_answer_{task}"] = answers.get(task)
    if "fer" in answers:
        row["expression"] = parse(answers["fer"]).expression or ""
    if "aud" in answers:
        aud = parse(answers["aud"], targets=AUS)
        for au, col in zip(AUS, AU_COLUMNS):
            # an AUD answer that mentions no AU (and does not say "no AUs") leaves them unknown
            row[col] = int(au in aud.aus) if aud.aus_answered else None
    if "reasoning" in answers:
        row["reasoning"] = answers["reasoning"].strip()


def fill_probabilities(row: dict, p_expression: dict[str, float] | None = None,
                       p_aus: dict[str, float] | None = None) -> None:
    """A face's expression probabilities ({expression: p}) and AU probabilities ({"AU01": p})."""
    for name, p in (p_expression or {}).items():
        row[f"p_{name}"] = p
    for key, p in (p_aus or {}).items():
        row[f"{key}_p"] = p


def _int(value) -> int | None:
    try:
        return None if value is None or value == "" else int(float(value))
    except (TypeError, ValueError):
        return None


def typed_row(row: dict) -> dict:
    """A row read back from a results file (CSV: every cell a string) with `COLUMNS` and
    the values `analyze` writes: ints, a float time, None for empty cells."""
    out = {c: row.get(c) for c in COLUMNS}
    for c in INT_COLUMNS:
        out[c] = _int(out[c])
    for c in FLOAT_COLUMNS:
        try:
            out[c] = None if out[c] in (None, "") else float(out[c])
        except (TypeError, ValueError):
            out[c] = None
    for task in TASKS:
        out[f"raw_answer_{task}"] = out[f"raw_answer_{task}"] or None
    out["error"] = out["error"] or ""
    return out


def own_readings(row: dict) -> dict:
    """What a row's own answers say (expression and AUs), re-read from its raw answers:
    the values smoothing votes over, whatever the row's (smoothed) columns hold."""
    answers = {t: row[f"raw_answer_{t}"] for t in ("fer", "aud") if row.get(f"raw_answer_{t}") is not None}
    fresh = dict.fromkeys(SMOOTHED_COLUMNS)
    fill_answers(fresh, answers)
    # the probability columns are never smoothed: the row's are its own
    return {**{c: fresh[c] for c in SMOOTHED_COLUMNS}, **{c: row.get(c) for c in P_COLUMNS}}


def to_frame(rows: list[dict]):
    """A pandas DataFrame with `COLUMNS` (nullable integer frame, id, box and AU columns,
    float time), or the rows."""
    try:
        import pandas as pd
    except ImportError:
        return rows
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    for col in INT_COLUMNS:
        frame[col] = frame[col].astype("Int64")
    for col in FLOAT_COLUMNS:
        frame[col] = frame[col].astype("Float64")
    return frame


def plain_rows(rows_or_frame) -> list[dict]:
    """Rows with `COLUMNS` only and plain values (pandas' NA / numpy scalars -> None / Python)."""
    rows = rows_or_frame.to_dict(orient="records") if hasattr(rows_or_frame, "to_dict") else rows_or_frame
    return [{c: _plain(r.get(c)) for c in COLUMNS} for r in rows]


def write_results(rows_or_frame, out: str | os.PathLike) -> Path:
    """CSV, JSONL or JSON (a list of records, null for empty) by the suffix; replaces `out`."""
    with ResultsFile(out, COLUMNS, overwrite=True) as results:
        results.add(plain_rows(rows_or_frame))
    return results.path


def _plain(value):
    """pandas' NA / numpy scalars -> None / Python scalars (JSON- and CSV-friendly)."""
    if value is None:
        return None
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (ImportError, TypeError, ValueError):
        pass
    return value.item() if hasattr(value, "item") else value
