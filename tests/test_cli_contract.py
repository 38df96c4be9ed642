"""One contract for every `feallm` subcommand: exit 0 done, 1 done with failed items,
2 bad usage or input (one line naming the file / line / flag, no traceback), 130
interrupted after saving; `--debug` shows tracebacks; every help page shows defaults
and examples.

Bad inputs run through `feallm_llava.cli.main` in this process (the dispatcher the
console script calls); start-up, `--version` and signals run the installed `feallm`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from feallm_llava.cli import COMMANDS, main

FEALLM = Path(sys.executable).with_name("feallm")


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, *names: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    for name in names:
        assert str(name) in lines[0], (name, err)


# -- help, version, usage --------------------------------------------------------------

@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_help_page_shows_examples_defaults_and_the_exit_statuses(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    page = capsys.readouterr().out
    assert stop.value.code == 0
    assert "examples:" in page and f"feallm {command}" in page.split("examples:")[1]
    assert "exit status: 0" in page
    if command not in ("tiny-kit", "score"):  # their flags default to nothing worth showing
        assert "(default:" in page


def test_version_and_bare_command(tmp_path):
    version = subprocess.run([FEALLM, "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("feallm-llava ")
    bare = subprocess.run([FEALLM], capture_output=True, text=True, cwd=tmp_path)
    assert bare.returncode == 2 and "COMMAND" in bare.stdout


@pytest.mark.parametrize("argv", [["no-such-command"], ["eval", "--bench", "imagenet"], ["tiny-kit"],
                                  ["analyze"], ["build-dataset", "--annotator", "auto", "--root", "x", "--out", "y"]])
def test_bad_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert "usage:" in capsys.readouterr().err


# -- build-dataset -----------------------------------------------------------------------

def test_build_dataset_missing_root(capsys, tmp_path):
    code, err = run_cli(capsys, "build-dataset", "--root", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert code == 2
    assert_one_line_error(err, "feallm build-dataset: error:", tmp_path / "nowhere", "label folders")


def test_build_dataset_root_without_images(capsys, tmp_path):
    (tmp_path / "aw" / "EXPR_Classification_Challenge").mkdir(parents=True)
    (tmp_path / "aw" / "AU_Detection_Challenge").mkdir(parents=True)
    code, err = run_cli(capsys, "build-dataset", "--root", tmp_path / "aw", "--out", tmp_path / "out")
    assert code == 2
    assert_one_line_error(err, tmp_path / "aw" / "cropped_aligned")


def _synthetic_affwild2(tmp_path: Path) -> Path:
    from feallm_llava.data.synthetic import write_affwild2

    return write_affwild2(tmp_path / "aw", 4, 3, seed=0, size=32, progress=False).root


def test_build_dataset_malformed_label_line_is_named(capsys, tmp_path):
    root = _synthetic_affwild2(tmp_path)
    label = sorted(root.rglob("*.txt"))[0]
    lines = label.read_text().splitlines()
    label.write_text("\n".join([lines[0], "banana", *lines[2:]]) + "\n")
    code, err = run_cli(capsys, "build-dataset", "--root", root, "--out", tmp_path / "out", "--no-progress")
    assert code == 2
    assert_one_line_error(err, f"{label}:2", "--skip-bad-lines")
    code, err = run_cli(capsys, "build-dataset", "--root", root, "--out", tmp_path / "out", "--no-progress",
                        "--skip-bad-lines")
    assert code == 1 and "bad_label_line: 1" in err  # done, the skipped line counted


def test_build_dataset_without_its_templates_names_the_file(capsys, tmp_path, monkeypatch):
    empty = tmp_path / "templates"
    empty.mkdir()
    monkeypatch.setenv("FEALLM_TEMPLATES", str(empty))  # an install that lost its package data
    from feallm_llava.data import templates

    templates._load_all.cache_clear()
    code, err = run_cli(capsys, "build-dataset", "--root", tmp_path, "--out", tmp_path / "out")
    templates._load_all.cache_clear()
    assert code == 2
    assert_one_line_error(err, empty / "summary.json")


def test_build_dataset_bad_flag_values(capsys, tmp_path):
    code, err = run_cli(capsys, "build-dataset", "--root", tmp_path, "--out", tmp_path / "o", "--types", "poems")
    assert code == 2
    assert_one_line_error(err, "--types", "poems")
    code, err = run_cli(capsys, "build-dataset", "--root", tmp_path, "--out", tmp_path / "o", "--batch", "write")
    assert code == 2
    assert_one_line_error(err, "--batch needs --annotator openai")


def test_build_dataset_sends_nothing_anywhere_unless_asked(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-would-be-used")  # a key in the environment is not consent
    root = _synthetic_affwild2(tmp_path)
    code, err = run_cli(capsys, "build-dataset", "--root", root, "--out", tmp_path / "out", "--no-progress",
                        "--eval-size", "1")
    assert code == 0 and "sent to" not in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["annotator"]["name"] == "template"


# -- eval and score ---------------------------------------------------------------------

def test_eval_missing_data_and_conflicting_models(capsys, tmp_path):
    code, err = run_cli(capsys, "eval", "--bench", "rafdb", "--data", tmp_path / "none", "--out", tmp_path / "o",
                        "--openai-model", "m", "--base-url", "http://127.0.0.1:9/v1")
    assert code == 2
    assert_one_line_error(err, "feallm eval: error:", tmp_path / "none")
    code, err = run_cli(capsys, "eval", "--bench", "rafdb", "--data", tmp_path, "--out", tmp_path / "o",
                        "--openai-model", "m", "--model-path", "p")
    assert code == 2
    assert_one_line_error(err, "--model-path", "--openai-model")


def test_eval_malformed_feabench_file_is_named(capsys, tmp_path):
    (tmp_path / "eval.json").write_text('[{"id": "a", ')
    code, err = run_cli(capsys, "eval", "--bench", "feabench", "--data", tmp_path, "--out", tmp_path / "o",
                        "--openai-model", "m", "--base-url", "http://127.0.0.1:9/v1")
    assert code == 2
    assert_one_line_error(err, tmp_path / "eval.json", "not valid JSON")


def _prediction(i: int) -> str:
    return json.dumps({"id": f"i{i}", "task": "fer", "answer": "Happiness.", "bench": "feabench",
                       "gt_expression": "Happiness", "model": "m"})


def test_score_torn_last_line_is_named_then_skipped_and_counted(capsys, tmp_path):
    preds = tmp_path / "predictions.jsonl"
    preds.write_text(_prediction(0) + "\n" + _prediction(1) + "\n" + _prediction(2)[:25])
    code, err = run_cli(capsys, "score", preds, "--out", tmp_path / "report")
    assert code == 2
    assert_one_line_error(err, f"{preds}:3", "cut short", "--skip-bad-lines")
    code, err = run_cli(capsys, "score", preds, "--out", tmp_path / "report", "--skip-bad-lines")
    assert code == 1 and "left out 1 line(s)" in err and f"{preds}:3" in err
    (row,) = json.loads((tmp_path / "report" / "scores.json").read_text())["rows"]
    assert row["fer"]["n"] == 2 and row["fer"]["accuracy"] == 1.0


def test_score_missing_file(capsys, tmp_path):
    code, err = run_cli(capsys, "score", tmp_path / "none.jsonl", "--out", tmp_path / "r")
    assert code == 2
    assert_one_line_error(err, tmp_path / "none.jsonl")


# -- analyze, demo, train-tiny ----------------------------------------------------------

def test_analyze_bad_output_and_missing_model(capsys, tmp_path):
    code, err = run_cli(capsys, "analyze", tmp_path, "--model-path", tmp_path / "m", "--out", tmp_path / "r.xlsx")
    assert code == 2
    assert_one_line_error(err, "r.xlsx", ".csv, .jsonl or .json")
    code, err = run_cli(capsys, "analyze", tmp_path, "--model-path", tmp_path / "m", "--resume")
    assert code == 2
    assert_one_line_error(err, "--resume", "--out")
    (tmp_path / "r.csv").write_text("input,error\nold.jpg,\n")
    code, err = run_cli(capsys, "analyze", tmp_path, "--model-path", tmp_path / "m", "--out", tmp_path / "r.csv")
    assert code == 2
    assert_one_line_error(err, "r.csv", "--resume", "--overwrite")
    code, err = run_cli(capsys, "analyze", tmp_path, "--model-path", tmp_path / "no-llava-here",
                        "--out", tmp_path / "new.csv", "--no-progress")
    assert code == 2
    assert_one_line_error(err, "no-llava-here", "launch/demo.sh")


def test_demo_and_train_tiny_bad_values(capsys, tmp_path):
    code, err = run_cli(capsys, "demo", "--steps", "1,2", "--out", tmp_path / "d")
    assert code == 2
    assert_one_line_error(err, "--steps", "'1,2'")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("%")
    code, err = run_cli(capsys, "demo", "--out", tmp_path / "busy", "--until", "synthetic")
    assert code == 2
    assert_one_line_error(err, tmp_path / "busy", "holds no demo run")
    code, err = run_cli(capsys, "train-tiny", "--stages", "3", "--out", tmp_path / "t")
    assert code == 2
    assert_one_line_error(err, "--stages", "'3'")


def test_debug_shows_the_traceback(capsys, tmp_path, monkeypatch):
    code, err = run_cli(capsys, "--debug", "score", tmp_path / "none.jsonl", "--out", tmp_path / "r")
    assert code == 2 and "Traceback" in err
    monkeypatch.setenv("FEALLM_DEBUG", "1")
    code, err = run_cli(capsys, "score", tmp_path / "none.jsonl", "--out", tmp_path / "r")
    assert code == 2 and "Traceback" in err


def test_an_internal_error_is_one_line_with_a_hint(capsys, tmp_path, monkeypatch):
    from feallm_llava.eval import score

    def broken(*_args, **_kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(score, "score_files", broken)
    code, err = run_cli(capsys, "score", tmp_path / "p.jsonl", "--out", tmp_path / "r")
    assert code == 70
    assert_one_line_error(err, "internal error", "KeyError", "--debug")


def test_console_script_is_the_installed_entry_point():
    assert FEALLM.is_file() or shutil.which("feallm"), "the feallm console script is not installed"
    assert os.access(FEALLM, os.X_OK)
