"""Experiment: the expert path of 1–16 tokens (decode, tiny prompts) and of a 93-token prompt as a weight stream,
bf16 (and FP8 weights), the real 26B-A4B expert shapes, one GPU: what the down GEMM's L2 prefetch before its
dependent-launch wait (``MoeConfig.prefetch_steps``) buys.

**Where it stands** (``results/runs/moe_decode_stream_h200_4f83638_gemv_refuted.json``, this harness): at one token
each expert GEMM alone takes the same time under very different kernels (gate/up 20.4 µs, 74 % of copy bandwidth;
down 13.9 µs, 54 %) — a cost per launch (ramp, tail, the graph's node gap), ~5–6 µs, not the stream.
**Prediction:** under dependent launch the down GEMM's programs start while the gate/up GEMM still streams; asking L2
for their weight tiles then (the offsets are two launches old) moves the down GEMM's ramp under the gate/up
stream: the pair at one token from 32 µs to <= 27 µs (>= 83 % of copy bandwidth), less at more tokens, where
the down weights outgrow what the early programs can hold in L2.

Every timing is of calls captured in a CUDA graph, each captured call on the next of ``--copies`` copies of all
128 experts' weights, so the 50 MB L2 never holds them: the stream a decode step pays. Per token count: both GEMMs
(the pair) and the whole block (``moe_route`` → gate/up → down → ``moe_combine``, as the model runs it), each
without dependent launch and with it at several prefetch depths; each GEMM alone; FP8 weights. Every variant's
output is checked bit for bit against the plain pair's (a prefetch never changes a value).

``python experiments/moe_decode_stream.py --json results/runs/moe_decode_stream_<card>.json``
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace

import torch

import gemma4lab.kernels as K
from gemma4lab.lab import measure

E, H, INTER, TOP_K = 128, 2816, 704, 8


def graph_ms(f, sets: list, rep_ms: float, pdl: bool = False) -> float:
    """ms per call of ``f(weights)`` inside a CUDA graph, each captured call on the next of ``sets``."""
    it = itertools.cycle(sets)
    with K.dependent_launch(pdl):
        return measure.bench_cuda_graph(lambda: f(next(it)), replays_per_graph=max(len(sets), 8), warmup_ms=5,
                                        rep_ms=rep_ms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16, 93])
    p.add_argument("--prefetch", type=int, nargs="+", default=[2, 4, 11], help="prefetch_steps of the down GEMM")
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--rep-ms", type=float, default=20)
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
        downs = {0: replace(down_cfg, prefetch_steps=0)} | {n: replace(down_cfg, prefetch_steps=n)
                                                              for n in args.prefetch}

        def pair(ws, dcfg, o=offs, s=slots):
            h = K.gemma_moe_gemm(x, ws[0], o, row_index=s, top_k=TOP_K, w_scale=ws[2], config=up_cfg)
            return K.gemma_moe_gemm(h, ws[1], o, gelu_gate=True, w_scale=ws[3], config=dcfg)

        def block(ws, dcfg):
            o, s, q = K.gemma_moe_route(ids, E)
            return K.gemma_moe_combine(pair(ws, dcfg, o, s), q, rw)

        ref = pair(sets[0], downs[0])
        row = {"tokens": t, "experts_hit": hit, "gate_up_bytes": up_bytes, "down_bytes": down_bytes,
               "gate_up_setting": repr(up_cfg), "down_setting": repr(down_cfg), "paths": {}}
        paths = row["paths"]
        for n, dcfg in downs.items():
            with K.dependent_launch(True):
                same = torch.equal(pair(sets[0], dcfg), ref)
            for name, f in (("pair", pair), ("block", block)):
                for pdl in ((False, True) if n == 0 else (True,)):
                    ms = graph_ms(lambda ws, f=f, c=dcfg: f(ws, c), sets, args.rep_ms, pdl)
                    paths[f"{name}{'_pdl' if pdl else ''}_prefetch{n}"] = {
                        "ms": ms, "bw": nbytes / (ms * 1e-3) / bw, "bits_equal_plain_pair": same}
            ms = graph_ms(lambda ws, c=dcfg: pair(ws, c), fp8_sets, args.rep_ms, True)
            fp8_bytes = nbytes // 2 + hit * (2 * INTER + H) * 4  # FP8 weights and their fp32 channel scales
            paths[f"pair_fp8_pdl_prefetch{n}"] = {"ms": ms, "bw": fp8_bytes / (ms * 1e-3) / bw}
        h = K.gemma_moe_gemm(x, sets[0][0], offs, row_index=slots, top_k=TOP_K, config=up_cfg)
        for gemm, f, nb in (("gate_up", lambda ws: K.gemma_moe_gemm(x, ws[0], offs, row_index=slots, top_k=TOP_K,
                                                                      config=up_cfg), up_bytes),
                            ("down", lambda ws: K.gemma_moe_gemm(h, ws[1], offs, gelu_gate=True, config=downs[0]),
                             down_bytes)):
            ms = graph_ms(f, sets, args.rep_ms)
            paths[f"{gemm}_alone"] = {"ms": ms, "bw": nb / (ms * 1e-3) / bw}
        rows.append(row)
        print(f"T={t:>2} ({hit} experts, {nbytes / 1e6:.1f} MB)", flush=True)
        for k, v in paths.items():
            print(f"    {k}: {v['ms'] * 1e3:.1f} µs ({v['bw']:.0%})"
                  f"{'' if v.get('bits_equal_plain_pair', True) else '  BITS DIFFER'}", flush=True)
    if args.json:  # atomic, with card, versions, commit and date
        measure.write_json(args.json, {"benchmark": "moe_decode_stream", "copy_bandwidth_Bps": bw, "rows": rows})


if __name__ == "__main__":
    main()
