"""Experiment: launch layouts for the dual-norm MoE epilogue at hidden 2816 (bf16) on the GPU.

Compares the package kernel (segmented rows, heuristic config) with two plain layouts: one row per program with
a masked BLOCK=next_pow2(H) tile, and a persistent grid that loops over rows with software pipelining. Prints
time and fraction of copy bandwidth. ``python experiments/dual_norm_variants.py``
"""

import torch
import triton
import triton.language as tl

from gemma4lab.kernels import RowConfig, gemma_dual_rmsnorm_residual_scalar
from gemma4lab.lab import measure


@triton.jit
def _dual_row(x1, w1, x2, w2, w3, r, s, out, n_rows, H, eps, BLOCK: tl.constexpr, PERSISTENT: tl.constexpr,
              STAGES: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    m = cols < H
    a = tl.load(w1 + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(w2 + cols, mask=m, other=0.0).to(tl.float32)
    c = tl.load(w3 + cols, mask=m, other=0.0).to(tl.float32)
    sc = tl.load(s).to(tl.float32)
    pid = tl.program_id(0)
    if PERSISTENT:
        step = tl.num_programs(0)
    else:
        step = n_rows
    for row in tl.range(pid, n_rows, step, num_stages=STAGES):
        off = row.to(tl.int64) * H + cols
        u = tl.load(x1 + off, mask=m, other=0.0).to(tl.float32)
        v = tl.load(x2 + off, mask=m, other=0.0).to(tl.float32)
        res = tl.load(r + off, mask=m, other=0.0).to(tl.float32)
        u = u * tl.rsqrt(tl.sum(u * u, 0) / H + eps) * a
        v = v * tl.rsqrt(tl.sum(v * v, 0) / H + eps) * b
        t = u + v
        t = t * tl.rsqrt(tl.sum(t * t, 0) / H + eps) * c
        tl.store(out + off, ((t + res) * sc).to(out.dtype.element_ty), mask=m)


def run_variant(x1, w1, x2, w2, w3, r, s, out, persistent, warps, stages, progs_per_sm=4):
    n, h = x1.shape
    block = triton.next_power_of_2(h)
    grid = (min(n, 132 * progs_per_sm),) if persistent else (n,)
    _dual_row[grid](x1, w1, x2, w2, w3, r, s, out, n, h, 1e-6, BLOCK=block, PERSISTENT=persistent, STAGES=stages,
                    num_warps=warps)
    return out


def main():
    dev = "cuda"
    bw = measure.copy_bandwidth(dev)
    h = 2816
    for t in (93, 1453, 4096, 11533, 32768):
        x1, x2, r = (torch.randn(t, h, device=dev, dtype=torch.bfloat16) for _ in range(3))
        w1, w2, w3 = (1 + 0.1 * torch.randn(h, device=dev, dtype=torch.bfloat16) for _ in range(3))
        s = torch.tensor([0.9], device=dev, dtype=torch.bfloat16)
        ref = gemma_dual_rmsnorm_residual_scalar(x1, w1, x2, w2, w3, r, s)
        nbytes = 4 * t * h * 2 + 3 * h * 2
        res = {"pkg": measure.bench(lambda: gemma_dual_rmsnorm_residual_scalar(x1, w1, x2, w2, w3, r, s))}
        for rows, warps in ((1, 4), (1, 8), (1, 16), (2, 8), (4, 8)):
            cfg = RowConfig(rows=rows, num_warps=warps)
            res[f"pkg r{rows}w{warps}"] = measure.bench(
                lambda cfg=cfg: gemma_dual_rmsnorm_residual_scalar(x1, w1, x2, w2, w3, r, s, config=cfg))
        out = torch.empty_like(x1)
        for persistent in (False, True):
            for warps in (4, 8, 16):
                for stages in ((1,) if not persistent else (1, 2, 3)):
                    for pps in ((4,) if not persistent else (2, 4, 8)):
                        f = lambda: run_variant(x1, w1, x2, w2, w3, r, s, out, persistent, warps, stages, pps)
                        f()
                        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                        key = f"{'pers' if persistent else 'row'} w{warps} s{stages} p{pps}"
                        res[key] = measure.bench(f)
                        if err > 1e-2:
                            res[key + " WRONG"] = err
        best = sorted((v, k) for k, v in res.items() if not k.endswith("WRONG"))[:6]
        print(f"T={t}: pkg {res['pkg'] * 1e3:.1f} us ({nbytes / (res['pkg'] * 1e-3) / bw:.0%}); best: " +
              ", ".join(f"{k} {v * 1e3:.1f} us ({nbytes / (v * 1e-3) / bw:.0%})" for v, k in best), flush=True)
        bad = [k for k in res if k.endswith("WRONG")]
        if bad:
            print("  WRONG:", bad)


if __name__ == "__main__":
    main()
