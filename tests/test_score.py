"""`feallm score`: prediction files in, scores, the paper-style table and plots out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from feallm_llava.cli import main as cli_main
from feallm_llava.facs.labels import AUS, EXPRESSIONS

BP4D_AUS = [1, 2, 4, 6, 7, 10, 12, 15, 23, 24]   # shared with the 12 (paper Tab. 5)


def fer(i, gt, answer, model="feallm", bench="feabench", **extra):
    return {"id": f"img{i}", "image": f"/data/img{i}.jpg", "task": "fer",
            "question": "What is the expression?", "answer": answer, "gt_expression": gt,
            "gt_aus": None, "au_targets": [], "bench": bench, "model": model, **extra}


def aud(i, gt, answer, targets=AUS, model="feallm", bench="feabench", **extra):
    return {"id": f"img{i}", "image": f"/data/img{i}.jpg", "task": "aud",
            "question": "Which AUs are active?", "answer": answer, "gt_expression": None,
            "gt_aus": list(gt), "au_targets": list(targets), "bench": bench, "model": model,
            **extra}


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run_score(*args) -> int:
    return cli_main(["score", *map(str, args)])


FEABENCH = [
    fer(0, "Happiness", "Happiness. The person smiles with raised cheeks."),
    fer(1, "Sadness", "The person is not happy; she looks sad."),
    fer(2, "Neutral", "I cannot tell."),                          # parse failure, not Neutral
    fer(3, "Anger", "Surprise. The eyes are wide."),
    aud(0, [6, 12], "AU06 (cheek raiser) and AU 12 are active; AU4 is not."),
    aud(1, [1, 4, 15], "Action units 1, 4 and 15."),
    aud(2, [25, 26], "The lips are parted."),
    aud(3, [4, 7], "The person looks angry."),                    # parse failure
]


def test_score_writes_all_outputs_with_the_right_numbers(tmp_path):
    preds = write_jsonl(tmp_path / "run" / "predictions.jsonl", FEABENCH)
    assert run_score(preds, "--out", tmp_path / "out") == 0
    out = tmp_path / "out"
    for name in ("scores.json", "scores.csv", "table.md", "confusion.png", "au_f1.png",
                 "parse_failures.jsonl"):
        assert (out / name).is_file(), name

    (row,) = json.loads((out / "scores.json").read_text())["rows"]
    assert (row["model"], row["bench"]) == ("feallm", "feabench")
    assert row["fer"]["n"] == 4 and row["fer"]["correct"] == 2
    assert row["fer"]["accuracy"] == pytest.approx(0.5)
    assert row["fer"]["parse_failures"] == 1
    neutral = EXPRESSIONS.index("Neutral")
    assert row["fer"]["confusion"][neutral][neutral] == 0
    assert row["fer"]["confusion"][neutral][-1] == 1
    f1 = row["aud"]["f1"]
    assert f1["AU06"] == f1["AU12"] == f1["AU01"] == f1["AU15"] == f1["AU25"] == 1.0
    assert f1["AU04"] == pytest.approx(2 * 1 / (2 * 1 + 0 + 1))  # tp 1 (item 1), fn 1 (item 3)
    assert f1["AU26"] == 0.0 and f1["AU07"] == 0.0 and f1["AU02"] == 0.0
    assert row["aud"]["parse_failures"] == 1
    assert row["aud"]["mean_f1"] == pytest.approx(sum(f1.values()) / 12)

    failures = [json.loads(x) for x in (out / "parse_failures.jsonl").read_text().splitlines()]
    assert {(f["id"], f["task"]) for f in failures} == {("img2", "fer"), ("img3", "aud")}
    assert all(f["line"] and f["file"] for f in failures)


def test_table_is_laid_out_like_the_paper(tmp_path):
    preds = write_jsonl(tmp_path / "a.jsonl", FEABENCH)
    assert run_score(preds, "--out", tmp_path / "out") == 0
    table = (tmp_path / "out" / "table.md").read_text()
    header = "| Methods | FE Acc | " + " | ".join(f"AU{a}" for a in AUS) + " | Avg. |"
    assert header in table
    row = next(line for line in table.splitlines() if line.startswith("| feallm | 50.00 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 2 + len(AUS) + 1
    # F1 = 1 for AU1, 6, 12, 15, 25; 2/3 for AU4; 0 for the other six
    assert cells[2] == "100.00" and cells[-1] == "{:.2f}".format(100 * (5 + 2 / 3) / 12)
    assert "FER parse failures" in table and "AUD parse failures" in table


def test_a_bench_with_fewer_aus_shows_only_its_aus(tmp_path):
    records = [aud(i, [12], "AU12 is active.", targets=BP4D_AUS, bench="bp4d")
               for i in range(3)]
    preds = write_jsonl(tmp_path / "bp4d.jsonl", records)
    assert run_score(preds, "--out", tmp_path / "out") == 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| Methods | " + " | ".join(f"AU{a}" for a in BP4D_AUS) + " | Avg. |" in table
    assert "| AU25" not in table and "| FE Acc" not in table
    assert not (tmp_path / "out" / "confusion.png").exists()   # no FER items, no matrix
    assert (tmp_path / "out" / "au_f1.png").is_file()


def test_several_files_give_several_rows_named_by_name(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", FEABENCH)
    b = write_jsonl(tmp_path / "b.jsonl", [fer(i, "Happiness", "happy") for i in range(4)])
    assert run_score(a, b, "--out", tmp_path / "out", "--name", "FEALLM", "LLaVA-LoRA") == 0
    rows = json.loads((tmp_path / "out" / "scores.json").read_text())["rows"]
    assert [(r["model"], r["fer"]["accuracy"]) for r in rows] == [("FEALLM", 0.5),
                                                                   ("LLaVA-LoRA", 1.0)]
    with (tmp_path / "out" / "scores.csv").open() as f:
        lines = list(csv.DictReader(f))
    assert [line["model"] for line in lines] == ["FEALLM", "LLaVA-LoRA"]
    assert float(lines[0]["fer_accuracy"]) == 0.5 and lines[1]["AU12"] == ""
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| LLaVA-LoRA | 100.00 |" in table


def test_model_name_falls_back_to_the_folder_when_the_line_has_none(tmp_path):
    records = [{k: v for k, v in fer(0, "Fear", "Fear.").items() if k != "model"}]
    preds = write_jsonl(tmp_path / "qwen-vl" / "predictions.jsonl", records)
    assert run_score(preds, "--out", tmp_path / "out") == 0
    rows = json.loads((tmp_path / "out" / "scores.json").read_text())["rows"]
    assert rows[0]["model"] == "qwen-vl"


def test_chunks_of_one_run_merge_into_one_row(tmp_path):
    a = write_jsonl(tmp_path / "chunk0.jsonl", FEABENCH[:2] + FEABENCH[4:6])
    b = write_jsonl(tmp_path / "chunk1.jsonl", FEABENCH[2:4] + FEABENCH[6:])
    assert run_score(a, b, "--out", tmp_path / "out") == 0
    (row,) = json.loads((tmp_path / "out" / "scores.json").read_text())["rows"]
    assert row["fer"]["n"] == 4 and row["aud"]["n"] == 4
    assert row["fer"]["accuracy"] == pytest.approx(0.5)


def test_the_scorer_parses_answers_and_ignores_parsed_fields_written_by_others(tmp_path):
    records = [fer(0, "Happiness", "The person is not happy; she is sad.",
                   pred_expression="Happiness"),
               aud(1, [4], "no AU4", pred_aus=[4])]
    preds = write_jsonl(tmp_path / "p.jsonl", records)
    assert run_score(preds, "--out", tmp_path / "out") == 0
    (row,) = json.loads((tmp_path / "out" / "scores.json").read_text())["rows"]
    assert row["fer"]["accuracy"] == 0.0
    assert row["aud"]["f1"]["AU04"] == 0.0
    assert "stored_prediction_disagreements" not in row


def test_plots_are_png_images(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", FEABENCH)
    b = write_jsonl(tmp_path / "b.jsonl", FEABENCH)
    assert run_score(a, b, "--out", tmp_path / "out", "--name", "m1", "m2") == 0
    for name in ("confusion.png", "au_f1.png"):
        with Image.open(tmp_path / "out" / name) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200


@pytest.mark.parametrize("bad_line,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({k: v for k, v in fer(9, "Fear", "x").items() if k != "answer"}),
     "missing key 'answer'"),
    (json.dumps(fer(9, "Fear", None)), "'answer' must be the generated text"),
    (json.dumps(fer(9, "Contempt", "x")), "gt_expression"),
    (json.dumps({**fer(9, "Fear", "x"), "task": "vqa"}), "task 'vqa'"),
    (json.dumps(aud(9, [4], "x", targets=[])), "'au_targets' is empty"),
    (json.dumps({**aud(9, [4], "x"), "gt_aus": "4"}), "list of AU numbers"),
])
def test_a_malformed_line_is_an_error_naming_file_and_line(tmp_path, capsys, bad_line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(FEABENCH[0]) + "\n\n" + bad_line + "\n", encoding="utf-8")
    assert run_score(path, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{path}:3" in err and message in err
    assert not (tmp_path / "out" / "scores.json").exists()


def test_a_duplicate_item_is_an_error_naming_both_places(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", FEABENCH[:1])
    b = write_jsonl(tmp_path / "b.jsonl", FEABENCH[:1])
    assert run_score(a, b, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{b}:1" in err and f"{a}:1" in err and "--name" in err


def test_mixed_au_targets_in_one_row_are_an_error(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [aud(0, [1], "AU1"),
                                           aud(1, [1], "AU1", targets=BP4D_AUS)])
    assert run_score(a, "--out", tmp_path / "out") == 2
    assert f"{a}:2" in capsys.readouterr().err


def test_name_count_must_match_file_count(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", FEABENCH)
    assert run_score(a, "--out", tmp_path / "out", "--name", "x", "y") == 2
    assert "one name per file" in capsys.readouterr().err


def test_a_missing_file_is_an_error_naming_it(tmp_path, capsys):
    assert run_score(tmp_path / "nope.jsonl", "--out", tmp_path / "out") == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_a_stale_plot_is_removed_when_this_run_has_no_such_data(tmp_path):
    out = tmp_path / "out"
    assert run_score(write_jsonl(tmp_path / "a.jsonl", FEABENCH), "--out", out) == 0
    assert (out / "confusion.png").exists()
    only_aud = write_jsonl(tmp_path / "b.jsonl", FEABENCH[4:])
    assert run_score(only_aud, "--out", out) == 0
    assert not (out / "confusion.png").exists()
