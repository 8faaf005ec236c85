"""Property-based tests (hypothesis) over the argument space of the public kernels and the config loader, run under
the Triton interpreter: every input either gives the reference's answer or a clear ``ValueError``/``TypeError`` —
never another exception, a crash or a silent wrong answer. Budgets keep the whole file to a few seconds a test."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma4lab import Gemma4Config
from gemma4lab import kernels as K

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLEAR = (ValueError, TypeError)

junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=4), st.lists(st.integers(0, 2), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@pytest.fixture(scope="module")
def tiny_hf(tiny_config):
    return tiny_config.to_hf_dict()


@FAST
@given(data=st.data())
def test_config_loader_accepts_or_refuses_clearly(tiny_hf, data):
    d = copy.deepcopy(tiny_hf)
    section = data.draw(st.sampled_from(["text_config", "vision_config", None]))
    target = d if section is None else d[section]
    for key in data.draw(st.lists(st.sampled_from(sorted(target)), min_size=1, max_size=3, unique=True)):
        target[key] = data.draw(junk)
    try:
        cfg = Gemma4Config.from_hf_dict(d)
    except CLEAR:
        return
    assert cfg.text.num_hidden_layers >= 1 and cfg.text.hidden_size >= 1


def _rows(draw, n, h, dtype, strided):
    x = torch.randn(n, h * (2 if strided else 1)).to(dtype)
    return x[:, :h] if strided else x


@FAST
@given(n=st.integers(0, 5), h=st.integers(1, 40), dtype=st.sampled_from([torch.float32, torch.bfloat16,
                                                                         torch.float64, torch.int32]),
       w_len=st.integers(-1, 1), scalar_shape=st.sampled_from([(1,), (), (2,)]), strided=st.booleans(),
       res_dtype_same=st.booleans())
def test_row_kernel_matches_reference_or_refuses(n, h, dtype, w_len, scalar_shape, strided, res_dtype_same):
    x = _rows(None, n, h, dtype, strided)
    r = torch.randn(n, h).to(dtype if res_dtype_same else torch.float16)
    w = (1 + 0.1 * torch.randn(max(1, h + w_len))).to(torch.float32)
    s = torch.full(scalar_shape, 0.9)
    try:
        out = K.gemma_rmsnorm_residual_scalar(x, w, r, s)
    except CLEAR:
        return
    ref = K.gemma_rmsnorm_residual_scalar_ref(x, w, r, s)
    tol = 2**-8 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@FAST
@given(counts=st.lists(st.integers(-2, 4), min_size=1, max_size=4), extra=st.integers(-2, 2))
def test_moe_gemm_matches_reference_or_refuses(counts, extra):
    ends = [sum(counts[: i + 1]) for i in range(len(counts))]
    m = max(0, (ends[-1] if ends else 0) + extra)
    a = torch.randn(m, 8)
    w = torch.randn(len(counts), 4, 8)
    offs = torch.tensor(ends, dtype=torch.int32)
    try:
        out = K.gemma_moe_gemm(a, w, offs)
    except CLEAR:
        return
    torch.testing.assert_close(out, K.gemma_moe_gemm_ref(a, w, offs), rtol=1e-5, atol=1e-5)


@FAST
@given(rows=st.integers(0, 20), ns=st.lists(st.integers(0, 40), min_size=0, max_size=4),
       k=st.sampled_from([0, 1, 17, 70]),
       k_off=st.sampled_from([0, 0, 0, 1]), dtype=st.sampled_from([torch.float32, torch.float64, torch.int32]),
       split=st.integers(0, 5))
def test_dense_gemm_matches_reference_or_refuses(rows, ns, k, k_off, dtype, split):
    """Any row count, zero to four weights of any size (one of them possibly of the wrong K), any dtype, any split."""
    x = torch.randn(rows, k).to(dtype)
    ws = [torch.randn(n, k + (k_off if i == 0 else 0)).to(dtype) for i, n in enumerate(ns)]
    try:
        cfg = K.DenseConfig(block_m=16, block_n=16, block_k=16, split_k=split) if split else None
        out = K.gemma_dense_gemm(x, ws, config=cfg)
    except CLEAR:
        return
    torch.testing.assert_close(out, K.gemma_dense_gemm_ref(x, ws), rtol=1e-5, atol=1e-5)


@FAST
@given(lens=st.lists(st.integers(-1, 6), min_size=1, max_size=3), extra=st.integers(-1, 1),
       max_extra=st.integers(-2, 2), window=st.sampled_from([None, 3]))
def test_attention_matches_reference_or_refuses(lens, extra, max_extra, window):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    n_rows = max(0, cu[-1] + extra)
    q = torch.randn(n_rows, 2, 16)
    k, v = torch.randn(n_rows, 1, 16), torch.randn(n_rows, 1, 16)
    longest = max(lens) + max_extra
    try:
        out = K.gemma_prefill_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), longest, window=window)
    except CLEAR:
        return
    ref = K.gemma_prefill_attention_ref(q, k, v, torch.tensor(cu, dtype=torch.int32), window=window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@FAST
@given(rows=st.integers(1, 4), e=st.sampled_from([4, 8, 6]), k=st.integers(0, 9),
       specials=st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 0.0]), max_size=4))
def test_router_ids_are_always_valid(rows, e, k, specials):
    logits = torch.randn(rows, e)
    for i, v in enumerate(specials):
        logits.view(-1)[i % logits.numel()] = v
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            w, ids = K.gemma_router_topk(logits, torch.ones(e), k)
    except CLEAR:
        assert not 1 <= k <= e
        return
    assert ((ids >= 0) & (ids < e)).all() and all(len(set(r.tolist())) == k for r in ids)
    w_ref, _ = K.gemma_router_topk_ref(logits, torch.ones(e), k)
    assert torch.equal(w.isnan(), w_ref.isnan())
