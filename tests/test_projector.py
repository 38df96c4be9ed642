"""FeallmProjector, FeallmConfig and the bench dispatcher, tiny dimensions."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from feallm_llava.model.config import FeallmConfig
from feallm_llava.model.features import TowerFeatures
from feallm_llava.model.projector import FeallmProjector

VISION, LLM, GRID = 32, 48, (4, 4)
N = GRID[0] * GRID[1]
TINY = {"crop_size": 32, "lca_channels": 16, "lca_norm_groups": 4, "lca_heads": 2,
        "mpp_heads": 4, "mpp_points": 2, "mpp_dim": 16}
LLAMA_LEAF_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def make(seed=0, **overrides) -> FeallmProjector:
    torch.manual_seed(seed)
    return FeallmProjector(FeallmConfig(**{**TINY, **overrides}), VISION, LLM)


def features(batch=2, levels=4, seed=1, image=(56, 70)) -> TowerFeatures:
    g = torch.Generator().manual_seed(seed)
    return TowerFeatures(
        deep=torch.randn(batch, N, VISION, generator=g),
        shallow=[torch.randn(batch, N, VISION, generator=g) for _ in range(levels)],
        pixels=torch.randn(batch, 3, *image, generator=g),
        grid=GRID,
    )


def upstream_mlp2x_gelu(seed=5) -> nn.Sequential:
    """What llava's builder makes for mm_projector_type='mlp2x_gelu'."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(VISION, LLM), nn.GELU(), nn.Linear(LLM, LLM))


def perturb_(module: nn.Module, seed=3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


# -- shapes and token counts --

def test_projector_emits_n_mpp_tokens_then_one_local_token():
    proj = make()
    out = proj(features())
    assert out.shape == (2, N + 1, LLM) and proj.num_extra_tokens() == 1
    with torch.no_grad():
        torch.testing.assert_close(out[:, N:], proj.lca(features().pixels).token)


def test_projector_without_lca_emits_only_the_n_tokens():
    proj = make(lca=False)
    assert proj.lca is None and proj.num_extra_tokens() == 0
    assert proj(features()).shape == (2, N, LLM)


def test_projector_with_lca_and_mpp_off_is_mlp2x_plus_local_token():
    proj = make(mpp=False)
    feats = features(levels=0)
    out = proj(feats)
    assert torch.equal(out[:, :N], proj.mlp(feats.deep)) and out.shape == (2, N + 1, LLM)
    assert proj.lca.to_keys is None  # no F'_local head when nothing reads it


# -- fresh equivalence and warm start from upstream mm_projector.bin --

def test_fresh_projector_with_upstream_mlp_weights_equals_upstream_mlp2x_gelu(tmp_path):
    upstream = upstream_mlp2x_gelu()
    torch.save(upstream.state_dict(), tmp_path / "mm_projector.bin")
    proj = make()
    result = proj.load_state_dict(torch.load(tmp_path / "mm_projector.bin"))
    feats = features()
    with torch.no_grad():
        out = proj(feats)
        assert torch.equal(out[:, :N], upstream(feats.deep))  # exactly the 16 upstream tokens
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == {k for k in proj.state_dict() if not k.startswith("mpp.mlp.")}


def test_warm_start_accepts_llava_prefixed_keys_and_keeps_lca_mpp_init():
    upstream = upstream_mlp2x_gelu()
    proj = make()
    before = {k: v.clone() for k, v in proj.state_dict().items() if not k.startswith("mpp.mlp.")}
    proj.load_state_dict({f"model.mm_projector.{k}": v for k, v in upstream.state_dict().items()})
    assert torch.equal(proj.mlp[2].weight, upstream[2].weight)
    assert all(torch.equal(v, proj.state_dict()[k]) for k, v in before.items())


def test_warm_start_from_another_model_width_names_both_widths():
    other = nn.Sequential(nn.Linear(VISION, 64), nn.GELU(), nn.Linear(64, 64))
    with pytest.raises(ValueError, match=rf"{VISION} -> 64.*{VISION} -> {LLM}"):
        make().load_state_dict(other.state_dict())


def test_full_state_dict_round_trip_restores_outputs_and_is_strict():
    trained = make()
    perturb_(trained)
    state = trained.state_dict()
    fresh = make(seed=9)
    fresh.load_state_dict(state)
    feats = features()
    with torch.no_grad():
        torch.testing.assert_close(fresh(feats), trained(feats), atol=0, rtol=0)
    partial = {k: v for k, v in state.items() if k != "lca.to_token.weight"}
    with pytest.raises(RuntimeError, match="lca.to_token.weight"):
        make().load_state_dict(partial)


def test_projector_state_is_parameters_only():
    """llava saves only parameters into mm_projector.bin: no buffer may carry state."""
    proj = make()
    assert set(proj.state_dict()) == {n for n, _ in proj.named_parameters()}


# -- LoRA safety --

def test_no_projector_module_has_a_llama_leaf_name():
    for cfg in ({}, {"mpp": False}, {"lca": False}, {"use_local_in_mpp": False}):
        names = {name.rsplit(".", 1)[-1] for name, _ in make(**cfg).named_modules()}
        assert not names & LLAMA_LEAF_NAMES, cfg


# -- gradients --

def test_first_backward_and_after_one_step_gradients_reach_the_documented_parameters():
    proj = make()
    feats = features()
    opt = torch.optim.SGD(proj.parameters(), lr=0.5)
    proj(feats).square().mean().backward()
    zero = {n for n, p in proj.named_parameters() if p.grad is None or p.grad.abs().sum() == 0}
    # The LCA learns from the first step through F_local; only its F'_local head waits.
    assert {n for n in zero if n.startswith("lca.")} == {"lca.to_keys.weight", "lca.to_keys.bias"}
    assert "mpp.local_scale" not in zero and "mpp.shallow_attn.to_out.weight" not in zero
    opt.step()
    opt.zero_grad()
    proj(feats).square().mean().backward()
    assert [n for n, p in proj.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []


# -- dtype and bad input --

def test_projector_runs_in_bf16_and_casts_tower_features():
    proj = make().to(torch.bfloat16)
    out = proj(features())  # fp32 features from a fp32 tower
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_projector_rejects_a_plain_tensor_from_an_upstream_tower():
    with pytest.raises(TypeError, match="TowerFeatures"):
        make()(torch.randn(2, N, VISION))


def test_projector_rejects_wrong_shallow_count_and_wrong_grid():
    with pytest.raises(ValueError, match=r"4 shallow layers \[3, 8, 13, 18\]"):
        make()(features(levels=3))
    feats = features()
    feats.grid = (3, 5)
    with pytest.raises(ValueError, match=r"grid \(3, 5\)"):
        make()(feats)


def test_tower_features_to_moves_every_tensor():
    feats = features().to(torch.float64)
    assert {feats.deep.dtype, feats.pixels.dtype, *(s.dtype for s in feats.shallow)} == {torch.float64}


# -- config --

def test_config_round_trips_through_a_llava_config_json():
    cfg = FeallmConfig(crop_types=("side_half", "corner_3q"), shallow_layers=(8, 18), lca_heads=8,
                       use_local_in_mpp=False)
    attrs = json.loads(json.dumps(cfg.to_llava_attrs()))
    assert attrs["mm_feallm_shallow_layers"] == [8, 18]
    assert all(k.startswith("mm_feallm_") for k in attrs)
    assert FeallmConfig.from_llava_config(SimpleNamespace(**attrs, mm_projector_type="feallm")) == cfg
    assert FeallmConfig.from_llava_config(attrs) == cfg


def test_config_fields_missing_from_a_llava_config_take_defaults():
    cfg = FeallmConfig.from_llava_config(SimpleNamespace(mm_feallm_crop_size=96, mm_hidden_size=1024))
    assert cfg == dataclasses.replace(FeallmConfig(), crop_size=96)
    assert cfg.shallow_layers == (3, 8, 13, 18) and cfg.num_regions == 16


def test_config_reads_cli_strings():
    cfg = FeallmConfig.from_llava_config(
        {"mm_feallm_shallow_layers": "3,13", "mm_feallm_lca": "false", "mm_feallm_crop_types": "side_3q"}
    )
    assert cfg.shallow_layers == (3, 13) and cfg.lca is False and cfg.crop_types == ("side_3q",)


def test_config_rejects_unknown_crop_type_naming_the_valid_ones():
    with pytest.raises(ValueError, match="side_half"):
        FeallmConfig(crop_types=("side_half", "forehead"))


# -- bench dispatcher --

def test_bench_dispatcher_lists_projector_benchmark():
    done = subprocess.run([sys.executable, "-m", "feallm_llava.bench", "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "projector" in done.stdout
    from feallm_llava.bench.__main__ import BENCHMARKS, build_parser

    args = build_parser("projector").parse_args(["projector", "--reps", "3", "--set", "mpp_dim=0"])
    assert set(BENCHMARKS) >= {"projector"} and args.reps == 3 and args.set == ["mpp_dim=0"]


def test_bench_verdict_lines():
    from feallm_llava.bench.projector import mlp_verdict, tower_verdict
    from feallm_llava.bench.throughput import verdict

    assert mlp_verdict({1: 1.18, 8: 1.21}) == (
        "FEALLM projector / mlp2x_gelu = 1.21x (target <= 1.25x: met; batch 1: 1.18x, batch 8: 1.21x)")
    assert "NOT met" in mlp_verdict({1: 1.3})
    assert tower_verdict(0.585, 0.08, 1, "bfloat16") == (
        "FEALLM projector / tower = 8.0% at batch 1, bfloat16, CUDA graph (target <= 10%: met; "
        "eager 58.5%, CUDA graph 8.0%)")
    results = [{"projector": "mlp2x_gelu", "prompts": "sampled", "speedup8": 5.0, "speedup8_cpu_time": 5.1},
               {"projector": "feallm", "prompts": "sampled", "speedup8": 4.3, "speedup8_cpu_time": 4.1}]
    assert verdict(results, 8) == ("feallm (sampled prompts) batch 8 / batch 1 = 4.3x "
                                   "(target >= 4x: met; CPU time 4.1x)")
    from feallm_llava.bench.__main__ import build_parser

    args = build_parser("throughput").parse_args(["throughput", "--batch-size", "8", "16", "--set", "crop_size=24"])
    assert args.batch_size == [8, 16] and args.set == ["crop_size=24"] and not args.paper
    from feallm_llava.bench.projector import _typed, parse_overrides
    from feallm_llava.bench.throughput import demo_scale
    from feallm_llava.demo.config import DemoConfig

    scale = FeallmConfig(**_typed(parse_overrides(demo_scale())))  # the demo's fields, all valid
    assert (scale.crop_size, scale.lca_pool, scale.mpp_dim) == (DemoConfig.crop_size, DemoConfig.lca_pool, 0)


@pytest.mark.parametrize("direct", [True, False])
def test_inference_output_is_the_mlp_and_the_local_token_bit_for_bit(direct, monkeypatch):
    """Without autograd the MLP's last matmul writes into the result image by image
    (from DIRECT_MIN output values an image; else a concatenation)."""
    from feallm_llava.model import projector as module

    monkeypatch.setattr(module, "DIRECT_MIN", 0 if direct else 10 ** 9)
    proj = make()
    perturb_(proj)
    feats = features(batch=3)
    with torch.no_grad():
        got = proj(feats)
        local = proj.lca(feats.pixels)
        x = proj.mpp.enrich(feats.deep, feats.shallow, GRID, local.keys)
        assert torch.equal(got, torch.cat([proj.mlp(x), local.token], dim=1))
