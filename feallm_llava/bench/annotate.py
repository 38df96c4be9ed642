"""Annotator concurrency benchmark: sequential vs `--concurrency N` against a server with
fixed latency per request (default 200 images, 200 ms, concurrency 16; target ratio > 8).

    python -m feallm_llava.bench annotate [--images 200] [--latency 0.2] [--concurrency 16]
    python -m feallm_llava.bench.annotate ...          (the same, standalone)

The server is the package's stand-in OpenAI server (`feallm_llava.testing.fake_openai`,
real HTTP on 127.0.0.1). Each run uses a fresh cache (nothing
is served from cache); images are tiny random JPEGs. The answers are valid, so each
image costs exactly one request and the times measure the transport and the pool.
Prints both times and the ratio; exit status 0 when the ratio beats `--min-ratio`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from feallm_llava.data.annotate_openai import AnnotationItem, OpenAIAnnotator, OpenAIConfig
from feallm_llava.data.annotation_cache import AnnotationCache
from feallm_llava.errors import FeallmError
from feallm_llava.facs.labels import AU_NAMES, AUS, EXPRESSIONS, PROTOTYPES
from feallm_llava.testing.fake_openai import start_fake_openai

def _answer(text: str) -> str:
    """A valid structured answer for the labels written in the prompt."""
    expression = text.split("Facial expression: ", 1)[1].split("\n", 1)[0].strip()
    line = text.split("Active action units: ", 1)[1].split("\n", 1)[0]
    active = [au for au in AUS if f"AU{au:02d} (" in line]
    name = lambda au: f"AU{au} ({AU_NAMES[au]})"  # noqa: E731
    return json.dumps({
        "summary": f"{expression}. The face shows {expression.lower()}.",
        "movement": " ".join(f"{name(au)} is visible." for au in active) or "The face is relaxed.",
        "reasoning_steps": [{"au": au, "contribution": f"{name(au)} supports it."} for au in active],
        "conclusion": f"Together, the face expresses {expression.lower()}.",
    })


def _items(folder: Path, n: int, seed: int = 0) -> list[AnnotationItem]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        image = Image.new("RGB", (32, 32))
        image.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(32 * 32)])
        image.save(path)
        expression = EXPRESSIONS[i % 7]
        items.append(AnnotationItem(f"bench_{i:05d}", path, expression,
                                    {au: int(au in PROTOTYPES[expression]) for au in AUS}))
    return items


def _timed_run(base_url: str, items, concurrency: int, cache_path: Path) -> float:
    config = OpenAIConfig(base_url=base_url, api_key="bench", concurrency=concurrency,
                          max_retries=0, max_regenerations=0, timeout=30.0)
    with AnnotationCache(cache_path) as cache:
        annotator = OpenAIAnnotator(config, cache)
        start = time.perf_counter()
        results = annotator.annotate_all(items, progress=False)
        elapsed = time.perf_counter() - start
    bad = [r.id for r in results if r.status != "validated"]
    if bad:
        raise FeallmError(f"{len(bad)} images not validated (e.g. {bad[0]})")
    return elapsed


EXAMPLES = """\
  python -m feallm_llava.bench annotate
  python -m feallm_llava.bench annotate --images 400 --latency 0.5 --concurrency 32"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=200, help="images per run (default 200)")
    parser.add_argument("--latency", type=float, default=0.2,
                        help="seconds the server adds per request (default 0.2)")
    parser.add_argument("--concurrency", type=int, default=16, help="workers (default 16)")
    parser.add_argument("--min-ratio", type=float, default=8.0,
                        help="exit 1 when sequential/concurrent is not above this (default 8)")


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="python -m feallm_llava.bench.annotate",
                                         description=__doc__.split("\n\n")[0])
        add_arguments(parser)
        args = parser.parse_args(args)
    with tempfile.TemporaryDirectory(prefix="feallm-bench-") as tmp, \
            start_fake_openai(lambda req: _answer(req.text), latency=args.latency) as server:
        folder = Path(tmp)
        items = _items(folder, args.images)
        sequential = _timed_run(server.base_url, items, 1, folder / "seq.jsonl")
        concurrent = _timed_run(server.base_url, items, args.concurrency, folder / "conc.jsonl")
        requests = server.requests.total
    ratio = sequential / concurrent
    print(f"images {args.images}, latency {args.latency * 1000:.0f} ms, requests {requests}")
    print(f"sequential        {sequential:8.2f} s")
    print(f"concurrency {args.concurrency:<5} {concurrent:8.2f} s")
    print(f"ratio             {ratio:8.2f}x (target > {args.min_ratio:g}x)")
    return 0 if ratio > args.min_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
