"""The published row layout (``gemma4lab.lab.bench.published_layout``, one program per row) computes the same
functions as our row kernels: checked against float64 like them, so ``bench-kernels`` compares equals."""

from __future__ import annotations

import pytest
import torch
from support import (
    BF16,
    FP32,
    ROW_CASES,
    act,
    assert_rounded,
    d,
    dual_inputs,
    nan_like,
    oracle_dual,
    oracle_rms_res,
    wt,
)

from gemma4lab.lab.bench import published_layout as P

pytestmark = pytest.mark.usefixtures("triton_path_only")


@pytest.mark.parametrize("dtype,n,h", ROW_CASES, ids=str)
def test_rmsnorm_residual_scalar_matches_float64(gen, dtype, n, h):
    x, r, w = act(gen, n, h, dtype=dtype), act(gen, n, h, dtype=dtype), wt(gen, h, dtype)
    s = torch.tensor([0.75])
    out = nan_like(x)
    assert P.rmsnorm_residual_scalar(x, w, r, s, out) is out
    assert_rounded(out, oracle_rms_res(*d(x, w, r, s)), dtype)


@pytest.mark.parametrize("dtype,n,h", ROW_CASES, ids=str)
def test_dual_matches_float64(gen, dtype, n, h):
    args = dual_inputs(gen, n, h, dtype)
    out = nan_like(args[0])
    P.dual_rmsnorm_residual_scalar(*args, out)
    assert_rounded(out, oracle_dual(*d(*args)), dtype)


def test_real_hidden_size_one_row_and_many(gen):
    """2816 is not a power of two: the 4096-wide block masks 1280 lanes, which must not enter the mean."""
    for n in (1, 37):
        x, r, w = act(gen, n, 2816, dtype=BF16), act(gen, n, 2816, dtype=BF16), wt(gen, 2816, BF16)
        s = torch.tensor([1.25])
        assert_rounded(P.rmsnorm_residual_scalar(x, w, r, s, nan_like(x)), oracle_rms_res(*d(x, w, r, s)), BF16)


def test_bad_input_is_refused(gen):
    x, r, w = act(gen, 4, 96), act(gen, 4, 96), wt(gen, 96)
    s = torch.tensor([1.0])
    with pytest.raises(ValueError, match="hidden size 64, expected 96"):
        P.rmsnorm_residual_scalar(x, w, act(gen, 4, 64), s, torch.empty_like(x))
    with pytest.raises(ValueError, match="weight 0 must have shape"):
        P.rmsnorm_residual_scalar(x, wt(gen, 64), r, s, torch.empty_like(x))
    with pytest.raises(ValueError, match="row stride"):
        P.rmsnorm_residual_scalar(x, w, act(gen, 4, 128)[:, :96], s, torch.empty_like(x))
    with pytest.raises(ValueError, match="one value"):
        P.rmsnorm_residual_scalar(x, w, r, torch.ones(2), torch.empty_like(x))
    with pytest.raises(TypeError, match="mixed dtypes"):
        P.rmsnorm_residual_scalar(x, w, r.to(FP32).to(BF16), s, torch.empty_like(x))
