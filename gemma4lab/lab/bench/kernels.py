"""Benchmark of the fused kernels against the unfused model: ``python -m gemma4lab.lab.bench.kernels``.

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
so the heuristics in ``gemma4lab/kernels/*._launch_config`` can be tuned on the target card.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gemma4lab import kernels as K
from gemma4lab.kernels import LaunchConfig, dual_rmsnorm, gelu_and_mul, post_attention_block, qkv_norm_rope, router_topk
from gemma4lab.kernels import rmsnorm_residual_scalar as rms_mod
from gemma4lab.kernels._common import SUPPORTED_DTYPES, RowConfig
from gemma4lab.lab import measure
from gemma4lab.lab.bench.common import device_arg, out_dir, positive_int, positive_ints

DEFAULT_TOKENS = (93, 189, 1453, 2893, 5773, 11533, 32768)
QUICK_TOKENS = (1, 5)
EPS = 1e-6


@dataclass(frozen=True)
class Shapes:
    """Model shapes the kernels are benchmarked at (Gemma 4 26B-A4B by default)."""

    hidden: int = 2816
    heads_q: int = 16
    sliding_kv: tuple[int, int] = (8, 256)  # (kv heads, head_dim) of sliding layers
    full_kv: tuple[int, int] = (2, 512)  # (kv heads, head_dim) of full layers (K = V)
    experts: int = 128
    top_k: int = 8
    intermediate: int = 2112


QUICK_SHAPES = Shapes(hidden=96, heads_q=2, sliding_kv=(1, 32), full_kv=(1, 64), experts=8, top_k=2, intermediate=48)


# ---- the unfused model, Hugging Face style (activation dtype, one op at a time) --------------------------------
def hf_rmsnorm(x: torch.Tensor, w: torch.Tensor | None = None, eps: float = EPS) -> torch.Tensor:
    """``Gemma4RMSNorm.forward``: upcast, normalise, scale, cast back."""
    xf = x.float()
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if w is not None:
        y = y * w.float()
    return y.type_as(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def unfused_rmsnorm_residual_scalar(x, w, residual, scalar):
    return (residual + hf_rmsnorm(x, w)) * scalar


def unfused_dual(x1, w1, x2, w2, w3, residual, scalar):
    return (residual + hf_rmsnorm(hf_rmsnorm(x1, w1) + hf_rmsnorm(x2, w2), w3)) * scalar


def unfused_dual_next(x1, w1, x2, w2, w3, residual, scalar, wn):
    out = unfused_dual(x1, w1, x2, w2, w3, residual, scalar)
    return out, hf_rmsnorm(out, wn)


def unfused_post_attention(attn_out, residual, w_pa, w_ff, w_ff2, router_scale):
    h = residual + hf_rmsnorm(attn_out, w_pa)
    return (h, hf_rmsnorm(h, w_ff), hf_rmsnorm(h, w_ff2),
            hf_rmsnorm(h) * router_scale * attn_out.shape[-1] ** -0.5)


def unfused_qkv(q, k, v, qw, kw, cos, sin):
    t, d = q.shape[0], qw.shape[0]
    c, s = cos.to(q.dtype)[:, None, :], sin.to(q.dtype)[:, None, :]
    qs = hf_rmsnorm(q.view(t, -1, d), qw)
    ks = hf_rmsnorm(k.view(t, -1, d), kw)
    return qs * c + _rotate_half(qs) * s, ks * c + _rotate_half(ks) * s, hf_rmsnorm(v.view(t, -1, d))


def unfused_router(logits, per_expert_scale, top_k: int):
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return w * per_expert_scale[ids], ids


def unfused_gelu(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


# ---- benchmark cases --------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One kernel at one T: inputs, the unfused function, our kernel (with static ``out`` buffers) and its bytes."""

    args: tuple
    unfused: Callable[..., Any]
    fused: Callable[[LaunchConfig | RowConfig | None], Any]  # runs our kernel, optionally with a launch-config override
    nbytes: int
    heuristic: LaunchConfig | RowConfig
    backend: str
    restore: Callable[[], None] = field(default=lambda: None)  # resets in-place inputs before a correctness check


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


class Factory:
    """Builds each kernel's case at a given T from a fixed-seed generator."""

    def __init__(self, shapes: Shapes, dtype: torch.dtype, device: torch.device):
        self.s, self.dt, self.dev = shapes, dtype, device
        self.b = torch.empty((), dtype=dtype).element_size()
        self.gen = torch.Generator(device=device).manual_seed(0)

    def x(self, t: int, n: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(t, n, generator=self.gen, device=self.dev)).to(self.dt)

    def w(self, n: int) -> torch.Tensor:
        return (1 + 0.1 * torch.randn(n, generator=self.gen, device=self.dev)).to(self.dt)

    def scalar(self) -> torch.Tensor:
        return torch.tensor([0.8], device=self.dev)

    def rmsnorm_residual_scalar(self, t: int) -> Case:
        h = self.s.hidden
        x, r, w, sc = self.x(t, h), self.x(t, h), self.w(h), self.scalar()
        out = torch.empty_like(x)
        fused = lambda cfg=None: K.gemma_rmsnorm_residual_scalar(x, w, r, sc, out=out, config=cfg)
        # read x, residual; write out; weight; scalar
        return Case((x, w, r, sc), unfused_rmsnorm_residual_scalar, fused, 3 * t * h * self.b + h * self.b + 4,
                    rms_mod._launch_config(t, h, self.dev, self.dt), K.kernel_backend(x))

    def _dual_inputs(self, t: int):
        h = self.s.hidden
        return self.x(t, h), self.w(h), self.x(t, h), self.w(h), self.w(h), self.x(t, h), self.scalar()

    def dual_rmsnorm_residual_scalar(self, t: int) -> Case:
        h = self.s.hidden
        args = self._dual_inputs(t)
        out = torch.empty_like(args[0])
        fused = lambda cfg=None: K.gemma_dual_rmsnorm_residual_scalar(*args, out=out, config=cfg)
        # read x1, x2, residual; write out; 3 weights; scalar
        return Case(args, unfused_dual, fused, 4 * t * h * self.b + 3 * h * self.b + 4,
                    dual_rmsnorm._launch_config(t, h, self.dev, self.dt), K.kernel_backend(args[0]))

    def dual_rmsnorm_next_norm(self, t: int) -> Case:
        h = self.s.hidden
        args = (*self._dual_inputs(t), self.w(h))
        outs = (torch.empty_like(args[0]), torch.empty_like(args[0]))
        fused = lambda cfg=None: K.gemma_dual_rmsnorm_residual_scalar_next_norm(*args, out=outs, config=cfg)
        # read x1, x2, residual; write out, next_in; 4 weights; scalar
        return Case(args, unfused_dual_next, fused, 5 * t * h * self.b + 4 * h * self.b + 4,
                    dual_rmsnorm._launch_config(t, h, self.dev, self.dt), K.kernel_backend(args[0]))

    def post_attention_block(self, t: int) -> Case:
        h = self.s.hidden
        args = (self.x(t, h), self.x(t, h), self.w(h), self.w(h), self.w(h), self.w(h))
        outs = tuple(torch.empty_like(args[0]) for _ in range(4))
        fused = lambda cfg=None: K.gemma_post_attention_block(*args, out=outs, config=cfg)
        # read attn_out, residual; write h, mlp_in, experts_in, router_in; 4 weights
        return Case(args, unfused_post_attention, fused, 6 * t * h * self.b + 4 * h * self.b,
                    post_attention_block._launch_config(t, h, self.dev, self.dt), K.kernel_backend(args[0]))

    def _qkv(self, t: int, kv: tuple[int, int]) -> Case:
        (hkv, d), hq = kv, self.s.heads_q
        width = (hq + 2 * hkv) * d
        buf = self.x(t, width)
        pristine = buf.clone()
        q, k, v = buf[:, : hq * d], buf[:, hq * d : (hq + hkv) * d], buf[:, (hq + hkv) * d :]
        qw, kw = self.w(d), self.w(d)
        pos = torch.arange(t, device=self.dev, dtype=torch.float32)[:, None]
        inv_freq = 10000.0 ** (-torch.arange(0, d, 2, device=self.dev, dtype=torch.float32) / d)
        ang = torch.cat((pos * inv_freq, pos * inv_freq), dim=-1)
        cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
        fused = lambda cfg=None: K.gemma_qkv_norm_rope_(q, k, v, qw, kw, cos, sin, config=cfg)
        # read + write q, k, v; cos and sin (fp32) once per token; 2 weights
        nbytes = 2 * t * width * self.b + 2 * t * d * 4 + 2 * d * self.b
        return Case((q, k, v, qw, kw, cos, sin), unfused_qkv, fused, nbytes,
                    qkv_norm_rope._launch_config(t, d, self.dev), K.kernel_backend(buf),
                    restore=lambda: buf.copy_(pristine))

    def qkv_norm_rope_sliding(self, t: int) -> Case:
        return self._qkv(t, self.s.sliding_kv)

    def qkv_norm_rope_full(self, t: int) -> Case:
        return self._qkv(t, self.s.full_kv)

    def router_topk(self, t: int) -> Case:
        e, k = self.s.experts, self.s.top_k
        logits, scale = self.x(t, e, scale=2.0), self.w(e)
        outs = (torch.empty(t, k, device=self.dev), torch.empty(t, k, device=self.dev, dtype=torch.int64))
        fused = lambda cfg=None: K.gemma_router_topk(logits, scale, k, out=outs, config=cfg)
        # read logits; write fp32 weights + int64 ids; per-expert scale
        nbytes = t * e * self.b + t * k * (4 + 8) + e * self.b
        return Case((logits, scale, k), unfused_router, fused, nbytes, router_topk._launch_config(t, e, self.dev),
                    K.kernel_backend(logits))

    def gelu_tanh_mul(self, t: int) -> Case:
        i = self.s.intermediate
        gate_up = self.x(t, 2 * i)
        out = torch.empty(t, i, device=self.dev, dtype=self.dt)
        fused = lambda cfg=None: K.gelu_tanh_mul(gate_up, out=out, config=cfg)
        # read gate and up; write out
        return Case((gate_up,), unfused_gelu, fused, 3 * t * i * self.b, gelu_and_mul._launch_config(t * i, self.dev),
                    K.kernel_backend(gate_up))


KERNELS = ("rmsnorm_residual_scalar", "dual_rmsnorm_residual_scalar", "dual_rmsnorm_next_norm",
           "post_attention_block", "qkv_norm_rope_sliding", "qkv_norm_rope_full", "router_topk", "gelu_tanh_mul")

UNFUSED: dict[str, Callable[..., Any]] = {
    "rmsnorm_residual_scalar": unfused_rmsnorm_residual_scalar, "dual_rmsnorm_residual_scalar": unfused_dual,
    "dual_rmsnorm_next_norm": unfused_dual_next, "post_attention_block": unfused_post_attention,
    "qkv_norm_rope_sliding": unfused_qkv, "qkv_norm_rope_full": unfused_qkv, "router_topk": unfused_router,
    "gelu_tanh_mul": unfused_gelu,
}

SWEEP_GRID: dict[str, list[LaunchConfig | RowConfig]] = {
    # persistent row kernels: programs per SM x warps x pipeline stages (one row per iteration at H >= 2048)
    **{k: [RowConfig(p, w, st) for p in (1, 2, 4) for w in (4, 8) for st in (2, 3)]
       for k in ("rmsnorm_residual_scalar", "dual_rmsnorm_residual_scalar", "dual_rmsnorm_next_norm",
                 "post_attention_block")},
    **{k: [LaunchConfig(r, w) for r in (2, 4, 8, 16) for w in (2, 4, 8)]
       for k in ("qkv_norm_rope_sliding", "qkv_norm_rope_full")},
    "router_topk": [LaunchConfig(r, w) for r in (4, 8, 16, 32) for w in (1, 2, 4)],
    "gelu_tanh_mul": [LaunchConfig(b, w) for b in (1024, 2048, 4096, 8192) for w in (4, 8)],
}


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
    row: dict[str, Any] = {"kernel": name, "tokens": t, "bytes": case.nbytes, "backend": case.backend,
                           "launch": case.heuristic.__dict__}
    row["rel_err_vs_unfused"] = _try(lambda: _check(case), errors, f"{where} check")
    row["eager_ms"] = _try(lambda: measure.bench(lambda: case.unfused(*case.args), device=dev, **timing), errors,
                           f"{where} eager")
    row["compile_ms"] = None
    if compiled is not None:
        def compiled_ms() -> float:
            for _ in range(2):  # compile for this shape and warm up outside the timed region
                compiled(*case.args)
            return measure.bench(lambda: compiled(*case.args), device=dev, **timing)

        row["compile_ms"] = _try(compiled_ms, errors, f"{where} compile")
    row["triton_ms"] = _try(lambda: measure.bench(lambda: case.fused(None), device=dev, **timing), errors,
                            f"{where} triton")
    row["graph_ms"] = None
    if dev.type == "cuda":
        row["graph_ms"] = _try(lambda: measure.bench_cuda_graph(lambda: case.fused(None), **timing), errors,
                               f"{where} graph")
    for col in ("eager", "compile", "triton", "graph"):
        ms = row[f"{col}_ms"]
        row[f"{col}_GBps"] = case.nbytes / (ms * 1e-3) / 1e9 if ms else None
        row[f"{col}_frac_copy"] = case.nbytes / (ms * 1e-3) / copy_bw if ms else None
    row["speedup_vs_compile"] = (row["compile_ms"] / row["triton_ms"]
                                 if row["compile_ms"] and row["triton_ms"] else None)
    return row


def _sweep(name: str, t: int, case: Case, copy_bw: float, dev: torch.device, timing: dict[str, float],
           errors: list[str]) -> list[dict[str, Any]]:
    """Our kernel under every launch config of ``SWEEP_GRID[name]``."""
    rows = []
    for cfg in SWEEP_GRID[name]:
        if isinstance(cfg, RowConfig) and isinstance(case.heuristic, RowConfig):  # rows per block: by hidden size
            cfg = replace(cfg, rows=case.heuristic.rows)
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
    factory = Factory(shapes, dtype, dev)
    results: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    errors: list[str] = []
    for name in args.kernels:
        compiled = torch.compile(UNFUSED[name], dynamic=False) if skipped["compile"] is None else None
        for t in args.tokens:
            case = getattr(factory, name)(t)
            results.append(_measure(name, t, case, compiled, copy_bw, dev, timing, errors))
            if args.sweep and t in args.sweep_tokens:
                sweep += _sweep(name, t, case, copy_bw, dev, timing, errors)
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


# ---- reporting --------------------------------------------------------------------------------------------------
def _fmt(v: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def table(payload: dict[str, Any]) -> str:
    """Compact text table: times in microseconds, bandwidth as % of copy bandwidth."""
    head = (f"{'kernel':30s} {'T':>6s} {'eager':>9s} {'compile':>9s} {'triton':>9s} {'graph':>8s} {'MB':>8s} "
            f"{'%copy':>6s} {'x cmp':>6s} {'err':>8s}")
    lines = [head, "-" * len(head)]
    for r in payload["results"]:
        lines.append(f"{r['kernel']:30s} {r['tokens']:6d} {_fmt(r['eager_ms'], 1e3):>9s} "
                     f"{_fmt(r['compile_ms'], 1e3):>9s} {_fmt(r['triton_ms'], 1e3):>9s} "
                     f"{_fmt(r['graph_ms'], 1e3):>8s} {r['bytes'] / 1e6:8.2f} "
                     f"{_fmt(r['triton_frac_copy'], 100, 0):>6s} {_fmt(r['speedup_vs_compile'], 1, 2):>6s} "
                     f"{_fmt(r['rel_err_vs_unfused'], 1, 5) if r['rel_err_vs_unfused'] is not None else '-':>8s}")
    roofs = payload["roofs"]
    floor = roofs["empty_kernel_ms"]
    lines.append(f"copy bandwidth {roofs['copy_bandwidth_Bps'] / 1e9:.0f} GB/s; matmul "
                 f"{roofs['matmul_flops'] / 1e12:.1f} TFLOP/s; empty kernel eager "
                 f"{_fmt(floor['eager_ms'], 1e3, 2)} us, graph {_fmt(floor['graph_ms'], 1e3, 2)} us")
    for col, why in payload["skipped"].items():
        if why:
            lines.append(f"skipped {col}: {why}")
    if payload["sweep"]:
        best: dict[tuple[str, int], dict] = {}
        for s in payload["sweep"]:
            key = (s["kernel"], s["tokens"])
            if s["ms"] is not None and (key not in best or s["ms"] < best[key]["ms"]):
                best[key] = s
        for (k, t), s in best.items():
            heur = next((x for x in payload["sweep"] if x["kernel"] == k and x["tokens"] == t and x["is_heuristic"]),
                        None)
            knobs = " ".join(f"{f}={s[f]}" for f in ("programs_per_sm", "rows", "num_warps", "num_stages") if f in s)
            lines.append(f"sweep {k} T={t}: best {knobs} "
                         f"{_fmt(s['ms'], 1e3)} us ({_fmt(s['frac_copy'], 100, 0)}% copy); heuristic "
                         f"{_fmt(heur['ms'], 1e3) if heur else 'not in grid'} us")
    for e in payload["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Left: fraction of copy bandwidth vs T (eager dotted, compile dashed, Triton solid). Right: time per call
    inside a CUDA graph at small T vs the empty-kernel floor (+2 us)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    small_t = 256
    for i, name in enumerate(payload["config"]["kernels"]):
        rows = [r for r in payload["results"] if r["kernel"] == name]
        c = colors[i % len(colors)]
        for col, style in (("eager", ":"), ("compile", "--"), ("triton", "-")):
            pts = [(r["tokens"], r[f"{col}_frac_copy"]) for r in rows if r[f"{col}_frac_copy"] is not None]
            if pts:
                ax1.plot(*zip(*pts), style, color=c, marker="o", ms=3, label=name if col == "triton" else None)
        pts = [(r["tokens"], r["graph_ms"] * 1e3) for r in rows if r["graph_ms"] is not None and r["tokens"] <= small_t]
        if pts:
            ax2.plot(*zip(*pts), "-o", color=c, label=name)
    ax1.set(xscale="log", xlabel="tokens T", ylabel="fraction of copy bandwidth",
            title="bandwidth (solid Triton, dashed torch.compile, dotted eager)")
    ax1.axhline(0.9, color="grey", lw=0.8)
    ax1.legend(fontsize=7)
    floor = payload["roofs"]["empty_kernel_ms"]["graph_ms"]
    if floor is not None:
        ax2.axhline(floor * 1e3, color="k", lw=1, label="empty kernel (graph)")
        ax2.axhline(floor * 1e3 + 2, color="k", lw=1, ls="--", label="empty + 2 us")
        ax2.set(xscale="log", xlabel="tokens T", ylabel="us per call inside a CUDA graph",
                title=f"small T (<= {small_t}) inside CUDA graphs")
        ax2.legend(fontsize=7)
    else:
        ax2.text(0.5, 0.5, "no CUDA graphs on this device", ha="center", va="center", transform=ax2.transAxes)
        ax2.set_axis_off()
    fig.suptitle(f"gemma4lab kernels on {payload.get('environment', {}).get('card', '?')} "
                 f"({payload['config']['dtype']}, hidden {payload['config']['shapes']['hidden']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    png_path = plot(payload, args.out / f"kernels_{slug}.png")
    print(table(payload))
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
