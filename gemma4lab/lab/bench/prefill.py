"""Full-size Gemma 4 26B-A4B prefill: ``python -m gemma4lab bench-prefill``.

Builds the real shapes with random bf16 weights straight on the GPU, then times batch-1 prefill at the published
token counts for: our unfused eager model (the baseline), our fused kernels, fused + piecewise CUDA graphs,
transformers' Gemma 4 on the *same* weight tensors, and ``torch.compile`` of our unfused model. Beside them: the
floors measured in the same run (weight bytes / copy bandwidth, FLOPs / bf16 matmul rate), one image prompt
(a real photo through the processor), the decoder layer alone (latency and kernel launches), and the bf16
logits of ours against transformers'. Everything lands in ``results/prefill_<card>.json`` and a plot.

Parts can run in separate processes (``--parts eager,fused`` then ``--parts hf --merge``) to fit time limits.
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from gemma4lab.lab import measure
from gemma4lab.lab.bench.common import active_flops_per_token, fmt_ms, hf_twin, random_prompt, text_weight_bytes
from gemma4lab.model.config import Gemma4Config
from gemma4lab.model.loading import random_init
from gemma4lab.runtime.fusion import Fusion

TOKENS = (93, 189, 1453, 2893, 5773, 11533)
PUBLISHED = {  # sglang PR #24048 (GPU not stated): baseline, fused + PCG in ms
    93: (35.6, 16.5), 189: (35.4, 17.1), 1453: (36.3, 25.1), 2893: (40.6, 30.6), 5773: (49.0, 41.6),
    11533: (70.0, 66.4),
}
PARTS = ("eager", "fused", "pcg", "hf", "compile", "image", "layer", "accuracy")


def _time(fn, rep_ms: float) -> float:
    fn()
    torch.cuda.synchronize()
    return measure.bench(fn, warmup_ms=rep_ms / 4, rep_ms=rep_ms)


def _try(out: dict, key: str, fn):
    try:
        out[key] = fn()
    except Exception as e:  # a failing configuration is recorded, not fatal
        out.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"[:500]
        traceback.print_exc()


def run(args: argparse.Namespace) -> dict[str, Any]:
    dev = torch.device(args.device)
    cfg = Gemma4Config.preset(args.preset)
    if args.layers:
        cfg = cfg.replace_text(num_hidden_layers=args.layers)
    acc = None
    if "accuracy" in args.parts:  # its own fp32 model: run it before the bf16 one takes the memory
        with torch.no_grad():
            acc = accuracy(cfg, dev)
        print("accuracy:", acc, flush=True)
        if set(args.parts) == {"accuracy"}:
            return {"benchmark": "prefill", "accuracy": acc, "rows": {}, "parts": ["accuracy"]}
    t0 = time.perf_counter()
    model = random_init(cfg, dtype=torch.bfloat16, device=dev, seed=0)
    build_s = time.perf_counter() - t0
    model.set_attention_backend(args.attention)
    lm = model.language_model
    copy_bw = measure.copy_bandwidth(dev)
    mm_rate = measure.matmul_rate(dev)
    wbytes = text_weight_bytes(model)
    res: dict[str, Any] = {
        "benchmark": "prefill", "preset": args.preset, "layers": cfg.text.num_hidden_layers,
        "attention_backend": args.attention, "build_s": build_s,
        "copy_bandwidth_Bps": copy_bw, "matmul_flops": mm_rate, "text_weight_bytes": wbytes,
        "published_ms": {str(k): v for k, v in PUBLISHED.items()}, "rows": {}, "parts": list(args.parts),
    }
    if acc is not None:
        res["accuracy"] = acc
    rows = res["rows"]
    for t in args.tokens:
        flops = active_flops_per_token(cfg, t)
        rows[str(t)] = {"tokens": t, "flops": flops, "weight_floor_ms": wbytes / copy_bw * 1e3,
                        "compute_floor_ms": flops / mm_rate * 1e3}
        rows[str(t)]["floor_ms"] = max(rows[str(t)]["weight_floor_ms"], rows[str(t)]["compute_floor_ms"])
    prompts = {t: [random_prompt(t, cfg.text.vocab_size, seed=t, device=dev)] for t in args.tokens}

    def time_all(key: str, fn_for):
        for t in args.tokens:
            fn = fn_for(t)
            if fn is None:
                continue
            _try(rows[str(t)], key, lambda fn=fn: _time(fn, args.rep_ms))
            print(f"{key:>8} T={t:>6}: {fmt_ms(rows[str(t)].get(key))} ms", flush=True)

    with torch.no_grad():
        if "eager" in args.parts:
            model.set_fusion(Fusion.none())
            time_all("eager_ms", lambda t: lambda: model.prefill(prompts[t]))
        if "fused" in args.parts:
            model.set_fusion(Fusion.all())
            time_all("fused_ms", lambda t: lambda: model.prefill(prompts[t]))
        if "pcg" in args.parts:
            from gemma4lab.runtime.pcg import PiecewiseCudaGraphRunner

            model.set_fusion(Fusion.all())
            runner = PiecewiseCudaGraphRunner(model, max_tokens=args.max_tokens, progress=False)
            report = runner.capture()
            res["pcg_capture"] = {"capture_s": report.capture_s, "graph_pool_bytes": report.graph_pool_bytes,
                                  "static_buffer_bytes": report.static_buffer_bytes, "buckets": report.buckets,
                                  "pieces_per_bucket": report.pieces_per_bucket}
            print(report, flush=True)
            time_all("pcg_ms", lambda t: lambda: runner.prefill(prompts[t]))
            for t in args.tokens:
                rows[str(t)]["pcg_bucket"] = runner.bucket_for(t)
                if t <= 2893:  # bit-identity check of PCG against the same fused model, eager
                    _try(rows[str(t)], "pcg_vs_eager_max_abs",
                         lambda t=t: (runner.prefill(prompts[t]).float() - model.prefill(prompts[t]).float())
                         .abs().max().item())
            res["pcg_stats"] = dict(runner.stats)
            if "image" in args.parts:
                _try(res, "image", lambda: _image_prompt(model, runner, args))
            del runner
            gc.collect()
            torch.cuda.empty_cache()
        if "layer" in args.parts:
            _try(res, "layer", lambda: _layer_alone(model, args))
        if "hf" in args.parts:
            hf = hf_twin(model)
            time_all("hf_ms", lambda t: lambda: hf(input_ids=prompts[t][0][None], use_cache=False,
                                                      logits_to_keep=1))
            if "layer" in args.parts and "layer" in res:
                _try(res["layer"], "hf", lambda: _hf_layer(hf, model, args))
            del hf
            gc.collect()
        if "compile" in args.parts:
            # What users try next: torch.compile (Inductor, default mode) of our unfused model. Compiled
            # piecewise like vLLM does — every layer's pre- and post-attention code, attention left eager — with
            # dynamic shapes, so one compilation serves every prompt length and all layers share the code.
            from gemma4lab.attention import _raise_recompile_limit

            _raise_recompile_limit(256)
            model.set_fusion(Fusion.none())
            for layer in lm.layers:
                layer.pre_attention = torch.compile(layer.pre_attention, dynamic=True)
                layer.post_attention = torch.compile(layer.post_attention, dynamic=True)
            res["compile_mode"] = "torch.compile(default, dynamic=True) of each layer's pre/post-attention pieces"

            def make(t):
                t1 = time.perf_counter()
                try:
                    model.prefill(prompts[t])
                    torch.cuda.synchronize()
                except Exception as e:
                    rows[str(t)].setdefault("errors", {})["compile_ms"] = f"{type(e).__name__}: {e}"[:300]
                    traceback.print_exc()
                    return None
                rows[str(t)]["compile_first_call_s"] = time.perf_counter() - t1
                return lambda: model.prefill(prompts[t])

            time_all("compile_ms", make)
    for t in args.tokens:
        r = rows[str(t)]
        for k in ("eager_ms", "fused_ms", "pcg_ms", "hf_ms", "compile_ms"):
            if r.get(k):
                r[k.replace("_ms", "_x_floor")] = r[k] / r["floor_ms"]
        if r.get("eager_ms") and r.get("pcg_ms"):
            r["speedup_pcg_vs_eager"] = r["eager_ms"] / r["pcg_ms"]
    return res


def _image_prompt(model, runner, args) -> dict:
    """A real photo (matplotlib's bundled Grace Hopper portrait) + text, eager vs PCG."""
    import matplotlib.cbook as cbook
    from PIL import Image

    from gemma4lab.model.processor import Gemma4Processor

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        img = Image.open(f).convert("RGB")
    cfg = model.config
    proc = Gemma4Processor(cfg)
    text = random_prompt(40, cfg.text.vocab_size, seed=7, device="cpu").tolist()
    batch = proc(input_ids=[cfg.text.bos_token_id] + text[:20] + [cfg.image_token_id] + text[20:], images=[img])
    batch = {k: v.to(model.device) for k, v in batch.items()}
    n = batch["input_ids"].shape[1]
    ids = [batch["input_ids"][0]]
    mm = [batch["mm_token_type_ids"][0]]
    pv, ip = batch["pixel_values"], batch["image_position_ids"]
    eager = lambda: model.prefill(ids, pv, ip, mm)
    pcg = lambda: runner.prefill(ids, pv, ip, mm)
    vision = lambda: model.image_features(pv, ip)
    out = {"tokens": n, "image_size": list(img.size), "soft_tokens": int((batch["input_ids"] == cfg.image_token_id)
                                                                          .sum()),
           "eager_fused_ms": _time(eager, args.rep_ms), "pcg_ms": _time(pcg, args.rep_ms),
           "vision_tower_ms": _time(vision, args.rep_ms),
           "pcg_vs_eager_max_abs": (pcg().float() - eager().float()).abs().max().item()}
    model.set_fusion(Fusion.none())
    out["eager_unfused_ms"] = _time(eager, args.rep_ms)
    model.set_fusion(Fusion.all())
    return out


def _layer_alone(model, args) -> dict:
    """One full-size MoE decoder layer (a sliding one), T = 93 and 2893: latency and kernel launches."""
    from gemma4lab.attention import PackedBatch
    from gemma4lab.lab.profiling import profile_forward

    lm = model.language_model
    out: dict[str, Any] = {}
    for t in (93, 2893):
        batch = PackedBatch.from_lengths([t], model.device)
        ctx = lm.make_context(batch)
        h = torch.randn(t, lm.config.hidden_size, device=model.device, dtype=model.dtype)
        layer = lm.layers[0]
        cos, sin = ctx.cos_sin[True]
        entry = {}
        for name, fusion in (("unfused", Fusion.none()), ("fused", Fusion.all())):
            def fwd(fusion=fusion):
                q, k, v = layer.pre_attention(h, None, cos, sin, fusion)
                o = lm.attend(0, q, k, v, ctx)
                return layer.post_attention(o, h, lm.next_norm_weight(0), fusion)
            entry[f"{name}_ms"] = _time(fwd, args.rep_ms)
            prof = profile_forward(fwd)
            entry[f"{name}_launches"] = prof["kernels"]
            entry[f"{name}_top_kernels"] = prof["top_kernels"][:15]
            entry[f"{name}_cpu_dispatch_ms"] = prof["cpu_dispatch_ms"]
            entry[f"{name}_gpu_busy_ms"] = prof["gpu_busy_ms"]
        out[str(t)] = entry
    return out


def _hf_layer(hf, model, args) -> dict:
    from gemma4lab.lab.profiling import profile_forward

    out = {}
    layer = hf.model.language_model.layers[0]
    rot = hf.model.language_model.rotary_emb
    for t in (93, 2893):
        h = torch.randn(1, t, model.config.text.hidden_size, device=model.device, dtype=model.dtype)
        pos = torch.arange(t, device=model.device)[None]
        pe = rot(h, pos, "sliding_attention")
        from transformers.masking_utils import create_sliding_window_causal_mask

        mask = create_sliding_window_causal_mask(config=hf.config.text_config, inputs_embeds=h, attention_mask=None,
                                                 past_key_values=None, position_ids=pos)
        fwd = lambda h=h, pe=pe, mask=mask: layer(h, None, shared_kv_states={}, position_embeddings=pe,
                                                  attention_mask=mask, position_ids=pos)
        prof = profile_forward(fwd)
        out[str(t)] = {"ms": _time(fwd, args.rep_ms), "launches": prof["kernels"],
                       "top_kernels": prof["top_kernels"][:15]}
    return out


def accuracy(cfg: Gemma4Config, device: torch.device, n_tokens: int = 64) -> dict:
    """bf16 accuracy at full width, standing in for the published MMMU check (no real weights here).

    Random weights make a deep MoE chaotic in bf16 (one rounding flips a top-k choice and the difference grows
    layer by layer), so bf16 is judged against the fp32 truth on the *same* weights, next to transformers' own
    bf16 run: ours should be no further from the truth than the reference implementation is. The fp32 model is
    built first (as deep as memory allows), then cast to bf16 in place, so both runs see identical weights.
    """
    free, _ = torch.cuda.mem_get_info(device)
    per_layer = 2 * 1.70e9  # bytes of one 26B-A4B layer in fp32
    fixed = 2 * 2.4e9  # embeddings/head + vision tower in fp32
    layers = max(1, min(cfg.text.num_hidden_layers, int((0.85 * free - fixed) // per_layer)))
    if layers < cfg.text.num_hidden_layers:
        cfg = cfg.replace_text(num_hidden_layers=layers)
    cfg = Gemma4Config(text=cfg.text, vision=None)
    m = random_init(cfg, dtype=torch.float32, device=device, seed=3)
    ids = random_prompt(n_tokens, cfg.text.vocab_size, seed=11, device=device)
    m.set_attention_backend("sdpa")
    truth = m.prefill([ids], all_logits=True).float()
    for p in list(m.parameters()) + [b for n, b in m.named_buffers() if "inv_freq" not in n and b.is_floating_point()]:
        p.data = p.data.to(torch.bfloat16)
    m.set_attention_backend("auto")
    rel = lambda x: measure.rel_err(x, truth)
    agree = lambda x: (x.argmax(-1) == truth.argmax(-1)).float().mean().item()
    out: dict[str, Any] = {"layers": layers, "tokens": n_tokens}
    for name, fusion in (("ours_unfused", Fusion.none()), ("ours_fused", Fusion.all())):
        m.set_fusion(fusion)
        got = m.prefill([ids], all_logits=True).float()
        out[f"{name}_rel_err_vs_fp32"] = rel(got)
        out[f"{name}_top1_agree_vs_fp32"] = agree(got)
    hf = hf_twin(m)
    theirs = hf(input_ids=ids[None], use_cache=False).logits[0].float()
    out["transformers_bf16_rel_err_vs_fp32"] = rel(theirs)
    out["transformers_bf16_top1_agree_vs_fp32"] = agree(theirs)
    out["ratio_fused_to_transformers"] = out["ours_fused_rel_err_vs_fp32"] / out["transformers_bf16_rel_err_vs_fp32"]
    del m, hf
    gc.collect()
    torch.cuda.empty_cache()
    return out


def table(res: dict) -> str:
    lines = ["tokens | floor | eager (baseline) | fused | fused+PCG | change | transformers | compile"]
    for r in res["rows"].values():
        e, p = r.get("eager_ms"), r.get("pcg_ms")
        ch = f"{(p / e - 1) * 100:+.1f}%" if e and p else "—"
        lines.append(f"{r['tokens']:>6} | {fmt_ms(r['floor_ms'])} | {fmt_ms(e)} | {fmt_ms(r.get('fused_ms'))} | "
                     f"{fmt_ms(p)} | {ch} | {fmt_ms(r.get('hf_ms'))} | {fmt_ms(r.get('compile_ms'))}")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(res["rows"].values(), key=lambda r: r["tokens"])
    ts = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label in (("eager_ms", "ours, unfused eager"), ("fused_ms", "ours, fused"),
                       ("pcg_ms", "ours, fused + PCG"), ("hf_ms", "transformers"),
                       ("compile_ms", "torch.compile (ours)"), ("floor_ms", "floor")):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            ax.plot(ts, [y if y is not None else float("nan") for y in ys], marker="o", label=label,
                    linestyle="--" if key == "floor_ms" else "-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens (batch 1)")
    ax.set_ylabel("prefill latency (ms)")
    env = res.get("environment", {})
    ax.set_title(f"Gemma 4 26B-A4B prefill — {env.get('card', '?')}, {env.get('date_utc', '')[:10]}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


_FLOOR_KEYS = ("weight_floor_ms", "compute_floor_ms", "floor_ms", "flops")
_RUN_KEYS = ("copy_bandwidth_Bps", "matmul_flops", "environment", "build_s")


def _merge(old: dict | None, new: dict) -> dict:
    """Add a later run's parts to a result file. The first run's floors stay the reference; the later run's own
    floors and environment are kept beside its numbers under ``merged_runs`` (same card, measured again)."""
    if not old:
        return new
    out = dict(old)
    out.setdefault("merged_runs", []).append({"parts": new.get("parts"), **{k: new.get(k) for k in _RUN_KEYS},
                                              "floors": {t: {k: r.get(k) for k in _FLOOR_KEYS}
                                                         for t, r in new.get("rows", {}).items()}})
    for k, v in new.items():
        if k == "rows":
            rows = dict(old.get("rows", {}))
            for t, r in v.items():
                keep = {k2: r2 for k2, r2 in r.items() if k2 not in _FLOOR_KEYS or t not in rows}
                rows[t] = {**rows.get(t, {}), **keep}
            out["rows"] = rows
        elif k == "parts":
            out["parts"] = sorted(set(old.get("parts", [])) | set(v))
        elif k not in _RUN_KEYS:
            out[k] = v
    return out


def merge_files(base: Path, later: Path, out: Path) -> Path:
    """Merge two result files of this benchmark (e.g. a compile run made in a second process) into ``out``."""
    doc = _merge(measure.read_json(base), measure.read_json(later))
    doc.pop("producer", None)
    path = measure.write_json(out, doc, overwrite=True)
    plot(measure.read_json(path), path.with_suffix(".png"))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gemma4lab bench-prefill", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=lambda s: tuple(int(x) for x in s.split(",")), default=TOKENS)
    p.add_argument("--parts", type=lambda s: tuple(s.split(",")), default=PARTS)
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--layers", type=int, default=0, help="reduce depth (0 = the preset's)")
    p.add_argument("--attention", default="auto", choices=["auto", "triton", "sdpa", "flex"])
    p.add_argument("--max-tokens", type=int, default=8192, help="largest PCG bucket")
    p.add_argument("--rep-ms", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--merge", action="store_true", help="merge into an existing result file")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    bad = set(args.parts) - set(PARTS)
    if bad:
        p.error(f"unknown parts {sorted(bad)}; choose from {PARTS}")
    if not torch.cuda.is_available():
        p.error("bench-prefill needs a CUDA GPU (the full-size model is ~50 GB)")
    res = run(args)
    path = args.out / f"prefill_{measure.card_slug()}.json"
    if args.merge:
        res = _merge(measure.read_json(path), res)
    measure.write_json(path, res, overwrite=False)
    plot(measure.read_json(path), path.with_suffix(".png"))
    print(table(measure.read_json(path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
