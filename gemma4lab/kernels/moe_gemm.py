"""Grouped expert GEMMs for small prompts: every expert's weights streamed once, its few routed rows alongside.

At prefill of a short prompt each of the 128 experts sees only a handful of the ``tokens × top_k`` routed rows
(744 rows at 93 tokens: ~6 per expert), so the expert matmuls are really a stream over 1.5 GB of weights per
layer. A generic grouped GEMM tiles for large M and reaches ~50–70 % of copy bandwidth there; this kernel gives
each program one expert and one ``BLOCK_N`` slice of its output columns and loops over that expert's rows, so
weights are read once and the rows ride along (``tl.dot`` with fp32 accumulation, one rounding at the store).

Two uses per MoE layer:

* ``moe_gemm(x_sorted, gate_up_proj, offsets)``: ``[M, H] → [M, 2I]``;
* ``moe_gemm(gate_up, down_proj, offsets, gelu_gate=True)``: the activation ``gelu_tanh(gate) · up`` is computed
  while loading the A operand, so the separate GELU kernel and its round trip disappear.

Rows must be sorted by expert; ``offsets[e]`` is the end row (inclusive cumulative count) of expert ``e``, the
layout ``torch.nn.functional.grouped_mm`` takes. No host synchronisation: CUDA-graph safe.
Bytes moved (gate/up, 93 tokens, bf16): weights 128·1408·2816·2 = 1.02 GB + rows 744·(2816+1408)·2 = 6 MB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import host_values, pow2, register, to_dtype


@triton.jit
def _gelu_tanh(x):
    # 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))), with tanh(u) = 2σ(2u) − 1 (no libdevice: interpreter-safe)
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x * tl.sigmoid(2.0 * u)


@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # [M, K] rows sorted by expert (or [M, 2K] gate|up when GELU_GATE)
    w_ptr,  # [E, N, K] expert weights, y = a @ w[e]ᵀ
    offs_ptr,  # [E] int32 inclusive cumulative row counts
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    GELU_GATE: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products, not TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Device-side guard: an expert's rows clamped to [0, M), so bad offsets can never read or write out of bounds.
    end = tl.minimum(tl.maximum(tl.load(offs_ptr + e), 0), M)
    start = tl.minimum(tl.maximum(tl.load(offs_ptr + e - 1, mask=e > 0, other=0), 0), end)
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols_n < N
    w_base = w_ptr + e.to(tl.int64) * stride_we + cols_n[None, :].to(tl.int64) * stride_wn
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask_m = rows < end
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        a_row = a_ptr + rows[:, None].to(tl.int64) * stride_am
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask_k = ks < K
            if GELU_GATE:
                g = tl.load(a_row + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
                u = tl.load(a_row + K + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
                a = to_dtype(_gelu_tanh(g) * u, w_ptr.dtype.element_ty)
            else:
                a = tl.load(a_row + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_base + ks[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            if IEEE:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        out = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols_n[None, :]
        tl.store(out, to_dtype(acc, out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class MoeConfig:
    """Launch of the expert GEMM: one program per (expert, ``block_n`` output columns), looping over the expert's rows
    in ``block_m`` tiles and over K in ``block_k`` steps; ``num_warps`` warps, ``num_stages`` pipeline stages."""

    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        pow2(self, "block_m", "block_n", "block_k", "num_warps")
        if self.num_stages < 1:
            raise ValueError(f"MoeConfig.num_stages must be >= 1, got {self.num_stages}")


def moe_config(dtype: torch.dtype) -> MoeConfig:
    """One setting for every dtype: small row tiles (a short prompt gives each expert a handful of rows) and
    128 x 128 weight tiles in a 3-stage pipeline, so that the weights stream once (experiments/moe_gemm_vs_grouped_mm
    on an H200). Tuning per token count is future work (issue: prefill at the physical limit)."""
    return MoeConfig()


def gemma_moe_gemm_ref(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                       gelu_gate: bool = False) -> torch.Tensor:
    """Plain-torch twin: one matmul per expert (fp32 accumulate, one rounding)."""
    if gelu_gate:
        g, u = a.float().chunk(2, dim=-1)
        a = (F.gelu(g, approximate="tanh") * u).to(a.dtype)
    out = torch.empty(a.shape[0], w.shape[1], dtype=a.dtype, device=a.device)
    ends = offsets.tolist()
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            out[start:end] = (a[start:end].float() @ w[e].float().T).to(a.dtype)
        start = end
    return out


def _check(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, gelu_gate: bool) -> tuple[int, int, int]:
    if not all(isinstance(t, torch.Tensor) for t in (a, w, offsets)):
        raise TypeError("moe_gemm takes tensors a, w, offsets")
    if a.dim() != 2 or w.dim() != 3 or offsets.dim() != 1:
        raise ValueError(f"expected a [M, K], w [E, N, K], offsets [E]; got {tuple(a.shape)}, {tuple(w.shape)}, "
                         f"{tuple(offsets.shape)}")
    e, n, k = w.shape
    if a.shape[1] != (2 * k if gelu_gate else k):
        raise ValueError(f"a has {a.shape[1]} columns, expected {2 * k if gelu_gate else k} for w of shape "
                         f"{tuple(w.shape)}{' (gate|up)' if gelu_gate else ''}")
    if offsets.shape[0] != e or offsets.dtype != torch.int32:
        raise ValueError(f"offsets must be int32 of length {e} (one end row per expert), got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")
    if a.dtype != w.dtype:
        raise TypeError(f"a and w must share a dtype, got {a.dtype} and {w.dtype}")
    if not (a.device == w.device == offsets.device):
        raise ValueError("a, w and offsets must be on one device")
    if a.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError("a and w need a contiguous last dimension")
    if host_values(offsets) and e:  # values on the host already: check them (no device sync)
        ends = offsets.tolist()
        if ends[0] < 0 or ends[-1] != a.shape[0] or any(y < x for x, y in zip(ends, ends[1:])):
            raise ValueError(f"offsets must be non-decreasing cumulative row counts ending at the {a.shape[0]} rows "
                             f"of a, got {ends}")
    return e, n, k


def _launch(a, w, offsets, gelu_gate: bool, out, config: MoeConfig | None) -> None:
    e, n, k = w.shape
    cfg = config or moe_config(a.dtype)
    extra = {} if not a.is_cuda else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    _moe_gemm_kernel[(e, triton.cdiv(n, cfg.block_n))](
        a, w, offsets, out, a.shape[0], n, k, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        GELU_GATE=gelu_gate, IEEE=a.dtype == torch.float32, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, **extra)


def _triton(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, gelu_gate: bool, out: torch.Tensor) -> None:
    _launch(a, w, offsets, gelu_gate, out, None)


def _torch(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, gelu_gate: bool, out: torch.Tensor) -> None:
    out.copy_(gemma_moe_gemm_ref(a, w, offsets, gelu_gate))


op = register("moe_gemm(Tensor a, Tensor w, Tensor offsets, bool gelu_gate, Tensor(a!) out) -> ()", _triton,
              _torch)


def gemma_moe_gemm(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, gelu_gate: bool = False,
                   config: MoeConfig | None = None) -> torch.Tensor:
    """``out[r] = act(a[r]) @ w[expert(r)]ᵀ`` for rows sorted by expert (see module docstring)."""
    e, n, k = _check(a, w, offsets, gelu_gate)
    out = torch.empty(a.shape[0], n, dtype=a.dtype, device=a.device)
    if a.shape[0] == 0:
        return out
    if config is not None:
        _launch(a, w, offsets, gelu_gate, out, config)
    else:
        op(a, w, offsets, gelu_gate, out)
    return out
