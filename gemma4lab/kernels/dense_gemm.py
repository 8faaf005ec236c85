"""Dense projections for a few rows (decode, prompts of up to 16 tokens): ``x · [w0; w1; w2]ᵀ`` in one launch,
each weight streamed once.

At one to sixteen rows every dense projection is a stream over its weight, and on the H200 the stream is not what
costs (``experiments/dense_small_m.py``, ``results/runs/dense_sweep_h200_64f1e27.json``, each GEMM inside a CUDA
graph on weights L2 cannot hold): cuBLAS takes 7–8 µs for the 5.8–12 MB k, v, gate and down weights, which copy
bandwidth moves in 1.4–2.8 µs. A GEMM has a fixed cost — ramp-up, tail, the graph's node gap — so the lever is
fewer, larger GEMMs: this kernel takes up to three weights that share ``x`` (q, k, v; gate, up) and runs them as one
grid, writing one ``[M, N0 + N1 + N2]`` output whose column blocks the caller uses as views. q, k, v of a sliding
layer: 14.6 µs in one launch against 28.6 µs for cuBLAS's three.

Each program owns ``block_n`` rows of one weight and one range of K (``split_k`` ranges when a weight has too few
row tiles to fill the SMs), loads its weight tile once per K step and multiplies it with every activation row on
the tensor cores in the swapped orientation (``w · xᵀ``: the weight tile is the MMA's wide side, the ≤ 16 rows its
narrow one, as in ``moe_gemm``). With ``split_k`` > 1 each range writes an fp32 partial sum and a second launch
adds the ranges in a fixed order (no atomics: the same bits on every run) and rounds once.

:func:`dense_config` keys every setting that changes a row's bits (weight tile, K step, split) on the weights'
shapes only; the row count only sets how many rows share a tile, so a decode step and a padded PCG bucket of up to
:data:`DENSE_MAX_ROWS` rows produce the bits an eager call does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, pdl_meta, pow2, prefetch_l2, register, to_dtype, wait_and_release

#: Rows up to which the model runs its dense projections through this kernel (above, cuBLAS: at 93 rows it is faster
#: on every shape of the sweep, and the packed q/k/v and gate/up weights make each group one cuBLAS GEMM,
#: ``gemma4lab.model.packing``). 16 is also a PCG bucket edge, so a padded bucket takes the eager prompt's path.
DENSE_MAX_ROWS = 16
#: At most this many weights share one launch (q, k, v).
MAX_WEIGHTS = 3


@triton.jit
def _dense_gemm_kernel(
    x_ptr,  # [M, K] activations
    w0_ptr,  # [N0, K] weights: y[:, cols of w_i] = x @ w_iᵀ
    w1_ptr,
    w2_ptr,
    out_ptr,  # [M, N0 + N1 + N2] output (SPLIT == 1), else the fp32 workspace [SPLIT, M, N0 + N1 + N2]
    M,
    N0,
    N1,
    N2,
    K,
    stride_xm,
    stride_w0,
    stride_w1,
    stride_w2,
    stride_om,
    stride_os,  # workspace stride between K ranges (0 without split)
    K_PER_SPLIT,  # a multiple of BLOCK_K
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products, not TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch: the first K steps of the weights are fetched before the wait
    PREFETCH_K: tl.constexpr,  # with PDL: columns of each weight row asked of L2 before the wait (a 64-wide multiple)
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    # which weight this column tile belongs to: tiles [0, T0) are w0's, [T0, T0 + T1) w1's, the rest w2's. Sizes and
    # strides go through "+ zero" so every branch yields a tensor even where a launch specialised one to the constant
    # 1 — and they keep their 16-divisibility, without which the weight loads are neither vectorised nor pipelined
    # (do_not_specialize cost 4x on the H200: 9.2 ms of dense GEMMs a decode step instead of ~2)
    zero = pid_n * 0
    t0 = tl.cdiv(N0, BLOCK_N)
    t1 = tl.cdiv(N1, BLOCK_N)
    if pid_n < t0:
        w_ptr, stride_wn, n_w, tile, col0 = w0_ptr, stride_w0 + zero, N0 + zero, pid_n, zero
    elif pid_n < t0 + t1:
        w_ptr, stride_wn, n_w, tile, col0 = w1_ptr, stride_w1 + zero, N1 + zero, pid_n - t0, N0 + zero
    else:
        w_ptr, stride_wn, n_w, tile, col0 = w2_ptr, stride_w2 + zero, N2 + zero, pid_n - t0 - t1, N0 + N1 + zero
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    w_rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows < M
    mask_n = w_rows < n_w
    x_cols = x_ptr + rows[None, :].to(tl.int64) * stride_xm  # [1, BLOCK_M]
    w_base = w_ptr + w_rows[:, None].to(tl.int64) * stride_wn  # [BLOCK_N, 1]
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    if PDL:  # start the weight stream while the previous kernel finishes: an L2 hint, never a register (safe)
        lines = k_lo + tl.arange(0, PREFETCH_K // 64) * 64  # one 128-byte line of bf16 per 64 columns
        prefetch_l2(w_ptr + tl.where(mask_n, w_rows, 0)[:, None].to(tl.int64) * stride_wn
                    + tl.minimum(lines, k_hi - 1)[None, :])
    wait_and_release(PDL)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # the output tile, transposed
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < k_hi
        w = tl.load(w_base + ks[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        xt = tl.load(x_cols + ks[:, None], mask=mask_k[:, None] & mask_m[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
        if IEEE:
            acc = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
    out = out_ptr + pid_s * stride_os + rows[None, :].to(tl.int64) * stride_om + (col0 + w_rows)[:, None]
    tl.store(out, to_dtype(acc, out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


@triton.jit
def _split_sum_kernel(ws_ptr, out_ptr, MN, N, stride_om, SPLIT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """``out = Σ_s ws[s]`` in the order s = 0, 1, …: one rounding, the same bits on every run."""
    wait_and_release(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    row = offs // N
    col = offs - row * N
    tl.store(out_ptr + row.to(tl.int64) * stride_om + col, to_dtype(acc, out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class DenseConfig:
    """Launch of the few-row dense GEMM: ``block_n`` weight rows × ``block_m`` activation rows per program, K in
    ``block_k`` steps over ``split_k`` ranges (a second launch adds them, ``split_sum_block`` elements a program),
    ``num_warps`` warps and ``num_stages`` pipeline stages. Every block is a power of two and at least 16 (the
    tensor core's smallest tile)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    split_sum_block: int = 1024
    #: K steps of its weight rows a program asks L2 for before waiting on the previous kernel (dependent launch only)
    prefetch_steps: int = 2

    def __post_init__(self) -> None:
        pow2(self, "block_m", "block_n", "block_k", "num_warps", "split_sum_block")
        if min(self.block_m, self.block_n, self.block_k) < 16:
            raise ValueError(f"DenseConfig blocks must be >= 16 (the tensor core's smallest tile), got {self}")
        if isinstance(self.split_k, bool) or not isinstance(self.split_k, int) or self.split_k < 1:
            raise ValueError(f"DenseConfig.split_k must be an int >= 1, got {self.split_k!r}")
        if self.num_stages < 1:
            raise ValueError(f"DenseConfig.num_stages must be >= 1, got {self.num_stages}")
        if isinstance(self.prefetch_steps, bool) or not isinstance(self.prefetch_steps, int) \
                or self.prefetch_steps < 0:
            raise ValueError(f"DenseConfig.prefetch_steps must be an int >= 0, got {self.prefetch_steps!r}")


def dense_config(n_rows: int, ns: Sequence[int], k: int, *, itemsize: int = 2,
                 interpreter: bool = INTERPRET) -> DenseConfig:
    """Settings for ``n_rows`` rows against weights of ``ns`` output rows and ``k`` columns, from the H200 sweep
    (``results/runs/dense_sweep_h200_64f1e27.json``, at 1 and 8 rows): 64-row weight tiles, 256-deep K steps,
    4 stages; no split once the grid has >= 40 column tiles (q, o, down, the fused pairs, the head), 6 ranges of
    128-deep steps at K = 8192 (the full layers' o_proj: 16.3 against 17.5 µs unsplit), and enough ranges for
    ~2 programs per SM below 40 tiles (k, v, gate: 7.5 against 7.8 µs). The row tile covers the rows (16 at most
    :data:`DENSE_MAX_ROWS`) and never changes a row's bits. The K step is in bytes: ``itemsize`` 4 (fp32) halves it,
    so a stage stays 40 KB and four fit shared memory (fp32 at bf16's step asked Triton 3.6 for 240 KB on the
    H200 and the launch was refused: the GPU tests at 3cedda3). Under the CPU interpreter (``interpreter``), which
    pays per program and launch rather than per byte, one tall tile and no split instead."""
    if n_rows < 1 or k < 1 or not ns or min(ns) < 1:
        raise ValueError(f"dense_config needs positive sizes, got rows={n_rows}, N={list(ns)}, K={k}")
    if itemsize not in (2, 4):
        raise ValueError(f"dense_config takes 2- or 4-byte elements, got itemsize={itemsize}")
    block_m = min(256, max(16, triton.next_power_of_2(n_rows)))
    if interpreter:  # one tall tile (still one that fits an sm_90, so the compile check can take it)
        return DenseConfig(block_m=block_m, block_n=128, block_k=128, num_stages=1)
    block_n, block_k = 64, (128 if k >= 8192 else 256) * 2 // itemsize
    tiles = sum(triton.cdiv(n, block_n) for n in ns)
    steps = triton.cdiv(k, block_k)
    if k >= 8192 and tiles < 64:
        split = 6
    elif tiles >= 40:
        split = 1
    else:
        split = max(1, min(steps // 2, triton.cdiv(264, tiles)))
    return DenseConfig(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split)


def gemma_dense_gemm_ref(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Plain-torch twin: ``x @ [w0; w1; …]ᵀ`` accumulated in fp32 (fp64 for fp64 inputs), rounded once."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.cat([x.to(acc) @ w.to(acc).T for w in weights], dim=1).to(x.dtype)


def _weights(weights: object) -> tuple[torch.Tensor, ...]:
    ws = (weights,) if isinstance(weights, torch.Tensor) else tuple(weights) if isinstance(weights, (list, tuple)) \
        else None
    if not ws or len(ws) > MAX_WEIGHTS or not all(isinstance(w, torch.Tensor) for w in ws):
        raise TypeError(f"dense_gemm takes one weight tensor or a list of 1 to {MAX_WEIGHTS}, got {weights!r:.80}")
    return ws


def _check(x: object, ws: tuple[torch.Tensor, ...], config: DenseConfig | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"dense_gemm's x must be a tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    for i, w in enumerate(ws):
        if w.dim() != 2 or w.shape[1] != x.shape[1]:
            raise ValueError(f"weight {i} must be [N, {x.shape[1]}] (x's K), got {tuple(w.shape)}")
        if w.dtype != x.dtype:
            raise TypeError(f"x and weight {i} must share a dtype, got {x.dtype} and {w.dtype}")
        if w.device != x.device:
            raise ValueError(f"x and weight {i} must be on one device, got {x.device} and {w.device}")
        if w.stride(-1) != 1:
            raise ValueError(f"weight {i} needs a contiguous last dimension")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dense_gemm takes float32, float16 or bfloat16, got {x.dtype} (float64 is for references: "
                        "gemma_dense_gemm_ref computes it)")
    if x.stride(-1) != 1:
        raise ValueError("x needs a contiguous last dimension")
    if config is not None and not isinstance(config, DenseConfig):
        raise TypeError(f"config must be a DenseConfig, got {type(config).__name__}")


def _launch(x: torch.Tensor, ws: tuple[torch.Tensor, ...], out: torch.Tensor, cfg: DenseConfig | None) -> None:
    m, k = x.shape
    ns = [w.shape[0] for w in ws]
    cfg = cfg or dense_config(m, ns, k, itemsize=x.element_size())
    full = (*ws, *(ws[0],) * (MAX_WEIGHTS - len(ws)))  # unused slots: zero rows of a real tensor, never read
    n_pad = (*ns, *(0,) * (MAX_WEIGHTS - len(ns)))
    steps = triton.cdiv(k, cfg.block_k)
    k_per_split = triton.cdiv(steps, cfg.split_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)  # ranges that hold at least one K step
    n_total = sum(ns)
    grid = (sum(triton.cdiv(n, cfg.block_n) for n in ns), split, triton.cdiv(m, cfg.block_m))
    extra = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages} if x.is_cuda else {}
    meta = dict(IEEE=x.dtype == torch.float32, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                PREFETCH_K=max(64, cfg.prefetch_steps * cfg.block_k), **extra, **pdl_meta(x))
    strides = [w.stride(0) for w in full]
    if split == 1:
        _dense_gemm_kernel[grid](x, *full, out, m, *n_pad, k, x.stride(0), *strides, out.stride(0), 0, k_per_split,
                                 **meta)
        return
    ws_buf = torch.empty(split, m, n_total, dtype=torch.float32, device=x.device)
    _dense_gemm_kernel[grid](x, *full, ws_buf, m, *n_pad, k, x.stride(0), *strides, n_total, m * n_total,
                             k_per_split, **meta)
    _split_sum_kernel[(triton.cdiv(m * n_total, cfg.split_sum_block),)](
        ws_buf, out, m * n_total, n_total, out.stride(0), SPLIT=split, BLOCK=cfg.split_sum_block,
        **pdl_meta(x))


def _triton(x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor | None, w2: torch.Tensor | None,
            out: torch.Tensor) -> None:
    _launch(x, tuple(w for w in (w0, w1, w2) if w is not None), out, None)


def _torch(x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor | None, w2: torch.Tensor | None,
           out: torch.Tensor) -> None:
    out.copy_(gemma_dense_gemm_ref(x, [w for w in (w0, w1, w2) if w is not None]))


op = register("dense_gemm(Tensor x, Tensor w0, Tensor? w1, Tensor? w2, Tensor(a!) out) -> ()", _triton, _torch)


def gemma_dense_gemm(x: torch.Tensor, weights: torch.Tensor | Sequence[torch.Tensor], *,
                     out: torch.Tensor | None = None, config: DenseConfig | None = None) -> torch.Tensor:
    """``x @ [w0; w1; w2]ᵀ`` (``x [M, K]``; one to three weights ``[N_i, K]`` of x's dtype) as one ``[M, ΣN_i]``
    tensor, each weight streamed once; see the module docstring. Meant for few rows (:data:`DENSE_MAX_ROWS`)."""
    ws = _weights(weights)
    _check(x, ws, config)
    m, n = x.shape[0], sum(w.shape[0] for w in ws)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif not isinstance(out, torch.Tensor) or tuple(out.shape) != (m, n) or out.dtype != x.dtype \
            or out.device != x.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a [{m}, {n}] {x.dtype} tensor on {x.device} with a contiguous last dimension")
    if m == 0 or n == 0:
        return out
    if x.shape[1] == 0:  # an empty sum: no weight to stream
        return out.zero_()
    if config is not None:
        _launch(x, ws, out, config)
    else:
        op(x, ws[0], ws[1] if len(ws) > 1 else None, ws[2] if len(ws) > 2 else None, out)
    return out
