"""`feallm build-dataset`: the FEA instruction set and FEABench from labelled faces.

Paper sections 3.1-3.2. Steps:
1. read the labelled faces (Aff-Wild2, either challenge layout: affwild2.py);
2. keep frames with BOTH a valid expression and all 12 AU labels (the 2020 layout labels
   only 8 AUs, so the FEA set needs the 2022+ layout);
3. split by person (no person on both sides) and sample train / eval with a seed,
   optional per-class caps, unreadable images replaced by the next frame (split.py);
4. annotate the train faces: summary, movement and reasoning texts, from GPT-4o
   (annotate_openai.py; validated, retried, cached, resumable) or the offline template
   annotator; every text written is validated against the labels;
5. write, into --out:
   - `train.json`: LLaVA conversation samples. `image` is relative to the image folder
     (Aff-Wild2's `cropped_aligned/`: pass it to LLaVA's `--image_folder`), or absolute
     with `--image-root-mode absolute`. The three instruction types are separate samples
     (`<id>-summary`, ...) or, with `--multi-turn`, one conversation per image; `<image>\\n`
     opens the first human turn. `--types` keeps a subset (paper Tab. 3 ablation).
   - `eval.json`: FEABench items {id, image, expression, aus (active AU numbers),
     subject, video, frame}; images relative to the same folder (`feallm eval
     --image-folder`).
   - `annotations.jsonl`: the texts of each train image, its status (validated /
     fallback) and the reasons of rejected answers.
   - `report.json`: counts per class and AU, skips by reason, split, annotator
     statistics (rejected / regenerated / fallback, tokens, cost).

Batch API (`--annotator openai --batch ...`): `write` writes the request files under
OUT/batch/ and stops; `submit` also uploads them and creates the batches
(OUT/batch/state.json); `collect` validates finished batches into the cache and then
builds, redoing rejected answers one by one; while a batch is still running it exits
with status 75 (EX_TEMPFAIL) and writes nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from feallm_llava.data.affwild2 import LabelFileError, read_affwild2
from feallm_llava.data.annotate_template import WORDINGS, TemplateAnnotator
from feallm_llava.facs.labels import AUS, EXPRESSIONS, au_key
from feallm_llava.data.records import (INSTRUCTION_TYPES, Annotation, FaceRecord, SkipCounter,
                                       validate_annotation)
from feallm_llava.data.split import (PAPER_EVAL_SIZE, PAPER_TRAIN_SIZE, parse_class_caps,
                                     split_and_sample)
from feallm_llava.data.templates import load_templates, pick_question
from feallm_llava.errors import EXIT_ITEMS_FAILED, UsageError

# Exit code of `--batch collect` while a batch is still running (EX_TEMPFAIL).
EXIT_BATCH_PENDING = 75

# Skip reasons that are failures of the input (exit status 1), not the data's own
# exclusions (invalid -1 labels, the "Other" class, frames without both label kinds).
FAILURES = ("unreadable_image", "bad_label_line", "annotation_invalid")

EXAMPLES = """\
  feallm build-dataset --root /data/Aff-Wild2 --out playground/data/fea                  # offline, template texts
  feallm build-dataset --root /data/Aff-Wild2 --out playground/data/fea --annotator openai --concurrency 16
  OPENAI_API_KEY=... feallm build-dataset ... --annotator openai --batch submit           # Batch API, then --batch collect"""
INTERRUPTED = "rerun the same command: cached annotations are not asked for again"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("source")
    src.add_argument("--source", choices=["affwild2"], default="affwild2",
                     help="labelled-face dataset (default: affwild2)")
    src.add_argument("--root", type=Path, required=True,
                     help="dataset root (Aff-Wild2: the folder holding the label folders)")
    src.add_argument("--image-root", type=Path, default=None,
                     help="face images (default: ROOT/cropped_aligned)")
    src.add_argument("--layout", choices=["2020", "2022"], default=None,
                     help="Aff-Wild2 label layout (default: detected)")
    src.add_argument("--skip-bad-lines", action="store_true",
                     help="count label lines with a wrong column count or a non-numeric value "
                          "as skips instead of stopping with an error")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, help="output folder")
    out.add_argument("--seed", type=int, default=0, help="sampling, split and wording seed")
    out.add_argument("--train-size", type=int, default=PAPER_TRAIN_SIZE,
                     help=f"train images (paper: {PAPER_TRAIN_SIZE})")
    out.add_argument("--eval-size", type=int, default=PAPER_EVAL_SIZE,
                     help=f"eval images (paper: {PAPER_EVAL_SIZE})")
    out.add_argument("--class-cap", default=None,
                     help="largest share of a split per expression: '0.3' for all classes or "
                          "'Neutral=0.25,Happiness=0.3'")
    out.add_argument("--types", default=",".join(INSTRUCTION_TYPES),
                     help="instruction types to write (default: summary,movement,reasoning)")
    out.add_argument("--multi-turn", action="store_true",
                     help="one multi-turn conversation per image instead of one sample per type")
    out.add_argument("--image-root-mode", choices=["relative", "absolute"], default="relative",
                     help="image paths in train/eval.json: relative to the image folder "
                          "(LLaVA --image_folder) or absolute")
    out.add_argument("--templates", type=Path, default=None,
                     help="question template folder (default: the packaged templates)")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    ann = parser.add_argument_group("annotator")
    ann.add_argument("--annotator", choices=["template", "openai"], default="template",
                     help="template: offline, from the labels (default). openai: GPT-4o or --base-url's "
                          "model; the face images are sent there, so it is never chosen for you")
    ann.add_argument("--wording", choices=WORDINGS, default="varied",
                     help="template texts (and the openai fallback's): several wordings per "
                          "sentence (varied), or always the first (fixed; a small LLM learns it "
                          "faster, the offline demo uses it)")
    ann.add_argument("--model", default="gpt-4o", help="OpenAI model (default: gpt-4o)")
    ann.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint")
    ann.add_argument("--api-key-env", default="OPENAI_API_KEY",
                     help="environment variable holding the API key")
    ann.add_argument("--concurrency", type=int, default=8, help="parallel requests")
    ann.add_argument("--rpm", type=float, default=0.0,
                     help="requests-per-minute limit (0: none)")
    ann.add_argument("--max-retries", type=int, default=5,
                     help="transport retries per request (429 / 5xx / timeouts)")
    ann.add_argument("--max-regenerations", type=int, default=2,
                     help="new answers after an answer fails validation, before fallback")
    ann.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    ann.add_argument("--backoff", type=float, default=1.0, help="first retry wait (seconds)")
    ann.add_argument("--price-input", type=float, default=2.50,
                     help="USD per 1M input tokens (default: gpt-4o list price)")
    ann.add_argument("--price-output", type=float, default=10.00,
                     help="USD per 1M output tokens (default: gpt-4o list price)")
    ann.add_argument("--cache", type=Path, default=None,
                     help="annotation cache (default: OUT/annotation_cache.jsonl)")
    ann.add_argument("--batch", choices=["off", "write", "submit", "collect"], default="off",
                     help="Batch API: write the request files / write and submit them / "
                          "collect finished batches then build")


# ---------------------------------------------------------------- helpers -----

def _readable(skips: SkipCounter):
    def accept(record: FaceRecord) -> bool:
        try:
            with Image.open(record.image) as im:
                im.verify()
            return True
        except (OSError, UnidentifiedImageError, SyntaxError) as err:  # PIL raises these
            skips.add("unreadable_image", f"{record.image} ({type(err).__name__})")
            return False
    return accept


def _image_ref(record: FaceRecord, image_root: Path, mode: str) -> str:
    path = Path(record.image)
    if mode == "absolute":
        return str(path.resolve())
    try:
        return path.relative_to(image_root).as_posix()
    except ValueError:
        return str(path.resolve())


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a killed run never leaves half a file under the final name


def _write_jsonl(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _counts(records: list[FaceRecord]) -> dict:
    return {"images": len(records),
            "expression": {e: sum(r.expression == e for r in records) for e in EXPRESSIONS},
            "aus": {au_key(au): sum(r.aus.get(au) == 1 for r in records) for au in AUS},
            "persons": len({r.person for r in records})}


def conversations(record: FaceRecord, annotation: Annotation, image: str, types: list[str],
                  multi_turn: bool, seed: int, templates) -> list[dict]:
    """LLaVA samples of one image: one per type, or one multi-turn conversation."""
    turns = [(kind, pick_question(kind, record.id, seed, templates=templates),
              annotation.text(kind)) for kind in types]
    if multi_turn:
        conv = []
        for i, (_, question, answer) in enumerate(turns):
            conv.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
            conv.append({"from": "gpt", "value": answer})
        return [{"id": record.id, "image": image, "conversations": conv}]
    return [{"id": f"{record.id}-{kind}", "image": image,
             "conversations": [{"from": "human", "value": "<image>\n" + question},
                               {"from": "gpt", "value": answer}]}
            for kind, question, answer in turns]


# ---------------------------------------------------------------- annotation -----

def _annotate_template(records, seed: int, wording: str, progress: bool):
    annotator = TemplateAnnotator(seed, wording)
    results = []
    for r in tqdm(records, desc="annotating (template)", unit="img", disable=not progress):
        results.append({"annotation": annotator.annotate(r.expression, r.aus, r.id),
                        "status": "validated", "problems": [], "error": None, "checked": False})
    return results, {"name": "template", "seed": seed, "wording": wording}


def _openai_config(args):
    from feallm_llava.data.annotate_openai import OpenAIConfig, Prices

    key = os.environ.get(args.api_key_env)
    if not key and not args.base_url:
        raise UsageError(f"--annotator openai needs an API key in ${args.api_key_env} "
                         f"(or --base-url for a local OpenAI-compatible server); use "
                         f"--annotator template to build offline")
    return OpenAIConfig(model=args.model, base_url=args.base_url, api_key=key,
                        concurrency=args.concurrency, requests_per_minute=args.rpm,
                        max_retries=args.max_retries, max_regenerations=args.max_regenerations,
                        timeout=args.timeout, backoff_base=args.backoff,
                        prices=Prices(args.price_input, args.price_output))


def _annotate_openai(records, args, cache_path: Path, progress: bool):
    from feallm_llava.data import annotate_openai as ao
    from feallm_llava.data.annotation_cache import AnnotationCache

    config = _openai_config(args)
    items = [ao.AnnotationItem.from_record(r) for r in records]
    print(f"build-dataset: annotator openai: the {len(items)} train face images (those not in the cache "
          f"{cache_path}) are sent to {config.base_url or 'https://api.openai.com/v1'} ({config.model})",
          file=sys.stderr)
    with AnnotationCache(cache_path) as cache:
        annotator = ao.OpenAIAnnotator(config, cache, fallback=TemplateAnnotator(args.seed, args.wording))
        batch_dir = args.out / "batch"
        if args.batch in ("write", "submit"):
            paths = ao.write_batch_input(items, batch_dir, config, cache)
            lines = sum(len(p.read_bytes().splitlines()) for p in paths)
            print(f"build-dataset: wrote {len(paths)} Batch API input file(s) for {lines} "
                  f"uncached images under {batch_dir}")
            if args.batch == "submit" and paths:
                state = ao.submit_batch(annotator.client, paths, batch_dir / "state.json")
                print("build-dataset: submitted batch(es) "
                      + ", ".join(b["batch_id"] for b in state["batches"])
                      + "; run again with --batch collect once they complete")
            return None, None
        if args.batch == "collect":
            state_path = batch_dir / "state.json"
            if not state_path.is_file():
                raise UsageError(f"{state_path} not found; submit first with "
                                 f"--batch submit")
            summary = ao.collect_batch(annotator.client, state_path, items, config, cache)
            print(f"build-dataset: batch answers validated {summary['validated']}, rejected "
                  f"{summary['rejected']} (redone one by one)")
            if summary["pending"]:
                print("build-dataset: batch(es) still running: " + ", ".join(summary["pending"]))
                return "pending", None
        results = annotator.annotate_all(items, progress=progress)
        stats = annotator.stats.to_dict()
    # A validated answer was checked by the annotator against these labels already.
    rows = [{"annotation": r.annotation, "status": r.status, "problems": r.problems,
             "error": r.error, "checked": r.status == "validated"} for r in results]
    info = {"name": "openai", "model": config.model, "base_url": config.base_url,
            "prompt_version": ao.PROMPT_VERSION, "cache": str(cache_path),
            "prices_usd_per_million": {"input": config.prices.input_per_million,
                                       "output": config.prices.output_per_million,
                                       "batch_factor": config.prices.batch_factor},
            "stats": stats,
            "fallback_ids": [r.id for r in results if r.status == "fallback"]}
    return rows, info


# ---------------------------------------------------------------- main -----

def main(args: argparse.Namespace) -> int:
    started = time.time()
    progress = not args.no_progress
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in INSTRUCTION_TYPES]
    if not types or unknown:
        raise UsageError(f"--types {args.types!r}: each type must be one of "
                         f"{', '.join(INSTRUCTION_TYPES)}")
    caps = parse_class_caps(args.class_cap)
    templates = load_templates(args.templates)
    annotator = args.annotator
    if args.batch != "off" and annotator != "openai":
        raise UsageError("--batch needs --annotator openai")

    # 1. read
    skips = SkipCounter()
    image_root = (args.image_root or args.root / "cropped_aligned").resolve()
    try:
        records = read_affwild2(args.root, layout=args.layout, image_root=image_root, skips=skips,
                                on_bad_line="skip" if args.skip_bad_lines else "error",
                                progress=progress)
    except LabelFileError as err:
        raise UsageError(f"{err} (fix the line, or pass --skip-bad-lines to "
                         f"count such lines as skips)") from None

    # 2. frames with both labels and all 12 AUs
    eligible = []
    for r in records:
        if r.expression is None:
            skips.add("no_expression_label", r.image)
        elif r.aus is None:
            skips.add("no_au_label", r.image)
        elif not r.has_all_aus:
            skips.add("au_labels_incomplete", r.image)
        else:
            eligible.append(r)
    if not eligible:
        hint = ""
        if skips["au_labels_incomplete"]:
            hint = (" The AU files label only some of the 12 AUs (the 2020 layout labels 8); "
                    "the FEA set's 12-AU descriptions need the 2022+ layout "
                    "(AU_Detection_Challenge/).")
        raise UsageError(f"no frame under {args.root} has both a valid expression "
                         f"and all 12 AU labels.{hint}\nSkipped:\n{skips.summary()}")

    # 3. split and sample
    split = split_and_sample(eligible, train_size=args.train_size, eval_size=args.eval_size,
                             seed=args.seed, caps=caps, accept=_readable(skips))
    for note in split.notes:
        print(f"build-dataset: {note}")

    # 4. annotate
    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.cache or args.out / "annotation_cache.jsonl"
    if annotator == "openai":
        rows, info = _annotate_openai(split.train, args, cache_path, progress)
        if rows == "pending":
            return EXIT_BATCH_PENDING
        if rows is None:
            return 0
    else:
        rows, info = _annotate_template(split.train, args.seed, args.wording, progress)

    # 5. validate every text that goes out, and write
    train_samples, ann_lines, kept = [], [], []
    for record, row in tqdm(list(zip(split.train, rows, strict=True)), desc="validating and writing",
                            unit="img", disable=not progress):
        problems = ([] if row["checked"] else
                    validate_annotation(row["annotation"], record.expression, record.aus))
        if problems:  # never silently keep: a text that fails is dropped and reported
            skips.add("annotation_invalid", f"{record.id}: {'; '.join(problems)}")
            continue
        kept.append(record)
        image = _image_ref(record, image_root, args.image_root_mode)
        train_samples += conversations(record, row["annotation"], image, types,
                                       args.multi_turn, args.seed, templates)
        ann_lines.append({"id": record.id, "image": image, "expression": record.expression,
                          "aus": list(record.active_aus), "subject": record.subject,
                          **row["annotation"].to_dict(), "status": row["status"],
                          "annotator": info["name"], "problems": row["problems"],
                          "error": row["error"]})
    # each item names its image folder, so `feallm eval --data OUT` finds the images
    folder = {"image_folder": str(image_root)} if args.image_root_mode == "relative" else {}
    eval_items = [{"id": r.id, "image": _image_ref(r, image_root, args.image_root_mode), **folder,
                   "expression": r.expression, "aus": list(r.active_aus), "subject": r.subject,
                   "video": r.video, "frame": r.frame} for r in split.eval]
    _write_json(args.out / "train.json", train_samples)
    _write_json(args.out / "eval.json", eval_items)
    _write_jsonl(args.out / "annotations.jsonl", ann_lines)
    statuses = Counter(row["status"] for row in ann_lines)
    report = {
        "source": args.source, "root": str(Path(args.root).resolve()),
        "image_folder": str(image_root), "image_root_mode": args.image_root_mode,
        "seed": args.seed, "types": types, "multi_turn": args.multi_turn,
        "class_caps": caps, "records_read": len(records), "eligible": len(eligible),
        "skipped": skips.report(),
        "split": {"requested": split.requested, "pool_sizes": split.pool_sizes,
                  "train_persons": split.train_persons, "eval_persons": split.eval_persons,
                  "rejected_during_sampling": split.rejected, "notes": split.notes},
        "counts": {"train": {**_counts(kept), "samples": len(train_samples)},
                   "eval": _counts(split.eval)},
        "annotations": {"validated": statuses["validated"], "fallback": statuses["fallback"],
                        "dropped_invalid": skips["annotation_invalid"]},
        "annotator": info,
        "seconds": round(time.time() - started, 2),
    }
    _write_json(args.out / "report.json", report)
    print(f"build-dataset: {len(kept)} train images ({len(train_samples)} samples), "
          f"{len(eval_items)} eval images -> {args.out}")
    print(f"build-dataset: train.json images are relative to {image_root} (LLaVA --image_folder); "
          f"eval.json names it for `feallm eval`" if args.image_root_mode == "relative" else
          "build-dataset: image paths are absolute")
    if statuses["fallback"]:
        print(f"build-dataset: {statuses['fallback']} image(s) fell back to the template "
              f"annotator (flagged in annotations.jsonl)", file=sys.stderr)
    if skips.total:
        print(f"build-dataset: skipped (details in report.json):\n{skips.summary()}", file=sys.stderr)
    failed = {reason: skips[reason] for reason in FAILURES if skips[reason]}
    if failed:
        print(f"build-dataset: finished, but items failed: {failed}", file=sys.stderr)
        return EXIT_ITEMS_FAILED
    return 0
