"""Multi-perspective Projector (feallm_llava/model/mpp.py), tiny dimensions."""

from __future__ import annotations

import pytest
import torch

from feallm_llava.model.config import FeallmConfig
from feallm_llava.model.mpp import MultiPerspectiveProjector

VISION, LLM, GRID = 32, 48, (4, 4)
TINY = {"mpp_heads": 4, "mpp_points": 2, "mpp_dim": 16}


def make(seed=0, **overrides) -> MultiPerspectiveProjector:
    torch.manual_seed(seed)
    return MultiPerspectiveProjector(FeallmConfig(**{**TINY, **overrides}), VISION, LLM)


def inputs(batch=2, levels=4, regions=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1]
    deep = torch.randn(batch, n, VISION, generator=g)
    shallow = [torch.randn(batch, n, VISION, generator=g) for _ in range(levels)]
    local = torch.randn(batch, regions, VISION, generator=g)
    return deep, shallow, local


def perturb_(module: torch.nn.Module, seed=2) -> None:
    """Move every parameter a little, as training would (no zero stays zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_fresh_mpp_is_exactly_the_mlp_on_the_deep_features():
    mpp = make()
    deep, shallow, local = inputs()
    out = mpp(deep, shallow, GRID, local)
    assert out.shape == (2, 16, LLM)
    assert torch.equal(out, mpp.mlp(deep))


def test_first_backward_reaches_exactly_the_documented_parameters():
    mpp = make()
    deep, shallow, local = inputs()
    local.requires_grad_()
    mpp(deep, shallow, GRID, local).square().mean().backward()
    nonzero = {n for n, p in mpp.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert nonzero == {
        "shallow_attn.to_out.weight", "shallow_attn.to_out.bias",  # eq. 4 zero output projection
        "local_scale", "self_scale",  # eq. 6 / 7 scales start at 0
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
    }
    assert all(p.grad is not None for p in mpp.parameters())  # the rest: present, zero
    assert local.grad.abs().sum() == 0  # F'_local (LCA's to_keys) waits for alpha to move


def test_every_parameter_gets_a_gradient_after_one_optimizer_step():
    mpp = make()
    deep, shallow, local = inputs()
    local = local.requires_grad_()
    opt = torch.optim.SGD(mpp.parameters(), lr=0.5)
    mpp(deep, shallow, GRID, local).square().mean().backward()
    opt.step()
    opt.zero_grad()
    local.grad = None
    mpp(deep, shallow, GRID, local).square().mean().backward()
    silent = [n for n, p in mpp.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert silent == []
    assert local.grad.abs().sum() > 0  # gradient now flows back into F'_local


def test_trained_mpp_reads_shallow_layers_and_local_clues():
    mpp = make()
    perturb_(mpp)
    deep, shallow, local = inputs()
    with torch.no_grad():
        base = mpp(deep, shallow, GRID, local)
        other_shallow = mpp(deep, [s + 1 for s in shallow], GRID, local)
        other_local = mpp(deep, shallow, GRID, local + 1)
    assert not torch.allclose(base, other_shallow)
    assert not torch.allclose(base, other_local)
    assert not torch.allclose(base, mpp.mlp(deep))


def test_mpp_off_is_only_the_upstream_mlp():
    mpp = make(mpp=False)
    assert {n for n, _ in mpp.named_parameters()} == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
    deep, _, _ = inputs()
    assert torch.equal(mpp(deep, [], GRID), mpp.mlp(deep))


def test_use_local_in_mpp_off_drops_the_local_cross_attention():
    mpp = make(use_local_in_mpp=False)
    assert not any(n.startswith("local_") for n, _ in mpp.named_parameters())
    perturb_(mpp)
    deep, shallow, _ = inputs()
    assert mpp(deep, shallow, GRID).shape == (2, 16, LLM)


def test_fewer_shallow_layers_make_fewer_levels():
    mpp = make(shallow_layers=(8, 18))
    assert mpp.shallow_attn.levels == 2 and len(mpp.shallow_norms) == 2
    deep, shallow, local = inputs(levels=2)
    assert mpp(deep, shallow, GRID, local).shape == (2, 16, LLM)
    with pytest.raises(ValueError, match="2 shallow layers"):
        mpp(deep, shallow + shallow, GRID, local)


def test_mpp_built_with_local_clues_refuses_to_run_without_them():
    deep, shallow, _ = inputs()
    with pytest.raises(ValueError, match="F'_local"):
        make()(deep, shallow, GRID, None)


def test_mpp_attention_width_zero_means_vision_width():
    mpp = make(mpp_dim=0)
    assert mpp.shallow_attn.value_in.out_features == VISION
    assert make().shallow_attn.value_in.out_features == 16
