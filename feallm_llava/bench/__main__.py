"""Dispatcher: `python -m feallm_llava.bench <name> [options]`.

Adding a benchmark = one entry in BENCHMARKS (name -> module, help) plus that module,
which provides `add_arguments(parser)` and `main(args) -> int`. Modules are imported only
when their benchmark runs.
"""

from __future__ import annotations

import sys

BENCHMARKS: dict[str, tuple[str, str]] = {
    "projector": ("feallm_llava.bench.projector",
                  "forward time and size: CLIP tower vs mlp2x_gelu vs FEALLM projector"),
    "throughput": ("feallm_llava.bench.throughput", "batched generation throughput of the eval runner"),
    "annotate": ("feallm_llava.bench.annotate", "annotation throughput against a fake OpenAI service"),
    "serve-load": ("feallm_llava.bench.serve_load",
                   "upstream's controller + worker under concurrent and faulty requests, then a worker kill"),
    "video": ("feallm_llava.bench.video",
              "feallm analyze on synthetic videos of the demo's held-out subjects: accuracy and frames/s"),
    "detect": ("feallm_llava.bench.detect",
               "face detectors on synthetic pictures of five skin tones: recall per tone, landmarks, time"),
    "scores": ("feallm_llava.bench.scores",
               "FER probabilities (7 labels from one shared prefix) vs generating the FER answer"),
    "vllm": ("feallm_llava.bench.vllm_serving",
             "an exported FEALLM served by vLLM (concurrent requests) vs the LLaVA runner (batch 8 and 1)"),
}


PROG = ("python -m feallm_llava.bench", "feallm-llava benchmarks")


def build_parser(name: str | None = None):
    from feallm_llava.cli import subcommand_parser

    return subcommand_parser(*PROG, BENCHMARKS, name)


def main(argv: list[str] | None = None) -> int:
    from feallm_llava.cli import dispatch

    return dispatch(*PROG, BENCHMARKS, argv)


if __name__ == "__main__":
    sys.exit(main())
