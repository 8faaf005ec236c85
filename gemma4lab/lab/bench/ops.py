"""One description of every fused kernel for the benchmarks: how to build its inputs at T tokens, the unfused
PyTorch code the model runs without it (``gemma4lab.model.layers``, op for op as transformers rounds), the kernel
call (with an optional launch-setting override), the bytes it must move, and its launch settings' sweep grid.
``bench-kernels`` times every entry; nothing here is written twice."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from gemma4lab import kernels as K
from gemma4lab.lab.bench import published_layout
from gemma4lab.model.layers import apply_rope, rms_norm, router_tail

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


@dataclass
class Case:
    """One kernel at one T: its inputs, the unfused function, the kernel (``fused(config)``), the bytes it moves,
    the heuristic's launch settings and a ``restore`` for kernels that work in place."""

    args: tuple
    unfused: Callable[..., Any]
    fused: Callable[[Any], Any]
    nbytes: int
    heuristic: Any
    restore: Callable[[], None] = field(default=lambda: None)
    #: the same op in the published layout (one program per row, ``published_layout``), where that peer exists
    published: Callable[[], Any] | None = None


@dataclass(frozen=True)
class OpSpec:
    name: str
    build: Callable[[Shapes, int, torch.dtype, torch.device, torch.Generator], Case]
    sweep: tuple = ()


def _x(gen, dev, dt, t, n, scale=1.0):
    return (scale * torch.randn(t, n, generator=gen, device=dev)).to(dt)


def _w(gen, dev, dt, n):
    return (1 + 0.1 * torch.randn(n, generator=gen, device=dev)).to(dt)


def _b(dt) -> int:
    return torch.empty((), dtype=dt).element_size()


# ---- the unfused model code the kernels replace -----------------------------------------------------------------
def unfused_rmsnorm_residual_scalar(x, w, residual, scalar):
    return (residual + rms_norm(x, w, EPS)) * scalar


def unfused_dual(x1, w1, x2, w2, w3, residual, scalar):
    return (residual + rms_norm(rms_norm(x1, w1, EPS) + rms_norm(x2, w2, EPS), w3, EPS)) * scalar


def unfused_dual_next(x1, w1, x2, w2, w3, residual, scalar, wn):
    out = unfused_dual(x1, w1, x2, w2, w3, residual, scalar)
    return out, rms_norm(out, wn, EPS)


def unfused_post_attention(attn_out, residual, w_pa, w_ff, w_ff2, router_scale):
    h = residual + rms_norm(attn_out, w_pa, EPS)
    return h, rms_norm(h, w_ff, EPS), rms_norm(h, w_ff2, EPS), (rms_norm(h, None, EPS) * router_scale
                                                                * attn_out.shape[-1] ** -0.5)


def unfused_qkv(q, k, v, qw, kw, cos, sin):
    t, d = q.shape[0], qw.shape[0]
    return (apply_rope(rms_norm(q.view(t, -1, d), qw, EPS), cos, sin),
            apply_rope(rms_norm(k.view(t, -1, d), kw, EPS), cos, sin), rms_norm(v.view(t, -1, d), None, EPS))


def unfused_gelu(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


# ---- builders -----------------------------------------------------------------------------------------------------
def _rms(s, t, dt, dev, gen) -> Case:
    h = s.hidden
    x, r, w, sc = _x(gen, dev, dt, t, h), _x(gen, dev, dt, t, h), _w(gen, dev, dt, h), torch.tensor([0.8], device=dev)
    out, out_pub = torch.empty_like(x), torch.empty_like(x)
    return Case((x, w, r, sc), unfused_rmsnorm_residual_scalar,
                lambda cfg=None: K.gemma_rmsnorm_residual_scalar(x, w, r, sc, out=out, config=cfg),
                3 * t * h * _b(dt) + h * _b(dt) + 4, K.row_config(h, dt, 2),  # read x, residual; write out
                published=lambda: published_layout.rmsnorm_residual_scalar(x, w, r, sc, out_pub))


def _dual_args(s, t, dt, dev, gen):
    h = s.hidden
    return (_x(gen, dev, dt, t, h), _w(gen, dev, dt, h), _x(gen, dev, dt, t, h), _w(gen, dev, dt, h),
            _w(gen, dev, dt, h), _x(gen, dev, dt, t, h), torch.tensor([0.8], device=dev))


def _dual(s, t, dt, dev, gen) -> Case:
    args, h = _dual_args(s, t, dt, dev, gen), s.hidden
    out, out_pub = torch.empty_like(args[0]), torch.empty_like(args[0])
    return Case(args, unfused_dual, lambda cfg=None: K.gemma_dual_rmsnorm_residual_scalar(*args, out=out, config=cfg),
                4 * t * h * _b(dt) + 3 * h * _b(dt) + 4, K.row_config(h, dt, 3),  # read x1, x2, residual; write
                published=lambda: published_layout.dual_rmsnorm_residual_scalar(*args, out_pub))


def _dual_next(s, t, dt, dev, gen) -> Case:
    h = s.hidden
    args = (*_dual_args(s, t, dt, dev, gen), _w(gen, dev, dt, h))
    outs = (torch.empty_like(args[0]), torch.empty_like(args[0]))
    return Case(args, unfused_dual_next,
                lambda cfg=None: K.gemma_dual_rmsnorm_residual_scalar_next_norm(*args, out=outs, config=cfg),
                5 * t * h * _b(dt) + 4 * h * _b(dt) + 4, K.row_config(h, dt, 3))  # + write next_in


def _post_attention(s, t, dt, dev, gen) -> Case:
    h = s.hidden
    args = (_x(gen, dev, dt, t, h), _x(gen, dev, dt, t, h), *(_w(gen, dev, dt, h) for _ in range(4)))
    outs = tuple(torch.empty_like(args[0]) for _ in range(4))
    return Case(args, unfused_post_attention,
                lambda cfg=None: K.gemma_post_attention_block(*args, out=outs, config=cfg),
                6 * t * h * _b(dt) + 4 * h * _b(dt), K.row_config(h, dt, 2))  # read 2, write 4 rows


def _qkv(kv_of: Callable[[Shapes], tuple[int, int]]):
    def build(s, t, dt, dev, gen) -> Case:
        (hkv, d), hq = kv_of(s), s.heads_q
        width = (hq + 2 * hkv) * d
        buf = _x(gen, dev, dt, t, width)
        pristine = buf.clone()
        q, k, v = buf[:, : hq * d], buf[:, hq * d : (hq + hkv) * d], buf[:, (hq + hkv) * d :]
        qw, kw = _w(gen, dev, dt, d), _w(gen, dev, dt, d)
        pos = torch.arange(t, device=dev, dtype=torch.float32)[:, None]
        inv_freq = 10000.0 ** (-torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d)
        ang = torch.cat((pos * inv_freq, pos * inv_freq), dim=-1)
        cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
        # read + write q, k, v; cos and sin (fp32) once per token; 2 weights
        return Case((q, k, v, qw, kw, cos, sin), unfused_qkv,
                    lambda cfg=None: K.gemma_qkv_norm_rope_(q, k, v, qw, kw, cos, sin, config=cfg),
                    2 * t * width * _b(dt) + 2 * t * d * 4 + 2 * d * _b(dt), K.head_config(t, d),
                    restore=lambda: buf.copy_(pristine))
    return build


def _tie_free_logits(gen, dev, dt, t: int, e: int) -> torch.Tensor:
    """Router logits without ties: each row a random permutation of ``e`` evenly spaced values in [-2, 2), every one
    exact in bf16. Random bf16 logits tie often (16 % of rows at 128 experts pick different experts under a
    different tie rule), and a tie broken the other way is not an arithmetic error: the accuracy column must not
    count it as one."""
    ranks = torch.argsort(torch.rand(t, e, generator=gen, device=dev), dim=-1).float()
    return ((ranks - e / 2) * (4.0 / e)).to(dt)


def _router(s, t, dt, dev, gen) -> Case:
    e, k = s.experts, s.top_k
    logits, scale = _tie_free_logits(gen, dev, dt, t, e), _w(gen, dev, dt, e)
    outs = (torch.empty(t, k, device=dev), torch.empty(t, k, device=dev, dtype=torch.int64))
    return Case((logits, scale, k), router_tail, lambda cfg=None: K.gemma_router_topk(logits, scale, k, out=outs,
                                                                                     config=cfg),
                t * e * _b(dt) + t * k * (4 + 8) + e * _b(dt), K.router_config(t, e))  # logits in; weights, ids out


def _gelu(s, t, dt, dev, gen) -> Case:
    i = s.intermediate
    gate_up = _x(gen, dev, dt, t, 2 * i)
    out = torch.empty(t, i, device=dev, dtype=dt)
    return Case((gate_up,), unfused_gelu, lambda cfg=None: K.gemma_gelu_tanh_mul(gate_up, out=out, config=cfg),
                3 * t * i * _b(dt), K.elementwise_config(t * i, dev))  # read gate and up; write out


_ROW_SWEEP = tuple(K.RowConfig(p, w, st) for p in (1, 2, 4) for w in (4, 8) for st in (2, 3))
SPECS: dict[str, OpSpec] = {spec.name: spec for spec in (
    OpSpec("rmsnorm_residual_scalar", _rms, _ROW_SWEEP),
    OpSpec("dual_rmsnorm_residual_scalar", _dual, _ROW_SWEEP),
    OpSpec("dual_rmsnorm_next_norm", _dual_next, _ROW_SWEEP),
    OpSpec("post_attention_block", _post_attention, _ROW_SWEEP),
    OpSpec("qkv_norm_rope_sliding", _qkv(lambda s: s.sliding_kv),
           tuple(K.HeadConfig(r, w) for r in (2, 4, 8, 16) for w in (2, 4, 8))),
    OpSpec("qkv_norm_rope_full", _qkv(lambda s: s.full_kv),
           tuple(K.HeadConfig(r, w) for r in (2, 4, 8, 16) for w in (2, 4, 8))),
    OpSpec("router_topk", _router, tuple(K.RouterConfig(r, w) for r in (4, 8, 16, 32) for w in (1, 2, 4))),
    OpSpec("gelu_tanh_mul", _gelu, tuple(K.ElementwiseConfig(b, w) for b in (1024, 2048, 4096, 8192)
                                         for w in (4, 8))),
)}


def sweep_configs(spec: OpSpec, case: Case) -> list:
    """The sweep grid, with the row family's rows per block kept at the heuristic's (it is set by the hidden size)."""
    if isinstance(case.heuristic, K.RowConfig):
        return [replace(c, rows=case.heuristic.rows) for c in spec.sweep]
    return list(spec.sweep)
