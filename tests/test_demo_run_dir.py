"""`feallm demo` refuses foreign or different run directories and resumes its own."""

from __future__ import annotations

import json

import pytest

from feallm_llava.demo import MANIFEST, DemoConfig, Run


def test_non_empty_foreign_directory_is_refused(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    with pytest.raises(SystemExit, match="not empty and holds no demo run"):
        Run(tmp_path, DemoConfig(), resume=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


def test_run_with_other_settings_is_refused(tmp_path):
    Run(tmp_path, DemoConfig(subjects=8), resume=False)
    with pytest.raises(SystemExit, match="other settings.*subjects"):
        Run(tmp_path, DemoConfig(subjects=9), resume=True)


def test_unfinished_run_needs_resume(tmp_path):
    Run(tmp_path, DemoConfig(), resume=False)
    with pytest.raises(SystemExit, match="--resume"):
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
