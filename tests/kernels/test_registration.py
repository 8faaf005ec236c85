"""The kernels as PyTorch ops: one namespace, dispatch in the registration, profiler names from the op names,
torch.compile tracing them with no graph break; and the oracles themselves checked against Hugging Face."""

from __future__ import annotations

import pytest
import torch
from support import (
    EPS,
    FP32,
    act,
    assert_rounded,
    d,
    dual_inputs,
    oracle_dual,
    oracle_dual_next,
    oracle_gelu_mul,
    oracle_post_attention,
    oracle_rms_res,
    oracle_rope,
    oracle_router,
    rms64,
    rope_tables,
    wt,
)

import gemma4lab.kernels as K


def test_every_kernel_is_an_op_in_one_namespace():
    for name in K.OPS:
        assert hasattr(torch.ops.gemma4lab, name), name
    listed = {n for n in dir(torch.ops.gemma4lab) if not n.startswith("_") and n != "name"}
    assert listed == set(K.OPS)


def test_dispatch_reports_the_backend():
    assert K.kernel_backend(torch.empty(1)) == ("triton-interpreter" if K.INTERPRET else "torch-reference")
    assert K.kernel_backend(torch.empty(1, device="meta")) == "torch-reference"


def test_profiler_names_the_op(gen):
    from gemma4lab.lab.profiling import profile_forward

    args = dual_inputs(gen, 4, 96, FP32)
    prof = profile_forward(lambda: K.gemma_dual_rmsnorm_residual_scalar(*args), warmup=0)
    if prof["device"] == "cpu":
        assert dict(prof["top_kernels"]) == {"gemma4lab::dual_rmsnorm_residual_scalar": 1}


def test_ops_trace_under_torch_compile_fullgraph(gen):
    """Each op is opaque to the compiler (its fake says "no new tensors"): a function of several kernels compiles
    with fullgraph=True and gives the eager result, for two row counts without recompiling."""
    import torch._dynamo.utils as dynamo_utils

    def layer_tail(x1, w1, x2, w2, w3, r, s, logits, scale):
        out = K.gemma_dual_rmsnorm_residual_scalar(x1, w1, x2, w2, w3, r, s)
        weights, ids = K.gemma_router_topk(logits, scale, 2)
        return out * 2, weights, ids

    compiled = torch.compile(layer_tail, fullgraph=True, dynamic=True)
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    for n in (5, 9):
        args = dual_inputs(gen, n, 96, FP32) + [act(gen, n, 8), wt(gen, 8)]
        for got, want in zip(compiled(*args), layer_tail(*args)):
            assert torch.equal(got, want)
    assert dynamo_utils.counters["stats"]["unique_graphs"] - before == 1


def test_reference_twins_match_oracles(gen):
    """The CPU fallback without the interpreter: each ``_ref`` against the float64 oracle."""
    n, h, dim = 6, 96, 32
    args = dual_inputs(gen, n, h, FP32)
    wn = wt(gen, h)
    assert_rounded(K.gemma_dual_rmsnorm_residual_scalar_ref(*args), oracle_dual(*d(*args)), FP32)
    out, nxt = K.gemma_dual_rmsnorm_residual_scalar_next_norm_ref(*args, wn)
    ref_out, ref_next = oracle_dual_next(*d(*args, wn), FP32)
    assert_rounded(out, ref_out, FP32)
    assert_rounded(nxt, ref_next, FP32)
    x, w, r, s = args[0], args[1], args[5], args[6]
    assert_rounded(K.gemma_rmsnorm_residual_scalar_ref(x, w, r, s), oracle_rms_res(*d(x, w, r, s)), FP32)
    pa = [x, r, w, args[3], args[4], wn]
    for got, ref in zip(K.gemma_post_attention_block_ref(*pa), oracle_post_attention(*d(*pa), FP32)):
        assert_rounded(got, ref, FP32)
    q, qw = act(gen, n, 2 * dim), wt(gen, dim)
    cos, sin = rope_tables(gen, n, dim)
    q_ref = oracle_rope(rms64(q.double().view(n, 2, dim), qw.double()), cos.double()[:, None],
                        sin.double()[:, None]).view(n, -1)
    K.gemma_qkv_norm_rope_ref_(q, None, None, qw, None, cos, sin)
    assert_rounded(q, q_ref, FP32)
    logits, scale = act(gen, n, 8), wt(gen, 8)
    w_ref, ids_ref = oracle_router(logits.double(), scale.double(), 2)
    w_got, ids_got = K.gemma_router_topk_ref(logits, scale, 2)
    assert torch.equal(ids_got, ids_ref)
    assert_rounded(w_got, w_ref, FP32)
    gu = act(gen, n, 40, scale=3.0)
    assert_rounded(K.gemma_gelu_tanh_and_mul_ref(*gu.chunk(2, -1)), oracle_gelu_mul(*gu.double().chunk(2, -1)), FP32)


def test_oracles_match_hugging_face(gen):
    """The float64 oracles are what transformers' Gemma 4 modules compute (fp32), so the kernels are judged
    against the reference model and not against their own twins."""
    hf = pytest.importorskip("transformers.models.gemma4.modeling_gemma4")
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig

    n, h, dim = 5, 96, 32
    x, res = act(gen, n, h), act(gen, n, h)
    norm = hf.Gemma4RMSNorm(h, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(wt(gen, h))
        assert_rounded(norm(x), rms64(x.double(), norm.weight.double()), FP32)
        assert_rounded(hf.Gemma4RMSNorm(h, eps=EPS, with_scale=False)(x), rms64(x.double()), FP32)
        q = act(gen, n, 2, dim)
        cos, sin = rope_tables(gen, n, dim)
        assert_rounded(hf.apply_rotary_pos_emb(q, cos, sin, unsqueeze_dim=1),
                       oracle_rope(q.double(), cos.double()[:, None], sin.double()[:, None]), FP32)
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
        assert torch.equal(ids, hf_ids)
        assert_rounded(w, hf_w.double(), FP32, math_err=1e-6)
