"""Everything between attention's o_proj and the three MoE-layer matmuls, in one pass:

    h          = residual + rms(attn_out) * w_post_attn     (residual stream, rounded to the activation dtype once)
    mlp_in     = rms(h) * w_pre_ff                          (dense MLP input:   pre_feedforward_layernorm)
    experts_in = rms(h) * w_pre_ff2                         (experts input:     pre_feedforward_layernorm_2)
    router_in  = rms(h) * router_scale * hidden**-0.5       (router input:      router.norm + router.scale)

The three views are computed from the *rounded* ``h``, exactly what the unfused model would read back from memory.

Bytes per token, activations of ``b`` bytes, hidden ``H``: read attn_out, residual (2*b*H), write h, mlp_in,
experts_in, router_in (4*b*H); four weights (4*H) are loaded once per (persistent)
program. bf16, H = 2816: 33.8 KB per token.
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
def _post_attention_kernel(a_ptr, r_ptr, wpa_ptr, w1_ptr, w2_ptr, ws_ptr, h_ptr, m_ptr, e_ptr, router_ptr, n_rows,
                           stride_a, stride_r, stride_h, stride_m, stride_e, stride_router, eps, root,
                           H: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, STAGES: tl.constexpr,
                           VIEWS: tl.constexpr, PDL: tl.constexpr):
    """``VIEWS`` = 3: the MoE layer's three FFN inputs; 1: ``mlp_in`` only (the norm sandwich of a plain layer, e.g.
    the vision encoder's: ``h = r + rms(a)·w_post``, then the next sub-block's input ``rms(h)·w``)."""
    wait_and_release(PDL)
    wpa = load_weight(wpa_ptr, H, BLOCK)
    w1 = load_weight(w1_ptr, H, BLOCK)
    if VIEWS == 3:
        w2 = load_weight(w2_ptr, H, BLOCK)
        ws = load_weight(ws_ptr, H, BLOCK)
    for blk in tl.range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0), num_stages=STAGES):
        rows, cols, mask = tile_offsets(blk, n_rows, H, BLOCK, ROWS)
        a = load_tile(a_ptr, rows, stride_a, cols, mask, H, BLOCK, ROWS)
        r = load_tile(r_ptr, rows, stride_r, cols, mask, H, BLOCK, ROWS)
        h = r + a * rms_inv(a, eps, H) * wpa
        store_tile(h_ptr, rows, stride_h, cols, mask, h, H, BLOCK, ROWS)  # the residual stream, rounded once
        h = round_trip(h, h_ptr.dtype.element_ty)  # the views read the rounded stream, as the unfused model does
        inv = rms_inv(h, eps, H)
        store_tile(m_ptr, rows, stride_m, cols, mask, h * inv * w1, H, BLOCK, ROWS)
        if VIEWS == 3:
            store_tile(e_ptr, rows, stride_e, cols, mask, h * inv * w2, H, BLOCK, ROWS)
            store_tile(router_ptr, rows, stride_router, cols, mask, h * (inv * root) * ws, H, BLOCK, ROWS)


_ACT_NAMES = ("attn_out", "residual")
_W_NAMES = ("w_post_attn", "w_pre_ff", "w_pre_ff2", "router_scale")
_OUT_NAMES = ("out[0]", "out[1]", "out[2]", "out[3]")


def _launch(attn_out, residual, w_post_attn, w_pre_ff, w_pre_ff2, router_scale, eps: float, h, mlp_in, experts_in,
            router_in, config: RowConfig | None) -> None:
    n, hidden = attn_out.shape
    grid, meta = row_launch(n, hidden, attn_out.dtype, attn_out.device, 2, config)
    _post_attention_kernel[grid](attn_out, residual, w_post_attn, w_pre_ff, w_pre_ff2, router_scale, h, mlp_in,
                                 experts_in, router_in, n, attn_out.stride()[0], residual.stride()[0], h.stride()[0],
                                 mlp_in.stride()[0], experts_in.stride()[0], router_in.stride()[0], eps,
                                 hidden ** -0.5, VIEWS=3, **meta, **pdl_meta(attn_out))


def _triton(attn_out: torch.Tensor, residual: torch.Tensor, w_post_attn: torch.Tensor, w_pre_ff: torch.Tensor,
            w_pre_ff2: torch.Tensor, router_scale: torch.Tensor, eps: float, h: torch.Tensor, mlp_in: torch.Tensor,
            experts_in: torch.Tensor, router_in: torch.Tensor) -> None:
    _launch(attn_out, residual, w_post_attn, w_pre_ff, w_pre_ff2, router_scale, eps, h, mlp_in, experts_in,
            router_in, None)


def _torch(attn_out: torch.Tensor, residual: torch.Tensor, w_post_attn: torch.Tensor, w_pre_ff: torch.Tensor,
           w_pre_ff2: torch.Tensor, router_scale: torch.Tensor, eps: float, h: torch.Tensor, mlp_in: torch.Tensor,
           experts_in: torch.Tensor, router_in: torch.Tensor) -> None:
    refs = gemma_post_attention_block_ref(attn_out, residual, w_post_attn, w_pre_ff, w_pre_ff2, router_scale, eps)
    for o, r in zip((h, mlp_in, experts_in, router_in), refs):
        o.copy_(r)


op = register("post_attention_block(Tensor attn_out, Tensor residual, Tensor w_post_attn, Tensor w_pre_ff, "
              "Tensor w_pre_ff2, Tensor router_scale, float eps, Tensor(a!) h, Tensor(b!) mlp_in, "
              "Tensor(c!) experts_in, Tensor(d!) router_in) -> ()", _triton, _torch)


def gemma_post_attention_block(
        attn_out: torch.Tensor, residual: torch.Tensor, w_post_attn: torch.Tensor, w_pre_ff: torch.Tensor,
        w_pre_ff2: torch.Tensor, router_scale: torch.Tensor, eps: float = 1e-6, *,
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        config: RowConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(h, mlp_in, experts_in, router_in)`` (all ``[tokens, hidden]`` in the activation dtype).
    ``out`` may pass four preallocated buffers; ``config`` overrides the launch heuristic (tuning)."""
    outs = (None,) * 4 if out is None else out_tuple("out", out, 4)
    check_row_call((attn_out, residual), _ACT_NAMES, (w_post_attn, w_pre_ff, w_pre_ff2, router_scale), _W_NAMES,
                   None, outs, _OUT_NAMES)
    n, hidden = attn_out.shape
    outs = tuple(torch.empty((n, hidden), dtype=attn_out.dtype, device=attn_out.device) if o is None else o
                 for o in outs)
    if n == 0:
        return outs
    if config is not None:
        _launch(attn_out, residual, w_post_attn, w_pre_ff, w_pre_ff2, router_scale, eps, *outs, config)
    else:
        op(attn_out, residual, w_post_attn, w_pre_ff, w_pre_ff2, router_scale, eps, *outs)
    return outs


def gemma_post_attention_block_ref(
        attn_out: torch.Tensor, residual: torch.Tensor, w_post_attn: torch.Tensor, w_pre_ff: torch.Tensor,
        w_pre_ff2: torch.Tensor, router_scale: torch.Tensor,
        eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch twin: fp32 math (fp64 if fed fp64), ``h`` rounded once and the views computed from it."""
    ct = compute_dtype(attn_out)
    a = attn_out.to(ct)
    h = (residual.to(ct) + a * rms_inv_ref(a, eps) * w_post_attn.to(ct)).to(attn_out.dtype)
    hf = h.to(ct)
    normed = hf * rms_inv_ref(hf, eps)
    hidden = attn_out.shape[-1]
    return (h, (normed * w_pre_ff.to(ct)).to(h.dtype), (normed * w_pre_ff2.to(ct)).to(h.dtype),
            (normed * router_scale.to(ct) * hidden ** -0.5).to(h.dtype))


# ---- the one-view form: a plain layer's norm sandwich ---------------------------------------------------------------
def _launch_one_view(a, residual, w_post, w_next, eps: float, h, next_in, config: RowConfig | None) -> None:
    n, hidden = a.shape
    grid, meta = row_launch(n, hidden, a.dtype, a.device, 2, config)
    _post_attention_kernel[grid](a, residual, w_post, w_next, w_next, w_next, h, next_in, next_in, next_in, n,
                                 a.stride()[0], residual.stride()[0], h.stride()[0], next_in.stride()[0],
                                 next_in.stride()[0], next_in.stride()[0], eps, 1.0, VIEWS=1, **meta, **pdl_meta(a))


def _triton_one_view(a: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor, w_next: torch.Tensor,
                     eps: float, h: torch.Tensor, next_in: torch.Tensor) -> None:
    _launch_one_view(a, residual, w_post, w_next, eps, h, next_in, None)


def _torch_one_view(a: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor, w_next: torch.Tensor,
                    eps: float, h: torch.Tensor, next_in: torch.Tensor) -> None:
    for o, r in zip((h, next_in), gemma_norm_residual_norm_ref(a, residual, w_post, w_next, eps)):
        o.copy_(r)


op_one_view = register("norm_residual_norm(Tensor a, Tensor residual, Tensor w_post, Tensor w_next, float eps, "
                       "Tensor(a!) h, Tensor(b!) next_in) -> ()", _triton_one_view, _torch_one_view)


def gemma_norm_residual_norm(a: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor, w_next: torch.Tensor,
                             eps: float = 1e-6, *, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                             config: RowConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = residual + rms(a) * w_post`` (rounded once) and ``next_in = rms(h) * w_next``: the norm sandwich
    between a sub-block's output and the next sub-block's input, in one pass (the same kernel as
    :func:`gemma_post_attention_block`, writing one view). Returns ``(h, next_in)``, ``[tokens, hidden]``."""
    outs = (None, None) if out is None else out_tuple("out", out, 2)
    check_row_call((a, residual), ("a", "residual"), (w_post, w_next), ("w_post", "w_next"), None, outs,
                   ("out[0]", "out[1]"))
    n, hidden = a.shape
    outs = tuple(torch.empty((n, hidden), dtype=a.dtype, device=a.device) if o is None else o for o in outs)
    if n == 0:
        return outs
    if config is not None:
        _launch_one_view(a, residual, w_post, w_next, eps, *outs, config)
    else:
        op_one_view(a, residual, w_post, w_next, eps, *outs)
    return outs


def gemma_norm_residual_norm_ref(a: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor, w_next: torch.Tensor,
                                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin: fp32 math (fp64 if fed fp64), ``h`` rounded once and ``next_in`` computed from it."""
    ct = compute_dtype(a)
    af = a.to(ct)
    h = (residual.to(ct) + af * rms_inv_ref(af, eps) * w_post.to(ct)).to(a.dtype)
    hf = h.to(ct)
    return h, (hf * rms_inv_ref(hf, eps) * w_next.to(ct)).to(a.dtype)
