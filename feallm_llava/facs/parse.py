"""Generated text -> a facial expression and a set of action units (paper section 3.3).

One parser decides what every answer means: `feallm score` re-parses each answer with
it, and the dataset builder checks GPT-4o's descriptions with it (the movement text of
an image must parse to exactly its labelled AU set). The rules, in order:

Mentions
  * AU numbers: "AU1", "AU01", "AU 12", "AU-12", "AU_12", "AU#12", "AU12B" (FACS
    intensity letter A-E), "AUs 6 and 12", "AU6+AU12", "AU6/12", "action unit 4",
    "action units 1, 2 and 4", "Action units: 1, 2, 4". A bare number continues a list
    only after an explicit "AU"/"action unit" head and a list separator
    (",", "and", "or", "nor", "&", "+", "/"), is at most 46 (FACS main codes) and is not
    followed by a quantity word ("AU12 and 3 other AUs" is AU12 only).
  * FACS names of FEALLM's 12 AUs (labels.AU_NAMES: "lip corner puller" -> 12, "inner
    brow raiser" -> 1, singular or plural, spaces or hyphens) and the clear paraphrases
    of each: subject + verb ("the inner brows are raised", "lip corners pulled up",
    "lips slightly parted", "jaw dropped"), attributive ("raised cheeks", "furrowed
    brows", "pressed lips") and nominal ("cheek raising", "lip parting"). Vague phrases
    are deliberately not AUs: "raised eyebrows" (1, 2 or both), "open mouth" (25, 26 or
    27), "smile", "frown", "narrowed eyes". The other FACS names ("nose wrinkler" -> 9,
    "chin raiser" -> 17, ...) are found by exact name only, so a description that names
    an AU outside the 12 does not validate silently.
  * Expressions: the 7 classes of labels.EXPRESSIONS and their synonyms/inflections
    (`EXPRESSION_WORDS`): "happy", "joy", "smiling" -> Happiness; "angry", "furious";
    "disgusted"; "fearful", "scared", "afraid"; "sad", "sorrow", "unhappy"; "surprised",
    "astonished"; "neutral", "calm", "expressionless", "no (particular) emotion".
    Words are matched whole: "unhappy" is not "happy", "fearless" is not "fear".
    "neutral position" (of the brows, say) is a position, not the Neutral class.
    "depressed" is left out (it is AU15's verb, "depressed lip corners").

Negation excludes a mention; the scope is its clause
  * Clauses end at ". ! ? ; newline", at commas outside parentheses and at "but",
    "however", "whereas", "while", "although", "though". A boundary inside a mention
    ("AUs 1, 2, and 4") does not count. ":" does not end a clause ("AU12: no").
  * A negation cue ("no", "not", "n't", "cannot", "never", "none", "without",
    "nothing", "neither", "nor", "lack of", "absence of", "free of", "devoid of",
    "rather than", "instead of", "as opposed to", "fail to") negates every later mention
    of its clause that it reaches without crossing "and"/"so"/"because"/"since"/"then"
    ("or" and "nor" carry it on: "not happy or sad", "neither AU1 nor AU2").
  * A cue that reaches no later mention negates the nearest earlier mention of its
    clause (with the mentions listed together with it: "AU4 (brow lowerer) is not
    activated", "AU6 and AU12 are not present"), unless "and"/"or"/... lie between
    ("AU12 is present and the mouth is not open" keeps AU12). "absent", "inactive",
    "missing", "undetected" and a ":"/"=" value of 0/false/none only look back
    ("AU 7 absent", "AU12: 0").
  * Cue words are whole words: "nose", "know", "knot", "nothing" in "nothing but joy",
    "notably", "annotated", "normal" negate nothing. Idioms that are not negations are
    skipped: "not only/just/merely", "not surprisingly", "no doubt/wonder/question",
    "nothing but/short of/less than", and "cannot/can't/couldn't hide, conceal,
    suppress, contain, mask, help, stop, resist, be ruled out, be excluded" (double
    negatives: "she cannot hide her joy" is joy).
  * An AU both asserted and negated in one text counts as present (the assertion is
    the claim; "AU4 is absent ... AU4 is clearly visible").

Expression decision
  * Label first: the FEALLM summary format begins with the class ("Happiness. The
    person ..."). When the text (after quotes, markdown and an "Answer:"/"Expression:"
    prefix) starts with an expression word followed by punctuation or the end, and
    that mention is not negated, it wins.
  * Otherwise the non-negated mentions are counted per class; the single most
    frequent class wins; a tie between different classes, or no mention, gives None
    (ambiguous / absent). Never a default class: the scorer counts None as a parse
    failure.

AUD answered or not
  * `ParseResult.aus_answered` is true when the text mentions any AU, negated or not,
    or says that no AU is active ("no action units are activated", or just "None.").
    An AUD answer without either is a parse failure for the scorer, not a claim that
    no AU is active.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from feallm_llava.facs.labels import AU_NAMES, EXPRESSIONS

# ----------------------------------------------------------------------------- patterns

_W = r"[\s\-]+"          # words of a name are separated by spaces or hyphens
_FLAGS = re.IGNORECASE


def _name(words: str) -> str:
    """A multi-word name as a pattern: 'lip corner puller' -> lip[\\s-]+corner[\\s-]+puller."""
    return _W.join(re.escape(w) for w in words.lower().split())


# FACS names of the AUs outside FEALLM's 12 (Ekman, Friesen & Hager, FACS manual 2002),
# matched by exact name only.
OTHER_FACS_NAMES: dict[int, str] = {
    5: "Upper Lid Raiser",
    9: "Nose Wrinkler",
    11: "Nasolabial Deepener",
    13: "Sharp Lip Puller",
    14: "Dimpler",
    16: "Lower Lip Depressor",
    17: "Chin Raiser",
    18: "Lip Pucker",
    20: "Lip Stretcher",
    22: "Lip Funneler",
    27: "Mouth Stretch",
    28: "Lip Suck",
}

# Highest FACS main action code (46, wink); a bare list number above it is not an AU.
_MAX_BARE_AU = 46

# Words that may stand between a face part and its verb: "the cheeks are (slightly) raised".
# Hedges that deny ("hardly", "barely", "scarcely") are not fillers: no match.
_FILL = (r"(?:[\s\-]+(?:is|are|was|were|be|been|being|get|gets|got|appear|appears|"
         r"appeared|seem|seems|seemed|look|looks|looked|become|becomes|became|remain|"
         r"remains|to|both|also|very|a\s+bit|a\s+little|(?!hardly|barely|scarcely)\w+ly))"
         r"{0,4}[\s\-]+")

_BROW = r"(?:eye)?brows?"
_INNER_OUTER = (r"{side}{W}(?:(?:portions?|parts?|corners?|ends?|sections?|halves|half)"
                r"{W}of{W}(?:the{W}|both{W})?)?" + _BROW)
_RAISE = r"(?:rais(?:ed|es|ing|e)|lift(?:ed|s|ing)?|elevated|(?:drawn|pulled){W}up(?:wards?)?)"
_CORNERS = (r"(?:(?:lip|mouth){W}corners?|corners?{W}of{W}(?:the{W}|her{W}|his{W}|their{W})?"
            r"(?:mouth|lips))")


def _sv(subject: str, verb: str) -> str:
    """'<subject> [fillers] <verb>' as a pattern."""
    return rf"\b{subject}{_FILL}{verb}\b"


def _fmt(pattern: str, **kw: str) -> str:
    return pattern.replace("{W}", _W).format(**kw) if kw else pattern.replace("{W}", _W)


# Paraphrases of the 12 AUs' FACS names (clear descriptions of the movement only).
_PARAPHRASES: dict[int, list[str]] = {
    1: [_sv(_fmt(_INNER_OUTER, side="inner"), _fmt(_RAISE)),
        _fmt(r"\b(?:raised|lifted|elevated){W}inner{W}" + _BROW + r"\b")],
    2: [_sv(_fmt(_INNER_OUTER, side="outer"), _fmt(_RAISE)),
        _fmt(r"\b(?:raised|lifted|elevated){W}outer{W}" + _BROW + r"\b")],
    4: [_sv(_BROW, _fmt(r"(?:lower(?:ed|s|ing)?|furrow(?:ed|s|ing)?|knit(?:ted|s|ting)?|"
                        r"(?:drawn|pulled){W}(?:down{W}and{W})?together|(?:drawn|pulled){W}down)")),
        _fmt(r"\b(?:lowered|furrowed|knitted|knit){W}" + _BROW + r"\b")],
    6: [_sv(r"cheeks?", _fmt(r"(?:rais(?:ed|es|ing|e)|lift(?:ed|s|ing)?|elevated|"
                             r"push(?:ed|es|ing)?{W}up(?:wards?)?)")),
        _fmt(r"\b(?:raised|lifted|elevated){W}cheeks?\b")],
    7: [_sv(r"(?:eye)?lids?", r"(?:tighten(?:ed|s|ing)?|tensed?)"),
        _fmt(r"\b(?:tightened|tensed){W}(?:eye)?lids?\b")],
    10: [_sv(_fmt(r"upper{W}lip"), r"(?:rais(?:ed|es|ing|e)|lift(?:ed|s|ing)?)"),
         _fmt(r"\b(?:raised|lifted){W}upper{W}lip\b")],
    12: [_sv(_fmt(_CORNERS),
             _fmt(r"(?:(?:pull(?:ed|s|ing)?|drawn)(?!{W}(?:down|together))(?:{W}(?:up(?:wards?)?|"
                  r"back(?:wards?)?|outwards?|obliquely))?|rais(?:ed|es|ing|e)|lift(?:ed|s|ing)?|"
                  r"turn(?:ed|s|ing)?{W}up(?:wards?)?|upturned)")),
         _fmt(r"\b(?:raised|lifted|upturned|pulled{W}up|up{W}turned){W}" + _CORNERS + r"\b")],
    15: [_sv(_fmt(_CORNERS),
             _fmt(r"(?:depress(?:ed|es|ing)?|lower(?:ed|s|ing)?|(?:pull(?:ed|s|ing)?|drawn|"
                  r"turn(?:ed|s|ing)?|curv(?:ed|es|ing)|point(?:ed|s|ing)?){W}down(?:wards?)?|"
                  r"downturned)")),
         _fmt(r"\b(?:depressed|lowered|downturned|down{W}turned|turned{W}down|pulled{W}down)"
              r"{W}" + _CORNERS + r"\b")],
    23: [_sv(r"lips?", r"(?:tighten(?:ed|s|ing)?|tensed?)"),
         _fmt(r"\b(?:tightened|tensed){W}lips?\b")],
    24: [_sv(r"lips?", _fmt(r"(?:(?:com)?press(?:ed|es|ing)?(?:{W}(?:together|tightly|firmly|shut))?)")),
         _fmt(r"\b(?:pressed|compressed){W}lips?\b")],
    25: [_sv(r"lips", r"(?:part(?:ed|s|ing)?|apart|separat(?:ed|es|ing|e)|open(?:ed|s|ing)?)"),
         _fmt(r"\b(?:parted|separated|opened|open){W}lips\b"),
         _fmt(r"\blip{W}parting\b")],
    26: [_sv(r"jaw", _fmt(r"(?:drop(?:ped|s|ping)?|lower(?:ed|s|ing)?|open(?:ed|s|ing)?|"
                          r"slack(?:ened)?|hang(?:s|ing)?{W}open)")),
         _fmt(r"\b(?:dropped|lowered|opened|open|slack(?:ened)?){W}jaw\b")],
}


def _au_name_patterns() -> list[tuple[int, re.Pattern[str]]]:
    out = []
    for au, name in {**AU_NAMES, **OTHER_FACS_NAMES}.items():
        out.append((au, re.compile(rf"\b{_name(name)}s?\b", _FLAGS)))
    for au, patterns in _PARAPHRASES.items():
        out.extend((au, re.compile(p, _FLAGS)) for p in patterns)
    return out


_AU_NAME_PATTERNS = _au_name_patterns()

# "AU12", "AU 12", "AU-12", "AUs: 1", "action unit 4" (the head of a list).
_AU_PREFIX = r"(?:\bAU(?:s|['’]s)?|\baction[\s\-]+units?)"
_AU_NUMBER = r"(\d{1,2})(?:[A-Ea-e])?(?!\w|\.\d)"  # optional FACS intensity letter A-E
_AU_HEAD = re.compile(_AU_PREFIX + r"\s*(?:[-_#:]\s*)?" + _AU_NUMBER, _FLAGS)
# A list continuation after a number: ", 2", ", and 4", " and AU12", "+AU12", "/12".
_AU_CONT = re.compile(
    r"(?:\s*,\s*(?:(?:and|or|nor|&)\s+)?|\s+(?:and|or|nor)\s+|\s*[+/&]\s*)"
    r"(" + _AU_PREFIX + r"\s*(?:[-_#]\s*)?)?" + _AU_NUMBER, _FLAGS)
# A bare number followed by one of these is a quantity, not an AU ("and 3 other AUs").
_QUANTITY_AFTER = re.compile(
    r"\s*(?:%|percent|other|more|times|out\b|of\b|years?|frames?|seconds?|points?|"
    r"pixels?|degrees?|AUs?\b|action\s+units?)", _FLAGS)

# "AU4 and AU12 is ...": a singular verb after a number joined by "," or "and" makes
# it a new subject, not a list item ("or"/"nor" lists take singular verbs: "neither
# AU1 nor AU2 is present" stays one list).
_NEW_SUBJECT = re.compile(r"\s+(?:is|was|has|remains|appears|seems|looks)\b", _FLAGS)
_AND_JOIN = re.compile(r"\s*,\s*(?:(?:and|&)\s+)?(?!\s*(?:or|nor)\b)|\s*(?:and\b|&)", _FLAGS)

# "No action units are activated", "none of the AUs": an answer that no AU is active.
_NO_AU_STATEMENT = re.compile(
    r"\b(?:no|none\s+of\s+the|not\s+any|without\s+any)\s+(?:[a-z\-]+\s+){0,2}?"
    r"(?:action\s+units?|AUs?)\b(?!\s*[-_#:]?\s*\d)|^\W*none(?:\s+of\s+them)?\W*$", _FLAGS)

# Expression words per class. "depressed" is AU15's verb, "surprisingly" an adverb of
# comment, "mad"/"upset" ambiguous: left out.
EXPRESSION_WORDS: dict[str, tuple[str, ...]] = {
    "Neutral": (
        r"neutral(?:ity)?(?!{W}position)", r"expressionless", r"emotionless", r"impassive",
        r"calm(?:ness|ly)?", r"poker{W}face",
        r"(?:no|without(?:{W}any)?){W}(?:(?:particular|specific|obvious|clear|visible|strong|"
        r"discernible|apparent|evident|noticeable|distinct|notable|significant|real)"
        r"{W})?(?:emotions?|emotional{W}expressions?|facial{W}expressions?|expressions?)"
        r"(?!{W}of)",
        r"(?:n['’]t|not){W}(?:show|display|express|convey|reveal)(?:s|ing)?{W}(?:any{W})?"
        r"(?:particular{W}|specific{W}|obvious{W}|strong{W})?emotions?",
    ),
    "Anger": (
        r"anger(?:ed)?", r"angry", r"angrily", r"furious(?:ly)?", r"fury", r"rage", r"raging",
        r"enraged", r"outraged", r"irritated", r"irritation", r"annoyed", r"annoyance", r"irate",
    ),
    "Disgust": (
        r"disgust(?:ed|ing|edly)?", r"revulsion", r"revolted", r"repulsed", r"repulsion",
        r"grossed{W}out", r"distaste",
    ),
    "Fear": (
        r"fears?", r"fearful(?:ly|ness)?", r"afraid", r"scared", r"frightened", r"fright",
        r"terrified", r"terror", r"horrified", r"panic(?:ked|ky)?",
    ),
    "Happiness": (
        r"happy", r"happiness", r"happily", r"joy", r"joyful(?:ly|ness)?", r"joyous",
        r"smil(?:e|es|ed|ing)", r"grin(?:s|ned|ning)?", r"laugh(?:s|ed|ing|ter)?",
        r"cheerful(?:ly|ness)?", r"delighted", r"glad", r"pleased", r"elated", r"amused",
        r"amusement",
    ),
    "Sadness": (
        r"sad", r"sadness", r"sorrow(?:ful)?", r"unhappy", r"unhappiness", r"grief",
        r"grieving", r"melancholy", r"melancholic", r"gloomy", r"downcast", r"dejected",
        r"miserable", r"mournful", r"crying", r"tearful", r"heartbroken",
    ),
    "Surprise": (
        r"surprised?", r"astonish(?:ed|ment)", r"amazed", r"amazement", r"shocked", r"shock",
        r"startled", r"stunned",
    ),
}
assert set(EXPRESSION_WORDS) == set(EXPRESSIONS)

_EXPRESSION_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    (cls, re.compile(r"(?<![\w'’])(?:" + "|".join(_fmt(w) for w in words) + r")(?![\w'’])", _FLAGS))
    for cls, words in EXPRESSION_WORDS.items()
]

# Where a label-first answer's label starts: after quotes/markdown and an optional
# "Answer:" / "Expression:" / "The emotion is" prefix.
_LEADING = re.compile(
    r"^[\W_]*(?:(?:the\s+)?(?:final\s+)?(?:answer|(?:facial\s+|predicted\s+)?expression|"
    r"emotion|prediction|label|class)\s*(?:is\s*)?[:\-]?[\W_]*)?", _FLAGS)
_LABEL_END = re.compile(r"[\s*_\"'’”)\]]*(?:[.!,;:\n]|$)")

# Negation cues. "both": before a mention, or after one when nothing follows;
# "pre": only before; "post": only after.
_CUES: list[tuple[str, re.Pattern[str]]] = [
    ("both", re.compile(r"\b(?:not|no|never|none|cannot)\b|\b\w+n['’]t\b", _FLAGS)),
    ("pre", re.compile(r"\b(?:without|nothing|neither|nor|absence\s+of|lack(?:s|ed|ing)?"
                       r"(?:\s+of)?|free\s+(?:of|from)|devoid\s+of|rather\s+than|instead\s+of|"
                       r"as\s+opposed\s+to|fail(?:s|ed|ing)?\s+to)\b", _FLAGS)),
    ("post", re.compile(r"\b(?:absent|inactive|missing|undetected)\b|"
                        r"[:=]\s*(?:0|false|none)\b(?![.,]\d)", _FLAGS)),
]
# Idioms that contain a cue word but deny nothing.
_NOT_NEGATION = re.compile(
    r"\bnot\s+(?:only|just|merely|surprisingly)\b|\bno\s+(?:doubt|wonder|question)\b|"
    r"\bnothing\s+(?:but|short\s+of|less\s+than)\b|"
    r"\b(?:can\s*not|can['’]t|couldn['’]t|could\s+not)\s+(?:help|hide|conceal|suppress|"
    r"contain|mask|stop|resist|be\s+ruled\s+out|be\s+excluded)\b", _FLAGS)

_CLAUSE_END = re.compile(r"(?<!\d)\.|\.(?!\d)|[!?;\n]|\b(?:but|however|whereas|while|although|"
                         r"though)\b", _FLAGS)
# Between a cue and a later mention these end its reach ("or"/"nor" carry it on).
_BLOCK_FORWARD = re.compile(r"\b(?:and|so|because|since|then|which|who)\b", _FLAGS)
_BLOCK_BACKWARD = re.compile(r"\b(?:and|or|so|because|since|then)\b", _FLAGS)
# Mentions of one kind listed together: only punctuation and list words between them.
_LISTED_TOGETHER = re.compile(r"^[\s,()\[\]/+&:\-]*(?:(?:and|or|nor)[\s,()\[\]/+&:\-]*)?$",
                              _FLAGS)


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Mention:
    """One expression or AU mention found in the text."""
    kind: str                   # "au" or "expression"
    values: tuple               # AU numbers, or (class name,)
    start: int                  # character span in the text
    end: int
    text: str
    negated: bool = False


@dataclass(frozen=True)
class ParseResult:
    """Everything the parser read from one text."""
    text: str
    expression: str | None                  # decided class, None when absent/ambiguous
    aus: frozenset[int]                     # AUs asserted (restricted to targets if given)
    negated_aus: frozenset[int]             # AUs only mentioned under negation
    expression_counts: dict[str, int]       # non-negated mentions per class
    leading_expression: str | None          # class named first in a label-first answer
    aus_answered: bool                      # any AU mentioned, or "no AUs are active"
    mentions: tuple[Mention, ...] = field(default=())

    @property
    def expression_ambiguous(self) -> bool:
        """Several classes tie for the most mentions (and no label comes first)."""
        return self.expression is None and bool(self.expression_counts)

    def au_mismatch(self, expected: Iterable[int]) -> tuple[set[int], set[int]]:
        """(missing, extra): labelled AUs the text does not assert, asserted AUs not labelled."""
        expected = set(expected)
        return expected - self.aus, set(self.aus) - expected


# ----------------------------------------------------------------------------- mentions

def _au_mentions(text: str) -> list[Mention]:
    found: list[Mention] = []
    pos = 0
    while True:
        head = _AU_HEAD.search(text, pos)
        if head is None:
            break
        values = [int(head.group(1))]
        end = head.end()
        while True:
            cont = _AU_CONT.match(text, end)
            if cont is None:
                break
            number = int(cont.group(2))
            if cont.group(1) is None and (number > _MAX_BARE_AU
                                          or _QUANTITY_AFTER.match(text, cont.end())):
                break
            if _NEW_SUBJECT.match(text, cont.end()) and _AND_JOIN.match(cont.group(0)):
                break   # "no AU4 and AU12 is active", "instead of AU4, AU12 appears"
            values.append(number)
            end = cont.end()
        values = [v for v in values if v > 0]  # AU0 is FACS's neutral face code, not an AU
        if values:
            found.append(Mention("au", tuple(values), head.start(), end, text[head.start():end]))
        pos = end
    for au, pattern in _AU_NAME_PATTERNS:
        for m in pattern.finditer(text):
            found.append(Mention("au", (au,), m.start(), m.end(), m.group(0)))
    return found


def _expression_mentions(text: str) -> list[Mention]:
    found = []
    for cls, pattern in _EXPRESSION_PATTERNS:
        for m in pattern.finditer(text):
            found.append(Mention("expression", (cls,), m.start(), m.end(), m.group(0)))
    return found


def _overlaps(a: tuple[int, int], spans: Iterable[tuple[int, int]]) -> bool:
    return any(a[0] < e and s < a[1] for s, e in spans)


def _clauses(text: str, protected: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Clause spans; boundaries inside a mention span do not count."""
    cuts: list[tuple[int, int]] = []
    for m in _CLAUSE_END.finditer(text):
        if not _overlaps((m.start(), m.end()), protected):
            cuts.append((m.start(), m.end()))
    depth = 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0 and not _overlaps((i, i + 1), protected):
            cuts.append((i, i + 1))
    cuts.sort()
    spans, start = [], 0
    for s, e in cuts:
        if s >= start:
            spans.append((start, s))
            start = e
    spans.append((start, len(text)))
    return [(s, e) for s, e in spans if s < e]


def _negate(text: str, mentions: list[Mention]) -> list[Mention]:
    """Mark the mentions that a negation cue of their clause reaches."""
    spans = [(m.start, m.end) for m in mentions]
    # A mention cannot contain a cue that negates itself ("no emotion" is Neutral).
    idioms = [(m.start(), m.end()) for m in _NOT_NEGATION.finditer(text)]
    cues = sorted(
        (m.start(), m.end(), direction)
        for direction, pattern in _CUES for m in pattern.finditer(text)
        if not _overlaps((m.start(), m.end()), spans + idioms))
    negated = [False] * len(mentions)
    order = sorted(range(len(mentions)), key=lambda i: mentions[i].start)
    for c_start, c_end in _clauses(text, spans):
        inside = [i for i in order if c_start <= mentions[i].start < c_end]
        for cue_start, cue_end, direction in cues:
            if not (c_start <= cue_start < c_end):
                continue
            forward = []
            if direction != "post":
                for i in inside:
                    if mentions[i].start >= cue_end and not _BLOCK_FORWARD.search(
                            text, cue_end, mentions[i].start):
                        forward.append(i)
            if forward:
                for i in forward:
                    negated[i] = True
                continue
            if direction == "pre":
                continue
            before = [i for i in inside if mentions[i].end <= cue_start]
            if not before:
                continue
            last = before[-1]
            if _BLOCK_BACKWARD.search(text, mentions[last].end, cue_start):
                continue
            group = [last]
            for i in reversed(before[:-1]):
                first = mentions[group[-1]]
                if (mentions[i].kind == first.kind and mentions[i].end <= first.start
                        and _LISTED_TOGETHER.match(text[mentions[i].end:first.start])):
                    group.append(i)
                elif mentions[i].end > first.start:   # overlapping mention of the same words
                    group.append(i)
                else:
                    break
            for i in group:
                negated[i] = True
    return [Mention(m.kind, m.values, m.start, m.end, m.text, neg)
            for m, neg in zip(mentions, negated)]


# ----------------------------------------------------------------------------- decisions

def _leading_expression(text: str, mentions: list[Mention]) -> str | None:
    start = _LEADING.match(text).end()
    for m in mentions:
        if (m.kind == "expression" and m.start == start and not m.negated
                and _LABEL_END.match(text, m.end)):
            return m.values[0]
    return None


def parse(text: str, targets: Iterable[int] | None = None) -> ParseResult:
    """Read an expression and an AU set from `text` (rules: this module's docstring).

    `targets` restricts the returned AUs (BP4D scores 10 of the 12, DISFA 7); other AUs
    are still read, so that `aus_answered` and negation see them.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse() needs a string, got {type(text).__name__}: {text!r}")
    raw = _au_mentions(text) + _expression_mentions(text)
    mentions = _negate(text, raw)

    asserted = {v for m in mentions if m.kind == "au" and not m.negated for v in m.values}
    denied = {v for m in mentions if m.kind == "au" and m.negated for v in m.values} - asserted
    if targets is not None:
        keep = {int(t) for t in targets}
        asserted &= keep
        denied &= keep
    aus_answered = any(m.kind == "au" for m in mentions) or bool(_NO_AU_STATEMENT.search(text))

    counts = Counter(m.values[0] for m in mentions if m.kind == "expression" and not m.negated)
    leading = _leading_expression(text, mentions)
    if leading is not None:
        expression = leading
    elif counts:
        ranked = counts.most_common()
        tie = len(ranked) > 1 and ranked[0][1] == ranked[1][1]
        expression = None if tie else ranked[0][0]
    else:
        expression = None
    return ParseResult(
        text=text,
        expression=expression,
        aus=frozenset(asserted),
        negated_aus=frozenset(denied),
        expression_counts={cls: counts[cls] for cls in EXPRESSIONS if counts[cls]},
        leading_expression=leading,
        aus_answered=aus_answered,
        mentions=tuple(sorted(mentions, key=lambda m: (m.start, m.end))),
    )


def parse_expression(text: str) -> str | None:
    """One of labels.EXPRESSIONS, or None when the text names none or is ambiguous."""
    return parse(text).expression


def parse_aus(text: str, targets: Iterable[int] | None = None) -> set[int]:
    """The AUs the text asserts (negated mentions excluded), restricted to `targets`."""
    return set(parse(text, targets).aus)
