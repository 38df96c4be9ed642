"""`feallm analyze`'s probability columns (p_<Expression>, AUxx_p), smoothing that votes on
them, and the UI's bars."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from feallm_llava.facs.labels import AUS, EXPRESSIONS, au_key
from feallm_llava.serve.analyzer import SMOOTHED_PROBABILITIES, Analyzer, Source
from feallm_llava.serve.rows import COLUMNS, P_AU_COLUMNS, P_EXPRESSION_COLUMNS
from feallm_llava.serve.temporal import Smoother


@pytest.fixture(scope="module")
def backend(kit, tmp_path_factory):
    from feallm_llava.inference.llava_runner import LlavaBackend
    from feallm_llava.tinykit import build_llava

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    checkpoint = build_llava(tmp_path_factory.mktemp("ckpt") / "tiny-llava-feallm", kit)
    yield LlavaBackend(str(checkpoint), device="cpu", max_new_tokens=6)
    torch.set_num_threads(before)


def test_rows_carry_the_runners_probabilities(backend, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"face{i}.png")
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(paths[-1])
    analyzer = Analyzer(backend, detect=False, reasoning="none")
    rows = list(analyzer.iter_rows([Source(p.name, path=p) for p in paths], progress=False))
    assert len(rows) == 2 and list(rows[0]) == list(COLUMNS)
    for row in rows:
        assert not row["error"]
        assert sum(row[c] for c in P_EXPRESSION_COLUMNS) == pytest.approx(1.0)
        assert all(0.0 <= row[c] <= 1.0 for c in P_AU_COLUMNS)
    assert rows[0]["p_Anger"] != rows[1]["p_Anger"]  # per face: the check can fail


def test_a_backend_without_scoring_leaves_the_columns_empty():
    class Texts:
        def generate(self, queries):
            return ["Happiness. AU06 and AU12." for _ in queries]

    analyzer = Analyzer(Texts(), detect=False, reasoning="none")
    (row,) = analyzer.iter_rows([Source("x", image=Image.new("RGB", (32, 32)))], progress=False)
    assert row["expression"] == "Happiness" and all(row[c] is None for c in (*P_EXPRESSION_COLUMNS, *P_AU_COLUMNS))


def _frame(expression: str, p_expression: dict[str, float], au12: int, p12: float) -> dict:
    own = {"expression": expression, **{au_key(a): 0 for a in AUS}, "AU12": au12}
    own.update({f"p_{e}": p_expression.get(e, 0.0) for e in EXPRESSIONS})
    own.update({f"{au_key(a)}_p": 0.1 for a in AUS})
    own["AU12_p"] = p12
    return own


def test_smoothing_votes_on_mean_probabilities_when_rows_have_them():
    # two of three frames say Sadness narrowly; one says Happiness with confidence: the mean says Happiness
    frames = [_frame("Sadness", {"Sadness": 0.51, "Happiness": 0.49}, 1, 0.55),
              _frame("Happiness", {"Happiness": 0.98, "Sadness": 0.02}, 0, 0.05),
              _frame("Sadness", {"Sadness": 0.51, "Happiness": 0.49}, 1, 0.55)]
    out = {}
    smoother = Smoother(3, readings=lambda u: {0: u}, apply=lambda u, s: out.setdefault(id(u), s[0]),
                        resumed=lambda u: False, probabilities=SMOOTHED_PROBABILITIES)
    for f in frames:
        smoother.push(f)
    smoother.finish()
    middle = out[id(frames[1])]
    assert middle["expression"] == "Happiness"          # a majority vote would say Sadness
    assert middle["AU12"] == int((0.55 + 0.05 + 0.55) / 3 >= 0.5)
    assert "p_Happiness" not in middle                   # the probability columns stay the frame's own
    plain = Smoother(3, readings=lambda u: {0: u}, apply=lambda u, s: out.__setitem__(("plain", id(u)), s[0]),
                     resumed=lambda u: False)
    for f in frames:
        plain.push(f)
    plain.finish()
    assert out[("plain", id(frames[1]))]["expression"] == "Sadness"


def test_the_ui_shows_probabilities_as_bars():
    from feallm_llava.ui.faces import probability_bars

    row = {f"p_{e}": 0.0 for e in EXPRESSIONS} | {"p_Happiness": 0.75, "AU12_p": 0.5}
    text = probability_bars(row)
    assert "Happiness: `" + "█" * 15 + "░" * 5 + "` 0.75" in text and "AU12 Lip Corner Puller" in text
    assert probability_bars({}) == ""
