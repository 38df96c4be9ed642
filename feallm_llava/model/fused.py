"""Small fusions the FEALLM modules share: a residual update as one matmul.

Each MPP block ends `x = x + scale * to_out(heads)`. Run as written that is a matmul
into a fresh tensor (with a pass to copy the bias in), a pass for the scale and a pass
for the sum, over (B, N, C) tensors that do not fit in a CPU cache. `add_projection`
instead starts from `x + scale * bias` and lets the matmul accumulate into it, with
the scale folded into the (much smaller) weight: one pass instead of three, the same
function up to rounding. At scale 0 (a fresh MPP's alpha and beta) it returns x
exactly, as the unfused form does.

DeepSpeed ZeRO-3 gathers a module's weight only while that module runs, so code that
reads another module's weight must not run on partitioned weights: `fusable` says
when it may, and callers fall back to calling the modules.
"""

from __future__ import annotations

from torch import Tensor, nn


def fusable(*modules: nn.Module) -> bool:
    """False when DeepSpeed ZeRO-3 partitions a weight of `modules` (it has a `ds_id`)."""
    return not any(hasattr(p, "ds_id") for m in modules for p in m.parameters(recurse=False))


def add_projection(residual: Tensor, heads: Tensor, linear: nn.Linear, scale: Tensor | None = None) -> Tensor:
    """residual + scale * linear(heads): residual (.., out), heads (.., in); scale (1,) or None."""
    if not fusable(linear):
        out = linear(heads)
        return residual + (out if scale is None else scale * out)
    weight, bias = linear.weight, linear.bias
    if scale is not None:
        weight = weight * scale
        bias = None if bias is None else bias * scale
    out = (residual.clone() if bias is None else residual + bias).contiguous()
    out.view(-1, out.shape[-1]).addmm_(heads.reshape(-1, heads.shape[-1]), weight.t())
    return out
