"""``gemma_moe_mlp``: the whole expert MLP of a few tokens in one launch (gate/up, GELU, down by intermediate
slices), finished by ``gemma_moe_combine(slices=)``. Under the CPU interpreter in fp32; on a GPU in bf16 at the
real shapes, against float64 and against the two-GEMM path."""

from __future__ import annotations

import pytest
import torch
from support import BF16, FP32, UNIT, assert_rounded, nan_like, routed_case

import gemma4lab.kernels as K
from gemma4lab.kernels.moe_mlp import mlp_slices

pytestmark = pytest.mark.usefixtures("triton_path_only")


def _case(t, k, n_experts, h=96, i=40, seed=0, dtype=FP32, device="cpu", skew=1.0):
    """Tokens, router-like ids, both weights (``support.routed_case``) and routing weights."""
    x, ids, w, wd = routed_case(t, k, n_experts, h, i, seed, dtype, device, skew)
    return x, ids, w, wd, torch.rand(t, k, generator=torch.Generator().manual_seed(seed + 1)).to(device)


def oracle(x, ids, w, wd, rw, dtype=FP32):
    """float64 MoE block from the formulas, token by token: Σ_j rw · down(gelu(gate) · up). In bf16 the gate/up
    outputs and the product are rounded to the dtype, as the model (and the two-GEMM path) rounds them."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    i = w.shape[1] // 2
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            gu = (w[e].double() @ x[t].double()).to(dtype).double()
            a = (torch.nn.functional.gelu(gu[:i], approximate="tanh") * gu[i:]).to(dtype).double()
            out[t] += float(rw[t, j]) * (wd[e].double() @ a).to(dtype).double()
    return out


def _block(x, ids, w, wd, rw):
    offs, slots, pos = K.gemma_moe_route(ids, w.shape[0])
    parts = K.gemma_moe_mlp(x, w, wd, offs, slots, ids.shape[1])
    return parts, K.gemma_moe_combine(parts, pos, rw, slices=mlp_slices(wd.shape[2]), out_dtype=x.dtype)


def _bound(w):
    """Two chained fp32 dots (H, then I long, the second in slices) and a k-term fp32 sum, relative to the output's
    largest value, with a factor 4 for the GELU between them (as tests/kernels/test_moe_block.py)."""
    _, two_i, h = w.shape
    return 4 * (h**0.5 + (two_i // 2) ** 0.5 + 8) * 2**-24


@pytest.mark.parametrize("t,k,n_experts,skew", [(1, 2, 8, 1.0), (3, 2, 9, 1.0), (16, 4, 8, 1.0), (40, 2, 4, 3.0)],
                         ids=["one token", "M < E", "16 tokens", "experts with > 16 rows"])
def test_block_matches_float64(t, k, n_experts, skew):
    """I = 40 is one full 32-column slice and a masked 8-column one; 40 tokens over 4 experts (skewed) give an
    expert more rows than the 16-row tile, so the program loops over row tiles."""
    x, ids, w, wd, rw = _case(t, k, n_experts, skew=skew)
    assert K.kernel_backend(x) == "triton-interpreter"
    _, out = _block(x, ids, w, wd, rw)
    assert_rounded(out, oracle(x, ids, w, wd, rw), FP32, math_err=_bound(w))


def test_every_partial_is_written_and_equals_the_reference_twin():
    """The op on a NaN-poisoned output: every row and slice written; the plain-torch twin computes the same slices
    (fp32 association may differ by an ulp, so within fp32 rounding)."""
    x, ids, w, wd, _ = _case(5, 2, 9)
    offs, slots, _ = K.gemma_moe_route(ids, 9)
    out = nan_like(torch.empty(slots.numel(), mlp_slices(40) * 96))
    K.moe_mlp.op(x, w, wd, offs, slots, 2, out)
    assert torch.isfinite(out).all()
    ref = K.gemma_moe_mlp_ref(x.double(), w.double(), wd.double(), offs, slots, 2)
    assert_rounded(out, ref, FP32, math_err=_bound(w))


def test_combine_sums_slices_in_order_and_rounds_each_row():
    """``slices``: each routed row is its slices' fp32 sum rounded to ``out_dtype`` before the weighting."""
    g = torch.Generator().manual_seed(4)
    parts = torch.randn(6, 3 * 20, generator=g)
    pos = torch.tensor([5, 0, 2, 1, 4, 3], dtype=torch.int32)
    rw = torch.rand(3, 2, generator=g)
    got = K.gemma_moe_combine(parts, pos, rw, slices=3, out_dtype=BF16)
    rows = parts.double().unflatten(1, (3, 20)).sum(1).to(BF16).double()
    want = (rows[pos.long()].view(3, 2, 20) * rw[..., None].double()).sum(1)
    assert got.dtype == BF16
    assert_rounded(got, want, BF16)


def test_bad_input():
    x, ids, w, wd, rw = _case(3, 2, 4)
    offs, slots, pos = K.gemma_moe_route(ids, 4)
    with pytest.raises(TypeError, match="FP8 experts take moe_gemm"):
        K.gemma_moe_mlp(x, w.to(torch.float8_e4m3fn), wd, offs, slots, 2)
    with pytest.raises(ValueError, match="do not chain"):
        K.gemma_moe_mlp(x, w, wd[:, :, :-1], offs, slots, 2)
    with pytest.raises(ValueError, match="index the 2 rows"):
        K.gemma_moe_mlp(x[:2], w, wd, offs, slots, 2)
    with pytest.raises(ValueError, match="cumulative"):
        K.gemma_moe_mlp(x, w, wd, offs.flip(0).contiguous(), slots, 2)
    with pytest.raises(ValueError, match="top_k"):
        K.gemma_moe_mlp(x, w, wd, offs, slots, 0)
    parts = K.gemma_moe_mlp(x, w, wd, offs, slots, 2)
    with pytest.raises(ValueError, match="dividing"):
        K.gemma_moe_combine(parts, pos, rw, slices=7)
    with pytest.raises(TypeError, match="float32"):
        K.gemma_moe_combine(parts.to(BF16), pos, rw, slices=2)
    with pytest.raises(ValueError, match="MlpConfig blocks"):
        K.MlpConfig(block_k=8)


def test_the_model_runs_it_up_to_its_token_limit(monkeypatch, tiny_text_config):
    """``Experts`` (fused) takes the one-launch MLP at <= MOE_MLP_MAX_TOKENS tokens and the two GEMMs above."""
    import gemma4lab

    model = gemma4lab.random_init(tiny_text_config, dtype=torch.float32, seed=3, std=0.1)
    experts = next(lay for lay in model.language_model.layers if lay.moe).experts
    calls = []
    real = K.moe_mlp.gemma_moe_mlp
    monkeypatch.setattr(K.moe_mlp, "gemma_moe_mlp", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    for t in (1, experts.MOE_MLP_MAX_TOKENS, experts.MOE_MLP_MAX_TOKENS + 1):
        x, ids, _, _, rw = _case(t, 2, experts.num_experts, h=experts.gate_up_proj.shape[2])
        experts(x, ids, rw, fused_act=True, fused_gemm=True)
    assert calls == [1, experts.MOE_MLP_MAX_TOKENS]


# ---- on the card -----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 8, 16])
def test_gpu_real_shapes_against_float64(t):
    """bf16, E = 128, H = 2816, I = 704: within one bf16 rounding of the float64 block (whose gate/up, product and
    expert rows are rounded as the model rounds them) plus the fp32 sums, per element."""
    x, ids, w, wd, rw = _case(t, 8, 128, h=2816, i=704, dtype=BF16, device="cuda", seed=t)
    x, w, wd = x * 0.5, w * 0.2, wd * 0.2
    _, out = _block(x, ids, w, wd, rw)
    exact = oracle(x, ids, w, wd, rw, BF16)
    # a rounding of an expert row can flip by an ulp against the oracle's (fp32 association): 8 rows of up to one
    # ulp each, weighted, on top of the output's own rounding
    err = (out.double() - exact).abs()
    bound = UNIT[BF16] * exact.abs() + 8 * UNIT[BF16] * float(exact.abs().max()) * 2**-3
    assert torch.isfinite(out).all() and (err <= bound).all(), float((err - bound).max())


@pytest.mark.gpu
def test_gpu_rows_do_not_depend_on_how_many_tokens_share_the_call():
    """A PCG bucket pads a 3-token prompt to 16 rows: the 3 tokens' outputs must be bit-identical either way."""
    x, ids, w, wd, rw = _case(16, 8, 128, h=2816, i=704, dtype=BF16, device="cuda", seed=3)
    _, all16 = _block(x, ids, w, wd, rw)
    _, first3 = _block(x[:3].contiguous(), ids[:3].contiguous(), w, wd, rw[:3].contiguous())
    torch.testing.assert_close(first3, all16[:3], rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_close_to_the_two_gemm_path():
    """Against moe_gemm → moe_gemm → combine on the same rows: the same roundings, summed in another order."""
    x, ids, w, wd, rw = _case(4, 8, 128, h=2816, i=704, dtype=BF16, device="cuda", seed=9)
    _, out = _block(x, ids, w, wd, rw)
    offs, slots, pos = K.gemma_moe_route(ids, 128)
    h = K.gemma_moe_gemm(x, w, offs, row_index=slots, top_k=8)
    two = K.gemma_moe_combine(K.gemma_moe_gemm(h, wd, offs, gelu_gate=True), pos, rw)
    torch.testing.assert_close(out.float(), two.float(), rtol=4 * UNIT[BF16], atol=1e-3 * float(two.abs().max()))
