"""The published row-kernel layout, as a benchmark peer: one program per row, one block of the next power of two of
the hidden size, the whole row in registers.

This is the layout the published fused-norm kernels use (the seed pull request's, and the serving engines' RMSNorm
kernels): simple, and every row computed the same way whatever the row count. gemma4lab's row kernels use another
(a persistent grid of a few programs per SM looping over rows, ``gemma4lab.kernels.RowConfig``); ``bench-kernels``
times both, in and out of a CUDA graph, so the claim "ours is at least as fast" is a measurement, not a belief.
Written here from that description, for the two epilogues the comparison is about:

* ``rmsnorm_residual_scalar``: ``(rms(x)·w + residual)·scalar``;
* ``dual_rmsnorm_residual_scalar``: ``(rms(rms(x1)·w1 + rms(x2)·w2)·w3 + residual)·scalar``.

Same fp32 math and one rounding at the store as the package's kernels and their references.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gemma4lab.kernels._common import check_rows, to_dtype


@triton.jit
def _rms_scale(x, mask, n, eps):
    # x · 1/sqrt(mean(x²) + eps) over the valid lanes (fp32)
    ms = tl.sum(tl.where(mask, x * x, 0.0), axis=0) / n
    return x * (1.0 / tl.sqrt(ms + eps))


@triton.jit
def _rms_residual_scalar_row(x_ptr, w_ptr, r_ptr, s_ptr, o_ptr, n, stride, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr).to(tl.float32)
    y = (_rms_scale(x, mask, n, eps) * w + r) * s
    tl.store(o_ptr + row * stride + cols, to_dtype(y, o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dual_rms_residual_scalar_row(x1_ptr, w1_ptr, x2_ptr, w2_ptr, w3_ptr, r_ptr, s_ptr, o_ptr, n, stride, eps,
                                  BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    a = tl.load(x1_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x2_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    w1 = tl.load(w1_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(w2_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    w3 = tl.load(w3_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr).to(tl.float32)
    m = _rms_scale(a, mask, n, eps) * w1 + _rms_scale(b, mask, n, eps) * w2
    y = (_rms_scale(m, mask, n, eps) * w3 + r) * s
    tl.store(o_ptr + row * stride + cols, to_dtype(y, o_ptr.dtype.element_ty), mask=mask)


def _warps(block: int) -> int:
    """The usual choice for a whole row in one program: enough warps that each thread holds a few elements."""
    return max(1, min(16, block // 256))


def _check(rows: tuple[torch.Tensor, ...], weights: tuple[torch.Tensor, ...], scalar: torch.Tensor,
           out: torch.Tensor) -> int:
    """Same-shaped ``[tokens, hidden]`` rows sharing one row stride (the kernels take one), ``hidden`` weights."""
    first = check_rows("row input 0", rows[0])
    n = first.shape[1]
    for name, t in (*((f"row input {i}", r) for i, r in enumerate(rows)), ("out", out)):
        check_rows(name, t, hidden=n, dtype=first.dtype, device=first.device)
        if t.shape[0] != first.shape[0] or t.stride(0) != first.stride(0):
            raise ValueError(f"{name} must have the shape and row stride of row input 0, got {tuple(t.shape)} with "
                             f"stride {t.stride(0)}")
    for i, w in enumerate(weights):
        if w.shape != (n,):
            raise ValueError(f"weight {i} must have shape ({n},), got {tuple(w.shape)}")
    if scalar.numel() != 1:
        raise ValueError(f"scalar must hold one value, got {scalar.numel()}")
    return n


def rmsnorm_residual_scalar(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, scalar: torch.Tensor,
                            out: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``out = (rms(x)·weight + residual)·scalar``, one program per row."""
    n = _check((x, residual), (weight,), scalar, out)
    block = triton.next_power_of_2(n)
    extra = {"num_warps": _warps(block)} if x.is_cuda else {}
    _rms_residual_scalar_row[(x.shape[0],)](x, weight, residual, scalar, out, n, x.stride(0), eps, BLOCK=block,
                                            **extra)
    return out


def dual_rmsnorm_residual_scalar(x1: torch.Tensor, w1: torch.Tensor, x2: torch.Tensor, w2: torch.Tensor,
                                 w3: torch.Tensor, residual: torch.Tensor, scalar: torch.Tensor, out: torch.Tensor,
                                 eps: float = 1e-6) -> torch.Tensor:
    """``out = (rms(rms(x1)·w1 + rms(x2)·w2)·w3 + residual)·scalar``, one program per row."""
    n = _check((x1, x2, residual), (w1, w2, w3), scalar, out)
    block = triton.next_power_of_2(n)
    extra = {"num_warps": _warps(block)} if x1.is_cuda else {}
    _dual_rms_residual_scalar_row[(x1.shape[0],)](x1, w1, x2, w2, w3, residual, scalar, out, n, x1.stride(0), eps,
                                                  BLOCK=block, **extra)
    return out
