"""The FEALLM projector's outputs, pinned: a faster forward must compute the same function.

Fixed weights and inputs (every parameter drawn from a seeded generator by its name, so
the draw does not depend on how the modules are built or initialised), and the outputs
the projector gave at commit 83b21bc (before any speed work), stored in
tests/data/projector_pinned.pt:

- `tiny`: small widths, a non-square 4 x 6 patch grid, non-square 56 x 70 pixels, batch
  2, pooled LCA (lca_pool=2): the whole output tensor (2 x 25 x 48).
- `paper`: the paper's configuration at LLaVA-1.5-7B widths (CLIP 1024, LLM 4096,
  24 x 24 grid, 336 px), batch 2: per-token mean and standard deviation, and 256 values
  at fixed positions (the whole output would be 19 MB).

With each, the state dict's names and shapes at 83b21bc (`state_shapes`): a checkpoint
saved then must load now.

Weights are random, not the zero-started ones of a fresh projector, so that every
branch (shallow, local, self attention, LCA token) moves the output, and sampling
points of the deformable attentions fall inside, across and outside the value maps.

`python tests/test_projector_pinned.py --write` recomputes the file: only for a change
of the architecture made on purpose, never to make a speed-up pass.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from feallm_llava.model.config import FeallmConfig
from feallm_llava.model.features import TowerFeatures
from feallm_llava.model.projector import FeallmProjector

DATA = Path(__file__).resolve().parent / "data" / "projector_pinned.pt"

CASES = {
    # name: (config fields, vision width, llm width, grid, pixels (H, W), batch)
    "tiny": ({"crop_size": 32, "lca_channels": 16, "lca_norm_groups": 4, "lca_heads": 2, "lca_pool": 2,
              "mpp_heads": 4, "mpp_points": 2, "mpp_dim": 16}, 32, 48, (4, 6), (56, 70), 2),
    "paper": ({}, 1024, 4096, (24, 24), (336, 336), 2),
}
PICKS = 256  # values kept of the paper case, at positions drawn once from a seeded generator
# fp32: the reference and a reordered forward differ by rounding only (sums in another
# order, LayerNorm folded into a matmul, ...); measured differences are ~1e-6 of the scale.
RTOL, ATOL = 1e-4, 1e-5


def pinned_weights(projector: FeallmProjector, seed: int = 1234) -> FeallmProjector:
    """Overwrite every parameter with a draw of a generator seeded per parameter name."""
    for name, param in projector.named_parameters():
        g = torch.Generator().manual_seed(seed + sum(map(ord, name)) * 131 + len(name))
        draw = torch.randn(param.shape, generator=g, dtype=torch.float64)
        if name.endswith("_scale"):  # alpha, beta of the MPP: open the local and self branches
            value = 0.5 + 0.1 * draw
        elif param.dim() == 1 and "norm" in name and name.endswith("weight"):
            value = 1 + 0.1 * draw  # LayerNorm / GroupNorm gains
        elif param.dim() >= 2:
            value = draw / (param[0].numel() ** 0.5)  # fan-in scaled: unit-scale activations
        else:
            value = 0.1 * draw  # biases, region embeddings
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
    return projector


def build(case: str) -> tuple[FeallmProjector, TowerFeatures]:
    fields, vision, llm, grid, (height, width), batch = CASES[case]
    projector = pinned_weights(FeallmProjector(FeallmConfig(**fields), vision, llm)).eval()
    g = torch.Generator().manual_seed(7)
    n = grid[0] * grid[1]
    levels = len(projector.cfg.shallow_layers)
    features = TowerFeatures(
        deep=torch.randn(batch, n, vision, generator=g),
        shallow=[torch.randn(batch, n, vision, generator=g) * (1 + i) for i in range(levels)],
        pixels=torch.randn(batch, 3, height, width, generator=g),
        grid=grid,
    )
    return projector, features


def summary(case: str, out: torch.Tensor) -> dict[str, torch.Tensor]:
    """What is stored of an output: all of it (tiny), or statistics and picked values."""
    if case == "tiny":
        return {"out": out}
    g = torch.Generator().manual_seed(11)
    picks = torch.randint(0, out.numel(), (PICKS,), generator=g)
    return {"token_mean": out.mean(-1), "token_std": out.std(-1), "picked": out.flatten()[picks]}


def compute(case: str) -> dict[str, torch.Tensor]:
    projector, features = build(case)
    with torch.no_grad():
        return summary(case, projector(features))


@pytest.fixture(scope="module")
def pinned() -> dict:
    return torch.load(DATA, weights_only=True)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "blas"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_projector_outputs_equal_the_pinned_ones(case, onednn, pinned, monkeypatch):
    """Both CPU kernels of the MPP's linear layers (model/fused.py) give the pinned outputs."""
    from feallm_llava.model import fused

    if onednn and not fused.onednn_available():
        pytest.skip("oneDNN's linear is not available in this torch")
    monkeypatch.setattr(fused, "_ONEDNN", onednn)
    got = compute(case)
    want = {k: v for k, v in pinned[case].items() if k != "state_shapes"}
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=RTOL, atol=ATOL, msg=lambda m: f"{case}.{key}: {m}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_keys_and_shapes_are_those_of_existing_checkpoints(case, pinned):
    """Checkpoints saved before the speed work load unchanged: same names, same shapes."""
    assert state_shapes(case) == pinned[case]["state_shapes"]


def test_pinned_case_exercises_every_branch_and_the_map_edges():
    """The pin would be blind to a branch whose output were zero, or to points outside."""
    projector, features = build("tiny")
    mpp = projector.mpp
    with torch.no_grad():
        assert float(mpp.local_scale) > 0.3 and float(mpp.self_scale) > 0.3
        assert projector.lca.to_keys.weight.abs().sum() > 0 and mpp.shallow_attn.to_out.weight.abs().sum() > 0
        offsets = mpp.shallow_attn.to_offsets(mpp.query_norm(features.deep)).abs()
        assert (offsets > 2).any() and (offsets < 0.5).any()  # some points leave the 4 x 6 map


def test_projector_with_autograd_computes_the_inference_function():
    """Training takes the unfused modules (F.linear, autograd); inference the fused path."""
    projector, features = build("tiny")
    with torch.no_grad():
        inference = projector(features)
    training = projector(features)
    assert training.requires_grad
    torch.testing.assert_close(training.detach(), inference, rtol=RTOL, atol=ATOL)


def state_shapes(case: str) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in build(case)[0].state_dict().items()}


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    DATA.parent.mkdir(parents=True, exist_ok=True)
    torch.save({case: {**compute(case), "state_shapes": state_shapes(case)} for case in CASES}, DATA)
    print(f"wrote {DATA} ({DATA.stat().st_size} bytes)")
