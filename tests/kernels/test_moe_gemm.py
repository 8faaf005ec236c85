"""``gemma_moe_gemm``: the streaming grouped expert GEMM (GELU fused into the down projection's operand load).
Under the CPU interpreter in fp32 (its bf16 ``tl.dot`` is wrong); against float64 on a GPU in bf16 and fp32."""

from __future__ import annotations

import pytest
import torch
from support import BF16, FP32, UNIT, assert_rounded

import gemma4lab.kernels as K

pytestmark = pytest.mark.usefixtures("triton_path_only")


def _case(counts, h=96, i=40, seed=0, dtype=FP32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    a = torch.randn(int(sum(counts)), h, generator=g).to(dtype)
    w = (0.1 * torch.randn(len(counts), 2 * i, h, generator=g)).to(dtype)
    wd = (0.1 * torch.randn(len(counts), h, i, generator=g)).to(dtype)
    return [t.to(device) for t in (a, w, wd, offs)]


def oracle(a, w, offs, gelu=False, magnitude=False):
    """float64, one expert at a time (the routed rows are sorted by expert). ``magnitude``: the same product of the
    absolute values, ``Σ_k |a_k w_k|`` per output, which bounds what rounding each operand costs."""
    a = a.double()
    if gelu:
        gt, up = a.chunk(2, dim=-1)
        a = torch.nn.functional.gelu(gt, approximate="tanh") * up
    if magnitude:
        a = a.abs()
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        out.append(a[start:end] @ (w[e].double().abs() if magnitude else w[e].double()).T)
        start = end
    return torch.cat(out)


def _assert_gemm(got, ref, dtype, k):
    """A K-long dot in fp32 accumulates ~√K·2⁻²⁴ relative error per output on top of the output's rounding."""
    assert_rounded(got, ref, dtype, math_err=max(2e-6, k**0.5 * 2**-22))


def _assert_gelu_gemm(got, y, wd, offs, dtype):
    """The fused GELU rounds each activation to the weights' dtype before the tensor-core dot (as the unfused model
    does): at most one rounding of every product, i.e. |error| <= u·Σ|a_k w_k| per output, plus the output's own
    rounding and the fp32 accumulation. A bound derived from the operands, not a fudge factor."""
    exact = oracle(y, wd, offs, gelu=True)
    bound = UNIT[dtype] * oracle(y, wd, offs, gelu=True, magnitude=True) + UNIT[dtype] * exact.abs() \
        + wd.shape[2] ** 0.5 * 2**-22 * float(exact.abs().max())
    err = (got.double() - exact).abs()
    assert torch.isfinite(got).all() and (err <= bound).all(), f"worst excess {float((err - bound).max()):.3g}"


@pytest.mark.parametrize("counts", [[3, 0, 17, 1], [1], [0, 0, 5], [33, 2, 0, 0, 9]])
def test_matches_float64(counts):
    a, w, wd, offs = _case(counts)
    assert K.kernel_backend(a) == "triton-interpreter"
    y = K.gemma_moe_gemm(a, w, offs)
    _assert_gemm(y, oracle(a, w, offs), FP32, a.shape[1])
    y2 = K.gemma_moe_gemm(y, wd, offs, gelu_gate=True)
    _assert_gelu_gemm(y2, y, wd, offs, FP32)


def test_zero_rows_and_bad_input():
    a, w, wd, offs = _case([0, 0])
    assert K.gemma_moe_gemm(a, w, offs).shape == (0, w.shape[1])
    a, w, wd, offs = _case([2, 3])
    with pytest.raises(ValueError, match="columns"):
        K.gemma_moe_gemm(a[:, :50], w, offs)
    with pytest.raises(ValueError, match="int32"):
        K.gemma_moe_gemm(a, w, offs.long())
    with pytest.raises(TypeError, match="dtype"):
        K.gemma_moe_gemm(a.double(), w, offs)
    with pytest.raises(ValueError, match=r"a \[M, K\]"):
        K.gemma_moe_gemm(a[None], w, offs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, FP32])
@pytest.mark.parametrize("counts", [[6] * 128, [0, 40, 1, 0, 300] + [3] * 123])
def test_gpu_real_shapes_against_float64(dtype, counts):
    """H = 2816, I = 704, 128 experts: uniform and skewed row counts (an expert with several row tiles)."""
    a, w, wd, offs = _case(counts, h=2816, i=704, dtype=dtype, device="cuda")
    y = K.gemma_moe_gemm(a, w, offs)
    _assert_gemm(y, oracle(a, w, offs), dtype, 2816)
    _assert_gelu_gemm(K.gemma_moe_gemm(y, wd, offs, gelu_gate=True), y, wd, offs, dtype)
