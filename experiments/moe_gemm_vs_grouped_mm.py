"""Experiment: the streaming moe_gemm kernel vs torch's grouped_mm for 26B-A4B experts (bf16, H=2816, I=704).

Routed rows per layer = tokens × 8 over 128 experts (uniform random routing). Prints time and weight-bandwidth
fraction for both, per token count and tile choice. ``python experiments/moe_gemm_vs_grouped_mm.py``
"""

import torch
import torch.nn.functional as F

from gemma4lab.kernels import MoeConfig, gemma_moe_gemm
from gemma4lab.lab import measure


def main():
    dev, dt = "cuda", torch.bfloat16
    E, H, inter = 128, 2816, 704
    bw = measure.copy_bandwidth(dev)
    w = (0.02 * torch.randn(E, 2 * inter, H, device=dev)).to(dt)
    wd = (0.02 * torch.randn(E, H, inter, device=dev)).to(dt)
    gmm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    wbytes = (w.numel() + wd.numel()) * 2
    for t in (16, 93, 189, 512):
        m = t * 8
        idx = torch.randint(0, E, (m,), device=dev)
        counts = torch.bincount(idx, minlength=E)
        offs = counts.cumsum(0).to(torch.int32)
        x = torch.randn(m, H, device=dev, dtype=dt)

        def lib():
            h = gmm(x, w.transpose(-2, -1), offs=offs)
            g, u = h.chunk(2, -1)
            return gmm(F.gelu(g, approximate="tanh") * u, wd.transpose(-2, -1), offs=offs)

        ref = lib()
        res = {"grouped_mm": measure.bench(lib)}
        for bm, bn, bk, nw, ns in ((16, 128, 128, 4, 3), (16, 64, 64, 4, 4), (16, 128, 64, 4, 4), (16, 256, 64, 8, 3),
                                   (16, 128, 64, 4, 6), (16, 64, 128, 4, 3), (16, 256, 128, 8, 2), (32, 128, 64, 4, 4)):
            kw = dict(config=MoeConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns))
            f = lambda kw=kw: gemma_moe_gemm(gemma_moe_gemm(x, w, offs, **kw), wd, offs, gelu_gate=True, **kw)
            try:
                y = f()
                err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                res[f"moe {bm}x{bn}x{bk} w{nw} s{ns}" + (" WRONG" if err > 2e-2 else "")] = measure.bench(f)
            except Exception as e:  # noqa: BLE001
                print("failed", kw, type(e).__name__, str(e)[:100])
        best = sorted((v, k) for k, v in res.items())[:4]
        print(f"T={t:>5} rows={m:>6}: grouped_mm {res['grouped_mm'] * 1e3:.0f} us "
              f"({wbytes / (res['grouped_mm'] * 1e-3) / bw:.0%}); best: "
              + ", ".join(f"{k} {v * 1e3:.0f} us ({wbytes / (v * 1e-3) / bw:.0%})" for v, k in best), flush=True)


if __name__ == "__main__":
    main()
