"""The benchmark registry: name -> reader + label set + prompts (paper sections 3.3, 5.3).

A benchmark differs from another only in its reader, its tasks and the labels it
scores (lmms-eval's doc_to_text / process_results split): FEABench asks both tasks of
every image, RAF-DB and AffectNet only FER, BP4D and DISFA only AUD on the AUs they
share with FEALLM's 12.

Prompts (paper section 3.3): the FER question is sampled from the emotion-summary
templates, the AUD question from the facial-movement templates of
`feallm_llava.data.templates`. The sample is seeded per item (seed, benchmark, item id,
task), so an item gets the same question whatever `--limit`, `--num-chunks` or resume
does to the run.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from feallm_llava.facs.labels import AUS, EXPRESSIONS

from feallm_llava.eval.items import EvalItem
from feallm_llava.eval.readers import ReaderOptions, ReadResult, affectnet, bp4d, disfa, feabench, rafdb

# Template groups of feallm_llava.data.templates used per task (paper section 3.3).
TEMPLATE_GROUP: dict[str, str] = {"fer": "summary", "aud": "movement"}


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str                                    # as the paper's tables name it
    read: Callable[[Path, ReaderOptions], ReadResult]
    tasks: tuple[str, ...]                        # "fer" and/or "aud", in item order
    expressions: tuple[str, ...] = ()             # FER label set
    aus: tuple[int, ...] = ()                     # AUs scored on AUD items


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("feabench", "FEABench", feabench.read, ("fer", "aud"), EXPRESSIONS, AUS),
    Benchmark("rafdb", "RAF-DB", rafdb.read, ("fer",), EXPRESSIONS),
    Benchmark("affectnet", "AffectNet", affectnet.read, ("fer",), EXPRESSIONS),
    Benchmark("bp4d", "BP4D", bp4d.read, ("aud",), aus=bp4d.BP4D_AUS),
    Benchmark("disfa", "DISFA", disfa.read, ("aud",), aus=disfa.DISFA_AUS),
)}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def question_pools() -> dict[str, list[str]]:
    """Task -> its question templates, from feallm_llava.data.templates."""
    from feallm_llava.data.templates import load_templates

    templates = load_templates()
    pools: dict[str, list[str]] = {}
    for task, group in TEMPLATE_GROUP.items():
        pool = list(templates.get(group) or [])
        if not pool:
            raise ValueError(f"feallm_llava.data.templates has no {group!r} question templates "
                             f"(needed for {task.upper()} prompts)")
        pools[task] = pool
    return pools


def pick_question(pool: list[str], seed: int, bench: str, item_id: str, task: str) -> str:
    # A str seed is hashed with SHA-512 by `random`: stable across processes and runs.
    question = random.Random(f"{seed}:{bench}:{item_id}:{task}").choice(pool)
    # Training templates may carry LLaVA's "<image>" placeholder; backends place the image.
    return question.replace("<image>", "").strip()


@dataclass
class LoadedBenchmark:
    bench: Benchmark
    items: list[EvalItem]
    dropped: Counter                              # reason -> count (reader drops + missing images)


def load_items(name: str, root: Path, options: ReaderOptions | None = None, *, seed: int = 0,
               skip_missing: bool = False, pools: dict[str, list[str]] | None = None) -> LoadedBenchmark:
    """Read a benchmark and turn its records into items, in a stable order.

    A record whose image is missing raises `FileNotFoundError` naming the image and the
    label line it came from, unless `skip_missing`, which drops it and counts it.
    """
    bench = get_benchmark(name)
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{bench.title}: data root {root} does not exist")
    result = bench.read(root, options or ReaderOptions())
    pools = pools if pools is not None else question_pools()
    dropped = Counter(result.dropped)
    items: list[EvalItem] = []
    for rec in result.records:
        if not rec.image.is_file():
            if skip_missing:
                dropped["missing image"] += 1
                continue
            raise FileNotFoundError(
                f"{bench.title}: image {rec.image} not found (sample {rec.id!r}, labelled at "
                f"{rec.source}); fix --data / --image-folder / --frame-pattern, or pass "
                f"--skip-missing to skip such images and count them")
        for task in bench.tasks:
            item_id = rec.id if len(bench.tasks) == 1 else f"{rec.id}#{task}"
            items.append(EvalItem(
                id=item_id,
                image=str(rec.image.resolve()),
                task=task,
                question=pick_question(pools[task], seed, bench.name, rec.id, task),
                bench=bench.name,
                gt_expression=rec.gt_expression if task == "fer" else None,
                gt_aus=tuple(sorted(rec.gt_aus)) if task == "aud" else None,
                au_targets=bench.aus if task == "aud" else (),
                crop=rec.crop,
            ))
    return LoadedBenchmark(bench, items, dropped)
