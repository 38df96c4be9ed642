"""Question templates: packaged data files, loaded and validated."""

from __future__ import annotations

import json

import pytest

from feallm_llava.data.templates import MIN_QUESTIONS, load_templates, pick_question


def test_each_type_has_at_least_12_distinct_questions():
    templates = load_templates()
    assert set(templates) == {"summary", "movement", "reasoning"}
    for questions in templates.values():
        assert len(questions) >= MIN_QUESTIONS >= 12
        assert len({q.lower() for q in questions}) == len(questions)
        assert not any("<image>" in q for q in questions)


def test_paper_example_questions_are_present():
    templates = load_templates()
    assert "Please describe the expression in this face." in templates["summary"]
    assert "Please describe the action units in this face." in templates["movement"]


def test_question_pick_is_deterministic_in_seed_and_key():
    assert pick_question("summary", "vid_00001", 0) == pick_question("summary", "vid_00001", 0)
    picks = {pick_question("movement", f"vid_{i:05d}", 0) for i in range(200)}
    assert len(picks) == len(load_templates()["movement"])  # every template gets used
    other_seed = [pick_question("reasoning", f"k{i}", 1) for i in range(50)]
    assert other_seed != [pick_question("reasoning", f"k{i}", 0) for i in range(50)]


def _write(tmp_path, kind, questions):
    (tmp_path / f"{kind}.json").write_text(json.dumps({"type": kind, "questions": questions}))


def _full_dir(tmp_path):
    for kind in ("summary", "movement", "reasoning"):
        _write(tmp_path, kind, [f"{kind} question {i}?" for i in range(12)])
    return tmp_path


def test_a_custom_template_folder_is_loaded(tmp_path):
    assert load_templates(_full_dir(tmp_path))["summary"][0] == "summary question 0?"


def test_too_few_questions_is_rejected_naming_the_file(tmp_path):
    _full_dir(tmp_path)
    _write(tmp_path, "reasoning", [f"q{i}" for i in range(11)])
    with pytest.raises(ValueError, match=r"reasoning\.json: 11 questions; each type needs at least 12"):
        load_templates(tmp_path)


def test_question_with_image_token_is_rejected(tmp_path):
    _full_dir(tmp_path)
    _write(tmp_path, "summary", ["<image>\nWhat?"] + [f"q{i}" for i in range(12)])
    with pytest.raises(ValueError, match="contains <image>"):
        load_templates(tmp_path)


def test_invalid_json_names_file_and_line(tmp_path):
    _full_dir(tmp_path)
    (tmp_path / "movement.json").write_text('{"type": "movement",\n "questions": [,]}')
    with pytest.raises(ValueError, match=r"movement\.json:2: not valid JSON"):
        load_templates(tmp_path)
