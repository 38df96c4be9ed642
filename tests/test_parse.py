"""The answer parser: table-driven, both directions (what must be found, what must not).

Each AU row gives the exact AU set the text asserts, so a row checks at once that the
AUs named are found and that no other AU (a negated one, a number that is a quantity)
sneaks in. Rows marked EmoLA are the failure modes of EmoLA's scorer
(its published scorer): `re.findall(r"AU(\\d+)")` looked up by string drops
"AU01", misses "AU 12" and "action unit 12", counts "no AU4"; its emotion keywords
drop every sentence containing "no"/"not" as a substring ("nose").
"""

from __future__ import annotations

import pytest

from feallm_llava.facs.labels import AU_NAMES, EXPRESSIONS
from feallm_llava.facs.parse import parse, parse_aus, parse_expression

AU_CASES: list[tuple[str, set[int]]] = [
    # numbers, every spelling
    ("AU1", {1}),
    ("AU01 and AU02 are active", {1, 2}),                      # EmoLA: "AU01" dropped
    ("AU 12", {12}),                                           # EmoLA: missed
    ("AU-12", {12}),
    ("AU_12 is visible", {12}),
    ("action unit 4", {4}),
    ("Action unit 12 is activated.", {12}),                    # EmoLA: missed
    ("action units 1, 2 and 4", {1, 2, 4}),
    ("AUs 6 and 12", {6, 12}),
    ("AU6+AU12", {6, 12}),
    ("AU6/12", {6, 12}),
    ("AU-6 & AU-12", {6, 12}),
    ("Action Units: 1, 2, 4", {1, 2, 4}),
    ("Activated AUs: AU06, AU12, AU25.", {6, 12, 25}),
    ("AU01,AU02", {1, 2}),
    ("AU1 AU2 AU4", {1, 2, 4}),
    ("AU12B and AU6C (FACS intensities)", {6, 12}),
    ("au12", {12}),
    ("AU12.", {12}),
    ("AUD results: AU6", {6}),                                 # "AUD" is not an AU prefix
    ("AU5 and AU43", {5, 43}),                                 # outside the 12: still read
    # numbers that are not AUs
    ("AU12 and 3 other AUs", {12}),
    ("AU12 at 80%", {12}),
    ("AU6 and AU12, 2 AUs in total", {6, 12}),
    ("AU0", set()),                                            # FACS neutral face code
    ("The 12 action units were checked", set()),
    # FACS names and clear paraphrases
    ("lip corner puller", {12}),
    ("Inner brow raiser is visible", {1}),
    ("lip-corner puller", {12}),
    ("Cheek Raiser (AU6)", {6}),
    ("the nose wrinkler", {9}),
    ("The inner brows are raised", {1}),
    ("raised inner brows", {1}),
    ("the outer portions of the eyebrows are lifted", {2}),
    ("furrowed brows", {4}),
    ("brows drawn together", {4}),
    ("raised cheeks", {6}),
    ("the cheeks are pushed up", {6}),
    ("The eyelids are tensed", {7}),
    ("the upper lip is raised", {10}),
    ("Lip corners are pulled upward", {12}),
    ("The lip corners are pulled down", {15}),                 # not AU12's "pulled"
    ("the corners of the mouth are turned down", {15}),
    ("downturned lip corners", {15}),
    ("lips tightened", {23}),
    ("lips pressed together", {24}),
    ("lips slightly parted", {25}),
    ("The jaw drops", {26}),
    ("The lips are slightly parted and the jaw dropped", {25, 26}),
    # vague phrases are not AUs
    ("raised eyebrows", set()),
    ("open mouth", set()),
    ("a big smile", set()),
    ("narrowed eyes", set()),
    # negation excludes the mention
    ("AU4 is not activated", set()),
    ("no AU4", set()),                                         # EmoLA: counted AU4
    ("no sign of AU15", set()),
    ("without AU26", set()),
    ("AU 7 absent", set()),
    ("AU12: no", set()),
    ("none of AU1 or AU2", set()),
    ("neither AU1 nor AU2 is present", set()),
    ("AU 1, 2, and 4 are not present", set()),
    ("no AU1, AU2, or AU4 is present", set()),
    ("AU 4 isn't active", set()),
    ("There is no evidence of AU 23.", set()),
    ("AU26 is missing", set()),
    ("AU24=0", set()),
    ("no jaw drop", set()),
    ("the jaw is not dropped", set()),
    # negation is scoped to its clause and its mention
    ("AU12 is active and AU4 is not", {12}),
    ("There is no AU4 and AU12 is active", {12}),
    ("no AU4, and AU12 is active", {12}),
    ("Instead of AU4, AU12 appears", {12}),
    ("AU12 rather than AU15", {12}),
    ("AU12 is activated, but not AU4.", {12}),
    ("AU1 present; AU2 absent", {1}),
    ("AU1 is not activated and AU2 is activated", {2}),
    ("AUs 6 and 12 are active while AU4 is inactive", {6, 12}),
    ("AU4: yes, AU7: no, AU23: yes", {4, 23}),
    ("AU24=1", {24}),
    ("The person shows AU12 but no sign of AU15.", {12}),
    ("AU6 is present, AU12 is not", {6}),
    ("AU4 (brow lowerer) is not activated, AU12 (lip corner puller) is.", {12}),
    ("AU 12 (lip corner puller) and AU 6 (cheek raiser) are active; the brow lowerer is "
     "absent.", {6, 12}),
    ("Upper lip raiser is not visible, lip corner depressor is", {15}),
    # words that merely contain a negation, and idioms that negate nothing
    ("The nose is wrinkled (AU9) and AU10 is active", {9, 10}),  # EmoLA: "nose" dropped
    ("I know AU12 is present", {12}),
    ("Notably, AU6 is strong", {6}),
    ("The annotated AU is AU25", {25}),
    ("nothing but AU12", {12}),
    ("Not only AU6 but also AU12 is active", {6, 12}),
    ("AU12 cannot be ruled out", {12}),
]

EXPRESSION_CASES: list[tuple[str, str | None]] = [
    # the classes, synonyms and inflections
    ("Happy", "Happiness"),
    ("The person looks joyful.", "Happiness"),
    ("She is smiling.", "Happiness"),
    ("The person is laughing", "Happiness"),
    ("The person is angry.", "Anger"),
    ("He looks furious", "Anger"),
    ("The face shows disgust", "Disgust"),
    ("disgusted", "Disgust"),
    ("The person appears fearful", "Fear"),
    ("She looks scared", "Fear"),
    ("He is afraid", "Fear"),
    ("The person is sad.", "Sadness"),
    ("a look of sorrow", "Sadness"),
    ("The person is unhappy.", "Sadness"),                    # not "happy"
    ("surprised", "Surprise"),
    ("The person is astonished", "Surprise"),
    ("Neutral", "Neutral"),
    ("The expression is neutral", "Neutral"),
    ("The person shows no emotion", "Neutral"),
    ("expressionless face", "Neutral"),
    ("The person is calm.", "Neutral"),
    ("There is no particular emotion.", "Neutral"),
    ("The face does not display any emotion.", "Neutral"),
    # label first (the FEALLM summary format) wins over later mentions
    ("Happiness. The person is smiling broadly with raised cheeks.", "Happiness"),
    ("Sadness. Although the person smiles, the lip corners are depressed.", "Sadness"),
    ("Surprise. The eyes are wide open.", "Surprise"),
    ("Fear, with raised brows and parted lips.", "Fear"),
    ("**Anger**", "Anger"),
    ("Answer: Disgust.", "Disgust"),
    ("\"Sadness\". The person frowns.", "Sadness"),
    ("Disgust: the upper lip is raised.", "Disgust"),
    # otherwise the most mentioned class
    ("The person seems to be experiencing happiness, with a genuine smile.", "Happiness"),
    ("The person is sad. The person is sad. The person is happy.", "Sadness"),
    ("The lip corners are depressed, suggesting sadness.", "Sadness"),
    # negation
    ("The person is not happy.", None),
    ("She is not smiling and does not look angry.", None),
    ("No sign of fear.", None),
    ("without joy", None),
    ("The person isn't sad; she's surprised.", "Surprise"),
    ("Not angry, just surprised.", "Surprise"),
    ("She is not afraid, she is furious.", "Anger"),
    ("Not happy but sad.", "Sadness"),
    ("The person is neither happy nor sad; she is surprised.", "Surprise"),
    ("The person shows a happy expression, not a sad one", "Happiness"),
    # substrings and idioms that negate nothing
    ("The nose is wrinkled in disgust.", "Disgust"),          # EmoLA: sentence dropped
    ("The nose is wrinkled and the person looks happy.", "Happiness"),
    ("I know the person is happy.", "Happiness"),
    ("Her brows are tied in a knot; she is angry.", "Anger"),
    ("There is nothing but joy on her face.", "Happiness"),
    ("She cannot hide her joy.", "Happiness"),
    ("notably happy", "Happiness"),
    ("The annotated emotion is fear.", "Fear"),
    ("No doubt the person is happy.", "Happiness"),
    ("Not surprisingly, the person looks angry.", "Anger"),
    ("The brows are in a neutral position and the person smiles.", "Happiness"),
    # absent or ambiguous: None, never a default class
    ("The person is happy and surprised.", None),
    ("The emotion could be fear or surprise.", None),
    ("The image shows a person.", None),
    ("", None),
    ("Contempt", None),                                        # not one of the 7
    ("fearless", None),
    ("depressed lip corners", None),                           # AU15, not Sadness
]


@pytest.mark.parametrize("text,expected", AU_CASES, ids=[t for t, _ in AU_CASES])
def test_au_phrasing(text, expected):
    assert parse_aus(text) == expected


@pytest.mark.parametrize("text,expected", EXPRESSION_CASES, ids=[t or "<empty>" for t, _ in
                                                                  EXPRESSION_CASES])
def test_expression_phrasing(text, expected):
    assert parse_expression(text) == expected


def test_table_has_at_least_80_phrasings_in_both_directions():
    must_find = sum(bool(e) for _, e in AU_CASES) + sum(e is not None for _, e in EXPRESSION_CASES)
    must_not_find = sum(not e for _, e in AU_CASES) + sum(e is None for _, e in EXPRESSION_CASES)
    assert must_find + must_not_find >= 80
    assert must_find >= 40 and must_not_find >= 30


def test_every_facs_name_of_the_12_aus_is_found():
    for au, name in AU_NAMES.items():
        assert parse_aus(f"The {name.lower()} is active.") == {au}, name


def test_every_class_name_parses_to_itself():
    for cls in EXPRESSIONS:
        assert parse_expression(cls) == cls
        assert parse_expression(f"The person's expression is {cls.lower()}.") == cls


def test_targets_restrict_the_aus():
    text = "AU1, AU2, AU4, AU6, AU9, AU25 and AU26 are active"
    assert parse_aus(text, targets=(1, 2, 4, 6, 7, 10, 12, 15, 23, 24)) == {1, 2, 4, 6}
    assert parse_aus(text, targets=[]) == set()
    assert parse_aus(text) == {1, 2, 4, 6, 9, 25, 26}


def test_negated_aus_are_reported_apart():
    result = parse("AU12 is active, AU4 is not, and there is no AU15.")
    assert result.aus == {12}
    assert result.negated_aus == {4, 15}


def test_an_au_asserted_and_negated_counts_as_present():
    assert parse_aus("AU4 is absent. On closer look, AU4 is clearly visible.") == {4}


def test_an_answer_naming_no_au_is_not_answered():
    assert not parse("The person looks happy.").aus_answered
    assert not parse("").aus_answered


def test_a_statement_that_no_au_is_active_is_answered_with_the_empty_set():
    for text in ("No action units are activated.", "None of the AUs are present.",
                 "AU4 is not active.", "None."):
        result = parse(text)
        assert result.aus_answered, text
        assert result.aus == set(), text


def test_a_tie_is_ambiguous_and_no_mention_is_not():
    assert parse("happy or sad").expression_ambiguous
    assert not parse("The image shows a person.").expression_ambiguous


def test_au_mismatch_names_missing_and_extra_aus():
    result = parse("Cheek raiser and lip corner puller; the lips part (AU25).")
    assert result.au_mismatch([6, 12]) == (set(), {25})
    assert result.au_mismatch([6, 12, 25, 26]) == ({26}, set())


def test_mentions_carry_their_span_and_negation():
    text = "AU6 is present but AU4 is not"
    mentions = parse(text).mentions
    assert [(m.values, m.negated) for m in mentions] == [((6,), False), ((4,), True)]
    assert [text[m.start:m.end] for m in mentions] == ["AU6", "AU4"]


def test_parse_rejects_non_text():
    with pytest.raises(TypeError, match="string"):
        parse(None)
