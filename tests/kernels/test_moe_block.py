"""The MoE block end to end on the tiny config (fp32 under the interpreter): the fused path (``moe_route`` →
``moe_gemm`` gathering tokens → ``moe_gemm`` with the GELU → ``moe_combine``) against float64, like the unfused
path; and how many ops it dispatches, against the fused path before ``moe_route`` existed."""

from __future__ import annotations

import pytest
import torch
from support import FP32, assert_rounded

import gemma4lab
import gemma4lab.kernels as K
from gemma4lab import Fusion
from gemma4lab.kernels import moe_combine, moe_gemm, moe_route
from gemma4lab.lab.profiling import profile_forward

pytestmark = pytest.mark.usefixtures("triton_path_only")


@pytest.fixture(scope="module")
def layer(tiny_text_config):
    model = gemma4lab.random_init(tiny_text_config, dtype=torch.float32, seed=3, std=0.1)
    return next(lay for lay in model.language_model.layers if lay.moe)


def _inputs(layer, t, seed=0, skew=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, layer.experts.gate_up_proj.shape[2], generator=g)
    logits = torch.randn(t, layer.experts.num_experts, generator=g)
    if skew is not None:
        logits[:, : skew[0]] += skew[1]  # a few hot experts, the others mostly empty
    weights, idx = K.gemma_router_topk(logits, layer.router.per_expert_scale, layer.router.top_k)
    return x, idx, weights


def _float64_truth(layer, x, idx, weights):
    """The unfused path (one matmul per expert, plain torch) in float64."""
    e = layer.experts
    with torch.no_grad():
        e64 = type(e).__new__(type(e))
        torch.nn.Module.__init__(e64)
        e64.num_experts = e.num_experts
        e64.gate_up_proj = torch.nn.Parameter(e.gate_up_proj.double())
        e64.down_proj = torch.nn.Parameter(e.down_proj.double())
        return e64(x.double(), idx, weights.double())


def _bound(layer):
    """Two chained fp32 dots (H, then I long) and a k-term fp32 sum: ~sqrt(length)·2⁻²⁴ each, relative to the
    output's scale, with a factor 4 for the GELU between them (its derivative is below 1.13)."""
    _, two_i, h = layer.experts.gate_up_proj.shape
    return 4 * (h**0.5 + (two_i // 2) ** 0.5 + layer.router.top_k) * 2**-24


@pytest.mark.parametrize("t,skew", [(1, None), (37, None), (93, None), (256, None), (60, (2, 6.0))],
                         ids=["T=1", "T=37", "T=93", "T=256 (largest for moe_gemm)", "skewed"])
def test_fused_equals_unfused_within_fp32_rounding(layer, t, skew):
    x, idx, weights = _inputs(layer, t, seed=t, skew=skew)
    assert t <= layer.experts.MOE_GEMM_MAX_TOKENS
    truth = _float64_truth(layer, x, idx, weights)
    fused = layer.experts(x, idx, weights, fused_act=True, fused_gemm=True)
    unfused = layer.experts(x, idx, weights)
    for got in (fused, unfused):
        assert_rounded(got, truth, FP32, math_err=_bound(layer))


def _gpu_launches_only(monkeypatch):
    """The wrappers read index values back when they are on the host (CPU-only checks a GPU never runs): off, so
    the count is what the device path dispatches."""
    for mod in (moe_route, moe_gemm, moe_combine):
        monkeypatch.setattr(mod, "host_values", lambda t: False)


def _before_moe_route(experts, x, idx, weights):
    """The fused path before this kernel (main at 8a59900): argsort, scatter_add count, cumsum, gather, two
    moe_gemm, inverse-permutation scatter, moe_combine."""
    ys, order = experts._grouped(x, idx, True, use_kernel=True)
    positions = torch.empty_like(order)
    positions[order] = torch.arange(order.numel())
    return K.gemma_moe_combine(ys, positions, weights)


#: Ops that launch nothing unless one of their children does: allocations, views, casts to what the input already is.
_NO_KERNEL = ("aten::empty", "aten::empty_like", "aten::empty_strided", "aten::to", "aten::contiguous",
              "aten::reshape", "aten::view", "aten::_reshape_alias", "aten::as_strided")


def _launches(e) -> bool:
    return e.name not in _NO_KERNEL or any(_launches(c) for c in e.cpu_children)


def _top_level_ops(fn) -> list[str]:
    """Every op dispatched at the top level that would launch a GPU kernel. Stricter than the profiler's proxy,
    which skips ops whose only children are views (``mm``, ``index``, ``floor_divide``)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sorted(e.name for e in prof.events() if e.cpu_parent is None
                  and e.name.startswith(("aten::", "gemma4lab::")) and _launches(e))


def test_fused_block_dispatches_four_kernels(layer, monkeypatch):
    _gpu_launches_only(monkeypatch)
    x, idx, weights = _inputs(layer, 93)
    fused = lambda: layer.experts(x, idx, weights, fused_act=True, fused_gemm=True)
    prof = profile_forward(fused, warmup=1)
    assert dict(prof["top_kernels"]) == {"gemma4lab::moe_route": 1, "gemma4lab::moe_gemm": 2,
                                         "gemma4lab::moe_combine": 1}
    assert prof["kernels"] == 4
    assert _top_level_ops(fused) == ["gemma4lab::moe_combine", "gemma4lab::moe_gemm", "gemma4lab::moe_gemm",
                                     "gemma4lab::moe_route"]
    before = lambda: _before_moe_route(layer.experts, x, idx, weights)
    torch.testing.assert_close(fused(), before(), rtol=0, atol=0)  # same GEMMs on the same rows: identical bits
    assert profile_forward(before, warmup=1)["kernels"] >= 9
    assert len(_top_level_ops(before)) >= 11  # argsort, zeros, ones_like, scatter_add_, cumsum, //, index, ...


def test_fused_moe_layer_dispatches(layer, monkeypatch):
    """The whole second half of a MoE layer, every fusion on: 8 gemma4lab kernels and the 5 projections (attention
    output, dense gate/up/down, router), nothing else."""
    _gpu_launches_only(monkeypatch)
    t, h = 93, layer.experts.gate_up_proj.shape[2]
    g = torch.Generator().manual_seed(5)
    o = torch.randn(t, layer.self_attn.o_proj.in_features, generator=g)
    res = torch.randn(t, h, generator=g)
    next_norm = torch.ones(h)
    ops = _top_level_ops(lambda: layer.post_attention(o, res, next_norm, Fusion.all()))
    kernels = [n for n in ops if n.startswith("gemma4lab::")]
    assert kernels == sorted(f"gemma4lab::{n}" for n in (
        "post_attention_block", "gelu_tanh_and_mul", "router_topk", "moe_route", "moe_gemm", "moe_gemm",
        "moe_combine", "dual_rmsnorm_residual_scalar_next_norm"))
    assert [n for n in ops if not n.startswith("gemma4lab::")] == ["aten::linear"] * 5
