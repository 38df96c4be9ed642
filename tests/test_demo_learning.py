"""The demo's pipeline learns: a learning test, not a snapshot.

`feallm demo --until readout` with the demo's own settings: synthetic FACS faces in
Aff-Wild2's layout -> `feallm build-dataset` -> the tiny kit -> the text warm-up ->
stage 1 through upstream's `llava.train.train_mem --mm_projector_type feallm` ->
upstream's loader -> the stage-1 checkpoint captions the faces of held-out subjects, and
the captions are parsed back into an expression and AUs. A projector that passed nothing
of the image on would score the blind baselines (most frequent expression: 0.16; every
AU always on: 0.38). The readouts measured at the demo's step counts are in
docs/results.md (after 600 steps: 0.36 / 0.43, too close to the AU baseline for a test
that must not flake).
"""

from __future__ import annotations

import json

from feallm_llava.demo.config import DemoConfig
from feallm_llava.demo.pipeline import blind_baselines, run_demo


def test_stage1_captions_of_held_out_faces_beat_the_blind_baselines(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the demo's own thread count
    run = run_demo(tmp_path / "demo", DemoConfig(), until="readout")
    assert not run.done("stage2-feallm")  # stopped where asked

    truth = json.loads((run.out / "fea" / "eval.json").read_text())
    train_subjects = {s["image"].split("/")[0] for s in json.loads((run.out / "fea" / "train.json").read_text())}
    assert not train_subjects & {t["subject"] for t in truth}  # held-out subjects only

    blind = blind_baselines(truth)
    scores = json.loads((run.out / "readout" / "feallm" / "scores.json").read_text())
    assert scores["items"] == len([t for t in truth if t.get("expression")])
    assert scores["fe_accuracy"] >= 2 * blind["fe"], (scores, blind)
    assert scores["mean_au_f1"] >= blind["au"] + 0.10, (scores, blind)
