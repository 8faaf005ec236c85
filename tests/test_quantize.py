"""FP8 (e4m3) expert weights: the quantiser's error is e4m3's rounding and no more, ``quantize_experts`` changes a
model in place and refuses what would silently undo it, and the quantised model's fused and unfused paths compute
the same function, whose distance from the unquantised model is the quantisation's."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import rel_err

import gemma4lab
from gemma4lab import Fusion
from gemma4lab.model.layers import Experts
from gemma4lab.model.quantize import FP8_E4M3_MAX, quantize_fp8_per_channel


def test_per_channel_quantiser_error_is_e4m3_rounding():
    """Every weight within half an e4m3 step of its value: 2⁻⁴ relative for normal numbers (3 mantissa bits), 2⁻¹⁰
    of the scale below e4m3's smallest normal (2⁻⁶, subnormal spacing 2⁻⁹); each channel's largest magnitude maps to
    ±448 exactly; an all-zero channel gets scale 1 and zeros."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 20, 50, generator=g) * torch.logspace(-3, 2, 20)[None, :, None]
    w[1, 4] = 0.0
    q, s = quantize_fp8_per_channel(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (3, 20)
    back = q.double() * s.double()[..., None]
    err = (back - w.double()).abs()
    bound = 2**-4 * w.double().abs() + 2**-10 * s.double()[..., None]
    assert (err <= bound * (1 + 1e-6)).all(), float((err - bound).max())
    amax = w.abs().amax(-1)
    nz = amax > 0
    torch.testing.assert_close((q.float().abs().amax(-1))[nz], torch.full_like(amax[nz], FP8_E4M3_MAX))
    assert s[1, 4] == 1 and (q[1, 4].float() == 0).all()
    with pytest.raises(TypeError, match="floating-point weight"):
        quantize_fp8_per_channel(torch.ones(4, dtype=torch.int32))


@pytest.fixture
def fp32_model():
    return gemma4lab.random_init("tiny", dtype=torch.float32, seed=5)


def _ids(n=21, seed=1):
    return torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(seed))


def test_quantize_experts_in_place_and_refusals(fp32_model):
    model = fp32_model
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    rep = gemma4lab.quantize_experts(model)
    assert rep.layers == len(experts) > 0
    fp8_bytes = sum(e.gate_up_proj.numel() + e.down_proj.numel() for e in experts)
    assert rep.bytes_before == 4 * fp8_bytes and rep.bytes_after > fp8_bytes  # scales on top of one byte a weight
    assert all(e.gate_up_proj.dtype == torch.float8_e4m3fn and not e.gate_up_proj.requires_grad for e in experts)
    assert "FP8" in str(rep)
    with pytest.raises(ValueError, match="already FP8"):
        gemma4lab.quantize_experts(model)
    with pytest.raises(ValueError, match="unsupported expert format"):
        gemma4lab.quantize_experts(model, "nvfp4")
    cast = copy.deepcopy(model)
    for e in (m for m in cast.modules() if isinstance(m, Experts)):
        e.gate_up_proj.data = e.gate_up_proj.data.float()  # what a later .to(float32) does to the weights
    with pytest.raises(ValueError, match="cast after gemma4lab.quantize_experts"):
        cast.prefill([_ids()])


def test_quantized_model_fused_and_unfused_agree(fp32_model):
    """The fused path (the FP8 kernel, interpreted) and the unfused one (weights widened, plain matmuls) of the
    quantised model compute the same function to fp32 rounding. (Its logits are not compared with the unquantised
    model's: a random MoE is chaotic — a perturbation flips near-tied expert choices — so accuracy is judged per
    layer, below.)"""
    model = fp32_model
    gemma4lab.quantize_experts(model)
    ids = [_ids()]
    unfused = model.set_fusion(Fusion.none()).prefill(ids, all_logits=True)
    fused = model.set_fusion(Fusion.all()).prefill(ids, all_logits=True)
    assert rel_err(fused, unfused) < 1e-5


def _moe_case(model, t: int, seed: int):
    """The model's first experts module and a teacher-forced input for it: token rows, k distinct experts per token
    and their routing weights (the same for every variant a test compares)."""
    ex = next(m for m in model.modules() if isinstance(m, Experts))
    g = torch.Generator().manual_seed(seed)
    k = model.config.text.top_k_experts
    x = torch.randn(t, ex.gate_up_proj.shape[2], generator=g)
    idx = torch.rand(t, ex.num_experts, generator=g).topk(k, dim=-1).indices
    weights = torch.softmax(torch.randn(t, k, generator=g), -1)
    return ex, x, idx, weights


def test_fp8_experts_error_is_the_quantisations_beside_bf16(fp32_model):
    """One MoE block, teacher-forced (the same tokens, expert choices and weights for every variant), against its
    float64 truth: bf16 weights and activations err by bf16's rounding (~2⁻⁸ relative); FP8 weights with fp32
    activations by e4m3's (~2⁻⁴ per weight, less on the sums of many): clearly above bf16's, below one e4m3 step."""
    ex, x, idx, weights = _moe_case(fp32_model, 37, 4)
    truth = copy.deepcopy(ex).double()(x.double(), idx, weights.double())
    err_bf16 = rel_err(copy.deepcopy(ex).to(torch.bfloat16)(x.bfloat16(), idx, weights), truth)
    fp8 = copy.deepcopy(ex)
    gemma4lab.quantize_experts(fp8)
    y_fused = fp8(x, idx, weights, fused_gemm=True)
    y_plain = fp8(x, idx, weights)
    assert rel_err(y_fused, y_plain) < 1e-5
    err_fp8 = rel_err(y_fused, truth)
    print(f"MoE block, teacher-forced: bf16 {err_bf16:.2e}, FP8 experts {err_fp8:.2e}")
    assert 3 * err_bf16 < err_fp8 < 2**-4


def test_fp8_experts_take_the_kernel_at_every_length(fp32_model, monkeypatch):
    """Above ``MOE_GEMM_MAX_TOKENS`` bf16 experts hand over to the library grouped GEMM, but FP8 experts have none:
    widening the weights per call cost 200 ms at 1453 tokens on the H200. The fused FP8 path must stay in the kernel
    (no dequantised copy) at any length, and still equal the unfused path."""
    from gemma4lab.model import quantize

    ex, x, idx, weights = _moe_case(fp32_model, 11, 5)
    gemma4lab.quantize_experts(ex)
    monkeypatch.setattr(Experts, "MOE_GEMM_MAX_TOKENS", 4)
    plain = ex(x, idx, weights)  # the reference path: weights widened
    widened = []
    real = quantize.dequantize_fp8_per_channel
    monkeypatch.setattr(quantize, "dequantize_fp8_per_channel", lambda *a: widened.append(1) or real(*a))
    fused = ex(x, idx, weights, fused_gemm=True)
    assert not widened, "the fused FP8 path widened the expert weights instead of running the kernel"
    assert rel_err(fused, plain) < 1e-5


def test_fp8_long_prompt_settings_keep_a_rows_bits():
    """FP8 weights at long prompts take 64-row tiles; like every setting of one GEMM they keep its orientation,
    weight tile and K step (a row's bits may not depend on the launch), and they are swept candidates."""
    from gemma4lab import kernels as K

    for gelu in (False, True):
        short = K.moe_config(8, 128, gelu, fp8_weights=True)
        long = K.moe_config(64 * 128, 128, gelu, fp8_weights=True)
        assert long.block_m == 64 and short.block_m < 64 and long in K.MOE_SWEEP
        assert (long.swap_ab, long.block_n, long.block_k) == (short.swap_ab, short.block_n, short.block_k)
        assert K.moe_config(64 * 128 - 1, 128, gelu, fp8_weights=True) == K.moe_config(64 * 128 - 1, 128, gelu)
        assert K.moe_config(64 * 128, 128, gelu).block_m < 64  # bf16 / fp32 weights keep their settings


def test_fp8_activations_through_the_fused_experts(fp32_model):
    """``quantize_experts(..., activations="fp8")``: the fused experts run moe_gemm with ``a_fp8`` (equal to the
    composition of the plain-torch twins with the same rule), and the teacher-forced error against the float64
    truth grows beyond weight-only FP8's — activations and weights are both e4m3 now — but stays below one e4m3
    step (2⁻³ relative, twice weight-only's 2⁻⁴ bound)."""
    from gemma4lab import kernels as K

    ex, x, idx, weights = _moe_case(fp32_model, 29, 6)
    k = idx.shape[1]
    truth = copy.deepcopy(ex).double()(x.double(), idx, weights.double())
    w8, w8a8 = copy.deepcopy(ex), copy.deepcopy(ex)
    gemma4lab.quantize_experts(w8)
    rep = gemma4lab.quantize_experts(w8a8, activations="fp8")
    assert w8a8.act_fp8 and not w8.act_fp8 and "activations FP8" in str(rep)
    y = w8a8(x, idx, weights, fused_gemm=True)
    offs, slots, pos = K.gemma_moe_route(idx, ex.num_experts)
    h = K.gemma_moe_gemm_ref(x, w8a8.gate_up_proj, offs, row_index=slots, top_k=k, w_scale=w8a8.gate_up_scale,
                             a_fp8=True)
    ys = K.gemma_moe_gemm_ref(h, w8a8.down_proj, offs, gelu_gate=True, w_scale=w8a8.down_scale, a_fp8=True)
    torch.testing.assert_close(y, K.gemma_moe_combine_ref(ys, pos, weights.float()), rtol=1e-5, atol=1e-6)
    err_w8, err_w8a8 = rel_err(w8(x, idx, weights, fused_gemm=True), truth), rel_err(y, truth)
    print(f"MoE block, teacher-forced: FP8 weights {err_w8:.2e}, FP8 weights and activations {err_w8a8:.2e}")
    assert err_w8 < err_w8a8 < 2**-3
    with pytest.raises(ValueError, match="activations must be"):
        gemma4lab.quantize_experts(copy.deepcopy(ex), activations="int8")
    from gemma4lab.model.quantize import set_fp8_activations

    set_fp8_activations(w8a8, False)  # the switch back: weight-only FP8 again, the same bits as w8
    assert not w8a8.act_fp8 and torch.equal(w8a8(x, idx, weights, fused_gemm=True),
                                            w8(x, idx, weights, fused_gemm=True))
    with pytest.raises(ValueError, match="quantise first"):
        set_fp8_activations(copy.deepcopy(ex), True)


def test_quantising_after_capture_drops_the_runners_pieces(fp32_model):
    """The experts' format is part of the program a runner captured: quantising afterwards must not replay pieces
    that hold the old weight tensors — the runner says so and captures again."""
    from gemma4lab.runtime.pcg import PiecewiseCudaGraphRunner

    model = fp32_model.set_fusion(Fusion.all())
    runner = PiecewiseCudaGraphRunner(model, max_tokens=64, progress=False)
    runner.prefill([_ids()])
    gemma4lab.quantize_experts(model)
    with pytest.warns(UserWarning, match="settings changed since capture"):
        got = runner.prefill([_ids()])
    assert runner.stats["recaptures"] == 1
    torch.testing.assert_close(got, model.prefill([_ids()]), rtol=1e-5, atol=1e-5)


def test_fp8_activations_only_up_to_their_token_limit(fp32_model, monkeypatch):
    """Above ``Experts.FP8_ACT_MAX_TOKENS`` (a PCG bucket edge) FP8 activations stop paying (the GEMM is
    compute-bound), so the experts run weight-only FP8 there: the same bits as a weight-only model; at or below the
    limit the FP8 × FP8 kernel."""
    ex, x, idx, weights = _moe_case(fp32_model, 29, 6)
    w8, w8a8 = copy.deepcopy(ex), copy.deepcopy(ex)
    gemma4lab.quantize_experts(w8)
    gemma4lab.quantize_experts(w8a8, activations="fp8")
    at_limit = w8a8(x, idx, weights, fused_gemm=True)
    assert not torch.equal(at_limit, w8(x, idx, weights, fused_gemm=True))
    monkeypatch.setattr(Experts, "FP8_ACT_MAX_TOKENS", x.shape[0] - 1)
    assert torch.equal(w8a8(x, idx, weights, fused_gemm=True), w8(x, idx, weights, fused_gemm=True))
    monkeypatch.setattr(Experts, "FP8_ACT_MAX_TOKENS", x.shape[0])
    assert torch.equal(w8a8(x, idx, weights, fused_gemm=True), at_limit)
