"""Projector cost at real dimensions: CLIP ViT-L/14-336 tower vs upstream mlp2x_gelu vs FEALLM.

    python -m feallm_llava.bench projector [--device cpu] [--dtype float32] [--batch 1]
                                          [--reps 5] [--warmup 2] [--threads N]
                                          [--set mpp_dim=0 ...]

The tower is a randomly initialised `CLIPVisionModel` with ViT-L/14-336 dimensions (no
download; timing does not depend on the weights), run as llava runs it
(`output_hidden_states=True`). Its hidden states feed the projectors: deep = layer 23
(llava's -2), shallow = `cfg.shallow_layers`, patch tokens only. LLM width 4096
(Vicuna-7B). Times are the median of `--reps` forwards under `torch.no_grad` after
`--warmup` untimed ones, timed round-robin across the modules; wall-clock and process
CPU time are both printed. Target: FEALLM projector <= 10% of the tower.

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
TARGET = 0.10  # the design's target: projector <= 10% of the tower's forward time


EXAMPLES = """\
  python -m feallm_llava.bench projector --threads 2
  python -m feallm_llava.bench projector --device cuda --dtype bfloat16 --batch 16"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=1, help="images per forward (default: 1)")
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

    pixels = torch.randn(args.batch, 3, vcfg.image_size, vcfg.image_size, device=device, dtype=dtype)
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states  # 25 x (B, 577, 1024)
        features = TowerFeatures(
            deep=hidden[DEEP_LAYER][:, 1:],  # (B, 576, 1024), CLS dropped
            shallow=[hidden[i][:, 1:] for i in cfg.shallow_layers],
            pixels=pixels,
            grid=grid,
        )
        modules: dict[str, tuple[nn.Module, Callable[[], object]]] = {
            "CLIP ViT-L/14-336 tower": (tower, lambda: tower(pixels, output_hidden_states=True)),
            "upstream mlp2x_gelu": (mlp, lambda: mlp(features.deep)),
            "FEALLM projector (LCA+MPP)": (projector, lambda: projector(features)),
        }
        if projector.lca is not None:
            modules["  of which LCA"] = (projector.lca, lambda: projector.lca(pixels))
        timings = interleaved_medians({k: fn for k, (_, fn) in modules.items()},
                                      args.reps, args.warmup, device)
        tokens = projector(features).shape[1]

    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print(f"device={device} dtype={args.dtype} batch={args.batch} reps={args.reps} "
          f"warmup={args.warmup} threads={threads} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')} grid={grid[0]}x{grid[1]} "
          f"vision_width={vcfg.hidden_size} llm_width={LLM_HIDDEN}")
    print(f"FeallmConfig: {cfg}")
    print(f"{'module':<28} {'params':>13} {'wall ms':>9} {'/ tower':>8} {'cpu ms':>9} {'/ tower':>8}")
    tower_t = timings["CLIP ViT-L/14-336 tower"]
    for name, (module, _) in modules.items():
        t = timings[name]
        print(f"{name:<28} {count(module):>13,} {t.wall_s * 1e3:>9.1f} {t.wall_s / tower_t.wall_s:>8.1%} "
              f"{t.cpu_s * 1e3:>9.1f} {t.cpu_s / tower_t.cpu_s:>8.1%}")
    ratio = timings["FEALLM projector (LCA+MPP)"].wall_s / tower_t.wall_s
    print(f"FEALLM projector / tower (wall) = {ratio:.1%} (target <= {TARGET:.0%}: "
          f"{'met' if ratio <= TARGET else 'NOT met'}); tokens out = {tokens} "
          f"({grid[0] * grid[1]} MPP + {projector.num_extra_tokens()} local)")
    return 0
