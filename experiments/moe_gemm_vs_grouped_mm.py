"""Experiment: the MoE expert path of prefill at 26B-A4B shapes (bf16, H=2816, I=704, 128 experts, top-8), one GPU.

Per token count and routing skew it times, each inside a CUDA graph (launch overhead removed, as under PCG):

* ``block``: the whole expert block, fused (``moe_route`` → ``moe_gemm`` gathering tokens → ``moe_gemm`` with the
  GELU → ``moe_combine``: what ``Experts`` runs with ``fused_gemm``) against the unfused one (argsort, count,
  cumsum, gather, ``grouped_mm``, GELU, ``grouped_mm``, inverse scatter, fp32 weighted sum);
* ``routing``: ``moe_route`` alone against the unfused bookkeeping it replaces;
* ``gemm``: both expert GEMMs under every candidate of ``MOE_SWEEP`` (``--sweep``; otherwise ``moe_config``'s and
  the first H200 setting, ``MoeConfig()``), against ``grouped_mm`` on gathered rows; weight bandwidth as a fraction
  of copy bandwidth, and the error of each against ``grouped_mm``.

Routing: ``--skew 1`` is uniform (rows per expert ~ Binomial(T, 8/128)); ``--skew 3`` gives hot experts several
row tiles. ``python experiments/moe_gemm_vs_grouped_mm.py --sweep --json results/.../moe_sweep.json``
"""

import argparse

import torch
import torch.nn.functional as F

from gemma4lab.kernels import (
    ACT_QUANT_K,
    MOE_SWEEP,
    MoeConfig,
    gemma_moe_combine,
    gemma_moe_gemm,
    gemma_moe_route,
    moe_config,
)
from gemma4lab.lab import measure

E, H, INTER, TOP_K = 128, 2816, 704, 8


def routed_ids(t: int, skew: float, gen: torch.Generator) -> torch.Tensor:
    """k distinct experts per token; skew > 1 favours low expert numbers (the same recipe as the GPU tests)."""
    pref = torch.rand(t, E, generator=gen) ** skew * torch.arange(E, 0, -1) ** (skew - 1)
    return pref.topk(TOP_K, dim=-1).indices


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 93, 189, 512, 1024])
    p.add_argument("--skew", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--sweep", action="store_true", help="time every MoeConfig of MOE_SWEEP (tuning)")
    p.add_argument("--json", default=None, help="write every timing here")
    p.add_argument("--fp8", action="store_true", help="moe_gemm on FP8 (e4m3) weights with per-channel scales "
                   "(gemma4lab.quantize_experts' format); grouped_mm stays the bf16 reference")
    p.add_argument("--fp8-acts", action="store_true", help="with --fp8: the activations quantised in the kernel too "
                   "(a_fp8: FP8 × FP8 on the tensor cores); only the swept settings with the 128-deep K step")
    args = p.parse_args()
    if args.fp8_acts and not args.fp8:
        p.error("--fp8-acts needs --fp8 (FP8 activations multiply FP8 weights)")
    a8 = args.fp8_acts
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    bw = measure.copy_bandwidth(dev)
    w = (0.02 * torch.randn(E, 2 * INTER, H, generator=gen)).to(dev, dt)
    wd = (0.02 * torch.randn(E, H, INTER, generator=gen)).to(dev, dt)
    wbytes = (w.numel() + wd.numel()) * 2
    # the weights moe_gemm reads: bf16, or FP8 with one fp32 scale per expert and output channel
    if args.fp8:
        from gemma4lab.model.quantize import quantize_fp8_per_channel

        (wk, sk), (wdk, sdk) = quantize_fp8_per_channel(w), quantize_fp8_per_channel(wd)
    else:
        wk, sk, wdk, sdk = w, None, wd, None
    elem, scale_b = (1, 4) if args.fp8 else (2, 0)
    gmm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    graph = measure.bench_cuda_graph
    rows = []
    for skew in args.skew:
        for t in args.tokens:
            ids = routed_ids(t, skew, gen).to(dev)
            x = torch.randn(t, H, generator=gen).to(dev, dt)
            weights = torch.rand(t, TOP_K, generator=gen).to(dev)
            flat = ids.reshape(-1)
            busiest = int(torch.bincount(flat, minlength=E).max())

            def unfused_routing():
                order = torch.argsort(flat, stable=True)
                counts = torch.zeros(E, dtype=torch.int32, device=dev)
                counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
                positions = torch.empty_like(order)
                positions[order] = torch.arange(order.numel(), device=dev)
                return order, torch.cumsum(counts, 0, dtype=torch.int32), positions

            def unfused_block():
                order, offs, _ = unfused_routing()
                g, u = gmm(x[order // TOP_K], w.transpose(-2, -1), offs=offs).chunk(2, -1)
                ys = gmm(F.gelu(g, approximate="tanh") * u, wd.transpose(-2, -1), offs=offs)
                y = torch.empty_like(ys)
                y[order] = ys
                return (y.view(t, TOP_K, H).float() * weights[..., None]).sum(1).to(dt)

            def fused_block(cfg=None):
                offs, slots, pos = gemma_moe_route(ids, E)
                h = gemma_moe_gemm(x, wk, offs, row_index=slots, top_k=TOP_K, w_scale=sk, a_fp8=a8, config=cfg)
                return gemma_moe_combine(gemma_moe_gemm(h, wdk, offs, gelu_gate=True, w_scale=sdk, a_fp8=a8,
                                                        config=cfg), pos, weights)

            offs, slots, _ = gemma_moe_route(ids, E)
            xs = x[slots.long() // TOP_K]

            def lib_gemms():
                g, u = gmm(xs, w.transpose(-2, -1), offs=offs).chunk(2, -1)
                return gmm(F.gelu(g, approximate="tanh") * u, wd.transpose(-2, -1), offs=offs)

            ref_up = gmm(xs, w.transpose(-2, -1), offs=offs)
            ref = lib_gemms().float()
            hit = int((torch.bincount(flat, minlength=E) > 0).sum())  # the weights a GEMM must read: experts hit
            up_bytes = hit * (w[0].numel() * elem + w.shape[1] * scale_b)
            down_bytes = hit * (wd[0].numel() * elem + wd.shape[1] * scale_b)
            heur = (moe_config(t * TOP_K, E, False, args.fp8, a8), moe_config(t * TOP_K, E, True, args.fp8, a8))
            res = {"tokens": t, "skew": skew, "busiest_expert_rows": busiest, "experts_hit": hit,
                   "heuristic": repr(heur[0]), "heuristic_down": repr(heur[1]),
                   "block_fused_ms": graph(fused_block), "block_unfused_ms": graph(unfused_block),
                   "routing_fused_ms": graph(lambda: gemma_moe_route(ids, E)),
                   "routing_unfused_ms": graph(unfused_routing), "gemm_grouped_mm_ms": measure.bench(lib_gemms),
                   "gemm": []}
            candidates = MOE_SWEEP if args.sweep else dict.fromkeys((*heur, MoeConfig()))
            if a8:  # the activation scales are defined on 128-wide K steps of the swapped orientation
                candidates = [c for c in candidates if c.swap_ab and c.block_k == ACT_QUANT_K]
            for cfg in candidates:
                up = lambda cfg=cfg: gemma_moe_gemm(x, wk, offs, row_index=slots, top_k=TOP_K, w_scale=sk, a_fp8=a8,
                                                    config=cfg)
                try:
                    h = up()
                    down = lambda cfg=cfg, h=h: gemma_moe_gemm(h, wdk, offs, gelu_gate=True, w_scale=sdk, a_fp8=a8,
                                                               config=cfg)
                    err_up = ((h.float() - ref_up.float()).norm() / ref_up.float().norm()).item()
                    err = ((down().float() - ref).norm() / ref.norm()).item()
                    up_ms, down_ms = measure.bench(up), measure.bench(down)
                    ms = measure.bench(lambda: down(h=up()))
                except Exception as e:  # noqa: BLE001  (a config that does not compile: shared memory, registers)
                    print(f"  {cfg}: failed {type(e).__name__} {str(e)[:100]}")
                    continue
                both_bw = (up_bytes + down_bytes) / (ms * 1e-3) / bw
                res["gemm"].append({"config": repr(cfg), "ms": ms, "weight_bw": both_bw,
                                    "gate_up_ms": up_ms, "gate_up_bw": up_bytes / (up_ms * 1e-3) / bw,
                                    "down_ms": down_ms, "down_bw": down_bytes / (down_ms * 1e-3) / bw,
                                    "rel_err_vs_grouped_mm": err, "gate_up_rel_err_vs_grouped_mm": err_up})
            res["gemm"].sort(key=lambda r: r["ms"])
            rows.append(res)
            best = res["gemm"][0]
            best_up = min(res["gemm"], key=lambda r: r["gate_up_ms"])
            best_down = min(res["gemm"], key=lambda r: r["down_ms"])
            heur_ms = next((r["ms"] for r in res["gemm"] if r["config"] == repr(heur[0])), float("nan"))
            print(f"skew {skew} T={t:>5} (busiest expert {busiest} rows, {hit} experts hit): block fused "
                  f"{res['block_fused_ms']:.3f} ms vs unfused {res['block_unfused_ms']:.3f}; routing "
                  f"{res['routing_fused_ms'] * 1e3:.1f} vs {res['routing_unfused_ms'] * 1e3:.1f} us; gemms grouped_mm "
                  f"{res['gemm_grouped_mm_ms']:.3f} ms ({wbytes / (res['gemm_grouped_mm_ms'] * 1e-3) / bw:.0%}), best "
                  f"{best['config']} {best['ms']:.3f} ms ({best['weight_bw']:.0%}, err "
                  f"{best['rel_err_vs_grouped_mm']:.1e}); setting {heur_ms:.3f} ms\n"
                  f"    best gate/up {best_up['config']} {best_up['gate_up_ms']:.3f} ms ({best_up['gate_up_bw']:.0%})"
                  f"\n    best down {best_down['config']} {best_down['down_ms']:.3f} ms ({best_down['down_bw']:.0%})",
                  flush=True)
    if args.json:  # atomic, with card, versions, commit and date
        measure.write_json(args.json, {"benchmark": "moe_sweep", "copy_bandwidth_Bps": bw, "rows": rows,
                                       "weights": "fp8_e4m3 (per-channel scales)" if args.fp8 else "bfloat16",
                                       "activations": "fp8_e4m3 (per row and 128 K columns, in the kernel)" if a8
                                       else "bfloat16"})


if __name__ == "__main__":
    main()
