"""`feallm demo` refuses foreign or different run directories and resumes its own."""

from __future__ import annotations

import json

import pytest

from feallm_llava.demo.config import DemoConfig
from feallm_llava.demo.rundir import MANIFEST, Run
from feallm_llava.errors import UsageError


def test_non_empty_foreign_directory_is_refused(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    with pytest.raises(UsageError, match="not empty and holds no demo run"):
        Run(tmp_path, DemoConfig(), resume=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


def test_run_with_other_settings_is_refused(tmp_path):
    Run(tmp_path, DemoConfig(subjects=8), resume=False)
    with pytest.raises(UsageError, match="other settings.*subjects"):
        Run(tmp_path, DemoConfig(subjects=9), resume=True)


def test_unfinished_run_needs_resume(tmp_path):
    Run(tmp_path, DemoConfig(), resume=False)
    with pytest.raises(UsageError, match="--resume"):
        Run(tmp_path, DemoConfig(), resume=False)


def test_resume_skips_finished_stages(tmp_path, capsys):
    calls = []
    run = Run(tmp_path, DemoConfig(), resume=False)
    run.stage("synthetic", "first", lambda: calls.append("synthetic"))
    with pytest.raises(RuntimeError):
        run.stage("dataset", "killed here", lambda: (_ for _ in ()).throw(RuntimeError("interrupted")))
    again = Run(tmp_path, DemoConfig(), resume=True)
    again.stage("synthetic", "first", lambda: calls.append("synthetic again"))
    again.stage("dataset", "second", lambda: calls.append("dataset"))
    assert calls == ["synthetic", "dataset"]
    assert "done in an earlier run" in capsys.readouterr().out
    assert json.loads((tmp_path / MANIFEST).read_text())["subjects"] == DemoConfig().subjects


def test_until_stops_after_that_stage_and_resume_goes_on(tmp_path):
    calls = []
    run = Run(tmp_path, DemoConfig(), resume=False, until="stage1")
    for name in ("warmup", "stage1-feallm", "readout-feallm"):
        run.stage(name, name, lambda n=name: calls.append(n))
    assert run.stopped and calls == ["warmup", "stage1-feallm"]
    again = Run(tmp_path, DemoConfig(), resume=True)
    for name in ("warmup", "stage1-feallm", "readout-feallm"):
        again.stage(name, name, lambda n=name: calls.append(n))
    assert not again.stopped and calls == ["warmup", "stage1-feallm", "readout-feallm"]


def test_until_names_a_stage():
    from feallm_llava.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser("demo").parse_args(["demo", "--until", "stage3"])
    assert build_parser("demo").parse_args(["demo", "--until", "readout"]).until == "readout"


def test_chance_line_gives_the_blind_baselines():
    from feallm_llava.demo.pipeline import _chance_line

    truth = [
        {"expression": "Happiness", "aus": [1]},
        {"expression": "Happiness", "aus": [1, 2]},
        {"expression": "Anger", "aus": []},
        {"expression": "Neutral", "aus": [1]},
        {"expression": None, "aus": None},  # invalid labels are not scored
    ]
    # AU1: 3 TP 1 FP -> 6/7; AU2: 1 TP 3 FP -> 2/5; the other 10 AUs: 0; mean over 12
    mean = (6 / 7 + 2 / 5) / 12
    assert _chance_line(truth) == (
        f"blind baselines on these items: FE 50.00 (always Happiness), "
        f"mean AU F1 {100 * mean:.2f} (every AU always on)")
