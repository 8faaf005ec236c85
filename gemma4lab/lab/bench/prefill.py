"""Full-size Gemma 4 26B-A4B prefill against fair peers: ``python -m gemma4lab bench-prefill``.

One process, one card, one set of random bf16 weights at the real shapes (generated on the GPU):

* **ours**: unfused eager (our baseline), fused eager, fused + piecewise CUDA graphs;
* **peers**, each in its best supported configuration on the *same* weight tensors: transformers'
  ``Gemma4ForConditionalGeneration`` as ``from_pretrained`` sets it up (``grouped_mm`` experts, SDPA attention), and
  ``torch.compile`` of that model (``mode="default", dynamic=True``; ``reduce-overhead`` too with ``--parts``);
* **floors** measured in the same run: the weight bytes a prefill must read (non-expert weights plus the experts the
  routing actually hit) over the device-to-device copy bandwidth, and the matmul FLOPs over the bf16 matmul rate;
  beside it the op-level floor, op by op, per family (``gemma4lab.lab.floors``);
* **GPU time by family** (``--parts families``): one profiled PCG and one fused eager prefill per token count, their
  kernels' time per family (expert GEMM, dense GEMM, attention, routing, row kernels, other) and idle time, each
  family beside its op-level floor;
* **routing**: uniform (what random router weights give) and Zipf-skewed (what trained routers look like;
  ``gemma4lab.lab.routing``), with the experts each one actually hit;
* **accuracy that can fail**: fp32 parity with transformers at full width and 1/2/6 layers against a float64 truth,
  and the teacher-forced bf16 error of every one of the 30 layers (``gemma4lab.lab.accuracy``).

Every timing carries its spread (min / 20 % / median / 80 % / max over >= 3 runs), its ratio to the floor and its
first-call time (compile, capture or Triton JIT). Everything lands in ``results/prefill_<card>.json`` and a plot;
``python -m gemma4lab.lab.report`` turns it into the README's tables.
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gemma4lab.lab import measure
from gemma4lab.lab.bench.common import (
    device_arg,
    fmt_ms,
    hf_experts_implementation,
    hf_twin,
    out_dir,
    positive_float,
    positive_int,
    positive_ints,
    random_prompt,
)
from gemma4lab.lab.floors import FAMILIES, floors, text_weight_bytes
from gemma4lab.lab.report import prefill_table
from gemma4lab.model.config import PRESETS, Gemma4Config
from gemma4lab.model.loading import random_init
from gemma4lab.model.processor import SUPPORTED_SOFT_TOKENS
from gemma4lab.runtime.fusion import Fusion

TOKENS = (93, 189, 1453, 2893, 5773, 11533)
PUBLISHED = {  # sglang PR #24048 (GPU not stated): baseline, fused + PCG in ms
    93: (35.6, 16.5), 189: (35.4, 17.1), 1453: (36.3, 25.1), 2893: (40.6, 30.6), 5773: (49.0, 41.6),
    11533: (70.0, 66.4),
}
#: column key -> exactly what it ran, recorded in the results file (the report's and the plot's short labels:
#: ``gemma4lab.lab.report.PREFILL_COLUMNS``)
COLUMNS = {
    "eager": "ours, unfused eager",
    "fused": "ours, fused eager",
    "pcg": "ours, fused + PCG",
    "hf": "transformers (grouped_mm, sdpa)",
    "hf_compile": "torch.compile of transformers (default, dynamic)",
    "hf_compile_ro": "torch.compile of transformers (reduce-overhead)",
    "compile_fused": "torch.compile of ours, fused (fullgraph, dynamic)",
    "compile_pieces": "torch.compile of ours, fused, per piece between attention calls (reduce-overhead)",
    "hf_patched": "transformers patched in place (gemma4lab.patch_transformers, fused)",
    "hf_patched_pcg": "transformers patched in place, fused + PCG",
    "pcg_fp8": "ours, fused + PCG, FP8 (e4m3) experts",
    "pcg_fp8a8": "ours, fused + PCG, FP8 (e4m3) experts and FP8 activations into them",
}
#: prompt lengths beyond the table's that the compiled fused model must serve without recompiling for each
EXTRA_COMPILE_TOKENS = (17, 500, 777, 4099)
PEERS = ("hf", "hf_compile", "hf_compile_ro")
PARTS = ("accuracy", "eager", "fused", "pcg", "hf", "hf_patched", "hf_patched_pcg", "hf_compile", "hf_compile_ro",
         "compile_fused", "compile_pieces", "skew", "image", "vision", "layer", "families", "fp8")
DEFAULT_PARTS = PARTS  # a full run measures everything; --parts picks a subset
SKEW_PARTS = ("fused", "pcg", "hf")  # measured again at skewed routing (compiling the biased twin again is not)


def _try(out: dict, key: str, fn: Callable[[], Any]) -> Any:
    try:
        out[key] = fn()
        return out[key]
    except Exception as e:  # a failing configuration is recorded, not fatal
        out.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"[:500]
        traceback.print_exc()
        return None


def _timed(row: dict, col: str, make: Callable[[], Callable[[], Any]], rep_ms: float) -> None:
    """Time column ``col`` into ``row``: the first call (compile / capture / JIT included) and the spread."""
    def go() -> dict:
        t0 = time.perf_counter()
        fn = make()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        return {**measure.time_stats(fn, warmup_ms=rep_ms / 4, rep_ms=rep_ms, warm=True), "first_call_s": first}

    stats = _try(row, f"{col}_stats", go)
    if stats is not None:
        row[f"{col}_ms"] = stats["median_ms"]
        row[f"{col}_x_floor"] = stats["median_ms"] / row["floor_ms"]
        row[f"{col}_x_op_floor"] = stats["median_ms"] / row["op_floor_ms"]
    print(f"{col:>14} T={row['tokens']:>6}: {fmt_ms(row.get(f'{col}_ms'))} ms", flush=True)


def _families(row: dict, fn: Callable[[], Any], latency_ms: float | None) -> dict:
    """GPU time by family of one profiled call of ``fn`` beside the row's op-level floor of each family; idle time
    against ``latency_ms`` (the column's timed median) when it was timed, else against the profiled call."""
    from gemma4lab.lab.profiling import time_by_family

    prof = time_by_family(fn, wall_ms=latency_ms)
    floor = row["op_floor_by_family_ms"]
    return {**{f: {"gpu_ms": prof["families_ms"][f], "floor_ms": floor[f]} for f in FAMILIES},
            **{k: prof[k] for k in ("idle_ms", "wall_ms", "busy_ms", "source", "wall_source", "gaps")},
            "op_floor_ms": row["op_floor_ms"]}


def _derived(rows: dict[str, dict]) -> None:
    """Best peer per row and our speed-ups against it and against our own baseline."""
    for r in rows.values():
        peers = {c: r[f"{c}_ms"] for c in PEERS if r.get(f"{c}_ms")}
        if peers:
            best = min(peers, key=peers.get)
            r["best_peer"], r["best_peer_ms"] = best, peers[best]
            if r.get("pcg_ms"):
                r["speedup_vs_best_peer"] = peers[best] / r["pcg_ms"]
        if r.get("eager_ms") and r.get("pcg_ms"):
            r["speedup_vs_unfused"] = r["eager_ms"] / r["pcg_ms"]


def _time_columns(model, rows: dict, prompts: dict, parts: tuple, args, res: dict, tag: str) -> None:
    """Ours (eager, fused, PCG) and transformers eager at each token count, at the model's current routing."""
    from gemma4lab.runtime.pcg import PiecewiseCudaGraphRunner

    for col, fusion in (("eager", Fusion.none()), ("fused", Fusion.all())):
        if col in parts:
            model.set_fusion(fusion)
            for t in args.tokens:
                _timed(rows[str(t)], col, lambda t=t: lambda: model.prefill(prompts[t]), args.rep_ms)
    if "pcg" in parts or "families" in parts:
        model.set_fusion(Fusion.all())
        runner = PiecewiseCudaGraphRunner(model, max_tokens=args.max_tokens, progress=False)
        report = runner.capture()
        res[f"pcg_capture{tag}"] = {"capture_s": report.capture_s, "graph_pool_bytes": report.graph_pool_bytes,
                                    "static_buffer_bytes": report.static_buffer_bytes,
                                    "buckets": len(report.buckets), "max_tokens": runner.max_tokens,
                                    "pieces_per_bucket": report.pieces_per_bucket}
        print(report, flush=True)
        for t in args.tokens if "pcg" in parts else ():
            r = rows[str(t)]
            _timed(r, "pcg", lambda t=t: lambda: runner.prefill(prompts[t]), args.rep_ms)
            r["pcg_bucket"] = runner.bucket_for(t)  # None: above the largest bucket (chunks through the graphs)
            if t <= args.max_tokens:
                _try(r, "pcg_vs_eager_max_abs", lambda t=t: (runner.prefill(prompts[t]).float()
                                                              - model.prefill(prompts[t]).float()).abs().max().item())
        for t in args.tokens if "families" in parts else ():
            r = rows[str(t)]
            _try(r, "families", lambda t=t, r=r: _families(r, lambda: runner.prefill(prompts[t]), r.get("pcg_ms")))
            _try(r, "families_fused", lambda t=t, r=r: _families(r, lambda: model.prefill(prompts[t]),
                                                                 r.get("fused_ms")))
        res[f"pcg_stats{tag}"] = dict(runner.stats)
        if "image" in parts and "pcg" in parts:
            _try(res, f"image{tag}", lambda: _image_prompt(model, runner, args))
        del runner
        measure.release_memory()
    if "hf" in parts:
        hf = hf_twin(model)
        res[f"hf_experts_implementation{tag}"] = hf_experts_implementation(hf)
        for t in args.tokens:
            _timed(rows[str(t)], "hf", lambda t=t: lambda: hf(input_ids=prompts[t][0][None], use_cache=False,
                                                                logits_to_keep=1), args.rep_ms)
        del hf
        measure.release_memory()
    if not tag and ("hf_patched" in parts or "hf_patched_pcg" in parts):
        _try(res, "hf_patched", lambda: _patched_columns(model, rows, prompts, parts, args))
        measure.release_memory()


def _patched_columns(model, rows: dict, prompts: dict, parts: tuple, args) -> dict:
    """transformers' own model on the same weights, patched in place by ``gemma4lab.patch_transformers``: its layers
    fused (``hf_patched``), and prefill through the piecewise graphs as well (``hf_patched_pcg``); each column's
    largest difference to the unpatched model's last-token logits beside it."""
    from gemma4lab.runtime.hf_patch import patch_transformers

    hf = hf_twin(model)
    call = lambda t: hf(input_ids=prompts[t][0][None], use_cache=False, logits_to_keep=1).logits  # noqa: E731
    plain = {t: call(t).float() for t in args.tokens}
    info: dict[str, Any] = {}
    for col, pcg in (("hf_patched", False), ("hf_patched_pcg", {"max_tokens": args.max_tokens, "progress": False})):
        if col not in parts:
            continue
        with patch_transformers(hf, "all", pcg=pcg) as handle:
            if pcg:
                report = handle.runner.capture()
                info["pcg_capture_s"] = report.capture_s
            for t in args.tokens:
                r = rows[str(t)]
                _timed(r, col, lambda t=t: lambda: call(t), args.rep_ms)
                _try(r, f"{col}_vs_hf_max_abs", lambda t=t: (call(t).float() - plain[t]).abs().max().item())
            if pcg:
                info["route_stats"] = dict(handle.runner.stats)
    return info  # the twin and its graphs go with this frame; the caller releases the memory


def _compile_columns(model, rows: dict, prompts: dict, parts: tuple, args, res: dict,
                     saved: Callable[[dict], None] = lambda _: None) -> None:
    """torch.compile of transformers' own model, as a reader would try it, on the same weights."""
    import torch._dynamo.utils as dynamo_utils

    from gemma4lab.attention.backends import _raise_recompile_limit

    _raise_recompile_limit(256)
    for col, mode in (("hf_compile", "default"), ("hf_compile_ro", "reduce-overhead")):
        if col not in parts:
            continue
        torch._dynamo.reset()
        hf = hf_twin(model)
        compiled = torch.compile(hf, mode=mode, dynamic=True)
        graphs0 = dynamo_utils.counters["stats"]["unique_graphs"]
        for t in args.tokens:
            _timed(rows[str(t)], col, lambda t=t: lambda: compiled(input_ids=prompts[t][0][None], use_cache=False,
                                                                    logits_to_keep=1), args.rep_ms)
        res.setdefault("compile", {})[col] = {
            "mode": mode, "dynamic": True,
            "graphs_compiled": dynamo_utils.counters["stats"]["unique_graphs"] - graphs0,
            "first_call_s": {str(t): rows[str(t)].get(f"{col}_stats", {}).get("first_call_s") for t in args.tokens}}
        compiled = hf = None  # free the twin and its compiled graphs before the next mode
        measure.release_memory()
        _derived(rows)
        saved(res)


def _compile_fused(model, rows: dict, prompts: dict, args, res: dict) -> None:
    """torch.compile(fullgraph=True, dynamic=True) of our fused model's prefill: the registered kernels are opaque
    ops, prompt lengths stay symbolic. Timed at the table's lengths; then four more lengths count recompiles."""
    import torch._dynamo.utils as dynamo_utils

    from gemma4lab.attention.backends import _raise_recompile_limit

    _raise_recompile_limit(64)
    torch._dynamo.reset()
    model.set_fusion(Fusion.all())
    compiled = torch.compile(lambda ids: model.prefill([ids]), fullgraph=True, dynamic=True)
    graphs0 = dynamo_utils.counters["stats"]["unique_graphs"]
    for t in args.tokens:
        _timed(rows[str(t)], "compile_fused", lambda t=t: lambda: compiled(prompts[t][0]), args.rep_ms)
    extra = {}
    for t in args.compile_extra_tokens:
        ids = random_prompt(t, model.config.text.vocab_size, seed=t, device=model.device)
        t0 = time.perf_counter()
        got = compiled(ids)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        extra[str(t)] = {"first_call_s": time.perf_counter() - t0,
                         "max_abs_vs_eager": (got.float() - model.prefill([ids]).float()).abs().max().item()}
    res.setdefault("compile", {})["compile_fused"] = {
        "mode": "default", "dynamic": True, "fullgraph": True, "lengths": [*args.tokens, *args.compile_extra_tokens],
        "graphs_compiled": dynamo_utils.counters["stats"]["unique_graphs"] - graphs0,
        "first_call_s": {str(t): rows[str(t)].get("compile_fused_stats", {}).get("first_call_s") for t in args.tokens},
        "extra_lengths": extra}


def _dispatch_cost(device: torch.device, calls: int = 2000) -> dict[str, float]:
    """Host time per call of a registered kernel (``torch.ops.gemma4lab``, through the dispatcher) and of the same
    kernel launched directly: what the registration costs an eager call. Tiny inputs, so the host is the bound."""
    from gemma4lab import kernels as K
    from gemma4lab.kernels import rmsnorm_residual_scalar as rms
    from gemma4lab.kernels import router_topk as rt

    x = torch.randn(1, 2816, device=device, dtype=torch.bfloat16)
    w = torch.ones(2816, device=device, dtype=torch.bfloat16)
    s = torch.ones(1, device=device)
    out = torch.empty_like(x)
    logits, scale = torch.randn(1, 128, device=device), torch.ones(128, device=device)
    wts, ids = torch.empty(1, 8, device=device), torch.empty(1, 8, device=device, dtype=torch.int64)
    cases = {"rmsnorm_residual_scalar": (lambda: K.gemma_rmsnorm_residual_scalar(x, w, x, s, out=out),
                                         lambda: rms._launch(x, w, x, s, 1e-6, out, None)),
             "router_topk": (lambda: K.gemma_router_topk(logits, scale, 8, out=(wts, ids)),
                             lambda: rt._launch(logits, scale, 8, wts, ids, None))}
    res = {}
    for name, (via_op, direct) in cases.items():
        per = {}
        for label, fn in (("op", via_op), ("direct", direct)):
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            per[label] = (time.perf_counter() - t0) / calls * 1e6
        res[name] = {"wrapper_via_op_us": per["op"], "direct_launch_us": per["direct"],
                     "op_overhead_us": per["op"] - per["direct"]}
    return res


def run(args: argparse.Namespace, checkpoint: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Every part of the benchmark, cheapest and most asked-for first (ours and transformers eager, the skewed
    routing), the compile peers (minutes of compilation) last. ``checkpoint(res)`` is called after each stage, so a
    run cut short (a device budget, a crash) still leaves what it measured."""
    from gemma4lab.lab import accuracy, routing

    saved = checkpoint or (lambda _: None)
    dev = torch.device(args.device)
    cfg = Gemma4Config.preset(args.preset)
    if args.layers:
        cfg = cfg.replace_text(num_hidden_layers=args.layers)
    parts = tuple(args.parts)
    res: dict[str, Any] = {"benchmark": "prefill", "preset": args.preset, "layers": cfg.text.num_hidden_layers,
                           "dtype": args.dtype,
                           "attention_backend": args.attention, "columns": COLUMNS, "parts": list(parts),
                           "published_ms": {str(k): v for k, v in PUBLISHED.items()}, "rows": {}}
    if "accuracy" in parts:  # fp32 / fp64 models of a few layers: before the bf16 model takes the memory
        _try(res, "accuracy_shallow", lambda: accuracy.shallow_parity(cfg, dev, depths=(1, 2, 6)))
        print("shallow parity:", res.get("accuracy_shallow"), flush=True)
    t0 = time.perf_counter()
    model = random_init(cfg, dtype=getattr(torch, args.dtype), device=dev, seed=0)
    res["build_s"] = time.perf_counter() - t0
    model.set_attention_backend(args.attention)
    copy_bw, mm_rate = measure.copy_bandwidth(dev), measure.matmul_rate(dev)
    res.update(copy_bandwidth_Bps=copy_bw, matmul_flops=mm_rate, text_weight_bytes=text_weight_bytes(model))
    prompts = {t: [random_prompt(t, cfg.text.vocab_size, seed=t, device=dev)] for t in args.tokens}

    with torch.no_grad():
        if "accuracy" in parts:
            def per_layer() -> dict:
                hf = hf_twin(model)
                return accuracy.per_layer_errors(model, prompts[min(args.tokens)][0], hf=hf, fp8="fp8" in parts)
            _try(res, "accuracy_per_layer", per_layer)
        res["routing"] = {"uniform": {"exponent": 0.0}}
        res["rows"] = _routed_rows(model, prompts, args.tokens, copy_bw, mm_rate)
        saved(res)
        _time_columns(model, res["rows"], prompts, parts, args, res, tag="")
        _derived(res["rows"])
        saved(res)

        if "skew" in parts:
            recipe = routing.skew_routing(model, args.skew, prompts[max(t for t in args.tokens if t <= 2893)])
            res["routing"]["skewed"] = recipe
            res["rows_skewed"] = _routed_rows(model, prompts, args.tokens, copy_bw, mm_rate)
            _time_columns(model, res["rows_skewed"], prompts, tuple(p for p in SKEW_PARTS if p in parts), args,
                          res, tag="_skewed")
            _derived(res["rows_skewed"])
            routing.skew_routing(model, 0.0, [])
            saved(res)
        if "vision" in parts and cfg.vision is not None:
            _try(res, "vision", lambda: _vision(model, args, copy_bw, mm_rate))
        if "layer" in parts:
            _try(res, "layer", lambda: _layer_alone(model, args))
            if dev.type == "cuda":
                _try(res, "dispatch", lambda: _dispatch_cost(dev))
            if "hf" in parts:
                hf = hf_twin(model)
                _try(res["layer"], "hf", lambda: _hf_layer(hf, model, args))
                del hf
                measure.release_memory()
        saved(res)

        _compile_columns(model, res["rows"], prompts, parts, args, res, saved)
        if "compile_pieces" in parts:
            from gemma4lab.runtime.compiled_pieces import CompiledPieces

            model.set_fusion(Fusion.all())
            mode = "reduce-overhead" if dev.type == "cuda" else "default"
            pieces = CompiledPieces(model, mode=mode)
            for t in args.tokens:
                _timed(res["rows"][str(t)], "compile_pieces", lambda t=t: lambda: pieces.prefill(prompts[t]),
                       args.rep_ms)
            res.setdefault("compile", {})["compile_pieces"] = {"mode": mode, "dynamic": True}
            saved(res)
        if "compile_fused" in parts:
            try:
                _compile_fused(model, res["rows"], prompts, args, res)
            except Exception as e:  # recorded, not fatal: the rest of the table still stands
                res.setdefault("errors", {})["compile_fused"] = f"{type(e).__name__}: {e}"[:500]
                traceback.print_exc()
        _derived(res["rows"])
        saved(res)
        if "fp8" in parts and cfg.text.enable_moe_block:  # last: it quantises the model in place
            _try(res, "fp8", lambda: _fp8_column(model, res["rows"], prompts, args, copy_bw, mm_rate))
    return res


def _routed_rows(model, prompts: dict, tokens, copy_bw: float, mm_rate: float) -> dict[str, dict]:
    """One row per token count: the routing the model's current router gives that prompt (experts hit) and the
    floors that follow from it — the start of every table this benchmark fills (uniform and skewed routing)."""
    from gemma4lab.lab import routing

    rows = {}
    for t in tokens:
        stats = routing.routing_stats(model, prompts[t])
        rows[str(t)] = {**floors(model.config, t, stats["experts_hit"], copy_bw, mm_rate, model.dtype.itemsize),
                        "routing": stats}
    return rows


def _fp8_column(model, rows: dict, prompts: dict, args, copy_bw: float, mm_rate: float) -> dict:
    """Fused + PCG with the experts in FP8 (``gemma4lab.quantize_experts``), beside the FP8 floors of each row: the
    weight floor moves with the expert bytes (its ratio is the one to read, ``pcg_fp8_x_fp8_floor``)."""
    from gemma4lab.model.quantize import quantize_experts, set_fp8_activations
    from gemma4lab.runtime.pcg import PiecewiseCudaGraphRunner

    report = quantize_experts(model)
    for t in args.tokens:
        r = rows[str(t)]
        f = floors(model.config, t, r["experts_hit"], copy_bw, mm_rate, model.dtype.itemsize, expert_elem_bytes=1)
        r.update({f"fp8_{k}": f[k] for k in ("weight_bytes", "weight_floor_ms", "floor_ms", "op_floor_ms")})
    model.set_fusion(Fusion.all())
    runner = PiecewiseCudaGraphRunner(model, max_tokens=args.max_tokens, progress=False)
    cap = runner.capture()
    for col, acts in (("pcg_fp8", False), ("pcg_fp8a8", True)):
        set_fp8_activations(model, acts)  # part of the runner's program key: the next prefill captures again
        for t in args.tokens:
            r = rows[str(t)]
            _timed(r, col, lambda t=t: lambda: runner.prefill(prompts[t]), args.rep_ms)
            if r.get(f"{col}_ms"):
                r[f"{col}_x_fp8_floor"] = r[f"{col}_ms"] / r["fp8_floor_ms"]
    runner = None  # its graphs and static buffers go before the next part
    measure.release_memory()
    return {"quantization": str(report), "expert_bytes_before": report.bytes_before,
            "expert_bytes_after": report.bytes_after, "capture_s": cap.capture_s}


def _photo_prompt(model, images: int, soft_tokens: int | None = None) -> tuple[dict, Any]:
    """A prompt of ``images`` copies of a real photo (matplotlib's bundled Grace Hopper portrait) between 40 text
    tokens, through the processor (``soft_tokens``: its per-image budget, the model's default if None), on the
    model's device; and the photo."""
    import matplotlib.cbook as cbook
    from PIL import Image

    from gemma4lab.model.processor import Gemma4Processor

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        img = Image.open(f).convert("RGB")
    cfg = model.config
    text = random_prompt(40, cfg.text.vocab_size, seed=7, device="cpu").tolist()
    ids = [cfg.text.bos_token_id] + text[:20] + [cfg.image_token_id] * images + text[20:]
    batch = Gemma4Processor(cfg, soft_tokens)(input_ids=ids, images=[img] * images)
    return {k: v.to(model.device) for k, v in batch.items()}, img


def _vision(model, args, copy_bw: float, mm_rate: float) -> dict:
    """The vision path per image count: the tower + projector alone (ours and transformers' on the same weights),
    the whole image prompt (fused eager, and fused + PCG: the text graphs and the tower's), the kernels the tower
    launches, and the floors from the same run — the tower's from its math (``floors.vision_floor``) and the text
    decoder's for the prompt's length. ``prompt_x_floor`` is the PCG prompt's ratio to text + tower floor,
    ``prompt_fused_x_floor`` the eager one's."""
    from gemma4lab.lab import routing
    from gemma4lab.lab.floors import vision_floor
    from gemma4lab.lab.profiling import family_summary, profile_forward
    from gemma4lab.runtime.pcg import PiecewiseCudaGraphRunner

    cfg, out = model.config, {}
    hf = hf_twin(model)
    batches = {n: _photo_prompt(model, n, getattr(args, "image_soft_tokens", None))[0] for n in args.images}
    # one runner whose largest bucket holds the longest prompt (each prompt is one bucket's replay, never chunked);
    # its tower graphs are the ones the graphed tower is timed with, so each [images, patches] is captured once
    runner = PiecewiseCudaGraphRunner(model, max_tokens=max(int(b["input_ids"].shape[1]) for b in batches.values()),
                                      progress=False)
    graphs = runner.tower
    for n in args.images:
        batch = batches[n]
        pv, ip = batch["pixel_values"], batch["image_position_ids"]
        ids, mm = [batch["input_ids"][0]], [batch["mm_token_type_ids"][0]]
        patches = (ip != -1).all(dim=-1).sum(dim=-1).tolist()
        tower = lambda pv=pv, ip=ip: model.image_features(pv, ip)  # noqa: E731
        graphed = lambda pv=pv, ip=ip: model.image_features(pv, ip, tower=graphs)  # noqa: E731
        model.set_fusion(Fusion.none())  # the unfused encoder first: what the fused kernels are measured against
        prof_unfused = profile_forward(tower)
        unfused = measure.time_stats(tower, rep_ms=args.rep_ms)
        unfused_out = tower()
        model.set_fusion(Fusion.all())
        prof = profile_forward(tower)
        # the text floor's experts: those a text prompt of the same length hits (the routing statistics run the
        # decoder alone, so they cannot take the image's soft tokens; a random prompt's routing is uniform anyway)
        stats = routing.routing_stats(model, [random_prompt(len(ids[0]), cfg.text.vocab_size, seed=n,
                                                            device=model.device)])
        row = {"images": n, "tokens": len(ids[0]), "patches": patches,
               "soft_tokens": int((batch["input_ids"] == cfg.image_token_id).sum()),
               "tower_floor": vision_floor(cfg, patches, copy_bw, mm_rate),
               "text_floor_ms": floors(cfg, len(ids[0]), stats["experts_hit"], copy_bw, mm_rate)["floor_ms"],
               "tower_unfused": unfused, "tower_unfused_kernels": prof_unfused["kernels"],
               "tower_fused_vs_unfused_rel": measure.rel_err(tower().float(), unfused_out.float()),
               "tower": measure.time_stats(tower, rep_ms=args.rep_ms),
               "tower_graph": measure.time_stats(graphed, rep_ms=args.rep_ms),
               "tower_graph_equal": bool(torch.equal(graphed(), tower())),
               "tower_kernels": prof["kernels"], "tower_gpu_busy_ms": prof["gpu_busy_ms"],
               "tower_kernels_per_layer": prof["kernels"] / cfg.vision.num_hidden_layers,
               "hf_tower": measure.time_stats(lambda pv=pv, ip=ip, f=hf.get_image_features: f(pv, ip),
                                              rep_ms=args.rep_ms),
               "prompt_fused": measure.time_stats(
                   lambda ids=ids, pv=pv, ip=ip, mm=mm: model.prefill(ids, pv, ip, mm), rep_ms=args.rep_ms)}
        # the graphed prompt: its first call captures (every bucket, and this image count's tower), out of the timing;
        # its logits are compared with the eager fused prefill's by relative error, not bit for bit
        pcg_prompt = lambda ids=ids, pv=pv, ip=ip, mm=mm: runner.prefill(ids, pv, ip, mm)  # noqa: E731
        row["prompt_pcg_vs_eager_rel"] = measure.rel_err(pcg_prompt().float(), model.prefill(ids, pv, ip, mm).float())
        row["prompt_pcg"] = measure.time_stats(pcg_prompt, rep_ms=args.rep_ms)
        row["prompt_pcg_bucket"] = runner.bucket_for(len(ids[0]))
        # where the graphed tower's GPU time goes, by op family, and where it waits between kernels (the gaps);
        # idle against the call timed without the profiler
        row["tower_graph_families"] = family_summary(graphed, wall_ms=row["tower_graph"]["median_ms"])
        row["tower_x_floor"] = row["tower"]["median_ms"] / row["tower_floor"]["floor_ms"]
        row["tower_graph_x_floor"] = row["tower_graph"]["median_ms"] / row["tower_floor"]["floor_ms"]
        prompt_floor = row["tower_floor"]["floor_ms"] + row["text_floor_ms"]
        row["prompt_fused_x_floor"] = row["prompt_fused"]["median_ms"] / prompt_floor
        row["prompt_x_floor"] = row["prompt_pcg"]["median_ms"] / prompt_floor
        out[str(n)] = row
        print(f"vision, {n} image(s): tower unfused {row['tower_unfused']['median_ms']:.1f} ms "
              f"({row['tower_unfused_kernels'] / cfg.vision.num_hidden_layers:.0f} kernels per layer), fused "
              f"{row['tower']['median_ms']:.1f} ms ({row['tower_x_floor']:.1f}× its "
              f"floor, {row['tower_kernels_per_layer']:.0f} kernels per layer), "
              f"graphed {row['tower_graph']['median_ms']:.1f} ms (bit-identical: {row['tower_graph_equal']}), "
              f"transformers {row['hf_tower']['median_ms']:.1f} ms; prompt of {row['tokens']} tokens: fused eager "
              f"{row['prompt_fused']['median_ms']:.1f} ms ({row['prompt_fused_x_floor']:.2f}× text + tower floor), "
              f"PCG {row['prompt_pcg']['median_ms']:.1f} ms ({row['prompt_x_floor']:.2f}×, logits "
              f"{row['prompt_pcg_vs_eager_rel']:.1e} rel. from eager's)", flush=True)
    del hf
    runner = graphs = None  # its graphs and static buffers go before the next part
    measure.release_memory()
    return out


def _image_prompt(model, runner, args) -> dict:
    """A real photo + text, eager vs PCG."""
    cfg = model.config
    batch, img = _photo_prompt(model, 1, getattr(args, "image_soft_tokens", None))
    ids, mm = [batch["input_ids"][0]], [batch["mm_token_type_ids"][0]]
    pv, ip = batch["pixel_values"], batch["image_position_ids"]
    eager = lambda: model.prefill(ids, pv, ip, mm)  # noqa: E731
    pcg = lambda: runner.prefill(ids, pv, ip, mm)  # noqa: E731
    out = {"tokens": int(batch["input_ids"].shape[1]), "image_size": list(img.size),
           "soft_tokens": int((batch["input_ids"] == cfg.image_token_id).sum()),
           "eager_fused": measure.time_stats(eager, rep_ms=args.rep_ms),
           "pcg": measure.time_stats(pcg, rep_ms=args.rep_ms),
           "vision_tower": measure.time_stats(lambda: model.image_features(pv, ip), rep_ms=args.rep_ms),
           "vision_tower_graph": measure.time_stats(lambda: model.image_features(pv, ip, tower=runner.tower),
                                                    rep_ms=args.rep_ms),
           "pcg_vs_eager_max_abs": (pcg().float() - eager().float()).abs().max().item()}
    model.set_fusion(Fusion.none())
    out["eager_unfused"] = measure.time_stats(eager, rep_ms=args.rep_ms)
    model.set_fusion(Fusion.all())
    return out


def _layer_alone(model, args) -> dict:
    """One MoE decoder layer (a sliding one) alone at ``args.layer_tokens``: latency and kernel launches, as the
    layer runs inside the model. Fused, its normed input arrives from the previous layer's epilogue (``next_norm``),
    so it is computed once outside the timed call (a layer that normed its own input would count the ~9 unfused
    norm kernels only the first layer of a forward runs); unfused, the layer norms its input itself."""
    from gemma4lab.attention import PackedBatch
    from gemma4lab.lab.profiling import profile_forward
    from gemma4lab.model.decoder import Stream, run_layer

    lm = model.language_model
    out: dict[str, Any] = {}
    for t in args.layer_tokens:
        ctx = lm.make_context(PackedBatch.from_lengths([t], model.device))
        h = torch.randn(t, lm.config.hidden_size, device=model.device, dtype=model.dtype)
        attend = lambda i, q, k, v, ctx=ctx: lm.attend(i, q, k, v, ctx)  # noqa: E731
        x_in = lm.layers[0].input_layernorm(h)  # what layer -1's fused epilogue would hand over
        entry = {}
        for name, fusion in (("unfused", Fusion.none()), ("fused", Fusion.all())):
            x = x_in if fusion.next_norm else None

            def fwd(fusion=fusion, h=h, x=x, ctx=ctx, attend=attend):
                s = Stream(h)
                s.set_residual(h, x)
                return run_layer(lm, 0, s, ctx.cos_sin, attend, fusion)

            entry[f"{name}_ms"] = measure.bench(fwd, rep_ms=args.rep_ms)
            prof = profile_forward(fwd)
            entry.update({f"{name}_launches": prof["kernels"], f"{name}_top_kernels": prof["top_kernels"][:15],
                          f"{name}_cpu_dispatch_ms": prof["cpu_dispatch_ms"],
                          f"{name}_gpu_busy_ms": prof["gpu_busy_ms"]})
        out[str(t)] = entry
    return out


def _hf_layer(hf, model, args) -> dict:
    """transformers' first decoder layer alone, through a pre-hook on its text model (no private API)."""
    from gemma4lab.lab.profiling import profile_forward

    out = {}
    text = hf.model.language_model
    for t in args.layer_tokens:
        h = torch.randn(1, t, model.config.text.hidden_size, device=model.device, dtype=model.dtype)
        layers = text.layers
        keep = text.config.num_hidden_layers
        text.config.num_hidden_layers = 1  # the text model loops over layers[:num_hidden_layers]
        try:
            fwd = lambda h=h: text(inputs_embeds=h, use_cache=False)  # noqa: E731
            prof = profile_forward(fwd)
            out[str(t)] = {"ms": measure.bench(fwd, rep_ms=args.rep_ms), "launches": prof["kernels"],
                           "top_kernels": prof["top_kernels"][:15], "layers": len(layers[:1])}
        finally:
            text.config.num_hidden_layers = keep
    return out


def _tag(s: str) -> str:
    if not s or not all(c.isascii() and (c.isalnum() or c == "-") for c in s):
        raise argparse.ArgumentTypeError(f"a tag is letters, digits and '-', got {s!r}")
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gemma4lab bench-prefill", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=positive_ints, default=TOKENS)
    p.add_argument("--parts", type=lambda s: tuple(s.split(",")), default=DEFAULT_PARTS,
                   help=f"comma-separated, from {','.join(PARTS)}")
    p.add_argument("--preset", default="26b-a4b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=positive_int, default=None, help="reduce depth (default: the preset's)")
    p.add_argument("--attention", default="auto", choices=["auto", "triton", "sdpa", "flex"])
    p.add_argument("--max-tokens", type=positive_int, default=8192, help="largest PCG bucket")
    p.add_argument("--layer-tokens", type=positive_ints, default=(93, 2893),
                   help="token counts of the one-layer part")
    p.add_argument("--compile-extra-tokens", type=positive_ints, default=EXTRA_COMPILE_TOKENS,
                   help="more prompt lengths the compiled fused model must serve (recompile count)")
    p.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of the skewed routing")
    p.add_argument("--images", type=positive_ints, default=(1, 2, 4), help="image counts of the vision part")
    p.add_argument("--image-soft-tokens", type=int, default=None, choices=SUPPORTED_SOFT_TOKENS,
                   help="the processor's per-image budget of soft tokens (default: the model's; the README's "
                        "figures use it) — a smaller one for quick CPU runs")
    p.add_argument("--rep-ms", type=positive_float, default=300.0)
    p.add_argument("--out", type=out_dir, default=Path("results"))
    p.add_argument("--tag", type=_tag, default=None,
                   help="a run of some parts beside the full one: writes prefill_<card>_<tag>.json, which the README "
                        "shows as a section of its own (its own commit and date), leaving prefill_<card>.json alone")
    p.add_argument("--device", type=device_arg, default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="weights and activations (the table is bf16; fp32 for CPU smoke runs of the fused compile)")
    args = p.parse_args(argv)
    bad = set(args.parts) - set(PARTS)
    if bad:
        p.error(f"unknown parts {sorted(bad)}; choose from {PARTS}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("bench-prefill needs a CUDA GPU for the full-size model (~50 GB); a CPU smoke run: "
                "--device cpu --preset tiny")
    if args.skew < 0:
        p.error(f"--skew must be >= 0, got {args.skew}")
    args.out.mkdir(parents=True, exist_ok=True)
    slug = measure.card_slug() + (f"_{args.tag}" if args.tag else "")
    partial = args.out / "runs" / f"prefill_{slug}_partial.json"

    def checkpoint(res: dict) -> None:  # what a run cut short leaves: marked incomplete, outside the README's glob
        measure.write_json(partial, {**res, "complete": False})

    res = run(args, checkpoint)
    if args.tag:
        res["tag"] = args.tag
    path = measure.write_json(args.out / f"prefill_{slug}.json", {**res, "complete": True})
    partial.unlink(missing_ok=True)  # this run's own checkpoint, superseded by the complete file
    print(prefill_table(res))
    from gemma4lab.lab import viz

    label = viz.env_label(measure.read_json(path))
    viz.save(viz.plot_prefill(PUBLISHED, list(res["rows"].values()), label), path.with_suffix(".png"))
    if any(r.get("families") for r in res["rows"].values()):
        viz.save(viz.plot_families(list(res["rows"].values()), f"GPU time by family — {label}"),
                 path.with_name(path.stem + "_families.png"))
    if res.get("accuracy_per_layer"):
        viz.save(viz.plot_layer_errors(res["accuracy_per_layer"], f"teacher-forced per-layer error — {label}"),
                 path.with_name(path.stem + "_layers.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
