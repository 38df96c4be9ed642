"""Offline annotator: the three texts of paper section 3.2 written from the labels alone.

No model and no network: the expression label, the active AUs, their FACS names
(labels.AU_NAMES) and the EMFACS prototypes (labels.PROTOTYPES) are put into sentences
picked from several wordings. Deterministic: the wording of a face depends only on
(seed, key), so a run, a resumed run and a reordered run write the same texts.

Used by the tests, the offline demo, when no API key is present, and as the fallback of
the OpenAI annotator for an image whose generated answers kept failing validation.

Wording rules, so the texts pass `records.validate_annotation`: a phrase about one AU
uses only that AU's own vocabulary (e.g. the jaw-drop phrase never says the lips part,
which is AU25); the texts never name another expression, and never put a negation next
to an expression word or an AU.
"""

from __future__ import annotations

import hashlib
import random

from feallm_llava.facs.labels import AU_NAMES, AUS, PROTOTYPES, au_key, check_expression
from feallm_llava.data.records import Annotation

# What each AU does to the face (FACS manual descriptions, paraphrased), several wordings.
_MOVES: dict[int, tuple[str, ...]] = {
    1: ("the inner ends of the eyebrows are pulled upward",
        "the inner corners of the brows lift",
        "the middle of the forehead rises as the inner eyebrows go up"),
    2: ("the outer ends of the eyebrows are pulled upward",
        "the outer parts of the brows arch up",
        "the lateral eyebrows lift toward the temples"),
    4: ("the eyebrows are drawn down and together",
        "the brows knit, lowering toward the eyes",
        "vertical furrows form between the eyebrows as they are pulled down"),
    6: ("the cheeks are lifted, narrowing the eyes from below",
        "the cheeks rise and wrinkles gather at the outer eye corners",
        "the skin below the eyes is pushed up by the lifting cheeks"),
    7: ("the eyelids are tensed, narrowing the eye opening",
        "the lower eyelids tighten and straighten",
        "the eye aperture narrows as the lids tense"),
    10: ("the upper lip is pulled straight up",
         "the upper lip lifts, deepening the furrow beside the nose",
         "the centre of the upper lip rises toward the nose"),
    12: ("the corners of the mouth are pulled up and back",
         "the mouth corners are drawn obliquely upward",
         "the ends of the mouth curve up toward the cheekbones"),
    15: ("the corners of the mouth are pulled down",
         "the mouth corners turn downward",
         "the ends of the mouth are drawn toward the chin"),
    23: ("the lips are tightened, their red parts narrowing",
         "the lips tense and become thinner",
         "the mouth firms as the lips tighten"),
    24: ("the lips are pressed together",
         "the lips press firmly against each other",
         "the closed lips are pushed tightly together"),
    25: ("the lips are slightly apart",
         "the lips separate, opening the mouth a little",
         "a gap shows between the lips"),
    26: ("the jaw is lowered",
         "the lower jaw drops down",
         "the chin moves down as the jaw relaxes open"),
}

# Face region of each AU, for the summary's second sentence.
_REGION: dict[int, str] = {1: "brows", 2: "brows", 4: "brows", 6: "eyes", 7: "eyes",
                           10: "mouth", 12: "mouth", 15: "mouth", 23: "mouth", 24: "mouth",
                           25: "mouth", 26: "jaw"}

_NOUN = {"Neutral": "a neutral expression", "Anger": "anger", "Disgust": "disgust",
         "Fear": "fear", "Happiness": "happiness", "Sadness": "sadness",
         "Surprise": "surprise"}

# Summary sentences per expression (each names only its own expression).
_SUMMARY: dict[str, tuple[str, ...]] = {
    "Neutral": ("The person's face is calm and relaxed.",
                "The person shows a neutral, composed face.",
                "The face is at rest, with a calm and even look.",
                "The person looks neutral and composed."),
    "Anger": ("The person looks angry, with a tense and hard look.",
              "The face shows anger, with a stern and tense appearance.",
              "The person appears angry and irritated.",
              "The expression is an angry one, tense and confrontational."),
    "Disgust": ("The person looks disgusted, as if repelled by something.",
                "The face shows disgust, with a wrinkled, rejecting look.",
                "The person appears disgusted and put off.",
                "The expression is one of disgust, showing aversion."),
    "Fear": ("The person looks fearful and alarmed.",
             "The face shows fear, with a tense, alarmed look.",
             "The person appears frightened and on edge.",
             "The expression is a fearful one, alert and tense."),
    "Happiness": ("The person looks happy, with a pleasant and warm look.",
                  "The face shows happiness, with a cheerful appearance.",
                  "The person appears happy and at ease.",
                  "The expression is a happy one, bright and friendly."),
    "Sadness": ("The person looks sad and downcast.",
                "The face shows sadness, with a heavy, dejected look.",
                "The person appears sad and low in spirits.",
                "The expression is a sad one, subdued and sorrowful."),
    "Surprise": ("The person looks surprised, as if caught off guard.",
                 "The face shows surprise, with a startled, open look.",
                 "The person appears surprised and astonished.",
                 "The expression is one of surprise, sudden and wide-eyed."),
}

_SUMMARY_CUES = ("The main cues are around the {regions}.",
                 "Most of the movement is visible in the {regions}.",
                 "This shows mainly in the {regions}.")

_MOVE_INTROS = ("The face shows the following action units.",
                "Several facial action units are active.",
                "Looking at the facial muscles, these action units are activated.",
                "The visible facial movements correspond to these action units.")
_MOVE_INTROS_ONE = ("One facial action unit is active.",
                    "The face shows a single active action unit.",
                    "A single facial movement is visible.")
_MOVE_ITEM = ("{key} ({name}): {move}.",
              "{key} ({name}) is active: {move}.",
              "With {key} ({name}), {move}.",
              "{Move}, which is {key} ({name}).")
_MOVE_NONE = ("No facial action unit is activated, and the facial muscles are at rest.",
              "The face shows no active action units; the brows, eyes and mouth stay relaxed.",
              "The brows, eyes and mouth are at rest, with no action unit activated.")

_REASON_INTROS = ("To read this face, start from its facial movements.",
                  "The expression can be reasoned out from the active action units.",
                  "Each facial movement adds a clue to the overall expression.",
                  "Reading the face region by region gives the following reasoning.")
_REASON_TYPICAL = ("This is one of the typical movements of {noun}.",
                   "It is a characteristic part of {noun}.",
                   "This movement is a classic sign of {noun}.")
_REASON_ATYPICAL = ("It is less typical of {noun}, yet it fits with the other cues.",
                    "This movement is a secondary cue that accompanies {noun} here.",
                    "It adds intensity to the face and is consistent with {noun} here.")
_REASON_NEUTRAL_AU = ("On its own it carries little emotional weight, and the face still "
                      "reads as neutral.",
                      "It is a small movement that leaves the face looking neutral overall.")
_REASON_CONCLUSIONS = ("Taken together, these movements point to {noun}.",
                       "Overall, this combination of movements indicates {noun}.",
                       "Combining these cues, the person's expression is {noun}.",
                       "These facial actions together convey {noun}.")
_REASON_NEUTRAL = ("The brows, eyes and mouth are at rest and no action unit is active, so "
                   "the face shows a neutral expression.",
                   "With the facial muscles relaxed and no action unit activated, the face "
                   "is read as neutral.")
_REASON_NO_AU = ("No action unit stands out, so the reading of {noun} rests on the overall "
                 "look of the face rather than a single muscle movement.",
                 "The facial muscles show little distinct activity; the face is still read "
                 "as {noun} from its overall appearance.")


def _join(items: list[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


WORDINGS = ("varied", "fixed")


class _FirstWording:
    """Stands in for the per-face `random.Random` when the wording is fixed: every
    sentence slot takes its first wording."""

    @staticmethod
    def choice(options):
        return options[0]


_Picker = random.Random | _FirstWording


class TemplateAnnotator:
    """Writes summary, movement and reasoning texts from an expression and AU labels.

    `wording="varied"` (default) picks each sentence from several wordings, as a
    GPT-4o-written set varies. `wording="fixed"` always takes the first: the texts then
    depend on the labels alone. A small LLM learns the fixed form faster; the demo's
    2-layer, 64-wide LLM read AUs at mean F1 0.66 / 0.78 (fixed) against 0.62 / 0.71
    (varied) after 800 / 1000 LoRA steps from one stage-1 checkpoint (`feallm_llava.demo`).
    """

    name = "template"

    def __init__(self, seed: int = 0, wording: str = "varied"):
        if wording not in WORDINGS:
            raise ValueError(f"TemplateAnnotator: wording must be one of {WORDINGS}, got {wording!r}")
        self.seed = seed
        self.wording = wording

    def _rng(self, key: str) -> _Picker:
        if self.wording == "fixed":
            return _FirstWording()
        return random.Random(hashlib.sha256(f"{self.seed}|{key}".encode()).digest())

    def annotate(self, expression: str, aus: dict[int, int], key: str) -> Annotation:
        """The three texts for one face; `key` (e.g. the sample id) picks the wording."""
        check_expression(expression)
        rng = self._rng(key)
        active = [au for au in AUS if aus.get(au) == 1]
        moves = {au: rng.choice(_MOVES[au]) for au in active}
        return Annotation(summary=self._summary(rng, expression, active),
                          movement=self._movement(rng, active, moves),
                          reasoning=self._reasoning(rng, expression, active, moves))

    def _summary(self, rng: _Picker, expression: str, active: list[int]) -> str:
        text = f"{expression}. {rng.choice(_SUMMARY[expression])}"
        regions = list(dict.fromkeys(_REGION[au] for au in active))
        if regions:
            text += " " + rng.choice(_SUMMARY_CUES).format(regions=_join(regions))
        return text

    def _movement(self, rng: _Picker, active: list[int], moves: dict[int, str]) -> str:
        if not active:
            return rng.choice(_MOVE_NONE)
        parts = [rng.choice(_MOVE_INTROS if len(active) > 1 else _MOVE_INTROS_ONE)]
        for au in active:
            move = moves[au]
            parts.append(rng.choice(_MOVE_ITEM).format(
                key=au_key(au), name=AU_NAMES[au], move=move, Move=move[0].upper() + move[1:]))
        return " ".join(parts)

    def _reasoning(self, rng: _Picker, expression: str, active: list[int],
                   moves: dict[int, str]) -> str:
        noun = _NOUN[expression]
        if not active:
            if expression == "Neutral":
                return rng.choice(_REASON_NEUTRAL)
            return rng.choice(_REASON_NO_AU).format(noun=noun)
        # Paper section 3.2 reorganises the reasoning for coherence: observations first,
        # then each AU's contribution in face order (brows -> eyes -> mouth), then the
        # conclusion.
        parts = [rng.choice(_REASON_INTROS)]
        for au in active:
            move = moves[au]
            parts.append(f"{au_key(au)} ({AU_NAMES[au]}) means that {move}.")
            if expression == "Neutral":
                parts.append(rng.choice(_REASON_NEUTRAL_AU))
            elif au in PROTOTYPES[expression]:
                parts.append(rng.choice(_REASON_TYPICAL).format(noun=noun))
            else:
                parts.append(rng.choice(_REASON_ATYPICAL).format(noun=noun))
        if expression == "Neutral":
            parts.append("Overall, the face is read as neutral.")
        else:
            parts.append(rng.choice(_REASON_CONCLUSIONS).format(noun=noun))
        return " ".join(parts)
