"""Every kernel variant the tiny model launches on CPU (text and image prefill, decode, fp32, FP8 experts with and
without FP8 activations) compiles for an H100/H200 and fits sm_90's shared memory: the interpreter runs code the
compiler rejects, and this is the check CI can make without a card."""

from __future__ import annotations

import pytest
import torch

import gemma4lab
from gemma4lab import kernels as K
from gemma4lab.lab.hopper_compile import SM90_SHARED_BYTES, compile_for_sm90, record_launches, with_dependent_launch
from gemma4lab.model.quantize import quantize_fp8_per_channel, set_fp8_activations

pytestmark = pytest.mark.usefixtures("triton_path_only")


def _run_model(dtype: torch.dtype, fp8: bool) -> None:
    model = gemma4lab.random_init("tiny", dtype=dtype, seed=3)
    model.set_fusion("all").set_attention_backend("triton")
    ids = torch.randint(3, 400, (1, 19), generator=torch.Generator().manual_seed(0))
    if fp8:
        gemma4lab.quantize_experts(model, activations="fp8")
        model(ids)
        set_fp8_activations(model, False)
    model(ids)
    model.generate(ids, max_new_tokens=2)


def _run_expert_gemms() -> None:
    """bf16 activations into the expert GEMM in every weight format, few rows and many (the model runs the kernel
    only in fp32 on CPU: the interpreter's bf16 ``tl.dot`` is wrong, but a launch records the variant all the same)."""
    gen = torch.Generator().manual_seed(0)
    e, h, i = 4, 64, 32
    w_gu = torch.randn(e, 2 * i, h, generator=gen).to(torch.bfloat16)
    w_dn = torch.randn(e, h, i, generator=gen).to(torch.bfloat16)
    q_gu, s_gu = quantize_fp8_per_channel(w_gu)
    q_dn, s_dn = quantize_fp8_per_channel(w_dn)
    for tokens in (3, 70):  # 70 tokens × top-2 over 4 experts reaches the many-rows tiles (64 rows an expert)
        idx = torch.randint(0, e, (tokens, 2), generator=gen)
        offs, slots, _ = K.gemma_moe_route(idx, e)
        x = torch.randn(tokens, h, generator=gen).to(torch.bfloat16)
        for wg, sg, wd, sd, a8 in ((w_gu, None, w_dn, None, False), (q_gu, s_gu, q_dn, s_dn, False),
                                   (q_gu, s_gu, q_dn, s_dn, True)):
            gu = K.gemma_moe_gemm(x, wg, offs, row_index=slots, top_k=2, w_scale=sg, a_fp8=a8)
            K.gemma_moe_gemm(gu, wd, offs, gelu_gate=True, w_scale=sd, a_fp8=a8)


def _run_attention_layouts() -> None:
    """The H200's attention tiles at the real head dims in bf16, both layouts (dv-split programs and TMA): the tiny
    model's CPU tiles are 16×16, and shared memory and registers are only tested at the sizes the card runs."""
    gen = torch.Generator().manual_seed(1)
    for d, hkv, window in ((512, 2, None), (256, 8, 1024)):
        q, k, v = (torch.randn(70, h, d, generator=gen).to(torch.bfloat16) for h in (16, hkv, hkv))
        cu = torch.tensor([0, 70], dtype=torch.int32)
        for cfg in ((K.AttentionConfig(128, 64, 8, 1, dv_splits=2), K.AttentionConfig(64, 32, 8, 2, tma=True))
                    if d == 512 else (K.AttentionConfig(128, 64, 8, 2), K.AttentionConfig(128, 64, 8, 2, tma=True))):
            K.gemma_prefill_attention(q, k, v, cu, 70, window=window, config=cfg)
    # the vision tower's q/k/v norms with 2-D RoPE at its real head dim (72: quarters of 18, masked lanes)
    qkv = torch.randn(40, 3 * 16 * 72, generator=gen).to(torch.bfloat16)
    w = torch.ones(72, dtype=torch.bfloat16)
    cos, sin = torch.ones(40, 72), torch.zeros(40, 72)
    K.gemma_qkv_norm_rope_(qkv[:, :1152], qkv[:, 1152:2304], qkv[:, 2304:], w, w, cos, sin, axial=True,
                           config=K.HeadConfig(16, 4))  # the card's tile at head dim 72 (the interpreter's is taller)
    # the encoder's norm sandwich (hidden 1152) and gated GELU (4304 wide), as a card launches them
    x, wn = torch.randn(40, 1152, generator=gen).to(torch.bfloat16), torch.ones(1152, dtype=torch.bfloat16)
    K.gemma_norm_residual_norm(x, x, wn, wn, config=K.row_config(1152, torch.bfloat16, 2))
    g = torch.randn(40, 4304, generator=gen).to(torch.bfloat16)
    K.gemma_gelu_tanh_and_mul(g, g)


def _run_dense_projections() -> None:
    """The few-row dense GEMM with the settings the card picks for the decoder's real shapes (the tiny model takes
    the interpreter's), in bf16 and in fp32 (exact fp32 products: no tensor cores, other shared-memory layouts): the
    unsplit and the split path. Small operands carry them: only the settings and the 16-byte alignment reach the
    compiler. (Compilers differ: fp32 at bf16's K step fits 160 KB here under Triton 3.9 and asked 240 KB of the
    H200's Triton 3.6, which refused it; the card's GPU tests are the check of record.)"""
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(1, 512, generator=gen).to(dtype)
        ws = [torch.randn(n, 512, generator=gen).to(dtype) for n in (128, 64, 64)]
        for ns, k in (([4096, 2048, 2048], 2816), ([1024], 2816), ([2816], 8192)):
            cfg = K.dense_config(1, ns, k, itemsize=x.element_size(), interpreter=False)
            K.gemma_dense_gemm(x, ws[:len(ns)], config=cfg)


def test_every_launched_kernel_compiles_for_sm90():
    with record_launches() as launches:
        _run_model(torch.bfloat16, fp8=True)
        _run_model(torch.float32, fp8=False)
        _run_expert_gemms()
        _run_attention_layouts()
        _run_dense_projections()
    kernels = {x.kernel.split(":")[1] for x in launches}
    assert {"_moe_gemm_kernel", "_prefill_attention_kernel", "_qkv_norm_rope_kernel"} <= kernels, kernels
    assert any(dict(x.args).get("AXIAL") == ("const", True) for x in launches)
    assert kernels & {"_decode_attention_kernel", "_split_decode_attention_kernel"}, kernels
    pdl = with_dependent_launch(launches)  # every kernel of the package takes PDL; each variant compiles with it too
    assert {x.kernel.split(":")[1] for x in pdl} == kernels, kernels - {x.kernel.split(":")[1] for x in pdl}
    launches = launches | pdl
    results = compile_for_sm90(launches)
    assert len(results) == len(launches)
    failed = [f"{r.kernel} {r.constants}\n{r.error}" for r in results if r.error]
    assert not failed, "\n\n".join(failed)
    too_big = [(r.kernel, r.shared_bytes) for r in results if r.shared_bytes > SM90_SHARED_BYTES]
    assert not too_big, too_big
    # the dense GEMM streams its weights through shared memory, num_stages - 1 tiles ahead (16-byte async copies):
    # a kernel that lost its operands' 16-divisibility loads them straight into registers, 4x slower on the H200
    dense = [r for r in results if r.kernel.endswith("_dense_gemm_kernel") and r.constants.get("IEEE") == "False"
             and r.constants.get("BLOCK_K") == "256"]
    assert dense and all(r.shared_bytes >= 3 * 64 * 256 * 2 for r in dense), [(r.constants, r.shared_bytes)
                                                                              for r in dense]
    print(f"{len(results)} variants of {len(kernels)} kernels compile for sm_90")
