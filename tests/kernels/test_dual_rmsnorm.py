"""The MoE epilogue ``gemma_dual_rmsnorm_residual_scalar`` and its cross-layer variant ``..._next_norm``."""

from __future__ import annotations

import pytest
import torch
from support import (
    BF16,
    ROW_CASES,
    assert_rounded,
    d,
    dual_inputs,
    nan_like,
    oracle_dual,
    oracle_dual_next,
    wt,
)

import gemma4lab.kernels as K
from gemma4lab.kernels import RowConfig

pytestmark = pytest.mark.usefixtures("triton_path_only")


@pytest.mark.parametrize("dtype,n,h", ROW_CASES + [(BF16, 7, 2816)], ids=str)
def test_dual_matches_float64(gen, dtype, n, h):
    args = dual_inputs(gen, n, h, dtype)
    out = nan_like(args[0])
    K.gemma_dual_rmsnorm_residual_scalar(*args, out=out)
    assert_rounded(out, oracle_dual(*d(*args)), dtype)


def test_dual_single_rounding_is_bit_exact(gen):
    args = [t.to(BF16) if t.dim() else t for t in dual_inputs(gen, 9, 200, BF16)]
    assert torch.equal(K.gemma_dual_rmsnorm_residual_scalar(*args),
                       K.gemma_dual_rmsnorm_residual_scalar(*[a.float() for a in args]).to(BF16))


@pytest.mark.parametrize("config", [RowConfig(1, 4, 1, 1), RowConfig(3, 2, 2, 2), RowConfig(2, 4, 3, 8)], ids=str)
def test_dual_launch_config_override(gen, config):
    args = dual_inputs(gen, 13, 200, BF16)
    assert_rounded(K.gemma_dual_rmsnorm_residual_scalar(*args, config=config), oracle_dual(*d(*args)), BF16)


@pytest.mark.parametrize("dtype,n,h", ROW_CASES + [(BF16, 5, 2816)], ids=str)
def test_next_norm_matches_float64_and_the_two_steps(gen, dtype, n, h):
    args = dual_inputs(gen, n, h, dtype) + [wt(gen, h, dtype)]
    bufs = (nan_like(args[0]), nan_like(args[0]))
    out, nxt = K.gemma_dual_rmsnorm_residual_scalar_next_norm(*args, out=bufs)
    assert out is bufs[0] and nxt is bufs[1]
    ref_out, ref_next = oracle_dual_next(*d(*args), dtype)
    assert_rounded(out, ref_out, dtype)
    assert_rounded(nxt, ref_next, dtype)
    assert torch.equal(out, K.gemma_dual_rmsnorm_residual_scalar(*args[:7]))  # the second step reads the rounded out


def test_zero_tokens(gen):
    x, w, s = torch.empty(0, 96), wt(gen, 96), torch.ones(1)
    assert K.gemma_dual_rmsnorm_residual_scalar(x, w, x, w, w, x, s).shape == (0, 96)
    out, nxt = K.gemma_dual_rmsnorm_residual_scalar_next_norm(x, w, x, w, w, x, s, w)
    assert out.shape == nxt.shape == (0, 96)


def test_rejects():
    h, x, w, s = 96, torch.randn(3, 96), torch.ones(96), torch.ones(1)
    with pytest.raises(ValueError, match="weight3 has 95 elements"):
        K.gemma_dual_rmsnorm_residual_scalar(x, w, x, w, torch.ones(95), x, s)
    with pytest.raises(TypeError, match="x2 has dtype"):
        K.gemma_dual_rmsnorm_residual_scalar(x, w, x.to(BF16), w, w, x, s)
    with pytest.raises(ValueError, match="next_weight has 97 elements"):
        K.gemma_dual_rmsnorm_residual_scalar_next_norm(x, w, x, w, w, x, s, torch.ones(97))
    with pytest.raises(TypeError, match="tuple of 2 tensors"):
        K.gemma_dual_rmsnorm_residual_scalar_next_norm(x, w, x, w, w, x, s, w, out=torch.empty(3, h))
    with pytest.raises(TypeError, match="RowConfig"):
        K.gemma_dual_rmsnorm_residual_scalar(x, w, x, w, w, x, s, config=(1, 4))


#: Compiled on an H200 (2026-11-30), a few elements in a million land up to ~2.7 bf16 roundings from the float64
#: value at hidden 2816 (the same Triton code under the interpreter stays within one); the cause is not established
#: yet, so the GPU bound is three roundings, elementwise.
GPU_ROUNDINGS = 3


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 1055, 4099])
def test_gpu_matches_float64(gen, n):
    args = [t.cuda() for t in dual_inputs(gen, n, 2816, BF16)]
    wn = wt(gen, 2816, BF16).cuda()
    assert_rounded(K.gemma_dual_rmsnorm_residual_scalar(*args), oracle_dual(*d(*args)), BF16, GPU_ROUNDINGS)
    out, nxt = K.gemma_dual_rmsnorm_residual_scalar_next_norm(*args, wn)
    ref_out, ref_next = oracle_dual_next(*d(*args, wn), BF16)
    assert_rounded(out, ref_out, BF16, GPU_ROUNDINGS)
    assert_rounded(nxt, ref_next, BF16, GPU_ROUNDINGS)


@pytest.mark.gpu
def test_gpu_cuda_graph_reads_scalar_at_replay(gen):
    """The scalar is read inside the kernel: updating it in place changes what a captured graph computes."""
    args = [t.cuda() for t in dual_inputs(gen, 64, 2816, BF16)]
    out = torch.empty_like(args[0])
    K.gemma_dual_rmsnorm_residual_scalar(*args, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        K.gemma_dual_rmsnorm_residual_scalar(*args, out=out)
    args[6].fill_(2.5)
    graph.replay()
    torch.cuda.synchronize()
    assert_rounded(out, oracle_dual(*d(*args)), BF16)
