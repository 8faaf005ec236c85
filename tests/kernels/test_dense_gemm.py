"""``gemma_dense_gemm``: up to three dense projections of few rows in one launch, each weight streamed once.
Under the CPU interpreter in fp32 (its bf16 ``tl.dot`` is wrong); against float64 on a GPU in bf16 and fp32."""

from __future__ import annotations

import pytest
import torch
from support import BF16, FP32, assert_rounded, nan_like

import gemma4lab.kernels as K
from gemma4lab.kernels.dense_gemm import DenseConfig, dense_config

pytestmark = pytest.mark.usefixtures("triton_path_only")


def _case(m, ns, k, seed=0, dtype=FP32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    ws = [(k**-0.5 * torch.randn(n, k, generator=g)).to(dtype) for n in ns]
    return x.to(device), [w.to(device) for w in ws]


def oracle(x, ws):
    """float64, weight by weight, concatenated along the columns."""
    return torch.cat([x.double() @ w.double().T for w in ws], dim=1)


def _assert_gemm(got, x, ws, dtype):
    """A K-long dot in fp32 accumulates ~√K·2⁻²⁴ relative error per output on top of the output's rounding."""
    k = x.shape[1]
    assert_rounded(got, oracle(x, ws), dtype, math_err=max(2e-6, k**0.5 * 2**-22))


# rows: 1 (decode), odd, a full 16-row tile, 17 (two row tiles); weights: one, q/k/v-like with odd sizes, N = 1;
# K not a multiple of any step
@pytest.mark.parametrize("m,ns,k", [(1, [100], 300), (3, [70, 1, 33], 257), (16, [64, 64], 128),
                                    (17, [130, 17], 500), (5, [1], 40)])
def test_matches_float64(m, ns, k):
    x, ws = _case(m, ns, k)
    assert K.kernel_backend(x) == "triton-interpreter"
    out = nan_like(torch.empty(m, sum(ns)))  # poisoned: every element must be written
    y = K.gemma_dense_gemm(x, ws, out=out)
    assert y is out
    _assert_gemm(y, x, ws, FP32)


@pytest.mark.parametrize("cfg", [DenseConfig(block_m=16, block_n=16, block_k=64, split_k=3),
                                 DenseConfig(block_m=32, block_n=32, block_k=32, split_k=7),
                                 DenseConfig(block_m=16, block_n=16, block_k=16, split_k=100)])
def test_split_k_ranges_add_up(cfg):
    """K in several ranges (more ranges asked than K steps: only those holding a step run), each an fp32 partial,
    summed by the second launch: the same product to fp32 rounding, every column of all three weights written."""
    x, ws = _case(9, [40, 7, 33], 261, seed=1)
    y = K.gemma_dense_gemm(x, ws, out=nan_like(torch.empty(9, 80)), config=cfg)
    _assert_gemm(y, x, ws, FP32)


def test_a_rows_bits_do_not_depend_on_the_rows_beside_it():
    """What the decode graph and PCG's padded buckets rely on: a row computed among 3 rows and among 16 rows (the
    same tile, more rows) and alone gives the same bits."""
    x, ws = _case(16, [48, 24], 384, seed=2)
    full = K.gemma_dense_gemm(x, ws)
    assert torch.equal(K.gemma_dense_gemm(x[:3], ws), full[:3])
    assert torch.equal(K.gemma_dense_gemm(x[5:6], ws), full[5:6])


def test_settings_depend_on_the_weights_not_the_rows():
    """Every setting that changes a row's bits (weight tile, K step, split) is keyed on the weights' shapes; the
    row count only sets the row tile. The H200 sweep's choices: no split for wide grids, split below 40 tiles, six
    128-deep ranges at K = 8192."""
    for ns, k in (([4096, 2048, 2048], 2816), ([1024], 2816), ([2816], 8192), ([2816], 2112), ([262144], 2816)):
        a, b = dense_config(1, ns, k, interpreter=False), dense_config(16, ns, k, interpreter=False)
        assert (a.block_n, a.block_k, a.split_k) == (b.block_n, b.block_k, b.split_k) and a.block_m == b.block_m == 16
    card = lambda ns, k: dense_config(1, ns, k, interpreter=False)  # noqa: E731
    assert card([4096, 2048, 2048], 2816).split_k == 1 and card([1024], 2816).split_k > 1
    assert (card([2816], 8192).block_k, card([2816], 8192).split_k) == (128, 6)
    # fp32 takes half the K step: the same 40 KB a stage (bf16's step asked Triton 3.6 for 240 KB on the H200)
    assert dense_config(1, [2816], 2112, itemsize=4, interpreter=False).block_k == 128
    with pytest.raises(ValueError, match="itemsize"):
        dense_config(1, [4], 4, itemsize=8)
    with pytest.raises(ValueError, match="positive"):
        dense_config(0, [4], 4)


def test_bad_input_gets_a_clear_error():
    x, (w,) = _case(2, [8], 16)
    with pytest.raises(ValueError, match="K"):
        K.gemma_dense_gemm(x, torch.zeros(8, 15))
    with pytest.raises(TypeError, match="dtype"):
        K.gemma_dense_gemm(x, w.double())
    with pytest.raises(TypeError, match="float64 is for references"):
        K.gemma_dense_gemm(x.double(), w.double())
    with pytest.raises(TypeError, match="1 to 3"):
        K.gemma_dense_gemm(x, [w] * 4)
    with pytest.raises(TypeError, match="1 to 3"):
        K.gemma_dense_gemm(x, [])
    with pytest.raises(ValueError, match="contiguous"):
        K.gemma_dense_gemm(x, torch.zeros(16, 8).T)
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        K.gemma_dense_gemm(x[0], w)
    with pytest.raises(ValueError, match="out must be"):
        K.gemma_dense_gemm(x, w, out=torch.empty(2, 9))
    with pytest.raises(TypeError, match="DenseConfig"):
        K.gemma_dense_gemm(x, w, config={"block_m": 16})
    with pytest.raises(ValueError, match=">= 16"):
        DenseConfig(block_m=8)
    with pytest.raises(ValueError, match="split_k"):
        DenseConfig(split_k=0)
    assert K.gemma_dense_gemm(x[:0], w).shape == (0, 8)
    assert torch.equal(K.gemma_dense_gemm(x[:, :0], w[:, :0], config=DenseConfig(split_k=3)), torch.zeros(2, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, FP32])
@pytest.mark.parametrize("m", [1, 8, 16])
def test_gpu_real_shapes_against_float64(dtype, m):
    """The projections of the 26B-A4B decoder as the model groups them: q/k/v of a sliding layer in one launch,
    q/k of a full one, o of a full layer (six K ranges), gate/up, down; and the rows' bits independent of the count."""
    for ns, k in (([4096, 2048, 2048], 2816), ([8192, 1024], 2816), ([2816], 8192), ([2112, 2112], 2816),
                  ([2816], 2112)):
        x, ws = _case(16, ns, k, dtype=dtype, device="cuda")
        full = K.gemma_dense_gemm(x, ws)
        y = K.gemma_dense_gemm(x[:m], ws, out=nan_like(torch.empty(m, sum(ns), dtype=dtype, device="cuda")))
        _assert_gemm(y, x[:m], ws, dtype)
        assert torch.equal(y, full[:m])
