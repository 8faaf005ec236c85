"""Experiment: split-K for the expert GEMMs at one to a few tokens — does spreading each expert's weight stream over
more, shorter programs bring the GEMMs to the rate a device copy reaches on the same bytes?

At one token each expert GEMM is 176 programs (8 experts × 22 weight tiles) pulling 180–360 KB each through a
4-stage pipeline, and streams at 52 % (down) and 74 % (gate/up) of copy bandwidth. Measured on an H200 (3315c53,
``results/runs/moe_split_k_h200_3315c53_refuted.json``): no split is faster than none beyond noise (gate/up at two
tokens 34.2 against 34.7 µs with two ranges; every other split slower) — the shorter each program's stream, the
larger its ramp's share. (One launch that only reads the pair's bytes reaches 74 % at one token:
``results/runs/moe_decode_stream_h200_2049ad4_one_launch_floor.json``.) Here each program takes one weight tile and
one of ``SPLIT`` K ranges and writes fp32 partial sums (``[SPLIT, rows, N]``): what a model would add in a fixed
order in the next kernel's operand load (the down GEMM's for gate/up, the combine's for down). Only the GEMMs are
timed, each alone in a CUDA graph on L2-cold weights, as ``moe_decode_stream.py`` times them; the partial sums are
checked against float64.

``python experiments/moe_split_k.py --json results/runs/moe_split_k_<card>.json``
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

import gemma4lab.kernels as K
from gemma4lab.kernels.moe_gemm import _a_tile, expert_of_slot
from gemma4lab.lab import measure

E, H, INTER, TOP_K = 128, 2816, 704, 8


@triton.jit
def _split_k_kernel(a_ptr, w_ptr, offs_ptr, idx_ptr, part_ptr, M, A_ROWS, N, K, K_CHUNK, stride_am, stride_we,
                    stride_wn, GATHER: tl.constexpr, GELU_GATE: tl.constexpr, TOP_K_: tl.constexpr, E_: tl.constexpr,
                    E_POW2: tl.constexpr, COMPACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    pid_n, slot, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e, start, end = expert_of_slot(offs_ptr, slot, M, E_, E_POW2, COMPACT)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    w_base = w_ptr + e.to(tl.int64) * stride_we + cols.to(tl.int64) * stride_wn
    k_lo = pid_k * K_CHUNK
    k_hi = tl.minimum(k_lo + K_CHUNK, K)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask_m = rows < end
        if GATHER:
            src = tl.load(idx_ptr + rows, mask=mask_m, other=0) // TOP_K_
            src = tl.where((src >= 0) & (src < A_ROWS), src, 0)
        else:
            src = rows
        a_row = a_ptr + src[:, None].to(tl.int64) * stride_am
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask_k = ks < k_hi
            w = tl.load(w_base[:, None] + ks[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            a = _a_tile(a_row, ks, mask_m, mask_k, K, GELU_GATE, w_ptr.dtype.element_ty)
            acc_t = tl.dot(w.to(w_ptr.dtype.element_ty), tl.trans(a), acc_t)
        out = part_ptr + (pid_k * M + rows[None, :]).to(tl.int64) * N + cols[:, None]
        tl.store(out, acc_t, mask=mask_n[:, None] & mask_m[None, :])


def split_k(a, w, offs, slots, split: int, gelu: bool, block_n: int, block_k: int, warps: int = 4,
            stages: int = 4, top_k: int = TOP_K) -> torch.Tensor:
    """fp32 partial products ``[split, rows, N]`` of the gate/up (``slots``: gathered token rows) or the down
    (``gelu``: the GELU product of ``a``'s gate|up halves) expert GEMM; their sum over the first dim is the GEMM."""
    e, n, k = w.shape
    m = slots.numel()
    steps = triton.cdiv(k, block_k)
    chunk = triton.cdiv(steps, split) * block_k
    part = torch.empty(split, m, n, dtype=torch.float32, device=a.device)
    extra = {"num_warps": warps, "num_stages": stages} if a.is_cuda else {}
    _split_k_kernel[(triton.cdiv(n, block_n), min(m, e), triton.cdiv(k, chunk))](
        a, w, offs, slots, part, m, a.shape[0], n, k, chunk, a.stride(0), w.stride(0), w.stride(1), GATHER=not gelu,
        GELU_GATE=gelu, TOP_K_=top_k if not gelu else 1, E_=e, E_POW2=triton.next_power_of_2(e), COMPACT=m < e,
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, **extra)
    return part[: triton.cdiv(k, chunk)]


#: (split, weight rows per tile, K step) for gate/up and down
SETTINGS = {"gate_up": [(1, 64, 128), (2, 64, 128), (3, 64, 128), (4, 64, 128), (2, 128, 128), (4, 128, 128),
                        (8, 128, 128)],
            "down": [(1, 128, 64), (2, 128, 64), (3, 128, 64), (4, 128, 64), (2, 64, 64), (4, 256, 64)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--rep-ms", type=float, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    bw = measure.copy_bandwidth(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    sets = [(0.02 * torch.randn(E, 2 * INTER, H, device=dev, dtype=dt, generator=gen),
             0.02 * torch.randn(E, H, INTER, device=dev, dtype=dt, generator=gen)) for _ in range(args.copies)]
    rows = []
    for t in args.tokens:
        ids = torch.rand(t, E, device=dev, generator=gen).topk(TOP_K, dim=-1).indices
        x = torch.randn(t, H, device=dev, dtype=dt, generator=gen)
        offs, slots, _ = K.gemma_moe_route(ids, E)
        hit = int(ids.unique().numel())
        h = K.gemma_moe_gemm(x, sets[0][0], offs, row_index=slots, top_k=TOP_K)
        row = {"tokens": t, "experts_hit": hit, "timings": []}
        for gemm, settings in SETTINGS.items():
            gelu = gemm == "down"
            a, wi = (h, 1) if gelu else (x, 0)
            nb = hit * 2 * INTER * H * 2 if not gelu else hit * H * INTER * 2
            exact = K.gemma_moe_gemm_ref(a.double(), sets[0][wi].double(), offs, gelu_gate=gelu,
                                         row_index=None if gelu else slots, top_k=1 if gelu else TOP_K)
            for split, bn, bk in settings:
                got = split_k(a, sets[0][wi], offs, slots, split, gelu, bn, bk).sum(0, dtype=torch.float64)
                err = float(((got - exact).abs() / (exact.abs().max() + 1e-30)).max())
                ms = measure.bench_cuda_graph_cycled(
                    lambda ws, s=split, n=bn, k=bk: split_k(a, ws[wi], offs, slots, s, gelu, n, k), sets,
                    rep_ms=args.rep_ms)
                row["timings"].append({"gemm": gemm, "split": split, "block_n": bn, "block_k": bk, "ms": ms,
                                       "bw": nb / (ms * 1e-3) / bw, "max_err_rel_to_max": err})
                print(f"T={t} {gemm} split {split} tile {bn}x{bk}: {ms * 1e3:.1f} µs ({nb / (ms * 1e-3) / bw:.0%}), "
                      f"error {err:.1e}", flush=True)
        rows.append(row)
    if args.json:
        measure.write_json(args.json, {"benchmark": "moe_split_k", "copy_bandwidth_Bps": bw, "rows": rows})


if __name__ == "__main__":
    main()
