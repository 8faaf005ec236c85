"""Experiment: the expert path of 1–16 tokens (decode, tiny prompts) and of a 93-token prompt as a weight stream,
bf16 (and FP8 weights), the real 26B-A4B expert shapes, one GPU.

Every timing is of calls captured in a CUDA graph, each captured call on the next of ``--copies`` copies of all
128 experts' weights, so the 50 MB L2 never holds them: the stream a decode step pays. Per token count: both GEMMs
(the pair) and the whole block (``moe_route`` → gate/up → down → ``moe_combine``, as the model runs it), each
without and with programmatic dependent launch; each GEMM alone; the pair on FP8 weights.

What it found (H200): at one token each GEMM alone takes ~5–6 µs more than its stream, whatever the kernel — a cost
per launch (ramp, tail, node gap). Three levers tried against it were refuted and removed: a CUDA-core gemv schedule
(``results/runs/moe_decode_stream_h200_4f83638_gemv_refuted.json``), an L2 prefetch of the down GEMM's weights
before its dependent-launch wait (``results/runs/moe_decode_stream_h200_10f468f_prefetch_refuted.json``) and both
GEMMs in one persistent launch whose down tiles wait on their expert's gate/up tiles
(``results/runs/moe_decode_stream_h200_d029e36_one_launch_refuted.json``); see ``gemma4lab/kernels/moe_gemm.py``'s
docstring.

**What one launch of the same bytes does** (``read_only``, ``sum_same_bytes``, ``copy_same_bytes``): a Triton
kernel that only reads the hit experts' weights — no arithmetic, no second launch — over a sweep of programs per SM
and load widths (the best is kept), PyTorch's sum over as many bytes, and a device copy whose read and write traffic
equals them, timed the same way. H200 (``results/runs/moe_decode_stream_h200_2049ad4_one_launch_floor.json``): the
read kernel 74 / 83 / 86 / 88 % of copy bandwidth at 1 / 2 / 3 / 4 tokens, the sum 74 / 75 / 87 / 91 %, the two
GEMMs 68 / 70 / 83 / 87 %; the copy shows 91 / 96 / 97 / 99 % only because up to 50 MB of its writes can still sit in
L2 when it ends. So at one token no single launch reads these bytes faster than ~74 %, and the pair is at 91 % of
that. ``--tile-sweep`` times each GEMM alone under other tilings (``results/runs/moe_decode_tiles_h200_198377c.json``:
none moves it).

``python experiments/moe_decode_stream.py --json results/runs/moe_decode_stream_<card>.json``
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

import gemma4lab.kernels as K
from gemma4lab.kernels._common import num_sms
from gemma4lab.lab import measure

E, H, INTER, TOP_K = 128, 2816, 704, 8


def graph_ms(f, sets: list, rep_ms: float, pdl: bool = False) -> float:
    """``measure.bench_cuda_graph_cycled``, the calls captured with or without dependent launch."""
    with K.dependent_launch(pdl):
        return measure.bench_cuda_graph_cycled(f, sets, rep_ms=rep_ms)


@triton.jit
def _read_kernel(up_ptr, down_ptr, table_ptr, n_chunks, out_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 STAGES: tl.constexpr):
    """Only the stream: sums the weight chunks of the table (gate/up offsets >= 0, down offsets as -1 - offset)."""
    acc = tl.zeros((BLOCK,), tl.float32)
    for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
        entry = tl.load(table_ptr + c)
        base = tl.where(entry >= 0, up_ptr + entry, down_ptr + (-1 - entry))
        for i in tl.range(0, CHUNK, BLOCK, num_stages=STAGES):
            acc += tl.load(base + i + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), acc)


def read_chunks(ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Element offsets of ``chunk``-long pieces of every hit expert's gate/up and (encoded -1 - offset) down weights."""
    hit = ids.unique()[:, None]
    up = hit * (2 * INTER * H) + torch.arange(0, 2 * INTER * H, chunk, device=ids.device)
    down = hit * (H * INTER) + torch.arange(0, H * INTER, chunk, device=ids.device)
    return torch.cat([up.reshape(-1), -1 - down.reshape(-1)])


def read_only(ws, table: torch.Tensor, chunk: int, programs_per_sm: int, block: int, stages: int) -> torch.Tensor:
    """One launch that reads the hit experts' weights and nothing else: the floor of any one-launch expert path."""
    programs = min(table.numel(), programs_per_sm * num_sms(table.device))
    out = torch.empty(programs * block, device=table.device)
    _read_kernel[(programs,)](ws[0], ws[1], table, table.numel(), out, CHUNK=chunk, BLOCK=block, STAGES=stages,
                              num_warps=8)
    return out


#: (chunk elements, programs per SM, load width, pipeline stages) of the read-only sweep
READ_SWEEP = [(16384, p, b, s) for p in (4, 8, 16) for b, s in ((2048, 4), (4096, 3), (8192, 2))] \
    + [(4096, p, 2048, 2) for p in (8, 16)]


_M = K.MoeConfig
#: tilings of the few-token sweep: narrower weight tiles (more programs over the same bytes), deeper or shallower K
#: steps, more warps; the model's settings first
TILE_SWEEP_UP = [K.moe_config(8, E), _M(32, 32, 128, 4, 4, swap_ab=True), _M(32, 32, 256, 4, 3, swap_ab=True),
                 _M(32, 64, 256, 4, 3, swap_ab=True), _M(32, 64, 128, 4, 6, swap_ab=True),
                 _M(32, 128, 128, 8, 4, swap_ab=True), _M(16, 64, 128, 4, 4, swap_ab=True, columns_first=True)]
TILE_SWEEP_DOWN = [K.moe_config(8, E, True), _M(16, 64, 64, 4, 4, swap_ab=True, columns_first=True),
                   _M(16, 32, 64, 4, 4, swap_ab=True, columns_first=True),
                   _M(16, 64, 128, 4, 3, swap_ab=True, columns_first=True),
                   _M(16, 128, 64, 4, 6, swap_ab=True, columns_first=True),
                   _M(16, 256, 64, 8, 4, swap_ab=True, columns_first=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16, 93])
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--rep-ms", type=float, default=20)
    p.add_argument("--tile-sweep", action="store_true", help="each GEMM alone under other tilings")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    bw = measure.copy_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    sets = [(0.02 * torch.randn(E, 2 * INTER, H, device=dev, dtype=dt, generator=gen),
             0.02 * torch.randn(E, H, INTER, device=dev, dtype=dt, generator=gen), None, None)
            for _ in range(args.copies)]
    from gemma4lab.model.quantize import quantize_fp8_per_channel

    fp8_sets = []
    for wu, wd, _, _ in sets[:2]:
        (qu, su), (qd, sd) = quantize_fp8_per_channel(wu), quantize_fp8_per_channel(wd)
        fp8_sets.append((qu, qd, su, sd))
    rows = []
    for t in args.tokens:
        ids = torch.rand(t, E, device=dev, generator=gen).topk(TOP_K, dim=-1).indices
        rw = torch.rand(t, TOP_K, device=dev, generator=gen)
        x = torch.randn(t, H, device=dev, dtype=dt, generator=gen)
        hit = int(ids.unique().numel())
        up_bytes, down_bytes = hit * 2 * INTER * H * 2, hit * H * INTER * 2
        nbytes = up_bytes + down_bytes
        offs, slots, _ = K.gemma_moe_route(ids, E)
        up_cfg, down_cfg = K.moe_config(t * TOP_K, E), K.moe_config(t * TOP_K, E, True)

        def pair(ws, o=offs, s=slots):
            h = K.gemma_moe_gemm(x, ws[0], o, row_index=s, top_k=TOP_K, w_scale=ws[2])
            return K.gemma_moe_gemm(h, ws[1], o, gelu_gate=True, w_scale=ws[3])

        def block(ws):
            o, s, q = K.gemma_moe_route(ids, E)
            return K.gemma_moe_combine(pair(ws, o, s), q, rw)

        row = {"tokens": t, "experts_hit": hit, "gate_up_bytes": up_bytes, "down_bytes": down_bytes,
               "gate_up_setting": repr(up_cfg), "down_setting": repr(down_cfg), "paths": {}}
        paths = row["paths"]
        for name, f in (("pair", pair), ("block", block)):
            for pdl in (False, True):
                ms = graph_ms(f, sets, args.rep_ms, pdl)
                paths[f"{name}{'_pdl' if pdl else ''}"] = {"ms": ms, "bw": nbytes / (ms * 1e-3) / bw}
        best = None
        for chunk, pps, blk, stages in READ_SWEEP:
            table = read_chunks(ids, chunk)
            ms = graph_ms(lambda ws, tb=table, c=chunk, p=pps, b=blk, s=stages: read_only(ws, tb, c, p, b, s), sets,
                          args.rep_ms)
            if best is None or ms < best[0]:
                best = (ms, f"chunk {chunk}, {pps} programs/SM, {blk}-wide loads, {stages} stages")
        paths["read_only"] = {"ms": best[0], "bw": nbytes / (best[0] * 1e-3) / bw, "setting": best[1]}
        copies = [(torch.empty(nbytes // 2, dtype=torch.uint8, device=dev),
                   torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)) for _ in range(8)]
        ms = graph_ms(lambda c: c[1].copy_(c[0]), copies, args.rep_ms)  # nbytes of traffic: half read, half written
        paths["copy_same_bytes"] = {"ms": ms, "bw": nbytes / (ms * 1e-3) / bw}
        del copies
        # a copy's writes may still sit in the 50 MB L2 when it ends; a library reduction only reads
        bufs = [torch.empty(nbytes // 2, dtype=dt, device=dev).fill_(0.01) for _ in range(8)]
        ms = graph_ms(lambda b: b.sum(dtype=torch.float32), bufs, args.rep_ms)
        paths["sum_same_bytes"] = {"ms": ms, "bw": nbytes / (ms * 1e-3) / bw}
        del bufs
        ms = graph_ms(pair, fp8_sets, args.rep_ms, True)
        fp8_bytes = nbytes // 2 + hit * (2 * INTER + H) * 4  # FP8 weights and their fp32 channel scales
        paths["pair_fp8_pdl"] = {"ms": ms, "bw": fp8_bytes / (ms * 1e-3) / bw}
        h = K.gemma_moe_gemm(x, sets[0][0], offs, row_index=slots, top_k=TOP_K, config=up_cfg)
        for gemm, f, nb in (("gate_up", lambda ws: K.gemma_moe_gemm(x, ws[0], offs, row_index=slots, top_k=TOP_K,
                                                                      config=up_cfg), up_bytes),
                            ("down", lambda ws: K.gemma_moe_gemm(h, ws[1], offs, gelu_gate=True, config=down_cfg),
                             down_bytes)):
            ms = graph_ms(f, sets, args.rep_ms)
            paths[f"{gemm}_alone"] = {"ms": ms, "bw": nb / (ms * 1e-3) / bw}
        if args.tile_sweep:  # each GEMM alone under other tilings: does spreading the stream over more programs help?
            row["tile_sweep"] = []
            for gemm, tiles in (("gate_up", TILE_SWEEP_UP), ("down", TILE_SWEEP_DOWN)):
                for cfg in tiles:
                    if gemm == "gate_up":
                        f = (lambda ws, c=cfg: K.gemma_moe_gemm(x, ws[0], offs, row_index=slots, top_k=TOP_K, config=c))
                        nb = up_bytes
                    else:
                        f = (lambda ws, c=cfg: K.gemma_moe_gemm(h, ws[1], offs, gelu_gate=True, config=c))
                        nb = down_bytes
                    ms = graph_ms(f, sets, args.rep_ms)
                    row["tile_sweep"].append({"gemm": gemm, "setting": repr(cfg), "ms": ms,
                                              "bw": nb / (ms * 1e-3) / bw})
                    print(f"    {gemm} alone, {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} "
                          f"s{cfg.num_stages}{' swap' if cfg.swap_ab else ''}{' cf' if cfg.columns_first else ''}: "
                          f"{ms * 1e3:.1f} µs ({nb / (ms * 1e-3) / bw:.0%})", flush=True)
        rows.append(row)
        print(f"T={t:>2} ({hit} experts, {nbytes / 1e6:.1f} MB)", flush=True)
        for k, v in paths.items():
            print(f"    {k}: {v['ms'] * 1e3:.1f} µs ({v['bw']:.0%}) {v.get('setting', '')}", flush=True)
    if args.json:  # atomic, with card, versions, commit and date
        measure.write_json(args.json, {"benchmark": "moe_decode_stream", "copy_bandwidth_Bps": bw, "rows": rows})


if __name__ == "__main__":
    main()
