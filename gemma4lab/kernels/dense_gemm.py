"""Dense projections for few rows: ``y = x · wᵀ`` streaming the weight once, for decode (1–16 rows) and short
prompts (up to a few hundred rows).

At decode and at short prefill every dense projection of Gemma 4 is a stream over its weight (q/k/v/o, the dense
MLP and the tied head: 4.8 GB per decode step, 53 % of copy bandwidth under cuBLAS on the H200 at one row,
``results/runs/decode_step_h200_4784d1c.json``). The shape that bounds it is the grid, not the math: o_proj and
the MLP's down projection have 2816 output rows, so a 64-row weight tile gives 44 programs for 132 SMs. This kernel
gives each program ``block_n`` weight rows and one K range (``split_k`` ranges in all), so the grid has
``cdiv(N, block_n) · split_k`` programs whatever the row count; each loads its weight tile once and multiplies every
activation row against it.

* ``mma``: the weight tile is the tensor core's wide side (``w · xᵀ``, the swap-AB orientation of ``moe_gemm``), the
  rows its narrow side (16 at least); without it, a CUDA-core product (``Σ_k w·x`` over a broadcast ``[block_n,
  block_m, block_k]`` tile) for 1–4 rows, where padding to 16 would waste the register file.
* ``split_k`` > 1: each K range writes its fp32 partial sum to a workspace, and a second launch adds the ranges in
  a fixed order (no atomics: the bits do not depend on scheduling) and rounds once.

A row's result depends on the weight tile, the K step, the split and the product kind, never on how many rows share
the call (:func:`dense_config` keys those on (N, K) and the row count's class), so PCG's padded buckets and the
eager model agree bit for bit within one class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import pow2, register, to_dtype


@triton.jit
def _dense_gemm_kernel(
    x_ptr,  # [M, K] activations
    w_ptr,  # [N, K] weight, y = x @ wᵀ
    out_ptr,  # [M, N] output (split_k == 1), else the fp32 workspace [SPLIT, M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    stride_os,  # workspace stride between K ranges (0 without split)
    K_PER_SPLIT,  # a multiple of BLOCK_K
    MMA: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products, not TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows < M
    mask_n = cols < N
    x_rows = x_ptr + rows[None, :].to(tl.int64) * stride_xm  # [1, BLOCK_M]
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_wn  # [BLOCK_N, 1]
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # yᵀ tile
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < k_hi
        w = tl.load(w_rows + ks[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        xt = tl.load(x_rows + ks[:, None], mask=mask_k[:, None] & mask_m[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
        if MMA:
            if IEEE:
                acc = tl.dot(w, xt, acc, input_precision="ieee")
            else:
                acc = tl.dot(w, xt, acc)
        else:
            acc += tl.sum(w.to(tl.float32)[:, :, None] * xt.to(tl.float32)[None, :, :], axis=1)
    out = out_ptr + pid_s * stride_os + rows[None, :].to(tl.int64) * stride_om + cols[:, None]
    tl.store(out, to_dtype(acc, out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


@triton.jit
def _split_sum_kernel(ws_ptr, out_ptr, MN, N, stride_om, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """``out = Σ_s ws[s]`` in the order s = 0, 1, …: one rounding, the same bits on every run."""
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
    """Launch of the dense few-row GEMM: ``block_n`` weight rows × ``block_m`` activation rows per program, K in
    ``block_k`` steps over ``split_k`` ranges (a second launch adds them), ``num_warps`` warps, ``num_stages``
    pipeline stages; ``mma`` the tensor-core product (``block_m`` >= 16, ``block_n`` >= 16), else the CUDA-core
    one (``block_m`` <= 4). ``split_sum_block`` elements per program of the adding launch."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    mma: bool = True
    split_sum_block: int = 1024

    def __post_init__(self) -> None:
        pow2(self, "block_m", "block_n", "block_k", "num_warps", "split_sum_block")
        if isinstance(self.split_k, bool) or not isinstance(self.split_k, int) or self.split_k < 1:
            raise ValueError(f"DenseConfig.split_k must be an int >= 1, got {self.split_k!r}")
        if self.num_stages < 1:
            raise ValueError(f"DenseConfig.num_stages must be >= 1, got {self.num_stages}")
        if not isinstance(self.mma, bool):
            raise TypeError(f"DenseConfig.mma must be a bool, got {self.mma!r}")
        if self.mma and (self.block_m < 16 or self.block_n < 16 or self.block_k < 16):
            raise ValueError(f"DenseConfig(mma=True) needs block_m, block_n and block_k >= 16 (the tensor core's "
                             f"smallest tile), got {self}")
        if not self.mma and self.block_m > 4:
            raise ValueError(f"DenseConfig(mma=False) is the CUDA-core product for <= 4 rows, got block_m="
                             f"{self.block_m}")


def dense_config(n_rows: int, n: int, k: int) -> DenseConfig:
    """Heuristic (placeholder until the H200 sweep, ``experiments/dense_small_m.py``): the CUDA-core product up to 4
    rows, the tensor core above; enough K ranges for about two programs per SM."""
    if n_rows < 1 or n < 1 or k < 1:
        raise ValueError(f"dense_config needs positive sizes, got rows={n_rows}, N={n}, K={k}")
    if n_rows <= 4:
        base = DenseConfig(block_m=pow2_at_least(n_rows), block_n=32, block_k=128, mma=False, num_warps=4,
                           num_stages=3)
    else:
        base = DenseConfig(block_m=min(max(16, pow2_at_least(n_rows)), 256), block_n=64, block_k=128)
    tiles = triton.cdiv(n, base.block_n)
    steps = triton.cdiv(k, base.block_k)
    split = max(1, min(steps // 4, triton.cdiv(264, tiles)))
    return DenseConfig(**{**base.__dict__, "split_k": split})


def pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


DENSE_MAX_ROWS = 256


def gemma_dense_gemm_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Plain-torch twin: ``x @ wᵀ`` accumulated in fp32 (fp64 for fp64 inputs), rounded once."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(acc) @ w.to(acc).T).to(x.dtype)


def _check(x: object, w: object, config: DenseConfig | None) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        raise TypeError(f"dense_gemm takes tensors x and w, got {type(x).__name__} and {type(w).__name__}")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"expected x [M, K] and w [N, K] with one K, got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype != w.dtype or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x and w must share a dtype of float32, float16 or bfloat16, got {x.dtype} and {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"x and w must be on one device, got {x.device} and {w.device}")
    if x.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError("x and w need a contiguous last dimension")
    if config is not None and not isinstance(config, DenseConfig):
        raise TypeError(f"config must be a DenseConfig, got {type(config).__name__}")


def _launch(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, cfg: DenseConfig | None) -> None:
    m, k = x.shape
    n = w.shape[0]
    cfg = cfg or dense_config(m, n, k)
    steps = triton.cdiv(k, cfg.block_k)
    k_per_split = triton.cdiv(steps, cfg.split_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)  # ranges that hold at least one K step
    extra = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages} if x.is_cuda else {}
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))
    common = dict(MMA=cfg.mma, IEEE=x.dtype == torch.float32, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                  BLOCK_K=cfg.block_k, **extra)
    if split == 1:
        _dense_gemm_kernel[grid](x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0), 0, k_per_split,
                                 **common)
        return
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    _dense_gemm_kernel[grid](x, w, ws, m, n, k, x.stride(0), w.stride(0), n, m * n, k_per_split, **common)
    _split_sum_kernel[(triton.cdiv(m * n, cfg.split_sum_block),)](ws, out, m * n, n, out.stride(0), SPLIT=split,
                                                                  BLOCK=cfg.split_sum_block)


def _triton(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    _launch(x, w, out, None)


def _torch(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(gemma_dense_gemm_ref(x, w))


op = register("dense_gemm(Tensor x, Tensor w, Tensor(a!) out) -> ()", _triton, _torch)


def gemma_dense_gemm(x: torch.Tensor, w: torch.Tensor, *, out: torch.Tensor | None = None,
                     config: DenseConfig | None = None) -> torch.Tensor:
    """``x @ wᵀ`` (``x [M, K]``, ``w [N, K]``, one dtype) streaming ``w`` once; see the module docstring."""
    _check(x, w, config)
    m, n = x.shape[0], w.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif not isinstance(out, torch.Tensor) or tuple(out.shape) != (m, n) or out.dtype != x.dtype \
            or out.device != x.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a [{m}, {n}] {x.dtype} tensor on {x.device} with a contiguous last dimension")
    if m == 0:
        return out
    if config is not None:
        _launch(x, w, out, config)
    else:
        op(x, w, out)
    return out
