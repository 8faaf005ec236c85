"""Experiment: the expert GEMMs of 1–16 tokens (decode, tiny prompts) as a weight stream, bf16 (and FP8 weights),
the real 26B-A4B expert shapes, one GPU: the tensor-core schedule against the gemv one (``MoeConfig.gemv``).

**Prediction** (written before the first run): at one token the tensor-core GEMMs move the 8 chosen experts'
95 MB at 67 % of copy bandwidth (``results/runs/moe_mlp_decode_h200_00372a6_refuted.json``): 176 programs of
180–360 KB, at most two per SM (shared memory), so an SM keeps only its pipeline stages in flight and the SMs with
two programs set the time. The gemv schedule holds no shared memory, so 8–16 programs share an SM and each keeps
its vector loads in flight: >= 85 % of copy bandwidth for both GEMMs together at 1–4 tokens.

Every timing is of calls captured in a CUDA graph, each captured call on the next of ``--copies`` copies of all
128 experts' weights, so the 50 MB L2 never holds them: the stream a decode step pays. Per token count: both GEMMs
(the pair) under the tensor-core settings, under what ``moe_config`` picks (the model's path), and with dependent
launch; with ``--sweep`` each GEMM alone under every :data:`MOE_GEMV_SWEEP` candidate (up to GEMV_MAX_TOKENS).
Every gemv output is checked against the tensor-core one (the same sums in another order: a few bf16 ulps).

``python experiments/moe_decode_stream.py --sweep --json results/runs/moe_decode_stream_<card>.json``
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace

import torch

import gemma4lab.kernels as K
from gemma4lab.kernels.moe_gemm import _SETTINGS
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
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16])
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--rep-ms", type=float, default=20)
    p.add_argument("--sweep", action="store_true", help="each GEMM under every MOE_GEMV_SWEEP candidate")
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

    fp8_sets = [(*quantize_fp8_per_channel(wu), *quantize_fp8_per_channel(wd)) for wu, wd, _, _ in sets[:2]]
    fp8_sets = [(qu, qd, su, sd) for qu, su, qd, sd in fp8_sets]
    tc = (_SETTINGS["gate_up"], _SETTINGS["down"])
    rows = []
    for t in args.tokens:
        ids = torch.rand(t, E, device=dev, generator=gen).topk(TOP_K, dim=-1).indices
        x = torch.randn(t, H, device=dev, dtype=dt, generator=gen)
        hit = int(ids.unique().numel())
        up_bytes, down_bytes = hit * 2 * INTER * H * 2, hit * H * INTER * 2
        offs, slots, _ = K.gemma_moe_route(ids, E)

        def up(ws, cfg=None):
            return K.gemma_moe_gemm(x, ws[0], offs, row_index=slots, top_k=TOP_K, w_scale=ws[2], config=cfg)

        def down(ws, h, cfg=None):
            return K.gemma_moe_gemm(h, ws[1], offs, gelu_gate=True, top_k=TOP_K, w_scale=ws[3], config=cfg)

        def pair(ws, cfgs=(None, None)):
            return down(ws, up(ws, cfgs[0]), cfgs[1])

        h_ref = up(sets[0], tc[0])
        ref = down(sets[0], h_ref, tc[1]).float()
        picked = (K.moe_config(t * TOP_K, E, False, top_k=TOP_K), K.moe_config(t * TOP_K, E, True, top_k=TOP_K))
        row = {"tokens": t, "experts_hit": hit, "gate_up_bytes": up_bytes, "down_bytes": down_bytes,
               "picked": [repr(c) for c in picked],
               "rel_err_picked_vs_tensor_core": measure.rel_err(pair(sets[0]).float(), ref), "paths": {}}
        paths = row["paths"]
        nbytes = up_bytes + down_bytes
        for name, f, pdl in (("tensor_core", lambda ws: pair(ws, tc), False),
                             ("tensor_core_pdl", lambda ws: pair(ws, tc), True),
                             ("picked", pair, False), ("picked_pdl", pair, True)):
            ms = graph_ms(f, sets, args.rep_ms, pdl)
            paths[name] = {"ms": ms, "bw": nbytes / (ms * 1e-3) / bw}
        ms = graph_ms(pair, fp8_sets, args.rep_ms, True)  # FP8 weights: half the bytes (+ the scales)
        fp8_bytes = nbytes // 2 + hit * (2 * INTER + H) * 4
        paths["picked_fp8_pdl"] = {"ms": ms, "bw": fp8_bytes / (ms * 1e-3) / bw}
        for gemm, cfg, nb in (("gate_up", tc[0], up_bytes), ("down", tc[1], down_bytes)):
            f = (lambda ws, c=cfg: up(ws, c)) if gemm == "gate_up" else (lambda ws, c=cfg: down(ws, h_ref, c))
            ms = graph_ms(f, sets, args.rep_ms)
            paths[f"{gemm} tensor_core"] = {"ms": ms, "bw": nb / (ms * 1e-3) / bw}
        if args.sweep and t <= K.GEMV_MAX_TOKENS:
            block_m = picked[0].block_m
            for cand in K.MOE_GEMV_SWEEP:
                cfg = replace(cand, block_m=block_m)
                for gemm, nb in (("gate_up", up_bytes), ("down", down_bytes)):
                    if gemm == "gate_up":
                        f = lambda ws, c=cfg: up(ws, c)  # noqa: E731
                        err = measure.rel_err(up(sets[0], cfg).float(), h_ref.float())
                    else:
                        f = lambda ws, c=cfg: down(ws, h_ref, c)  # noqa: E731
                        err = measure.rel_err(down(sets[0], h_ref, cfg).float(), ref)
                    try:
                        ms = graph_ms(f, sets, args.rep_ms)
                    except Exception as e:  # noqa: BLE001  (a setting that does not compile: registers)
                        print(f"  {gemm} {cfg}: failed {type(e).__name__} {str(e)[:120]}", flush=True)
                        continue
                    paths[f"{gemm} {cfg!r}"] = {"ms": ms, "bw": nb / (ms * 1e-3) / bw, "rel_err_vs_tensor_core": err}
        rows.append(row)
        tcp = paths["tensor_core"]
        print(f"T={t:>2} ({hit} experts, {nbytes / 1e6:.1f} MB): tensor cores {tcp['ms'] * 1e3:.1f} µs "
              f"({tcp['bw']:.0%}); picked {paths['picked']['ms'] * 1e3:.1f} µs "
              f"({paths['picked']['bw']:.0%}), PDL {paths['picked_pdl']['ms'] * 1e3:.1f}; FP8 "
              f"{paths['picked_fp8_pdl']['ms'] * 1e3:.1f} µs; err {row['rel_err_picked_vs_tensor_core']:.1e}",
              flush=True)
        for gemm in ("gate_up", "down"):
            best = sorted((k for k in paths if k.startswith(gemm + " ")), key=lambda k: paths[k]["ms"])[:4]
            for k in best:
                print(f"    {k}: {paths[k]['ms'] * 1e3:.1f} µs ({paths[k]['bw']:.0%})", flush=True)
    if args.json:  # atomic, with card, versions, commit and date
        measure.write_json(args.json, {"benchmark": "moe_decode_stream", "copy_bandwidth_Bps": bw, "rows": rows})


if __name__ == "__main__":
    main()
