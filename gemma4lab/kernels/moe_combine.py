"""Un-sort and weight the expert outputs in one pass: ``out[t] = Σ_j w[t, j] · ys[pos[t, j]]``.

After the expert GEMMs, routed rows are sorted by expert; each token must gather its ``top_k`` rows back and sum
them with its routing weights. Unfused that is a scatter into a ``[T, k, H]`` buffer, an fp32 upcast, a multiply
and a sum (1.5 GB of fp32 intermediate at 8192 tokens); here one program per token reads its ``k`` rows, sums in
fp32 and rounds once. Deterministic (no atomics), so CUDA-graph replay is bit-identical.

Bytes per token: read k rows (k·b·H) and k weights, write one row (b·H). bf16, H = 2816, k = 8: 50.7 KB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, host_values, pdl_meta, pow2, register, to_dtype, wait_and_release


@triton.jit
def _moe_combine_kernel(
    ys_ptr,  # [M, H] expert outputs, rows sorted by expert
    pos_ptr,  # [T * TOP_K] int: where routed slot (t, j) landed in the sorted rows
    w_ptr,  # [T, TOP_K] fp32 routing weights
    out_ptr,  # [T, H]
    T,
    M,
    H,
    stride_y,
    stride_o,
    TOP_K: tl.constexpr,
    ROWS: tl.constexpr,  # tokens per program: 1 on a GPU; many under the CPU interpreter, which pays per operation
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_and_release(PDL)
    t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = t < T
    cols = tl.arange(0, BLOCK)
    mask = live[:, None] & (cols < H)[None, :]
    acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        p = tl.load(pos_ptr + t * TOP_K + j, mask=live, other=0).to(tl.int64)
        w = tl.load(w_ptr + t * TOP_K + j, mask=live, other=0.0).to(tl.float32)
        ok = (p >= 0) & (p < M)  # device-side guard: a bad position reads row 0 with weight 0, never out of bounds
        p = tl.where(ok, p, 0)
        w = tl.where(ok, w, 0.0)
        acc += w[:, None] * tl.load(ys_ptr + p[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t[:, None].to(tl.int64) * stride_o + cols[None, :], to_dtype(acc, out_ptr.dtype.element_ty),
             mask=mask)


def gemma_moe_combine_ref(ys: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    t, k = weights.shape
    y = ys[positions.long()].view(t, k, -1)
    return (y.float() * weights[..., None].float()).sum(1).to(ys.dtype)


@dataclass(frozen=True)
class CombineConfig:
    """Launch of the combine kernel: ``rows`` tokens a program (one on a GPU), ``num_warps`` warps over each
    token's ``next_pow2(H)`` lanes. A token's sum is the same operations in the same order whatever ``rows`` is."""

    num_warps: int
    rows: int = 1

    def __post_init__(self) -> None:
        pow2(self, "num_warps", "rows")


#: Tokens per program under the CPU interpreter: it runs each program's operations one after another in Python, so
#: 64 tokens a program cut a 24-token combine from ~38 to a few ms.
INTERPRET_ROWS = 64


def combine_config(hidden: int) -> CombineConfig:
    """4 warps up to 4096 lanes (hidden 2816 → 4096: 32 bf16 per thread, four 16-byte loads per slot), 8 above; one
    token a program, :data:`INTERPRET_ROWS` under the CPU interpreter."""
    return CombineConfig(num_warps=4 if triton.next_power_of_2(hidden) <= 4096 else 8,
                         rows=INTERPRET_ROWS if INTERPRET else 1)


def _launch(ys, positions, weights, out, config: CombineConfig | None) -> None:
    t, k = weights.shape
    h = ys.shape[1]
    cfg = config or combine_config(h)
    extra = {"num_warps": cfg.num_warps} if ys.is_cuda else {}
    _moe_combine_kernel[(triton.cdiv(t, cfg.rows),)](ys, positions, weights, out, t, ys.shape[0], h, ys.stride(0),
                                                     out.stride(0), TOP_K=k, ROWS=cfg.rows,
                                                     BLOCK=triton.next_power_of_2(h), **extra, **pdl_meta(ys))


def _triton(ys: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
    _launch(ys, positions, weights, out, None)


def _torch(ys: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(gemma_moe_combine_ref(ys, positions, weights))


op = register("moe_combine(Tensor ys, Tensor positions, Tensor weights, Tensor(a!) out) -> ()", _triton,
              _torch)


def gemma_moe_combine(ys: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor, *,
                      config: CombineConfig | None = None) -> torch.Tensor:
    """``out[t] = Σ_j weights[t, j] · ys[positions[t·k + j]]`` in fp32, one rounding: un-sorts and weights the
    expert outputs in one pass, with no ``[T, k, H]`` fp32 intermediate (1.5 GB at 8192 tokens) and no atomics."""
    if not all(isinstance(x, torch.Tensor) for x in (ys, positions, weights)):
        raise TypeError("moe_combine takes tensors ys, positions, weights")
    if ys.dim() != 2 or weights.dim() != 2 or positions.dim() != 1 or positions.numel() != weights.numel():
        raise ValueError(f"expected ys [M, H], positions [T*k], weights [T, k]; got {tuple(ys.shape)}, "
                         f"{tuple(positions.shape)}, {tuple(weights.shape)}")
    if ys.stride(-1) != 1 or not weights.is_contiguous() or not positions.is_contiguous():
        raise ValueError("moe_combine needs contiguous rows, weights and positions")
    if positions.dtype not in (torch.int32, torch.int64) or not weights.is_floating_point():
        raise TypeError(f"positions must be int32/int64 and weights floating point, got {positions.dtype}, "
                        f"{weights.dtype}")
    if not (ys.device == positions.device == weights.device):
        raise ValueError("ys, positions and weights must be on one device")
    if host_values(positions) and positions.numel():
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= ys.shape[0]:
            raise ValueError(f"positions must index the {ys.shape[0]} rows of ys, got values in [{lo}, {hi}]")
    t, k = weights.shape
    out = torch.empty(t, ys.shape[1], dtype=ys.dtype, device=ys.device)
    if t == 0:
        return out
    if config is not None:
        _launch(ys, positions, weights, out, config)
    else:
        op(ys, positions, weights, out)
    return out
