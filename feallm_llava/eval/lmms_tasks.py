"""`feallm lmms-tasks`: a benchmark as lmms-eval tasks, scored by our parser and metrics.

    feallm lmms-tasks --bench feabench --data playground/data/fea --out runs/lmms-tasks
    lmms-eval --model llava --model_args pretrained=liuhaotian/llava-v1.5-7b \\
        --include_path runs/lmms-tasks --tasks feallm_feabench_fer,feallm_feabench_au
    # a FEALLM LoRA checkpoint as trained (lmms-eval's llava takes no base): our model
    lmms-eval --model feallm --model_args pretrained=CKPT,model_base=BASE --include_path runs/lmms-tasks ...

The benchmark is read with our own readers (`eval.benchmarks.load_items`): the same
items, the same questions (sampled from our templates with `--seed`) and the same
`--limit` as `feallm eval` asks. Written to `--out`, an lmms-eval include path:

    feallm_<bench>_fer.jsonl / .yaml   the FER items and their task (FEABench, RAF-DB, AffectNet)
    feallm_<bench>_fer_mc.yaml         the FER items as multiple choice over the 7 labels
    feallm_<bench>_au.jsonl / .yaml    the AUD items and their task (FEABench, BP4D, DISFA)
    utils.py                           the hooks the YAMLs name: a shim importing this module

Several benchmarks may share one folder. A task's `process_results` keeps each answer as
a `predictions.jsonl` record (plus what our parser read in it); its aggregations score
the records with `feallm score`'s own code (`eval.score.score_row`: `facs.parse` and
`eval.metrics`), so lmms-eval reports the numbers `feallm score` reports for the same
answers: FER `accuracy` (a parse failure is wrong) and `parse_failures`; AUD `mean_f1`
(per-AU F1, counts summed over items, unweighted mean over the benchmark's AUs),
`parse_failures` and `f1_AUxx` per AU. Fractions in [0, 1], as in scores.json.

This module does not import lmms_eval: the hooks need only feallm_llava.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from feallm_llava import __version__
from feallm_llava.errors import EXIT_ITEMS_FAILED
from feallm_llava.eval import report
from feallm_llava.eval.items import EvalItem
from feallm_llava.eval.run import add_benchmark_arguments, load_benchmark, prediction_record
from feallm_llava.eval.score import PredictionsError, group_rows, prediction, score_row, scored_record
from feallm_llava.facs.labels import AUS, EXPRESSIONS, au_key

EXAMPLES = """\
  feallm lmms-tasks --bench feabench --data playground/data/fea --out runs/lmms-tasks
  lmms-eval --model llava --model_args pretrained=liuhaotian/llava-v1.5-7b --include_path runs/lmms-tasks \\
      --tasks feallm_feabench_fer,feallm_feabench_au --output_path runs/lmms-eval
  lmms-eval --model feallm --model_args pretrained=checkpoints/feallm-llava-v1.5-7b-lora,model_base=lmsys/vicuna-7b-v1.5 \\
      --batch_size 8 --include_path runs/lmms-tasks --tasks feallm_feabench_fer,feallm_feabench_au
  feallm lmms-tasks --bench bp4d --data /data/BP4D --folds 3 --out runs/lmms-tasks"""

# Our task names ("fer", "aud") -> the suffix of the lmms-eval task name.
SUFFIX = {"fer": "fer", "aud": "au"}
# The model name the records carry (lmms-eval does not tell process_results the model).
MODEL = "lmms-eval"

# What the include folder's utils.py imports: the hooks its YAMLs name.
__all__ = ["doc_to_visual", "doc_to_text", "doc_to_target", "doc_to_label_index", "process_results",
           "fer_accuracy", "fer_parse_failures", "au_mean_f1", "au_parse_failures",
           "au_f1_AU01", "au_f1_AU02", "au_f1_AU04", "au_f1_AU06", "au_f1_AU07", "au_f1_AU10",
           "au_f1_AU12", "au_f1_AU15", "au_f1_AU23", "au_f1_AU24", "au_f1_AU25", "au_f1_AU26"]


def task_name(bench: str, task: str) -> str:
    """The lmms-eval task of a benchmark's FER or AUD items: feallm_<bench>_fer / _au."""
    return f"feallm_{bench}_{SUFFIX[task]}"


# ----------------------------------------------------------------------------- the hooks

def item_from_doc(doc: dict) -> EvalItem:
    """The EvalItem an lmms-eval doc (one line of our JSONL) was written from."""
    return EvalItem(
        id=str(doc["id"]), image=doc["image"], task=doc["task"], question=doc["question"], bench=doc["bench"],
        gt_expression=doc.get("gt_expression"),
        gt_aus=tuple(doc["gt_aus"]) if doc.get("gt_aus") is not None else None,
        au_targets=tuple(doc.get("au_targets") or ()),
        crop=tuple(doc["crop"]) if doc.get("crop") is not None else None,
    )


def doc_to_visual(doc: dict) -> list:
    """The image the model sees, cut to the face box when the benchmark gives one."""
    return [item_from_doc(doc).load_image()]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question; a model's `pre_prompt` / `post_prompt` (lmms_eval_specific_kwargs)
    around it when the task YAML is given some (ours gives none)."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc: dict) -> str:
    """The ground truth as text: the expression, or the active AUs ("none" when none is)."""
    if doc["task"] == "fer":
        return doc["gt_expression"]
    return ", ".join(au_key(au) for au in doc["gt_aus"]) or "none"


def doc_to_label_index(doc: dict) -> int:
    """The multiple-choice target: the ground-truth expression's index among the choices
    (EXPRESSIONS, the order `feallm_<bench>_fer_mc` lists them in)."""
    return EXPRESSIONS.index(doc["gt_expression"])


def process_results(doc: dict, results: list) -> dict[str, dict]:
    """One answer -> its predictions record under every metric of the task (each
    aggregation scores the whole list). `parsed` is what our parser read in the answer
    (None: a parse failure), for whoever reads the logged samples."""
    item = item_from_doc(doc)
    answer = results[0] if results else ""
    answer = answer if isinstance(answer, str) else str(answer)
    record = prediction_record(item, answer, MODEL)
    parsed, _ = prediction(item.task, answer, item.au_targets)
    record["parsed"] = sorted(parsed) if isinstance(parsed, set) else parsed
    return {metric: record for metric in metric_names(item.task, item.au_targets)}


def metric_names(task: str, aus: tuple[int, ...] = ()) -> list[str]:
    """The metrics of a FER task, or of an AUD task scoring `aus`."""
    if task == "fer":
        return ["accuracy", "parse_failures"]
    return ["mean_f1", "parse_failures", *(f"f1_{au_key(au)}" for au in sorted(aus))]


_last_row: tuple[tuple, report.ReportRow] | None = None


def score_records(records: list[dict]) -> report.ReportRow:
    """One task's records scored as `feallm score` scores a predictions file.
    (Every metric of a task aggregates the same records: scored once.)"""
    global _last_row
    key = tuple((r.get("bench"), r.get("id"), r.get("task"), r.get("answer"), r.get("gt_expression"),
                 tuple(r.get("gt_aus") or ()), tuple(r.get("au_targets") or ())) for r in records)
    if _last_row is None or _last_row[0] != key:
        items = [scored_record(r, MODEL, i, MODEL, MODEL) for i, r in enumerate(records, start=1)]
        rows = [score_row(group, []) for group in group_rows(items).values()]
        if len(rows) != 1:
            raise PredictionsError(f"one lmms-eval task must hold one benchmark, got {len(rows)}: "
                                   f"{', '.join(row.bench for row in rows)}")
        _last_row = (key, rows[0])
    return _last_row[1]


def fer_accuracy(records: list[dict]) -> float:
    return score_records(records).fer.accuracy


def fer_parse_failures(records: list[dict]) -> int:
    return score_records(records).fer.parse_failures


def au_mean_f1(records: list[dict]) -> float:
    return score_records(records).aud.mean_f1


def au_parse_failures(records: list[dict]) -> int:
    return score_records(records).aud.parse_failures


def _au_f1(au: int):
    def f1(records: list[dict]) -> float:
        """F1 of one AU (a benchmark that does not score it reports 0.0)."""
        return score_records(records).aud.f1.get(au, 0.0)
    f1.__name__ = f1.__qualname__ = f"au_f1_{au_key(au)}"
    return f1


# one per AU of labels.AUS, in its order (each knows its name: tested)
(au_f1_AU01, au_f1_AU02, au_f1_AU04, au_f1_AU06, au_f1_AU07, au_f1_AU10,
 au_f1_AU12, au_f1_AU15, au_f1_AU23, au_f1_AU24, au_f1_AU25, au_f1_AU26) = (_au_f1(au) for au in AUS)


# ----------------------------------------------------------------------------- the folder

UTILS = '''\
"""lmms-eval's hooks for the feallm_* tasks beside this file (`!function utils.NAME`).

Written by `feallm lmms-tasks`; the code is feallm_llava's (feallm_llava.eval.lmms_tasks),
so these tasks score with the parser and metrics of `feallm score`.
"""
from feallm_llava.eval.lmms_tasks import *  # noqa: F401,F403
'''


def _metric_yaml(task: str, aus: tuple[int, ...]) -> str:
    hooks = {"accuracy": "fer_accuracy", "mean_f1": "au_mean_f1",
             "parse_failures": "fer_parse_failures" if task == "fer" else "au_parse_failures"}
    lines = []
    for metric in metric_names(task, aus):
        hook = hooks.get(metric) or f"au_{metric}"
        lines += [f"  - metric: {metric}", f"    aggregation: !function utils.{hook}",
                  f"    higher_is_better: {'false' if metric == 'parse_failures' else 'true'}"]
    return "\n".join(lines)


def _dataset_yaml(name: str, items_file: Path) -> str:
    """The task's name and its items, a local JSONL file, as lmms-eval's `json` dataset."""
    return f"""\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(items_file))}
test_split: test"""


def task_yaml(name: str, bench_title: str, task: str, items_file: Path, aus: tuple[int, ...],
              max_new_tokens: int, provenance: dict) -> str:
    what = "facial expression recognition" if task == "fer" else "action unit detection"
    return f"""\
# Written by `feallm lmms-tasks` (feallm-llava {__version__}): {bench_title}, {what}.
# Items and questions as `feallm eval` asks them; scored as `feallm score` scores
# (feallm_llava.eval.lmms_tasks). Regenerate rather than edit.
{_dataset_yaml(name, items_file)}
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
process_results: !function utils.process_results
metric_list:
{_metric_yaml(task, aus)}
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
metadata:
  version: 1.0
  feallm: {json.dumps(provenance, sort_keys=True)}
"""


def mc_task_yaml(name: str, bench_title: str, items_file: Path, provenance: dict) -> str:
    """FER as lmms-eval's multiple_choice: one loglikelihood request per expression, the
    label right after the question; accuracy = the most likely label is the truth (what
    `feallm score` reports as the likelihood FE accuracy of `feallm eval --scores`)."""
    return f"""\
# Written by `feallm lmms-tasks` (feallm-llava {__version__}): {bench_title}, facial expression
# recognition as multiple choice over the 7 labels (summed log-likelihood of each label).
# Regenerate rather than edit.
{_dataset_yaml(name, items_file)}
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: {json.dumps(list(EXPRESSIONS))}
doc_to_target: !function utils.doc_to_label_index
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  feallm: {json.dumps(provenance, sort_keys=True)}
"""


def write_tasks(args: argparse.Namespace) -> dict:
    """Read the benchmark and write its tasks to args.out; returns what was written."""
    loaded, items = load_benchmark(args)
    bench = loaded.bench
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    provenance = {"bench": bench.name, "data": str(Path(args.data).resolve()), "seed": args.seed,
                  "limit": args.limit, "items_in_benchmark": len(loaded.items)}
    tasks = {}
    for task in bench.tasks:
        mine = [item for item in items if item.task == task]
        if not mine:  # --limit cut them all
            continue
        name = task_name(bench.name, task)
        items_file = out / f"{name}.jsonl"
        with items_file.open("w", encoding="utf-8") as f:
            for item in mine:
                f.write(json.dumps({**item.record(), "crop": list(item.crop) if item.crop else None},
                                   ensure_ascii=False) + "\n")
        (out / f"{name}.yaml").write_text(
            task_yaml(name, bench.title, task, items_file, bench.aus, args.max_new_tokens, provenance),
            encoding="utf-8")
        tasks[name] = len(mine)
        if task == "fer":  # the same items as multiple choice over the labels
            mc = f"{name}_mc"
            (out / f"{mc}.yaml").write_text(mc_task_yaml(mc, bench.title, items_file, provenance), encoding="utf-8")
            tasks[mc] = len(mine)
    (out / "utils.py").write_text(UTILS, encoding="utf-8")
    return {"bench": bench.name, "out": str(out), "tasks": tasks,
            "dropped": dict(sorted(loaded.dropped.items())), **provenance}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_benchmark_arguments(parser)
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, type=Path,
                   help="the include-path folder (lmms-eval --include_path); may hold several benchmarks")
    g.add_argument("--max-new-tokens", type=int, default=256,
                   help="generation_kwargs.max_new_tokens of the tasks (feallm eval's answer length limit)")


def main(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    summary = write_tasks(args)
    for name, count in summary["tasks"].items():
        print(f"{name}: {count} items -> {Path(summary['out']) / name}.yaml")
    names = ",".join(summary["tasks"])
    print(f"run: lmms-eval --model MODEL --model_args ... --include_path {summary['out']} --tasks {names}")
    missing = summary["dropped"].get("missing image", 0)
    if missing:  # with --skip-missing
        print(f"feallm lmms-tasks: {missing} item(s) skipped for a missing image (--skip-missing)", file=sys.stderr)
        return EXIT_ITEMS_FAILED
    return 0
