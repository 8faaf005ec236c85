"""A GPU sanity probe: PCG (graphs and graph-less) against the same fused model run eagerly, just past the window.

``python -m gemma4lab.lab.bench.gpu_checks`` — prints the largest logit difference per configuration.
"""

from __future__ import annotations

import torch

import gemma4lab
from gemma4lab.lab.bench.common import random_prompt
from gemma4lab.runtime.pcg import PiecewiseCudaGraphRunner


def kernel_row_consistency(n: int = 1025, bucket: int = 1280) -> None:
    """Each fused kernel on n rows vs the same rows inside a bucket-sized call (padding random): must be equal."""
    from gemma4lab import kernels as K

    h, dev, dt = 2816, "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    big = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g)
    w = lambda: 1 + 0.1 * big(h)
    x1, x2, r, a = big(bucket, h), big(bucket, h), big(bucket, h), big(bucket, h)
    w1, w2, w3, wn, ws = w(), w(), w(), w(), w()
    s = torch.tensor([0.9], device=dev, dtype=dt)
    cases = {
        "single": lambda m: K.gemma_rmsnorm_residual_scalar(x1[:m], w1, r[:m], s),
        "dual": lambda m: K.gemma_dual_rmsnorm_residual_scalar(x1[:m], w1, x2[:m], w2, w3, r[:m], s),
        "dual_next": lambda m: torch.cat(K.gemma_dual_rmsnorm_residual_scalar_next_norm(
            x1[:m], w1, x2[:m], w2, w3, r[:m], s, wn), 1),
        "post_attn": lambda m: torch.cat(K.gemma_post_attention_block(a[:m], r[:m], w1, w2, w3, ws), 1),
        "gelu": lambda m: K.gelu_tanh_mul(x1[:m]),
        "router": lambda m: torch.cat(
            [t.float() for t in K.gemma_router_topk(x1[:m, :128].float(), w1[:128].float(), 8)], 1),
    }
    for name, f in cases.items():
        d = (f(n).float() - f(bucket)[:n].float()).abs().max().item()
        print(f"kernel {name}: rows 0..{n} alone vs inside {bucket} rows: max abs diff {d}", flush=True)
    # experts path
    import gemma4lab.model.layers as L

    cfg = gemma4lab.Gemma4Config.preset("26b-a4b").text
    ex = L.Experts(cfg).to(dev, dt)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.02)
    torch.nn.init.normal_(ex.down_proj, std=0.02)
    idx = torch.randint(0, 128, (bucket, 8), device=dev)
    wts = torch.rand(bucket, 8, device=dev)
    for fused in (False, True):
        d = (ex(x1[:n], idx[:n], wts[:n], fused).float() - ex(x1, idx, wts, fused)[:n].float()).abs().max().item()
        print(f"experts fused={fused}: max abs diff {d}", flush=True)


def main(argv=None) -> int:
    kernel_row_consistency()
    cfg = gemma4lab.Gemma4Config.preset("26b-a4b").replace_text(num_hidden_layers=2)
    cfg = gemma4lab.Gemma4Config(text=cfg.text, vision=None)
    m = gemma4lab.random_init(cfg, dtype=torch.bfloat16, device="cuda").set_fusion("all")
    with torch.no_grad():
        for n in (1025, 1100, 2000):
            p = [random_prompt(n, cfg.text.vocab_size, seed=n)]
            e = m.prefill(p, all_logits=True)
            e2 = m.prefill(p, all_logits=True)
            for g in (False, True):
                r = PiecewiseCudaGraphRunner(m, buckets=[1280, 2048], use_graphs=g, progress=False)
                d = (r.prefill(p, all_logits=True).float() - e.float()).abs().max(-1).values
                print(n, "graphs" if g else "graph-less", "eager-vs-eager", (e2.float() - e.float()).abs().max().item(),
                      "max", d.max().item(), "rows > 0.5:", (d > 0.5).nonzero().flatten()[:8].tolist(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
