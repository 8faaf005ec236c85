"""Benchmark of the fused kernels against the unfused model: ``python -m gemma4lab bench-kernels``.

For every kernel and token count T it times (a) the unfused eager PyTorch chain the model runs without fusion
(Hugging Face style: activation dtype, each upcast/norm/add a separate op), (b) ``torch.compile`` of that same
function, (c) our Triton kernel and (d) our kernel inside a CUDA graph; it converts the bytes each kernel must move
(every input read once, every output written once, weights included) into achieved bandwidth and a fraction of the
device-to-device copy bandwidth measured in the same run, and records the empty-kernel launch floors. Results go to
``<out>/kernels_<card>.json`` (via ``measure.write_json``) and ``<out>/kernels_<card>.png``.

A full run compiles every unfused function once per T (a few minutes of torch.compile): to fit a time limit, run a
few kernels at a time with ``--kernels a,b --merge``, or drop the compile column with ``--skip-compile``.

``--quick`` is a smoke run on tiny shapes that also works on a CPU-only machine (interpreter or torch reference;
the compile and CUDA-graph columns are then skipped and say why). ``--sweep`` times a grid of launch configurations
so each kernel family's launch heuristic (``gemma4lab.kernels.*_config``) can be tuned on the target card.
Every kernel is described once in ``gemma4lab.lab.bench.ops``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gemma4lab import kernels as K
from gemma4lab.kernels._common import SUPPORTED_DTYPES
from gemma4lab.lab import measure
from gemma4lab.lab.bench.common import device_arg, out_dir, positive_int, positive_ints
from gemma4lab.lab.bench.ops import QUICK_SHAPES, SPECS, Case, OpSpec, Shapes, sweep_configs

DEFAULT_TOKENS = (93, 189, 1453, 2893, 5773, 11533, 32768)
QUICK_TOKENS = (1, 5)
KERNELS = tuple(SPECS)


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


# ---- measurement ------------------------------------------------------------------------------------------------
def _try(fn: Callable[[], float], errors: list[str], what: str) -> float | None:
    try:
        return fn()
    except Exception as exc:  # a failed column must not sink the whole run
        errors.append(f"{what}: {type(exc).__name__}: {exc}"[:500])
        return None


def _check(case: Case) -> float:
    """Relative error of our kernel vs the unfused model on the first output (bf16 differences = rounding)."""
    case.restore()
    ref = _first(case.unfused(*case.args))
    got = _first(case.fused(None))
    if got is None:  # in-place qkv: the result is q itself
        got = case.args[0].reshape(ref.shape)
    err = measure.rel_err(got, ref)
    case.restore()
    return err


def _set_recompile_limit(n: int) -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), n))


def _measure(name: str, t: int, case: Case, compiled: Callable[..., Any] | None, copy_bw: float,
             dev: torch.device, timing: dict[str, float], errors: list[str]) -> dict[str, Any]:
    """All columns for one kernel at one T."""
    where = f"{name} T={t}"
    row: dict[str, Any] = {"kernel": name, "tokens": t, "bytes": case.nbytes, "backend": K.kernel_backend(case.args[0]),
                           "launch": case.heuristic.__dict__}
    row["rel_err_vs_unfused"] = _try(lambda: _check(case), errors, f"{where} check")
    eager = _try(lambda: measure.time_stats(lambda: case.unfused(*case.args), device=dev, **timing), errors,
                 f"{where} eager")
    row["eager_ms"], row["eager_stats"] = (eager or {}).get("median_ms"), eager
    row["compile_ms"] = None
    if compiled is not None:
        def compiled_ms() -> float:
            for _ in range(2):  # compile for this shape and warm up outside the timed region
                compiled(*case.args)
            return measure.bench(lambda: compiled(*case.args), device=dev, **timing)

        row["compile_ms"] = _try(compiled_ms, errors, f"{where} compile")
    triton = _try(lambda: measure.time_stats(lambda: case.fused(None), device=dev, **timing), errors,
                  f"{where} triton")
    row["triton_ms"], row["triton_stats"] = (triton or {}).get("median_ms"), triton
    row["graph_ms"] = None
    if dev.type == "cuda":
        row["graph_ms"] = _try(lambda: measure.bench_cuda_graph(lambda: case.fused(None), **timing), errors,
                               f"{where} graph")
    if case.published is not None:  # the published layout of the same op, in and out of a graph
        pub = _try(lambda: measure.time_stats(case.published, device=dev, **timing), errors, f"{where} published")
        row["published_ms"], row["published_stats"] = (pub or {}).get("median_ms"), pub
        row["published_graph_ms"] = None
        if dev.type == "cuda":
            row["published_graph_ms"] = _try(lambda: measure.bench_cuda_graph(case.published, **timing), errors,
                                             f"{where} published graph")
        for ours, theirs in (("triton", "published"), ("graph", "published_graph")):
            a, b = row[f"{ours}_ms"], row[f"{theirs}_ms"]
            row[f"{ours}_vs_published"] = b / a if a and b else None  # > 1: ours faster
    for col in ("eager", "compile", "triton", "graph"):
        ms = row[f"{col}_ms"]
        row[f"{col}_GBps"] = case.nbytes / (ms * 1e-3) / 1e9 if ms else None
        row[f"{col}_frac_copy"] = case.nbytes / (ms * 1e-3) / copy_bw if ms else None
    row["speedup_vs_compile"] = (row["compile_ms"] / row["triton_ms"]
                                 if row["compile_ms"] and row["triton_ms"] else None)
    return row


def _sweep(spec: OpSpec, t: int, case: Case, copy_bw: float, dev: torch.device, timing: dict[str, float],
           errors: list[str]) -> list[dict[str, Any]]:
    """Our kernel under every launch setting of the spec's sweep grid."""
    name = spec.name
    rows = []
    for cfg in sweep_configs(spec, case):
        ms = _try(lambda cfg=cfg: measure.bench(lambda: case.fused(cfg), device=dev, **timing), errors,
                  f"{name} T={t} sweep {cfg}")
        rows.append({"kernel": name, "tokens": t, **cfg.__dict__, "ms": ms,
                     "frac_copy": case.nbytes / (ms * 1e-3) / copy_bw if ms else None,
                     "is_heuristic": cfg == case.heuristic})
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = QUICK_SHAPES if args.quick else Shapes()
    if args.hidden is not None:
        shapes = Shapes(**{**shapes.__dict__, "hidden": args.hidden})
    on_cuda = dev.type == "cuda"
    timing = dict(warmup_ms=1, rep_ms=5) if args.quick else dict(warmup_ms=25, rep_ms=100)
    skipped = {"compile": None if on_cuda and not args.skip_compile else
               ("--skip-compile" if on_cuda else "needs CUDA (skipped on CPU smoke runs)"),
               "graph": None if on_cuda else "CUDA graphs need a CUDA device"}
    if on_cuda:
        _set_recompile_limit(64)
    copy_bw = measure.copy_bandwidth(dev, nbytes=2**22 if args.quick or not on_cuda else 2**30, **timing)
    roofs = {"copy_bandwidth_Bps": copy_bw,
             "matmul_flops": measure.matmul_rate(dev, n=256 if args.quick else 8192, dtype=dtype, **timing),
             "empty_kernel_ms": measure.empty_kernel_time(dev, **timing)}
    gen = torch.Generator(device=dev).manual_seed(0)
    results: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    errors: list[str] = []
    for name in args.kernels:
        spec = SPECS[name]
        compiled = None
        for t in args.tokens:
            case = spec.build(shapes, t, dtype, dev, gen)
            if compiled is None and skipped["compile"] is None:
                compiled = torch.compile(case.unfused, dynamic=False)
            results.append(_measure(name, t, case, compiled, copy_bw, dev, timing, errors))
            if args.sweep and t in args.sweep_tokens:
                sweep += _sweep(spec, t, case, copy_bw, dev, timing, errors)
            del case
        if on_cuda:
            torch.cuda.empty_cache()
    return {
        "benchmark": "kernels",
        "config": {"dtype": args.dtype, "tokens": list(args.tokens), "kernels": list(args.kernels),
                   "shapes": {k: list(v) if isinstance(v, tuple) else v for k, v in shapes.__dict__.items()},
                   "quick": args.quick, "device": str(dev), "interpreter": K.INTERPRET, **timing},
        "roofs": roofs,
        "skipped": skipped,
        "results": results,
        "sweep": sweep,
        "errors": errors,
    }


def merge(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Keep ``old``'s rows for kernels this run did not measure (same dtype and shapes only), so the benchmark
    can be run a few kernels at a time within a time limit. Each row's fractions stay relative to the copy
    bandwidth of the run that measured it."""
    same = old and all(old.get("config", {}).get(k) == new["config"][k] for k in ("dtype", "shapes", "quick"))
    if not same:
        return new
    ran = set(new["config"]["kernels"])
    kept = [r for r in old.get("results", []) if r["kernel"] not in ran]
    kernels = [k for k in KERNELS if k in ran or any(r["kernel"] == k for r in kept)]
    return {**new, "config": {**new["config"], "kernels": kernels}, "results": kept + new["results"],
            "sweep": [r for r in old.get("sweep", []) if r["kernel"] not in ran] + new["sweep"],
            "merged_runs": [*old.get("merged_runs", []), old.get("environment", {}).get("date_utc")]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gemma4lab.lab.bench.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=positive_ints, default=None,
                   help=f"comma-separated token counts (default {','.join(map(str, DEFAULT_TOKENS))}; --quick: "
                        f"{','.join(map(str, QUICK_TOKENS))})")
    p.add_argument("--hidden", type=positive_int, default=None, help="hidden size (default 2816; --quick: 96)")
    p.add_argument("--dtype", default="bfloat16", choices=[str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES])
    p.add_argument("--out", type=out_dir, default=Path("results"), help="output directory (default results/)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (works on CPU)")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kernels", type=lambda s: tuple(s.split(",")), default=KERNELS,
                   help=f"comma-separated subset of {','.join(KERNELS)}")
    p.add_argument("--skip-compile", action="store_true", help="skip the torch.compile column (saves minutes)")
    p.add_argument("--sweep", action="store_true", help="also time a grid of launch configs (tuning)")
    p.add_argument("--sweep-tokens", type=positive_ints, default=None, help="T values for --sweep (default: smallest, "
                   "largest and the one nearest 4096 of --tokens)")
    p.add_argument("--merge", action="store_true", help="keep the existing file's rows for kernels not run now")
    p.add_argument("--overwrite", action="store_true", help="replace an output file not written by gemma4lab")
    args = p.parse_args(argv)
    args.tokens = args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS)
    bad = [k for k in args.kernels if k not in KERNELS]
    if bad:
        p.error(f"unknown kernels {bad}; choose from {', '.join(KERNELS)}")
    if args.sweep_tokens is None:
        ts = sorted(args.tokens)
        args.sweep_tokens = (ts[0], min(ts, key=lambda t: abs(math.log(t / 4096))), ts[-1])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device available; use --device cpu --quick for a CPU smoke run")
        return 2
    if torch.device(args.device).type != "cuda" and not args.quick:
        print("the full benchmark needs a CUDA device; on CPU run with --quick (a smoke test on tiny shapes)")
        return 2
    payload = run(args)
    slug = measure.card_slug() if torch.device(args.device).type == "cuda" else "cpu"
    json_path = args.out / f"kernels_{slug}.json"
    if args.merge:
        payload = merge(measure.read_json(json_path), payload)
    json_path = measure.write_json(json_path, payload, overwrite=args.overwrite)
    payload = measure.read_json(json_path) or payload
    from gemma4lab.lab import report, viz

    png_path = viz.save(viz.plot_kernels(payload), args.out / f"kernels_{slug}.png")
    print(report.kernels_section(payload, None))
    for e in payload["errors"]:
        print(f"error: {e}")
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
