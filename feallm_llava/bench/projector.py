"""Projector cost at real dimensions: CLIP ViT-L/14-336 tower vs upstream mlp2x_gelu vs FEALLM.

    python -m feallm_llava.bench projector [--device cpu] [--dtype float32] [--batch 1 8]
                                          [--reps 5] [--warmup 2] [--threads N]
                                          [--set mpp_dim=0 ...]

The tower is a randomly initialised `CLIPVisionModel` with ViT-L/14-336 dimensions (no
download; timing does not depend on the weights), run as llava runs it
(`output_hidden_states=True`), at the first `--batch` size only; its hidden states feed
the projectors at every batch size (tiled over the batch): deep = layer 23 (llava's
-2), shallow = `cfg.shallow_layers`, patch tokens only. LLM width 4096 (Vicuna-7B).
Times are the median of `--reps` forwards under `torch.no_grad` after `--warmup`
untimed ones, timed round-robin across the modules; wall-clock and process CPU time are
both printed. On CUDA the FEALLM projector is also timed replayed from CUDA graphs
(model/graphs.py; FEALLM_CUDA_GRAPHS=1 turns them on for inference).

Verdicts: FEALLM projector <= 1.25x mlp2x_gelu (the CPU target, fp32, every batch size:
the worst one counts), and on CUDA FEALLM projector <= 10% of the tower at the first
batch size (the GPU target, bf16, batch 1).

On a machine shared with other jobs, run with `OMP_WAIT_POLICY=PASSIVE` (or
`--threads 1`): with OpenMP's default spin-waiting, every small op of the projector
waits for a descheduled sibling thread, which inflates its time 3-4x (measured on a 2-core
box at load 6: LCA 262-306 ms active vs 71-83 ms passive) while the tower's large
matmuls barely notice.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from feallm_llava.errors import UsageError
from feallm_llava.model.config import FeallmConfig
from feallm_llava.model.mpp import mlp2x_gelu
from feallm_llava.model.features import TowerFeatures
from feallm_llava.model.projector import FeallmProjector

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LLM_HIDDEN = 4096  # Vicuna-7B / LLaMA-7B hidden size
DEEP_LAYER = 23  # llava-1.5: mm_vision_select_layer = -2 -> hidden_states[23] of 25
TARGET = 0.10  # the GPU target: projector <= 10% of the tower's forward time (bf16, batch 1)
MLP_TARGET = 1.25  # the CPU target: projector <= 1.25x upstream mlp2x_gelu (fp32)


EXAMPLES = """\
  python -m feallm_llava.bench projector --threads 2
  python -m feallm_llava.bench projector --device cuda --dtype bfloat16 --batch 1 16"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8],
                        help="images per forward, one or more sizes (default: 1 8)")
    parser.add_argument("--reps", type=int, default=5, help="timed forwards (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards first (default: 2)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a FeallmConfig field, e.g. --set mpp_dim=0 (repeatable)")


def clip_vit_l14_336() -> nn.Module:
    """Randomly initialised CLIP ViT-L/14 at 336 px (LLaVA-1.5's tower), no download."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14,
    ))


@dataclass
class Timing:
    wall_s: float  # median wall-clock seconds per forward
    cpu_s: float  # median process CPU seconds per forward (all intra-op threads)


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int, warmup: int,
                        device: torch.device) -> dict[str, Timing]:
    """Median time per forward of each fn, timed round-robin (tower, mlp, projector, ...).

    Round-robin puts every module under the same background load, which matters on a
    shared machine: the ratio projector / tower stays meaningful when absolute times drift.
    """
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {n: Timing(statistics.median(wall[n]), statistics.median(cpu[n])) for n in fns}


def parse_overrides(items: list[str]) -> dict[str, str]:
    fields = {f.name for f in dataclasses.fields(FeallmConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise UsageError(f"--set {item!r}: expected FIELD=VALUE with FIELD in {sorted(fields)}")
        out[key] = value
    return out


def _typed(overrides: dict[str, str]) -> dict[str, object]:
    """Cast --set strings to the field's type (int fields; bools and lists parse in config)."""
    ints = {f.name for f in dataclasses.fields(FeallmConfig) if f.type == "int"}
    return {k: int(v) if k in ints else v for k, v in overrides.items()}


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


TOWER, MLP, FEALLM, LCA, GRAPHED = ("CLIP ViT-L/14-336 tower", "upstream mlp2x_gelu", "FEALLM projector (LCA+MPP)",
                                    "  of which LCA", "FEALLM projector, CUDA graph")


def main(args: argparse.Namespace) -> int:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = FeallmConfig(**_typed(parse_overrides(args.set)))
    torch.manual_seed(0)
    tower = clip_vit_l14_336().to(device, dtype).eval()
    vcfg = tower.config
    grid = (vcfg.image_size // vcfg.patch_size,) * 2  # (24, 24)
    mlp = mlp2x_gelu(vcfg.hidden_size, LLM_HIDDEN).to(device, dtype).eval()
    projector = FeallmProjector(cfg, vcfg.hidden_size, LLM_HIDDEN).to(device, dtype).eval()
    projector.cuda_graphs = False  # the eager path; the graphed one is timed on its own row
    params = {TOWER: count(tower), MLP: count(mlp), FEALLM: count(projector), GRAPHED: count(projector)}
    if projector.lca is not None:
        params[LCA] = count(projector.lca)

    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print(f"device={device} dtype={args.dtype} batch={' '.join(map(str, args.batch))} reps={args.reps} "
          f"warmup={args.warmup} threads={threads} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')} grid={grid[0]}x{grid[1]} "
          f"vision_width={vcfg.hidden_size} llm_width={LLM_HIDDEN}")
    print(f"FeallmConfig: {cfg}")
    first = args.batch[0]
    pixels = torch.randn(first, 3, vcfg.image_size, vcfg.image_size, device=device, dtype=dtype)
    mlp_ratios: dict[int, float] = {}
    tower_ratio = graphed_ratio = None
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states  # 25 x (B, 577, 1024)
        for batch in args.batch:
            fns = _modules(tower, mlp, projector, hidden, cfg, grid, batch, first, device, dtype)
            timings = interleaved_medians(fns, args.reps, args.warmup, device)
            tokens = projector(_features(hidden, cfg, grid, batch, device, dtype)).shape[1]
            print(f"-- batch {batch}")
            print(f"{'module':<28} {'params':>13} {'wall ms':>9} {'/ mlp':>7} {'cpu ms':>9} {'/ mlp':>7}")
            base = timings[MLP]
            for name, t in timings.items():
                print(f"{name:<28} {params[name]:>13,} {t.wall_s * 1e3:>9.1f} {t.wall_s / base.wall_s:>6.2f}x "
                      f"{t.cpu_s * 1e3:>9.1f} {t.cpu_s / base.cpu_s:>6.2f}x")
            mlp_ratios[batch] = timings[FEALLM].wall_s / base.wall_s
            if TOWER in timings:
                tower_ratio = timings[FEALLM].wall_s / timings[TOWER].wall_s
                print(f"FEALLM projector / tower (wall) = {tower_ratio:.1%}; tokens out = {tokens} "
                      f"({grid[0] * grid[1]} MPP + {projector.num_extra_tokens()} local)")
                if GRAPHED in timings:
                    graphed_ratio = timings[GRAPHED].wall_s / timings[TOWER].wall_s
                    print(f"FEALLM projector, CUDA graph / tower (wall) = {graphed_ratio:.1%}")
    print(mlp_verdict(mlp_ratios))
    if device.type == "cuda" and tower_ratio is not None:
        print(tower_verdict(tower_ratio, graphed_ratio, first, args.dtype))
    return 0


def mlp_verdict(ratios: dict[int, float]) -> str:
    """One line: the worst FEALLM / mlp2x_gelu ratio over the batch sizes, each listed."""
    worst = max(ratios.values())
    sizes = ", ".join(f"batch {b}: {r:.2f}x" for b, r in ratios.items())
    return (f"FEALLM projector / mlp2x_gelu = {worst:.2f}x (target <= {MLP_TARGET}x: "
            f"{'met' if worst <= MLP_TARGET else 'NOT met'}; {sizes})")


def tower_verdict(eager: float, graphed: float | None, batch: int, dtype: str) -> str:
    """One line: the projector's share of the tower's time, the better of eager and graphed."""
    best, path = (graphed, "CUDA graph") if graphed is not None and graphed < eager else (eager, "eager")
    other = "" if graphed is None else f"; eager {eager:.1%}, CUDA graph {graphed:.1%}"
    return (f"FEALLM projector / tower = {best:.1%} at batch {batch}, {dtype}, {path} (target <= {TARGET:.0%}: "
            f"{'met' if best <= TARGET else 'NOT met'}{other})")


def _features(hidden, cfg: FeallmConfig, grid, batch: int, device, dtype) -> TowerFeatures:
    """TowerFeatures of `batch` images from the tower's hidden states (tiled when the tower
    ran on fewer), patch tokens sliced as llava slices them (CLS dropped, not copied)."""
    reps = -(-batch // hidden[0].shape[0])
    states = [h.repeat(reps, 1, 1)[:batch] for h in hidden] if reps > 1 else [h[:batch] for h in hidden]
    g = torch.Generator(device="cpu").manual_seed(batch)
    pixels = torch.randn(batch, 3, 336, 336, generator=g).to(device, dtype)
    return TowerFeatures(deep=states[DEEP_LAYER][:, 1:], shallow=[states[i][:, 1:] for i in cfg.shallow_layers],
                         pixels=pixels, grid=grid)


def _modules(tower, mlp, projector, hidden, cfg, grid, batch: int, first: int, device, dtype) -> dict[str, Callable]:
    """What is timed at this batch size, in round-robin order."""
    features = _features(hidden, cfg, grid, batch, device, dtype)
    fns: dict[str, Callable[[], object]] = {}
    if batch == first:
        pixels = features.pixels
        fns[TOWER] = lambda: tower(pixels, output_hidden_states=True)
    fns[MLP] = lambda: mlp(features.deep)
    fns[FEALLM] = lambda: projector(features)
    if device.type == "cuda":
        from feallm_llava.model.graphs import CapturedForward

        graphed = CapturedForward(projector._forward)
        fns[GRAPHED] = lambda: graphed(features)
    if projector.lca is not None:
        fns[LCA] = lambda: projector.lca(features.pixels)
    return fns
