"""The label spaces FEALLM works in: 7 facial expressions and 12 action units.

Paper section 3.1: the FEA set keeps Aff-Wild2's 7 basic expressions (its 8th class,
"Other", is dropped) and the 12 AUs of the ABAW AU challenge.
"""

from __future__ import annotations

# Aff-Wild2 / ABAW expression order (EXPR files: 0..6; 7 = Other, excluded).
EXPRESSIONS: tuple[str, ...] = (
    "Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise",
)

# The 12 AUs of the ABAW AU-detection challenge (Aff-Wild2 2022+ AU files, column order).
AUS: tuple[int, ...] = (1, 2, 4, 6, 7, 10, 12, 15, 23, 24, 25, 26)

# FACS names (Ekman, Friesen & Hager, FACS manual 2002).
AU_NAMES: dict[int, str] = {
    1: "Inner Brow Raiser",
    2: "Outer Brow Raiser",
    4: "Brow Lowerer",
    6: "Cheek Raiser",
    7: "Lid Tightener",
    10: "Upper Lip Raiser",
    12: "Lip Corner Puller",
    15: "Lip Corner Depressor",
    23: "Lip Tightener",
    24: "Lip Pressor",
    25: "Lips Part",
    26: "Jaw Drop",
}

# Prototypical AU combinations per expression, EMFACS-style as commonly tabulated
# (Ekman & Friesen's EMFACS; Friesen & Ekman 1983, as summarised e.g. in Matsumoto &
# Ekman's tables): happiness 6+12; sadness 1+4+15; surprise 1+2+5B+26;
# fear 1+2+4+5+20+26; anger 4+5+7+23; disgust 9+15+16. Restricted to the 12 AUs
# above (AUs 5, 9, 16, 17, 20 are not among them). Neutral has no active AU.
# Lips part (25) commonly accompanies jaw drop (26) in surprise and fear, and the
# upper-lip raiser (10) is the usual disgust AU in Aff-Wild2 annotations; both are
# added so every expression keeps at least two AUs inside the 12.
PROTOTYPES: dict[str, tuple[int, ...]] = {
    "Neutral": (),
    "Anger": (4, 7, 23),
    "Disgust": (10, 15),
    "Fear": (1, 2, 4, 25, 26),
    "Happiness": (6, 12),
    "Sadness": (1, 4, 15),
    "Surprise": (1, 2, 25, 26),
}


def au_key(au: int) -> str:
    """Column name of an AU, zero-padded as Py-Feat and OpenFace write it: 'AU01'."""
    return f"AU{au:02d}"


def check_expression(name: str) -> str:
    """Return `name` if it is one of the 7 classes, else raise naming the valid ones."""
    if name not in EXPRESSIONS:
        raise ValueError(f"unknown expression {name!r}; expected one of {', '.join(EXPRESSIONS)}")
    return name
