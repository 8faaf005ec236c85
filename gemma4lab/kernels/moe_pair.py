"""Both expert GEMMs of a few-token MoE block in one launch: gate/up tiles and down tiles in one persistent grid,
each down tile starting as soon as its expert's gate/up rows are complete.

At one to a few decode tokens the two expert GEMMs are a weight stream (8 experts × 11.9 MB at one token), and the
time lost is not in the stream but at the launch boundary: measured on an H200 in CUDA graphs on L2-cold weights
(``experiments/moe_decode_stream.py``), gate/up alone takes ~5 µs and down ~7 µs more than their bytes at copy
bandwidth, whatever the kernel — ramp, tail and the graph's node gap — so the pair streams at 68 % of copy
bandwidth at one token and 71 % at two. Two launches pay that twice, and the down GEMM cannot start its stream
before the gate/up kernel has drained.

One launch removes the boundary. Tiles are numbered gate/up first, expert by expert, then down, expert by expert;
every program takes the next number from a counter (a *ticket*) until none is left. A gate/up tile writes its slice
of the expert's ``[rows, 2I]`` product and then counts itself done for that expert (a release); a down tile of
expert ``e`` waits until all of ``e``'s gate/up tiles have counted (an acquire) and then reads the product through
L2. Tickets go out in the order programs *start*, so every tile a down tile waits for was taken by a program that
is already running and never waits itself: no deadlock, however many programs are resident (the dense MLP beside
the experts on a second stream may hold SMs). Each output element is still computed by exactly one tile with the
tile body of ``moe_gemm`` (:func:`~gemma4lab.kernels.moe_gemm.expert_tile`) and the same settings, so the pair
writes the same bits as the two launches: switching between them never changes a result.

The counters (one ticket, one count per expert slot) must be zero at launch: ``gemma_moe_route`` zeroes them in
its own launch (its ``sync`` argument), so the model pays no memset; the wrapper called alone allocates zeros.
No host synchronisation: CUDA-graph safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ._common import num_sms, pdl_meta, prefetch_l2, register, wait_and_release
from .moe_gemm import (
    SCALED_WEIGHT_DTYPES,
    MoeConfig,
    _check,
    expert_of_slot,
    expert_tile,
    gemma_moe_gemm_ref,
    moe_config,
)


@triton.jit
def _moe_pair_kernel(
    x_ptr,  # [X_ROWS, H] token rows
    wu_ptr,  # [E, 2I, H] gate|up weights
    wd_ptr,  # [E, H, I] down weights
    offs_ptr,  # [E] int32 inclusive cumulative row counts
    idx_ptr,  # [M] int32 routed slot of each sorted row
    su_ptr,  # [E, 2I] fp32 scales of FP8 gate/up weights (W_SCALED), else unused
    sd_ptr,  # [E, H] fp32 scales of FP8 down weights (W_SCALED), else unused
    h_ptr,  # [M, 2I] the gate/up product, rows sorted by expert (written here, read by the down tiles)
    out_ptr,  # [M, H] the down product, rows sorted by expert
    sync_ptr,  # [1 + SLOTS] int32, zero at launch: the ticket, then one count of finished gate/up tiles per slot
    M,
    X_ROWS,
    H,
    I2,
    INTER,
    stride_xm,
    stride_ue,
    stride_un,
    stride_de,
    stride_dn,
    stride_hm,
    stride_om,
    SLOTS,
    UP_TILES,  # gate/up tiles per slot
    DOWN_TILES,  # down tiles per slot
    TOP_K: tl.constexpr,
    IEEE: tl.constexpr,
    W_SCALED: tl.constexpr,
    A_FP8: tl.constexpr,
    E: tl.constexpr,
    E_POW2: tl.constexpr,
    COMPACT: tl.constexpr,
    UP_SWAP: tl.constexpr,
    UP_BM: tl.constexpr,
    UP_BN: tl.constexpr,
    UP_BK: tl.constexpr,
    DN_SWAP: tl.constexpr,
    DN_BM: tl.constexpr,
    DN_BN: tl.constexpr,
    DN_BK: tl.constexpr,
    PREFETCH: tl.constexpr,  # a down tile that must wait asks L2 for its weight tile first
    FIRST_STATIC: tl.constexpr,  # a program's first tile is its program id (no ticket), later ones by ticket
    PDL: tl.constexpr,
):
    wait_and_release(PDL)  # the offsets, rows and zeroed counters come from the kernels before
    n_up = SLOTS * UP_TILES
    total = n_up + SLOTS * DOWN_TILES
    if FIRST_STATIC:
        t = tl.program_id(0)
    else:
        t = tl.atomic_add(sync_ptr, 1)
    while t < total:
        if t < n_up:  # a gate/up tile: slot-major, so the first experts finish first
            slot = t // UP_TILES
            e, start, end = expert_of_slot(offs_ptr, slot, M, E, E_POW2, COMPACT)
            expert_tile(x_ptr, wu_ptr, idx_ptr, su_ptr, h_ptr, e, start, end, t % UP_TILES, X_ROWS, I2, H, stride_xm,
                        stride_ue, stride_un, stride_hm, True, TOP_K, False, IEEE, W_SCALED, A_FP8, UP_SWAP, UP_BM,
                        UP_BN, UP_BK, "")
            tl.debug_barrier()  # every thread's stores are done before one thread releases them
            tl.atomic_add(sync_ptr + 1 + slot, 1, sem="release")
        else:  # a down tile: wait for the expert's gate/up tiles, then read their product through L2
            d = t - n_up
            slot = d // DOWN_TILES
            e, start, end = expert_of_slot(offs_ptr, slot, M, E, E_POW2, COMPACT)
            if end > start:
                done = tl.atomic_add(sync_ptr + 1 + slot, 0, sem="acquire")
                if PREFETCH:
                    if done < UP_TILES:
                        rows_n = (d % DOWN_TILES) * DN_BN + tl.arange(0, DN_BN)
                        lines = tl.minimum(tl.arange(0, 16) * 64, INTER - 1)  # 128-byte lines of bf16, K <= 1024
                        prefetch_l2(wd_ptr + e.to(tl.int64) * stride_de
                                    + tl.minimum(rows_n, H - 1).to(tl.int64)[:, None] * stride_dn + lines[None, :])
                while done < UP_TILES:
                    done = tl.atomic_add(sync_ptr + 1 + slot, 0, sem="acquire")
            expert_tile(h_ptr, wd_ptr, idx_ptr, sd_ptr, out_ptr, e, start, end, d % DOWN_TILES, M, H, INTER, stride_hm,
                        stride_de, stride_dn, stride_om, False, 1, True, IEEE, W_SCALED, A_FP8, DN_SWAP, DN_BM,
                        DN_BN, DN_BK, ".cg")
        if FIRST_STATIC:
            t = tl.num_programs(0) + tl.atomic_add(sync_ptr, 1)
        else:
            t = tl.atomic_add(sync_ptr, 1)


@dataclass(frozen=True)
class PairConfig:
    """Launch of the one-launch expert pair: the gate/up and down tiles of :class:`MoeConfig` (``up``, ``down``:
    the same settings the two-launch path takes, so the bits match; they must share ``num_warps`` and
    ``num_stages``, the launch's), and a persistent grid of ``programs_per_sm`` programs per SM."""

    up: MoeConfig
    down: MoeConfig
    programs_per_sm: int = 2
    prefetch: bool = False
    first_static: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.up, MoeConfig) or not isinstance(self.down, MoeConfig):
            raise TypeError(f"PairConfig.up and .down must be MoeConfig, got {self.up!r}, {self.down!r}")
        if (self.up.num_warps, self.up.num_stages) != (self.down.num_warps, self.down.num_stages):
            raise ValueError(f"one launch has one num_warps and num_stages: up {self.up} and down {self.down} differ")
        if isinstance(self.programs_per_sm, bool) or not isinstance(self.programs_per_sm, int) \
                or self.programs_per_sm < 1:
            raise ValueError(f"PairConfig.programs_per_sm must be a positive int, got {self.programs_per_sm!r}")


@lru_cache(maxsize=256)
def pair_config(n_rows: int, n_experts: int, fp8_weights: bool = False, fp8_acts: bool = False) -> PairConfig:
    """The two-launch path's settings (:func:`moe_config`) for ``n_rows`` routed rows, two programs per SM."""
    return PairConfig(moe_config(n_rows, n_experts, False, fp8_weights, fp8_acts),
                      moe_config(n_rows, n_experts, True, fp8_weights, fp8_acts))


def sync_size(n_rows: int, n_experts: int) -> int:
    """Counters the pair needs for ``n_rows`` routed rows: one ticket and one count per expert slot."""
    return 1 + min(n_rows, n_experts)


def gemma_moe_pair_ref(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, offsets: torch.Tensor,
                       row_index: torch.Tensor, top_k: int, up_scale: torch.Tensor | None = None,
                       down_scale: torch.Tensor | None = None, a_fp8: bool = False) -> torch.Tensor:
    """Plain-torch twin: the two expert GEMMs of ``gemma_moe_gemm_ref``, gate/up (gathering the token rows) then
    down (the GELU product as its operand), the intermediate rounded to ``x``'s dtype as the kernel stores it."""
    h = gemma_moe_gemm_ref(x, w_up, offsets, row_index=row_index, top_k=top_k, w_scale=up_scale, a_fp8=a_fp8)
    return gemma_moe_gemm_ref(h, w_down, offsets, gelu_gate=True, w_scale=down_scale, a_fp8=a_fp8)


def _launch(x, w_up, w_down, offsets, row_index, top_k: int, up_scale, down_scale, a_fp8: bool, sync, h, out,
            config: PairConfig | None) -> None:
    e, i2, hid = w_up.shape
    m = out.shape[0]
    cfg = config or pair_config(m, e, w_up.dtype in SCALED_WEIGHT_DTYPES, a_fp8)
    slots = min(m, e)
    up_tiles, down_tiles = triton.cdiv(i2, cfg.up.block_n), triton.cdiv(hid, cfg.down.block_n)
    total = slots * (up_tiles + down_tiles)
    extra = {} if not x.is_cuda else {"num_warps": cfg.up.num_warps, "num_stages": cfg.up.num_stages}
    programs = min(total, cfg.programs_per_sm * num_sms(x.device))
    scaled = up_scale is not None
    _moe_pair_kernel[(programs,)](
        x, w_up, w_down, offsets, row_index, up_scale if scaled else offsets, down_scale if scaled else offsets, h,
        out, sync, m, x.shape[0], hid, i2, w_down.shape[2], x.stride(0), w_up.stride(0), w_up.stride(1),
        w_down.stride(0), w_down.stride(1), h.stride(0), out.stride(0), slots, up_tiles, down_tiles, TOP_K=top_k,
        IEEE=x.dtype == torch.float32, W_SCALED=scaled, A_FP8=a_fp8, E=e, E_POW2=triton.next_power_of_2(e),
        COMPACT=m < e, UP_SWAP=cfg.up.swap_ab, UP_BM=cfg.up.block_m, UP_BN=cfg.up.block_n, UP_BK=cfg.up.block_k,
        DN_SWAP=cfg.down.swap_ab, DN_BM=cfg.down.block_m, DN_BN=cfg.down.block_n, DN_BK=cfg.down.block_k,
        PREFETCH=cfg.prefetch and x.is_cuda, FIRST_STATIC=cfg.first_static and x.is_cuda, **extra,
        **pdl_meta(x))


def _triton(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, offsets: torch.Tensor, row_index: torch.Tensor,
            top_k: int, up_scale: torch.Tensor | None, down_scale: torch.Tensor | None, a_fp8: bool,
            sync: torch.Tensor, h: torch.Tensor, out: torch.Tensor) -> None:
    _launch(x, w_up, w_down, offsets, row_index, top_k, up_scale, down_scale, a_fp8, sync, h, out, None)


def _torch(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, offsets: torch.Tensor, row_index: torch.Tensor,
           top_k: int, up_scale: torch.Tensor | None, down_scale: torch.Tensor | None, a_fp8: bool,
           sync: torch.Tensor, h: torch.Tensor, out: torch.Tensor) -> None:
    h.copy_(gemma_moe_gemm_ref(x, w_up, offsets, row_index=row_index, top_k=top_k, w_scale=up_scale, a_fp8=a_fp8))
    out.copy_(gemma_moe_gemm_ref(h, w_down, offsets, gelu_gate=True, w_scale=down_scale, a_fp8=a_fp8))


op = register("moe_pair(Tensor x, Tensor w_up, Tensor w_down, Tensor offsets, Tensor row_index, int top_k, "
              "Tensor? up_scale, Tensor? down_scale, bool a_fp8, Tensor(a!) sync, Tensor(b!) h, Tensor(c!) out) -> ()",
              _triton, _torch)


def gemma_moe_pair(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, offsets: torch.Tensor,
                   row_index: torch.Tensor, *, top_k: int, up_scale: torch.Tensor | None = None,
                   down_scale: torch.Tensor | None = None, a_fp8: bool = False, sync: torch.Tensor | None = None,
                   config: PairConfig | None = None) -> torch.Tensor:
    """``gemma_moe_gemm`` gate/up (gathering token ``row_index[r] // top_k`` for sorted row ``r``) then down (the
    GELU product as its operand), in one launch: ``[T, H] → [T·k, H]`` in sorted order, the same bits as the two
    calls. ``sync``: ``sync_size(T·k, E)`` int32 counters that are zero (``gemma_moe_route(..., sync=)`` zeroes
    them in its launch); None allocates zeros. FP8 weights take ``up_scale`` / ``down_scale`` as ``moe_gemm``'s
    ``w_scale``; ``a_fp8`` as there."""
    if not isinstance(w_down, torch.Tensor) or w_down.dim() != 3 or not isinstance(w_up, torch.Tensor) \
            or w_up.dim() != 3:
        raise ValueError("moe_pair takes w_up [E, 2I, H] and w_down [E, H, I]")
    e, i2, hid = w_up.shape
    if tuple(w_down.shape) != (e, hid, i2 // 2) or i2 % 2:
        raise ValueError(f"w_down must be [E, H, I] = [{e}, {hid}, {i2 // 2}] for w_up {tuple(w_up.shape)}, got "
                         f"{tuple(w_down.shape)}")
    if config is not None and not isinstance(config, PairConfig):
        raise TypeError(f"config must be a PairConfig, got {type(config).__name__}")
    if row_index is None:
        raise ValueError("moe_pair gathers the token rows: row_index (moe_route's sorted_slot) is required")
    if w_down.dtype != w_up.dtype or (up_scale is None) != (down_scale is None):
        raise ValueError("w_up and w_down must share a dtype, and FP8 weights need both scales")
    if w_down.stride(-1) != 1:
        raise ValueError("w_down needs a contiguous last dimension")
    m = _check(x, w_up, offsets, False, row_index, top_k, up_scale, a_fp8, config.up if config else None)
    if down_scale is not None and (down_scale.dtype != torch.float32 or tuple(down_scale.shape) != (e, hid)
                                   or not down_scale.is_contiguous() or down_scale.device != w_down.device):
        raise ValueError(f"down_scale must be a contiguous float32 [{e}, {hid}] tensor on the weights' device")
    n_sync = sync_size(m, e)
    if sync is None:
        sync = torch.zeros(n_sync, dtype=torch.int32, device=x.device)
    elif not isinstance(sync, torch.Tensor) or sync.dtype != torch.int32 or sync.device != x.device \
            or not sync.is_contiguous() or sync.numel() < n_sync:
        raise ValueError(f"sync must be a contiguous int32 tensor of at least {n_sync} zeros on {x.device}, got "
                         f"{getattr(sync, 'dtype', type(sync).__name__)} {tuple(getattr(sync, 'shape', ()))}")
    h = torch.empty(m, i2, dtype=x.dtype, device=x.device)
    out = torch.empty(m, hid, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if config is not None:
        _launch(x, w_up, w_down, offsets, row_index, top_k, up_scale, down_scale, a_fp8, sync, h, out, config)
    else:
        op(x, w_up, w_down, offsets, row_index, top_k, up_scale, down_scale, a_fp8, sync, h, out)
    return out
