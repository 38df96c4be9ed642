"""Probabilities from the backends: the LLaVA runner's shared-prefix scoring, `feallm eval
--scores`, and an OpenAI-compatible server that gives no log-probabilities, refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from feallm_llava.cli import main as cli
from feallm_llava.eval.items import EvalItem
from feallm_llava.facs.labels import AUS, EXPRESSIONS, au_key
from feallm_llava.inference.llava_runner import LlavaBackend
from feallm_llava.inference.openai_client import BackendError, OpenAIBackend
from feallm_llava.inference.scores import Scorer
from feallm_llava.testing.fake_openai import start_fake_openai

QUESTIONS = ["Emotion?", "Which expression does this face show? Answer with one word, please."]


@pytest.fixture(scope="module")
def checkpoint(kit, tmp_path_factory):
    from feallm_llava.tinykit import build_llava

    return build_llava(tmp_path_factory.mktemp("ckpt") / "tiny-llava-feallm", kit)


@pytest.fixture(scope="module")
def backend(checkpoint):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LlavaBackend(str(checkpoint), device="cpu", max_new_tokens=8)
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    out = []
    for i in range(5):
        path = root / f"face{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + 6 * i, 50, 3), dtype=np.uint8)).save(path)
        out.append(EvalItem(id=f"f{i}", image=str(path), task="fer", question=QUESTIONS[i % 2], bench="t",
                            gt_expression="Neutral"))
    return out


def _full_forward_logprob(backend, item, text) -> float:
    """The reference: prompt + answer through the model's own forward, image included."""
    from llava.mm_utils import process_images

    answer = backend.continuation_ids(item, text)
    ids = torch.cat([backend.prompt_ids(item), answer])[None]
    image = item.load_image()
    pixels = process_images([image], backend.image_processor, backend.model.config).to(dtype=backend.dtype)
    with torch.no_grad():
        logits = backend.model(input_ids=ids, images=pixels, image_sizes=[image.size]).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    n, length = len(answer), logp.shape[0]
    return float(sum(logp[length - n - 1 + j, answer[j]] for j in range(n)))


def test_shared_prefix_scores_equal_a_full_forward_of_prompt_and_answer(backend, items):
    texts = ["Happiness", "Sadness", "Neutral. The face is calm."]
    got = backend.continuation_logprobs(items, [texts] * len(items))  # one batch, padded prompts
    for item, row in zip(items, got):
        assert row == pytest.approx([_full_forward_logprob(backend, item, t) for t in texts], abs=1e-4)
    assert len({round(r[0], 4) for r in got}) > 1  # the scores depend on the image: the check can fail


def test_expression_probabilities_sum_to_one_and_do_not_depend_on_the_batch(backend, items):
    alone = {i.id: p for i in items for i_, p in Scorer(backend, batch_size=1).expressions([i]).items()}
    batched = Scorer(backend, batch_size=4).expressions(items)
    for item in items:
        assert sum(batched[item.id].values()) == pytest.approx(1.0)
        assert list(batched[item.id]) == list(EXPRESSIONS)
        assert [batched[item.id][e] for e in EXPRESSIONS] == pytest.approx(
            [alone[item.id][e] for e in EXPRESSIONS], abs=1e-5)


def test_eval_scores_writes_probabilities_that_score_reads(checkpoint, kit, tmp_path):
    data = tmp_path / "fea"
    data.mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
        rows.append({"id": f"s{i}_{i}", "image": f"{i}.png", "expression": EXPRESSIONS[i], "aus": [6, 12][:i],
                     "subject": f"s{i}"})
    (data / "eval.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    assert cli(["eval", "--bench", "feabench", "--data", str(data), "--model-path", str(checkpoint),
                "--device", "cpu", "--max-new-tokens", "6", "--scores", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    fer = [x for x in lines if x["task"] == "fer"]
    aud = [x for x in lines if x["task"] == "aud"]
    assert len(fer) == len(aud) == 3
    assert all(sum(x["p_expression"].values()) == pytest.approx(1.0) for x in fer)
    assert all(set(x["p_aus"]) == {au_key(a) for a in AUS} and all(0 <= p <= 1 for p in x["p_aus"].values())
               for x in aud)
    assert cli(["score", str(out / "predictions.jsonl"), "--out", str(tmp_path / "report")]) == 0
    (row,) = json.loads((tmp_path / "report" / "scores.json").read_text())["rows"]
    argmax = [max(x["p_expression"], key=x["p_expression"].get) == x["gt_expression"] for x in fer]
    assert row["fer_prob"]["accuracy"] == pytest.approx(np.mean(argmax))


def test_a_server_without_prompt_logprobs_is_refused_clearly(items):
    with start_fake_openai(lambda req: "Happiness.") as server:
        backend = OpenAIBackend("fake-vlm", base_url=server.base_url)
        with pytest.raises(BackendError, match="no prompt log-probabilities"):
            list(backend.score(items[:1], list(EXPRESSIONS)))
