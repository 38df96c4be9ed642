"""The cost of probabilities: scoring the 7 expressions vs generating the FER answer.

    python -m feallm_llava.bench scores --demo runs/demo        # a trained demo checkpoint
    python -m feallm_llava.bench scores                          # the tiny kit's random model

For the same FER items and batch size, the LLaVA runner (1) generates the FER answer
greedily (`answer`, what `feallm eval` asks) and (2) scores the 7 labels' log-probabilities
from one shared prefix (`inference.scores.Scorer.expressions`, what `--scores` adds).
Each is timed (best of `--repeats`, after one untimed pass); the verdict is the ratio of
(2) to (1), target <= 1.5x. With `--demo DIR` the items are the demo's held-out FER items
and the model its trained FEALLM (answers end where it stops, as in the demo's eval);
without, random faces and a random tiny FEALLM whose answers run to `--max-new-tokens`
(the length of a trained FER answer, about 24 tokens, by default).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

EXAMPLES = """\
  python -m feallm_llava.bench scores --demo runs/demo
  python -m feallm_llava.bench scores --items 32 --batch-size 16"""

TARGET = 1.5  # scoring the 7 labels / generating the FER answer, same items and batch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--demo", type=Path, default=None,
                        help="a `feallm demo` run folder: its FEALLM checkpoint and held-out FER items")
    parser.add_argument("--items", type=int, default=32, help="FER items timed")
    parser.add_argument("--batch-size", type=int, default=16, help="items per batch, for both")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="answer length limit (default: 160 with --demo, as the demo's eval; else 24)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each; the best counts")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")


def _demo_items(demo: Path, n: int):
    from feallm_llava.eval.benchmarks import load_items

    items = [i for i in load_items("feabench", demo / "fea" / "eval.json").items if i.task == "fer"]
    return items[:n]


def _random_items(directory: Path, n: int):
    import numpy as np
    from PIL import Image

    from feallm_llava.data.templates import load_templates
    from feallm_llava.eval.items import EvalItem

    question = load_templates()["summary"][0].replace("<image>", "").strip()
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        path = directory / f"face{i}.png"
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(path)
        items.append(EvalItem(id=str(i), image=str(path), task="fer", question=question, bench="bench",
                              gt_expression="Neutral"))
    return items


def _best(fn, repeats: int) -> float:
    fn()  # untimed: first-call allocations, kernels chosen per shape
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(args: argparse.Namespace) -> dict:
    import torch

    from feallm_llava.inference.llava_runner import LlavaBackend
    from feallm_llava.inference.scores import Scorer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.demo is not None:
            demo = args.demo.resolve()
            checkpoint, base = demo / "train" / "llava-tiny-feallm-lora", demo / "llm"
            if not checkpoint.is_dir():
                raise FileNotFoundError(f"{checkpoint} not found: run `feallm demo --out {args.demo}` first")
            items = _demo_items(demo, args.items)
            backend = LlavaBackend(str(checkpoint), str(base), device="cpu", max_new_tokens=args.max_new_tokens or 160)
        else:
            from feallm_llava.bench.throughput import demo_scale
            from feallm_llava.tinykit import build_kit, build_llava

            kit = build_kit(Path(tmp) / "kit")
            overrides = {f"mm_feallm_{k}": int(v) for k, v in (s.split("=") for s in demo_scale())}
            checkpoint = build_llava(Path(tmp) / "tiny-llava-feallm", kit, **overrides)
            items = _random_items(Path(tmp), args.items)
            backend = LlavaBackend(str(checkpoint), device="cpu", max_new_tokens=args.max_new_tokens or 24)
        scorer = Scorer(backend, batch_size=args.batch_size)
        answers: dict[str, str] = {}

        def generate() -> None:
            answers.update((i.id, t) for i, t in backend.answer(items, batch_size=args.batch_size))

        generate_s = _best(generate, args.repeats)
        score_s = _best(lambda: scorer.expressions(items), args.repeats)
    tokens = [len(backend.tokenizer(answers[i.id], add_special_tokens=False).input_ids) for i in items]
    return {"items": len(items), "batch_size": args.batch_size, "threads": args.threads,
            "model": "demo " + str(args.demo) if args.demo else "random tiny FEALLM",
            "answer_tokens_mean": round(sum(tokens) / len(tokens), 1),
            "generate_s": round(generate_s, 4), "score_s": round(score_s, 4),
            "ratio": round(score_s / generate_s, 3)}


def main(args: argparse.Namespace) -> int:
    result = run(args)
    print(json.dumps(result))
    ratio = result["ratio"]
    print(f"FER probabilities (7 labels, shared prefix) / FER answer (greedy) = {ratio:.2f}x on {result['items']} "
          f"items at batch {result['batch_size']} ({result['model']}; target <= {TARGET}x: "
          f"{'met' if ratio <= TARGET else 'NOT met'})")
    return 0
