"""Everything between attention's o_proj and the three MoE-layer matmuls, in one pass:

    h          = residual + rms(attn_out) * w_post_attn     (residual stream, rounded to the activation dtype once)
    mlp_in     = rms(h) * w_pre_ff                          (dense MLP input:   pre_feedforward_layernorm)
    experts_in = rms(h) * w_pre_ff2                         (experts input:     pre_feedforward_layernorm_2)
    router_in  = rms(h) * router_scale * hidden**-0.5       (router input:      router.norm + router.scale)

The three views are computed from the *rounded* ``h``, exactly what the unfused model would read back from memory.

Bytes per token, activations of ``b`` bytes, hidden ``H``: read attn_out, residual (2*b*H), write h, mlp_in,
experts_in, router_in (4*b*H); four weights (4*H) are L2-resident. bf16, H = 2816: 33.8 KB per token.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    LaunchConfig,
    check_out,
    check_rows,
    check_same_tokens,
    check_vector,
    compute_dtype,
    empty_rows,
    load_row,
    load_seg,
    load_vec,
    norm_store_seg,
    out_tuple,
    rms_inv_ref,
    round_trip,
    row_launch,
    rows_config,
    store_seg,
    use_triton,
)


@triton.jit
def _h_seg(a, inv, w_ptr, r_ptr, r_off, h_ptr, h_off, row_mask, START: tl.constexpr, SIZE: tl.constexpr,
           H: tl.constexpr, EVEN_ROWS: tl.constexpr):
    """Store one segment of ``h`` and return it rounded (as the unfused model would re-read it)."""
    r = load_seg(r_ptr, r_off, row_mask, START, SIZE, H, EVEN_ROWS)
    h = r + a * inv[:, None] * load_vec(w_ptr, START, SIZE, H)
    store_seg(h_ptr, h_off, row_mask, h, START, SIZE, H, EVEN_ROWS)
    return round_trip(h, h_ptr.dtype.element_ty)


@triton.jit
def _views_seg(h, inv, root, w1_ptr, w2_ptr, ws_ptr, m_ptr, m_off, e_ptr, e_off, q_ptr, q_off, row_mask,
               START: tl.constexpr, SIZE: tl.constexpr, H: tl.constexpr, EVEN_ROWS: tl.constexpr):
    norm_store_seg(h, inv, w1_ptr, m_ptr, m_off, row_mask, START, SIZE, H, EVEN_ROWS)
    norm_store_seg(h, inv, w2_ptr, e_ptr, e_off, row_mask, START, SIZE, H, EVEN_ROWS)
    norm_store_seg(h, inv * root, ws_ptr, q_ptr, q_off, row_mask, START, SIZE, H, EVEN_ROWS)


@triton.jit
def _post_attention_kernel(a_ptr, r_ptr, wpa_ptr, w1_ptr, w2_ptr, ws_ptr, h_ptr, m_ptr, e_ptr, q_ptr, n_rows,
                           stride_a, stride_r, stride_h, stride_m, stride_e, stride_q, eps, root,
                           H: tl.constexpr, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
                           ROWS: tl.constexpr, EVEN_ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)
    r_off = rows * stride_r
    h_off = rows * stride_h
    a0, a1, a2, ss = load_row(a_ptr, rows * stride_a, row_mask, S0, S1, S2, H, EVEN_ROWS)
    inv_a = tl.rsqrt(ss / H + eps)
    h0 = _h_seg(a0, inv_a, wpa_ptr, r_ptr, r_off, h_ptr, h_off, row_mask, 0, S0, H, EVEN_ROWS)
    ss_h = tl.sum(h0 * h0, axis=1)
    h1 = h0
    h2 = h0
    if S1 > 0:
        h1 = _h_seg(a1, inv_a, wpa_ptr, r_ptr, r_off, h_ptr, h_off, row_mask, S0, S1, H, EVEN_ROWS)
        ss_h += tl.sum(h1 * h1, axis=1)
    if S2 > 0:
        h2 = _h_seg(a2, inv_a, wpa_ptr, r_ptr, r_off, h_ptr, h_off, row_mask, S0 + S1, S2, H, EVEN_ROWS)
        ss_h += tl.sum(h2 * h2, axis=1)
    inv_h = tl.rsqrt(ss_h / H + eps)
    m_off = rows * stride_m
    e_off = rows * stride_e
    q_off = rows * stride_q
    _views_seg(h0, inv_h, root, w1_ptr, w2_ptr, ws_ptr, m_ptr, m_off, e_ptr, e_off, q_ptr, q_off, row_mask,
               0, S0, H, EVEN_ROWS)
    if S1 > 0:
        _views_seg(h1, inv_h, root, w1_ptr, w2_ptr, ws_ptr, m_ptr, m_off, e_ptr, e_off, q_ptr, q_off, row_mask,
                   S0, S1, H, EVEN_ROWS)
    if S2 > 0:
        _views_seg(h2, inv_h, root, w1_ptr, w2_ptr, ws_ptr, m_ptr, m_off, e_ptr, e_off, q_ptr, q_off, row_mask,
                   S0 + S1, S2, H, EVEN_ROWS)


def _launch_config(n_rows: int, hidden: int, device: torch.device | None = None) -> LaunchConfig:
    """Two streams in, four out, one live fp32 copy of the row at a time: same budget as the dual norm (2 rows at
    H = 2816 once the grid keeps >= 4 programs per SM), 8 warps at H = 2816."""
    return rows_config(n_rows, hidden, device, max_tile=8192)


def gemma_post_attention_block(
        attn_out: torch.Tensor, residual: torch.Tensor, w_post_attn: torch.Tensor, w_pre_ff: torch.Tensor,
        w_pre_ff2: torch.Tensor, router_scale: torch.Tensor, eps: float = 1e-6, *,
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        config: LaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(h, mlp_in, experts_in, router_in)`` (all ``[tokens, hidden]`` in the activation dtype).
    ``out`` may pass four preallocated buffers; ``h`` may alias ``residual``."""
    attn_out = check_rows("attn_out", attn_out)
    n, hidden = attn_out.shape
    dev, dt = attn_out.device, attn_out.dtype
    check_rows("residual", residual, hidden=hidden, dtype=dt, device=dev)
    check_same_tokens("residual", residual, n)
    for name, w in (("w_post_attn", w_post_attn), ("w_pre_ff", w_pre_ff), ("w_pre_ff2", w_pre_ff2),
                    ("router_scale", router_scale)):
        check_vector(name, w, hidden, dt, dev)
    outs = tuple(empty_rows(attn_out, n, hidden) if o is None else check_out(f"out[{i}]", o, (n, hidden), dt, dev)
                 for i, o in enumerate(out_tuple("out", out, 4)))
    if n == 0:
        return outs
    if not use_triton(attn_out):
        refs = gemma_post_attention_block_ref(attn_out, residual, w_post_attn, w_pre_ff, w_pre_ff2, router_scale, eps)
        return tuple(o.copy_(r) for o, r in zip(outs, refs))
    h, m, e, q = outs
    grid, meta = row_launch(n, hidden, config or _launch_config(n, hidden, dev))
    _post_attention_kernel[grid](attn_out, residual, w_post_attn, w_pre_ff, w_pre_ff2, router_scale, h, m, e, q, n,
                                 attn_out.stride(0), residual.stride(0), h.stride(0), m.stride(0), e.stride(0),
                                 q.stride(0), eps, hidden ** -0.5, **meta)
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
