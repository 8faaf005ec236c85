"""Experiment: the dense projections of Gemma 4 26B-A4B at few rows (decode 1–16, short prefill 93 / 189), bf16, one
GPU — cuBLAS (``F.linear``) against ``gemma_dense_gemm`` under a grid of launch settings.

``grouped``: the groups ``Fusion.dense`` runs as one launch (q/k/v, q/k, gate/up) against one cuBLAS GEMM each.

Every timing is of calls captured in a CUDA graph (launch overhead removed, as in the decode graph and PCG), each
call on a different copy of the weight so the 50 MB L2 never holds it: what a layer's stream over its weights costs.
Weight bandwidth is reported as a fraction of the copy bandwidth measured in the same run. Each setting's output is
checked against a float64 product before it is timed.

``python experiments/dense_small_m.py --json results/runs/dense_sweep_<card>.json``
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton

from gemma4lab.kernels.dense_gemm import DenseConfig, dense_config, gemma_dense_gemm
from gemma4lab.lab import measure
from gemma4lab.lab.measure import bench_cuda_graph_cycled as graph_ms

H = 2816
#: (name, N, K) of every dense projection of one layer, the fused pairs a loader could concatenate, and the head
SHAPES = [("q_sliding", 4096, H), ("kv_sliding", 2048, H), ("q_full", 8192, H), ("k_full", 1024, H),
          ("o_sliding", H, 4096), ("o_full", H, 8192), ("gate_or_up", 2112, H), ("gate_up", 4224, H),
          ("down", H, 2112), ("qkv_sliding", 8192, H), ("qk_full", 9216, H), ("lm_head", 262144, H)]


def candidates(m: int, n: int, k: int) -> list[DenseConfig]:
    """The grid at ``m`` rows: one row tile, weight tiles of 64 or 128 rows, 128- or 256-deep K steps, 3 or 4 stages,
    each with no split, the split that gives ~2 programs per SM, and twice that. (A CUDA-core product for 1–4 rows
    was in the first sweep, 64f1e27: 3× slower than the 16-row tensor-core tile at one row, so it is gone.)"""
    out = []
    bm = min(256, max(16, 1 << max(0, (m - 1).bit_length())))
    for bn, bk, ns in itertools.product((64, 128), (128, 256), (3, 4)):
        if bm * bk > 128 * 256 and ns > 3:
            continue
        out.append(DenseConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=4, num_stages=ns))
    res = []
    for c in out:
        tiles, steps = triton.cdiv(n, c.block_n), triton.cdiv(k, c.block_k)
        auto = max(1, min(steps // 2, triton.cdiv(264, tiles)))
        for s in sorted({1, auto, min(steps, 2 * auto)}):
            res.append(DenseConfig(**{**c.__dict__, "split_k": s}))
    return res


def weight_copies(nbytes: int) -> int:
    """Copies of a weight set whose cycle is > 3x the 50 MB L2 (at most 16): every timed call streams from HBM."""
    return max(1, min(16, -(-160 * 2**20 // nbytes)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 93, 189])
    p.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES])
    p.add_argument("--rep-ms", type=float, default=30)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    bw = measure.copy_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for name, n, k in (s for s in SHAPES if s[0] in args.shapes):
        nbytes = n * k * 2
        ws = [0.02 * torch.randn(n, k, device=dev, dtype=dt, generator=gen) for _ in range(weight_copies(nbytes))]
        for m in args.rows:
            x = torch.randn(m, k, device=dev, dtype=dt, generator=gen)
            ref = (x.double() @ ws[0].double().T)
            tol = 4 * 2**-8 * ref.abs().max().item()
            row = {"shape": name, "n": n, "k": k, "rows": m, "weight_bytes": nbytes,
                   "cublas_ms": graph_ms(lambda w, x=x: F.linear(x, w), ws, rep_ms=args.rep_ms), "ours": []}
            row["cublas_bw"] = nbytes / (row["cublas_ms"] * 1e-3) / bw
            heur = dense_config(m, [n], k)
            for cfg in dict.fromkeys([heur, *candidates(m, n, k)]):
                try:
                    err = (gemma_dense_gemm(x, ws[0], config=cfg).double() - ref).abs().max().item()
                    if err > tol:
                        raise AssertionError(f"max error {err:.2e} > {tol:.2e}")
                    ms = graph_ms(lambda w, x=x, cfg=cfg: gemma_dense_gemm(x, w, config=cfg), ws, rep_ms=args.rep_ms)
                except Exception as e:  # noqa: BLE001 — a setting that does not compile or fit is part of the sweep
                    row["ours"].append({"config": repr(cfg), "error": f"{type(e).__name__}: {e}"[:200]})
                    continue
                row["ours"].append({"config": repr(cfg), "ms": ms, "bw": nbytes / (ms * 1e-3) / bw,
                                    "heuristic": cfg == heur})
            timed = [r for r in row["ours"] if "ms" in r]
            best = min(timed, key=lambda r: r["ms"]) if timed else None
            row["best"] = best
            rows.append(row)
            print(f"{name:12s} N={n:6d} K={k} M={m:3d}: cuBLAS {row['cublas_ms'] * 1e3:7.1f} us "
                  f"({row['cublas_bw']:.0%})  ours best "
                  + (f"{best['ms'] * 1e3:7.1f} us ({best['bw']:.0%}) {best['config']}" if best else "none"),
                  flush=True)
            if args.json:
                measure.write_json(args.json, {"experiment": "dense_small_m", "copy_bandwidth_Bps": bw,
                                               "rows": rows, "complete": False})
        del ws
        torch.cuda.empty_cache()
    grouped = time_groups(args, bw, gen, dev)
    if args.json:
        measure.write_json(args.json, {"experiment": "dense_small_m", "copy_bandwidth_Bps": bw, "rows": rows,
                                       "grouped": grouped, "complete": True})


#: the weights the model runs as one ``dense_gemm`` launch under ``Fusion.dense`` (sizes N, all with K = 2816)
GROUPS = {"qkv_sliding": (4096, 2048, 2048), "qk_full": (8192, 1024), "gate_up": (2112, 2112)}


def time_groups(args, bw: float, gen: torch.Generator, dev: str = "cuda") -> list[dict]:
    """What ``Fusion.dense`` runs against what it replaces, at the rows it serves (<= DENSE_MAX_ROWS): one
    ``gemma_dense_gemm`` over the group's weights (the model's heuristic setting) against one cuBLAS GEMM each."""
    from gemma4lab.kernels import DENSE_MAX_ROWS

    dt = torch.bfloat16 if dev == "cuda" else torch.float32  # fp32 for a CPU smoke run under the interpreter
    out = []
    for name, ns in GROUPS.items():
        nbytes = sum(ns) * H * 2
        sets = [[0.02 * torch.randn(n, H, device=dev, dtype=dt, generator=gen) for n in ns]
                for _ in range(weight_copies(nbytes))]
        for m in (r for r in args.rows if r <= DENSE_MAX_ROWS):
            x = torch.randn(m, H, device=dev, dtype=dt, generator=gen)
            ref = torch.cat([x.double() @ w.double().T for w in sets[0]], dim=1)
            err = (gemma_dense_gemm(x, sets[0]).double() - ref).abs().max().item() / ref.abs().max().item()
            row = {"group": name, "n": list(ns), "k": H, "rows": m, "weight_bytes": nbytes, "rel_err": err,
                   "cublas_ms": graph_ms(lambda ws, x=x: [F.linear(x, w) for w in ws], sets, rep_ms=args.rep_ms),
                   "dense_gemm_ms": graph_ms(lambda ws, x=x: gemma_dense_gemm(x, ws), sets, rep_ms=args.rep_ms)}
            row["speedup"] = row["cublas_ms"] / row["dense_gemm_ms"]
            out.append(row)
            print(f"group {name:12s} M={m:3d}: cuBLAS x{len(ns)} {row['cublas_ms'] * 1e3:6.1f} us, one dense_gemm "
                  f"{row['dense_gemm_ms'] * 1e3:6.1f} us ({row['speedup']:.2f}x; rel err {err:.1e})", flush=True)
        del sets
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    main()
