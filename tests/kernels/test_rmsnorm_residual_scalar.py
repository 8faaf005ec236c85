"""``gemma_rmsnorm_residual_scalar``: ``(rms(x)·w + residual)·scalar`` against float64, bad input, zero tokens."""

from __future__ import annotations

import pytest
import torch
from support import (
    BF16,
    FP16,
    FP32,
    ROW_CASES,
    act,
    assert_rounded,
    d,
    nan_like,
    oracle_rms_res,
    wt,
)

import gemma4lab.kernels as K

pytestmark = pytest.mark.usefixtures("triton_path_only")


@pytest.mark.parametrize("dtype,n,h", ROW_CASES, ids=str)
def test_matches_float64(gen, dtype, n, h):
    x, r, w = act(gen, n, h, dtype=dtype), act(gen, n, h, dtype=dtype), wt(gen, h, dtype)
    s = torch.tensor([0.75])
    out = nan_like(x)
    assert K.kernel_backend(x) == "triton-interpreter"
    assert K.gemma_rmsnorm_residual_scalar(x, w, r, s, out=out) is out
    assert_rounded(out, oracle_rms_res(*d(x, w, r, s)), dtype)


def test_hidden_2816_strided_fp32_weight_fp16(gen):
    n, h = 7, 2816
    x = act(gen, n, h + 64, dtype=BF16)[:, 32 : 32 + h]  # row stride > width
    r, w, s = act(gen, n, h, dtype=BF16), wt(gen, h, FP32), torch.tensor(1.25, dtype=BF16)  # 0-d bf16 scalar
    assert_rounded(K.gemma_rmsnorm_residual_scalar(x, w, r, s), oracle_rms_res(*d(x, w, r, s)), BF16)
    x16, r16, w16 = x.to(FP16), r.to(FP16), w.to(FP16)
    assert_rounded(K.gemma_rmsnorm_residual_scalar(x16, w16, r16, s), oracle_rms_res(*d(x16, w16, r16, s)), FP16)


def test_single_rounding_is_bit_exact(gen):
    """bf16 in -> fp32 math -> one rounding: identical bits to the fp32 kernel's output rounded by torch."""
    n, h = 9, 200
    args = [act(gen, n, h, dtype=BF16), wt(gen, h, BF16), act(gen, n, h, dtype=BF16), torch.tensor([0.5])]
    assert torch.equal(K.gemma_rmsnorm_residual_scalar(*args),
                       K.gemma_rmsnorm_residual_scalar(*[a.float() for a in args]).to(BF16))


def test_zero_tokens(gen):
    x, w = torch.empty(0, 96), wt(gen, 96)
    assert K.gemma_rmsnorm_residual_scalar(x, w, x, torch.ones(1)).shape == (0, 96)


def rms_call(x=None, w=None, r=None, s=None, **kw):
    h = 96
    x = torch.randn(4, h) if x is None else x
    return K.gemma_rmsnorm_residual_scalar(x, torch.ones(h) if w is None else w,
                                           torch.randn(4, h) if r is None else r,
                                           torch.ones(1) if s is None else s, **kw)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(x=torch.randn(2, 2, 96)), ValueError, "2-D"),
    (dict(r=torch.randn(4, 97)), ValueError, "hidden size 97, expected 96"),
    (dict(r=torch.randn(5, 96)), ValueError, "5 tokens, expected 4"),
    (dict(w=torch.ones(95)), ValueError, "95 elements, expected 96"),
    (dict(w=torch.ones(1, 96)), ValueError, "must be 1-D"),
    (dict(r=torch.randn(4, 96, dtype=BF16)), TypeError, "mixed dtypes"),
    (dict(w=torch.ones(96, dtype=FP16)), TypeError, "float32 or the activation dtype"),
    (dict(r=torch.randn(4, 96, device="meta")), ValueError, "is on meta"),
    (dict(w=torch.ones(96, device="meta")), ValueError, "is on meta"),
    (dict(x=torch.randn(96, 4).t()), ValueError, "contiguous last dim"),
    (dict(r=torch.randn(4, 192)[:, ::2]), ValueError, "contiguous last dim"),
    (dict(w=torch.ones(192)[::2]), ValueError, "must be contiguous"),
    (dict(s=torch.ones(2)), ValueError, "exactly one element"),
    (dict(s=0.5), TypeError, "one-element tensor"),
    (dict(s=torch.ones(1, dtype=torch.int32)), TypeError, "unsupported dtype"),
    (dict(x=torch.randn(4, 96, dtype=torch.float64)), TypeError, "unsupported dtype"),
    (dict(x=[[1.0] * 96] * 4), TypeError, "must be a torch.Tensor"),
    (dict(out=torch.empty(4, 95)), ValueError, r"out must have shape \(4, 96\)"),
    (dict(out=torch.empty(4, 96, dtype=BF16)), TypeError, "out must have dtype"),
    (dict(out=torch.empty(1, 96).expand(4, 96)), ValueError, "overlapping rows"),
])
def test_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rms_call(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 1055, 4099])
def test_gpu_matches_float64_at_hidden_2816(gen, n):
    x, r, w, s = act(gen, n, 2816, dtype=BF16).cuda(), act(gen, n, 2816, dtype=BF16).cuda(), \
        wt(gen, 2816, BF16).cuda(), torch.tensor([0.75], device="cuda")
    out = K.gemma_rmsnorm_residual_scalar(x, w, r, s)
    assert K.kernel_backend(out) == "triton"
    assert_rounded(out, oracle_rms_res(*d(x, w, r, s)), BF16)
