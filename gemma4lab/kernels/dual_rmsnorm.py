"""``out = (rms(rms(x1) * w1 + rms(x2) * w2) * w3 + residual) * scalar``: the end of a Gemma 4 MoE layer
(post_feedforward_layernorm_1 on the dense MLP, _2 on the experts, their sum, post_feedforward_layernorm, residual
add and layer scalar) in one pass; the published sglang name and argument order. The middle sum stays in fp32.

The same kernel, with ``HAS_NEXT``, also writes the next layer's ``input_layernorm`` output (see
``dual_rmsnorm_next_norm.py``).

Bytes per token, activations of ``b`` bytes and hidden ``H``: read x1, x2, residual (3*b*H), write out (b*H)
[+ next_in (b*H)]. Weights (3-4 * H) are L2-resident. bf16, H = 2816: 22.5 KB per token (28.2 KB with next_in).
"""

import torch
import triton
import triton.language as tl

from ._common import (
    LaunchConfig,
    check_out,
    check_rows,
    check_same_tokens,
    check_scalar,
    check_vector,
    compute_dtype,
    empty_rows,
    load_row,
    load_seg,
    load_vec,
    norm_store_seg,
    rms_inv_ref,
    round_trip,
    row_launch,
    rows_config,
    store_seg,
    use_triton,
)


@triton.jit
def _mix_seg(a, b, inv1, inv2, w1_ptr, w2_ptr, START: tl.constexpr, SIZE: tl.constexpr, H: tl.constexpr):
    """One segment of ``rms(x1) * w1 + rms(x2) * w2`` (fp32, never rounded)."""
    return (a * inv1[:, None] * load_vec(w1_ptr, START, SIZE, H)
            + b * inv2[:, None] * load_vec(w2_ptr, START, SIZE, H))


@triton.jit
def _out_seg(m, inv3, scalar, w3_ptr, r_ptr, r_off, o_ptr, o_off, row_mask, START: tl.constexpr,
             SIZE: tl.constexpr, H: tl.constexpr, EVEN_ROWS: tl.constexpr):
    """Store one segment of the residual stream and return it as the next kernel would read it (rounded)."""
    r = load_seg(r_ptr, r_off, row_mask, START, SIZE, H, EVEN_ROWS)
    y = (m * inv3[:, None] * load_vec(w3_ptr, START, SIZE, H) + r) * scalar
    store_seg(o_ptr, o_off, row_mask, y, START, SIZE, H, EVEN_ROWS)
    return round_trip(y, o_ptr.dtype.element_ty)


@triton.jit
def _dual_rmsnorm_kernel(x1_ptr, w1_ptr, x2_ptr, w2_ptr, w3_ptr, r_ptr, s_ptr, wn_ptr, o_ptr, n_ptr, n_rows,
                         stride_x1, stride_x2, stride_r, stride_o, stride_n, eps,
                         H: tl.constexpr, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, ROWS: tl.constexpr,
                         EVEN_ROWS: tl.constexpr, HAS_NEXT: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)
    r_off = rows * stride_r
    o_off = rows * stride_o
    a0, a1, a2, ss1 = load_row(x1_ptr, rows * stride_x1, row_mask, S0, S1, S2, H, EVEN_ROWS)
    b0, b1, b2, ss2 = load_row(x2_ptr, rows * stride_x2, row_mask, S0, S1, S2, H, EVEN_ROWS)
    inv1 = tl.rsqrt(ss1 / H + eps)
    inv2 = tl.rsqrt(ss2 / H + eps)
    # middle sum m = rms(x1) w1 + rms(x2) w2 in fp32, and its sum of squares
    m0 = _mix_seg(a0, b0, inv1, inv2, w1_ptr, w2_ptr, 0, S0, H)
    ss3 = tl.sum(m0 * m0, axis=1)
    m1 = m0
    m2 = m0
    if S1 > 0:
        m1 = _mix_seg(a1, b1, inv1, inv2, w1_ptr, w2_ptr, S0, S1, H)
        ss3 += tl.sum(m1 * m1, axis=1)
    if S2 > 0:
        m2 = _mix_seg(a2, b2, inv1, inv2, w1_ptr, w2_ptr, S0 + S1, S2, H)
        ss3 += tl.sum(m2 * m2, axis=1)
    inv3 = tl.rsqrt(ss3 / H + eps)
    scalar = tl.load(s_ptr).to(tl.float32)
    # residual stream out (rounded once); keep the rounded values for the next layer's input norm
    h0 = _out_seg(m0, inv3, scalar, w3_ptr, r_ptr, r_off, o_ptr, o_off, row_mask, 0, S0, H, EVEN_ROWS)
    ss4 = tl.sum(h0 * h0, axis=1)
    h1 = h0
    h2 = h0
    if S1 > 0:
        h1 = _out_seg(m1, inv3, scalar, w3_ptr, r_ptr, r_off, o_ptr, o_off, row_mask, S0, S1, H, EVEN_ROWS)
        ss4 += tl.sum(h1 * h1, axis=1)
    if S2 > 0:
        h2 = _out_seg(m2, inv3, scalar, w3_ptr, r_ptr, r_off, o_ptr, o_off, row_mask, S0 + S1, S2, H, EVEN_ROWS)
        ss4 += tl.sum(h2 * h2, axis=1)
    if HAS_NEXT:
        n_off = rows * stride_n
        inv4 = tl.rsqrt(ss4 / H + eps)
        norm_store_seg(h0, inv4, wn_ptr, n_ptr, n_off, row_mask, 0, S0, H, EVEN_ROWS)
        if S1 > 0:
            norm_store_seg(h1, inv4, wn_ptr, n_ptr, n_off, row_mask, S0, S1, H, EVEN_ROWS)
        if S2 > 0:
            norm_store_seg(h2, inv4, wn_ptr, n_ptr, n_off, row_mask, S0 + S1, S2, H, EVEN_ROWS)


def _launch_config(n_rows: int, hidden: int, device: torch.device | None = None) -> LaunchConfig:
    """Three streams in and two live fp32 copies of the row (x1/x2 then m/h): up to 8192 elements per tensor per
    program (2 rows at H = 2816 once the grid keeps >= 4 programs per SM), 8 warps at H = 2816."""
    return rows_config(n_rows, hidden, device, max_tile=8192)


def check_dual_inputs(x1, weight1, x2, weight2, weight3, residual, scalar) -> tuple[int, int]:
    """Shared validation for the dual-norm wrappers; returns (tokens, hidden)."""
    x1 = check_rows("x1", x1)
    n, hidden = x1.shape
    dev, dt = x1.device, x1.dtype
    for name, t in (("x2", x2), ("residual", residual)):
        check_rows(name, t, hidden=hidden, dtype=dt, device=dev)
        check_same_tokens(name, t, n)
    for name, w in (("weight1", weight1), ("weight2", weight2), ("weight3", weight3)):
        check_vector(name, w, hidden, dt, dev)
    check_scalar("scalar", scalar, dev)
    return n, hidden


def launch_dual(x1, weight1, x2, weight2, weight3, residual, scalar, next_weight, out, next_out, eps: float,
                config: LaunchConfig | None) -> None:
    n, hidden = x1.shape
    grid, meta = row_launch(n, hidden, config or _launch_config(n, hidden, x1.device))
    has_next = next_out is not None
    nw, no = (next_weight, next_out) if has_next else (weight3, out)  # unused placeholders when HAS_NEXT=False
    _dual_rmsnorm_kernel[grid](x1, weight1, x2, weight2, weight3, residual, scalar, nw, out, no, n, x1.stride(0),
                               x2.stride(0), residual.stride(0), out.stride(0), no.stride(0), eps,
                               HAS_NEXT=has_next, **meta)


def gemma_dual_rmsnorm_residual_scalar(x1: torch.Tensor, weight1: torch.Tensor, x2: torch.Tensor,
                                       weight2: torch.Tensor, weight3: torch.Tensor, residual: torch.Tensor,
                                       scalar: torch.Tensor, eps: float = 1e-6, *, out: torch.Tensor | None = None,
                                       config: LaunchConfig | None = None) -> torch.Tensor:
    """``(rms(rms(x1) * w1 + rms(x2) * w2) * w3 + residual) * scalar`` for 2-D ``[tokens, hidden]`` activations.

    ``scalar`` is a one-element device tensor read in the kernel. ``out`` may be preallocated and may alias
    ``residual`` (each program reads its rows before writing them)."""
    n, hidden = check_dual_inputs(x1, weight1, x2, weight2, weight3, residual, scalar)
    out = empty_rows(x1, n, hidden) if out is None else check_out("out", out, (n, hidden), x1.dtype, x1.device)
    if n == 0:
        return out
    if not use_triton(x1):
        return out.copy_(gemma_dual_rmsnorm_residual_scalar_ref(x1, weight1, x2, weight2, weight3, residual, scalar,
                                                                 eps))
    launch_dual(x1, weight1, x2, weight2, weight3, residual, scalar, None, out, None, eps, config)
    return out


def gemma_dual_rmsnorm_residual_scalar_ref(x1: torch.Tensor, weight1: torch.Tensor, x2: torch.Tensor,
                                           weight2: torch.Tensor, weight3: torch.Tensor, residual: torch.Tensor,
                                           scalar: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain-torch twin of the kernel: fp32 math (fp64 if fed fp64), the middle sum unrounded, one rounding."""
    ct = compute_dtype(x1)
    a, b = x1.to(ct), x2.to(ct)
    m = a * rms_inv_ref(a, eps) * weight1.to(ct) + b * rms_inv_ref(b, eps) * weight2.to(ct)
    y = (m * rms_inv_ref(m, eps) * weight3.to(ct) + residual.to(ct)) * scalar.to(ct).reshape(())
    return y.to(x1.dtype)
