"""``gemma_router_topk``: softmax → top-k → renormalise → × per-expert scale, in torch.topk's order."""

from __future__ import annotations

import pytest
import torch
from support import BF16, FP32, act, assert_rounded, oracle_router, wt  # noqa: F401

import gemma4lab.kernels as K

pytestmark = pytest.mark.usefixtures("triton_path_only")


@pytest.mark.parametrize("dtype,n,experts,k", [(FP32, 33, 8, 2), (FP32, 1, 8, 2), (BF16, 9, 8, 2),
                                               (FP32, 7, 128, 8)], ids=str)
def test_matches_float64(gen, dtype, n, experts, k):
    if dtype == BF16:  # distinct bf16-representable logits: no exact ties
        logits = torch.stack([torch.randperm(experts, generator=gen) for _ in range(n)]).float().div(8).to(dtype)
    else:
        logits = act(gen, n, experts, scale=2.0)
    scale = wt(gen, experts, dtype)
    bufs = (torch.full((n, k), float("nan")), torch.full((n, k), -1, dtype=torch.int64))
    w, ids = K.gemma_router_topk(logits, scale, k, out=bufs)
    ref_w, ref_ids = oracle_router(logits.double(), scale.double(), k)
    assert torch.equal(ids, ref_ids), "expert ids differ from torch.topk's selection order"
    assert w.dtype == FP32
    assert_rounded(w, ref_w, FP32, math_err=1e-6)  # fp32 math on (exactly upcast) logits in every dtype
    w32, ids32 = K.gemma_router_topk(logits, scale, k, ids_dtype=torch.int32)
    assert ids32.dtype == torch.int32 and torch.equal(ids32.long(), ref_ids) and torch.equal(w32, w)


def test_ties_go_to_lowest_index():
    logits = torch.tensor([[0.0, 1.0, 1.0, 0.5, 1.0, 0.0, 0.0, 0.0]])
    w, ids = K.gemma_router_topk(logits, torch.ones(8), 2)
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5]]))


def test_zero_tokens():
    weights, ids = K.gemma_router_topk(torch.empty(0, 8), torch.ones(8), 2)
    assert weights.shape == ids.shape == (0, 2)


def test_rejects():
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match="top_k=9 must be between 1 and the number of experts \\(8\\)"):
        K.gemma_router_topk(logits, torch.ones(8), 9)
    with pytest.raises(ValueError, match="7 elements, expected 8 \\(number of experts\\)"):
        K.gemma_router_topk(logits, torch.ones(7), 2)
    with pytest.raises(TypeError, match="top_k must be an int"):
        K.gemma_router_topk(logits, torch.ones(8), 2.0)
    with pytest.raises(TypeError, match="ids_dtype"):
        K.gemma_router_topk(logits, torch.ones(8), 2, ids_dtype=torch.int16)
    with pytest.raises(ValueError, match="2-D"):
        K.gemma_router_topk(torch.randn(8), torch.ones(8), 2)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 1055, 4099])
def test_gpu_matches_float64(gen, n):
    logits, scale = act(gen, n, 128, scale=2.0).cuda(), wt(gen, 128).cuda()
    w, ids = K.gemma_router_topk(logits, scale, 8)
    ref_w, ref_ids = oracle_router(logits.double(), scale.double(), 8)
    assert torch.equal(ids, ref_ids)
    assert_rounded(w, ref_w, FP32, math_err=1e-6)
