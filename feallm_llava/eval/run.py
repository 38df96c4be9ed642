"""`feallm eval`: run a model on FEABench, RAF-DB, AffectNet, BP4D or DISFA.

    feallm eval --bench rafdb --data /data/RAF-DB --model-path ckpt/llava-feallm-7b --out runs/rafdb
    feallm eval --bench bp4d --data /data/BP4D --openai-model Qwen2-VL-7B \\
        --base-url http://localhost:8000/v1 --out runs/bp4d-qwen
    # 4 GPUs: one chunk each, then merge
    CUDA_VISIBLE_DEVICES=$i feallm eval ... --num-chunks 4 --chunk-idx $i
    feallm eval ... --num-chunks 4 --merge

Writes `<out>/predictions.jsonl` (chunks: `predictions.<K>_<I>.jsonl`), one line per
item, and `<out>/run.json` (`run.<K>_<I>.json`) with the counts of the run. Items
already in the predictions file are not asked again (resume after a crash or kill).
`feallm score` turns the predictions into tables and plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from feallm_llava.errors import EXIT_ITEMS_FAILED
from feallm_llava.eval.benchmarks import BENCHMARKS, LoadedBenchmark, load_items
from feallm_llava.eval.items import EvalItem
from feallm_llava.eval.predictions import (PredictionWriter, answered_ids, check_same_run, chunk, merge_shards,
                          read_predictions, shard_path, sort_in_item_order)
from feallm_llava.eval.readers import ReaderOptions


EXAMPLES = """\
  feallm eval --bench feabench --data playground/data/fea --model-path checkpoints/feallm-llava-v1.5-7b-lora \\
      --model-base lmsys/vicuna-7b-v1.5 --out runs/eval/feabench
  feallm eval --bench rafdb --data /data/RAF-DB --openai-model Qwen2-VL-7B --base-url http://127.0.0.1:8000/v1 \\
      --out runs/eval/rafdb-qwen"""
INTERRUPTED = "the answers so far are in the predictions file; rerun the same command to ask only the rest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_benchmark_arguments(parser)
    _add_model_arguments(parser)


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """--bench, --data and the reader flags (`feallm eval`, `feallm lmms-tasks`)."""
    g = parser.add_argument_group("benchmark")
    g.add_argument("--bench", required=True, choices=list(BENCHMARKS), help="which benchmark")
    g.add_argument("--data", required=True, type=Path,
                   help="dataset root (FEABench: eval.json or its folder)")
    g.add_argument("--image-folder", type=Path, default=None,
                   help="image root when images are not where the reader looks by default (FEABench: the "
                        "folder its eval.json names; see each reader)")
    g.add_argument("--limit", type=int, default=None, help="only the first N items (after reading, before chunking)")
    g.add_argument("--seed", type=int, default=0, help="seed of the per-item question sampling")
    g.add_argument("--skip-missing", action="store_true",
                   help="skip (and count) items whose image is missing instead of stopping")
    g.add_argument("--split", default="test", help="RAF-DB split (label-file name prefix)")
    g.add_argument("--rafdb-images", default="aligned", choices=["aligned", "original"], help="RAF-DB image set")
    g.add_argument("--affectnet-release", default="auto", choices=["auto", "csv", "npy"],
                   help="AffectNet label format (auto: detected)")
    g.add_argument("--affectnet-classes", type=int, default=7,
                   help="7 (default; contempt dropped). 8 is refused: contempt is outside our label space")
    g.add_argument("--sample-every", type=int, default=50,
                   help="BP4D/DISFA: keep every n-th frame per sequence (50 = the paper's 2%%)")
    g.add_argument("--folds", default="", help="BP4D/DISFA: comma-separated subject folds to keep, e.g. 3 or 1,2")
    g.add_argument("--frame-pattern", default=None,
                   help="BP4D/DISFA image path under the image root; fields {subject} {task} {frame} {frame0}; "
                        "defaults '{subject}/{task}/{frame}.jpg' (BP4D), '{subject}/{frame}.jpg' under "
                        "<data>/Images (DISFA)")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model: a LLaVA checkpoint")
    g.add_argument("--model-path", default=None, help="checkpoint directory (its name must contain 'llava')")
    g.add_argument("--model-base", default=None, help="base LLM of a LoRA or projector-only checkpoint")
    g.add_argument("--conv-mode", default=None, help="conversation template (default: the one the checkpoint "
                                                    "was trained with, else upstream's folder-name rule)")
    g.add_argument("--batch-size", type=int, default=8, help="items per generate call")
    g.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    g.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on cuda, float32 on cpu")

    g = parser.add_argument_group("model: an OpenAI-compatible endpoint (key from OPENAI_API_KEY)")
    g.add_argument("--openai-model", default=None, help="model name on the server (instead of --model-path)")
    g.add_argument("--base-url", default=None, help="e.g. http://localhost:8000/v1 (vLLM); default: OpenAI")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight")

    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, type=Path, help="folder for predictions.jsonl and run.json")
    g.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit")
    g.add_argument("--scores", action="store_true",
                   help="also write probabilities: p_expression (the 7 labels' summed log-probabilities after "
                        "the FER prompt, normalised) on FER items, p_aus (each AU given the model's reading of "
                        "the others) on AUD items; an OpenAI-compatible server must return prompt "
                        "log-probabilities (vLLM does)")
    g.add_argument("--num-chunks", type=int, default=1, help="split the items into K chunks (one per GPU)")
    g.add_argument("--chunk-idx", type=int, default=0, help="which chunk this process answers (0-based)")
    g.add_argument("--merge", action="store_true", help="join the --num-chunks chunk files into predictions.jsonl")


def prediction_record(item: EvalItem, answer: str, model: str) -> dict:
    """One predictions.jsonl line: the item, the model and its answer. What the answer
    means is the scorer's business (`feallm score` parses every answer)."""
    return {**item.record(), "answer": answer, "model": model}


def reader_options(args: argparse.Namespace) -> ReaderOptions:
    try:
        folds = tuple(int(f) for f in args.folds.split(",") if f.strip())
    except ValueError:
        raise ValueError(f"--folds must be comma-separated fold numbers, got {args.folds!r}") from None
    return ReaderOptions(
        image_folder=args.image_folder, split=args.split, rafdb_images=args.rafdb_images,
        affectnet_release=args.affectnet_release, affectnet_classes=args.affectnet_classes,
        sample_every=args.sample_every, folds=folds, frame_pattern=args.frame_pattern)


def load_benchmark(args: argparse.Namespace) -> tuple[LoadedBenchmark, list[EvalItem]]:
    """The benchmark the flags of `add_benchmark_arguments` name, and its items after --limit."""
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    loaded = load_items(args.bench, args.data, reader_options(args), seed=args.seed,
                        skip_missing=args.skip_missing)
    return loaded, loaded.items[:args.limit] if args.limit else loaded.items


def _model_label(args: argparse.Namespace) -> str:
    if args.openai_model:
        return args.openai_model
    from feallm_llava.inference.llava_runner import model_name_from_path

    return model_name_from_path(args.model_path)


def _backend(args: argparse.Namespace):
    """(its answer(items) call, the backend)."""
    if args.openai_model:
        from feallm_llava.inference.openai_client import OpenAIBackend

        backend = OpenAIBackend(args.openai_model, base_url=args.base_url, concurrency=args.concurrency,
                                max_new_tokens=args.max_new_tokens)
        return backend.answer, backend
    from feallm_llava.inference.llava_runner import LlavaBackend

    backend = LlavaBackend(args.model_path, args.model_base, conv_mode=args.conv_mode, device=args.device,
                           dtype=args.dtype, max_new_tokens=args.max_new_tokens)
    return (lambda items: backend.answer(items, batch_size=args.batch_size)), backend


def _scored_answers(answer, scorer, items: list[EvalItem], size: int):
    """(item, answer, probabilities) triples: `size` items are answered, then scored (an AUD
    item's AU probabilities condition on the AU set parsed from its answer)."""
    from feallm_llava.facs.labels import AUS
    from feallm_llava.facs.parse import parse

    for start in range(0, len(items), size):
        answered = list(answer(items[start:start + size]))
        fer = [item for item, _ in answered if item.task == "fer"]
        read = {item.id: parse(text, AUS).aus for item, text in answered if item.task == "aud"}
        probs: dict[str, dict] = {}
        if fer:
            probs.update({k: {"p_expression": v} for k, v in scorer.expressions(fer).items()})
        if read:
            aud = [item for item, _ in answered if item.task == "aud"]
            probs.update({k: {"p_aus": v} for k, v in scorer.aus(aud, read).items()})
        for item, text in answered:
            yield item, text, probs[item.id]


def _check_args(args: argparse.Namespace) -> None:
    if not args.merge and bool(args.model_path) == bool(args.openai_model):
        raise ValueError("give exactly one model: --model-path (LLaVA checkpoint) or --openai-model (endpoint)")
    if args.num_chunks < 1 or not 0 <= args.chunk_idx < args.num_chunks:
        raise ValueError(f"--chunk-idx must be in 0..{args.num_chunks - 1} for --num-chunks {args.num_chunks}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")


def run(args: argparse.Namespace) -> dict:
    """The whole command; returns the run summary written to run.json."""
    from tqdm import tqdm

    _check_args(args)
    loaded, items = load_benchmark(args)
    dropped = dict(sorted(loaded.dropped.items()))
    if args.merge:
        target = merge_shards(args.out, args.num_chunks, [i.id for i in items])
        print(f"merged {args.num_chunks} chunks: {len(items)} items -> {target}", file=sys.stderr)
        return {"bench": args.bench, "items": len(items), "merged": str(target)}

    mine = chunk(items, args.num_chunks, args.chunk_idx)
    path = shard_path(args.out, args.num_chunks, args.chunk_idx)
    model = _model_label(args)
    existing = read_predictions(path)
    check_same_run(existing, path, bench=args.bench, model=model)
    done = answered_ids(existing)
    todo = [item for item in mine if item.id not in done]
    print(f"{loaded.bench.title}: {len(loaded.items)} items ({len(items)} after --limit), chunk "
          f"{args.chunk_idx}/{args.num_chunks}: {len(mine)}; {len(mine) - len(todo)} already answered in "
          f"{path}, {len(todo)} to ask {model}; dropped while reading: {dropped or 'none'}", file=sys.stderr)

    answered = 0
    if todo:
        answer, backend = _backend(args)
        if args.scores:
            from feallm_llava.inference.scores import Scorer

            scorer = Scorer(backend, batch_size=args.batch_size)
            triples = _scored_answers(answer, scorer, todo, max(args.batch_size, args.concurrency) * 4)
        else:
            triples = ((item, text, {}) for item, text in answer(todo))
        with PredictionWriter(path) as writer, tqdm(total=len(todo), desc=f"{args.bench} {model}",
                                                    unit="item", file=sys.stderr) as bar:
            for item, text, probs in triples:
                writer.write({**prediction_record(item, text, model), **probs})
                answered += 1
                bar.update(1)
    if path.exists():
        sort_in_item_order(path, [item.id for item in mine])
    summary = {
        "bench": args.bench, "data": str(args.data), "model": model,
        "num_chunks": args.num_chunks, "chunk_idx": args.chunk_idx, "seed": args.seed, "limit": args.limit,
        "items_in_benchmark": len(loaded.items), "items_in_chunk": len(mine),
        "answered_before": len(mine) - len(todo), "answered_now": answered,
        "dropped": dropped, "predictions": str(path), "scores": bool(args.scores),
    }
    info = path.with_name("run.json" if args.num_chunks == 1 else f"run.{args.num_chunks}_{args.chunk_idx}.json")
    info.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def main(args: argparse.Namespace) -> int:
    summary = run(args)
    missing = summary.get("dropped", {}).get("missing image", 0)
    if missing:  # with --skip-missing: the run finished without these items
        print(f"feallm eval: {missing} item(s) skipped for a missing image (--skip-missing)", file=sys.stderr)
        return EXIT_ITEMS_FAILED
    return 0
