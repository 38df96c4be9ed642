"""FEABench and the zero-shot FER/AU sets as lmms-eval tasks, scored by our parser.

`feallm lmms-tasks` writes an include-path folder from our own readers; lmms-eval runs
it as a subprocess, offline, from its own environment (.venv-lmms; launch/test.sh makes it): its built-in `llava` model on a tiny FEALLM checkpoint
trained through upstream's train_mem (merged, since `--model llava` takes no base), our
`feallm` model (the `lmms_eval.models` entry point) on the LoRA checkpoint as trained,
and lmms-eval's `from_log` model replaying crafted answers. Whatever the answers,
lmms-eval must report the numbers `feallm score` computes from the same answers, to
the last digit.
"""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from feallm_llava.cli import main
from feallm_llava.eval import lmms_tasks
from feallm_llava.eval.benchmarks import load_items
from feallm_llava.eval.readers.bp4d import BP4D_AUS
from feallm_llava.facs.labels import AUS, EXPRESSIONS, au_key
from tests.test_readers import _affectnet_csv, _bp4d, _rafdb

REPO = Path(__file__).resolve().parents[1]


def find_lmms_eval() -> Path:
    """lmms-eval of its own environment (`launch/bootstrap.sh --env lmms`), else of this one."""
    venv = Path(os.environ.get("FEALLM_LMMS_VENV") or REPO / ".venv-lmms")
    own = venv / "bin" / "lmms-eval"
    return own if own.is_file() else Path(sys.executable).with_name("lmms-eval")


LMMS_EVAL = find_lmms_eval()
needs_lmms_eval = pytest.mark.skipif(not LMMS_EVAL.is_file(), reason="no lmms-eval: `bash launch/bootstrap.sh "
                                     "--env lmms` makes .venv-lmms (launch/test.sh does)")
ENTRY_POINT = "feallm = feallm_llava.eval.lmms_model:manifest"
TASKS = "feallm_feabench_fer,feallm_feabench_au"


# -- data -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def feabench(tmp_path_factory) -> Path:
    """FEABench's eval.json as `feallm build-dataset` writes it, from synthetic Aff-Wild2 faces."""
    from feallm_llava.data.synthetic import write_affwild2

    base = tmp_path_factory.mktemp("feabench")
    root = write_affwild2(base / "aw", 6, 10, seed=0, size=48, progress=False).root
    assert main(["build-dataset", "--root", str(root), "--out", str(base / "fea"), "--annotator", "template",
                 "--train-size", "10", "--eval-size", "24", "--no-progress"]) == 0
    return base / "fea"


@pytest.fixture(scope="module")
def tasks_dir(feabench, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lmms-tasks")
    assert main(["lmms-tasks", "--bench", "feabench", "--data", str(feabench), "--out", str(out),
                 "--max-new-tokens", "24"]) == 0
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_the_folder_holds_the_items_feallm_eval_asks(feabench, tasks_dir):
    assert sorted(p.name for p in tasks_dir.iterdir()) == [
        "feallm_feabench_au.jsonl", "feallm_feabench_au.yaml", "feallm_feabench_fer.jsonl",
        "feallm_feabench_fer.yaml", "feallm_feabench_fer_mc.yaml", "utils.py"]
    items = load_items("feabench", feabench).items  # as `feallm eval` builds them (seed 0)
    for task, suffix in (("fer", "fer"), ("aud", "au")):
        docs = read_jsonl(tasks_dir / f"feallm_feabench_{suffix}.jsonl")
        assert [lmms_tasks.item_from_doc(d) for d in docs] == [i for i in items if i.task == task]
        yaml_text = (tasks_dir / f"feallm_feabench_{suffix}.yaml").read_text()
        assert f"task: feallm_feabench_{suffix}\n" in yaml_text
        assert json.dumps(str(tasks_dir / f"feallm_feabench_{suffix}.jsonl")) in yaml_text
        assert "max_new_tokens: 24" in yaml_text and "process_results: !function utils.process_results" in yaml_text
    assert "from feallm_llava.eval.lmms_tasks import *" in (tasks_dir / "utils.py").read_text()


def test_every_hook_the_yamls_may_name_is_exported():
    assert [f"au_f1_{au_key(a)}" for a in AUS] == lmms_tasks.__all__[-len(AUS):]
    assert all(getattr(lmms_tasks, name).__name__ == name for name in lmms_tasks.__all__)


def test_only_the_tasks_a_benchmark_has_and_its_aus(tmp_path, capsys):
    _rafdb(tmp_path / "raf")
    assert main(["lmms-tasks", "--bench", "rafdb", "--data", str(tmp_path / "raf"), "--out", str(tmp_path / "t")]) == 0
    _bp4d(tmp_path / "bp4d", frames=60)
    assert main(["lmms-tasks", "--bench", "bp4d", "--data", str(tmp_path / "bp4d"), "--out", str(tmp_path / "t")]) == 0
    names = sorted(p.name for p in (tmp_path / "t").glob("*.yaml"))
    assert names == ["feallm_bp4d_au.yaml", "feallm_rafdb_fer.yaml", "feallm_rafdb_fer_mc.yaml"]  # one folder
    bp4d_yaml = (tmp_path / "t" / "feallm_bp4d_au.yaml").read_text()
    assert [f"f1_{au_key(a)}" for a in BP4D_AUS] == [line.split(": ")[1] for line in bp4d_yaml.splitlines()
                                                    if line.startswith("  - metric: f1_")]
    assert "feallm_rafdb_fer: 3 items" in capsys.readouterr().out


def test_skipped_missing_images_are_counted_and_exit_1(tmp_path, capsys):
    _rafdb(tmp_path / "raf", missing=("test_0002",))
    assert main(["lmms-tasks", "--bench", "rafdb", "--data", str(tmp_path / "raf"), "--out", str(tmp_path / "t")]) == 2
    assert main(["lmms-tasks", "--bench", "rafdb", "--data", str(tmp_path / "raf"), "--out", str(tmp_path / "t"),
                 "--skip-missing"]) == 1
    assert "1 item(s) skipped for a missing image" in capsys.readouterr().err
    assert [d["id"] for d in read_jsonl(tmp_path / "t" / "feallm_rafdb_fer.jsonl")] == ["test_0001", "test_0003"]


def test_a_face_box_reaches_the_model_as_feallm_eval_cuts_it(tmp_path):
    _affectnet_csv(tmp_path / "an")
    assert main(["lmms-tasks", "--bench", "affectnet", "--data", str(tmp_path / "an"), "--out", str(tmp_path / "t"),
                 "--limit", "2"]) == 0
    docs = read_jsonl(tmp_path / "t" / "feallm_affectnet_fer.jsonl")
    assert len(docs) == 2 and docs[0]["crop"] == [4, 2, 10, 12]
    (image,) = lmms_tasks.doc_to_visual(docs[0])
    assert image.size == (10, 12)
    assert image.tobytes() == lmms_tasks.item_from_doc(docs[0]).load_image().tobytes()


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["lmms-tasks", "--bench", "feabench", "--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "feallm lmms-tasks: error:" in err and str(tmp_path / "none") in err


# -- agreement with `feallm score` --------------------------------------------------------

def crafted_answer(doc: dict, k: int) -> str:
    """Answers of every kind the parser meets: right, wrong, tied, negated, none named."""
    if doc["task"] == "fer":
        gt = doc["gt_expression"]
        other = EXPRESSIONS[(EXPRESSIONS.index(gt) + 1 + k) % len(EXPRESSIONS)]
        return [f"The expression is {gt}.", f"This face shows {other.lower()}.",
                f"It could be {gt.lower()} or {other.lower()}.", "I cannot tell from this image.",
                f"Not {other.lower()}: {gt.lower()}.", f"{other}. The brows suggest {gt.lower()}."][k % 6]
    gt = doc["gt_aus"]
    wrong = [a for a in AUS if a not in gt][k % 3]
    return [", ".join(au_key(a) for a in gt) or "No action units are active.",
            f"Active: {', '.join(f'AU {a}' for a in gt[:1])}, AU{wrong}.",
            "The face is relaxed.", "No action units are active.",
            f"AU{wrong} is not active; " + " and ".join(f"action unit {a}" for a in gt) + ".",
            f"Lip corner puller, cheek raiser; AU{gt[-1] if gt else wrong:02d}."][k % 6]


def score_as_feallm_score(tasks_dir: Path, answers: dict[str, list[str]], out: Path) -> dict:
    """`feallm score` on predictions.jsonl made of the items and the answers; its scores.json row."""
    lines = []
    for name, task_answers in answers.items():
        for doc, answer in zip(read_jsonl(tasks_dir / f"{name}.jsonl"), task_answers):
            lines.append(json.dumps({**doc, "answer": answer, "model": "m"}))
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["score", str(out / "predictions.jsonl"), "--out", str(out / "report")]) == 0
    (row,) = json.loads((out / "report" / "scores.json").read_text())["rows"]
    return row


def expected(row: dict) -> dict[str, dict]:
    """lmms-eval's metric names -> the values of a scores.json row."""
    return {
        "feallm_feabench_fer": {"accuracy": row["fer"]["accuracy"], "parse_failures": row["fer"]["parse_failures"]},
        "feallm_feabench_au": {"mean_f1": row["aud"]["mean_f1"], "parse_failures": row["aud"]["parse_failures"],
                               **{f"f1_{k}": v for k, v in row["aud"]["f1"].items()}},
    }


def crafted(tasks_dir: Path) -> dict[str, list[str]]:
    return {name: [crafted_answer(d, k) for k, d in enumerate(read_jsonl(tasks_dir / f"{name}.jsonl"))]
            for name in TASKS.split(",")}


def test_the_hooks_score_as_feallm_score_does(tasks_dir, tmp_path):
    answers = crafted(tasks_dir)
    want = expected(score_as_feallm_score(tasks_dir, answers, tmp_path))
    assert 0 < want["feallm_feabench_fer"]["accuracy"] < 1 and 0 < want["feallm_feabench_au"]["mean_f1"] < 1
    assert want["feallm_feabench_fer"]["parse_failures"] > 0 and want["feallm_feabench_au"]["parse_failures"] > 0
    for name, task_answers in answers.items():
        per_metric: dict[str, list] = {}
        for doc, answer in zip(read_jsonl(tasks_dir / f"{name}.jsonl"), task_answers):
            for metric, value in lmms_tasks.process_results(doc, [answer]).items():
                per_metric.setdefault(metric, []).append(value)
        assert set(per_metric) == set(want[name])
        failures = lmms_tasks.fer_parse_failures if name.endswith("fer") else lmms_tasks.au_parse_failures
        hooks = {"accuracy": lmms_tasks.fer_accuracy, "mean_f1": lmms_tasks.au_mean_f1, "parse_failures": failures}
        got = {m: (hooks.get(m) or getattr(lmms_tasks, f"au_{m}"))(records) for m, records in per_metric.items()}
        assert got == want[name]


def test_records_of_two_benchmarks_in_one_task_are_refused(tasks_dir):
    doc = read_jsonl(tasks_dir / "feallm_feabench_fer.jsonl")[0]
    records = [lmms_tasks.process_results(d, ["Happiness"])["accuracy"] for d in (doc, {**doc, "bench": "rafdb"})]
    with pytest.raises(ValueError, match="one benchmark"):
        lmms_tasks.fer_accuracy(records)


# -- lmms-eval itself, as a subprocess ------------------------------------------------------

def lmms_eval(tasks_dir: Path, out: Path, *args: str, extra_path: str = "", timeout: int = 600, tasks: str = TASKS):
    """Run lmms-eval offline; returns (stdout, results.json)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(out / "hf-datasets"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), extra_path, os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [str(LMMS_EVAL), *args, "--include_path", str(tasks_dir), "--tasks", tasks,
           "--output_path", str(out / "results"), "--log_samples", "--verbosity", "INFO"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = sorted((out / "results").rglob("*_results.json"))
    assert found, f"no results.json (lmms-eval reports a failed run with exit status 0):\n{proc.stderr[-4000:]}"
    return proc.stdout, json.loads(found[-1].read_text())


def reported(results: dict) -> dict[str, dict]:
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if k.endswith(",none") and "_stderr" not in k}
            for task, metrics in results["results"].items()}


def logged_answers(out: Path) -> dict[str, list[str]]:
    """The answers lmms-eval scored (its --log_samples), in doc order."""
    answers = {}
    for name in TASKS.split(","):
        (path,) = (out / "results").rglob(f"*_samples_{name}.jsonl")
        samples = sorted(read_jsonl(path), key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == list(range(len(samples)))
        answers[name] = [s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0]
                         for s in samples]
    return answers


@needs_lmms_eval
def test_lmms_eval_reports_what_feallm_score_reports_for_the_same_answers(tasks_dir, tmp_path):
    """lmms-eval's own `from_log` model replays crafted answers through the whole pipeline."""
    logs = tmp_path / "logs"
    logs.mkdir()
    answers = crafted(tasks_dir)
    for name, task_answers in answers.items():
        (logs / f"{name}.json").write_text(json.dumps({
            "args": {"model": "crafted", "model_args": "", "limit": None}, "model_configs": {"task": name},
            "time": "0101_0000", "logs": [{"doc_id": i, "resps": [[a]]} for i, a in enumerate(task_answers)]}))
    stdout, results = lmms_eval(tasks_dir, tmp_path, "--model", "from_log", "--model_args", f"logs={logs}")
    assert logged_answers(tmp_path) == answers
    want = expected(score_as_feallm_score(tasks_dir, answers, tmp_path / "score"))
    assert reported(results) == want
    assert "|feallm_feabench_fer|" in stdout and "mean_f1" in stdout


@pytest.fixture(scope="module")
def checkpoint(kit, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny FEALLM LoRA checkpoint trained through upstream's train_mem, and its base."""
    from feallm_llava.recipe import TinyRecipe

    recipe = TinyRecipe(out=tmp_path_factory.mktemp("lmms-ckpt"), kit=kit.root, steps1=2, steps2=2, save_steps=10)
    recipe.run()
    assert "llava" in recipe.stage_dir(2).name
    return recipe.stage_dir(2), kit.llm


@pytest.fixture(scope="module")
def merged(checkpoint, tmp_path_factory) -> Path:
    """The LoRA merged into its base, as upstream's scripts/merge_lora_weights.py does
    (load with the base, save): lmms-eval's `llava` model passes no model_base."""
    from feallm_llava.inference.llava_runner import LlavaBackend

    out = tmp_path_factory.mktemp("merged") / "llava-tiny-feallm-merged"
    backend = LlavaBackend(str(checkpoint[0]), str(checkpoint[1]), device="cpu", dtype="float32")
    backend.model.save_pretrained(out)
    backend.tokenizer.save_pretrained(out)
    return out


@needs_lmms_eval
def test_lmms_eval_llava_runs_the_tasks_on_a_tiny_feallm_checkpoint(tasks_dir, merged, tmp_path):
    stdout, results = lmms_eval(tasks_dir, tmp_path, "--model", "llava", "--model_args",
                                f"pretrained={merged},device=cpu,device_map=auto", "--limit", "3")
    got = reported(results)
    assert set(got) == set(TASKS.split(","))
    assert {"accuracy", "parse_failures"} <= set(got["feallm_feabench_fer"])
    assert {"mean_f1", "parse_failures", *(f"f1_{au_key(a)}" for a in AUS)} <= set(got["feallm_feabench_au"])
    assert results["n-samples"]["feallm_feabench_fer"]["effective"] == 3
    assert "|feallm_feabench_fer|" in stdout and "|feallm_feabench_au |" in stdout
    # the answers it logged, scored by `feallm score`: the same numbers
    answers = logged_answers(tmp_path)
    want = expected(score_as_feallm_score(tasks_dir, answers, tmp_path / "score"))
    assert got == want


@pytest.fixture()
def entry_point(tmp_path) -> str:
    """A folder on PYTHONPATH holding a distribution that declares our entry point, as the
    installed feallm-llava does (the checkout under test may be newer than the install)."""
    dist = tmp_path / "ep" / "feallm_llava_under_test-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: feallm-llava-under-test\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[lmms_eval.models]\n{ENTRY_POINT}\n")
    return str(tmp_path / "ep")


def test_setup_cfg_declares_the_lmms_eval_model():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert ENTRY_POINT.replace(" ", "") in cfg["options.entry_points"]["lmms_eval.models"].replace(" ", "")
    assert "lmms" in cfg["options.extras_require"]


@needs_lmms_eval
def test_lmms_eval_feallm_model_answers_as_feallm_eval(tasks_dir, feabench, checkpoint, entry_point, tmp_path,
                                                         capsys):
    path, base = checkpoint
    _stdout, results = lmms_eval(tasks_dir, tmp_path, "--model", "feallm", "--model_args",
                                 f"pretrained={path},model_base={base},device=cpu,max_new_tokens=24",
                                 "--batch_size", "4", "--limit", "3", extra_path=entry_point)
    assert results["config"]["model"] == "feallm"
    # `feallm eval` on the same items (the first 3 images: 3 FER + 3 AUD items)
    assert main(["eval", "--bench", "feabench", "--data", str(feabench), "--model-path", str(path),
                 "--model-base", str(base), "--device", "cpu", "--max-new-tokens", "24", "--limit", "6",
                 "--out", str(tmp_path / "eval")]) == 0
    ours = {r["id"]: r["answer"] for r in read_jsonl(tmp_path / "eval" / "predictions.jsonl")}
    for name, answers in logged_answers(tmp_path).items():
        docs = read_jsonl(tasks_dir / f"{name}.jsonl")[:3]
        assert answers == [ours[d["id"]] for d in docs]


@needs_lmms_eval
def test_lmms_eval_multiple_choice_accuracy_equals_feallm_scores_likelihood_accuracy(
        tasks_dir, feabench, checkpoint, entry_point, tmp_path):
    """`feallm_feabench_fer_mc` (one loglikelihood request per label, argmin of our summed
    losses) and `feallm eval --scores` + `feallm score` on the same 6 FER items."""
    path, base = checkpoint
    _stdout, results = lmms_eval(tasks_dir, tmp_path, "--model", "feallm", "--model_args",
                                 f"pretrained={path},model_base={base},device=cpu", "--batch_size", "4",
                                 "--limit", "6", extra_path=entry_point, tasks="feallm_feabench_fer_mc")
    acc = reported(results)["feallm_feabench_fer_mc"]["acc"]
    assert main(["eval", "--bench", "feabench", "--data", str(feabench), "--model-path", str(path),
                 "--model-base", str(base), "--device", "cpu", "--max-new-tokens", "4", "--limit", "12",
                 "--scores", "--out", str(tmp_path / "eval")]) == 0
    fer = [r for r in read_jsonl(tmp_path / "eval" / "predictions.jsonl") if r["task"] == "fer"]
    assert [r["id"] for r in fer] == [d["id"] for d in read_jsonl(tasks_dir / "feallm_feabench_fer.jsonl")[:6]]
    assert main(["score", str(tmp_path / "eval" / "predictions.jsonl"), "--out", str(tmp_path / "score")]) == 0
    (row,) = json.loads((tmp_path / "score" / "scores.json").read_text())["rows"]
    assert acc == row["fer_prob"]["accuracy"]
    samples = read_jsonl(next((tmp_path / "results").rglob("*_samples_feallm_feabench_fer_mc.jsonl")))
    losses = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}  # (loss, is_greedy)
    for doc_id, r in enumerate(fer):  # the same numbers: loss = -log-probability, softmax over the 7
        lp = [-x for x in losses[doc_id]]
        top = max(lp)
        z = sum(2.718281828459045 ** (v - top) for v in lp)
        assert [2.718281828459045 ** (v - top) / z for v in lp] == pytest.approx(
            [r["p_expression"][e] for e in EXPRESSIONS], abs=1e-4)
