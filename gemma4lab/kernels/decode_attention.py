"""One-token decode attention against the static KV cache (``gemma4lab.runtime.kv_cache.KVCache``), graph-safe.

Which slots a new token sees is the mask rule's decode form (``Visibility.slots``), read on the device, so a captured
CUDA graph stays valid as generation advances:

* full layers: slot ``s`` holds position ``s``; visible iff ``s <= position`` (the loops stop there);
* sliding layers: a ring of ``W`` slots; ``slot_pos[b, s]`` is the position a slot holds (``-1`` empty); visible iff
  ``0 <= slot_pos <= position`` and ``slot_pos > position - window`` (:func:`_visible_slots`).

**Split-K with the query heads of a KV head packed** (the default): a grid of (sequence, KV head, split). A program
loads the ``GROUP`` query rows that share its KV head, streams one slice of that head's K and V once, and keeps an
online softmax per row; with more than one split it writes a partial (running max ``m`` in log2 units, sum ``l``,
the unnormalised output) per query head to an fp32 workspace, and a second kernel combines the splits per
(sequence, query head, 64 output dims) by the log-sum-exp rule: ``M = max m_s``, ``out = Σ 2^(m_s-M)·acc_s /
Σ 2^(m_s-M)·l_s``, in a fixed order (deterministic, no atomics). A split that sees no key writes ``m = -inf``,
``l = 0`` and no output; the combine gives it weight 0 and never reads its output rows. One split writes the
output directly (no combine).

* **The scores are a padded** ``tl.dot``: ``GROUP`` query rows (2 on sliding layers, 8 on full ones) padded with
  zero rows to 16, the smallest ``tl.dot`` tile. The broadcast multiply-and-sum of the single-head kernel would
  hold a ``[GROUP, BLOCK_N, D]`` fp32 product in registers (8 × 16 × 512 = 64 K values on a full layer: spilled);
  the padded rows waste tensor-core cycles that a memory-bound kernel leaves idle anyway (16 rows make
  ~16 FLOP per byte read, far under an H200's ~200). Chosen without a measurement. In bf16 ``P`` is rounded to
  bf16 for the ``PV`` dot, as in the prefill kernel (each weight within 2^-9; the output within the same bound of
  the largest value); fp32 uses IEEE dots.
* **Split count** (:meth:`DecodeConfig.num_splits`): static for a given cache shape, batch and GPU, so the grid is
  fixed under CUDA-graph capture: ``programs_per_sm × SMs`` programs wanted over ``batch × kv_heads``, at most one
  split per ``min_split_slots`` slots of the cache (a split's partials, ``GROUP`` fp32 rows, stay ≤ 1/16 of the K/V
  bytes it reads). Where each split starts is computed on the device: a sliding ring's slots are split evenly
  (fixed slices, masked by ``slot_pos``); a full layer splits its *visible* slots ``[0, position]`` evenly (slices
  of at least ``min_split_slots``), so a cache allocated for 32 K tokens does not leave the work of a short context
  to one split. Splits past the end are empty.
* **The single-head kernel** (``DecodeConfig(pack_heads=False)``, one split): one program per (sequence, query
  head) with a broadcast dot, each reading its KV head again: the teaching baseline and the A/B partner.

**Bytes of one decode step's attention at batch 1** (26B-A4B, bf16, context ``c`` earlier tokens, the new one at
position ``c`` already written: ``c + 1`` slots, at most the window's 1024 on sliding layers; the cache stores K and
V separately on every layer):

============  ==========================  ==============================  ===========================
context       sliding layer (8 × 256)     full layer (2 × 512)            step (25 sliding + 5 full)
============  ==========================  ==============================  ===========================
512           513 × 8 KiB = 4.2 MB        513 × 4 KiB = 2.1 MB            115 MB  (27 µs at 4.25 TB/s)
4096          1024 × 8 KiB = 8.4 MB       4097 × 4 KiB = 16.8 MB          294 MB  (69 µs)
16384         8.4 MB                      16385 × 4 KiB = 67.1 MB         545 MB  (128 µs)
============  ==========================  ==============================  ===========================

The single-head kernel runs ``batch × 16`` programs per layer (16 at batch 1 on 132 SMs) and each loads its KV head
in full: 2× the bytes above on sliding layers, **8×** on full ones (134 MB at 4096, 537 MB at 16384 per full
layer; concurrent programs of one KV head may share some of it through L2). Each program streams its 0.5–34 MB
one tile at a time. The measured graph step (``results/decode_h200.json``: 9.2 / 16.5 / 29.7 ms at 512 / 4096 /
16384) grows by 13.2 ms from 4096 to 16384, where only the 5 full layers read more (12288 slots × 2 KiB more per
program): 2.6 ms per full layer, ~9.5 GB/s per program, ~150 GB/s for the layer: latency-bound, ~4 % of the copy
bandwidth.

**Prediction for the split kernel** (H200, 132 SMs, 2 programs per SM wanted, the bench's caches of ``context + 9``
slots; to be checked with ``python -m gemma4lab bench-decode``): at batch 1 a sliding layer runs 8 KV heads × 17 /
32 / 32 splits of 32 slots at 512 / 4096 / 16384 (136 / 256 / 256 programs), a full layer 2 × 5 / 33 / 129 splits
of 128 slots (10 / 66 / 258 programs), instead of 16 programs. Each KV byte is read once, plus partials of ≤ 1/16
of the K/V bytes, written and read back by the combine (~8 MB beside the 67 MB at 16384). At half the copy
bandwidth that is ~0.05 / 0.14 / 0.28 ms of attention per step, so the step should lose nearly all of its growth
with context: 16384 within ~0.5 ms of 512 (+20.5 ms today); 512 itself should gain ~2 ms (at ~9.5 GB/s per program
the single-head kernel needs ~55 µs per sliding and ~110 µs per full layer there, ~1.9 ms per step). Batch 16 gets
3 splits on sliding and 9 on full layers.

**Measured** (``results/decode_h200.json``, H200, graph step at batch 1): with the split kernel 5.62 / 5.68 / 5.61 ms
at 512 / 4096 / 16384 (05aad8e): the growth with context is gone (−0.01 ms, prediction: within ~0.5 ms), and 512
gained 3.6 ms, more than the ~2 ms predicted. With the swapped expert GEMM as well, 4.83 / 4.94 / 5.04 ms
(e8840e9), 2.6× the step's floor: the rest of the gap is outside attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    SUPPORTED_DTYPES,
    compute_dtype,
    num_sms,
    pdl_meta,
    pow2,
    register,
    to_dtype,
    wait_and_release,
)


@triton.jit
def _visible_slots(start, end, offs_n, sp_row, pos, window, SLIDING: tl.constexpr):
    """Slots ``start + offs_n`` (int64) and which of them the new token at ``pos`` sees: those before ``end`` and, on
    a ring, ``Visibility.slots``: the slot holds position ``sp`` (-1 empty), causal, inside the window."""
    slots = start + offs_n
    ok = slots < end
    if SLIDING:
        sp = tl.load(sp_row + slots, mask=ok, other=-1)
        ok = ok & (sp >= 0) & (sp <= pos) & (sp > pos - window)
    return slots.to(tl.int64), ok


# ---- the single-head kernel (baseline) -----------------------------------------------------------------------------
@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, slot_pos_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_ob, stride_oh,
    stride_sb, n_slots, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SLIDING: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_and_release(PDL)
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
        slots, ok = _visible_slots(start, hi, offs_n, slot_pos_ptr + b * stride_sb, pos, window, SLIDING)
        ld = ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + slots[:, None] * stride_ks + offs_d[None, :], mask=ld, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1) * 1.4426950408889634
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.math.exp2(s - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        v = tl.load(v_base + slots[:, None] * stride_vs + offs_d[None, :], mask=ld, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    out = acc / l_i
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d, to_dtype(out, o_ptr.dtype.element_ty), mask=d_ok)


# ---- split-K, query heads of a KV head packed --------------------------------------------------------------------
@triton.jit(do_not_specialize=["n_slots", "window"])  # one compiled kernel per cache layout, not per size
def _split_decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, ml_ptr, pos_ptr, slot_pos_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os, stride_mb, stride_mh,
    stride_sb, n_slots, window,
    GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr, SLIDING: tl.constexpr, IEEE: tl.constexpr, STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    """One (sequence, KV head, split): the ``GROUP`` query rows of the KV head against slots ``[lo, end)``. With one
    split ``o`` is the output ``[B, Hq, D]``, else the fp32 partials ``[B, Hq, SPLITS, D]`` and ``ml`` their
    ``(m, l)`` pairs ``[B, Hq, SPLITS, 2]``."""
    wait_and_release(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    pos = tl.load(pos_ptr + b)
    if SLIDING:
        hi = n_slots  # fixed slices of the ring
    else:
        hi = tl.minimum(pos + 1, n_slots)
    chunk = tl.maximum(tl.cdiv(tl.cdiv(hi, SPLITS), BLOCK_N) * BLOCK_N, MIN_CHUNK)
    lo = split * chunk
    end = tl.minimum(hi, lo + chunk)

    rows = tl.arange(0, ROWS)
    row_ok = rows < GROUP
    heads = kvh * GROUP + rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh * stride_vh
    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)  # finite: a block with no visible key rescales by 1, not NaN
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for start in tl.range(lo, end, BLOCK_N, num_stages=STAGES):
        slots, ok = _visible_slots(start, end, offs_n, slot_pos_ptr + b * stride_sb, pos, window, SLIDING)
        ld = ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + slots[:, None] * stride_ks + offs_d[None, :], mask=ld, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(ok[None, :], s * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slots[:, None] * stride_vs + offs_d[None, :], mask=ld, other=0.0)
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    st = row_ok[:, None] & d_ok[None, :]
    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 to_dtype(out, o_ptr.dtype.element_ty), mask=st)
    else:
        ml = ml_ptr + b * stride_mb + heads * stride_mh + split * 2
        tl.store(ml, tl.where(l_i > 0, m_i, float("-inf")), mask=row_ok)
        tl.store(ml + 1, l_i, mask=row_ok)
        if lo < end:  # an empty split writes no output rows; the combine never reads them
            tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
                     acc, mask=st)


@triton.jit
def _combine_decode_attention_kernel(
    part_ptr, ml_ptr, o_ptr,
    stride_pb, stride_ph, stride_ps, stride_mb, stride_mh, stride_ob, stride_oh,
    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, SB: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_DC: tl.constexpr,
    PDL: tl.constexpr,
):
    """One (sequence, query head, ``BLOCK_DC`` output dims): the splits' partials by the log-sum-exp rule."""
    wait_and_release(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.program_id(2) * BLOCK_DC + tl.arange(0, BLOCK_DC)
    d_ok = offs_d < HEAD_DIM
    ml = ml_ptr + b * stride_mb + h * stride_mh
    offs_s = tl.arange(0, BLOCK_S)
    m = tl.load(ml + offs_s * 2, mask=offs_s < SPLITS, other=float("-inf"))
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # no split saw a key: every weight 0, out 0/0 as the ref
    part = part_ptr + b * stride_pb + h * stride_ph
    acc = tl.zeros([BLOCK_DC], dtype=tl.float32)
    l_sum = tl.zeros([SB], dtype=tl.float32)
    for s0 in tl.range(0, SPLITS, SB):
        ss = s0 + tl.arange(0, SB)
        s_ok = ss < SPLITS
        w = tl.math.exp2(tl.load(ml + ss * 2, mask=s_ok, other=float("-inf")) - m_max)  # -inf (empty) -> 0
        l_sum += w * tl.load(ml + ss * 2 + 1, mask=s_ok, other=0.0)
        x = tl.load(part + ss[:, None] * stride_ps + offs_d[None, :], mask=(w > 0)[:, None] & d_ok[None, :],
                    other=0.0)
        acc += tl.sum(w[:, None] * x, 0)
    out = acc / tl.sum(l_sum, 0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d, to_dtype(out, o_ptr.dtype.element_ty), mask=d_ok)


# ---- checks, launch settings, launch -------------------------------------------------------------------------------
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
    if k_cache.shape[2] < 1:
        raise ValueError(f"the cache has no slots: k_cache {tuple(k_cache.shape)}")
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
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if slot_pos is not None and (slot_pos.dim() != 2 or slot_pos.shape[1] != k_cache.shape[2]
                                 or slot_pos.shape[0] < b or slot_pos.stride(1) != 1
                                 or slot_pos.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"slot_pos must be an int tensor [>= {b}, {k_cache.shape[2]}] with unit column stride, got "
                         f"{slot_pos.dtype} {tuple(slot_pos.shape)}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous head_dim, got strides {t.stride()}")


@dataclass(frozen=True)
class DecodeConfig:
    """Launch of the decode kernels. Default (``pack_heads``): a grid of (sequence, KV head, split), each program
    streaming ``block_n`` slots at a time through a ``num_stages``-deep pipeline, then (with several splits) the
    combine over ``combine_block_d`` output dims per program. ``splits`` None: :meth:`num_splits` decides from
    the cache size, batch × KV heads and the SM count. ``pack_heads=False`` (with one split): the single-head
    baseline, one program per (sequence, query head)."""

    block_n: int
    num_warps: int = 4
    pack_heads: bool = True
    splits: int | None = None
    programs_per_sm: int = 2
    min_split_slots: int = 128
    num_stages: int = 3
    combine_block_d: int = 64

    def __post_init__(self) -> None:
        pow2(self, "block_n", "num_warps", "combine_block_d")
        for name in ("programs_per_sm", "min_split_slots", "num_stages"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DecodeConfig.{name} must be an int >= 1, got {v!r}")
        s = self.splits
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1):
            raise ValueError(f"DecodeConfig.splits must be None or an int >= 1, got {s!r}")
        if not self.pack_heads and s not in (None, 1):
            raise ValueError(f"DecodeConfig: the single-head kernel (pack_heads=False) has one split, got {s}")
        if self.pack_heads and self.block_n < 16:
            raise ValueError(f"DecodeConfig.block_n must be >= 16 with pack_heads (a tl.dot tile), got {self.block_n}")

    def num_splits(self, n_slots: int, rows: int, sms: int) -> int:
        """Splits of a cache of ``n_slots`` slots for ``rows`` = batch × KV heads programs on ``sms`` SMs: enough
        for ``programs_per_sm`` programs per SM, at most one per ``min_split_slots`` slots; ``splits`` if set."""
        if not self.pack_heads:
            return 1
        if self.splits is not None:
            return self.splits
        want = -(-self.programs_per_sm * sms // max(rows, 1))
        return max(1, min(want, -(-n_slots // self.min_split_slots)))


@cache
def decode_config(head_dim: int, group: int = 1, dtype: torch.dtype = torch.bfloat16) -> DecodeConfig:
    """Launch settings for a layer of ``head_dim`` with ``group`` query heads per KV head in ``dtype``.

    Slot blocks of ~8192 elements (16 slots of head 512, 32 of head 256), 16 to 64 slots; splits of at least
    ``32 · group / element bytes`` slots (a split's ``group`` fp32 partial rows ≤ 1/16 of its K/V bytes: 128 slots
    on a bf16 full layer, 32 on a sliding one); up to 3 pipeline stages of K and V tiles within ~96 KB of shared
    memory (2 programs per SM: 3 stages in bf16, 1 for fp32 at head 512). Not tuned on a GPU yet. Under the
    interpreter: 16-slot blocks (fast CPU tests)."""
    d = triton.next_power_of_2(head_dim)
    block_n = 16 if INTERPRET else max(16, min(64, 8192 // d))
    min_slots = -(-max(block_n, 32 * group // dtype.itemsize) // block_n) * block_n
    stages = max(1, min(3, 96 * 1024 // (2 * block_n * d * dtype.itemsize)))
    return DecodeConfig(block_n=block_n, min_split_slots=min_slots, num_stages=stages)


def _workspace(b: int, hq: int, splits: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial outputs ``[B, Hq, splits, D]`` and their ``(m, l)`` ``[B, Hq, splits, 2]`` (uninitialised: every
    slot the combine reads is written first; the tests poison them through this function)."""
    return (torch.empty((b, hq, splits, d), dtype=torch.float32, device=device),
            torch.empty((b, hq, splits, 2), dtype=torch.float32, device=device))


def _launch(q, k_cache, v_cache, positions, slot_pos, window: int | None, o, config: DecodeConfig | None) -> None:
    b, hq, d = q.shape
    hkv, n_slots = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    cfg = config or decode_config(d, group, q.dtype)
    sliding = slot_pos is not None
    sp = slot_pos if sliding else positions
    sp_stride = slot_pos.stride(0) if sliding else 0
    block_d = triton.next_power_of_2(d)
    kv_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                  v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
    if not cfg.pack_heads:
        _decode_attention_kernel[(b, hq)](
            q, k_cache, v_cache, o, positions, sp, q.stride(0), q.stride(1), *kv_strides, o.stride(0), o.stride(1),
            sp_stride, n_slots, window or 0,
            GROUP=group, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=cfg.block_n, SLIDING=sliding, num_warps=cfg.num_warps,
            **pdl_meta(q),
        )
        return
    splits = cfg.num_splits(n_slots, b * hkv, num_sms(q.device))
    if splits == 1:
        part, ml = o, o
        part_strides, ml_strides = (o.stride(0), o.stride(1), 0), (0, 0)
    else:
        part, ml = _workspace(b, hq, splits, d, q.device)
        part_strides, ml_strides = (part.stride(0), part.stride(1), part.stride(2)), (ml.stride(0), ml.stride(1))
    _split_decode_attention_kernel[(b, hkv, splits)](
        q, k_cache, v_cache, part, ml, positions, sp, q.stride(0), q.stride(1), *kv_strides, *part_strides,
        *ml_strides, sp_stride, n_slots, window or 0,
        GROUP=group, ROWS=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=cfg.block_n,
        SPLITS=splits, MIN_CHUNK=-(-cfg.min_split_slots // cfg.block_n) * cfg.block_n, SLIDING=sliding,
        IEEE=q.dtype == torch.float32, STAGES=cfg.num_stages, num_warps=cfg.num_warps, **pdl_meta(q),
    )
    if splits == 1:
        return
    block_dc = min(cfg.combine_block_d, block_d)
    block_s = triton.next_power_of_2(splits)
    _combine_decode_attention_kernel[(b, hq, triton.cdiv(d, block_dc))](
        part, ml, o, *part_strides, *ml_strides, o.stride(0), o.stride(1),
        SPLITS=splits, BLOCK_S=block_s, SB=min(block_s, max(1, 2048 // block_dc)), HEAD_DIM=d, BLOCK_DC=block_dc,
        num_warps=4, **pdl_meta(q),
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
                           config: DecodeConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``q [B, Hq, D]`` (the new tokens) against the cache ``[B', Hkv, slots, D]`` (first ``B`` rows) → ``[B, Hq, D]``.

    Full layers: slots are positions, visible up to ``positions[b]``. Sliding layers: pass ``slot_pos`` (the ring's
    positions, ``-1`` empty) and ``window``. Scale 1.0. No host synchronisation (CUDA-graph safe). ``config``
    overrides :func:`decode_config` (e.g. ``DecodeConfig(16, pack_heads=False)``: the single-head baseline);
    ``out`` (q's shape, dtype and device, contiguous head_dim) receives the result.
    """
    _check(q, k_cache, v_cache, positions, slot_pos, window)
    if config is not None and not isinstance(config, DecodeConfig):
        raise TypeError(f"config must be a DecodeConfig, got {type(config).__name__}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype \
                or out.device != q.device or out.stride(-1) != 1:
            raise ValueError(f"out must be a tensor of q's shape {tuple(q.shape)}, dtype {q.dtype} and device "
                             f"{q.device} with a contiguous head_dim")
    o = torch.empty_like(q) if out is None else out
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
