"""``gemma_post_attention_block``: residual + post-attention norm and the three FFN inputs from one read."""

from __future__ import annotations

import pytest
import torch
from support import (
    BF16,
    ROW_CASES,
    act,
    assert_rounded,
    d,
    nan_like,
    oracle_post_attention,
    wt,
)

import gemma4lab.kernels as K

pytestmark = pytest.mark.usefixtures("triton_path_only")


def _args(gen, n, h, dtype):
    return [act(gen, n, h, dtype=dtype, scale=4.0), act(gen, n, h, dtype=dtype)] + [wt(gen, h, dtype) for _ in range(4)]


@pytest.mark.parametrize("dtype,n,h", ROW_CASES + [(BF16, 6, 2816)], ids=str)
def test_matches_float64(gen, dtype, n, h):
    args = _args(gen, n, h, dtype)
    bufs = tuple(nan_like(args[0]) for _ in range(4))
    outs = K.gemma_post_attention_block(*args, out=bufs)
    assert all(o is b for o, b in zip(outs, bufs))
    for got, ref in zip(outs, oracle_post_attention(*d(*args), dtype)):
        assert_rounded(got, ref, dtype)


def test_zero_tokens(gen):
    x, w = torch.empty(0, 96), wt(gen, 96)
    assert [o.shape for o in K.gemma_post_attention_block(x, x, w, w, w, w)] == [(0, 96)] * 4


def test_rejects():
    h, x, w = 96, torch.randn(3, 96), torch.ones(96)
    with pytest.raises(ValueError, match="router_scale has 48 elements"):
        K.gemma_post_attention_block(x, x, w, w, w, torch.ones(48))
    with pytest.raises(ValueError, match=r"out\[2\] must have shape"):
        K.gemma_post_attention_block(x, x, w, w, w, w, out=(x.clone(), x.clone(), torch.empty(2, h), x.clone()))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 1055, 4099])
def test_gpu_matches_float64(gen, n):
    args = [t.cuda() for t in _args(gen, n, 2816, BF16)]
    for got, ref in zip(K.gemma_post_attention_block(*args), oracle_post_attention(*d(*args), BF16)):
        assert_rounded(got, ref, BF16, roundings=3)  # see test_dual_rmsnorm.GPU_ROUNDINGS


@pytest.mark.parametrize("dtype,n,h", ROW_CASES + [(BF16, 6, 1152)], ids=str)
def test_one_view_form_matches_float64(gen, dtype, n, h):
    """``gemma_norm_residual_norm``: the same kernel writing ``h`` and one view, a plain layer's norm sandwich (the
    vision encoder's, hidden 1152 in the real config)."""
    a, r, w_post, w_next = _args(gen, n, h, dtype)[:4]
    bufs = (nan_like(a), nan_like(a))
    outs = K.gemma_norm_residual_norm(a, r, w_post, w_next, out=bufs)
    assert all(o is b for o, b in zip(outs, bufs))
    refs = oracle_post_attention(*d(a, r, w_post, w_next, w_next, w_next), dtype)[:2]
    for got, ref in zip(outs, refs):
        assert_rounded(got, ref, dtype)
    for got, twin in zip(outs, K.gemma_norm_residual_norm_ref(a, r, w_post, w_next)):
        assert_rounded(got, twin.double(), dtype, roundings=2)
    assert [o.shape for o in K.gemma_norm_residual_norm(a[:0], r[:0], w_post, w_next)] == [(0, h)] * 2
    with pytest.raises(ValueError, match="w_next has"):
        K.gemma_norm_residual_norm(a, r, w_post, w_next[:-1])
