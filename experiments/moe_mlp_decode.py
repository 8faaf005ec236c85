"""Experiment: the expert MLP of 1–16 tokens as one launch (``moe_mlp``: gate/up, GELU and down by intermediate
slices) against the two streaming GEMMs (``moe_gemm`` twice), bf16, the real 26B-A4B expert shapes, one GPU.

**Prediction:** at one token the two GEMMs move the 8 chosen experts' 95 MB at ~71 % of copy bandwidth (0.94 ms of
a 3.9 ms decode step over 30 layers: the decode graph's profile at bc31625), each paying a ramp and a tail; one
launch pays them once and keeps the intermediate on the chip: >= 85 % of copy bandwidth at 1–16 tokens (the issue's
target), the fp32 partials (2 MB at one token) included in the combine's time, not the MLP's.

Every timing is of calls captured in a CUDA graph, each call on the next of ``--copies`` copies of all 128 experts'
weights (1.5 GB each), so the 50 MB L2 never holds them: the stream a decode step pays. Each timed path is checked
against the two-GEMM path first. Rows per token count: the expert part alone (the GEMMs; the MLP), the whole block
(routing and combine included), each plain and captured with programmatic dependent launch.

``python experiments/moe_mlp_decode.py --json results/runs/moe_mlp_decode_<card>.json``
"""

from __future__ import annotations

import argparse
import itertools

import torch

import gemma4lab.kernels as K
from gemma4lab.kernels.moe_mlp import MLP_SWEEP, mlp_config, mlp_slices
from gemma4lab.lab import measure

E, H, INTER, TOP_K = 128, 2816, 704, 8


def graph_ms(f, sets: list, rep_ms: float, pdl: bool) -> float:
    """ms per call of ``f(weights)`` inside a CUDA graph, each captured call on the next of ``sets``."""
    it = itertools.cycle(sets)
    with K.dependent_launch(pdl):
        return measure.bench_cuda_graph(lambda: f(next(it)), replays_per_graph=max(len(sets), 8), warmup_ms=5,
                                        rep_ms=rep_ms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--rep-ms", type=float, default=30)
    p.add_argument("--sweep", action="store_true", help="every MlpConfig of MLP_SWEEP (else the default setting)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    bw = measure.copy_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    sets = [(0.02 * torch.randn(E, 2 * INTER, H, device=dev, dtype=dt, generator=gen),
             0.02 * torch.randn(E, H, INTER, device=dev, dtype=dt, generator=gen)) for _ in range(args.copies)]
    configs = MLP_SWEEP if args.sweep else (mlp_config(),)
    slices = mlp_slices(INTER)
    rows = []
    for t in args.tokens:
        ids = torch.rand(t, E, device=dev, generator=gen).topk(TOP_K, dim=-1).indices
        rw = torch.rand(t, TOP_K, device=dev, generator=gen)
        x = torch.randn(t, H, device=dev, dtype=dt, generator=gen)
        hit = int(ids.unique().numel())
        nbytes = hit * (2 * INTER * H + H * INTER) * 2
        offs, slots, pos = K.gemma_moe_route(ids, E)

        def gemms(ws):
            h = K.gemma_moe_gemm(x, ws[0], offs, row_index=slots, top_k=TOP_K)
            return K.gemma_moe_gemm(h, ws[1], offs, gelu_gate=True)

        def gemm_block(ws):
            o, s, q = K.gemma_moe_route(ids, E)
            h = K.gemma_moe_gemm(x, ws[0], o, row_index=s, top_k=TOP_K)
            return K.gemma_moe_combine(K.gemma_moe_gemm(h, ws[1], o, gelu_gate=True), q, rw)

        ref = gemm_block(sets[0]).float()
        row = {"tokens": t, "experts_hit": hit, "weight_bytes": nbytes, "paths": {}}
        for pdl in (False, True):
            for name, f in (("two_gemms", gemms), ("two_gemms_block", gemm_block)):
                ms = graph_ms(f, sets, args.rep_ms, pdl)
                row["paths"][f"{name}{'_pdl' if pdl else ''}"] = {"ms": ms, "bw": nbytes / (ms * 1e-3) / bw}
            for cfg in configs:
                mlp = lambda ws, cfg=cfg: K.gemma_moe_mlp(x, ws[0], ws[1], offs, slots, TOP_K, config=cfg)  # noqa: E731

                def mlp_block(ws, cfg=cfg):
                    o, s, q = K.gemma_moe_route(ids, E)
                    parts = K.gemma_moe_mlp(x, ws[0], ws[1], o, s, TOP_K, config=cfg)
                    return K.gemma_moe_combine(parts, q, rw, slices=slices, out_dtype=dt)

                try:
                    err = measure.rel_err(mlp_block(sets[0]).float(), ref)
                    ms, ms_block = graph_ms(mlp, sets, args.rep_ms, pdl), graph_ms(mlp_block, sets, args.rep_ms, pdl)
                except Exception as e:  # noqa: BLE001  (a setting that does not compile: shared memory, registers)
                    print(f"  {cfg}: failed {type(e).__name__} {str(e)[:120]}", flush=True)
                    continue
                row["paths"][f"mlp{'_pdl' if pdl else ''} {cfg}"] = {
                    "ms": ms, "bw": nbytes / (ms * 1e-3) / bw, "block_ms": ms_block,
                    "block_bw": nbytes / (ms_block * 1e-3) / bw, "rel_err_vs_two_gemms": err}
        rows.append(row)
        paths = row["paths"]
        best = min((k for k in paths if k.startswith("mlp")), key=lambda k: paths[k]["ms"], default=None)
        print(f"T={t:>3} ({hit} experts, {nbytes / 1e6:.1f} MB): two GEMMs {paths['two_gemms']['ms'] * 1e3:.1f} µs "
              f"({paths['two_gemms']['bw']:.0%}), with PDL {paths['two_gemms_pdl']['ms'] * 1e3:.1f} µs; block "
              f"{paths['two_gemms_block']['ms'] * 1e3:.1f} µs", flush=True)
        for k in sorted((k for k in paths if k.startswith("mlp")), key=lambda k: paths[k]["ms"])[:6]:
            v = paths[k]
            print(f"    {k}: {v['ms'] * 1e3:.1f} µs ({v['bw']:.0%}), block {v['block_ms'] * 1e3:.1f} µs "
                  f"({v['block_bw']:.0%}), err {v['rel_err_vs_two_gemms']:.1e}", flush=True)
        row["best_mlp"] = best
    if args.json:  # atomic, with card, versions, commit and date
        measure.write_json(args.json, {"benchmark": "moe_mlp_decode", "copy_bandwidth_Bps": bw, "rows": rows})


if __name__ == "__main__":
    main()
