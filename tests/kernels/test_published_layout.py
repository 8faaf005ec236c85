"""The published row layout (``gemma4lab.lab.bench.published_layout``, one program per row) computes the same
functions as our row kernels: checked against float64 like them, so ``bench-kernels`` compares equals."""

from __future__ import annotations

import pytest
import support as S
import torch

from gemma4lab.lab.bench import published_layout as P

pytestmark = pytest.mark.usefixtures("triton_path_only")


def _rms_case(gen, dtype, n, h):
    return (S.act(gen, n, h, dtype=dtype), S.wt(gen, h, dtype), S.act(gen, n, h, dtype=dtype), torch.tensor([0.75]))


# (the published kernel, how to draw its inputs, its float64 oracle): both epilogues of the comparison
IMPLS = {"rmsnorm_residual_scalar": (P.rmsnorm_residual_scalar, _rms_case, S.oracle_rms_res),
         "dual_rmsnorm_residual_scalar": (P.dual_rmsnorm_residual_scalar, S.dual_inputs, S.oracle_dual)}


@pytest.mark.parametrize("op", IMPLS)
@pytest.mark.parametrize("dtype,n,h", S.ROW_CASES, ids=str)
def test_matches_float64(gen, op, dtype, n, h):
    kernel, inputs, oracle = IMPLS[op]
    args = inputs(gen, dtype, n, h) if op.startswith("rms") else inputs(gen, n, h, dtype)
    out = S.nan_like(args[0])
    assert kernel(*args, out) is out
    S.assert_rounded(out, oracle(*S.d(*args)), dtype)


def test_real_hidden_size_one_row_and_many(gen):
    """2816 is not a power of two: the 4096-wide block masks 1280 lanes, which must not enter the mean."""
    for n in (1, 37):
        x, r, w = S.act(gen, n, 2816, dtype=S.BF16), S.act(gen, n, 2816, dtype=S.BF16), S.wt(gen, 2816, S.BF16)
        s = torch.tensor([1.25])
        got = P.rmsnorm_residual_scalar(x, w, r, s, S.nan_like(x))
        S.assert_rounded(got, S.oracle_rms_res(*S.d(x, w, r, s)), S.BF16)


def test_bad_input_is_refused(gen):
    x, r, w = S.act(gen, 4, 96), S.act(gen, 4, 96), S.wt(gen, 96)
    s = torch.tensor([1.0])
    with pytest.raises(ValueError, match="hidden size 64, expected 96"):
        P.rmsnorm_residual_scalar(x, w, S.act(gen, 4, 64), s, torch.empty_like(x))
    with pytest.raises(ValueError, match="weight 0 must have shape"):
        P.rmsnorm_residual_scalar(x, S.wt(gen, 64), r, s, torch.empty_like(x))
    with pytest.raises(ValueError, match="row stride"):
        P.rmsnorm_residual_scalar(x, w, S.act(gen, 4, 128)[:, :96], s, torch.empty_like(x))
    with pytest.raises(ValueError, match="one value"):
        P.rmsnorm_residual_scalar(x, w, r, torch.ones(2), torch.empty_like(x))
    with pytest.raises(TypeError, match="mixed dtypes"):
        P.rmsnorm_residual_scalar(x, w, r.to(S.FP32).to(S.BF16), s, torch.empty_like(x))
