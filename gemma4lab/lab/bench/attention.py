"""Prefill attention for Gemma 4: ``python -m gemma4lab bench-attention``.

Full layers (16 q heads × 512, 2 KV heads, causal) and sliding layers (16 × 256, 8 KV heads, window 1024), batch 1,
bf16, scale 1.0. Our Triton kernel (``gemma4lab.kernels.prefill_attention``) against one FlexAttention call and the best
SDPA backend that runs (a per-prompt boolean mask: cuDNN / efficient on sliding layers, math on head 512), all in
one process on one card, with the dense bf16 matmul rate measured beside them as the roof. TFLOP/s counts visible
query–key pairs only (4·heads·dim each). ``--sweep`` also times a grid of tile shapes at one length. Writes
``results/attention_<card>.json`` and a plot beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from gemma4lab.attention import PackedBatch, flex_attention, flex_block_mask, sdpa_attention
from gemma4lab.kernels import AttentionConfig, attention_config, gemma_prefill_attention
from gemma4lab.lab import measure
from gemma4lab.lab.bench.common import out_dir, positive_float, positive_int, positive_ints

WINDOW = 1024
LAYERS = {"sliding": (256, 8, WINDOW), "full": (512, 2, None)}  # head_dim, kv heads, window
SWEEP = {
    "full": [(64, 32, 8, 1), (64, 32, 8, 2), (64, 64, 8, 1), (64, 16, 8, 2), (64, 16, 4, 2), (32, 32, 4, 2),
             (128, 32, 8, 1), (128, 32, 8, 1, 2), (128, 32, 8, 2, 2), (128, 64, 8, 1, 2), (64, 64, 4, 1, 2),
             (64, 32, 4, 2, 2), (64, 64, 8, 1, 2), (128, 16, 8, 2, 2),
             # TMA (AttentionConfig.tma): one QKᵀ per 64-row tile, both 256-wide output halves in one program
             (64, 32, 8, 2, 1, True), (64, 64, 8, 1, 1, True), (64, 16, 8, 3, 1, True), (128, 32, 8, 1, 1, True)],
    "sliding": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (128, 32, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3),
                (64, 32, 4, 3), (128, 128, 8, 2), (64, 128, 8, 2), (128, 64, 4, 2),
                (128, 64, 8, 2, 1, True), (128, 32, 8, 3, 1, True), (128, 32, 8, 2, 1, True), (64, 64, 4, 3, 1, True)],
}


def visible_pairs(t: int, window: int | None) -> int:
    if window is None:
        return t * (t + 1) // 2
    w = min(window, t)
    return w * (w + 1) // 2 + (t - w) * w


def _inputs(t: int, d: int, hkv: int, dev) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=dev).manual_seed(t)
    return tuple(torch.randn(t, h, d, device=dev, dtype=torch.bfloat16, generator=g) for h in (16, hkv, hkv))


def measure_length(layer: str, t: int, args, dev) -> tuple[dict, list[dict]]:
    """One layer type at one length: our kernel, FlexAttention, masked SDPA (and the tile sweep if asked)."""
    d, hkv, window = LAYERS[layer]
    sliding = window is not None
    q, k, v = _inputs(t, d, hkv, dev)
    cu = torch.tensor([0, t], device=dev, dtype=torch.int32)
    flops = 4 * 16 * d * visible_pairs(t, window)
    row = {"layer": layer, "tokens": t, "head_dim": d, "flops": flops}

    def ours(cfg=None):
        return gemma_prefill_attention(q, k, v, cu, t, window=window, config=cfg)

    got = ours()
    row["triton_ms"] = measure.bench(ours, rep_ms=args.rep_ms)
    batch = PackedBatch.from_lengths([t], dev)
    rows = -(-t // 128) * 128
    padded = [torch.nn.functional.pad(x, (0, 0, 0, 0, 0, rows - t)) for x in (q, k, v)]
    print(f"{layer} at {t} tokens: ours {row['triton_ms']:.3f} ms", flush=True)  # progress: Flex compiles next
    try:
        if t > args.flex_max:
            raise RuntimeError(f"skipped: {t} tokens > --flex-max {args.flex_max}")
        bm = flex_block_mask(batch, sliding, WINDOW, rows)
        row["rel_err_vs_flex"] = measure.rel_err(got, flex_attention(*padded, bm, d)[:t])
        row["flex_ms"] = measure.bench(lambda: flex_attention(*padded, bm, d), rep_ms=args.rep_ms)
    except Exception as e:  # report, do not hide: the row says why Flex has no number
        row["flex_error"] = f"{type(e).__name__}: {e}"[:300]
    if t <= args.sdpa_max:
        row["rel_err_vs_sdpa"] = measure.rel_err(got, sdpa_attention(q, k, v, batch, sliding, WINDOW))
        row["sdpa_ms"] = measure.bench(lambda: sdpa_attention(q, k, v, batch, sliding, WINDOW), rep_ms=args.rep_ms)
    for key in ("triton", "flex", "sdpa"):
        if f"{key}_ms" in row:
            row[f"{key}_tflops"] = flops / (row[f"{key}_ms"] * 1e-3) / 1e12
    print({key: (round(val, 4) if isinstance(val, float) else val) for key, val in row.items()}, flush=True)
    sweep = []
    if args.sweep and t == args.sweep_tokens:
        for shape in SWEEP[layer]:
            cfg = AttentionConfig(*shape)
            rec = {"layer": layer, "tokens": t, **dataclasses.asdict(cfg)}
            try:
                rec["rel_diff_vs_default"] = measure.rel_err(ours(cfg), got)
                rec["ms"] = measure.bench(lambda: ours(cfg), rep_ms=args.rep_ms)  # noqa: B023 (called right here)
                rec["tflops"] = flops / (rec["ms"] * 1e-3) / 1e12
            except Exception as e:  # e.g. out of shared memory: part of what the sweep learns
                rec["error"] = f"{type(e).__name__}: {e}"[:200]
            sweep.append(rec)
            print("  sweep", rec, flush=True)
    return row, sweep


def best_swept(sweep: list[dict], layer: str) -> AttentionConfig | None:
    """The fastest setting the sweep timed for one layer type (None if it timed none)."""
    timed = [r for r in sweep if r["layer"] == layer and r.get("ms")]
    if not timed:
        return None
    best = min(timed, key=lambda r: r["ms"])
    return AttentionConfig(**{f.name: best[f.name] for f in dataclasses.fields(AttentionConfig) if f.name in best})


def end_to_end(sweep: list[dict], args, dev) -> dict:
    """The sweep's effect on a whole prefill: a full-width model of ``--e2e-layers`` layers (the real sliding/full
    pattern, random weights, fused kernels, eager) prefills ``--e2e-tokens`` tokens under the default tiles and under
    each layer type's fastest swept tiles (`kernels.attention_configs`), in this process; both outputs must agree
    to bf16 attention's rounding."""
    from gemma4lab import Fusion
    from gemma4lab.kernels import attention_configs
    from gemma4lab.lab.bench.common import random_prompt
    from gemma4lab.model.config import Gemma4Config
    from gemma4lab.model.loading import random_init

    cfg = Gemma4Config.preset("26b-a4b").replace_text(num_hidden_layers=args.e2e_layers)
    model = random_init(cfg, dtype=torch.bfloat16, device=dev, seed=0)
    model.set_fusion(Fusion.all()).set_attention_backend("triton")
    prompt = [random_prompt(args.e2e_tokens, cfg.text.vocab_size, seed=1, device=dev)]
    best = {"full": best_swept(sweep, "full"), "sliding": best_swept(sweep, "sliding")}
    res = {"tokens": args.e2e_tokens, "layers": args.e2e_layers,
           "full_layers": sum(not cfg.text.is_sliding(i) for i in range(args.e2e_layers)),
           "best": {k: dataclasses.asdict(v) if v else None for k, v in best.items()}}
    default_out = model.prefill(prompt).float()
    res["default"] = measure.time_stats(lambda: model.prefill(prompt), rep_ms=args.rep_ms)
    with attention_configs(full=best["full"], sliding=best["sliding"]):
        res["rel_diff"] = measure.rel_err(model.prefill(prompt).float(), default_out)
        res["swept_best"] = measure.time_stats(lambda: model.prefill(prompt), rep_ms=args.rep_ms)
    res["speedup"] = res["default"]["median_ms"] / res["swept_best"]["median_ms"]
    print(f"end to end, {args.e2e_layers} layers at {args.e2e_tokens} tokens: default tiles "
          f"{res['default']['median_ms']:.1f} ms, the sweep's best {res['swept_best']['median_ms']:.1f} ms "
          f"({res['speedup']:.3f}x; logits differ by {res['rel_diff']:.1e})", flush=True)
    return res


def run(args) -> dict:
    dev = torch.device("cuda")
    out: dict = {"benchmark": "attention", "rows": [], "sweep": [],
                 "matmul_tflops": measure.matmul_rate(dev) / 1e12, "window": WINDOW}
    print(f"bf16 8192³ matmul: {out['matmul_tflops']:.0f} TFLOP/s", flush=True)
    for layer in args.layers:
        d, _, window = LAYERS[layer]
        out[f"config_{layer}"] = dataclasses.asdict(attention_config(d, torch.bfloat16, window is not None))
        for t in args.tokens:
            row, sweep = measure_length(layer, t, args, dev)
            out["rows"].append(row)
            out["sweep"] += sweep
            torch.cuda.empty_cache()
            if args.path is not None:  # after every length: a run cut short still leaves what it measured
                measure.write_json(args.path, {**out, "complete": False})
    if args.sweep and args.e2e_layers:
        try:
            out["end_to_end"] = end_to_end(out["sweep"], args, dev)
        except Exception as e:  # noqa: BLE001 — recorded, not hidden: the sweep above stays in the file
            out["end_to_end_error"] = f"{type(e).__name__}: {e}"[:300]
            print("end to end failed:", out["end_to_end_error"], flush=True)
    out["complete"] = True
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gemma4lab bench-attention")
    p.add_argument("--tokens", type=positive_ints, default=(1453, 2893, 5773, 11533, 32768))
    p.add_argument("--layers", type=lambda s: tuple(s.split(",")), default=("full", "sliding"))
    p.add_argument("--sdpa-max", type=positive_int, default=8192,
                   help="SDPA's explicit mask is O(T²): skip it above this")
    p.add_argument("--flex-max", type=positive_int, default=1 << 20,
                   help="FlexAttention (compiled by inductor on first use, minutes on a cold machine): skip it above "
                        "this many tokens")
    p.add_argument("--sweep", action="store_true", help="also time a grid of tile shapes at --sweep-tokens")
    p.add_argument("--sweep-tokens", type=positive_int, default=11533)
    p.add_argument("--e2e-layers", type=int, default=6,
                   help="with --sweep: prefill a full-width model of this many layers under the default and the "
                        "sweep's best tiles (0: skip)")
    p.add_argument("--e2e-tokens", type=positive_int, default=11533)
    p.add_argument("--rep-ms", type=positive_float, default=200.0)
    p.add_argument("--out", type=out_dir, default=Path("results"))
    args = p.parse_args(argv)
    if args.e2e_layers < 0:
        p.error(f"--e2e-layers must be >= 0 (0 skips the end-to-end prefill), got {args.e2e_layers}")
    bad = set(args.layers) - set(LAYERS)
    if bad:
        p.error(f"unknown layer type(s) {sorted(bad)}; choose from {sorted(LAYERS)}")
    if not torch.cuda.is_available():
        p.error("bench-attention needs a CUDA GPU")
    args.path = args.out / f"attention_{measure.card_slug()}.json"
    path = measure.write_json(args.path, run(args))
    from gemma4lab.lab import viz

    doc = measure.read_json(path)
    viz.save(viz.plot_attention(doc["rows"], viz.env_label(doc), doc.get("matmul_tflops")), path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
