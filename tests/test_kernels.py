# ruff: noqa: E402
import os

import torch

# Before gemma4lab is imported (Triton reads it when kernels are decorated): on a CPU-only machine the kernels run
# under Triton's interpreter. On a GPU machine it is left alone so that the rest of the session runs compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
import math

import pytest

import gemma4lab.kernels as K
from gemma4lab.kernels import (
    LaunchConfig,
    dual_rmsnorm,
    dual_rmsnorm_next_norm,
    gelu_and_mul,
    post_attention_block,
    qkv_norm_rope,
    rmsnorm_residual_scalar,
    router_topk,
)
from gemma4lab.kernels import _common as C

EPS = 1e-6
BF16, FP32, FP16 = torch.bfloat16, torch.float32, torch.float16
TOL = {FP32: 1e-5, BF16: 8e-3, FP16: 1e-3}
# dtype, T, hidden: hidden sizes not powers of two; T = 33 leaves a partial row block, T = 32 fills them exactly.
# Kernels with a 2816 case add one (bf16 only: the interpreter is slow).
ROW_CASES = [(dt, n, h) for dt in (FP32, BF16) for n, h in ((1, 96), (33, 200))] + [(BF16, 32, 96)]


# ---- helpers ------------------------------------------------------------------------------------------------------
@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def act(gen, *shape, dtype=FP32, scale=1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=gen)).to(dtype)


def wt(gen, n, dtype=FP32) -> torch.Tensor:
    return (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype)


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.isfinite(got).all(), "output has NaN/inf (unwritten poisoned elements?)"
    return float((got.double() - ref).norm() / ref.norm())


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = rel_err(got, ref)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:g} ({dtype})"


def d(*ts):
    return [t.double() for t in ts]


@pytest.fixture(autouse=True)
def triton_path_only(request, monkeypatch):
    """Every wrapper must take the Triton path here (the interpreter on CPU): make its torch fallback explode."""
    if request.node.get_closest_marker("gpu"):
        if K.INTERPRET or not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU and compiled Triton (TRITON_INTERPRET unset)")
    elif not K.INTERPRET:
        if torch.cuda.is_available():
            pytest.skip("interpreter test: run with TRITON_INTERPRET=1 (the gpu-marked tests cover this machine)")
        pytest.fail("TRITON_INTERPRET=1 must be set before gemma4lab.kernels is imported, or only the torch "
                    "fallback would be tested")

    def boom(*args, **kwargs):
        raise AssertionError("the torch-reference fallback ran instead of the Triton kernel")

    for mod, name in ((rmsnorm_residual_scalar, "gemma_rmsnorm_residual_scalar_ref"),
                      (dual_rmsnorm, "gemma_dual_rmsnorm_residual_scalar_ref"),
                      (dual_rmsnorm_next_norm, "gemma_dual_rmsnorm_residual_scalar_next_norm_ref"),
                      (post_attention_block, "gemma_post_attention_block_ref"),
                      (qkv_norm_rope, "gemma_qkv_norm_rope_ref_"), (router_topk, "gemma_router_topk_ref"),
                      (gelu_and_mul, "gelu_tanh_and_mul_ref")):
        monkeypatch.setattr(mod, name, boom)


# ---- float64 oracles, written from the Hugging Face formulas (independent of the package's _ref twins) ----------
def rms64(x, w=None):
    y = x * (x.pow(2).mean(-1, keepdim=True) + EPS).rsqrt()
    return y if w is None else y * w


def oracle_rms_res(x, w, r, s):
    return (rms64(x, w) + r) * s.reshape(())


def oracle_dual(x1, w1, x2, w2, w3, r, s):
    return (rms64(rms64(x1, w1) + rms64(x2, w2), w3) + r) * s.reshape(())


def oracle_dual_next(x1, w1, x2, w2, w3, r, s, wn, dtype):
    out = oracle_dual(x1, w1, x2, w2, w3, r, s)
    return out, rms64(out.to(dtype).double(), wn)  # next_in is computed from the rounded residual stream


def oracle_post_attention(a, r, wpa, w1, w2, ws, dtype):
    h = r + rms64(a, wpa)
    hr = h.to(dtype).double()  # the residual stream is rounded once; the views read it back
    return h, rms64(hr, w1), rms64(hr, w2), rms64(hr) * ws * a.shape[-1] ** -0.5


def oracle_rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def oracle_router(logits, scale, k):
    p = torch.softmax(logits, -1)
    w, ids = torch.topk(p, k, -1)
    return w / w.sum(-1, keepdim=True) * scale[ids], ids


def oracle_gelu_mul(g, u):
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))) * u


# ---- dispatch -----------------------------------------------------------------------------------------------------
def test_dispatch_reports_interpreter():
    assert K.kernel_backend(torch.empty(1)) == "triton-interpreter"
    assert K.kernel_backend(torch.empty(1, device="meta")) == "torch-reference"


def test_row_config_heuristic_depends_only_on_hidden_and_dtype():
    RowConfig = C.RowConfig
    assert C.row_config(2816, BF16, 3) == RowConfig(programs_per_sm=2, num_warps=4, num_stages=3, rows=1)
    assert C.row_config(2048, BF16, 2) == RowConfig(2, 4, 3, 1)
    assert C.row_config(2816, FP32, 3).num_stages == 2  # prefetched rows would not fit ~96 KB of shared memory
    assert C.row_config(96, BF16, 3).rows == 16 and C.row_config(1024, BF16, 3).rows == 2
    assert C.row_config(16384, BF16, 2).num_warps == 16
    # persistent grid: min(row blocks, programs_per_sm * SMs); the compile-time meta never depends on n_rows
    dev = torch.device("cpu")
    (g1,), m1 = C.row_launch(1025, 2816, BF16, dev, 3)
    (g2,), m2 = C.row_launch(1280, 2816, BF16, dev, 3)
    assert m1 == m2 and g1 == g2 == 2 * C.num_sms(dev)
    assert C.row_launch(1, 2816, BF16, dev, 3)[0] == (1,)
    assert C.row_launch(100, 96, BF16, dev, 3, RowConfig(programs_per_sm=64, rows=16))[0] == (7,)
    assert C.row_launch(100, 96, BF16, dev, 3, LaunchConfig(4, 2))[1]["ROWS"] == 4  # legacy config: rows, warps
    with pytest.raises(TypeError, match="RowConfig or LaunchConfig"):
        C.row_launch(100, 96, BF16, dev, 3, (1, 4))


# ---- 1. rms + residual + scalar -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,n,h", ROW_CASES, ids=str)
def test_rmsnorm_residual_scalar(gen, dtype, n, h):
    x, r, w = act(gen, n, h, dtype=dtype), act(gen, n, h, dtype=dtype), wt(gen, h, dtype)
    s = torch.tensor([0.75])
    out = nan_like(x)
    assert K.kernel_backend(x) == "triton-interpreter"
    res = K.gemma_rmsnorm_residual_scalar(x, w, r, s, out=out)
    assert res is out
    assert_close(out, oracle_rms_res(*d(x, w, r, s)), dtype)


def test_rmsnorm_residual_scalar_hidden_2816_strided_fp32_weight_fp16(gen):
    n, h = 7, 2816
    big = act(gen, n, h + 64, dtype=BF16)
    x = big[:, 32 : 32 + h]  # row stride > width
    r, w, s = act(gen, n, h, dtype=BF16), wt(gen, h, FP32), torch.tensor(1.25, dtype=BF16)  # 0-d bf16 scalar
    out = K.gemma_rmsnorm_residual_scalar(x, w, r, s)
    assert_close(out, oracle_rms_res(*d(x, w, r, s)), BF16)
    x16, r16, w16 = x.to(FP16), r.to(FP16), w.to(FP16)
    assert_close(K.gemma_rmsnorm_residual_scalar(x16, w16, r16, s), oracle_rms_res(*d(x16, w16, r16, s)), FP16)


@pytest.mark.parametrize("fn_name", ["gemma_rmsnorm_residual_scalar", "gemma_dual_rmsnorm_residual_scalar"])
def test_single_rounding_is_bit_exact(gen, fn_name):
    """bf16 in -> fp32 math -> one rounding: identical bits to running the fp32 kernel and rounding with torch."""
    n, h = 9, 200
    fn = getattr(K, fn_name)
    if fn_name == "gemma_rmsnorm_residual_scalar":
        args = [act(gen, n, h, dtype=BF16), wt(gen, h, BF16), act(gen, n, h, dtype=BF16), torch.tensor([0.5])]
    else:
        args = [act(gen, n, h, dtype=BF16), wt(gen, h, BF16), act(gen, n, h, dtype=BF16), wt(gen, h, BF16),
                wt(gen, h, BF16), act(gen, n, h, dtype=BF16), torch.tensor([0.5])]
    got = fn(*args)
    via_fp32 = fn(*[a.float() for a in args]).to(BF16)
    assert torch.equal(got, via_fp32)


def test_out_may_alias_residual(gen):
    n, h = 5, 96
    x, r, w, s = act(gen, n, h), act(gen, n, h), wt(gen, h), torch.tensor([0.5])
    ref = oracle_rms_res(*d(x, w, r, s))
    K.gemma_rmsnorm_residual_scalar(x, w, r, s, out=r)
    assert_close(r, ref, FP32)


# ---- 2. dual rms + residual + scalar ------------------------------------------------------------------------------
def dual_inputs(gen, n, h, dtype):
    return [act(gen, n, h, dtype=dtype), wt(gen, h, dtype), act(gen, n, h, dtype=dtype, scale=3.0), wt(gen, h, dtype),
            wt(gen, h, dtype), act(gen, n, h, dtype=dtype), torch.tensor([0.6])]


@pytest.mark.parametrize("dtype,n,h", ROW_CASES + [(BF16, 7, 2816)], ids=str)
def test_dual_rmsnorm_residual_scalar(gen, dtype, n, h):
    args = dual_inputs(gen, n, h, dtype)
    out = nan_like(args[0])
    K.gemma_dual_rmsnorm_residual_scalar(*args, out=out)
    assert_close(out, oracle_dual(*d(*args)), dtype)


@pytest.mark.parametrize("config", [LaunchConfig(4, 4), LaunchConfig(1, 1), LaunchConfig(16, 8),
                                    C.RowConfig(1, 4, 1, 1), C.RowConfig(3, 2, 2, 2)], ids=str)
def test_dual_launch_config_override(gen, config):
    args = dual_inputs(gen, 13, 200, BF16)
    out = K.gemma_dual_rmsnorm_residual_scalar(*args, config=config)
    assert_close(out, oracle_dual(*d(*args)), BF16)


ROW_KERNELS = ["rms", "dual", "dual_next", "post_attention"]


def row_case(name, gen, n, h, dtype):
    """One row kernel on fresh inputs: (acts, run, oracle). ``run(acts, cfg)`` returns the list of outputs for the
    ``[tokens, h]`` activations ``acts`` (any leading row slice of them works); ``oracle`` is the float64 truth."""
    w = [wt(gen, h, dtype) for _ in range(4)]
    s = torch.tensor([0.7])
    if name == "rms":
        acts = [act(gen, n, h, dtype=dtype), act(gen, n, h, dtype=dtype)]
        return (acts, lambda a, cfg=None: [K.gemma_rmsnorm_residual_scalar(a[0], w[0], a[1], s, config=cfg)],
                [oracle_rms_res(*d(acts[0], w[0], acts[1], s))])
    if name in ("dual", "dual_next"):
        acts = [act(gen, n, h, dtype=dtype), act(gen, n, h, dtype=dtype, scale=3.0), act(gen, n, h, dtype=dtype)]
        args = lambda a: (a[0], w[0], a[1], w[1], w[2], a[2], s)
        if name == "dual":
            return (acts, lambda a, cfg=None: [K.gemma_dual_rmsnorm_residual_scalar(*args(a), config=cfg)],
                    [oracle_dual(*d(*args(acts)))])
        return (acts, lambda a, cfg=None: list(K.gemma_dual_rmsnorm_residual_scalar_next_norm(*args(a), w[3],
                                                                                              config=cfg)),
                list(oracle_dual_next(*d(*args(acts), w[3]), dtype)))
    acts = [act(gen, n, h, dtype=dtype, scale=4.0), act(gen, n, h, dtype=dtype)]
    return (acts, lambda a, cfg=None: list(K.gemma_post_attention_block(a[0], a[1], *w, config=cfg)),
            list(oracle_post_attention(*d(*acts, *w), dtype)))


@pytest.mark.parametrize("name", ROW_KERNELS)
@pytest.mark.parametrize("config", [C.RowConfig(1, 4, 3, 1), C.RowConfig(3, 2, 2, 4)], ids=str)
def test_persistent_loop_many_rows_per_program(gen, name, config):
    """num_sms is 1 on CPU: 1-3 programs each loop over many row blocks (pipelined), including a partial last
    block (ROWS=4 with 23 rows) and programs that get one block more than others."""
    assert C.num_sms(torch.device("cpu")) == 1
    acts, run, refs = row_case(name, gen, 23, 200, BF16)
    outs = run(acts, config)
    for got, ref in zip(outs, refs):
        assert_close(got, ref, BF16)


@pytest.mark.parametrize("name", ROW_KERNELS)
@pytest.mark.parametrize("dtype,h", [(BF16, 200), (FP32, 96), (BF16, 2816)], ids=str)
def test_row_result_independent_of_row_count(gen, name, dtype, h):
    """A row's bits must not depend on how many rows share the call, nor on the grid (a GPU bug once gave
    different bits for some rows at 1025 vs 1280 tokens): n rows vs n + k rows, and other persistent grids."""
    n, k = (9, 14) if h < 1024 else (3, 4)
    acts, run, _ = row_case(name, gen, n + k, h, dtype)
    full = run(acts)
    for cfg in (None, C.RowConfig(1, 4, 1, 1), C.RowConfig(4, 4, 3, 1)):
        short = run([a[:n] for a in acts], cfg)
        for a, b in zip(short, full):
            assert torch.equal(a, b[:n])
    for a, b in zip(run([a[: n + 1] for a in acts]), full):  # different grid size / last-block parity
        assert torch.equal(a, b[: n + 1])


# ---- 7. dual + next layer's input norm ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,n,h", ROW_CASES + [(BF16, 5, 2816)], ids=str)
def test_dual_rmsnorm_next_norm(gen, dtype, n, h):
    args = dual_inputs(gen, n, h, dtype) + [wt(gen, h, dtype)]
    bufs = (nan_like(args[0]), nan_like(args[0]))
    out, nxt = K.gemma_dual_rmsnorm_residual_scalar_next_norm(*args, out=bufs)
    assert out is bufs[0] and nxt is bufs[1]
    ref_out, ref_next = oracle_dual_next(*d(*args), dtype)
    assert_close(out, ref_out, dtype)
    assert_close(nxt, ref_next, dtype)
    # identical to the two unfused steps (the second reads the rounded residual stream)
    plain = K.gemma_dual_rmsnorm_residual_scalar(*args[:7])
    assert torch.equal(out, plain)


# ---- 3. post-attention block --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,n,h", ROW_CASES + [(BF16, 6, 2816)], ids=str)
def test_post_attention_block(gen, dtype, n, h):
    args = [act(gen, n, h, dtype=dtype, scale=4.0), act(gen, n, h, dtype=dtype)] + [wt(gen, h, dtype) for _ in range(4)]
    bufs = tuple(nan_like(args[0]) for _ in range(4))
    outs = K.gemma_post_attention_block(*args, out=bufs)
    assert all(o is b for o, b in zip(outs, bufs))
    for got, ref in zip(outs, oracle_post_attention(*d(*args), dtype)):
        assert_close(got, ref, dtype)


# ---- 4. q/k/v norms + RoPE, in place ------------------------------------------------------------------------------
def rope_tables(gen, n, dim, proportional=False, dtype=FP32):
    if proportional:  # Gemma's proportional RoPE: only the first quarter of the frequencies rotate
        ang = torch.rand(n, dim // 2, generator=gen) * 6.28
        ang[:, dim // 8 :] = 0
        ang = torch.cat((ang, ang), -1)
        return ang.cos().to(dtype), ang.sin().to(dtype)
    return act(gen, n, dim).to(dtype), act(gen, n, dim).to(dtype)  # arbitrary tables test the arithmetic harder


@pytest.mark.parametrize("dtype,n,dim,proportional", [(FP32, 7, 32, False), (BF16, 33, 32, False),
                                                      (BF16, 1, 64, True), (FP32, 5, 64, True)], ids=str)
def test_qkv_norm_rope_in_place(gen, dtype, n, dim, proportional):
    hq, hkv, pad = 4, 2, 24
    width = (hq + 2 * hkv) * dim
    buf = act(gen, n, width + pad, dtype=dtype)
    before = buf.clone()
    q, k, v = buf[:, : hq * dim], buf[:, hq * dim : (hq + hkv) * dim], buf[:, (hq + hkv) * dim : width]
    qw, kw = wt(gen, dim, dtype), wt(gen, dim, dtype)
    cos, sin = rope_tables(gen, n, dim, proportional)
    K.gemma_qkv_norm_rope_(q, k, v, qw, kw, cos, sin)
    c, s = cos.double()[:, None], sin.double()[:, None]
    orig = before.double()
    ref_q = oracle_rope(rms64(orig[:, : hq * dim].view(n, hq, dim), qw.double()), c, s).view(n, -1)
    ref_k = oracle_rope(rms64(orig[:, hq * dim : (hq + hkv) * dim].view(n, hkv, dim), kw.double()), c, s).view(n, -1)
    ref_v = rms64(orig[:, (hq + hkv) * dim : width].view(n, hkv, dim)).view(n, -1)
    assert_close(q, ref_q, dtype)
    assert_close(k, ref_k, dtype)
    assert_close(v, ref_v, dtype)
    assert torch.equal(buf[:, width:], before[:, width:]), "columns outside q/k/v were written"


def test_qkv_without_v_and_without_k(gen):
    n, dim = 5, 32
    q, k = act(gen, n, 2 * dim, dtype=BF16), act(gen, n, dim, dtype=BF16)
    q0, k0 = q.clone(), k.clone()
    qw, kw = wt(gen, dim, BF16), wt(gen, dim, BF16)
    big = act(gen, n, 2 * dim)  # cos/sin as strided column slices with different row strides
    cos, sin = big[:, :dim], act(gen, n, dim, dtype=BF16)
    K.gemma_qkv_norm_rope_(q, k, None, qw, kw, cos, sin)
    c, s = cos.double()[:, None], sin.double()[:, None]
    assert_close(q, oracle_rope(rms64(q0.double().view(n, 2, dim), qw.double()), c, s).view(n, -1), BF16)
    assert_close(k, oracle_rope(rms64(k0.double().view(n, 1, dim), kw.double()), c, s).view(n, -1), BF16)
    q1 = q0.clone()
    K.gemma_qkv_norm_rope_(q1, None, None, qw, None, cos, sin)
    assert_close(q1, oracle_rope(rms64(q0.double().view(n, 2, dim), qw.double()), c, s).view(n, -1), BF16)


# ---- 5. router top-k ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,n,experts,k", [(FP32, 33, 8, 2), (FP32, 1, 8, 2), (BF16, 9, 8, 2),
                                               (FP32, 7, 128, 8)], ids=str)
def test_router_topk(gen, dtype, n, experts, k):
    if dtype == BF16:  # distinct bf16-representable logits: no exact ties
        logits = torch.stack([torch.randperm(experts, generator=gen) for _ in range(n)]).float().div(8).to(dtype)
    else:
        logits = act(gen, n, experts, scale=2.0)
    scale = wt(gen, experts, dtype)
    bufs = (torch.full((n, k), float("nan")), torch.full((n, k), -1, dtype=torch.int64))
    w, ids = K.gemma_router_topk(logits, scale, k, out=bufs)
    ref_w, ref_ids = oracle_router(logits.double(), scale.double(), k)
    assert torch.equal(ids, ref_ids), "expert ids differ from torch.topk's selection order"
    assert w.dtype == torch.float32
    assert rel_err(w, ref_w) <= 1e-5  # fp32 math on (exactly upcast) logits in every dtype
    w32, ids32 = K.gemma_router_topk(logits, scale, k, ids_dtype=torch.int32)
    assert ids32.dtype == torch.int32 and torch.equal(ids32.long(), ref_ids) and torch.equal(w32, w)


def test_router_ties_go_to_lowest_index():
    logits = torch.tensor([[0.0, 1.0, 1.0, 0.5, 1.0, 0.0, 0.0, 0.0]])
    w, ids = K.gemma_router_topk(logits, torch.ones(8), 2)
    assert ids.tolist() == [[1, 2]]
    assert torch.allclose(w, torch.tensor([[0.5, 0.5]]))


# ---- 6. gelu_tanh * up --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,n,inter", [(FP32, 33, 100), (BF16, 33, 100), (BF16, 1, 64), (FP32, 3, 704)],
                         ids=str)
def test_gelu_tanh_mul(gen, dtype, n, inter):
    gate_up = act(gen, n, 2 * inter, dtype=dtype, scale=3.0)  # wide range: exercises both sigmoid branches
    out = torch.full((n, inter), float("nan"), dtype=dtype)
    K.gelu_tanh_mul(gate_up, out=out)
    g, u = gate_up.double().chunk(2, -1)
    assert_close(out, oracle_gelu_mul(g, u), dtype)


def test_gelu_tanh_and_mul_separate_strided_and_bit_exact(gen):
    n, inter = 17, 48
    gate = act(gen, n, inter + 16, dtype=BF16, scale=3.0)[:, 8 : 8 + inter]
    up = act(gen, n, inter, dtype=BF16)
    got = K.gelu_tanh_and_mul(gate, up, config=LaunchConfig(256, 2))  # 4 programs, last one partial
    assert_close(got, oracle_gelu_mul(gate.double(), up.double()), BF16)
    assert torch.equal(got, K.gelu_tanh_and_mul(gate.float(), up.float()).to(BF16))


# ---- zero tokens --------------------------------------------------------------------------------------------------
def test_zero_tokens_return_empty_without_launch(gen, monkeypatch):
    for mod, kernel in ((rmsnorm_residual_scalar, "_rmsnorm_residual_scalar_kernel"),
                        (dual_rmsnorm, "_dual_rmsnorm_kernel"), (post_attention_block, "_post_attention_kernel"),
                        (qkv_norm_rope, "_qkv_norm_rope_kernel"), (router_topk, "_router_topk_kernel"),
                        (gelu_and_mul, "_gelu_tanh_mul_kernel")):
        monkeypatch.setattr(mod, kernel, None)  # any launch would raise TypeError
    h = 96
    x, w, s = torch.empty(0, h), wt(gen, h), torch.ones(1)
    assert K.gemma_rmsnorm_residual_scalar(x, w, x, s).shape == (0, h)
    assert K.gemma_dual_rmsnorm_residual_scalar(x, w, x, w, w, x, s).shape == (0, h)
    out, nxt = K.gemma_dual_rmsnorm_residual_scalar_next_norm(x, w, x, w, w, x, s, w)
    assert out.shape == nxt.shape == (0, h)
    assert [o.shape for o in K.gemma_post_attention_block(x, x, w, w, w, w)] == [(0, h)] * 4
    q = torch.empty(0, 64)
    assert K.gemma_qkv_norm_rope_(q, q, q, wt(gen, 32), wt(gen, 32), torch.empty(0, 32), torch.empty(0, 32)) is None
    weights, ids = K.gemma_router_topk(torch.empty(0, 8), torch.ones(8), 2)
    assert weights.shape == ids.shape == (0, 2)
    assert K.gelu_tanh_mul(torch.empty(0, 20)).shape == (0, 10)


# ---- rejections ---------------------------------------------------------------------------------------------------
def rms_call(x=None, w=None, r=None, s=None, **kw):
    h = 96
    x = torch.randn(4, h) if x is None else x
    return K.gemma_rmsnorm_residual_scalar(x, torch.ones(h) if w is None else w,
                                           torch.randn(4, h) if r is None else r,
                                           torch.ones(1) if s is None else s, **kw)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(x=torch.randn(2, 2, 96)), ValueError, "2-D"),
    (dict(r=torch.randn(4, 97)), ValueError, "hidden size 97, expected 96"),
    (dict(r=torch.randn(5, 96)), ValueError, "5 tokens, expected 4"),
    (dict(w=torch.ones(95)), ValueError, "95 elements, expected 96"),
    (dict(w=torch.ones(1, 96)), ValueError, "must be 1-D"),
    (dict(r=torch.randn(4, 96, dtype=BF16)), TypeError, "mixed dtypes"),
    (dict(w=torch.ones(96, dtype=FP16)), TypeError, "float32 or the activation dtype"),
    (dict(r=torch.randn(4, 96, device="meta")), ValueError, "is on meta"),
    (dict(w=torch.ones(96, device="meta")), ValueError, "is on meta"),
    (dict(x=torch.randn(96, 4).t()), ValueError, "contiguous last dim"),
    (dict(r=torch.randn(4, 192)[:, ::2]), ValueError, "contiguous last dim"),
    (dict(w=torch.ones(192)[::2]), ValueError, "must be contiguous"),
    (dict(s=torch.ones(2)), ValueError, "exactly one element"),
    (dict(s=0.5), TypeError, "one-element tensor"),
    (dict(s=torch.ones(1, dtype=torch.int32)), TypeError, "unsupported dtype"),
    (dict(x=torch.randn(4, 96, dtype=torch.float64)), TypeError, "unsupported dtype"),
    (dict(x=[[1.0] * 96] * 4), TypeError, "must be a torch.Tensor"),
    (dict(out=torch.empty(4, 95)), ValueError, r"out must have shape \(4, 96\)"),
    (dict(out=torch.empty(4, 96, dtype=BF16)), TypeError, "out must have dtype"),
    (dict(out=torch.empty(1, 96).expand(4, 96)), ValueError, "overlapping rows"),
])
def test_rmsnorm_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rms_call(**kwargs)


def test_dual_and_post_attention_reject():
    h, x, w, s = 96, torch.randn(3, 96), torch.ones(96), torch.ones(1)
    with pytest.raises(ValueError, match="weight3 has 95 elements"):
        K.gemma_dual_rmsnorm_residual_scalar(x, w, x, w, torch.ones(95), x, s)
    with pytest.raises(TypeError, match="x2 has dtype"):
        K.gemma_dual_rmsnorm_residual_scalar(x, w, x.to(BF16), w, w, x, s)
    with pytest.raises(ValueError, match="next_weight has 97 elements"):
        K.gemma_dual_rmsnorm_residual_scalar_next_norm(x, w, x, w, w, x, s, torch.ones(97))
    with pytest.raises(TypeError, match="tuple of 2 tensors"):
        K.gemma_dual_rmsnorm_residual_scalar_next_norm(x, w, x, w, w, x, s, w, out=torch.empty(3, h))
    with pytest.raises(ValueError, match="router_scale has 48 elements"):
        K.gemma_post_attention_block(x, x, w, w, w, torch.ones(48))
    with pytest.raises(ValueError, match=r"out\[2\] must have shape"):
        K.gemma_post_attention_block(x, x, w, w, w, w, out=(x.clone(), x.clone(), torch.empty(2, h), x.clone()))


def test_qkv_rejects():
    n, dim = 3, 32
    q, k, v, w = torch.randn(n, 4 * dim), torch.randn(n, dim), torch.randn(n, dim), torch.ones(dim)
    cs = torch.randn(n, dim)
    call = K.gemma_qkv_norm_rope_
    with pytest.raises(ValueError, match="k_weight has 16 elements, expected 32 \\(head_dim\\)"):
        call(q, k, v, w, torch.ones(16), cs, cs)
    with pytest.raises(ValueError, match="not a multiple of head_dim"):
        call(torch.randn(n, 100), k, v, w, w, cs, cs)
    with pytest.raises(ValueError, match="cos must have shape"):
        call(q, k, v, w, w, torch.randn(n, dim // 2), cs)
    with pytest.raises(ValueError, match="sin must have shape"):
        call(q, k, v, w, w, cs, torch.randn(n + 1, dim))
    with pytest.raises(TypeError, match="cos has dtype"):
        call(q, k, v, w, w, cs.half(), cs)
    with pytest.raises(ValueError, match="k_weight is required"):
        call(q, k, v, w, None, cs, cs)
    with pytest.raises(TypeError, match="v has dtype"):
        call(q, k, v.to(BF16), w, w, cs, cs)
    with pytest.raises(ValueError, match="k has 2 tokens"):
        call(q, torch.randn(2, dim), v, w, w, cs, cs)
    with pytest.raises(ValueError, match="contiguous last dim"):
        call(torch.randn(4 * dim, n).t(), k, v, w, w, cs, cs)
    with pytest.raises(ValueError, match="even"):
        call(torch.randn(n, 9), None, None, torch.ones(3), None, torch.randn(n, 3), torch.randn(n, 3))


def test_router_rejects():
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


def test_gelu_rejects():
    with pytest.raises(ValueError, match="must be even"):
        K.gelu_tanh_mul(torch.randn(3, 7))
    with pytest.raises(ValueError, match="hidden size 5, expected 4"):
        K.gelu_tanh_and_mul(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match="mixed dtypes"):
        K.gelu_tanh_and_mul(torch.randn(3, 4), torch.randn(3, 4, dtype=BF16))


def test_launch_config_validates():
    with pytest.raises(ValueError, match="power of two"):
        LaunchConfig(rows=3, num_warps=4)


# ---- the torch-reference twins (the CPU fallback) agree with the oracles ------------------------------------------
def test_reference_twins_match_oracles(gen):
    n, h, dim = 6, 96, 32
    args = dual_inputs(gen, n, h, FP32)
    wn = wt(gen, h)
    assert rel_err(K.gemma_dual_rmsnorm_residual_scalar_ref(*args), oracle_dual(*d(*args))) < 1e-6
    out, nxt = K.gemma_dual_rmsnorm_residual_scalar_next_norm_ref(*args, wn)
    ref_out, ref_next = oracle_dual_next(*d(*args, wn), FP32)
    assert rel_err(out, ref_out) < 1e-6 and rel_err(nxt, ref_next) < 1e-6
    x, w, r, s = args[0], args[1], args[5], args[6]
    assert rel_err(K.gemma_rmsnorm_residual_scalar_ref(x, w, r, s), oracle_rms_res(*d(x, w, r, s))) < 1e-6
    pa = [x, r, w, args[3], args[4], wn]
    for got, ref in zip(K.gemma_post_attention_block_ref(*pa), oracle_post_attention(*d(*pa), FP32)):
        assert rel_err(got, ref) < 1e-6
    q, qw = act(gen, n, 2 * dim), wt(gen, dim)
    cos, sin = rope_tables(gen, n, dim)
    q_ref = oracle_rope(rms64(q.double().view(n, 2, dim), qw.double()), cos.double()[:, None],
                        sin.double()[:, None]).view(n, -1)
    K.gemma_qkv_norm_rope_ref_(q, None, None, qw, None, cos, sin)
    assert rel_err(q, q_ref) < 1e-6
    logits, scale = act(gen, n, 8), wt(gen, 8)
    w_ref, ids_ref = oracle_router(logits.double(), scale.double(), 2)
    w_got, ids_got = K.gemma_router_topk_ref(logits, scale, 2)
    assert torch.equal(ids_got, ids_ref) and rel_err(w_got, w_ref) < 1e-6
    gu = act(gen, n, 40, scale=3.0)
    assert rel_err(K.gelu_tanh_and_mul_ref(*gu.chunk(2, -1)), oracle_gelu_mul(*gu.double().chunk(2, -1))) < 1e-6


# ---- the oracles agree with Hugging Face's Gemma 4 modules (fp32) -------------------------------------------------
def test_oracles_match_hugging_face(gen):
    hf = pytest.importorskip("transformers.models.gemma4.modeling_gemma4")
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig

    n, h, dim = 5, 96, 32
    x, res = act(gen, n, h), act(gen, n, h)
    norm = hf.Gemma4RMSNorm(h, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(wt(gen, h))
        assert rel_err(norm(x), rms64(x.double(), norm.weight.double())) < 1e-6
        assert rel_err(hf.Gemma4RMSNorm(h, eps=EPS, with_scale=False)(x), rms64(x.double())) < 1e-6
        q = act(gen, n, 2, dim)
        cos, sin = rope_tables(gen, n, dim)
        assert rel_err(hf.apply_rotary_pos_emb(q, cos, sin, unsqueeze_dim=1),
                       oracle_rope(q.double(), cos.double()[:, None], sin.double()[:, None])) < 1e-6
        # router: our post-attention router_in -> matmul -> our top-k kernel == Gemma4TextRouter
        cfg = Gemma4TextConfig(hidden_size=h, num_experts=8, top_k_experts=2, num_hidden_layers=1, vocab_size=64,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=dim, intermediate_size=64,
                               moe_intermediate_size=32, enable_moe_block=True)
        router = hf.Gemma4TextRouter(cfg)
        router.proj.weight.copy_(act(gen, 8, h))
        router.scale.copy_(wt(gen, h))
        router.per_expert_scale.copy_(wt(gen, 8))
        _, hf_w, hf_ids = router(res)
        ones = torch.ones(h)
        h_out, _, _, router_in = K.gemma_post_attention_block(torch.zeros(n, h), res, ones, ones, ones, router.scale)
        assert torch.equal(h_out, res)
        w, ids = K.gemma_router_topk(router_in @ router.proj.weight.T, router.per_expert_scale, 2)
        assert torch.equal(ids, hf_ids) and rel_err(w, hf_w.double()) < 1e-5


# ---- the benchmark command (CPU smoke run) ------------------------------------------------------------------------
def test_bench_kernels_quick_smoke(tmp_path, monkeypatch):
    from gemma4lab.lab.bench import kernels as bench

    assert bench.main(["--quick", "--tokens", "1,3", "--device", "cpu", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "kernels_cpu.json").read_text())
    assert doc["producer"] == "gemma4lab" and doc["environment"]["card"] == "cpu"
    assert {r["kernel"] for r in doc["results"]} == set(bench.KERNELS)
    assert len(doc["results"]) == 2 * len(bench.KERNELS) and not doc["errors"]
    for r in doc["results"]:
        assert r["backend"] == "triton-interpreter" and r["triton_ms"] > 0 and r["eager_ms"] > 0
        assert r["compile_ms"] is None and r["graph_ms"] is None
        assert r["rel_err_vs_unfused"] < 1e-2
    assert doc["skipped"]["compile"] and doc["skipped"]["graph"]
    assert (tmp_path / "kernels_cpu.png").stat().st_size > 0
    # --merge keeps the rows of kernels not re-run
    assert bench.main(["--quick", "--tokens", "1", "--device", "cpu", "--out", str(tmp_path),
                       "--kernels", "router_topk", "--merge"]) == 0
    merged = json.loads((tmp_path / "kernels_cpu.json").read_text())
    assert len(merged["results"]) == 2 * len(bench.KERNELS) - 1


# ---- on a GPU (compiled Triton): python -m pytest -m gpu tests/test_kernels.py ------------------------------------
def gpu_cases(gen, n, h=2816):
    """(name, call, oracle outputs) for every kernel at the real hidden size, inputs on CUDA."""
    cu = lambda *ts: [t.cuda() for t in ts]
    dual = cu(*dual_inputs(gen, n, h, BF16))
    wn, pa = cu(wt(gen, h, BF16))[0], cu(act(gen, n, h, dtype=BF16, scale=4.0), act(gen, n, h, dtype=BF16),
                                        *[wt(gen, h, BF16) for _ in range(4)])
    logits, scale, gate_up = cu(act(gen, n, 128, scale=2.0), wt(gen, 128), act(gen, n, 2 * 704, dtype=BF16))
    return [
        ("rms", lambda: K.gemma_rmsnorm_residual_scalar(dual[0], dual[1], dual[5], dual[6]),
         [oracle_rms_res(*d(dual[0], dual[1], dual[5], dual[6]))]),
        ("dual", lambda: K.gemma_dual_rmsnorm_residual_scalar(*dual), [oracle_dual(*d(*dual))]),
        ("dual_next", lambda: K.gemma_dual_rmsnorm_residual_scalar_next_norm(*dual, wn),
         list(oracle_dual_next(*d(*dual, wn), BF16))),
        ("post_attention", lambda: K.gemma_post_attention_block(*pa), list(oracle_post_attention(*d(*pa), BF16))),
        ("router", lambda: K.gemma_router_topk(logits, scale, 8)[0], [oracle_router(*d(logits, scale), 8)[0]]),
        ("gelu", lambda: K.gelu_tanh_mul(gate_up), [oracle_gelu_mul(*gate_up.double().chunk(2, -1))]),
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 1055, 4099])
def test_gpu_kernels_match_oracles(gen, n):
    for name, call, refs in gpu_cases(gen, n):
        outs = call()
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        assert K.kernel_backend(outs[0]) == "triton"
        for got, ref in zip(outs, refs):
            err = rel_err(got, ref)
            assert err <= (1e-5 if got.dtype == FP32 else TOL[BF16]), f"{name}: {err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dim,hkv", [(256, 8), (512, 2)])
def test_gpu_qkv_norm_rope(gen, dim, hkv):
    n, hq = 300, 16
    width = (hq + 2 * hkv) * dim
    buf = act(gen, n, width, dtype=BF16).cuda()
    before = buf.double()
    q, k, v = buf[:, : hq * dim], buf[:, hq * dim : (hq + hkv) * dim], buf[:, (hq + hkv) * dim :]
    qw, kw = wt(gen, dim, BF16).cuda(), wt(gen, dim, BF16).cuda()
    cos, sin = (t.cuda() for t in rope_tables(gen, n, dim, proportional=dim == 512))
    K.gemma_qkv_norm_rope_(q, k, v, qw, kw, cos, sin)
    c, s = cos.double()[:, None], sin.double()[:, None]
    ref_q = oracle_rope(rms64(before[:, : hq * dim].view(n, hq, dim), qw.double()), c, s).view(n, -1)
    ref_v = rms64(before[:, (hq + hkv) * dim :].view(n, hkv, dim)).view(n, -1)
    assert_close(q, ref_q, BF16)
    assert_close(v, ref_v, BF16)


@pytest.mark.gpu
def test_gpu_cuda_graph_reads_scalar_at_replay(gen):
    """The scalar is read inside the kernel: updating it in place changes what a captured graph computes."""
    args = [t.cuda() for t in dual_inputs(gen, 64, 2816, BF16)]
    out = torch.empty_like(args[0])
    K.gemma_dual_rmsnorm_residual_scalar(*args, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        K.gemma_dual_rmsnorm_residual_scalar(*args, out=out)
    args[6].fill_(2.5)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, oracle_dual(*d(*args)), BF16)
