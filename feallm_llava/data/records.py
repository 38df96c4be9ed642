"""The records the FEA data pipeline passes along: a labelled face, its three texts, and
the tally of what was skipped on the way.

`FaceRecord` is what every dataset reader yields (one labelled face); `Annotation` is the
three instruction texts of paper section 3.2 for one face; `validate_annotation` checks an
annotation against the face's expert labels with the same parser FEABench scores with
(`feallm_llava.facs.parse`); `SkipCounter` counts frames dropped for a reason, with a few
examples each, so a report can say how many and where.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from feallm_llava.facs.labels import AU_NAMES, AUS, EXPRESSIONS, au_key

# The three instruction types of paper section 3.2, in the order a multi-turn
# conversation asks them.
INSTRUCTION_TYPES: tuple[str, ...] = ("summary", "movement", "reasoning")

# Aff-Wild2 marks the two people of a two-person video with these suffixes
# (inferred from the ABAW file names); both halves are one person id for splitting.
_SIDE_SUFFIX = re.compile(r"_(left|right)$")


def person_of(subject: str) -> str:
    """The person id of a subject: the video name without a `_left` / `_right` suffix."""
    return _SIDE_SUFFIX.sub("", subject)


@dataclass(frozen=True)
class FaceRecord:
    """One labelled face image.

    `aus` maps each AU whose label is KNOWN for this frame to 0 (inactive) or 1 (active);
    an AU missing from the dict is unknown (e.g. the 2020 Aff-Wild2 layout labels only 8
    AUs), never assumed inactive. `expression` / `aus` are None when that label is absent
    or invalid for the frame.
    """

    image: Path                      # absolute path of the face image
    expression: str | None           # one of labels.EXPRESSIONS, or None
    aus: dict[int, int] | None       # AU -> 0/1 for the labelled AUs, or None
    subject: str                     # who is in the frame (Aff-Wild2: the video name)
    video: str                       # the video / sequence the frame comes from
    frame: int                       # 1-based frame number (Aff-Wild2 image name)
    person: str = ""                 # split group; defaults to person_of(subject)

    def __post_init__(self) -> None:
        if self.expression is not None and self.expression not in EXPRESSIONS:
            raise ValueError(f"{self.image}: unknown expression {self.expression!r}; "
                             f"expected one of {', '.join(EXPRESSIONS)}")
        if self.aus is not None:
            for au, value in self.aus.items():
                if au not in AU_NAMES or value not in (0, 1):
                    raise ValueError(f"{self.image}: bad AU label {au}={value!r}; AUs are "
                                     f"{AUS} with values 0/1")
        if not self.person:
            object.__setattr__(self, "person", person_of(self.subject))

    @property
    def id(self) -> str:
        """Stable sample id: `<video>_<frame:05d>` (unique within a dataset)."""
        return f"{self.video}_{self.frame:05d}"

    @property
    def active_aus(self) -> tuple[int, ...]:
        """The active AUs, in labels.AUS order (empty when `aus` is None)."""
        if not self.aus:
            return ()
        return tuple(au for au in AUS if self.aus.get(au) == 1)

    @property
    def labelled_aus(self) -> tuple[int, ...]:
        """The AUs whose label is known for this frame, in labels.AUS order."""
        if not self.aus:
            return ()
        return tuple(au for au in AUS if au in self.aus)

    @property
    def has_all_aus(self) -> bool:
        """True when all 12 AUs of labels.AUS are labelled."""
        return self.aus is not None and all(au in self.aus for au in AUS)


@dataclass(frozen=True)
class Annotation:
    """The three texts of one face (paper section 3.2)."""

    summary: str      # starts with the expression word: "Happiness. The person ..."
    movement: str     # every active AU with its FACS name, no other AU
    reasoning: str    # how each active AU contributes to the expression

    def text(self, kind: str) -> str:
        if kind not in INSTRUCTION_TYPES:
            raise ValueError(f"unknown instruction type {kind!r}; expected one of {INSTRUCTION_TYPES}")
        return getattr(self, kind)

    def to_dict(self) -> dict[str, str]:
        return {"summary": self.summary, "movement": self.movement, "reasoning": self.reasoning}

    @classmethod
    def from_dict(cls, data: dict) -> "Annotation":
        missing = [k for k in INSTRUCTION_TYPES if not isinstance(data.get(k), str)]
        if missing:
            raise ValueError(f"annotation lacks text field(s) {missing}: {data!r}")
        return cls(summary=data["summary"], movement=data["movement"], reasoning=data["reasoning"])


def validate_annotation(annotation: Annotation, expression: str,
                        aus: dict[int, int]) -> list[str]:
    """Problems of `annotation` against the labels; an empty list means it is valid.

    Rules (paper section 3.2, "we validate it to ensure consistency with the
    original annotations"), with the parser FEABench scores with:
    - summary: starts with the expression word and parses to that expression;
    - movement: parses to exactly the active AUs and writes each one's FACS name;
    - reasoning: parses to the expression and names only active AUs.
    An AU whose label is unknown counts as "not active": the texts must not name it.
    """
    from feallm_llava.facs.parse import parse  # one pass per text: expression and AUs

    problems: list[str] = []
    active = {au for au, value in aus.items() if value == 1}
    want = ", ".join(au_key(a) for a in sorted(active)) or "none"

    summary = annotation.summary.strip()
    if not summary.lower().startswith(expression.lower()):
        problems.append(f"summary does not start with {expression!r}: {summary[:60]!r}")
    got_fe = parse(summary).expression
    if got_fe != expression:
        problems.append(f"summary parses to expression {got_fe!r}, label is {expression!r}")

    got_move = set(parse(annotation.movement).aus)
    if got_move != active:
        have = ", ".join(au_key(a) for a in sorted(got_move)) or "none"
        problems.append(f"movement names AUs [{have}], active AUs are [{want}]")
    lowered = annotation.movement.lower()
    unnamed = [au_key(au) for au in sorted(active) if AU_NAMES[au].lower() not in lowered]
    if unnamed:
        problems.append(f"movement lacks the FACS name of {', '.join(unnamed)}")

    reasoning = parse(annotation.reasoning)
    got_reason_fe = reasoning.expression
    if got_reason_fe != expression:
        problems.append(f"reasoning parses to expression {got_reason_fe!r}, label is {expression!r}")
    extra = set(reasoning.aus) - active
    if extra:
        problems.append("reasoning names inactive AUs "
                        + ", ".join(au_key(a) for a in sorted(extra)))
    return problems


@dataclass
class SkipCounter:
    """Counts skipped items per reason and keeps the first few places of each.

    Thread-safe. `where` is anything printable that lets a user find the item again:
    "file:line", an image path, a sample id.
    """

    max_examples: int = 5
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, reason: str, where: object = None, n: int = 1) -> None:
        with self._lock:
            self.counts[reason] += n
            if where is not None:
                seen = self.examples.setdefault(reason, [])
                if len(seen) < self.max_examples:
                    seen.append(str(where))

    def __getitem__(self, reason: str) -> int:
        return self.counts[reason]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def report(self) -> dict[str, dict]:
        """`{reason: {"count": n, "examples": [...]}}`, for report.json."""
        return {reason: {"count": n, "examples": list(self.examples.get(reason, []))}
                for reason, n in sorted(self.counts.items())}

    def summary(self) -> str:
        """One line per reason, for the console."""
        lines = []
        for reason, n in sorted(self.counts.items()):
            example = self.examples.get(reason)
            lines.append(f"  {reason}: {n}" + (f" (e.g. {example[0]})" if example else ""))
        return "\n".join(lines) if lines else "  nothing skipped"
