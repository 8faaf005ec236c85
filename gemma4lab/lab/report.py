"""Markdown tables of the recorded results, for the README: ``python -m gemma4lab.report``.

The README's tables are pasted from this output, and ``tests/test_project.py``-style checks can regenerate them,
so the numbers in prose always come from ``results/*.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gemma4lab.lab.measure import read_json


def prefill_table(path: Path) -> str:
    d = read_json(path)
    if d is None:
        return f"(no {path})"
    env = d["environment"]
    lines = [f"Gemma 4 26B-A4B prefill, batch 1, bf16, random weights — {env['card']}, torch {env['torch']}, "
             f"triton {env['triton']}, transformers {env.get('transformers')}, {env['date_utc'][:10]}",
             "",
             "| tokens | baseline (ours, unfused eager) | fused + PCG | change | speed-up | published change | floor "
             "| fused+PCG / floor | transformers | torch.compile | fused (eager) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    pub = d.get("published_ms", {})
    for t, r in sorted(d["rows"].items(), key=lambda x: int(x[0])):
        e, p = r.get("eager_ms"), r.get("pcg_ms")
        pb = pub.get(t)
        pch = f"{(pb[1] / pb[0] - 1) * 100:+.1f} %" if pb else "—"
        f = lambda x: "—" if x is None else f"{x:.1f} ms"
        lines.append(
            f"| {t} | {f(e)} | {f(p)} | {(p / e - 1) * 100:+.1f} % | {e / p:.2f}× | {pch} | {f(r['floor_ms'])} | "
            f"{p / r['floor_ms']:.2f}× | {f(r.get('hf_ms'))} | {f(r.get('compile_ms'))} | {f(r.get('fused_ms'))} |"
            if e and p else f"| {t} | {f(e)} | {f(p)} | — | — | {pch} | {f(r['floor_ms'])} | — | {f(r.get('hf_ms'))} "
            f"| {f(r.get('compile_ms'))} | {f(r.get('fused_ms'))} |")
    return "\n".join(lines)


def kernels_table(path: Path) -> str:
    d = read_json(path)
    if d is None:
        return f"(no {path})"
    rows = d.get("results") or []
    lines = ["| kernel | T | eager µs | torch.compile µs | ours µs | ours in graph µs | % of copy BW | vs compile |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("tokens") not in (93, 2893, 11533, 32768):
            continue
        us = lambda k: "—" if r.get(k) is None else f"{r[k] * 1e3:.1f}"
        pct = "—" if r.get("triton_frac_copy") is None else f"{100 * r['triton_frac_copy']:.0f}"
        vs = "—" if r.get("speedup_vs_compile") is None else f"{r['speedup_vs_compile']:.2f}×"
        lines.append(f"| {r['kernel']} | {r['tokens']} | {us('eager_ms')} | {us('compile_ms')} | {us('triton_ms')} | "
                     f"{us('graph_ms')} | {pct} | {vs} |")
    return "\n".join(lines)


def attention_table(path: Path) -> str:
    d = read_json(path)
    if d is None:
        return f"(no {path})"
    env = d["environment"]
    lines = [f"Prefill attention, batch 1, bf16, 16 query heads — {env['card']}, torch {env['torch']}, triton "
             f"{env['triton']}, {env['date_utc'][:10]}; bf16 matmul in the same run: {d['matmul_tflops']:.0f} TFLOP/s",
             "",
             "| layer | tokens | ours ms | ours TFLOP/s | FlexAttention TFLOP/s | best SDPA TFLOP/s | ours vs Flex |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in d["rows"]:
        tf = lambda k: "—" if r.get(k) is None else f"{r[k]:.0f}"  # noqa: E731
        vs = f"{r['flex_ms'] / r['triton_ms']:.2f}×" if r.get("flex_ms") and r.get("triton_ms") else "—"
        lines.append(f"| {r['layer']} (head {r['head_dim']}) | {r['tokens']} | {r['triton_ms']:.3f} | "
                     f"{tf('triton_tflops')} | {tf('flex_tflops')} | {tf('sdpa_tflops')} | {vs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    root = Path(argv[0] if argv else (sys.argv[1] if len(sys.argv) > 1 else "results"))
    for p in sorted(root.glob("prefill_*.json")):
        print(prefill_table(p), "\n")
    for p in sorted(root.glob("kernels_*.json")):
        print(kernels_table(p), "\n")
    for p in sorted(root.glob("attention_*.json")):
        print(attention_table(p), "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
