"""Experiment: where a decode graph step's idle time sits. The graph step at batch 1 takes 4.22 ms at a 512-token
context and 4.78 at 4096 (results/decode_h200.json, 3cedda3), and the whole difference is idle time (wall − busy
0.38 → 0.88 ms), not kernel time. This profiles one replay per context with a kernel timeline and reports the gaps
between consecutive kernels: their sum, the largest, and the sum by the kernel that follows each gap (a gap before
a kernel is that kernel's launch latency inside the graph, or its wait for the previous one).

    python experiments/decode_step_timeline.py --contexts 512 4096 --json results/runs/decode_gaps_<card>_<commit>.json

First run (H200, 9099cde; its log only, the JSON did not come back): a replay back to back takes 4.03 ms at 512 and
4.10 ms at 4096, kernels busy 3.86 / 3.91 ms, 668 gaps of ~0.45 µs summing to 0.30 / 0.31 ms at both contexts, the
largest 2 µs. So the graph itself does not slow down with context: bench-decode's 4.22 → 4.78 ms is time its step
timer counts outside the kernels — the host queueing the replay while the GPU waits (its start event is recorded
before the input copies and the launch) — and that run shared the host with the GPU suite on the second card.
"""

from __future__ import annotations

import argparse

import torch

from gemma4lab.lab import measure
from gemma4lab.lab.bench.common import random_prompt
from gemma4lab.lab.bench.decode import _prefill_rows
from gemma4lab.lab.profiling import profile_forward, timeline_gaps
from gemma4lab.model.config import Gemma4Config
from gemma4lab.model.loading import random_init
from gemma4lab.runtime.decode_graphs import DecodeGraphRunner


def runner_step(runner: DecodeGraphRunner, tok: torch.Tensor, pos: torch.Tensor):
    return lambda: runner.step(tok, pos)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cfg = Gemma4Config.preset("26b-a4b")
    cfg = Gemma4Config(text=cfg.text, vision=None)
    model = random_init(cfg, dtype=torch.bfloat16, device="cuda", seed=0)
    model.set_fusion("all")
    res = {"benchmark": "decode_step_timeline", "rows": {}}
    with torch.no_grad():
        for ctx in args.contexts:
            runner = DecodeGraphRunner(model, max_batch=args.max_batch, max_len=ctx + 33, progress=False)
            prompt = random_prompt(ctx, cfg.text.vocab_size, seed=ctx, device="cuda")
            _prefill_rows(model, [prompt], runner.cache)  # bench-decode's: the prompt's K/V into row 0
            runner.capture()
            tok = prompt[-1:].contiguous()
            pos = torch.full((1,), ctx, dtype=torch.long, device="cuda")
            step = runner_step(runner, tok, pos)
            ms = measure.bench(step, rep_ms=200)
            prof = profile_forward(step, timeline=True)
            # timeline rows are [name, family, start µs, duration µs]
            g = timeline_gaps((n, a, a + d) for n, _, a, d in prof["timeline"])
            row = {"step_ms": ms, "wall_ms": prof["wall_ms"], "busy_ms": prof["gpu_busy_ms"], "gaps": g,
                   "kernels": len(prof["timeline"]), "timeline": prof["timeline"]}
            res["rows"][str(ctx)] = row
            print(f"ctx {ctx}: step {ms} ms, busy {row['busy_ms']:.3f} ms, kernels {row['kernels']}, "
                  f"span {g['span_ms']:.3f} ms, gaps {g['sum_ms']:.3f} ms in {g['count']}")
            for us, before, after in g["largest"]:
                print(f"   gap {us:7.1f} us between {before} and {after}")
            for name, us in g["by_next_us"].items():
                print(f"   {us:8.1f} us of gaps before {name}")
            del runner, step
            measure.release_memory()
    if args.json:  # atomic, with card, versions, commit and date
        measure.write_json(args.json, res)


if __name__ == "__main__":
    main()
