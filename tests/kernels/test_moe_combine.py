"""``gemma_moe_combine``: un-sort the expert outputs and weight them in fp32, one rounding."""

from __future__ import annotations

import pytest
import torch
from support import BF16, FP32, assert_rounded

import gemma4lab.kernels as K

pytestmark = pytest.mark.usefixtures("triton_path_only")


def _case(t, k, h, dtype, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    ys = torch.randn(t * k, h, generator=g).to(dtype)
    order = torch.randperm(t * k, generator=g)
    positions = torch.empty_like(order)
    positions[order] = torch.arange(t * k)
    w = torch.rand(t, k, generator=g)
    return ys.to(device), positions.to(device), w.to(device)


def oracle(ys, positions, w):
    t, k = w.shape
    return (ys.double()[positions].view(t, k, -1) * w.double()[..., None]).sum(1)


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("t", [7, 130])  # 130: several tokens a program under the interpreter, and a masked tail
def test_unsorts_and_weights_in_fp32(dtype, t):
    ys, positions, w = _case(t, 3, 200, dtype)
    out = torch.full((t, 200), float("nan"), dtype=dtype)  # poisoned: every token row must be written
    torch.ops.gemma4lab.moe_combine(ys, positions, w, out)
    assert_rounded(out, oracle(ys, positions, w), dtype)


@pytest.mark.parametrize("rows", [1, 4])  # the GPU's one token a program; a part-filled last program
def test_other_tokens_per_program(rows):
    ys, positions, w = _case(7, 3, 200, FP32)
    got = K.gemma_moe_combine(ys, positions, w, config=K.CombineConfig(num_warps=4, rows=rows))
    assert_rounded(got, oracle(ys, positions, w), FP32)


def test_rejects():
    ys, positions, w = _case(7, 3, 200, FP32)
    with pytest.raises(ValueError, match="positions"):
        K.gemma_moe_combine(ys, positions[:-1], w)
    with pytest.raises(TypeError, match="int32/int64"):
        K.gemma_moe_combine(ys, positions.float(), w)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 93, 4099])
def test_gpu_real_shapes_against_float64(t):
    ys, positions, w = _case(t, 8, 2816, BF16, device="cuda", seed=t)
    assert_rounded(K.gemma_moe_combine(ys, positions, w), oracle(ys, positions, w), BF16)
