"""Small fusions and kernel choices the FEALLM modules share.

`add_projection`: each MPP block ends `x = x + scale * to_out(heads)`. Run as written
that is a matmul into a fresh tensor (with a pass to copy the bias in), a pass for the
scale and a pass for the sum, over (B, N, C) tensors that do not fit in a CPU cache.
Here the scale is folded into the (much smaller) weight and bias and the residual is
added by the matmul or in one pass: the same function up to rounding, and at scale 0
(a fresh MPP's alpha and beta) exactly x, as the unfused form.

`linear`: on a CPU, when no gradient is needed, the MPP's own linear layers run through
oneDNN (`torch.ops.mkldnn._linear_pointwise`, what torch.compile's CPU backend calls)
instead of the BLAS behind `F.linear`. On the AMD EPYC (Zen 5) this was measured on,
MKL's sgemm ran 53-57 GMAC/s on one thread and oneDNN 120-138 for the MPP's shapes.
Results differ by rounding only. `FEALLM_ONEDNN=0` turns it off; training and other
devices always take `F.linear`.

What these read must be a module's own plain weight: `fusable` says when they may.
DeepSpeed ZeRO-3 gathers a weight only while its module runs, and a module that is not
a plain `nn.Linear` (a LoRA or quantized layer, or one with hooks) computes more than
its weight says; callers then call the module.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ONEDNN: bool | None = None  # whether oneDNN's linear works here: probed on first use


def fusable(*modules: nn.Module) -> bool:
    """True when every module is a plain `nn.Linear` without hooks whose weights are not
    partitioned by DeepSpeed ZeRO-3 (a partitioned parameter has a `ds_id`)."""
    return all(
        type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)
        and not any(hasattr(p, "ds_id") for p in m.parameters(recurse=False))
        for m in modules
    )


def onednn_available() -> bool:
    """oneDNN's linear is there, on, and computes a matmul (probed once per process)."""
    global _ONEDNN
    if _ONEDNN is None:
        try:
            x, w = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(4, 3)
            _ONEDNN = (os.environ.get("FEALLM_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()
                       and torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), x @ w.t()))
        except (AttributeError, RuntimeError):
            _ONEDNN = False
    return _ONEDNN


def _onednn(x: Tensor, weight: Tensor) -> bool:
    """oneDNN for this matmul: on a CPU, without autograd, not under torch.compile (whose
    CPU backend picks oneDNN itself and cannot lower the op with an unpacked weight)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and weight.dtype == x.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.compiler.is_compiling() and onednn_available())


def matmul(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias (`F.linear`), through oneDNN on a CPU without autograd."""
    if _onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def batched_matmul(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (B, N, in) @ weight[b].T (weight (B, out, in)) + bias ((B, out) or (out,)) -> (B, N, out)."""
    if _onednn(x, weight):
        per_image = bias is not None and bias.dim() == 2
        outs = [matmul(x[i], weight[i], bias[i] if per_image else bias) for i in range(x.shape[0])]
        return outs[0][None] if len(outs) == 1 else torch.stack(outs)
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias[:, None] if bias.dim() == 2 else bias, x, weight.transpose(1, 2))


def linear(x: Tensor, module: nn.Linear) -> Tensor:
    """module(x), through `matmul` when the module is a plain linear layer."""
    return matmul(x, module.weight, module.bias) if fusable(module) else module(x)


def add_projection(residual: Tensor, heads: Tensor, linear: nn.Linear, scale: Tensor | None = None) -> Tensor:
    """residual + scale * linear(heads): residual (.., out), heads (.., in); scale (1,) or None."""
    if not fusable(linear):
        out = linear(heads)
        return residual + (out if scale is None else scale * out)
    weight, bias = linear.weight, linear.bias
    if scale is not None:
        weight = weight * scale
        bias = None if bias is None else bias * scale
    if _onednn(heads, weight):
        return matmul(heads, weight, bias).add_(residual)
    if torch.is_autocast_enabled(heads.device.type) or not heads.dtype == weight.dtype == residual.dtype:
        return residual + F.linear(heads, weight, bias)  # mixed precision: autocast picks the dtypes
    out = (residual.clone() if bias is None else residual + bias).contiguous()
    out.view(-1, out.shape[-1]).addmm_(heads.reshape(-1, heads.shape[-1]), weight.t())
    return out
