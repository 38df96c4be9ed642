"""Offline template annotator: texts follow the labels and pass the FEABench parser."""

from __future__ import annotations

import random

import pytest

from feallm_llava.data.annotate_template import TemplateAnnotator
from feallm_llava.facs.labels import AU_NAMES, AUS, EXPRESSIONS, PROTOTYPES
from feallm_llava.data.records import Annotation, validate_annotation
from feallm_llava.facs.parse import parse_aus, parse_expression


def labels(active, known=AUS):
    return {au: int(au in active) for au in known}


def random_cases(n, seed=0):
    rng = random.Random(seed)
    for i in range(n):
        expression = EXPRESSIONS[i % 7]
        active = set(rng.sample(AUS, rng.randint(0, 7)))
        yield expression, labels(active), f"img{i}"


def test_summary_starts_with_the_expression_word():
    ann = TemplateAnnotator().annotate("Happiness", labels({6, 12}), "a")
    assert ann.summary.startswith("Happiness. ")
    assert parse_expression(ann.summary) == "Happiness"


def test_movement_names_every_active_au_with_its_facs_name_and_no_other():
    for expression, aus, key in random_cases(700):
        ann = TemplateAnnotator(seed=3).annotate(expression, aus, key)
        active = {a for a, v in aus.items() if v}
        assert parse_aus(ann.movement) == active, ann.movement
        for au in active:
            assert f"AU{au:02d} ({AU_NAMES[au]})" in ann.movement


def test_reasoning_names_the_expression_and_each_active_au_only():
    for expression, aus, key in random_cases(250, seed=1):
        ann = TemplateAnnotator(seed=5).annotate(expression, aus, key)
        assert parse_expression(ann.reasoning) == expression, ann.reasoning
        assert parse_aus(ann.reasoning) == {a for a, v in aus.items() if v}, ann.reasoning


def test_every_annotation_passes_validation():
    for seed in range(2):
        for expression, aus, key in random_cases(140, seed=seed):
            ann = TemplateAnnotator(seed=seed).annotate(expression, aus, key)
            assert validate_annotation(ann, expression, aus) == [], ann


def test_reasoning_marks_prototype_aus_as_typical():
    ann = TemplateAnnotator().annotate("Sadness", labels(PROTOTYPES["Sadness"]), "s")
    text = ann.reasoning.lower()
    assert "sadness" in text and any(w in text for w in ("typical", "characteristic", "classic"))


def test_neutral_face_without_active_aus():
    ann = TemplateAnnotator().annotate("Neutral", labels(()), "n")
    assert ann.summary.startswith("Neutral.")
    assert parse_aus(ann.movement) == set() and parse_aus(ann.reasoning) == set()
    assert parse_expression(ann.reasoning) == "Neutral"


def test_unlabelled_aus_are_never_mentioned():
    known = (1, 2, 4, 6, 12, 15, 25)  # the 2020 layout's AUs among the 12
    ann = TemplateAnnotator().annotate("Surprise", labels({1, 2, 25}, known), "k")
    assert parse_aus(ann.movement) == {1, 2, 25} and parse_aus(ann.reasoning) == {1, 2, 25}


def test_same_seed_and_key_give_the_same_texts():
    a = TemplateAnnotator(seed=7).annotate("Fear", labels({1, 2, 4, 25, 26}), "vid_00010")
    b = TemplateAnnotator(seed=7).annotate("Fear", labels({1, 2, 4, 25, 26}), "vid_00010")
    assert a == b


def test_wording_varies_across_images_and_seeds():
    aus = labels({6, 12})
    texts = {TemplateAnnotator(seed=0).annotate("Happiness", aus, f"k{i}") for i in range(40)}
    assert len({t.summary for t in texts}) >= 4 and len({t.movement for t in texts}) >= 10
    seeds = {TemplateAnnotator(seed=s).annotate("Happiness", aus, "k").reasoning for s in range(20)}
    assert len(seeds) >= 5


def test_unknown_expression_is_rejected():
    with pytest.raises(ValueError, match="unknown expression 'Contempt'"):
        TemplateAnnotator().annotate("Contempt", labels(()), "x")


# -- the validator the builder and the OpenAI annotator share ----------------------------------

GOOD = Annotation(
    summary="Happiness. The person smiles warmly.",
    movement="AU6 (Cheek Raiser) lifts the cheeks and AU12 (Lip Corner Puller) pulls the mouth corners up.",
    reasoning="AU6 (Cheek Raiser) and AU12 (Lip Corner Puller) together form a genuine smile, "
              "so the person shows happiness.")


def test_validator_accepts_a_consistent_annotation():
    assert validate_annotation(GOOD, "Happiness", labels({6, 12})) == []


@pytest.mark.parametrize("field, text, problem", [
    ("summary", "The person looks happy.", "does not start with 'Happiness'"),
    ("summary", "Happiness? No, the person looks sad and unhappy.", "summary parses to expression"),
    ("movement", "AU6 (Cheek Raiser) lifts the cheeks.", "movement names AUs [AU06], active AUs are [AU06, AU12]"),
    ("movement", "AU6 (Cheek Raiser), AU12 (Lip Corner Puller) and AU25 (Lips Part).",
     "movement names AUs [AU06, AU12, AU25]"),
    ("movement", "AU6 lifts the cheeks and AU12 pulls the corners.", "lacks the FACS name of AU06, AU12"),
    ("reasoning", "AU6 and AU12 make a smile; AU4 is lowered, the person shows happiness.",
     "reasoning names inactive AUs AU04"),
    ("reasoning", "AU6 (Cheek Raiser) and AU12 (Lip Corner Puller) point to sadness.",
     "reasoning parses to expression 'Sadness'"),
])
def test_validator_rejects_texts_that_disagree_with_the_labels(field, text, problem):
    bad = Annotation(**{**GOOD.to_dict(), field: text})
    problems = validate_annotation(bad, "Happiness", labels({6, 12}))
    assert any(problem in p for p in problems), problems


def test_validator_accepts_negated_mentions_of_inactive_aus():
    ann = Annotation(**{**GOOD.to_dict(),
                        "reasoning": GOOD.reasoning + " AU4 is not activated, so the brows stay relaxed."})
    assert validate_annotation(ann, "Happiness", labels({6, 12})) == []


def test_fixed_wording_depends_on_the_labels_alone():
    cases = list(random_cases(140, seed=2))
    for expression, aus, key in cases:
        a = TemplateAnnotator(seed=1, wording="fixed").annotate(expression, aus, key)
        b = TemplateAnnotator(seed=9, wording="fixed").annotate(expression, aus, key + "-other")
        assert a == b
        assert validate_annotation(a, expression, aus) == [], a
        assert parse_aus(a.movement) == {x for x, v in aus.items() if v}
    varied = {TemplateAnnotator(seed=1).annotate("Fear", labels({1, 2, 4, 25, 26}), f"k{i}").movement
              for i in range(20)}
    assert len(varied) > 1


def test_fixed_wording_lists_each_au_in_one_form():
    ann = TemplateAnnotator(wording="fixed").annotate("Anger", labels({4, 7, 23}), "a")
    assert ann.movement.startswith("The face shows the following action units. AU04 (Brow Lowerer): ")
    assert "AU07 (Lid Tightener): " in ann.movement and "AU23 (Lip Tightener): " in ann.movement


def test_unknown_wording_is_refused():
    with pytest.raises(ValueError, match="wording must be one of"):
        TemplateAnnotator(wording="poetic")
