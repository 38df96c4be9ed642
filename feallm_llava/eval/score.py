"""`feallm score`: predictions.jsonl files -> scores.json, scores.csv, table.md, plots.

    feallm score run_a/predictions.jsonl run_b/predictions.jsonl --out scores/ \\
        --name FEALLM LLaVA-LoRA

Each line of a predictions file is one answered item (`feallm eval` writes them):
{"id", "image", "task": "fer"|"aud", "question", "answer", "gt_expression",
"gt_aus", "au_targets", "bench", "model"}. Items are grouped into rows by
(benchmark, model); the model name is `--name` (one per file, in file order) when
given, else the line's "model", else the name of the file's folder. Several files of
one model and benchmark (the chunks of a sharded run) merge into one row; an item id
seen twice in a row is an error.

One parser decides: every answer is parsed here, with `feallm_llava.facs.parse`, so
scores never depend on what a runner thought its answers meant (fields such as
"pred_expression" that other tools or older runs wrote are ignored).

Outputs in --out: scores.json and scores.csv (fractions), table.md (percentages, the
paper's layout), confusion.png (FER rows only), au_f1.png (AUD rows only) and
parse_failures.jsonl (every answer that parsed to nothing, to read by eye).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from feallm_llava.facs.labels import EXPRESSIONS

from feallm_llava.errors import EXIT_ITEMS_FAILED, UsageError
from feallm_llava.eval import report
from feallm_llava.eval.metrics import au_metrics, fer_metrics
from feallm_llava.eval.probabilities import au_prob_metrics, fer_prob_metrics
from feallm_llava.facs.labels import au_key
from feallm_llava.facs.parse import ParseResult, parse

TASKS = ("fer", "aud")


@dataclass(frozen=True)
class ScoredItem:
    """One predictions line, where it came from, and what the parser read from it."""
    file: str
    line: int
    id: str
    task: str
    bench: str
    model: str
    answer: str
    gt_expression: str | None
    gt_aus: frozenset[int] | None
    au_targets: tuple[int, ...]
    image: str | None = None
    p_expression: dict[str, float] | None = None   # `feallm eval --scores`: FER items
    p_aus: dict[str, float] | None = None          # `feallm eval --scores`: AUD items


class PredictionsError(UsageError):
    """A predictions line that cannot be scored; the message names file and line."""


EXAMPLES = """\
  feallm score runs/eval/*/predictions.jsonl --out runs/report
  feallm score a/predictions.jsonl b/predictions.jsonl --name FEALLM LLaVA-LoRA --out runs/report"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", nargs="+", type=Path,
                        help="predictions.jsonl files written by `feallm eval`")
    parser.add_argument("--out", type=Path, required=True, help="folder for the reports")
    parser.add_argument("--name", nargs="+", action="extend", default=None, metavar="NAME",
                        help="model name per predictions file, in file order "
                             "(default: the lines' \"model\" field, else the file's folder)")
    parser.add_argument("--tune-on", nargs="+", type=Path, default=None, metavar="VAL_PREDICTIONS",
                        help="predictions (with --scores probabilities) of a validation split: per-AU "
                             "thresholds are tuned there and their F1 reported beside the text-parsed F1; one "
                             "file for every predictions file, or one per file in order. Items whose image "
                             "is also scored are refused")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="leave out (and count) lines that cannot be scored: torn by an interrupted "
                             "writer, not JSON, fields missing; exit status 1 when any was left out")


# ----------------------------------------------------------------------------- reading

def _int_list(value: object, key: str, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                              for v in value):
        raise PredictionsError(f"{where}: {key!r} must be a list of AU numbers, got {value!r}")
    return tuple(value)


def read_predictions(path: Path, name: str | None = None,
                     skipped: list[str] | None = None) -> list[ScoredItem]:
    """Parse and check every line of one predictions file (blank lines are skipped).

    A line that cannot be scored raises PredictionsError, or, when a `skipped` list is
    given (`--skip-bad-lines`), is recorded there as "file:line: why" and left out.
    """
    if not path.is_file():
        raise PredictionsError(f"predictions file not found: {path}")
    default_model = path.resolve().parent.name or path.stem
    items = []
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                items.append(_scored_item(path, lineno, raw, name, default_model))
            except PredictionsError as err:
                if skipped is None:
                    raise
                skipped.append(str(err))
    return items


def _scored_item(path: Path, lineno: int, raw: str, name: str | None, default_model: str) -> ScoredItem:
    """One predictions line, checked."""
    where = f"{path}:{lineno}"
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as e:
        torn = "" if raw.endswith("\n") else " (the last line, cut short: an interrupted writer)"
        raise PredictionsError(f"{where}: not valid JSON ({e.msg} at column {e.colno}){torn}; "
                               "fix or delete the line, or pass --skip-bad-lines") from e
    return scored_record(rec, str(path), lineno, name, default_model)


def scored_record(rec: object, file: str, lineno: int, name: str | None, default_model: str) -> ScoredItem:
    """One predictions record (a decoded line), checked; `file:lineno` names it in errors."""
    where = f"{file}:{lineno}"
    if not isinstance(rec, dict):
        raise PredictionsError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("id", "task", "answer", "bench"):
        if key not in rec:
            raise PredictionsError(f"{where}: missing key {key!r}")
    item_id = str(rec["id"])
    where = f"{where} (id {item_id!r})"
    task = rec["task"]
    if task not in TASKS:
        raise PredictionsError(f"{where}: task {task!r} is not one of {TASKS}")
    if not isinstance(rec["answer"], str):
        raise PredictionsError(f"{where}: 'answer' must be the generated text, got "
                               f"{rec['answer']!r}; rerun the item")
    if not isinstance(rec["bench"], str) or not rec["bench"]:
        raise PredictionsError(f"{where}: 'bench' must be a benchmark name, got "
                               f"{rec['bench']!r}")
    gt_expression = gt_aus = None
    targets: tuple[int, ...] = ()
    if task == "fer":
        gt_expression = rec.get("gt_expression")
        if gt_expression not in EXPRESSIONS:
            raise PredictionsError(f"{where}: FER item needs gt_expression in "
                                   f"{', '.join(EXPRESSIONS)}, got {gt_expression!r}")
    else:
        if rec.get("gt_aus") is None or rec.get("au_targets") is None:
            raise PredictionsError(f"{where}: AUD item needs 'gt_aus' and 'au_targets'")
        gt_aus = frozenset(_int_list(rec["gt_aus"], "gt_aus", where))
        targets = tuple(sorted(set(_int_list(rec["au_targets"], "au_targets", where))))
        if not targets:
            raise PredictionsError(f"{where}: 'au_targets' is empty; nothing to score")
    model = name if name is not None else rec.get("model") or default_model
    if not isinstance(model, str):
        raise PredictionsError(f"{where}: 'model' must be a string, got {model!r}")
    p_expression = _probabilities(rec, "p_expression", EXPRESSIONS, where, normalised=True)
    p_aus = _probabilities(rec, "p_aus", [au_key(a) for a in targets], where, normalised=False)
    return ScoredItem(
        file=file, line=lineno, id=item_id, task=task, bench=rec["bench"],
        model=model, answer=rec["answer"], gt_expression=gt_expression, gt_aus=gt_aus,
        au_targets=targets, image=rec.get("image") if isinstance(rec.get("image"), str) else None,
        p_expression=p_expression, p_aus=p_aus)


def _probabilities(rec: dict, key: str, names, where: str, normalised: bool) -> dict[str, float] | None:
    """A record's probabilities under `key` (absent: None), checked: every name present, each
    a number in [0, 1], and summing to 1 when `normalised`."""
    value = rec.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise PredictionsError(f"{where}: {key!r} must be an object of probabilities, got {value!r}")
    out = {}
    for name in names:
        p = value.get(name)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise PredictionsError(f"{where}: {key!r} needs a probability in [0, 1] for {name}, got {p!r}")
        out[name] = float(p)
    if normalised and abs(sum(out.values()) - 1.0) > 1e-6:
        raise PredictionsError(f"{where}: {key!r} sums to {sum(out.values()):.6f}, not 1")
    return out


def group_rows(items: list[ScoredItem]) -> dict[tuple[str, str], list[ScoredItem]]:
    """(bench, model) -> items, in first-seen order; duplicates and mixed targets rejected."""
    groups: dict[tuple[str, str], list[ScoredItem]] = {}
    seen: dict[tuple[str, str, str, str], ScoredItem] = {}
    targets: dict[tuple[str, str], ScoredItem] = {}
    for it in items:
        key = (it.bench, it.model, it.task, it.id)
        if key in seen:
            first = seen[key]
            raise PredictionsError(
                f"{it.file}:{it.line}: item {it.id!r} ({it.task}) of model {it.model!r} on "
                f"{it.bench!r} was already scored from {first.file}:{first.line}; remove the "
                "duplicate, or give the runs different names with --name")
        seen[key] = it
        row = (it.bench, it.model)
        if it.task == "aud":
            ref = targets.setdefault(row, it)
            if ref.au_targets != it.au_targets:
                raise PredictionsError(
                    f"{it.file}:{it.line}: item {it.id!r} scores AUs {list(it.au_targets)} but "
                    f"{ref.file}:{ref.line} scores {list(ref.au_targets)} for the same model and "
                    f"benchmark ({it.model!r}, {it.bench!r}); one row needs one AU set")
        groups.setdefault(row, []).append(it)
    return groups


# ----------------------------------------------------------------------------- scoring

def prediction(task: str, answer: str, au_targets: tuple[int, ...] = ()) -> tuple[str | set[int] | None, ParseResult]:
    """What the scorer reads in an answer, and the parse behind it: a FER answer's
    expression, an AUD answer's set of AUs among `au_targets`; None is a parse failure."""
    if task == "fer":
        result = parse(answer)
        return result.expression, result
    result = parse(answer, au_targets)
    return (set(result.aus) if result.aus_answered else None), result


def _all_or_none(items: list[ScoredItem], field: str) -> bool:
    """Whether every item carries probabilities `field`; a row mixing both is an error."""
    have = [getattr(it, field) is not None for it in items]
    if any(have) and not all(have):
        it = items[have.index(False)]
        raise PredictionsError(f"{it.file}:{it.line} (id {it.id!r}): no {field!r} while other items of "
                               f"{it.model!r} on {it.bench!r} have them; rerun those items with `feallm eval --scores`")
    return bool(have) and all(have)


def score_row(items: list[ScoredItem], failures: list[dict],
              validation: list[ScoredItem] | None = None) -> report.ReportRow:
    """Parse every answer of one (bench, model) and compute its metrics; with probabilities,
    their metrics too (per-AU thresholds tuned on `validation`, other items)."""
    fer = [it for it in items if it.task == "fer"]
    aud = [it for it in items if it.task == "aud"]
    fer_metrics_, aud_metrics_, ambiguous = None, None, 0
    fer_prob = aud_prob = None

    def fail(it: ScoredItem, why: str) -> None:
        failures.append({"file": it.file, "line": it.line, "id": it.id, "model": it.model,
                         "bench": it.bench, "task": it.task, "why": why, "answer": it.answer})

    if fer:
        preds = []
        for it in fer:
            pred, result = prediction("fer", it.answer)
            preds.append(pred)
            if pred is None:
                ambiguous += result.expression_ambiguous
                fail(it, "ambiguous: " + ", ".join(f"{c} x{n}" for c, n in
                                                   result.expression_counts.items())
                     if result.expression_ambiguous else "no expression named")
        fer_metrics_ = fer_metrics([it.gt_expression for it in fer], preds)
        if _all_or_none(fer, "p_expression"):
            fer_prob = fer_prob_metrics([it.gt_expression for it in fer], [it.p_expression for it in fer])
    if aud:
        preds = []
        for it in aud:
            pred, _ = prediction("aud", it.answer, it.au_targets)
            preds.append(pred)
            if pred is None:
                fail(it, "no AU named")
        aud_metrics_ = au_metrics([it.gt_aus for it in aud], preds, aud[0].au_targets)
        if _all_or_none(aud, "p_aus"):
            val = None
            if validation is not None:
                val = ([it.gt_aus for it in validation], [it.p_aus for it in validation])
            aud_prob = au_prob_metrics([it.gt_aus for it in aud], [it.p_aus for it in aud], aud[0].au_targets,
                                       val, tuple(dict.fromkeys(it.file for it in validation or ())))
    return report.ReportRow(
        model=items[0].model, bench=items[0].bench,
        files=tuple(dict.fromkeys(it.file for it in items)),
        fer=fer_metrics_, aud=aud_metrics_, fer_ambiguous=ambiguous, fer_prob=fer_prob, aud_prob=aud_prob)


def read_validation(paths: list[Path], scored: list[ScoredItem]) -> list[ScoredItem]:
    """The AUD items of validation prediction files, each with AU probabilities; refused
    when one shares its image (or, without images, its id) with a scored AUD item:
    thresholds are never tuned on the items they score."""
    scored_keys = {(it.image or f"id:{it.id}") for it in scored if it.task == "aud"}
    out: list[ScoredItem] = []
    for path in paths:
        items = [it for it in read_predictions(path) if it.task == "aud"]
        if not items:
            raise PredictionsError(f"--tune-on {path}: no AUD items to tune thresholds on")
        for it in items:
            if it.p_aus is None:
                raise PredictionsError(f"--tune-on {it.file}:{it.line} (id {it.id!r}): no 'p_aus'; write the "
                                       "validation predictions with `feallm eval --scores`")
            if (it.image or f"id:{it.id}") in scored_keys:
                raise PredictionsError(f"--tune-on {it.file}:{it.line} (id {it.id!r}): this item "
                                       f"({it.image or it.id}) is also scored; thresholds must be tuned on "
                                       "a validation split that shares no item with the scored ones")
        out += items
    return out


def score_files(paths: list[Path], names: list[str] | None = None, skipped: list[str] | None = None,
                tune_on: list[Path] | None = None) -> tuple[list[report.ReportRow], list[dict]]:
    """Read, group and score prediction files; returns the rows and the parse failures.
    With a `skipped` list, lines that cannot be scored are recorded there instead of raising.
    `tune_on`: validation prediction files, one for all or one per file (per-AU thresholds)."""
    if names is not None and len(names) != len(paths):
        raise PredictionsError(f"--name gave {len(names)} names for {len(paths)} prediction "
                               "files; give one name per file, in file order")
    if tune_on is not None and len(tune_on) not in (1, len(paths)):
        raise PredictionsError(f"--tune-on gave {len(tune_on)} files for {len(paths)} prediction files; give "
                               "one validation file for all, or one per file in order")
    items: list[ScoredItem] = []
    for i, path in enumerate(paths):
        file_items = read_predictions(path, names[i] if names else None, skipped)
        if not file_items:
            raise PredictionsError(f"{path}: no predictions in the file")
        items += file_items
    validation: dict[str, list[ScoredItem]] = {}
    if tune_on is not None:
        per_file = tune_on if len(tune_on) == len(paths) else tune_on * len(paths)
        cache: dict[Path, list[ScoredItem]] = {}
        for path, val in zip(paths, per_file):
            if val not in cache:
                cache[val] = read_validation([val], items)
            validation[str(path)] = cache[val]
    failures: list[dict] = []
    rows = []
    for group in tqdm(group_rows(items).values(), desc="scoring", unit="row", disable=None):
        val = None
        if validation:
            val = list({id(it): it for f in dict.fromkeys(it.file for it in group)
                        for it in validation.get(f, [])}.values())
        rows.append(score_row(group, failures, val))
    return rows, failures


def main(args: argparse.Namespace) -> int:
    skipped: list[str] | None = [] if args.skip_bad_lines else None
    rows, failures = score_files(list(args.predictions), args.name, skipped, args.tune_on)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "inputs": [str(p) for p in args.predictions],
        "parser": "feallm_llava.facs.parse: every answer parsed by the scorer",
        "metrics": "FER accuracy (parse failure = wrong); per-AU F1 with counts summed over "
                   "items, unweighted mean over the benchmark's AUs; fractions in [0, 1]",
        "probabilities": "with `feallm eval --scores`: likelihood FER accuracy (argmax of the 7 label "
                         "probabilities), ECE (10 equal-width bins of the top-label confidence), ROC AUC per AU "
                         "and their mean, F1 at per-AU thresholds tuned on --tune-on (never on scored items)",
    }
    report.write_json(rows, out / "scores.json", meta)
    report.write_csv(rows, out / "scores.csv")
    report.write_table(rows, out / "table.md")
    with (out / "parse_failures.jsonl").open("w", encoding="utf-8") as f:
        for rec in failures:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    written = ["scores.json", "scores.csv", "table.md", "parse_failures.jsonl"]
    for filename, plot in (("confusion.png", report.plot_confusion),
                           ("au_f1.png", report.plot_au_f1),
                           ("reliability.png", report.plot_reliability)):
        if plot(rows, out / filename):
            written.append(filename)
        elif (out / filename).exists():
            (out / filename).unlink()   # a plot of an earlier run would not match these scores
    print(report.render_table(rows))
    print(f"wrote {', '.join(written)} to {out}")
    if skipped:
        listing = "\n  ".join(skipped[:20]) + (f"\n  ... {len(skipped) - 20} more" if len(skipped) > 20 else "")
        print(f"feallm score: left out {len(skipped)} line(s) that could not be scored:\n  {listing}",
              file=sys.stderr)
        return EXIT_ITEMS_FAILED
    return 0
