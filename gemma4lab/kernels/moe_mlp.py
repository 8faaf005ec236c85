"""The whole expert MLP of a few tokens in one launch: gate/up, the gated GELU and the down projection, each
expert's weights streamed once.

At decode (1–16 tokens) the MoE block is a stream over the chosen experts' weights — 95 MB for one token's 8
experts — and two GEMM launches (``moe_gemm`` gate/up, then down) pay two ramps and two tails for it: on the H200
the pair moved one token's experts at ~71 % of copy bandwidth (0.94 ms of a 3.9 ms decode step, 30 layers). Here
one program owns one expert and one ``block_i``-wide slice of its intermediate columns: it streams the slice's
gate and up rows ``[2 · block_i, H]`` against the expert's routed rows, rounds gate and up to the activations'
dtype (as the two-kernel path stores them), forms ``gelu_tanh(gate) · up`` and rounds it, then streams the matching
``[H, block_i]`` columns of the down weight and writes the slice's fp32 partial of the output row. Nothing between
the projections leaves the chip; ``moe_combine`` (``slices=``) adds a row's slices in a fixed order, rounds the
row once (as the down GEMM would) and weights it — deterministic, no atomics, CUDA-graph safe.

Which slice a column belongs to is fixed by ``block_i`` alone (:data:`MLP_BLOCK_I`), never by the row count, so a
row's bits do not depend on how many tokens share the call (PCG pads prompts; ``Experts.MOE_MLP_MAX_TOKENS`` is a
bucket edge). The sum over the intermediate columns is grouped by slice, so the bits differ from ``moe_gemm``'s
single accumulator by fp32 reassociation (tests: float64 oracle).

Bytes at one token (bf16, E = 128, I = 704, H = 2816): 8 experts × (2I·H + H·I) × 2 = 95.2 MB of weights, plus the
fp32 partials 8 × (I / block_i) × H × 4 = 2.0 MB written and read back by the combine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import host_values, pdl_meta, pow2, register, to_dtype, wait_and_release
from .moe_gemm import _gelu_tanh, expert_of_slot

#: Intermediate columns per slice: it decides how the down projection's sum is grouped (a row's bits), so it is
#: one constant, not a tuning knob. 32 bf16 columns are a 64-byte run of each down-weight row.
MLP_BLOCK_I = 32


@triton.jit
def _moe_mlp_kernel(
    x_ptr,  # [T, H] token rows
    wgu_ptr,  # [E, 2I, H] gate rows then up rows
    wd_ptr,  # [E, H, I]
    offs_ptr,  # [E] int32 inclusive cumulative row counts
    idx_ptr,  # [M] int32 routed slot of each sorted row: row r is token idx[r] // TOP_K
    part_ptr,  # [M, S · H] fp32: slice s of row r at columns [s·H, (s+1)·H)
    M,
    T,
    H,
    INTER,
    stride_x,
    stride_ge,
    stride_gn,
    stride_de,
    stride_dh,
    stride_p,
    TOP_K: tl.constexpr,
    E: tl.constexpr,
    E_POW2: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_and_release(PDL)
    slot = tl.program_id(0)
    sl = tl.program_id(1)
    e, start, end = expert_of_slot(offs_ptr, slot, M, E, E_POW2)
    cols_i = sl * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = cols_i < INTER
    g_rows = wgu_ptr + e.to(tl.int64) * stride_ge + cols_i.to(tl.int64) * stride_gn  # [BLOCK_I] gate row starts
    u_rows = g_rows + INTER * stride_gn
    d_base = wd_ptr + e.to(tl.int64) * stride_de + cols_i  # [BLOCK_I] column starts of the down slice
    for m0 in range(start, end, BLOCK_M):  # one iteration unless the expert has more than BLOCK_M rows
        rows = m0 + tl.arange(0, BLOCK_M)
        mask_m = rows < end
        src = tl.load(idx_ptr + rows, mask=mask_m, other=0) // TOP_K  # a bad index reads row 0, never out of bounds
        src = tl.where((src >= 0) & (src < T), src, 0)
        a_row = x_ptr + src[:, None].to(tl.int64) * stride_x
        acc_g = tl.zeros((BLOCK_I, BLOCK_M), dtype=tl.float32)  # gate and up, transposed: weights on the wide side
        acc_u = tl.zeros((BLOCK_I, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask_k = ks < H
            wmask = mask_i[:, None] & mask_k[None, :]
            wg = tl.load(g_rows[:, None] + ks[None, :], mask=wmask, other=0.0)
            wu = tl.load(u_rows[:, None] + ks[None, :], mask=wmask, other=0.0)
            at = tl.trans(tl.load(a_row + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0))
            if IEEE:
                acc_g = tl.dot(wg, at, acc_g, input_precision="ieee")
                acc_u = tl.dot(wu, at, acc_u, input_precision="ieee")
            else:
                acc_g = tl.dot(wg, at, acc_g)
                acc_u = tl.dot(wu, at, acc_u)
        # the two-kernel path's roundings: gate/up stored in the activations' dtype, the product rounded again
        g = to_dtype(acc_g, x_ptr.dtype.element_ty).to(tl.float32)
        u = to_dtype(acc_u, x_ptr.dtype.element_ty).to(tl.float32)
        act = to_dtype(_gelu_tanh(g) * u, x_ptr.dtype.element_ty)  # [BLOCK_I, BLOCK_M]
        out_row = part_ptr + rows[None, :].to(tl.int64) * stride_p + sl * H
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            mask_h = hs < H
            wd = tl.load(d_base[None, :] + hs[:, None].to(tl.int64) * stride_dh,
                         mask=mask_h[:, None] & mask_i[None, :], other=0.0)  # [BLOCK_H, BLOCK_I]
            if IEEE:
                y = tl.dot(wd, act, input_precision="ieee")
            else:
                y = tl.dot(wd, act)
            tl.store(out_row + hs[:, None], y, mask=mask_h[:, None] & mask_m[None, :])


@dataclass(frozen=True)
class MlpConfig:
    """Launch of the one-launch expert MLP: a program per (expert with rows, :data:`MLP_BLOCK_I` intermediate
    columns), ``block_m`` routed rows a tile, gate/up over K = hidden in ``block_k`` steps, the down slice in
    ``block_h`` output columns a step; ``num_warps`` warps, ``num_stages`` pipeline stages."""

    block_m: int = 16
    block_k: int = 128
    block_h: int = 128
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        pow2(self, "block_m", "block_k", "block_h", "num_warps")
        if min(self.block_m, self.block_k, self.block_h) < 16:
            raise ValueError(f"MlpConfig blocks must be >= 16 (the tensor core's smallest tile), got {self}")
        if self.num_stages < 1:
            raise ValueError(f"MlpConfig.num_stages must be >= 1, got {self.num_stages}")


#: Candidates of the H200 sweep (``experiments/moe_mlp_decode.py``); the default is among them.
MLP_SWEEP: tuple[MlpConfig, ...] = tuple(
    MlpConfig(16, bk, bh, nw, ns) for bk, bh, nw, ns in
    ((128, 128, 4, 3), (128, 128, 4, 4), (256, 128, 4, 3), (256, 256, 8, 3), (128, 256, 4, 3), (64, 128, 4, 4),
     (256, 128, 8, 3), (128, 64, 4, 4)))


def mlp_config() -> MlpConfig:
    """The launch settings (the default until a sweep says otherwise)."""
    return MlpConfig()


def mlp_slices(intermediate: int) -> int:
    """Slices of the intermediate columns (the partials each routed row gets)."""
    return triton.cdiv(intermediate, MLP_BLOCK_I)


def gemma_moe_mlp_ref(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, offsets: torch.Tensor,
                      row_index: torch.Tensor, top_k: int) -> torch.Tensor:
    """Plain-torch twin, the kernel's math and roundings: per expert, gate/up of the gathered rows (fp32
    accumulation, rounded to x's dtype), ``gelu_tanh(gate) · up`` (rounded), then each :data:`MLP_BLOCK_I`-column
    slice's down product in fp32 (fp64 for fp64 inputs): ``[M, S · H]``."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    e_count, two_i, h = gate_up.shape
    i = two_i // 2
    s = mlp_slices(i)
    a = x[row_index.long() // top_k]
    out = torch.zeros(a.shape[0], s * h, dtype=acc, device=x.device)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            gu = (a[start:end].to(acc) @ gate_up[e].to(acc).T).to(x.dtype).to(acc)
            act = (F.gelu(gu[:, :i], approximate="tanh") * gu[:, i:]).to(x.dtype).to(acc)
            for j in range(s):
                cols = slice(j * MLP_BLOCK_I, min(i, (j + 1) * MLP_BLOCK_I))
                out[start:end, j * h:(j + 1) * h] = act[:, cols] @ down[e][:, cols].to(acc).T
        start = end
    return out


def _check(x, gate_up, down, offsets, row_index, top_k) -> int:
    if not all(isinstance(t, torch.Tensor) for t in (x, gate_up, down, offsets, row_index)):
        raise TypeError("moe_mlp takes tensors x, gate_up, down, offsets, row_index")
    if x.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3 or offsets.dim() != 1 or row_index.dim() != 1:
        raise ValueError(f"expected x [T, H], gate_up [E, 2I, H], down [E, H, I], offsets [E], row_index [M]; got "
                         f"{tuple(x.shape)}, {tuple(gate_up.shape)}, {tuple(down.shape)}, {tuple(offsets.shape)}, "
                         f"{tuple(row_index.shape)}")
    e, two_i, h = gate_up.shape
    if two_i % 2 or x.shape[1] != h or tuple(down.shape) != (e, h, two_i // 2):
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, gate_up {tuple(gate_up.shape)} (gate rows, then "
                         f"up rows), down {tuple(down.shape)} (expected [{e}, {h}, {two_i // 2}])")
    if not (x.dtype == gate_up.dtype == down.dtype) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"moe_mlp takes bfloat16, float16 or float32 activations and weights of one dtype, got "
                        f"{x.dtype}, {gate_up.dtype}, {down.dtype} (FP8 experts take moe_gemm)")
    if offsets.dtype != torch.int32 or offsets.shape[0] != e or row_index.dtype != torch.int32:
        raise ValueError(f"offsets must be int32 [{e}] and row_index int32, got {offsets.dtype} "
                         f"{tuple(offsets.shape)}, {row_index.dtype}")
    if len({t.device for t in (x, gate_up, down, offsets, row_index)}) != 1:
        raise ValueError("x, gate_up, down, offsets and row_index must be on one device")
    if x.stride(-1) != 1 or gate_up.stride(-1) != 1 or down.stride(-1) != 1 or not row_index.is_contiguous():
        raise ValueError("moe_mlp needs contiguous last dimensions and a contiguous row_index")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    m = row_index.numel()
    if host_values(offsets) and e:
        ends = offsets.tolist()
        if ends[0] < 0 or ends[-1] != m or any(b < a for a, b in zip(ends, ends[1:])):
            raise ValueError(f"offsets must be non-decreasing cumulative row counts ending at the {m} rows, got "
                             f"{ends}")
    if host_values(row_index) and m:
        lo, hi = int(row_index.min()), int(row_index.max())
        if lo < 0 or hi // top_k >= x.shape[0]:
            raise ValueError(f"row_index // top_k must index the {x.shape[0]} rows of x, got row_index in "
                             f"[{lo}, {hi}] with top_k={top_k}")
    return m


def _launch(x, gate_up, down, offsets, row_index, top_k: int, out, config: MlpConfig | None) -> None:
    cfg = config or mlp_config()
    e, two_i, h = gate_up.shape
    m = row_index.numel()
    extra = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages} if x.is_cuda else {}
    _moe_mlp_kernel[(min(m, e), mlp_slices(two_i // 2))](
        x, gate_up, down, offsets, row_index, out, m, x.shape[0], h, two_i // 2, x.stride(0), gate_up.stride(0),
        gate_up.stride(1), down.stride(0), down.stride(1), out.stride(0), TOP_K=top_k, E=e,
        E_POW2=triton.next_power_of_2(e), IEEE=x.dtype == torch.float32, BLOCK_M=cfg.block_m, BLOCK_I=MLP_BLOCK_I,
        BLOCK_K=cfg.block_k, BLOCK_H=cfg.block_h, **extra, **pdl_meta(x))


def _triton(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, offsets: torch.Tensor,
            row_index: torch.Tensor, top_k: int, out: torch.Tensor) -> None:
    _launch(x, gate_up, down, offsets, row_index, top_k, out, None)


def _torch(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, offsets: torch.Tensor,
           row_index: torch.Tensor, top_k: int, out: torch.Tensor) -> None:
    out.copy_(gemma_moe_mlp_ref(x, gate_up, down, offsets, row_index, top_k))


op = register("moe_mlp(Tensor x, Tensor gate_up, Tensor down, Tensor offsets, Tensor row_index, int top_k, "
              "Tensor(a!) out) -> ()", _triton, _torch)


def gemma_moe_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, offsets: torch.Tensor,
                  row_index: torch.Tensor, top_k: int, *, config: MlpConfig | None = None) -> torch.Tensor:
    """The expert MLP of routed rows sorted by expert (``offsets``, ``row_index`` = ``moe_route``'s sorted slots,
    row ``r`` being token ``row_index[r] // top_k`` of ``x``): fp32 partials ``[M, S · H]``, slice ``s`` of a row
    holding its output summed over intermediate columns ``[s · MLP_BLOCK_I, (s + 1) · MLP_BLOCK_I)``;
    ``gemma_moe_combine(..., slices=S)`` finishes the block. See the module docstring."""
    m = _check(x, gate_up, down, offsets, row_index, top_k)
    e, two_i, h = gate_up.shape
    out = torch.empty(m, mlp_slices(two_i // 2) * h, dtype=torch.float32, device=x.device)
    if m == 0:
        return out
    if config is not None:
        _launch(x, gate_up, down, offsets, row_index, top_k, out, config)
    else:
        op(x, gate_up, down, offsets, row_index, top_k, out)
    return out
