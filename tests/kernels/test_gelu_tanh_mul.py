"""``gemma_gelu_tanh_mul`` / ``gemma_gelu_tanh_and_mul``: Gemma's gated GELU(tanh), fp32 inside, one rounding."""

from __future__ import annotations

import pytest
import torch
from support import BF16, FP32, act, assert_rounded, oracle_gelu_mul

import gemma4lab.kernels as K

pytestmark = pytest.mark.usefixtures("triton_path_only")


@pytest.mark.parametrize("dtype,n,inter", [(FP32, 33, 100), (BF16, 33, 100), (BF16, 1, 64), (FP32, 3, 704)],
                         ids=str)
def test_matches_float64(gen, dtype, n, inter):
    gate_up = act(gen, n, 2 * inter, dtype=dtype, scale=3.0)  # wide range: exercises both sigmoid branches
    out = torch.full((n, inter), float("nan"), dtype=dtype)
    K.gemma_gelu_tanh_mul(gate_up, out=out)
    assert_rounded(out, oracle_gelu_mul(*gate_up.double().chunk(2, -1)), dtype)


def test_separate_strided_partial_block_and_bit_exact(gen):
    n, inter = 17, 48
    gate = act(gen, n, inter + 16, dtype=BF16, scale=3.0)[:, 8 : 8 + inter]
    up = act(gen, n, inter, dtype=BF16)
    got = K.gemma_gelu_tanh_and_mul(gate, up, config=K.ElementwiseConfig(256, 2))  # 4 programs, last one partial
    assert_rounded(got, oracle_gelu_mul(gate.double(), up.double()), BF16)
    assert torch.equal(got, K.gemma_gelu_tanh_and_mul(gate.float(), up.float()).to(BF16))


def test_zero_tokens():
    assert K.gemma_gelu_tanh_mul(torch.empty(0, 20)).shape == (0, 10)


def test_rejects():
    with pytest.raises(ValueError, match="must be even"):
        K.gemma_gelu_tanh_mul(torch.randn(3, 7))
    with pytest.raises(ValueError, match="hidden size 5, expected 4"):
        K.gemma_gelu_tanh_and_mul(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match="mixed dtypes"):
        K.gemma_gelu_tanh_and_mul(torch.randn(3, 4), torch.randn(3, 4, dtype=BF16))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 1055, 4099])
def test_gpu_matches_float64(gen, n):
    gate_up = act(gen, n, 2 * 704, dtype=BF16, scale=3.0).cuda()
    assert_rounded(K.gemma_gelu_tanh_mul(gate_up), oracle_gelu_mul(*gate_up.double().chunk(2, -1)), BF16)
