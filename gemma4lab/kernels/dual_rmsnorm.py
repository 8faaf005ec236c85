"""``out = (rms(rms(x1) * w1 + rms(x2) * w2) * w3 + residual) * scalar``: the end of a Gemma 4 MoE layer
(post_feedforward_layernorm_1 on the dense MLP, _2 on the experts, their sum, post_feedforward_layernorm, residual
add and layer scalar) in one pass; the published sglang name and argument order. The middle sum stays in fp32.

Cross-layer fusion (``HAS_NEXT``, :func:`gemma_dual_rmsnorm_residual_scalar_next_norm`): the same pass also
writes layer i+1's ``input_layernorm`` output ``next_in = rms(out) * next_weight``, computed from the *rounded*
``out`` (exactly what layer i+1 reads), so the result equals running the two steps separately while the residual
stream is read once across the layer boundary and one launch per layer disappears.

Bytes per token, activations of ``b`` bytes and hidden ``H``: read x1, x2, residual (3*b*H), write out (b*H)
[+ next_in (b*H)]. Weights (3-4 * H) are loaded once per (persistent) program.
bf16, H = 2816: 22.5 KB per token (28.2 KB with next_in).
"""

import torch
import triton
import triton.language as tl

from ._common import (
    RowConfig,
    check_row_call,
    compute_dtype,
    load_tile,
    load_weight,
    out_tuple,
    pdl_meta,
    register,
    rms_inv,
    rms_inv_ref,
    round_trip,
    row_launch,
    store_tile,
    tile_offsets,
    wait_and_release,
)


@triton.jit
def _dual_rmsnorm_kernel(x1_ptr, w1_ptr, x2_ptr, w2_ptr, w3_ptr, r_ptr, s_ptr, wn_ptr, o_ptr, n_ptr, n_rows,
                         stride_x1, stride_x2, stride_r, stride_o, stride_n, eps,
                         H: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, STAGES: tl.constexpr,
                         HAS_NEXT: tl.constexpr, PDL: tl.constexpr):
    wait_and_release(PDL)
    w1 = load_weight(w1_ptr, H, BLOCK)
    w2 = load_weight(w2_ptr, H, BLOCK)
    w3 = load_weight(w3_ptr, H, BLOCK)
    if HAS_NEXT:
        wn = load_weight(wn_ptr, H, BLOCK)
    scalar = tl.load(s_ptr).to(tl.float32)
    for blk in tl.range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0), num_stages=STAGES):
        rows, cols, mask = tile_offsets(blk, n_rows, H, BLOCK, ROWS)
        a = load_tile(x1_ptr, rows, stride_x1, cols, mask, H, BLOCK, ROWS)
        b = load_tile(x2_ptr, rows, stride_x2, cols, mask, H, BLOCK, ROWS)
        r = load_tile(r_ptr, rows, stride_r, cols, mask, H, BLOCK, ROWS)
        # middle sum m = rms(x1) w1 + rms(x2) w2 in fp32, never rounded (padding lanes stay 0)
        m = a * rms_inv(a, eps, H) * w1 + b * rms_inv(b, eps, H) * w2
        y = (m * rms_inv(m, eps, H) * w3 + r) * scalar
        store_tile(o_ptr, rows, stride_o, cols, mask, y, H, BLOCK, ROWS)  # the residual stream, rounded once
        if HAS_NEXT:
            h = round_trip(y, o_ptr.dtype.element_ty)  # what the next layer reads back from memory
            store_tile(n_ptr, rows, stride_n, cols, mask, h * rms_inv(h, eps, H) * wn, H, BLOCK, ROWS)


_ACT_NAMES = ("x1", "x2", "residual")
_W_NAMES = ("weight1", "weight2", "weight3")


def _launch(x1, weight1, x2, weight2, weight3, residual, scalar, next_weight, out, next_out, eps: float,
            config: RowConfig | None) -> None:
    n, hidden = x1.shape
    grid, meta = row_launch(n, hidden, x1.dtype, x1.device, 3, config)
    has_next = next_out is not None
    nw, no = (next_weight, next_out) if has_next else (weight3, out)  # unused placeholders when HAS_NEXT=False
    _dual_rmsnorm_kernel[grid](x1, weight1, x2, weight2, weight3, residual, scalar, nw, out, no, n, x1.stride()[0],
                               x2.stride()[0], residual.stride()[0], out.stride()[0], no.stride()[0], eps,
                               HAS_NEXT=has_next, **meta, **pdl_meta(x1))


def _triton(x1: torch.Tensor, weight1: torch.Tensor, x2: torch.Tensor, weight2: torch.Tensor, weight3: torch.Tensor,
            residual: torch.Tensor, scalar: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    _launch(x1, weight1, x2, weight2, weight3, residual, scalar, None, out, None, eps, None)


def _torch(x1: torch.Tensor, weight1: torch.Tensor, x2: torch.Tensor, weight2: torch.Tensor, weight3: torch.Tensor,
           residual: torch.Tensor, scalar: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    out.copy_(gemma_dual_rmsnorm_residual_scalar_ref(x1, weight1, x2, weight2, weight3, residual, scalar, eps))


def _triton_next(x1: torch.Tensor, weight1: torch.Tensor, x2: torch.Tensor, weight2: torch.Tensor,
                 weight3: torch.Tensor, residual: torch.Tensor, scalar: torch.Tensor, next_weight: torch.Tensor,
                 eps: float, out: torch.Tensor, next_out: torch.Tensor) -> None:
    _launch(x1, weight1, x2, weight2, weight3, residual, scalar, next_weight, out, next_out, eps, None)


def _torch_next(x1: torch.Tensor, weight1: torch.Tensor, x2: torch.Tensor, weight2: torch.Tensor,
                weight3: torch.Tensor, residual: torch.Tensor, scalar: torch.Tensor, next_weight: torch.Tensor,
                eps: float, out: torch.Tensor, next_out: torch.Tensor) -> None:
    ref_out, ref_next = gemma_dual_rmsnorm_residual_scalar_next_norm_ref(x1, weight1, x2, weight2, weight3, residual,
                                                                         scalar, next_weight, eps)
    out.copy_(ref_out)
    next_out.copy_(ref_next)


op = register("dual_rmsnorm_residual_scalar(Tensor x1, Tensor weight1, Tensor x2, Tensor weight2, Tensor weight3, "
              "Tensor residual, Tensor scalar, float eps, Tensor(a!) out) -> ()", _triton, _torch)
op_next = register("dual_rmsnorm_residual_scalar_next_norm(Tensor x1, Tensor weight1, Tensor x2, Tensor weight2, "
                   "Tensor weight3, Tensor residual, Tensor scalar, Tensor next_weight, float eps, Tensor(a!) out, "
                   "Tensor(b!) next_out) -> ()", _triton_next, _torch_next)


def gemma_dual_rmsnorm_residual_scalar(x1: torch.Tensor, weight1: torch.Tensor, x2: torch.Tensor,
                                       weight2: torch.Tensor, weight3: torch.Tensor, residual: torch.Tensor,
                                       scalar: torch.Tensor, eps: float = 1e-6, *, out: torch.Tensor | None = None,
                                       config: RowConfig | None = None) -> torch.Tensor:
    """``(rms(rms(x1) * w1 + rms(x2) * w2) * w3 + residual) * scalar`` for 2-D ``[tokens, hidden]`` activations.

    ``scalar`` is a one-element device tensor read in the kernel. ``out`` may be preallocated; ``config`` overrides
    the launch heuristic (a tuning knob: it calls the kernel directly)."""
    check_row_call((x1, x2, residual), _ACT_NAMES, (weight1, weight2, weight3), _W_NAMES, scalar, (out,), ("out",))
    n, hidden = x1.shape
    if out is None:
        out = torch.empty((n, hidden), dtype=x1.dtype, device=x1.device)
    if n == 0:
        return out
    if config is not None:
        _launch(x1, weight1, x2, weight2, weight3, residual, scalar, None, out, None, eps, config)
    else:
        op(x1, weight1, x2, weight2, weight3, residual, scalar, eps, out)
    return out


def gemma_dual_rmsnorm_residual_scalar_next_norm(
        x1: torch.Tensor, weight1: torch.Tensor, x2: torch.Tensor, weight2: torch.Tensor, weight3: torch.Tensor,
        residual: torch.Tensor, scalar: torch.Tensor, next_weight: torch.Tensor, eps: float = 1e-6, *,
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
        config: RowConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, next_in)``: ``out`` as in :func:`gemma_dual_rmsnorm_residual_scalar`, ``next_in`` =
    ``rms(out) * next_weight``. ``out=(out_buf, next_buf)`` may pass preallocated buffers."""
    o, nx = (None, None) if out is None else out_tuple("out", out, 2)
    check_row_call((x1, x2, residual), _ACT_NAMES, (weight1, weight2, weight3, next_weight),
                   (*_W_NAMES, "next_weight"), scalar, (o, nx), ("out[0]", "out[1]"))
    n, hidden = x1.shape
    o = torch.empty((n, hidden), dtype=x1.dtype, device=x1.device) if o is None else o
    nx = torch.empty((n, hidden), dtype=x1.dtype, device=x1.device) if nx is None else nx
    if n == 0:
        return o, nx
    if config is not None:
        _launch(x1, weight1, x2, weight2, weight3, residual, scalar, next_weight, o, nx, eps, config)
    else:
        op_next(x1, weight1, x2, weight2, weight3, residual, scalar, next_weight, eps, o, nx)
    return o, nx


def gemma_dual_rmsnorm_residual_scalar_ref(x1: torch.Tensor, weight1: torch.Tensor, x2: torch.Tensor,
                                           weight2: torch.Tensor, weight3: torch.Tensor, residual: torch.Tensor,
                                           scalar: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain-torch twin of the kernel: fp32 math (fp64 if fed fp64), the middle sum unrounded, one rounding."""
    ct = compute_dtype(x1)
    a, b = x1.to(ct), x2.to(ct)
    m = a * rms_inv_ref(a, eps) * weight1.to(ct) + b * rms_inv_ref(b, eps) * weight2.to(ct)
    y = (m * rms_inv_ref(m, eps) * weight3.to(ct) + residual.to(ct)) * scalar.to(ct).reshape(())
    return y.to(x1.dtype)


def gemma_dual_rmsnorm_residual_scalar_next_norm_ref(
        x1: torch.Tensor, weight1: torch.Tensor, x2: torch.Tensor, weight2: torch.Tensor, weight3: torch.Tensor,
        residual: torch.Tensor, scalar: torch.Tensor, next_weight: torch.Tensor,
        eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin: the dual epilogue (rounded), then ``rms(out) * next_weight`` from the rounded values."""
    out = gemma_dual_rmsnorm_residual_scalar_ref(x1, weight1, x2, weight2, weight3, residual, scalar, eps)
    ct = compute_dtype(out)
    h = out.to(ct)
    return out, (h * rms_inv_ref(h, eps) * next_weight.to(ct)).to(out.dtype)
