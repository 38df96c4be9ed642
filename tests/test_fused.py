"""feallm_llava/model/fused.py: a residual update as one matmul, and its ZeRO-3 fallback."""

from __future__ import annotations

import torch

from feallm_llava.model.fused import add_projection, fusable


def test_add_projection_is_residual_plus_scaled_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 7)
    residual, heads = torch.randn(2, 3, 7), torch.randn(2, 3, 5)
    scale = torch.tensor([0.4])
    torch.testing.assert_close(add_projection(residual, heads, linear, scale), residual + scale * linear(heads))
    torch.testing.assert_close(add_projection(residual, heads, linear), residual + linear(heads))


def test_add_projection_at_scale_zero_returns_the_residual_exactly():
    linear = torch.nn.Linear(5, 7)
    residual = torch.randn(2, 3, 7)
    assert torch.equal(add_projection(residual, torch.randn(2, 3, 5), linear, torch.zeros(1)), residual)


def test_add_projection_gradients_equal_the_unfused_ones():
    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 7)
    scale = torch.tensor([0.4], requires_grad=True)
    residual, heads = torch.randn(2, 3, 7, requires_grad=True), torch.randn(2, 3, 5, requires_grad=True)
    grads = []
    for fn in (lambda: add_projection(residual, heads, linear, scale), lambda: residual + scale * linear(heads)):
        params = [residual, heads, scale, linear.weight, linear.bias]
        grads.append(torch.autograd.grad(fn().square().sum(), params))
    for fused, plain in zip(*grads):
        torch.testing.assert_close(fused, plain)


def test_weights_partitioned_by_deepspeed_zero3_are_not_read_outside_their_module():
    linear = torch.nn.Linear(5, 7)
    assert fusable(linear)
    linear.weight.ds_id = 3  # what ZeRO-3 leaves on a partitioned parameter
    calls = []
    linear.register_forward_hook(lambda *args: calls.append(1))
    residual, heads = torch.randn(2, 7), torch.randn(2, 5)
    assert not fusable(linear)
    torch.testing.assert_close(add_projection(residual, heads, linear), residual + linear(heads))
    assert calls  # the module itself ran (its hooks gather the weight)


def test_onednn_only_without_autograd_on_cpu_and_not_under_torch_compile(monkeypatch):
    from feallm_llava.model import fused

    if not fused.onednn_available():
        import pytest

        pytest.skip("oneDNN's linear is not available in this torch")
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(3, 5), torch.randn(4, 5, requires_grad=True)
    fused.matmul(x, w)  # autograd wants the weight's gradient: F.linear
    with torch.no_grad():
        torch.testing.assert_close(fused.matmul(x, w), x @ w.t())
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        fused.matmul(x, w)  # torch.compile lowers F.linear to oneDNN itself
    assert calls == [1]


def test_add_projection_under_autocast_takes_autocasts_dtypes():
    """Mixed-precision training (QLoRA's bf16): the activations arrive in bf16, the
    projector's weights stay float32; the result is what the unfused form gives."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 6)
    residual, heads = torch.randn(2, 5, 6), torch.randn(2, 5, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = residual + linear(heads)
        got = add_projection(residual, heads, linear)
    assert got.dtype == want.dtype and torch.equal(got, want)
