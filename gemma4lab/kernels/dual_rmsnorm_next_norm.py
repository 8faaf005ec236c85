"""Cross-layer fusion: the dual-norm epilogue of layer i *and* layer i+1's ``input_layernorm`` in one program.

``out`` is the residual stream (rounded to the activation dtype, exactly what layer i+1 reads), and
``next_in = rms(out) * next_weight`` is computed from those *rounded* values, so the result equals running the two
steps separately. Saves a full re-read of the residual stream (b*H bytes per token) and one launch per layer.

Bytes per token: read x1, x2, residual (3*b*H), write out and next_in (2*b*H). bf16, H = 2816: 28.2 KB per token.
"""

import torch

from ._common import LaunchConfig, RowConfig, check_row_call, compute_dtype, out_tuple, rms_inv_ref, use_triton
from .dual_rmsnorm import gemma_dual_rmsnorm_residual_scalar_ref, launch_dual

_ACT_NAMES = ("x1", "x2", "residual")
_W_NAMES = ("weight1", "weight2", "weight3", "next_weight")
_OUT_NAMES = ("out[0]", "out[1]")


def gemma_dual_rmsnorm_residual_scalar_next_norm(
        x1: torch.Tensor, weight1: torch.Tensor, x2: torch.Tensor, weight2: torch.Tensor, weight3: torch.Tensor,
        residual: torch.Tensor, scalar: torch.Tensor, next_weight: torch.Tensor, eps: float = 1e-6, *,
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
        config: RowConfig | LaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, next_in)``: ``out`` as in :func:`gemma_dual_rmsnorm_residual_scalar`, ``next_in`` =
    ``rms(out) * next_weight``. ``out=(out_buf, next_buf)`` may pass preallocated buffers."""
    o, nx = (None, None) if out is None else out_tuple("out", out, 2)
    check_row_call((x1, x2, residual), _ACT_NAMES, (weight1, weight2, weight3, next_weight), _W_NAMES, scalar,
                   (o, nx), _OUT_NAMES)
    n, hidden = x1.shape
    if o is None:
        o = torch.empty((n, hidden), dtype=x1.dtype, device=x1.device)
    if nx is None:
        nx = torch.empty((n, hidden), dtype=x1.dtype, device=x1.device)
    if n == 0:
        return o, nx
    if not use_triton(x1):
        ref_out, ref_next = gemma_dual_rmsnorm_residual_scalar_next_norm_ref(x1, weight1, x2, weight2, weight3,
                                                                             residual, scalar, next_weight, eps)
        return o.copy_(ref_out), nx.copy_(ref_next)
    launch_dual(x1, weight1, x2, weight2, weight3, residual, scalar, next_weight, o, nx, eps, config)
    return o, nx


def gemma_dual_rmsnorm_residual_scalar_next_norm_ref(
        x1: torch.Tensor, weight1: torch.Tensor, x2: torch.Tensor, weight2: torch.Tensor, weight3: torch.Tensor,
        residual: torch.Tensor, scalar: torch.Tensor, next_weight: torch.Tensor,
        eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin: the dual epilogue (rounded), then ``rms(out) * next_weight`` from the rounded values."""
    out = gemma_dual_rmsnorm_residual_scalar_ref(x1, weight1, x2, weight2, weight3, residual, scalar, eps)
    ct = compute_dtype(out)
    h = out.to(ct)
    return out, (h * rms_inv_ref(h, eps) * next_weight.to(ct)).to(out.dtype)
