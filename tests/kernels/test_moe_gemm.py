"""``gemma_moe_gemm``: the streaming grouped expert GEMM (token gather and GELU fused into its operand loads).
Under the CPU interpreter in fp32 (its bf16 ``tl.dot`` is wrong); against float64 on a GPU in bf16 and fp32."""

from __future__ import annotations

import pytest
import torch
from support import BF16, FP32, UNIT, assert_rounded, nan_like, routed_case

import gemma4lab.kernels as K

pytestmark = pytest.mark.usefixtures("triton_path_only")


def _case(counts, h=96, i=40, seed=0, dtype=FP32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    a = torch.randn(int(sum(counts)), h, generator=g).to(dtype)
    w = (0.1 * torch.randn(len(counts), 2 * i, h, generator=g)).to(dtype)
    wd = (0.1 * torch.randn(len(counts), h, i, generator=g)).to(dtype)
    return [t.to(device) for t in (a, w, wd, offs)]


def oracle(a, w, offs, gelu=False, magnitude=False):
    """float64, one expert at a time (the routed rows are sorted by expert). ``magnitude``: the same product of the
    absolute values, ``Σ_k |a_k w_k|`` per output, which bounds what rounding each operand costs."""
    a = a.double()
    if gelu:
        gt, up = a.chunk(2, dim=-1)
        a = torch.nn.functional.gelu(gt, approximate="tanh") * up
    if magnitude:
        a = a.abs()
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        out.append(a[start:end] @ (w[e].double().abs() if magnitude else w[e].double()).T)
        start = end
    return torch.cat(out)


def _assert_gemm(got, ref, dtype, k):
    """A K-long dot in fp32 accumulates ~√K·2⁻²⁴ relative error per output on top of the output's rounding."""
    assert_rounded(got, ref, dtype, math_err=max(2e-6, k**0.5 * 2**-22))


def _assert_gelu_gemm(got, y, wd, offs, dtype):
    """The fused GELU rounds each activation to the weights' dtype before the tensor-core dot (as the unfused model
    does): at most one rounding of every product, i.e. |error| <= u·Σ|a_k w_k| per output, plus the output's own
    rounding and the fp32 accumulation. A bound derived from the operands, not a fudge factor."""
    exact = oracle(y, wd, offs, gelu=True)
    bound = UNIT[dtype] * oracle(y, wd, offs, gelu=True, magnitude=True) + UNIT[dtype] * exact.abs() \
        + wd.shape[2] ** 0.5 * 2**-22 * float(exact.abs().max())
    err = (got.double() - exact).abs()
    assert torch.isfinite(got).all() and (err <= bound).all(), f"worst excess {float((err - bound).max()):.3g}"


@pytest.mark.parametrize("counts", [[3, 0, 17, 1], [1], [0, 0, 5], [33, 2, 0, 0, 9]])
def test_matches_float64(counts):
    a, w, wd, offs = _case(counts)
    assert K.kernel_backend(a) == "triton-interpreter"
    y = K.gemma_moe_gemm(a, w, offs)
    _assert_gemm(y, oracle(a, w, offs), FP32, a.shape[1])
    y2 = K.gemma_moe_gemm(y, wd, offs, gelu_gate=True)
    _assert_gelu_gemm(y2, y, wd, offs, FP32)


@pytest.mark.parametrize("t,k,n_experts,skew", [(37, 2, 8, 1.0), (1, 2, 8, 1.0), (93, 8, 16, 1.0), (60, 3, 8, 3.0)])
def test_gather_matches_float64_on_gathered_rows(t, k, n_experts, skew):
    """``row_index`` (moe_route's sorted slots) gathers token ``slot // k`` in the operand load: the product equals
    the float64 product of the gathered rows, ``x[argsort(ids) // k]``, which the kernel never materialises."""
    x, ids, w, wd = routed_case(t, k, n_experts, skew=skew)
    offs, slots, _ = K.gemma_moe_route(ids, n_experts)
    y = K.gemma_moe_gemm(x, w, offs, row_index=slots, top_k=k)
    gathered = x[torch.argsort(ids.reshape(-1), stable=True) // k]
    _assert_gemm(y, oracle(gathered, w, offs), FP32, x.shape[1])
    _assert_gelu_gemm(K.gemma_moe_gemm(y, wd, offs, gelu_gate=True), y, wd, offs, FP32)


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("swap_ab,columns_first", [(False, False), (True, False), (False, True), (True, True)])
def test_experts_with_several_row_tiles(block_m, swap_ab, columns_first):
    """An expert with more rows than the row tile loops over tiles (each reading the weights again): still exact,
    in both MMA orientations (``swap_ab`` accumulates ``w · aᵀ``) and both grid orders, with and without the fused
    GELU; a K step that does not divide K (40 = 32 + 8) exercises the masked tail."""
    a, w, wd, offs = _case([70, 3, 0, 17])
    cfg = K.MoeConfig(block_m=block_m, block_n=32, block_k=32, swap_ab=swap_ab, columns_first=columns_first)
    y = K.gemma_moe_gemm(a, w, offs, config=cfg)
    _assert_gemm(y, oracle(a, w, offs), FP32, a.shape[1])
    _assert_gelu_gemm(K.gemma_moe_gemm(y, wd, offs, gelu_gate=True, config=cfg), y, wd, offs, FP32)


@pytest.mark.parametrize("columns_first", [False, True])
def test_programs_run_for_the_experts_with_rows_only(columns_first):
    """The grid has min(rows, experts) slots and slot s serves the s-th expert with rows: with 4 rows over 9
    experts (hit: 1, 4 twice, 8 — the last expert), one slot stays idle and every row is still written (the output
    starts as NaN), in both grid orders."""
    a, w, _, offs = _case([0, 1, 0, 0, 2, 0, 0, 0, 1])
    cfg = K.MoeConfig(block_m=16, block_n=32, block_k=32, swap_ab=True, columns_first=columns_first)
    out = nan_like(torch.empty(a.shape[0], w.shape[1], dtype=a.dtype))
    K.moe_gemm.op(a, w, offs, None, 1, False, None, False, out)
    _assert_gemm(out, oracle(a, w, offs), FP32, a.shape[1])
    _assert_gemm(K.gemma_moe_gemm(a, w, offs, config=cfg), oracle(a, w, offs), FP32, a.shape[1])


def test_swapped_gather_matches_float64():
    """The swapped orientation with the token gather in its operand load (the gate/up GEMM's model path)."""
    x, ids, w, wd = routed_case(37, 2, 8)
    offs, slots, _ = K.gemma_moe_route(ids, 8)
    cfg = K.MoeConfig(block_m=16, block_n=32, block_k=32, swap_ab=True, columns_first=True)
    y = K.gemma_moe_gemm(x, w, offs, row_index=slots, top_k=2, config=cfg)
    _assert_gemm(y, oracle(x[torch.argsort(ids.reshape(-1), stable=True) // 2], w, offs), FP32, x.shape[1])


def test_settings_are_swept_and_share_what_decides_a_rows_bits():
    """Every setting moe_config picks is a swept candidate, and all settings of one GEMM share orientation, weight
    tile and K step (row results must not depend on the launch: PCG pads prompts), differing at most in row tile and
    grid order; the down GEMM takes its wider row tile once experts average 16 rows."""
    for gelu in (False, True):
        settings = {K.moe_config(n, 128, gelu) for n in range(0, 70000, 997)}
        assert settings <= set(K.MOE_SWEEP)
        assert len({(c.swap_ab, c.block_n, c.block_k) for c in settings}) == 1
    assert K.moe_config(16 * 128 - 1, 128, True).block_m == 16 and K.moe_config(16 * 128, 128, True).block_m == 32
    assert len({K.moe_config(n, 128) for n in range(0, 70000, 997)}) == 1
    assert len(set(K.MOE_SWEEP)) == len(K.MOE_SWEEP)
    with pytest.raises(ValueError, match="n_experts"):
        K.moe_config(8, 0)
    with pytest.raises(TypeError, match="swap_ab must be a bool"):
        K.MoeConfig(swap_ab=1)


def test_zero_rows_and_bad_input():
    a, w, wd, offs = _case([0, 0])
    assert K.gemma_moe_gemm(a, w, offs).shape == (0, w.shape[1])
    a, w, wd, offs = _case([2, 3])
    with pytest.raises(ValueError, match="columns"):
        K.gemma_moe_gemm(a[:, :50], w, offs)
    with pytest.raises(ValueError, match="int32"):
        K.gemma_moe_gemm(a, w, offs.long())
    with pytest.raises(TypeError, match="dtype"):
        K.gemma_moe_gemm(a.double(), w, offs)
    with pytest.raises(ValueError, match=r"a \[M, K\]"):
        K.gemma_moe_gemm(a[None], w, offs)
    slots = torch.arange(5, dtype=torch.int32)
    with pytest.raises(ValueError, match="row_index // top_k must index the 5 rows"):
        K.gemma_moe_gemm(a, w, offs, row_index=slots + 1)
    with pytest.raises(ValueError, match="row_index must be a contiguous 1-D int32"):
        K.gemma_moe_gemm(a, w, offs, row_index=slots.long())
    with pytest.raises(ValueError, match="ending at the 4 rows"):
        K.gemma_moe_gemm(a, w, offs, row_index=slots[:4])
    with pytest.raises(ValueError, match="top_k"):
        K.gemma_moe_gemm(a, w, offs, row_index=slots, top_k=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, FP32])
@pytest.mark.parametrize("counts", [[6] * 128, [0, 40, 1, 0, 300] + [3] * 123])
def test_gpu_real_shapes_against_float64(dtype, counts):
    """H = 2816, I = 704, 128 experts: uniform and skewed row counts (an expert with several row tiles)."""
    a, w, wd, offs = _case(counts, h=2816, i=704, dtype=dtype, device="cuda")
    y = K.gemma_moe_gemm(a, w, offs)
    _assert_gemm(y, oracle(a, w, offs), dtype, 2816)
    _assert_gelu_gemm(K.gemma_moe_gemm(y, wd, offs, gelu_gate=True), y, wd, offs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, FP32])
@pytest.mark.parametrize("t,skew", [(93, 1.0), (189, 1.0), (512, 1.0), (189, 3.0)])
def test_gpu_gather_real_shapes_against_float64(dtype, t, skew):
    """The model's path at real shapes: moe_route, then the gate/up GEMM gathering token rows, then the down GEMM;
    189 and 512 tokens and skew 3 give experts several row tiles."""
    x, ids, w, wd = routed_case(t, 8, 128, h=2816, i=704, dtype=dtype, device="cuda", skew=skew)
    offs, slots, _ = K.gemma_moe_route(ids, 128)
    y = K.gemma_moe_gemm(x, w, offs, row_index=slots, top_k=8)
    _assert_gemm(y, oracle(x[slots.long() // 8], w, offs), dtype, 2816)
    _assert_gelu_gemm(K.gemma_moe_gemm(y, wd, offs, gelu_gate=True), y, wd, offs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_gpu_rows_do_not_depend_on_the_row_tile(dtype):
    """Every row tile gives the same bits for the same rows, so a per-size table of settings may switch tiles: PCG
    pads a prompt to its bucket, which can move the row count across a size boundary, and its rows must still equal
    the eager run's (the 1025-token PCG bug came from a row result that depended on the launch shape)."""
    x, ids, w, wd = routed_case(189, 8, 128, h=2816, i=704, dtype=dtype, device="cuda", skew=3.0)
    offs, slots, _ = K.gemma_moe_route(ids, 128)
    # every row tile with one K step, per MMA orientation; 2 stages so fp32's 128-row tiles fit in shared memory
    for swap in (False, True):
        configs = [K.MoeConfig(block_m=bm, block_n=64, block_k=64, num_warps=4, num_stages=2, swap_ab=swap,
                               columns_first=cf) for bm in (16, 32, 64, 128) for cf in (False, True)]
        up = {c: K.gemma_moe_gemm(x, w, offs, row_index=slots, top_k=8, config=c) for c in configs}
        down = {c: K.gemma_moe_gemm(y, wd, offs, gelu_gate=True, config=c) for c, y in up.items()}
        first = configs[0]
        for c in configs:
            assert torch.equal(up[c], up[first]), f"gate/up rows differ between {c} and {first}"
            assert torch.equal(down[c], down[first]), f"down rows differ between {c} and {first}"
    # the settings moe_config picks at different sizes, on the same rows
    y = K.gemma_moe_gemm(x, w, offs, row_index=slots, top_k=8)
    downs = {K.moe_config(n, 128, gelu_gate=True) for n in (8, 744, 2048, 8192)}
    assert len(downs) == 2
    outs = [K.gemma_moe_gemm(y, wd, offs, gelu_gate=True, config=c) for c in downs]
    assert torch.equal(outs[0], outs[1]), f"the down GEMM's settings {downs} give different rows"


# ---- FP8 (e4m3) weights with per-channel scales ---------------------------------------------------------------------
def _fp8(w):
    from gemma4lab.model.quantize import quantize_fp8_per_channel

    return quantize_fp8_per_channel(w)


def _dequant(q, s):
    return q.double() * s.double()[..., None]


@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("counts", [[3, 0, 17, 1], [33, 2, 0, 0, 9]])
def test_fp8_weights_match_float64_of_the_dequantized_weights(counts, swap_ab):
    """FP8 weights widened on load, the channel scale applied after the K sum: the product equals the float64
    product with the dequantized weights ``s·q`` to fp32 rounding (the quantisation error itself is the
    quantiser's, tested in tests/test_quantize.py); the gathered gate/up and the GELU-fused down GEMM alike."""
    a, w, wd, offs = _case(counts)
    (q, s), (qd, sd) = _fp8(w), _fp8(wd)
    cfg = K.MoeConfig(block_m=16, block_n=32, block_k=32, swap_ab=swap_ab)
    y = K.gemma_moe_gemm(a, q, offs, w_scale=s, config=cfg)
    _assert_gemm(y, oracle(a, _dequant(q, s), offs), FP32, a.shape[1])
    y2 = K.gemma_moe_gemm(y, qd, offs, gelu_gate=True, w_scale=sd, config=cfg)
    _assert_gelu_gemm(y2, y, _dequant(qd, sd), offs, FP32)
    ref = K.gemma_moe_gemm_ref(a, q, offs, w_scale=s)  # the plain-torch twin computes the same function
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_fp8_gather_path_matches_float64():
    x, ids, w, wd = routed_case(37, 2, 8)
    q, s = _fp8(w)
    offs, slots, _ = K.gemma_moe_route(ids, 8)
    y = K.gemma_moe_gemm(x, q, offs, row_index=slots, top_k=2, w_scale=s)
    gathered = x[torch.argsort(ids.reshape(-1), stable=True) // 2]
    _assert_gemm(y, oracle(gathered, _dequant(q, s), offs), FP32, x.shape[1])


def test_fp8_bad_input():
    a, w, wd, offs = _case([2, 3])
    q, s = _fp8(w)
    with pytest.raises(ValueError, match="need w_scale"):
        K.gemma_moe_gemm(a, q, offs)
    with pytest.raises(ValueError, match="need w_scale"):
        K.gemma_moe_gemm(a, q, offs, w_scale=s[:, :3])
    with pytest.raises(ValueError, match="need w_scale"):
        K.gemma_moe_gemm(a, q, offs, w_scale=s.double())
    with pytest.raises(ValueError, match="w_scale is for FP8 weights"):
        K.gemma_moe_gemm(a, w, offs, w_scale=s)
    with pytest.raises(TypeError, match="activations for"):
        K.gemma_moe_gemm(a.double(), q, offs, w_scale=s)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 93, 256, 1453])
def test_gpu_fp8_real_shapes_against_float64(t):
    """bf16 activations, FP8 weights at H = 2816, I = 704, 128 experts, through the model's settings (1453 tokens:
    the 64-row tiles FP8 takes at long prompts, where bf16 hands over to grouped_mm)."""
    x, ids, w, wd = routed_case(t, 8, 128, h=2816, i=704, dtype=BF16, device="cuda")
    (q, s), (qd, sd) = _fp8(w), _fp8(wd)
    offs, slots, _ = K.gemma_moe_route(ids, 128)
    y = K.gemma_moe_gemm(x, q, offs, row_index=slots, top_k=8, w_scale=s)
    _assert_gemm(y, oracle(x[slots.long() // 8], _dequant(q, s), offs), BF16, 2816)
    _assert_gelu_gemm(K.gemma_moe_gemm(y, qd, offs, gelu_gate=True, w_scale=sd), y, _dequant(qd, sd), offs, BF16)
    if t >= 1453:  # the long-prompt tiles give the short-prompt tiles' bits
        short = K.moe_config(8, 128, fp8_weights=True), K.moe_config(8, 128, True, fp8_weights=True)
        assert torch.equal(y, K.gemma_moe_gemm(x, q, offs, row_index=slots, top_k=8, w_scale=s, config=short[0]))
        assert torch.equal(K.gemma_moe_gemm(y, qd, offs, gelu_gate=True, w_scale=sd),
                           K.gemma_moe_gemm(y, qd, offs, gelu_gate=True, w_scale=sd, config=short[1]))


@pytest.mark.gpu
def test_gpu_float64_experts_take_the_reference_path():
    """float64 is a reference dtype: on the GPU the experts run the looped matmuls (the kernel accumulates in fp32
    and cannot compile fp64 — notebook 09's float64 truth hit that), equal to the same module on the CPU, and a
    direct moe_gemm call in float64 is refused with a clear error."""
    from gemma4lab.model.config import Gemma4Config
    from gemma4lab.model.layers import Experts

    cfg = Gemma4Config.preset("tiny").text
    ex = Experts(cfg).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * p.shape[-1] ** -0.5)
        x = torch.randn(9, cfg.hidden_size, generator=g, dtype=torch.float64)
        idx = torch.rand(9, cfg.num_experts, generator=g).topk(cfg.top_k_experts, dim=-1).indices
        w = torch.softmax(torch.randn(9, cfg.top_k_experts, generator=g, dtype=torch.float64), -1)
        cpu = ex(x, idx, w)
        gpu = ex.cuda()(x.cuda(), idx.cuda(), w.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-12)
    a, wt, wd, offs = _case([3, 2], dtype=torch.float64, device="cuda")
    with pytest.raises(TypeError, match="float64 is for references"):
        K.gemma_moe_gemm(a, wt, offs)


# ---- FP8 activations (a_fp8): FP8 × FP8 on the tensor cores ----------------------------------------------------------
def _assert_a_fp8(got, a_rows, q, s, offs, dtype, gelu=False):
    """Against the float64 product of the rows *as quantised* (``quantize_act_e4m3``, the stated rule) and the
    dequantised weights: the output's rounding, fp32 accumulation, and one e4m3 step of slack on the largest term of
    each output (a quantisation decision may fall the other way where fp32 and float64 straddle a tie)."""
    rows = a_rows.double()
    if gelu:
        g, u = rows.chunk(2, dim=-1)
        rows = torch.nn.functional.gelu(g, approximate="tanh") * u
    aq, wq = K.quantize_act_e4m3(rows), _dequant(q, s)
    exact = oracle(aq, wq, offs)
    top, start = [], 0
    for e, end in enumerate(offs.tolist()):
        top.append((aq[start:end].abs()[:, None, :] * wq[e].abs()[None]).amax(-1))
        start = end
    top = torch.cat(top)
    bound = UNIT[dtype] * exact.abs() + aq.shape[1] ** 0.5 * 2**-22 * float(exact.abs().max()) + 2**-3 * top
    err = (got.double() - exact).abs()
    assert torch.isfinite(got).all() and (err <= bound).all(), f"worst excess {float((err - bound).max()):.3g}"
    # and the rule itself is not vacuous: the quantised rows differ from the rows
    assert (aq - rows).abs().max() > 0


@pytest.mark.parametrize("dtype", [BF16, FP32])
@pytest.mark.parametrize("t,k,n_experts", [(37, 2, 8), (1, 2, 8), (60, 3, 8)])
def test_fp8_activations_match_float64_of_their_quantisation(dtype, t, k, n_experts):
    """Gather (gate/up) and GELU (down) paths with K = 300 and 140: several 128-wide scale blocks and a masked
    tail; bf16 and fp32 activations (the interpreter multiplies FP8 × FP8 exactly, as the tensor cores do)."""
    x, ids, w, wd = routed_case(t, k, n_experts, h=300, i=140, dtype=dtype)
    (q, s), (qd, sd) = _fp8(w), _fp8(wd)
    offs, slots, _ = K.gemma_moe_route(ids, n_experts)
    y = K.gemma_moe_gemm(x, q, offs, row_index=slots, top_k=k, w_scale=s, a_fp8=True)
    _assert_a_fp8(y, x[slots.long() // k], q, s, offs, dtype)
    y2 = K.gemma_moe_gemm(y, qd, offs, gelu_gate=True, w_scale=sd, a_fp8=True)
    _assert_a_fp8(y2, y, qd, sd, offs, dtype, gelu=True)
    # the plain-torch twin computes the same function
    torch.testing.assert_close(y2, K.gemma_moe_gemm_ref(y, qd, offs, gelu_gate=True, w_scale=sd, a_fp8=True),
                               rtol=1e-5 if dtype == FP32 else 2**-7, atol=1e-5)


def test_quantize_act_e4m3_is_e4m3_per_row_and_block():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 300, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 5, dtype=torch.float64)[:, None]
    x[2, 128:256] = 0.0  # an all-zero block stays zero
    q = K.quantize_act_e4m3(x)
    assert q.dtype == torch.float64 and q.shape == x.shape and torch.equal(q[2, 128:256], x[2, 128:256])
    for b in range(3):  # each block's largest magnitude maps to e4m3's largest value, so it is kept exactly
        blk = slice(128 * b, min(128 * (b + 1), 300))
        i = x[:, blk].abs().argmax(-1)
        torch.testing.assert_close(q[:, blk].gather(-1, i[:, None]), x[:, blk].gather(-1, i[:, None]))
    big = x.abs() > x.abs().amax(-1, keepdim=True) * 2**-6  # normal range of the block's scale: relative step 2⁻³
    assert ((q - x).abs()[big] <= 2**-4 * x.abs()[big] * (1 + 1e-12)).all()


def test_fp8_activations_bad_input():
    a, w, wd, offs = _case([2, 3])
    q, s = _fp8(w)
    with pytest.raises(ValueError, match="needs FP8 weights"):
        K.gemma_moe_gemm(a, w, offs, a_fp8=True)
    with pytest.raises(TypeError, match="a_fp8 must be a bool"):
        K.gemma_moe_gemm(a, q, offs, w_scale=s, a_fp8=1)
    with pytest.raises(ValueError, match="block_k=128"):
        K.gemma_moe_gemm(a, q, offs, w_scale=s, a_fp8=True, config=K.MoeConfig(block_k=64, swap_ab=True))
    for n in (8, 744, 9000):  # the settings moe_config picks for FP8 activations satisfy that rule
        for gelu in (False, True):
            c = K.moe_config(n, 128, gelu, True, True)
            assert c.swap_ab and c.block_k == K.ACT_QUANT_K and c in K.MOE_SWEEP


def _e4m3_ambiguity(r: torch.Tensor, rel: float) -> torch.Tensor:
    """Per element of float64 ``r``: how far its FP8 value (per row and ``ACT_QUANT_K`` block, the package's rule)
    moves if the scaled value ``r / scale`` is off by ``rel`` relative (the scale itself fixed): 0 away from
    rounding boundaries, one e4m3 step · scale beside them."""
    from gemma4lab.model.quantize import FP8_E4M3_MAX, e4m3_absmax

    blocks = torch.nn.functional.pad(r, (0, (-r.shape[-1]) % K.ACT_QUANT_K)).unflatten(-1, (-1, K.ACT_QUANT_K))
    _, scale = e4m3_absmax(blocks)
    v = blocks / scale

    def q(x):
        return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).double()

    return ((q(v * (1 + rel)) - q(v * (1 - rel))).abs() * scale).flatten(-2)[..., : r.shape[-1]]


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 93, 1453])
def test_gpu_fp8_activations_real_shapes(t):
    """FP8 × FP8 at H = 2816, I = 704, 128 experts through the model's settings: the hardware's e4m3 conversion and
    wgmma against the float64 product of the quantisation rule (a looser magnitude bound than the interpreter
    test's, whose per-term maximum would not fit in memory here), plus one e4m3 step on the elements whose scaled
    value lies within 2⁻¹⁷ (relative) of a rounding boundary: fp32's error in the kernel's division and GELU can
    move those across it, as the first H200 run showed (a worst excess of 2.7 at 93 tokens under the bare bound)."""
    x, ids, w, wd = routed_case(t, 8, 128, h=2816, i=704, dtype=BF16, device="cuda")
    (q, s), (qd, sd) = _fp8(w), _fp8(wd)
    offs, slots, _ = K.gemma_moe_route(ids, 128)
    y = K.gemma_moe_gemm(x, q, offs, row_index=slots, top_k=8, w_scale=s, a_fp8=True)
    y2 = K.gemma_moe_gemm(y, qd, offs, gelu_gate=True, w_scale=sd, a_fp8=True)
    for got, rows, qq, ss, gelu in ((y, x[slots.long() // 8], q, s, False), (y2, y, qd, sd, True)):
        r = rows.double()
        if gelu:
            g, u = r.chunk(2, dim=-1)
            r = torch.nn.functional.gelu(g, approximate="tanh") * u
        aq, wq = K.quantize_act_e4m3(r), _dequant(qq, ss)
        exact, mag = oracle(aq, wq, offs), oracle(aq, wq, offs, magnitude=True)
        # The kernel forms x / scale in fp32 (and the GELU product before it): where that lands within fp32's error
        # of an e4m3 rounding boundary it may round to the neighbouring value. Those elements may be off by their
        # step, and no others: bound the outputs by the steps the ambiguous elements could take.
        ambiguous = _e4m3_ambiguity(r, 2**-17)
        bound = UNIT[BF16] * exact.abs() + 2**-9 * mag + oracle(ambiguous, wq, offs, magnitude=True)
        err = (got.double() - exact).abs()
        assert torch.isfinite(got).all() and (err <= bound).all(), f"worst excess {float((err - bound).max()):.3g}"
