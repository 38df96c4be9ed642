"""Metrics of probabilities (ROC AUC, ECE, tuned thresholds) and `feallm score` on them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from feallm_llava.eval.probabilities import (au_prob_metrics, calibration_bins, expected_calibration_error,
                                             fer_prob_metrics, roc_auc, tune_threshold)
from feallm_llava.facs.labels import AUS, EXPRESSIONS, au_key
from feallm_llava.inference.scores import au_probabilities, expression_probabilities, softmax
from tests.test_score import aud, fer, run_score, write_jsonl


def test_roc_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 40).astype(bool)
        s = rng.integers(0, 6, 40) / 5.0  # many ties
        if y.all() or not y.any():
            continue
        assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_roc_auc_of_one_class_is_undefined():
    assert roc_auc([True, True], [0.2, 0.9]) is None


def test_ece_by_hand():
    # bins of 0.1: 0.95, 0.9 -> (0.8, 0.9] holds 0.9 only, (0.9, 1] holds 0.95
    conf = [0.95, 0.9, 0.35, 0.3, 0.32]
    correct = [True, False, True, False, False]
    # (0.9,1]: 1 item, acc 1, conf .95 -> .05; (0.8,0.9]: 1 item, acc 0, conf .9 -> .9;
    # (0.3,0.4]: .35 .32 -> acc .5 conf .335 -> .165 (2 items); (0.2,0.3]: .3, acc 0 -> .3
    expected = (1 * 0.05 + 1 * 0.9 + 2 * abs(0.5 - 0.335) + 1 * 0.3) / 5
    assert expected_calibration_error(conf, correct) == pytest.approx(expected)
    assert sum(b[2] for b in calibration_bins(conf, correct)) == 5


def test_fer_probability_metrics_read_the_argmax_and_the_truths_probability():
    rows = [dict(zip(EXPRESSIONS, softmax([0, 3, 0, 0, 0, 0, 1]))), dict(zip(EXPRESSIONS, softmax([2, 0, 0, 0, 0, 0, 0])))]
    m = fer_prob_metrics(["Anger", "Sadness"], rows)
    assert m.accuracy == 0.5
    assert m.nll == pytest.approx(-(np.log(rows[0]["Anger"]) + np.log(rows[1]["Sadness"])) / 2)


def test_expression_probabilities_sum_to_one_and_keep_the_order():
    p = expression_probabilities([-3.0, -1.0, -2.0, -900.0, -0.5, -4.0, -1.5])
    assert sum(p.values()) == pytest.approx(1.0)
    assert max(p, key=p.get) == "Happiness" and list(p) == list(EXPRESSIONS)


def test_au_probability_is_the_conditional_of_the_two_answers_that_differ_in_that_au():
    lp = [-10.0] + [-12.0] * len(AUS)   # answer(S) beats every toggled answer by e^2
    p = au_probabilities({12}, lp)
    assert p["AU12"] == pytest.approx(1 / (1 + np.exp(-2)))   # in S: P(with) / (P(with) + P(without))
    assert p["AU01"] == pytest.approx(1 / (1 + np.exp(2)))    # not in S


def test_tuned_threshold_maximises_f1_on_its_items():
    rng = np.random.default_rng(1)
    y = rng.random(60) < 0.3
    s = np.clip(y * 0.3 + rng.random(60) * 0.7, 0, 1)
    t = tune_threshold(y, s)
    best = max(f1_score(y, s >= c) for c in np.unique(s))
    assert f1_score(y, s >= t) == pytest.approx(best)


def test_au_metrics_report_tuned_f1_only_with_a_validation_split():
    truth = [[12], [], [12, 6], [6]]
    probs = [{au_key(a): (0.9 if a in t else 0.1) for a in AUS} for t in truth]
    m = au_prob_metrics(truth, probs, AUS)
    assert m.auc[12] == 1.0 and m.auc[1] is None and m.mean_f1_tuned is None
    m = au_prob_metrics(truth, probs, AUS, validation=(truth, probs), tuned_on=("val.jsonl",))
    assert m.f1_tuned[12] == 1.0 and m.tuned_on == ("val.jsonl",)


# -- feallm score ---------------------------------------------------------------------------------

def _with_probs(rng, i, gt_expr, gt_aus, image_prefix="img"):
    logits = rng.normal(size=len(EXPRESSIONS))
    logits[EXPRESSIONS.index(gt_expr)] += 3
    p_expr = dict(zip(EXPRESSIONS, softmax(list(logits))))
    p_aus = {au_key(a): float(np.clip((0.7 if a in gt_aus else 0.2) + rng.normal(0, 0.2), 0, 1)) for a in AUS}
    f = fer(i, gt_expr, f"{gt_expr}. The person.", p_expression=p_expr)
    a = aud(i, gt_aus, "AU06 and AU12 are active.", p_aus=p_aus)
    f["image"] = a["image"] = f"/data/{image_prefix}{i}.jpg"
    return f, a


def _run(rng, n, prefix):
    lines = []
    for i in range(n):
        lines += _with_probs(rng, i, EXPRESSIONS[i % 7], [6, 12] if i % 2 else [4], prefix)
    return lines


def test_score_reports_probability_metrics_beside_the_text_ones(tmp_path):
    rng = np.random.default_rng(2)
    preds = write_jsonl(tmp_path / "run" / "predictions.jsonl", _run(rng, 30, "test"))
    val = write_jsonl(tmp_path / "val" / "predictions.jsonl", _run(rng, 30, "val"))
    assert run_score(preds, "--tune-on", val, "--out", tmp_path / "out") == 0
    row = json.loads((tmp_path / "out" / "scores.json").read_text())["rows"][0]
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    truth = [x["gt_expression"] for x in lines if x["task"] == "fer"]
    argmax = [max(x["p_expression"], key=x["p_expression"].get) for x in lines if x["task"] == "fer"]
    assert row["fer_prob"]["accuracy"] == pytest.approx(np.mean([a == t for a, t in zip(argmax, truth)]))
    aud_lines = [x for x in lines if x["task"] == "aud"]
    auc12 = roc_auc_score([12 in x["gt_aus"] for x in aud_lines], [x["p_aus"]["AU12"] for x in aud_lines])
    assert row["aud_prob"]["auc"]["AU12"] == pytest.approx(auc12)
    assert row["aud_prob"]["tuned_on"] == [str(val)] and row["aud_prob"]["mean_f1_tuned"] is not None
    assert (tmp_path / "out" / "reliability.png").stat().st_size > 1000
    assert "FE Acc (likelihood)" in (tmp_path / "out" / "table.md").read_text()


def test_thresholds_are_never_tuned_on_scored_items(tmp_path, capsys):
    rng = np.random.default_rng(3)
    preds = write_jsonl(tmp_path / "run" / "predictions.jsonl", _run(rng, 10, "img"))
    assert run_score(preds, "--tune-on", preds, "--out", tmp_path / "out") == 2
    assert "is also scored" in capsys.readouterr().err


def test_probabilities_that_do_not_sum_to_one_are_refused_naming_the_line(tmp_path, capsys):
    bad = fer(0, "Anger", "Anger.", p_expression={e: 0.5 for e in EXPRESSIONS})
    preds = write_jsonl(tmp_path / "run" / "predictions.jsonl", [bad])
    assert run_score(preds, "--out", tmp_path / "out") == 2
    assert "predictions.jsonl:1" in capsys.readouterr().err


def test_the_validation_split_shares_no_image_with_training_or_held_out_subjects(tmp_path):
    from feallm_llava.cli import main
    from feallm_llava.data.synthetic import write_affwild2
    from feallm_llava.eval.validation_split import write_validation_split

    root = write_affwild2(tmp_path / "aw", 8, 10, seed=0, size=32, progress=False).root
    assert main(["build-dataset", "--root", str(root), "--out", str(tmp_path / "fea"), "--annotator", "template",
                 "--train-size", "30", "--eval-size", "10", "--no-progress"]) == 0
    n = write_validation_split(root, tmp_path / "fea", tmp_path / "val.json", size=20)
    val = json.loads((tmp_path / "val.json").read_text())
    train = json.loads((tmp_path / "fea" / "train.json").read_text())
    held = json.loads((tmp_path / "fea" / "eval.json").read_text())
    assert n == len(val) > 0
    assert not {v["image"] for v in val} & ({s["image"] for s in train} | {t["image"] for t in held})
    assert not {v["subject"] for v in val} & {t["subject"] for t in held}
    assert {v["image"].split("/")[0] for v in val} <= {s["image"].split("/")[0] for s in train}
