"""Grouped expert GEMMs for prompts up to a few hundred tokens: every expert's weights streamed once, its routed
rows alongside.

At prefill of a short prompt each of the 128 experts sees only a handful of the ``tokens × top_k`` routed rows
(744 rows at 93 tokens: ~6 per expert), so the expert matmuls are really a stream over 1.5 GB of weights per
layer. A generic grouped GEMM tiles for large M and reaches ~50–70 % of copy bandwidth there; this kernel gives
each program one expert and one ``BLOCK_N`` slice of its output columns, holds all of that expert's rows in one
``BLOCK_M`` row tile and loops over K once, so each weight element is read once (``tl.dot`` with fp32
accumulation, one rounding at the store).

Two uses per MoE layer:

* ``moe_gemm(x, gate_up_proj, offsets, row_index=sorted_slot, top_k=k)``: ``[T, H] → [T·k, 2I]``; sorted row
  ``r`` reads token row ``sorted_slot[r] // k`` of ``x`` while loading the A operand, so the gathered copy
  ``x[order // k]`` is never written (``sorted_slot`` and ``offsets`` come from ``gemma_moe_route``);
* ``moe_gemm(gate_up, down_proj, offsets, gelu_gate=True)``: the activation ``gelu_tanh(gate) · up`` is computed
  while loading the A operand, so the separate GELU kernel and its round trip disappear.

**Four levers refuted at one to four tokens** (H200, each in a CUDA graph on L2-cold weights,
``experiments/moe_decode_stream.py``): at one token each GEMM alone takes ~5–6 µs more than its stream whatever the
kernel — gate/up 20.4 µs (74 % of copy bandwidth), down 13.9 µs (54 %) — and no other tiling of either moves it
(narrower, deeper or wider weight tiles, more stages or warps: gate/up 19.9–24.1 µs, down 13.8–24.4 µs;
``results/runs/moe_decode_tiles_h200_198377c.json``). A CUDA-core ``gemv`` schedule (no shared memory, many programs
an SM) matched the tensor cores at one token and lost up to 1.9× at 2–4
(``results/runs/moe_decode_stream_h200_4f83638_gemv_refuted.json``); an L2 prefetch of the down GEMM's weights
before its dependent-launch wait (its offsets are two launches old) made the pair slower, 33.1 → 35.2–37.7 µs at one
token, and the batch-8 decode step with it (``results/runs/moe_decode_stream_h200_10f468f_prefetch_refuted.json``);
both GEMMs in one persistent launch — gate/up tiles, then down tiles that wait on a per-expert counter of their
expert's finished gate/up tiles, handed out by ticket so no wait can deadlock, the same tile body and bits — saved
no launch cost where it was meant to: the routed block 39.1 against 39.8 µs at one token, 59.8 against 64.3 at two,
97.3 / 101.1 at four, level at eight and 236.6 / 228.6 at sixteen
(``results/runs/moe_decode_stream_h200_d029e36_one_launch_refuted.json``; removed: +4–7 % at 2–4 tokens only, for a
spin-waiting kernel in the decode path); split-K (1–8 K ranges, fp32 partials) made each GEMM alone slower at 1 and
4 tokens and no faster at 2 (``results/runs/moe_split_k_h200_3315c53_refuted.json``). The pair streams at 67 / 70 /
83 / 87 / 89 / 97 % of copy bandwidth at 1 / 2 / 3 / 4 / 8 / 16 tokens; one launch that only reads the same bytes —
a Triton read kernel (best of 11 settings) or PyTorch's sum — reaches 74 % at one token, 75–83 % at two and 86–87 %
at three (``results/runs/moe_decode_stream_h200_2049ad4_one_launch_floor.json``; a device copy of the same traffic
shows 91–96 % only because its last writes can still sit in the 50 MB L2 when it ends). At one token the pair
already moves its bytes at 91 % of the rate of one launch that does nothing else.

Rows are sorted by expert; ``offsets[e]`` is the end row (inclusive cumulative count) of expert ``e``, the layout
``torch.nn.functional.grouped_mm`` takes. No host synchronisation: CUDA-graph safe.

**Which way round, and how many rows (two predictions, one refuted).** A program loops over its expert's row tiles
*outside* its loop over K, so an expert with more rows than ``block_m`` streams its weights again for each extra
tile: with rows per expert ``X ~ Binomial(T, k/E)`` (uniform routing) a 16-row tile reads ``E[ceil(X / 16)]`` =
1.00 / 1.09 / 2.45 / 4.47 times the weights at 93 / 189 / 512 / 1024 tokens. The first prediction — a tile
covering the busiest expert streams the weights once and wins from 189 tokens on — failed in the orientation
``a · wᵀ``: a 16-row A tile is a 16-row ``mma.sync``, and 32 rows doubled its registers and tensor-core work
(189 tokens: 16 rows 0.53 ms, 32 rows 0.71 ms). The second: swap the operands (``swap_ab``), accumulate
``w · aᵀ``, and the 64–128 weight rows of a tile fill Hopper's ``wgmma`` M side while the routed rows become its N
side, where 16 or 32 columns cost the same. Measured (``results/moe_sweep_h200.json``, each GEMM alone, the 40
candidates of :data:`MOE_SWEEP`, H200): at 93 tokens both GEMMs take 0.387 ms against 0.468 ms before (93 % of
copy bandwidth over the experts hit, against 78 %); 32-row swapped tiles make gate/up flat from 93 to 256 tokens
(0.247 / 0.251 / 0.255 ms), so the kernel now beats the library grouped GEMM up to 256 tokens at uniform routing
(0.43 ms against 0.56 ms); from 512 tokens the grouped GEMM still wins. Ordering the grid by column tile within an
expert (``columns_first``) is worth 5 % on the down GEMM, whose programs are short (K = 704).
Bytes moved (gate/up, 93 tokens, bf16): weights 128·1408·2816·2 = 1.02 GB + rows 744·(2816+1408)·2 = 6 MB.

**FP8 weights** (``w_scale``) are widened to the activations' dtype on load: measured on the H200, that costs more
than the halved bytes save (both GEMMs of a layer 0.38 ms against bf16's 0.39 at 93 tokens; the short-K down GEMM
slower), because Hopper's ``wgmma`` has no bf16 × FP8 form and the conversion sits between shared memory and the
MMA. **FP8 activations** (``a_fp8``) remove the conversion: each row's 128-wide K step is scaled by its absmax to
e4m3's range and rounded in the operand load, the FP8 weight tile goes to the tensor cores as loaded, and the
partial product of the step is scaled back before it is accumulated (:func:`quantize_act_e4m3` states the rule;
no extra kernel, no extra pass over the activations). H200 (results/runs/moe_sweep_fp8a8_h200.json): both GEMMs of a
layer 0.24 ms at 93 tokens; from ~1000 tokens the in-load quantisation costs more than it saves (see
:data:`FP8_ACT_SETTING` and ``Experts.FP8_ACT_MAX_TOKENS``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import INTERPRET, host_values, pdl_meta, pow2, register, to_dtype, to_e4m3, wait_and_release


@triton.jit
def _gelu_tanh(x):
    # 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))), with tanh(u) = 2σ(2u) − 1 (no libdevice: interpreter-safe)
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x * tl.sigmoid(2.0 * u)


@triton.jit
def _a_tile(a_row, ks, mask_m, mask_k, K, GELU_GATE: tl.constexpr, dtype: tl.constexpr):
    """The A operand ``[BLOCK_M, BLOCK_K]`` of one K step: the (gathered) rows, or ``gelu_tanh(gate) · up``."""
    if GELU_GATE:
        g = tl.load(a_row + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        u = tl.load(a_row + K + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        return to_dtype(_gelu_tanh(g) * u, dtype)
    return tl.load(a_row + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(dtype)


@triton.jit
def expert_of_slot(offs_ptr, slot, M, E: tl.constexpr, E_POW2: tl.constexpr, COMPACT: tl.constexpr):
    """(expert, first row, end row) of grid slot ``slot``. Device-side guard: every expert's rows are clamped to
    [0, M), so bad offsets never read or write out of bounds.

    ``COMPACT`` (fewer rows than experts): the grid has M slots, not E, and slot s serves the s-th expert that has
    rows (an empty range past the last one) — at one decode token 8 of 128 experts are hit, and 120 × (column tiles)
    programs that only found an empty expert and exited still held shared memory and SM slots (H200: the expert
    GEMMs of a batch-1 decode step 1.13 → 0.94 ms). Every program reads all E offsets once and ranks the experts
    with rows. Otherwise slot s is expert s (with at least as many rows as experts, few are empty; and the ranking
    costs the CPU interpreter 1.7× per call)."""
    if COMPACT:
        es = tl.arange(0, E_POW2)
        ends = tl.minimum(tl.maximum(tl.load(offs_ptr + es, mask=es < E, other=0), 0), M)
        starts = tl.minimum(tl.maximum(tl.load(offs_ptr + es - 1, mask=(es > 0) & (es < E), other=0), 0), ends)
        has_rows = (ends > starts) & (es < E)
        mine = has_rows & (tl.cumsum(has_rows.to(tl.int32), axis=0) == slot + 1)
        e = tl.sum(tl.where(mine, es, 0), axis=0)  # 0 when fewer than slot + 1 experts have rows; then start == end
        end = tl.sum(tl.where(mine, ends, 0), axis=0)
        start = tl.sum(tl.where(mine, starts, 0), axis=0)
    else:
        e = slot
        end = tl.minimum(tl.maximum(tl.load(offs_ptr + e), 0), M)
        start = tl.minimum(tl.maximum(tl.load(offs_ptr + e - 1, mask=e > 0, other=0), 0), end)
    return e, start, end


@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # [A_ROWS, K] activations (or [A_ROWS, 2K] gate|up when GELU_GATE)
    w_ptr,  # [E, N, K] expert weights, y = a @ w[e]ᵀ
    offs_ptr,  # [E] int32 inclusive cumulative row counts
    idx_ptr,  # [M] int32 routed slot of each sorted row (GATHER), else unused
    scale_ptr,  # [E, N] fp32 per-output-channel scales of FP8 weights (W_SCALED), else unused
    out_ptr,  # [M, N] rows sorted by expert
    M,
    A_ROWS,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    GATHER: tl.constexpr,  # sorted row r reads a[idx[r] // TOP_K]; else a[r]
    TOP_K: tl.constexpr,
    GELU_GATE: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products, not TF32
    W_SCALED: tl.constexpr,  # FP8 weights: widened to the activation dtype on load, scaled per output in the epilogue
    A_FP8: tl.constexpr,  # with W_SCALED and SWAP_AB: activations quantised to e4m3 per row and K step, FP8 × FP8 MMA
    SWAP_AB: tl.constexpr,  # accumulate yᵀ = w · aᵀ: the weight tile is the MMA's wide side, the rows its narrow one
    COLUMNS_FIRST: tl.constexpr,  # grid (column tiles, slots): neighbouring programs stream one expert's weights
    E: tl.constexpr,  # experts
    E_POW2: tl.constexpr,  # E rounded up to a power of two (the width of the expert lookup)
    COMPACT: tl.constexpr,  # fewer rows than experts: slot s serves the s-th expert with rows (expert_of_slot)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_and_release(PDL)  # the offsets and rows come from the kernels before: nothing is read ahead of the wait
    if COLUMNS_FIRST:
        pid_n = tl.program_id(0)
        slot = tl.program_id(1)
    else:
        slot = tl.program_id(0)
        pid_n = tl.program_id(1)
    e, start, end = expert_of_slot(offs_ptr, slot, M, E, E_POW2, COMPACT)
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols_n < N
    w_base = w_ptr + e.to(tl.int64) * stride_we + cols_n.to(tl.int64) * stride_wn  # [BLOCK_N] row starts
    for m0 in range(start, end, BLOCK_M):  # one iteration unless the expert has more than BLOCK_M rows
        rows = m0 + tl.arange(0, BLOCK_M)
        mask_m = rows < end
        if GATHER:  # the token gather rides on the operand load; a bad index reads row 0, never out of bounds
            src = tl.load(idx_ptr + rows, mask=mask_m, other=0) // TOP_K
            src = tl.where((src >= 0) & (src < A_ROWS), src, 0)
        else:
            src = rows
        a_row = a_ptr + src[:, None].to(tl.int64) * stride_am
        out = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols_n[None, :]
        if SWAP_AB:
            acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                mask_k = ks < K
                w = tl.load(w_base[:, None] + ks[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                if A_FP8:  # each row's K step scaled to e4m3's range: the weight tile reaches the MMA untouched
                    a = _a_tile(a_row, ks, mask_m, mask_k, K, GELU_GATE, tl.float32)
                    a_scale = tl.max(tl.abs(a), axis=1) / 448.0
                    a_scale = tl.where(a_scale > 0, a_scale, 1.0)
                    acc_t += tl.dot(w, tl.trans(to_e4m3(a / a_scale[:, None]))) * a_scale[None, :]
                else:
                    a = _a_tile(a_row, ks, mask_m, mask_k, K, GELU_GATE, out_ptr.dtype.element_ty)
                    w = w.to(out_ptr.dtype.element_ty)  # exact for FP8 (e4m3 fits bf16); a no-op otherwise
                    if IEEE:
                        acc_t = tl.dot(w, tl.trans(a), acc_t, input_precision="ieee")
                    else:
                        acc_t = tl.dot(w, tl.trans(a), acc_t)
            acc = tl.trans(acc_t)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                mask_k = ks < K
                a = _a_tile(a_row, ks, mask_m, mask_k, K, GELU_GATE, out_ptr.dtype.element_ty)
                w = tl.load(w_base[None, :] + ks[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                w = w.to(out_ptr.dtype.element_ty)
                if IEEE:
                    acc = tl.dot(a, w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, w, acc)
        if W_SCALED:  # y = Σ_k a·(s_n·q_nk) = s_n · Σ_k a·q_nk: the channel's scale factors out of the K sum
            acc = acc * tl.load(scale_ptr + e * N + cols_n, mask=mask_n, other=0.0)[None, :]
        tl.store(out, to_dtype(acc, out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class MoeConfig:
    """Launch settings of the MoE kernels. Expert GEMM: one program per (expert, ``block_n`` output columns),
    holding ``block_m`` of the expert's rows (looping over row tiles only if it has more) and looping over K in
    ``block_k`` steps; ``num_warps`` warps, ``num_stages`` pipeline stages. ``swap_ab`` accumulates the transposed
    product ``w · aᵀ``, so the ``block_n`` weight rows fill the tensor core's wide (M) side and the few routed rows
    its narrow (N) side — on Hopper that is a ``wgmma`` with N = ``block_m`` instead of a 16-row ``mma``.
    ``columns_first`` orders the grid by column tile within an expert, so programs that run at the same time stream
    neighbouring slices of one expert's weights rather than one slice of every expert. Routing (``moe_route``): one
    program per ``route_experts`` experts (one on a GPU) scanning the ids ``route_block`` at a time with
    ``route_warps`` warps. The defaults are the first H200 setting (16-row tile, 128-deep K steps, 3 stages), kept for
    A/B timing against :func:`moe_config`'s."""

    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False
    columns_first: bool = False
    route_block: int = 1024
    route_warps: int = 4
    route_experts: int = 1

    def __post_init__(self) -> None:
        pow2(self, "block_m", "block_n", "block_k", "num_warps", "route_block", "route_warps", "route_experts")
        if self.num_stages < 1:
            raise ValueError(f"MoeConfig.num_stages must be >= 1, got {self.num_stages}")
        for name in ("swap_ab", "columns_first"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"MoeConfig.{name} must be a bool, got {getattr(self, name)!r}")


#: The H200 sweep's settings (see the module docstring). gate/up: 32-row swapped tiles of 64 weight rows, 128-deep K
#: steps, at every size (within 1 % of the best 16-row setting at 93 tokens, 12–30 % faster from 189 on). down: a
#: 16-row swapped tile of 128 weight rows, 64-deep K steps, column-first grid while an expert holds fewer than 16 rows
#: on average, then the 32-row tile (0.140 against 0.173 ms at 93 tokens; 0.176 against 0.192 at 256). Every
#: setting of one GEMM shares its orientation, weight tile and K step, so a row's bits never depend on which one ran
#: (the row tile only groups rows; ``tests/kernels/test_moe_gemm.py`` checks it on the GPU): PCG pads prompts.
_SETTINGS = {"gate_up": MoeConfig(block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=4, swap_ab=True),
             "down": MoeConfig(block_m=16, block_n=128, block_k=64, num_warps=4, num_stages=4, swap_ab=True,
                               columns_first=True),
             "down_many_rows": MoeConfig(block_m=32, block_n=128, block_k=64, num_warps=4, num_stages=4,
                                         swap_ab=True)}
#: mean routed rows per expert from which the down GEMM takes the 32-row tile
DOWN_WIDE_TILE_ROWS = 16
#: FP8 weights have no library grouped GEMM to hand over to above ``Experts.MOE_GEMM_MAX_TOKENS`` (torch's is
#: bf16-only, and widening the weights per call costs more than the GEMM: 200 ms at 1453 tokens on the H200 run at
#: de27de2), so this kernel serves every prompt length; once experts average this many rows, both GEMMs take 64-row
#: tiles (same orientation, weight tile and K step as their short-prompt settings, so the bits do not change).
FP8_WIDE_TILE_ROWS = 64
_FP8_MANY_ROWS = {"gate_up": MoeConfig(block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=4, swap_ab=True),
                  "down": MoeConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4, swap_ab=True)}
#: FP8 × FP8 (``a_fp8``): one setting for both GEMMs at every length — the H200 sweep's best pair at 93, 189 and 256
#: tokens (results/runs/moe_sweep_fp8a8_h200.json: gate/up 0.140 ms, 86 % of copy bandwidth, and down 0.103 ms at 93
#: tokens, against 0.226 and 0.311 for the bf16 gate/up tile first tried) and at 1453 (1.32 ms for both, against 3.0
#: for 64-row tiles: a wider row tile quantises a bigger fp32 operand per K step and loses). One setting also keeps a
#: row's bits independent of how many rows the prompt routed (PCG pads prompts). 16-row swapped tiles of 128 weight
#: rows with the :data:`ACT_QUANT_K`-deep K step the activation scales are defined on.
FP8_ACT_SETTING = MoeConfig(block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=3, swap_ab=True,
                            columns_first=True)


@lru_cache(maxsize=512)
def moe_config(n_rows: int, n_experts: int, gelu_gate: bool = False, fp8_weights: bool = False,
               fp8_acts: bool = False) -> MoeConfig:
    """Settings for ``n_rows`` routed rows (``tokens × top_k``) over ``n_experts`` experts, for the gate/up GEMM or
    (``gelu_gate``) the down GEMM with the GELU in its operand load (see :data:`_SETTINGS`); FP8 weights at long
    prompts take the 64-row tiles of :data:`FP8_WIDE_TILE_ROWS`; FP8 activations :data:`FP8_ACT_SETTING` always."""
    if n_rows < 0 or n_experts < 1:
        raise ValueError(f"moe_config needs n_rows >= 0 and n_experts >= 1, got {n_rows}, {n_experts}")
    if fp8_acts:
        return FP8_ACT_SETTING
    if fp8_weights and n_rows >= FP8_WIDE_TILE_ROWS * n_experts:
        return _FP8_MANY_ROWS["down" if gelu_gate else "gate_up"]
    if not gelu_gate:
        return _SETTINGS["gate_up"]
    return _SETTINGS["down_many_rows" if n_rows >= DOWN_WIDE_TILE_ROWS * n_experts else "down"]


def _sweep() -> tuple[MoeConfig, ...]:
    """Candidates of the H200 sweep (``experiments/moe_gemm_vs_grouped_mm.py --sweep``): 16-row tiles under the
    weight tilings worth timing (today's setting, the tilings a serving engine's tuned table uses for this shape:
    64 × 128 and 128 × 128 weight tiles), each in both MMA orientations and both grid orders; 32- and 64-row tiles,
    which only pay off where experts hold more than 16 rows, in both orientations. Tilings that spill registers in
    the GELU-fused down GEMM on sm_90 (experiments/moe_gemm_resources.py) are left out."""
    out = []
    for bn, bk, nw, ns in ((128, 64, 4, 4), (64, 128, 4, 4), (128, 128, 8, 4), (128, 128, 4, 3), (64, 256, 4, 3),
                           (256, 64, 8, 4), (64, 64, 4, 6), (128, 256, 8, 3)):
        for swap in (False, True):
            for cf in (False, True):
                out.append(MoeConfig(16, bn, bk, nw, ns, swap_ab=swap, columns_first=cf))
    for bm in (32, 64):
        for bn, bk, nw, ns in ((128, 64, 4, 4), (64, 128, 4, 4)):
            for swap in (False, True):
                out.append(MoeConfig(bm, bn, bk, nw, ns, swap_ab=swap))
    return tuple(out)


#: Candidate settings for the H200 sweep (see :func:`_sweep`); :func:`moe_config`'s are among them.
MOE_SWEEP: tuple[MoeConfig, ...] = _sweep()


#: Weight dtypes the kernel widens on load and scales per output channel (``w_scale``): FP8 e4m3, the format
#: Gemma 4 is served with (``gemma4lab.quantize_experts``).
SCALED_WEIGHT_DTYPES = (torch.float8_e4m3fn,)


#: FP8 activations (``a_fp8``): one scale per row and this many K columns, the K step of every setting that takes them
ACT_QUANT_K = 128
def quantize_act_e4m3(a: torch.Tensor, block: int = ACT_QUANT_K) -> torch.Tensor:
    """What ``a_fp8`` multiplies: each row's ``block``-wide K slices through the package's one FP8 rule
    (``gemma4lab.model.quantize.e4m3_absmax``, the weights' too) and scaled back, in fp32 (fp64 in, fp64 out)."""
    from gemma4lab.model.quantize import e4m3_absmax  # torch only; the model package holds the FP8 format

    ct = torch.float64 if a.dtype == torch.float64 else torch.float32
    x = a.to(ct)
    pad = (-x.shape[-1]) % block
    q, scale = e4m3_absmax(F.pad(x, (0, pad)).unflatten(-1, (-1, block)))
    return (q.to(ct) * scale).flatten(-2)[..., : x.shape[-1]]


def gemma_moe_gemm_ref(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, gelu_gate: bool = False,
                       row_index: torch.Tensor | None = None, top_k: int = 1,
                       w_scale: torch.Tensor | None = None, a_fp8: bool = False) -> torch.Tensor:
    """Plain-torch twin: the gathered rows (``row_index``), then one matmul per expert (fp32 accumulate, one
    rounding); FP8 weights times their per-channel ``w_scale`` after the K sum, as the kernel does; ``a_fp8``: the
    rows (the GELU product in fp32 when ``gelu_gate``) through :func:`quantize_act_e4m3` first."""
    dtype = a.dtype
    if row_index is not None:
        a = a[row_index.long() // top_k]
    if gelu_gate:
        g, u = a.float().chunk(2, dim=-1)
        a = F.gelu(g, approximate="tanh") * u
        a = a if a_fp8 else a.to(dtype)
    if a_fp8:
        a = quantize_act_e4m3(a)
    out = torch.empty(a.shape[0], w.shape[1], dtype=dtype, device=a.device)
    ends = offsets.tolist()
    start = 0
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for e, end in enumerate(ends):
        if end > start:
            y = a[start:end].to(acc) @ w[e].to(dtype).to(acc).T
            if w_scale is not None:
                y = y * w_scale[e].to(acc)
            out[start:end] = y.to(dtype)
        start = end
    return out


def _check(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, gelu_gate: bool, row_index: torch.Tensor | None,
           top_k: int, w_scale: torch.Tensor | None = None, a_fp8: bool = False,
           config: MoeConfig | None = None) -> int:
    """Validate a call (metadata only, values when they are on the host); returns the rows of the product."""
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
    if w.dtype in SCALED_WEIGHT_DTYPES:
        if not isinstance(w_scale, torch.Tensor) or w_scale.dtype != torch.float32 \
                or tuple(w_scale.shape) != (e, n) or not w_scale.is_contiguous() or w_scale.device != w.device:
            raise ValueError(f"{w.dtype} weights need w_scale: a contiguous float32 [{e}, {n}] tensor (one scale per "
                             f"expert and output channel) on the weights' device, got "
                             f"{getattr(w_scale, 'dtype', None)} {tuple(getattr(w_scale, 'shape', ()))}")
        if a.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"activations for {w.dtype} weights must be bfloat16, float16 or float32, got {a.dtype}")
    elif w_scale is not None:
        raise ValueError(f"w_scale is for FP8 weights ({SCALED_WEIGHT_DTYPES}); these are {w.dtype}")
    elif a.dtype != w.dtype:
        raise TypeError(f"a and w must share a dtype, got {a.dtype} and {w.dtype}")
    if not isinstance(a_fp8, bool):
        raise TypeError(f"a_fp8 must be a bool, got {a_fp8!r}")
    if a_fp8:
        if w.dtype not in SCALED_WEIGHT_DTYPES:
            raise ValueError(f"a_fp8 (FP8 × FP8 on the tensor cores) needs FP8 weights, got {w.dtype}")
        if config is not None and (not config.swap_ab or config.block_k != ACT_QUANT_K):
            raise ValueError(f"a_fp8 quantises each row's {ACT_QUANT_K}-wide K step: the setting must have "
                             f"swap_ab=True and block_k={ACT_QUANT_K}, got {config}")
    if a.is_cuda and a.dtype == torch.float64:
        raise TypeError("moe_gemm accumulates in fp32 on the GPU and takes bfloat16, float16 or float32; float64 is "
                        "for references: gemma_moe_gemm_ref computes it")
    if not (a.device == w.device == offsets.device):
        raise ValueError("a, w and offsets must be on one device")
    if a.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError("a and w need a contiguous last dimension")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    m = a.shape[0]
    if row_index is not None:
        if not isinstance(row_index, torch.Tensor) or row_index.dim() != 1 or row_index.dtype != torch.int32 \
                or not row_index.is_contiguous() or row_index.device != a.device:
            raise ValueError("row_index must be a contiguous 1-D int32 tensor on a's device (moe_route's sorted_slot)")
        m = row_index.numel()
        if host_values(row_index) and m:
            lo, hi = int(row_index.min()), int(row_index.max())
            if lo < 0 or hi // top_k >= a.shape[0]:
                raise ValueError(f"row_index // top_k must index the {a.shape[0]} rows of a, got row_index in "
                                 f"[{lo}, {hi}] with top_k={top_k}")
    if host_values(offsets) and e:  # values on the host already: check them (no device sync)
        ends = offsets.tolist()
        if ends[0] < 0 or ends[-1] != m or any(y < x for x, y in zip(ends, ends[1:])):
            raise ValueError(f"offsets must be non-decreasing cumulative row counts ending at the {m} rows of the "
                             f"product, got {ends}")
    return m


def _launch(a, w, offsets, row_index, top_k: int, gelu_gate: bool, w_scale, a_fp8: bool, out,
            config: MoeConfig | None) -> None:
    e, n, k = w.shape
    m = out.shape[0]
    cfg = config or moe_config(m, e, gelu_gate, w.dtype in SCALED_WEIGHT_DTYPES, a_fp8)
    if INTERPRET and config is None:  # the CPU interpreter pays per program: one weight tile covers all N columns
        cfg = dataclasses.replace(cfg, block_n=max(cfg.block_n, triton.next_power_of_2(n)))
    extra = {} if not a.is_cuda else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    gather = row_index is not None
    tiles = triton.cdiv(n, cfg.block_n)
    slots = min(m, e)  # at most this many experts have rows
    _moe_gemm_kernel[(tiles, slots) if cfg.columns_first else (slots, tiles)](
        a, w, offsets, row_index if gather else offsets, w_scale if w_scale is not None else offsets, out, m,
        a.shape[0], n, k, a.stride(0), w.stride(0), w.stride(1), out.stride(0), GATHER=gather, TOP_K=top_k,
        GELU_GATE=gelu_gate, IEEE=a.dtype == torch.float32, W_SCALED=w_scale is not None, A_FP8=a_fp8,
        SWAP_AB=cfg.swap_ab,
        COLUMNS_FIRST=cfg.columns_first, E=e, E_POW2=triton.next_power_of_2(e), COMPACT=m < e, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **extra, **pdl_meta(a))


def _triton(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, row_index: torch.Tensor | None, top_k: int,
            gelu_gate: bool, w_scale: torch.Tensor | None, a_fp8: bool, out: torch.Tensor) -> None:
    _launch(a, w, offsets, row_index, top_k, gelu_gate, w_scale, a_fp8, out, None)


def _torch(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, row_index: torch.Tensor | None, top_k: int,
           gelu_gate: bool, w_scale: torch.Tensor | None, a_fp8: bool, out: torch.Tensor) -> None:
    out.copy_(gemma_moe_gemm_ref(a, w, offsets, gelu_gate, row_index, top_k, w_scale, a_fp8))


op = register("moe_gemm(Tensor a, Tensor w, Tensor offsets, Tensor? row_index, int top_k, bool gelu_gate, "
              "Tensor? w_scale, bool a_fp8, Tensor(a!) out) -> ()", _triton, _torch)


def gemma_moe_gemm(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, gelu_gate: bool = False,
                   row_index: torch.Tensor | None = None, top_k: int = 1, w_scale: torch.Tensor | None = None,
                   a_fp8: bool = False, config: MoeConfig | None = None) -> torch.Tensor:
    """``out[r] = act(a[src(r)]) @ w[expert(r)]ᵀ`` for rows sorted by expert, ``src(r) = row_index[r] // top_k``
    (the token of routed slot ``row_index[r]``) or ``r`` without ``row_index`` (see module docstring). FP8 weights
    (``w`` float8_e4m3fn) take ``w_scale [E, N]``: ``w[e, n, :] ≈ w_scale[e, n] · q[e, n, :]``; the output keeps
    the activations' dtype. ``a_fp8`` (FP8 weights only): the activations are quantised to e4m3 too, per row and
    :data:`ACT_QUANT_K` columns, inside the operand load, so the tensor cores multiply FP8 × FP8
    (:func:`quantize_act_e4m3` is the exact rule)."""
    m = _check(a, w, offsets, gelu_gate, row_index, top_k, w_scale, a_fp8, config)
    out = torch.empty(m, w.shape[1], dtype=a.dtype, device=a.device)
    if m == 0:
        return out
    if config is not None:
        _launch(a, w, offsets, row_index, top_k, gelu_gate, w_scale, a_fp8, out, config)
    else:
        op(a, w, offsets, row_index, top_k, gelu_gate, w_scale, a_fp8, out)
    return out
