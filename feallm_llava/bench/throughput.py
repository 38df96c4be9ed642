"""Throughput of the LLaVA eval runner: batched (left-padded) vs one item at a time.

    python -m feallm_llava.bench throughput [--items 32] [--batch-size 8 [16 32 ...]]
                                            [--max-new-tokens 32] [--paper] [--set crop_size=24 ...]

Builds (or reuses) the offline tiny kit and a tiny LLaVA checkpoint per projector type,
answers the same synthetic face items with `LlavaBackend` at batch 1 and at each
`--batch-size`, checks that the greedy answers are identical, and prints one JSON line
per projector and prompt kind: items/s at each batch size and the ratios to batch 1
(best of `--repeats` runs), and the ratios of this process's CPU time, which a busy
shared machine disturbs less. The last line is the verdict: `feallm` with sampled
(padded) prompts at the first batch size above 1, against the target of 4x.

Two projectors are measured by default: `mlp2x_gelu` (upstream LLaVA-1.5's; the runner's
batching alone) and `feallm` at the scale the demo trains on the kit's 56 px faces
(crops of 24 px pooled 2 x 2, MPP at the vision width; `--set` changes fields).
`--paper` builds it at the paper's defaults instead: 16 crops of 112 px per image cut
from 56 px faces make the LCA conv block 1.4 GFLOP an image, compute-bound work that
grows linearly with the batch on a CPU and dwarfs the tiny LLM, so that measures the
conv rather than the runner (about 2.3x at batch 8).

`--threads` sets torch's intra-op threads (default 1): on a shared CPU, more threads
than free cores makes tiny kernels wait on each other and hides the batching effect.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


EXAMPLES = """\
  python -m feallm_llava.bench throughput
  python -m feallm_llava.bench throughput --projector feallm --prompts sampled --batch-size 8 16 32
  python -m feallm_llava.bench throughput --projector feallm --set crop_size=24 --set lca_pool=2"""

TARGET = 4.0  # items/s at batch 8 over batch 1, feallm with sampled (padded) prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", type=int, default=32, help="items answered at each batch size")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8],
                        help="batch size(s) compared with batch 1 (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--projector", action="append", choices=["mlp2x_gelu", "feallm"],
                        help="projector type(s) to measure (repeatable; default both)")
    parser.add_argument("--prompts", action="append", choices=["fixed", "sampled"],
                        help="one fixed question (unpadded batches) or questions sampled from the "
                             "templates (mixed lengths; repeatable; default both)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed passes per batch size, the sizes in turn; the best counts")
    parser.add_argument("--kit-dir", type=Path, default=None,
                        help="where the tiny kit is built/cached (default: a temporary directory)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--paper", action="store_true",
                        help="build the feallm checkpoint at the paper's FeallmConfig (default: the demo's scale)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="build the feallm checkpoint with this FeallmConfig field, e.g. --set crop_size=24 "
                             "(repeatable; applied last)")


def demo_scale() -> list[str]:
    """The FeallmConfig fields the demo trains the kit's checkpoint with, as --set items."""
    from feallm_llava.demo.config import DemoConfig

    demo = DemoConfig()
    return [f"crop_size={demo.crop_size}", f"lca_pool={demo.lca_pool}", "mpp_dim=0"]


def _items(directory: Path, n: int, prompts: str):
    """Random images of varied sizes; questions sampled from the templates as the
    benchmarks do ("sampled") or one fixed FER question ("fixed")."""
    import numpy as np
    from PIL import Image

    from feallm_llava.data.templates import load_templates
    from feallm_llava.eval.benchmarks import pick_question
    from feallm_llava.eval.items import EvalItem

    templates = load_templates()
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        path = directory / f"face{i}.png"
        size = (48 + 8 * (i % 4), 56)  # non-square, varied: exercises the pad-to-square path
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        task = ("fer", "aud")[i % 2] if prompts == "sampled" else "fer"
        pool = list(templates["summary" if task == "fer" else "movement"])
        question = pick_question(pool, 0, "bench", str(i), task) if prompts == "sampled" else pool[0]
        items.append(EvalItem(id=str(i), image=str(path), task=task, question=question, bench="bench",
                              gt_expression="Neutral" if task == "fer" else None,
                              gt_aus=() if task == "aud" else None, au_targets=(1, 2) if task == "aud" else ()))
    return items


def _timed(backend, items, batch_size: int) -> tuple[float, float, dict[str, str]]:
    """(wall seconds, CPU seconds of this process, answers) of one pass over `items`."""
    wall, cpu = time.perf_counter(), time.process_time()
    answers = {item.id: text for item, text in backend.answer(items, batch_size=batch_size)}
    return time.perf_counter() - wall, time.process_time() - cpu, answers


def _measure(backend, items, args: argparse.Namespace) -> dict:
    """Best of `--repeats` passes per batch size, the sizes taken in turn within each repeat
    (background load and the allocator's state then reach every size alike), after an
    untimed pass at each size (first-call allocations, kernels chosen per shape)."""
    sizes = [1, *args.batch_size]
    walls: dict[int, list[float]] = {size: [] for size in sizes}
    cpus: dict[int, list[float]] = {size: [] for size in sizes}
    answers: dict[int, dict[str, str]] = {}
    for size in sorted(sizes, reverse=True):
        _timed(backend, items, size)
    for _ in range(args.repeats):
        for size in sizes:
            wall, cpu, answers[size] = _timed(backend, items, size)
            walls[size].append(wall)
            cpus[size].append(cpu)
    t1, c1 = min(walls[1]), min(cpus[1])
    out = {"items": len(items), "max_new_tokens": args.max_new_tokens, "threads": args.threads,
           "device": args.device, "items_per_s_batch1": round(len(items) / t1, 3)}
    for size in args.batch_size:
        plan = backend._plan(items, size)
        out.update({
            f"batches{size}": len(plan),
            f"padded_batches{size}": sum(len({backend.prompt_length(i) for i in batch}) > 1 for batch in plan),
            f"items_per_s_batch{size}": round(len(items) / min(walls[size]), 3),
            f"speedup{size}": round(t1 / min(walls[size]), 2),
            f"speedup{size}_cpu_time": round(c1 / min(cpus[size]), 2),
        })
    out["same_answers"] = all(answers[size] == answers[1] for size in args.batch_size)
    return out


def verdict(results: list[dict], batch_size: int) -> str:
    """The one verdict line: feallm with sampled prompts (else the last result) at `batch_size`."""
    pick = next((r for r in results if (r["projector"], r["prompts"]) == ("feallm", "sampled")), results[-1])
    ratio = pick[f"speedup{batch_size}"]
    return (f"{pick['projector']} ({pick['prompts']} prompts) batch {batch_size} / batch 1 = {ratio:.1f}x "
            f"(target >= {TARGET:.0f}x: {'met' if ratio >= TARGET else 'NOT met'}; CPU time "
            f"{pick[f'speedup{batch_size}_cpu_time']:.1f}x)")


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from feallm_llava.bench.projector import _typed, parse_overrides
    from feallm_llava.inference.llava_runner import LlavaBackend
    from feallm_llava.model.config import LLAVA_PREFIX
    from feallm_llava.tinykit import build_kit, build_llava

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="feallm-throughput-") as tmp:
        root = args.kit_dir or Path(tmp)
        kit = build_kit(root / "kit")
        fields = parse_overrides(([] if args.paper else demo_scale()) + args.set)  # of the feallm checkpoint
        for projector in args.projector or ["mlp2x_gelu", "feallm"]:
            ours = projector == "feallm"
            overrides = {LLAVA_PREFIX + k: v for k, v in _typed(fields).items()} if ours else {}
            suffix = "".join(f"-{k}{v}" for k, v in fields.items()) if ours else ""
            checkpoint = build_llava(root / f"tiny-llava-{projector}{suffix}", kit, projector_type=projector,
                                     **overrides)
            backend = LlavaBackend(str(checkpoint), device=args.device, max_new_tokens=args.max_new_tokens)
            for prompts in args.prompts or ["fixed", "sampled"]:
                items = _items(Path(tmp), args.items, prompts)
                results.append({"projector": projector, "prompts": prompts, **_measure(backend, items, args)})
                print(json.dumps(results[-1]), flush=True)
    return results


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """Entry point for `python -m feallm_llava.bench throughput` (a Namespace) or an argv list."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="python -m feallm_llava.bench throughput", description=__doc__)
        add_arguments(parser)
        args = parser.parse_args(sys.argv[1:] if args is None else args)
    results = run(args)
    print(verdict(results, next((b for b in args.batch_size if b > 1), args.batch_size[0])))
    if not all(r["same_answers"] for r in results):
        print("batched greedy answers differ from batch-1 answers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
