"""Attention options for Gemma 4 prefill: ``python -m gemma4lab bench-attention``.

Full layers (16 q heads × 512, 2 KV heads, causal) and sliding layers (16 × 256, 8 KV heads, window 1024), batch 1,
bf16, scale 1.0: our per-prompt masked SDPA backend against one FlexAttention call. TFLOP/s counts visible
query–key pairs only (4·heads·dim each). Writes ``results/attention_<card>.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gemma4lab import measure
from gemma4lab.attention import PackedBatch, flex_attention, flex_block_mask, sdpa_attention


def run(args) -> dict:
    dev = torch.device("cuda")
    out = {"benchmark": "attention", "rows": []}
    for sliding, d, hkv in ((True, 256, 8), (False, 512, 2)):
        for t in args.tokens:
            q = torch.randn(t, 16, d, device=dev, dtype=torch.bfloat16)
            k = torch.randn(t, hkv, d, device=dev, dtype=torch.bfloat16)
            v = torch.randn(t, hkv, d, device=dev, dtype=torch.bfloat16)
            batch = PackedBatch.from_lengths([t], dev)
            w = 1024
            pairs = sum(min(i + 1, w) for i in range(t)) if sliding else t * (t + 1) / 2
            flops = 4 * 16 * d * pairs
            row = {"layer": "sliding" if sliding else "full", "tokens": t, "head_dim": d, "flops": flops}
            ref = sdpa_attention(q, k, v, batch, sliding, w)
            if t <= 8192:
                row["sdpa_ms"] = measure.bench(lambda: sdpa_attention(q, k, v, batch, sliding, w), rep_ms=200)
            rows = -(-t // 128) * 128
            bm = flex_block_mask(batch, sliding, w, rows)
            pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, 0, 0, rows - t))
            qp, kp, vp = pad(q), pad(k), pad(v)
            try:
                got = flex_attention(qp, kp, vp, bm, d)[:t]
                row["flex_max_abs_vs_sdpa"] = (got.float() - ref.float()).abs().max().item()
                row["flex_ms"] = measure.bench(lambda: flex_attention(qp, kp, vp, bm, d), rep_ms=200)
                row["block_mask_ms"] = measure.bench(lambda: flex_block_mask(batch, sliding, w, rows), rep_ms=100)
            except Exception as e:
                row["flex_error"] = f"{type(e).__name__}: {e}"[:300]
            for key in ("sdpa_ms", "flex_ms"):
                if key in row:
                    row[key.replace("_ms", "_tflops")] = flops / (row[key] * 1e-3) / 1e12
            out["rows"].append(row)
            print(row, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gemma4lab bench-attention")
    p.add_argument("--tokens", type=lambda s: tuple(int(x) for x in s.split(",")), default=(93, 1453, 2893, 11533))
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("bench-attention needs a CUDA GPU")
    measure.write_json(args.out / f"attention_{measure.card_slug()}.json", run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
