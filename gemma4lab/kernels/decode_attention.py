"""One-token decode attention against the static KV cache (``gemma4lab.generation.KVCache``), graph-safe.

One program per (sequence, query head) streams that head's KV slots in ``BLOCK_N`` chunks with an online softmax.
Which slots are visible is read on the device, so a captured CUDA graph stays valid as generation advances:

* full layers: slot ``s`` holds position ``s``; visible iff ``s <= position`` (the loop stops there);
* sliding layers: a ring of ``W`` slots; ``slot_pos[b, s]`` is the position a slot holds (``-1`` empty); visible iff
  ``0 <= slot_pos <= position`` and ``slot_pos > position - window``.

Decode is memory-bound (one query row per head), so the scores are a broadcast multiply and a row sum rather than
a tensor-core dot, which would need 16 query rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, SUPPORTED_DTYPES, compute_dtype, pow2, register, to_dtype


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, slot_pos_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_ob, stride_oh,
    stride_sb, n_slots, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SLIDING: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    pos = tl.load(pos_ptr + b)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh * stride_vh
    if SLIDING:
        hi = n_slots
    else:
        hi = tl.minimum(pos + 1, n_slots)
    m_i = tl.full([1], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for start in tl.range(0, hi, BLOCK_N):
        slots = start + offs_n
        ok = slots < hi
        if SLIDING:
            sp = tl.load(slot_pos_ptr + b * stride_sb + slots, mask=ok, other=-1)
            ok = ok & (sp >= 0) & (sp <= pos) & (sp > pos - window)
        ld = ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + slots[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=ld, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1) * 1.4426950408889634
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.math.exp2(s - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        v = tl.load(v_base + slots[:, None].to(tl.int64) * stride_vs + offs_d[None, :], mask=ld, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    out = acc / l_i
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d, to_dtype(out, o_ptr.dtype.element_ty), mask=d_ok)


def _check(q, k_cache, v_cache, positions, slot_pos, window) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("positions", positions)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"expected q [B, Hq, D] and k_cache/v_cache [B, Hkv, slots, D] of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    b, hq, d = q.shape
    if k_cache.shape[0] < b or k_cache.shape[3] != d or hq % k_cache.shape[1]:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not fit q {tuple(q.shape)}: needs >= {b} sequences, "
                         f"head_dim {d} and a KV-head count dividing {hq}")
    if q.dtype not in SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q, k_cache, v_cache must share a float dtype, got {q.dtype}, {k_cache.dtype}, "
                        f"{v_cache.dtype}")
    if positions.shape != (b,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be an int tensor [{b}], got {positions.dtype} {tuple(positions.shape)}")
    devs = {t.device for t in (q, k_cache, v_cache, positions)}
    if slot_pos is not None:
        devs.add(slot_pos.device)
    if len(devs) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devs))}")
    if (window is None) != (slot_pos is None):
        raise ValueError("sliding layers need both window and slot_pos; full layers neither")
    if slot_pos is not None and (slot_pos.dim() != 2 or slot_pos.shape[1] != k_cache.shape[2]
                                 or slot_pos.shape[0] < b or slot_pos.stride(1) != 1):
        raise ValueError(f"slot_pos must be [>= {b}, {k_cache.shape[2]}] with unit column stride, got "
                         f"{tuple(slot_pos.shape)}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous head_dim, got strides {t.stride()}")


@dataclass(frozen=True)
class DecodeConfig:
    """Launch of the decode kernel: one program per (sequence, query head), streaming ``block_n`` slots at a time
    with ``num_warps`` warps."""

    block_n: int
    num_warps: int = 4

    def __post_init__(self) -> None:
        pow2(self, "block_n", "num_warps")


def decode_config(head_dim: int) -> DecodeConfig:
    """Slot blocks of ~8192 elements (16 of head 512, 32 of head 256), at least 16 and at most 64 slots; 16 under
    the interpreter (fast CPU tests)."""
    return DecodeConfig(block_n=16 if INTERPRET else max(16, min(64, 8192 // triton.next_power_of_2(head_dim))))


def _launch(q, k_cache, v_cache, positions, slot_pos, window: int | None, o, config: DecodeConfig | None) -> None:
    b, hq, d = q.shape
    cfg = config or decode_config(d)
    sp = slot_pos if slot_pos is not None else positions
    _decode_attention_kernel[(b, hq)](
        q, k_cache, v_cache, o, positions, sp,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), o.stride(0), o.stride(1),
        slot_pos.stride(0) if slot_pos is not None else 0, k_cache.shape[2], window or 0,
        GROUP=hq // k_cache.shape[1], HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_N=cfg.block_n,
        SLIDING=slot_pos is not None, num_warps=cfg.num_warps,
    )


def _triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
            slot_pos: torch.Tensor | None, window: int, out: torch.Tensor) -> None:
    _launch(q, k_cache, v_cache, positions, slot_pos, window or None, out, None)


def _torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
           slot_pos: torch.Tensor | None, window: int, out: torch.Tensor) -> None:
    out.copy_(gemma_decode_attention_ref(q, k_cache, v_cache, positions, slot_pos=slot_pos, window=window or None))


op = register("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor positions, Tensor? slot_pos, "
              "int window, Tensor(a!) out) -> ()", _triton, _torch)


def gemma_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                           *, slot_pos: torch.Tensor | None = None, window: int | None = None,
                           config: DecodeConfig | None = None) -> torch.Tensor:
    """``q [B, Hq, D]`` (the new tokens) against the cache ``[B', Hkv, slots, D]`` (first ``B`` rows) → ``[B, Hq, D]``.

    Full layers: slots are positions, visible up to ``positions[b]``. Sliding layers: pass ``slot_pos`` (the ring's
    positions, ``-1`` empty) and ``window``. Scale 1.0. No host synchronisation (CUDA-graph safe).
    """
    _check(q, k_cache, v_cache, positions, slot_pos, window)
    o = torch.empty_like(q)
    if q.shape[0] == 0:
        return o
    if config is not None:
        _launch(q, k_cache, v_cache, positions, slot_pos, window, o, config)
    else:
        op(q, k_cache, v_cache, positions, slot_pos, window or 0, o)
    return o


def gemma_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               positions: torch.Tensor, *, slot_pos: torch.Tensor | None = None,
                               window: int | None = None) -> torch.Tensor:
    """Plain-torch twin: the visibility mask over all slots, softmax in fp32 (fp64 for fp64 inputs)."""
    b, hq, _ = q.shape
    ct = compute_dtype(q)
    p = positions[:, None]
    if slot_pos is None:
        visible = torch.arange(k_cache.shape[2], device=q.device)[None, :] <= p
    else:
        sp = slot_pos[:b]
        visible = (sp >= 0) & (sp <= p) & (sp > p - window)
    rep = hq // k_cache.shape[1]
    k = k_cache[:b].to(ct).repeat_interleave(rep, dim=1)
    v = v_cache[:b].to(ct).repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.to(ct), k).masked_fill(~visible[:, None, :], float("-inf"))
    return torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), v).to(q.dtype)
