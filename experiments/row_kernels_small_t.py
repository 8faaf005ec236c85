"""Experiment: the row-norm kernels at few rows, against the published layout, one GPU (bf16, hidden 2816).

At 93–189 tokens our persistent row kernels (``RowConfig``: 4 warps, a 3-stage software pipeline, 2 programs per
SM) were 2–12 % slower inside a CUDA graph than the published layout (one program per row, 16 warps, plain loads).
Two suspects, with what each does to a row's bits:

* the pipeline: with no more rows than programs each program runs one iteration, and a 3-stage ``tl.range`` stages
  its loads through shared memory for nothing. ``num_stages`` changes the load path only, so the bits cannot change.
* the warps: 16 warps give a lone row 4× the loads in flight, but change how ``tl.sum`` splits the row, so a row's
  bits may change — and a row's result must not depend on the launch (PCG pads prompts to buckets).

Per token count it times every ``RowConfig`` candidate and the published layout (each call inside a CUDA graph), and
records whether each candidate's output equals the default's bit for bit.
``python experiments/row_kernels_small_t.py --json results/runs/row_small_t_<card>.json``
"""

import argparse

import torch

from gemma4lab.kernels import RowConfig, gemma_dual_rmsnorm_residual_scalar, gemma_rmsnorm_residual_scalar
from gemma4lab.lab import measure
from gemma4lab.lab.bench import published_layout

H = 2816


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 93, 189, 1453, 11533])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    configs = [None] + [RowConfig(programs_per_sm=pps, num_warps=w, num_stages=s)
                        for w in (4, 8, 16) for s in (1, 3) for pps in (2, 4)]
    rows = []
    for t in args.tokens:
        x1, x2, r = (torch.randn(t, H, generator=gen).to(dev, dt) for _ in range(3))
        w1, w2, w3 = (torch.randn(H, generator=gen).to(dev, dt) for _ in range(3))
        s = torch.tensor([0.7], device=dev)
        out = torch.empty_like(x1)
        kernels = {
            "rmsnorm_residual_scalar": (
                lambda c: gemma_rmsnorm_residual_scalar(x1, w1, r, s, out=out, config=c),
                lambda: published_layout.rmsnorm_residual_scalar(x1, w1, r, s, out)),
            "dual_rmsnorm_residual_scalar": (
                lambda c: gemma_dual_rmsnorm_residual_scalar(x1, w1, x2, w2, w3, r, s, out=out, config=c),
                lambda: published_layout.dual_rmsnorm_residual_scalar(x1, w1, x2, w2, w3, r, s, out))}
        for name, (ours, published) in kernels.items():
            ref = ours(None).clone()
            res = {"kernel": name, "tokens": t, "published_ms": measure.bench_cuda_graph(published), "configs": []}
            for c in configs:
                got = ours(c).clone()
                res["configs"].append({"config": repr(c) if c else "default (row_config)",
                                       "ms": measure.bench_cuda_graph(lambda c=c: ours(c)),
                                       "bits_equal_default": bool(torch.equal(got, ref))})
            res["configs"].sort(key=lambda e: e["ms"])
            rows.append(res)
            default = next(e for e in res["configs"] if e["config"].startswith("default"))
            best = res["configs"][0]
            same = min((e for e in res["configs"] if e["bits_equal_default"]), key=lambda e: e["ms"])
            print(f"{name:>30} T={t:>6}: published {res['published_ms'] * 1e3:6.2f} us, default "
                  f"{default['ms'] * 1e3:6.2f} us, best {best['ms'] * 1e3:6.2f} us ({best['config']}, bits "
                  f"{'equal' if best['bits_equal_default'] else 'DIFFER'}), best with equal bits "
                  f"{same['ms'] * 1e3:6.2f} us ({same['config']})", flush=True)
    if args.json:
        measure.write_json(args.json, {"benchmark": "row_kernels_small_t", "hidden": H, "rows": rows})


if __name__ == "__main__":
    main()
