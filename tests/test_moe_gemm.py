"""The streaming expert GEMM, run as Triton code under the CPU interpreter (fp32: its bf16 ``tl.dot`` is wrong)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from gemma4lab.kernels import kernel_backend, moe_gemm


def _case(counts, h=96, i=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    e = len(counts)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    m = int(sum(counts))
    a = torch.randn(m, h, generator=g).to(dtype)
    w = (0.1 * torch.randn(e, 2 * i, h, generator=g)).to(dtype)
    wd = (0.1 * torch.randn(e, h, i, generator=g)).to(dtype)
    return a, w, wd, offs


def _ref(a, w, offs, gelu=False):
    a = a.double()
    if gelu:
        gt, up = a.chunk(2, dim=-1)
        a = torch.nn.functional.gelu(gt, approximate="tanh") * up
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        out.append(a[start:end] @ w[e].double().T)
        start = end
    return torch.cat(out)


@pytest.mark.parametrize("counts", [[3, 0, 17, 1], [1], [0, 0, 5], [33, 2, 0, 0, 9]])
def test_moe_gemm_matches_float64(counts):
    a, w, wd, offs = _case(counts)
    if torch.cuda.is_available():
        pytest.skip("interpreter test")
    assert kernel_backend(a) == "triton-interpreter"
    y = moe_gemm(a, w, offs)
    ref = _ref(a, w, offs)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
    y2 = moe_gemm(y, wd, offs, gelu_gate=True)
    ref2 = _ref(ref.float(), wd, offs, gelu=True)
    assert ((y2.double() - ref2).norm() / ref2.norm()).item() < 1e-5


def test_moe_gemm_zero_rows_and_bad_input():
    a, w, wd, offs = _case([0, 0])
    assert moe_gemm(a, w, offs).shape == (0, w.shape[1])
    a, w, wd, offs = _case([2, 3])
    with pytest.raises(ValueError, match="columns"):
        moe_gemm(a[:, :50], w, offs)
    with pytest.raises(ValueError, match="int32"):
        moe_gemm(a, w, offs.long())
    with pytest.raises(TypeError, match="dtype"):
        moe_gemm(a.double(), w, offs)
    with pytest.raises(ValueError, match=r"a \[M, K\]"):
        moe_gemm(a[None], w, offs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_combine_unsorts_and_weights_in_fp32(dtype):
    from gemma4lab.kernels import moe_combine

    g = torch.Generator().manual_seed(1)
    t, k, h = 7, 3, 200
    ys = torch.randn(t * k, h, generator=g).to(dtype)
    order = torch.randperm(t * k, generator=g)
    positions = torch.empty_like(order)
    positions[order] = torch.arange(t * k)
    w = torch.rand(t, k, generator=g)
    out = torch.full((t, h), float("nan"), dtype=dtype)
    out = moe_combine(ys, positions, w)
    ref = (ys.double()[positions].view(t, k, h) * w.double()[..., None]).sum(1)
    bound = 1e-6 if dtype == torch.float32 else 8e-3
    assert ((out.double() - ref).norm() / ref.norm()).item() < bound
    with pytest.raises(ValueError, match="positions"):
        moe_combine(ys, positions[:-1], w)
