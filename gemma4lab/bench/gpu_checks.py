"""A GPU sanity probe: PCG (graphs and graph-less) against the same fused model run eagerly, just past the window.

``python -m gemma4lab.bench.gpu_checks`` — prints the largest logit difference per configuration.
"""

from __future__ import annotations

import torch

import gemma4lab
from gemma4lab.bench.common import random_prompt
from gemma4lab.pcg import PiecewiseCudaGraphRunner


def main(argv=None) -> int:
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
