"""Piecewise CUDA graphs on a reduced-depth model: ``python -m gemma4lab bench-pcg``.

Full width (26B-A4B shapes), fewer layers, so it runs in a minute: capture time and graph memory for the
default buckets, kernel launches per forward, CPU dispatch vs GPU busy time, and latency per token count for
eager unfused, eager fused and fused + PCG. Writes ``results/pcg_<card>.json`` and a plot.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from gemma4lab.lab import measure
from gemma4lab.lab.bench.common import (
    device_arg,
    out_dir,
    positive_float,
    positive_int,
    positive_ints,
    random_prompt,
)
from gemma4lab.lab.profiling import profile_forward
from gemma4lab.model.config import PRESETS, Gemma4Config
from gemma4lab.model.loading import random_init
from gemma4lab.runtime.fusion import Fusion
from gemma4lab.runtime.pcg import PiecewiseCudaGraphRunner

TOKENS = (16, 93, 189, 512, 1453, 2893, 5773)


def run(args) -> dict[str, Any]:
    dev = torch.device(args.device)
    cfg = Gemma4Config.preset(args.preset).replace_text(num_hidden_layers=args.layers)
    cfg = Gemma4Config(text=cfg.text, vision=None)
    model = random_init(cfg, dtype=torch.bfloat16, device=dev, seed=0)
    res: dict[str, Any] = {"benchmark": "pcg", "preset": args.preset, "layers": args.layers, "rows": {},
                           "profiles": {}}
    prompts = {t: [random_prompt(t, cfg.text.vocab_size, seed=t, device=dev)] for t in args.tokens}
    runner = None
    with torch.no_grad():
        for name, fusion, graphs in (("eager_unfused", Fusion.none(), False), ("eager_fused", Fusion.all(), False),
                                     ("pcg_fused", Fusion.all(), True)):
            model.set_fusion(fusion)
            if graphs:
                runner = PiecewiseCudaGraphRunner(model, max_tokens=args.max_tokens, progress=False)
                rep = runner.capture()
                res["capture"] = {"capture_s": rep.capture_s, "graph_pool_bytes": rep.graph_pool_bytes,
                                  "static_buffer_bytes": rep.static_buffer_bytes, "buckets": len(rep.buckets),
                                  "max_tokens": runner.max_tokens, "pieces_per_bucket": rep.pieces_per_bucket,
                                  "graphs": rep.graphs}
                fwd_for = lambda t: (lambda: runner.prefill(prompts[t]))
            else:
                fwd_for = lambda t: (lambda: model.prefill(prompts[t]))
            for t in args.tokens:
                fn = fwd_for(t)
                ms = measure.bench(fn, warmup_ms=50, rep_ms=args.rep_ms)
                res["rows"].setdefault(str(t), {"tokens": t})[f"{name}_ms"] = ms
                if t in args.profile_tokens:
                    prof = profile_forward(fn, trace_path=(args.out / f"trace_{name}_{t}.json") if args.traces
                                           else None, timeline=t == min(args.profile_tokens))  # for the Gantt
                    prof["launches_per_layer"] = prof["kernels"] / args.layers
                    res["profiles"][f"{name}_{t}"] = prof
                print(f"{name:>14} T={t:>5}: {ms:.3f} ms", flush=True)
        # bit-identity of graphs against the same fused model run eagerly, at bucket boundaries
        checks = {}
        for n in (16, 17, 256, 257, 1024, 1025):
            p = [random_prompt(n, cfg.text.vocab_size, seed=1000 + n, device=dev)]
            d = (runner.prefill(p).float() - model.prefill(p).float()).abs().max().item()
            checks[str(n)] = d
        res["pcg_vs_eager_max_abs"] = checks
        # Replay cost of one middle piece vs the GPU time of its kernels (target: + <= 10 us).
        replay = {}
        for bucket in (96, 1536):
            graphs = runner.piece_graphs(bucket)
            if graphs:
                g = graphs[len(graphs) // 2]
                t_replay = measure.bench(g.replay, rep_ms=args.rep_ms)
                busy = profile_forward(g.replay)["gpu_busy_ms"]
                replay[str(bucket)] = {"replay_ms": t_replay, "kernels_gpu_ms": busy,
                                       "overhead_us": (t_replay - busy) * 1e3}
        res["piece_replay"] = replay
    for r in res["rows"].values():
        if r.get("eager_unfused_ms") and r.get("pcg_fused_ms"):
            r["speedup"] = r["eager_unfused_ms"] / r["pcg_fused_ms"]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gemma4lab bench-pcg")
    p.add_argument("--tokens", type=positive_ints, default=TOKENS)
    p.add_argument("--profile-tokens", type=positive_ints, default=(93, 1453))
    p.add_argument("--layers", type=positive_int, default=6)
    p.add_argument("--preset", default="26b-a4b", choices=sorted(PRESETS))
    p.add_argument("--max-tokens", type=positive_int, default=8192)
    p.add_argument("--rep-ms", type=positive_float, default=200.0)
    p.add_argument("--out", type=out_dir, default=Path("results"))
    p.add_argument("--traces", action="store_true", help="also write chrome traces next to the JSON")
    p.add_argument("--device", type=device_arg, default="cuda")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("bench-pcg needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    res = run(args)
    path = measure.write_json(args.out / f"pcg_{measure.card_slug()}.json", res)
    from gemma4lab.lab import report, viz

    viz.save(viz.plot_pcg_bench(measure.read_json(path)), path.with_suffix(".png"))
    print(report.pcg_section(measure.read_json(path), None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
