"""Experiment: does the GELU in the down GEMM's operand load cost the down GEMM its bandwidth at 189–256 tokens?

At 189 tokens the down GEMM (``moe_gemm(gate_up, down_proj, gelu_gate=True)``) takes 161 µs a layer against 120 µs
to stream its weights (75 % of copy bandwidth), while gate/up streams at 96 % (``results/moe_sweep_h200.json``).
Every program of the down GEMM (one expert, 128 of its 2816 output columns) loads all of its expert's gate|up rows
and evaluates ``gelu_tanh(gate) · up`` again: 22 column tiles, 22 times the same GELU, on the load path of a GEMM
that has only 11 K steps (K = 704) to hide it in. The alternative is one ``gelu_tanh_and_mul`` launch over the
routed rows (6 MB at 189 tokens) and a plain down GEMM.

**Prediction:** the plain down GEMM runs at gate/up's ~95 % of bandwidth (≈ 125 µs at 189 tokens), and the GELU
launch costs ~5 µs, so the split path wins by ~30 µs a layer (~0.9 ms a 30-layer prefill) at 189 tokens and less
at 93 (86 % there today).

Each call is a node of a CUDA graph cycling over copies of the weights (L2-cold, as in a model); the outputs of the
two paths are compared against a float64 product.

    python experiments/moe_down_gelu.py --tokens 93 189 256 --json results/runs/moe_down_gelu_<card>.json
"""

from __future__ import annotations

import argparse

import torch

from gemma4lab.kernels import gemma_gelu_tanh_and_mul, gemma_moe_gemm, gemma_moe_route, moe_config
from gemma4lab.lab import measure

E, H, INTER, TOP_K = 128, 2816, 704, 8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[93, 189, 256])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    bw = measure.copy_bandwidth(dev)
    copies = 3  # 3 × 0.51 GB of down weights: far more than L2
    wds = [(0.02 * torch.randn(E, H, INTER, generator=gen)).to(dev, dt) for _ in range(copies)]
    rows = []
    for t in args.tokens:
        ids = torch.rand(t, E, generator=gen).topk(TOP_K, dim=-1).indices.to(dev)
        offs, _, _ = gemma_moe_route(ids, E)
        h = (torch.randn(t * TOP_K, 2 * INTER, generator=gen)).to(dev, dt)
        hit = int((torch.bincount(ids.reshape(-1), minlength=E) > 0).sum())
        floor_us = hit * H * INTER * 2 / bw * 1e6
        cfg = moe_config(t * TOP_K, E, True)

        def fused(wd):
            return gemma_moe_gemm(h, wd, offs, gelu_gate=True, config=cfg)

        def split(wd):
            return gemma_moe_gemm(gemma_gelu_tanh_and_mul(h[:, :INTER], h[:, INTER:]), wd, offs, config=cfg)

        act = gemma_gelu_tanh_and_mul(h[:, :INTER], h[:, INTER:])

        def plain(wd):
            return gemma_moe_gemm(act, wd, offs, config=cfg)

        # float64 truth of the first weight copy
        g, u = h[:, :INTER].double(), h[:, INTER:].double()
        a64 = 0.5 * g * (1 + torch.tanh(0.7978845608028654 * (g + 0.044715 * g**3))) * u
        counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long()).tolist()
        truth = torch.cat([a64[s:s + c] @ wds[0][e].double().T for e, (s, c) in
                           enumerate(zip([0, *offs.long().tolist()[:-1]], counts))])
        err = {name: ((f(wds[0]).double() - truth).norm() / truth.norm()).item()
               for name, f in (("fused", fused), ("split", split))}
        us = {name: 1e3 * measure.bench_cuda_graph_cycled(f, wds) for name, f in
              (("fused", fused), ("split", split), ("plain", plain))}
        us["gelu"] = 1e3 * measure.bench_cuda_graph(lambda: gemma_gelu_tanh_and_mul(h[:, :INTER], h[:, INTER:]))
        row = {"tokens": t, "experts_hit": hit, "config": repr(cfg), "floor_us": floor_us, "us": us,
               "bw": {k: floor_us / v for k, v in us.items() if k != "gelu"}, "rel_err_vs_fp64": err}
        rows.append(row)
        print(f"T={t:>4}: down with GELU in its load {us['fused']:.1f} µs ({floor_us / us['fused']:.0%} of bw), "
              f"GELU launch + plain down {us['split']:.1f} µs, plain down alone {us['plain']:.1f} µs "
              f"({floor_us / us['plain']:.0%}), GELU alone {us['gelu']:.1f} µs; floor {floor_us:.1f} µs; "
              f"rel. err vs fp64 {err['fused']:.2e} / {err['split']:.2e}", flush=True)
    if args.json:
        measure.write_json(args.json, {"benchmark": "moe_down_gelu", "copy_bandwidth_Bps": bw, "rows": rows})


if __name__ == "__main__":
    main()
