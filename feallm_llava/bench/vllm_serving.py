"""FEALLM served by vLLM against the LLaVA runner: items/s and the same answers.

    python -m feallm_llava.bench vllm [--items 64] [--max-new-tokens 32] [--concurrency 32]
                                      [--model-path CKPT [--model-base BASE]] [--device cpu|cuda]

Without `--model-path` it trains the tiny FEALLM (2 + 48 steps through upstream's train
script, a kit with 2 heads of 32: vLLM's CPU attention has no head size 16), exports it
with `feallm export-vllm`, serves it with `launch/serve_vllm.sh` on 127.0.0.1 and answers
the same FEABench-like items (non-square random faces, questions sampled from the
templates) three ways: the OpenAI client against vLLM with `--concurrency` requests in
flight, and `LlavaBackend` at batch 8 and at batch 1. It prints one JSON line (items/s of
each, the ratios, how many answers agree with batch 1's) and a verdict line; exit 1 when
an answer differs. The runner is measured first (a stopping vLLM engine would still hold
the cores); each pass is timed after an untimed warm-up pass.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from feallm_llava.errors import FeallmError, UsageError

EXAMPLES = """\
  python -m feallm_llava.bench vllm
  python -m feallm_llava.bench vllm --model-path runs/demo/train/llava-tiny-feallm-lora --model-base runs/demo/llm
  python -m feallm_llava.bench vllm --device cuda --items 256 --model-path checkpoints/llava-v1.5-7b-feallm"""

REPO = Path(__file__).resolve().parents[2]
SERVE = REPO / "launch" / "serve_vllm.sh"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", type=int, default=64, help="items answered by each backend")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight to vLLM")
    parser.add_argument("--batch-size", type=int, default=8, help="the LLaVA runner's batch (also measured at 1)")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="a LLaVA checkpoint (default: the tiny FEALLM, trained here)")
    parser.add_argument("--model-base", type=Path, default=None, help="its base LLM (LoRA / projector-only)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="of the export, vLLM and the runner (default: float32 on cpu, float16 on cuda; "
                             "half precision: the two engines' kernels may break near-ties apart)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the kit, checkpoint and export are kept (default: a temporary folder)")
    parser.add_argument("--vllm-venv", type=Path,
                        default=Path(os.environ.get("FEALLM_VLLM_VENV", REPO / ".venv-vllm")),
                        help="vLLM's environment (bash launch/bootstrap.sh --env vllm)")
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds vLLM may take to come up")


# -- the vLLM server ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model: Path, *, venv: Path, log: Path, vllm_args: tuple[str, ...] = (), timeout: float = 900.0,
                serve_args: tuple[str, ...] = (), environ: dict[str, str | None] | None = None):
    """`launch/serve_vllm.sh --model MODEL [SERVE_ARGS] -- [VLLM_ARGS]` on a free port of
    127.0.0.1; yields the base URL. `environ` sets (or, with None, removes) variables of the
    server's environment. The server and the engine processes it starts are stopped on exit."""
    if not SERVE.is_file():
        raise UsageError(f"{SERVE}: not found; the vLLM benchmark runs from a checkout of feallm-llava")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "FEALLM_VLLM_VENV": str(venv)}
    for key, value in (environ or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    with open(log, "wb") as f:
        proc = subprocess.Popen(["bash", str(SERVE), "--model", str(model), "--port", str(port), *serve_args,
                                 "--", *vllm_args],
                                stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise FeallmError(f"{log}: the vLLM server exited with status {proc.returncode}; its log "
                                  f"ends:\n{log.read_text(errors='replace')[-2000:]}")
            try:
                urllib.request.urlopen(base + "/models", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise FeallmError(f"{log}: vLLM did not answer within {timeout:.0f} s") from None
                time.sleep(2)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- the checkpoint ----------------------------------------------------------------------------

def tiny_checkpoint(root: Path) -> tuple[Path, Path]:
    """The tiny FEALLM trained through upstream's train script: (LoRA checkpoint, base LLM)."""
    from feallm_llava.recipe import TinyRecipe
    from feallm_llava.tinykit import KitSpec, build_kit

    kit = build_kit(root / "kit", KitSpec(llm_hidden=64, llm_heads=2))  # head_dim 32
    recipe = TinyRecipe(out=root / "train", kit=kit.root, steps1=2, steps2=48, lr2=3e-3, save_steps=100)
    with _stdout_to_stderr():
        recipe.run()
    return recipe.stage_dir(2), kit.llm


@contextlib.contextmanager
def _stdout_to_stderr():
    """Child processes' output too (the train script's) to stderr: stdout holds the results."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _timed(answer, items) -> tuple[float, dict[str, str]]:
    start = time.perf_counter()
    # an answer cut inside a multi-byte character: the runner decodes the lone bytes as
    # U+FFFD, vLLM's detokenizer holds them back (the tokens are the same)
    answers = {item.id: text.rstrip("\ufffd") for item, text in answer(items)}
    return time.perf_counter() - start, answers


def run(args: argparse.Namespace) -> dict:
    from feallm_llava.bench.throughput import _items
    from feallm_llava.inference.llava_runner import LlavaBackend
    from feallm_llava.inference.openai_client import OpenAIBackend
    from feallm_llava.integration.export_vllm import export

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (args.vllm_venv / "bin" / "python").exists():
        raise UsageError(f"{args.vllm_venv}: no vLLM environment; run `bash launch/bootstrap.sh --env vllm`")
    if args.items < 1 or args.concurrency < 1 or args.batch_size < 1:
        raise UsageError("--items, --concurrency and --batch-size must be >= 1")
    with tempfile.TemporaryDirectory(prefix="feallm-bench-vllm-") as tmp:
        root = args.work_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if args.model_path is None:
            model_path, model_base = tiny_checkpoint(root)
        else:
            model_path, model_base = args.model_path, args.model_base
        dtype = args.dtype or ("float32" if args.device == "cpu" else "float16")  # the runner's default on each
        exported = root / "vllm-export"
        with _stdout_to_stderr():
            export(model_path, exported, model_base, dtype=dtype)
        (root / "faces").mkdir(exist_ok=True)
        items = _items(root / "faces", args.items, "sampled")

        # the runner first: a stopping vLLM engine would still hold the cores
        with _stdout_to_stderr():  # upstream's loader prints
            runner = LlavaBackend(str(model_path), str(model_base) if model_base else None, device=args.device,
                                  dtype=dtype, max_new_tokens=args.max_new_tokens)
        batched = functools.partial(runner.answer, batch_size=args.batch_size)
        single = functools.partial(runner.answer, batch_size=1)
        _timed(batched, items[:args.batch_size])  # warm-up
        t_batch, a_batch = _timed(batched, items)
        t_one, a_one = _timed(single, items)
        del runner, batched, single  # its memory and threads, before vLLM starts
        vllm_args = ("--dtype", dtype)
        if args.device == "cpu":
            vllm_args += ("--enforce-eager",)  # start-up: no graph compilation for a short run
        with vllm_server(exported, venv=args.vllm_venv, log=root / "vllm-serve.log", vllm_args=vllm_args,
                         timeout=args.startup_timeout) as base:
            client = OpenAIBackend(str(exported), base_url=base, concurrency=args.concurrency,
                                   max_new_tokens=args.max_new_tokens)
            _timed(client.answer, items[:args.concurrency])  # warm-up
            t_vllm, a_vllm = _timed(client.answer, items)
    n = len(items)
    b = args.batch_size
    return {
        "items": n, "max_new_tokens": args.max_new_tokens, "device": args.device, "dtype": dtype,
        "checkpoint": str(model_path), "concurrency": args.concurrency,
        "items_per_s_vllm": round(n / t_vllm, 3),
        f"items_per_s_llava_batch{b}": round(n / t_batch, 3),
        "items_per_s_llava_batch1": round(n / t_one, 3),
        f"vllm_over_llava_batch{b}": round(t_batch / t_vllm, 2),
        "vllm_over_llava_batch1": round(t_one / t_vllm, 2),
        "vllm_agrees_with_batch1": sum(a_vllm[k] == a_one[k] for k in a_one),
        f"batch{b}_agrees_with_batch1": sum(a_batch[k] == a_one[k] for k in a_one),
    }


def verdict(result: dict, batch_size: int) -> str:
    n = result["items"]
    agree = result["vllm_agrees_with_batch1"]
    return (f"vLLM (concurrency {result['concurrency']}) answers {result['items_per_s_vllm']:.1f} items/s: "
            f"{result[f'vllm_over_llava_batch{batch_size}']:.1f}x the LLaVA runner at batch {batch_size}, "
            f"{result['vllm_over_llava_batch1']:.1f}x at batch 1; answers agree on {agree}/{n} items"
            + ("" if agree == n else " (NOT all)"))


def main(args: argparse.Namespace) -> int:
    result = run(args)
    print(json.dumps(result), flush=True)
    print(verdict(result, args.batch_size))
    ok = result["vllm_agrees_with_batch1"] == result["items"]
    if not ok:
        print("vLLM's greedy answers differ from the LLaVA runner's", file=sys.stderr)
    return 0 if ok else 1
