"""FlashAttention-style prefill for Gemma 4's two layer types, over packed prompts, in one launch.

Why our own kernel: no attention kernel that ships with PyTorch serves Gemma 4 well. SDPA's fused kernels refuse
head dimension 512 (the full layers); the sliding layers' window needs a mask, which drops SDPA to cuDNN at
~11 TFLOP/s; FlexAttention fits head 512 only with 32×32 tiles.

One program computes a ``BLOCK_M``-row tile of queries of one prompt for one query head:

* **online softmax**: scores never leave registers; running max ``m``, running sum ``l`` and the ``[BLOCK_M, D]``
  fp32 accumulator are rescaled when the max grows (``exp2`` with ``log2 e`` folded into the scores). Scale 1.0:
  Gemma 4 normalises q and k instead of dividing by √d.
* **GQA** by index: query head ``h`` reads KV head ``h // (Hq / Hkv)``; K/V are never repeated in memory.
* **packed prompts**: ``cu_seqlens`` (int32, ``[B + 1]``) bounds every key range, so prompts never see each other.
* **chunks after cached keys** (chunked prefill): with ``cu_seqlens_k`` a prompt's keys are their own packed range
  and its queries are the *last* rows of it (FlashAttention's bottom-right alignment): query row ``r`` is key row
  ``r + shift``, ``shift = k_end - q_end``. Every mask below works in key rows, so the masked-tile logic is the same
  code with or without a cached prefix (``shift = 0`` without).
* **one integer per row describes every mask**: ``key_end[r]`` is the exclusive end (a key row) of the keys row
  ``r`` may see (``r + shift + 1`` for text, the end of its image for an image soft token on a sliding layer:
  bidirectional inside the image). With a window ``W`` (sliding layers) a key must also satisfy
  ``key > r + shift - W``. Keys outside ``[max(start, q_lo + shift - W + 1), max key_end of the tile)`` are never
  visited, so fully masked tiles cost nothing.
* **three key segments per tile**: the window edge (masked), the interior (every key visible to every row of the
  tile: no mask arithmetic at all) and the diagonal / image tail (masked).

Layouts: ``q`` ``[N, Hq, D]``, ``k``/``v`` ``[N, Hkv, D]`` (``[keys, Hkv, D]`` with ``cu_seqlens_k``), any token and
head strides (the projections' views), unit stride along ``D``. fp32 inputs use IEEE fp32 dots (no TF32) so the fp32
model keeps its 1e-5 parity.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    SUPPORTED_DTYPES,
    compute_dtype,
    host_values,
    pdl_meta,
    pow2,
    register,
    to_dtype,
    wait_and_release,
)

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionConfig:
    """Tile shape and launch of the prefill kernel (override the heuristic with ``config=``; the benchmark sweeps)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    #: Programs sharing one query tile, each producing ``D / dv_splits`` output dims (they recompute ``QKᵀ``): a
    #: smaller fp32 accumulator, so larger query tiles fit in registers at head 512.
    dv_splits: int = 1
    #: Q, K and V tiles through TMA tensor descriptors (Hopper's asynchronous bulk copies: no per-element address
    #: registers, multi-buffered by the pipeliner) in ``min(D, 256)``-wide column chunks (a TMA box holds at most 256
    #: elements a dim): at head 512 one ``QKᵀ`` per tile as two chunk products, and two 256-wide accumulators — the
    #: output-dim split inside one program, ``P`` shared. Needs ``dv_splits == 1`` and 16-byte aligned rows.
    tma: bool = False

    def __post_init__(self) -> None:
        pow2(self, "block_m", "block_n", "num_warps", "dv_splits")
        if self.num_stages < 1:
            raise ValueError(f"AttentionConfig.num_stages must be >= 1, got {self.num_stages}")
        if not isinstance(self.tma, bool):
            raise TypeError(f"AttentionConfig.tma must be a bool, got {self.tma!r}")
        if self.tma and self.dv_splits != 1:
            raise ValueError("AttentionConfig(tma=True) computes every output dim in one program: dv_splits must be 1")


#: Per layer type, settings that replace the heuristic's for calls without ``config=`` (:func:`attention_configs`).
_FORCED: dict[bool, AttentionConfig] = {}


@contextmanager
def attention_configs(full: AttentionConfig | None = None, sliding: AttentionConfig | None = None) -> Iterator[None]:
    """Inside the block, every call without its own ``config=`` on a full (sliding) layer takes ``full``
    (``sliding``): what ``bench-attention`` uses to time a whole model's prefill under other tiles. Not for CUDA
    graphs captured inside it (the settings are read when a launch is made, and a replay repeats the captured one)."""
    for name, cfg in (("full", full), ("sliding", sliding)):
        if cfg is not None and not isinstance(cfg, AttentionConfig):
            raise TypeError(f"{name} must be an AttentionConfig or None, got {type(cfg).__name__}")
    saved = dict(_FORCED)
    _FORCED.update({k: v for k, v in ((False, full), (True, sliding)) if v is not None})
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def attention_config(head_dim: int, dtype: torch.dtype, sliding: bool) -> AttentionConfig:
    """Default tiles (from ``gemma4lab bench-attention --sweep`` on an H200). The ``[BLOCK_M, D / dv_splits]`` fp32
    accumulator must fit in registers and the Q, K, V tiles in shared memory: at head 512 two programs share a
    128-row query tile, each computing ``QKᵀ`` in full and half of ``PV`` (1.5x the useful FLOPs, but the larger
    tile halves the K/V traffic per FLOP); fp32 halves the tiles; the interpreter runs small ones."""
    if INTERPRET:
        return AttentionConfig(16, 16, 4, 1)
    d = triton.next_power_of_2(head_dim)
    if dtype == torch.float32:
        return AttentionConfig(32, 32, 4, 1) if d >= 256 else AttentionConfig(64, 32, 4, 2)
    if d >= 512:  # 128-row tiles, each program producing half the output dims (H200 sweep: +33 % over 64-row tiles)
        return AttentionConfig(128, 64, 8, 1, dv_splits=2)
    if d >= 256:
        return AttentionConfig(128, 64, 8, 2)
    return AttentionConfig(128, 64, 8, 3)


# ---- kernel --------------------------------------------------------------------------------------------------------
@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """``a @ b (+ acc)``: exact fp32 products for fp32 inputs (IEEE), the tensor cores' default otherwise."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _softmax_step(s, m_i, l_i, cols, rows, key_end, hi, window, MASKED: tl.constexpr, SLIDING: tl.constexpr):
    """One key tile of the online softmax: the scores ``s`` (in log2 units after ``log2 e``; masked where a row may
    not see a key, or past the segment's end ``hi``) → ``p``, the rescale ``alpha`` of what came before, the new
    running max and sum."""
    s = s * 1.4426950408889634  # log2(e): softmax via exp2
    if MASKED:
        visible = (cols[None, :] < key_end[:, None]) & (cols < hi)[None, :]
        if SLIDING:
            visible = visible & (cols[None, :] > rows[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attend_keys(acc, m_i, l_i, q, k_head, v_head, stride_kn, stride_vn, rows, key_end, lo, hi, window, dv0,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HEAD_DIM: tl.constexpr,
                 MASKED: tl.constexpr, SLIDING: tl.constexpr, IEEE: tl.constexpr):
    """Fold keys ``[lo, hi)`` into the running softmax (output dims ``dv0 + [0, BLOCK_DV)``). Unmasked segments must
    span whole ``BLOCK_N`` tiles."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = dv0 + tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM
    for start in tl.range(lo, hi, BLOCK_N):
        cols = start + offs_n
        cols64 = cols.to(tl.int64)
        kv_ok = cols < hi
        if BLOCK_D != HEAD_DIM or MASKED:
            ld = kv_ok[:, None] & d_ok[None, :]
            k = tl.load(k_head + cols64[:, None] * stride_kn + offs_d[None, :], mask=ld, other=0.0)
        else:
            k = tl.load(k_head + cols64[:, None] * stride_kn + offs_d[None, :])
        s = _mma(q, tl.trans(k), None, IEEE)
        p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i, cols, rows, key_end, hi, window, MASKED, SLIDING)
        acc = acc * alpha[:, None]
        if BLOCK_D != HEAD_DIM or MASKED:
            v = tl.load(v_head + cols64[:, None] * stride_vn + offs_dv[None, :],
                        mask=kv_ok[:, None] & dv_ok[None, :], other=0.0)
        else:
            v = tl.load(v_head + cols64[:, None] * stride_vn + offs_dv[None, :])
        acc = _mma(p.to(v.dtype), v, acc, IEEE)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_keys_tma(acc0, acc1, m_i, l_i, qa, qb, kd, vd, rows, key_end, lo, hi, window,
                     BLOCK_N: tl.constexpr, D_CHUNK: tl.constexpr, TWO: tl.constexpr, MASKED: tl.constexpr,
                     SLIDING: tl.constexpr, IEEE: tl.constexpr):
    """:func:`_attend_keys` with K and V tiles from TMA descriptors (rows past the tensor read as zeros), in one or
    two ``D_CHUNK``-wide column chunks: ``s = qa·kaᵀ (+ qb·kbᵀ)`` once, then ``P`` into both accumulators. In
    masked segments V rows at or past ``hi`` are zeroed (they may belong to the next prompt or be unwritten cache)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in tl.range(lo, hi, BLOCK_N):
        cols = start + offs_n
        s = _mma(qa, tl.trans(kd.load([start, 0])), None, IEEE)
        if TWO:
            s = _mma(qb, tl.trans(kd.load([start, D_CHUNK])), s, IEEE)
        p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i, cols, rows, key_end, hi, window, MASKED, SLIDING)
        va = vd.load([start, 0])
        if MASKED:
            va = tl.where((cols < hi)[:, None], va, 0.0)
        p = p.to(va.dtype)
        acc0 = _mma(p, va, acc0 * alpha[:, None], IEEE)
        if TWO:
            vb = vd.load([start, D_CHUNK])
            if MASKED:
                vb = tl.where((cols < hi)[:, None], vb, 0.0)
            acc1 = _mma(p, vb, acc1 * alpha[:, None], IEEE)
        m_i = m_new
    return acc0, acc1, m_i, l_i


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, cuk_ptr, key_end_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    window, n_tiles, n_rows, n_keys,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr, HAS_KEY_END: tl.constexpr,
    IEEE: tl.constexpr, TMA: tl.constexpr, D_CHUNK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_and_release(PDL)
    # (query head, output-dim slice) vary fastest: programs that share a KV tile run together (L2 reuse)
    h = tl.program_id(0) // (BLOCK_D // BLOCK_DV)
    dv0 = tl.program_id(0) % (BLOCK_D // BLOCK_DV) * BLOCK_DV
    tile = n_tiles - 1 - tl.program_id(1)  # causal: the longest tiles are scheduled first
    b = tl.program_id(2)
    # Device-side guard: prompt bounds clamped to the rows that exist, so a bad cu_seqlens can never read or write
    # out of bounds (the wrapper checks the values themselves when they live on the host).
    p_end = tl.minimum(tl.maximum(tl.load(cu_ptr + b + 1), 0), n_rows)
    p_start = tl.minimum(tl.maximum(tl.load(cu_ptr + b), 0), p_end)
    q_lo = p_start + tile * BLOCK_M
    if q_lo >= p_end:
        return
    # The prompt's keys [k_start, k_end) end with its queries' own: query row r is key row r + shift.
    k_end = tl.minimum(tl.maximum(tl.load(cuk_ptr + b + 1), 0), n_keys)
    k_start = tl.minimum(tl.maximum(tl.load(cuk_ptr + b), 0), k_end)
    shift = k_end - p_end
    q_last = tl.minimum(q_lo + BLOCK_M, p_end) - 1
    rows = q_lo + tl.arange(0, BLOCK_M)
    row_ok = rows < p_end
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_lo = q_lo + shift  # the key rows of the tile's first and last query
    k_last = q_last + shift
    if HAS_KEY_END:
        key_end = tl.load(key_end_ptr + rows, mask=row_ok, other=0)
        kv_hi = tl.minimum(tl.max(key_end, 0), k_end)  # never past the prompt's last key
    else:
        key_end = rows + shift + 1
        kv_hi = k_last + 1
    kv_lo = k_start
    interior_lo = k_start
    if SLIDING:
        kv_lo = tl.maximum(k_start, k_lo - window + 1)
        interior_lo = tl.maximum(k_start, k_last - window + 1)
    # Every key in [interior_lo, k_lo] is visible to every row of the tile; keep whole tiles of it unmasked.
    n_interior = tl.maximum(k_lo + 1 - interior_lo, 0) // BLOCK_N * BLOCK_N
    interior_hi = interior_lo + n_interior

    kvh = h // GROUP
    q_head = q_ptr + h * stride_qh
    k_head = k_ptr + kvh * stride_kh
    v_head = v_ptr + kvh * stride_vh
    # A finite start for the running max: a row whose first tile is fully masked then gets p = 0, never NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    krows = rows + shift
    if TMA:  # every output dim in this program, in D_CHUNK-wide chunks (see AttentionConfig.tma)
        TWO: tl.constexpr = HEAD_DIM > D_CHUNK
        qd = tl.make_tensor_descriptor(q_head, shape=[n_rows, HEAD_DIM], strides=[stride_qn, 1],
                                       block_shape=[BLOCK_M, D_CHUNK])
        kd = tl.make_tensor_descriptor(k_head, shape=[n_keys, HEAD_DIM], strides=[stride_kn, 1],
                                       block_shape=[BLOCK_N, D_CHUNK])
        vd = tl.make_tensor_descriptor(v_head, shape=[n_keys, HEAD_DIM], strides=[stride_vn, 1],
                                       block_shape=[BLOCK_N, D_CHUNK])
        qa = qd.load([q_lo, 0])  # rows past the prompt are read (the next prompt's, or zeros) but never stored
        qb = qd.load([q_lo, D_CHUNK]) if TWO else qa
        acc0 = tl.zeros([BLOCK_M, D_CHUNK], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_M, D_CHUNK], dtype=tl.float32) if TWO else acc0
        if SLIDING:
            acc0, acc1, m_i, l_i = _attend_keys_tma(acc0, acc1, m_i, l_i, qa, qb, kd, vd, krows, key_end, kv_lo,
                                                    interior_lo, window, BLOCK_N, D_CHUNK, TWO, True, SLIDING, IEEE)
        acc0, acc1, m_i, l_i = _attend_keys_tma(acc0, acc1, m_i, l_i, qa, qb, kd, vd, krows, key_end, interior_lo,
                                                interior_hi, window, BLOCK_N, D_CHUNK, TWO, False, SLIDING, IEEE)
        acc0, acc1, m_i, l_i = _attend_keys_tma(acc0, acc1, m_i, l_i, qa, qb, kd, vd, krows, key_end, interior_hi,
                                                kv_hi, window, BLOCK_N, D_CHUNK, TWO, True, SLIDING, IEEE)
        offs_c = tl.arange(0, D_CHUNK)
        o_rows = o_ptr + h * stride_oh + rows64[:, None] * stride_on
        tl.store(o_rows + offs_c[None, :], to_dtype(acc0 / l_i[:, None], o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        if TWO:
            tl.store(o_rows + D_CHUNK + offs_c[None, :], to_dtype(acc1 / l_i[:, None], o_ptr.dtype.element_ty),
                     mask=row_ok[:, None])
        return
    q = tl.load(q_head + rows64[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if SLIDING:  # the window's edge
        acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q, k_head, v_head, stride_kn, stride_vn, krows, key_end,
                                     kv_lo, interior_lo, window, dv0, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_DIM, True,
                                     SLIDING, IEEE)
    acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q, k_head, v_head, stride_kn, stride_vn, krows, key_end,
                                 interior_lo, interior_hi, window, dv0, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_DIM, False,
                                 SLIDING, IEEE)
    acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q, k_head, v_head, stride_kn, stride_vn, krows, key_end,
                                 interior_hi, kv_hi, window, dv0, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_DIM, True,
                                 SLIDING, IEEE)
    out = acc / l_i[:, None]
    offs_dv = dv0 + tl.arange(0, BLOCK_DV)
    o_ptrs = o_ptr + h * stride_oh + rows64[:, None] * stride_on + offs_dv[None, :]
    tl.store(o_ptrs, to_dtype(out, o_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < HEAD_DIM)[None, :])


# ---- wrapper ---------------------------------------------------------------------------------------------------
def _check(q, k, v, cu_seqlens, max_seqlen, window, key_end, out, cu_seqlens_k=None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be 3-D [tokens, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q has unsupported dtype {q.dtype}; expected float32, float16 or bfloat16")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device or cu_seqlens.device != q.device:
        raise ValueError(f"q, k, v and cu_seqlens must be on one device, got {q.device}, {k.device}, {v.device}, "
                         f"{cu_seqlens.device}")
    n, hq, d = q.shape
    if cu_seqlens_k is None and (k.shape != v.shape or k.shape[0] != n or k.shape[2] != d):
        raise ValueError(f"k and v must be [{n}, Hkv, {d}] like q's tokens and head_dim, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape or k.shape[2] != d:
        raise ValueError(f"k and v must be [keys, Hkv, {d}] with q's head_dim, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    n_keys = k.shape[0]
    if hq % k.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({k.shape[1]})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1:
            raise ValueError(f"{name} must have a contiguous head_dim (stride 1), got strides {t.stride()}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [num_prompts + 1], got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens_k is not None:
        if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.shape != cu_seqlens.shape or \
                cu_seqlens_k.dtype != torch.int32 or cu_seqlens_k.device != q.device:
            raise ValueError(f"cu_seqlens_k must be an int32 tensor shaped like cu_seqlens {tuple(cu_seqlens.shape)} "
                             f"on {q.device}, got {getattr(cu_seqlens_k, 'dtype', type(cu_seqlens_k))} "
                             f"{tuple(getattr(cu_seqlens_k, 'shape', ()))}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive int (the longest prompt), got {max_seqlen!r}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None (full layer) or a positive int, got {window!r}")
    if key_end is not None:
        if not isinstance(key_end, torch.Tensor) or key_end.shape != (n,) or key_end.dtype != torch.int32:
            raise ValueError(f"key_end must be an int32 tensor [{n}], got "
                             f"{getattr(key_end, 'dtype', type(key_end))} {tuple(getattr(key_end, 'shape', ()))}")
        if key_end.device != q.device or key_end.stride(0) != 1:
            raise ValueError("key_end must be contiguous and on q's device")
    if host_values(cu_seqlens):  # the values are on the host already: check them (no device sync)
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != n or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to the token count {n} without decreasing, got {cu}")
        if max(b - a for a, b in zip(cu, cu[1:])) > max_seqlen:
            raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest prompt in cu_seqlens ({cu})")
        if cu_seqlens_k is not None:
            cuk = cu_seqlens_k.tolist()
            if cuk[0] != 0 or cuk[-1] != n_keys or any(kb - ka < qb - qa for qa, qb, ka, kb in
                                                       zip(cu, cu[1:], cuk, cuk[1:])):
                raise ValueError(f"cu_seqlens_k must rise from 0 to the key count {n_keys}, each prompt holding at "
                                 f"least as many keys as queries (its queries are its last keys), got {cuk} for "
                                 f"cu_seqlens {cu}")
        if key_end is not None and key_end.numel():
            lo, hi = int(key_end.min()), int(key_end.max())
            if lo < 0 or hi > n_keys:
                raise ValueError(f"key_end values must lie in [0, {n_keys}], got [{lo}, {hi}]")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or \
                out.device != q.device or out.stride(2) != 1:
            raise ValueError(f"out must be a {q.dtype} tensor {tuple(q.shape)} on {q.device} with a contiguous "
                             "head_dim")


def _launch(q, k, v, cu_seqlens, max_seqlen: int, window: int | None, key_end, o, config: AttentionConfig | None,
            cu_seqlens_k=None):
    n, hq, d = q.shape
    cfg = config or _FORCED.get(window is not None) or attention_config(d, q.dtype, window is not None)
    block_d = triton.next_power_of_2(d)
    if cfg.dv_splits > block_d:
        raise ValueError(f"config.dv_splits={cfg.dv_splits} exceeds the padded head dim {block_d}")
    n_tiles = triton.cdiv(max_seqlen, cfg.block_m)
    if cfg.tma:
        _check_tma(q, k, v, d)
    _prefill_attention_kernel[(hq * cfg.dv_splits, n_tiles, cu_seqlens.numel() - 1)](
        q, k, v, o, cu_seqlens, cu_seqlens_k if cu_seqlens_k is not None else cu_seqlens,
        key_end if key_end is not None else cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        window or 0, n_tiles, n, k.shape[0],
        GROUP=hq // k.shape[1], HEAD_DIM=d, BLOCK_D=block_d, BLOCK_DV=block_d // cfg.dv_splits, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, SLIDING=window is not None, HAS_KEY_END=key_end is not None,
        IEEE=q.dtype == torch.float32, TMA=cfg.tma, D_CHUNK=min(d, TMA_BOX), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl_meta(q),
    )


#: The most elements a TMA box holds along one dim.
TMA_BOX = 256


def _check_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: int) -> None:
    """What TMA descriptors need: a head dim that splits into whole boxes, 16-byte aligned rows and heads; and a
    scratch allocator for the descriptors the kernel writes (a torch one, unless the caller installed their own)."""
    if not (d == 2 * TMA_BOX or d <= TMA_BOX and d == triton.next_power_of_2(d)):
        raise ValueError(f"AttentionConfig(tma=True) takes a power-of-two head dim up to {TMA_BOX} or "
                         f"{2 * TMA_BOX}, got {d}")
    size = q.element_size()
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.data_ptr() % 16 or (t.stride(0) * size) % 16 or (t.stride(1) * size) % 16:
            raise ValueError(f"AttentionConfig(tma=True) needs 16-byte aligned rows and heads: {name} has strides "
                             f"{t.stride()} ({t.dtype}) at address {t.data_ptr():#x}")
    _ensure_allocator()


def _ensure_allocator() -> None:
    try:  # Triton's context variable: keep an allocator the caller installed
        from triton.runtime._allocation import NullAllocator, _allocator

        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:
        pass
    triton.set_allocator(_scratch)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for the descriptors a kernel builds on the device (inside a CUDA graph: the graph's pool)."""
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def _triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
            window: int, key_end: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, out: torch.Tensor) -> None:
    _launch(q, k, v, cu_seqlens, max_seqlen, window or None, key_end, out, None, cu_seqlens_k)


def _torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
           window: int, key_end: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, out: torch.Tensor) -> None:
    gemma_prefill_attention_ref(q, k, v, cu_seqlens, window=window or None, key_end=key_end, out=out,
                                cu_seqlens_k=cu_seqlens_k)


# window 0 = a full layer (no window); max_seqlen is a SymInt so that torch.compile keeps prompt lengths dynamic
op = register("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, int window, "
              "Tensor? key_end, Tensor? cu_seqlens_k, Tensor(a!) out) -> ()", _triton, _torch)


def gemma_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_seqlen: int, *, window: int | None = None, key_end: torch.Tensor | None = None,
                            cu_seqlens_k: torch.Tensor | None = None, out: torch.Tensor | None = None,
                            config: AttentionConfig | None = None) -> torch.Tensor:
    """Attention of packed prompts, scale 1.0: ``q [N, Hq, D]``, ``k``/``v`` ``[N, Hkv, D]`` → ``[N, Hq, D]``.

    ``cu_seqlens`` int32 ``[B + 1]`` (prompt b is rows ``cu[b]:cu[b+1]``), ``max_seqlen`` the longest prompt (a host
    int: it sizes the grid), ``window`` the sliding window (keys ``> row - window``; None on full layers),
    ``key_end`` int32 ``[N]`` the exclusive end of each row's visible keys (default ``row + 1``: causal; see
    ``gemma4lab.attention.Visibility.key_end`` for image blocks). ``cu_seqlens_k`` (chunked prefill) gives the
    prompts' key rows separately, ``k``/``v`` ``[keys, Hkv, D]``: prompt b's queries are the *last* rows of its keys
    ``cu_k[b]:cu_k[b+1]`` (the keys before them were cached by earlier chunks), and ``key_end`` counts in key rows.
    ``cu_seqlens(_k)`` and ``key_end`` are checked by value when they are on the host; on a GPU the kernel clamps
    them to the rows that exist.
    """
    _check(q, k, v, cu_seqlens, max_seqlen, window, key_end, out, cu_seqlens_k)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if q.shape[0] == 0:
        return o
    if config is not None:
        _launch(q, k, v, cu_seqlens, max_seqlen, window, key_end, o, config, cu_seqlens_k)
    else:
        op(q, k, v, cu_seqlens, max_seqlen, window or 0, key_end, cu_seqlens_k, o)
    return o


def gemma_prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                                window: int | None = None, key_end: torch.Tensor | None = None,
                                out: torch.Tensor | None = None,
                                cu_seqlens_k: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch twin: an explicit mask per prompt (in key rows, the queries being each prompt's last keys),
    softmax in fp32 (fp64 for fp64 inputs)."""
    ct = compute_dtype(q)
    bounds = cu_seqlens.tolist()
    k_bounds = cu_seqlens_k.tolist() if cu_seqlens_k is not None else bounds
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    rep = q.shape[1] // k.shape[1]
    for s, e, ks, ke in zip(bounds[:-1], bounds[1:], k_bounds[:-1], k_bounds[1:]):
        if e == s:
            continue
        rows = torch.arange(s, e, device=q.device) + (ke - e)  # each query's own key row
        cols = torch.arange(ks, ke, device=q.device)
        ends = key_end[s:e].long() if key_end is not None else rows + 1
        visible = cols[None, :] < ends[:, None]
        if window is not None:
            visible &= cols[None, :] > rows[:, None] - window
        qq = q[s:e].to(ct).transpose(0, 1)
        kk = k[ks:ke].to(ct).repeat_interleave(rep, dim=1).transpose(0, 1)
        vv = v[ks:ke].to(ct).repeat_interleave(rep, dim=1).transpose(0, 1)
        scores = (qq @ kk.transpose(1, 2)).masked_fill(~visible, float("-inf"))
        o[s:e] = (scores.softmax(-1) @ vv).transpose(0, 1).to(q.dtype)
    return o
