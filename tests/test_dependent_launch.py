"""Programmatic dependent launch (``gemma4lab.kernels.dependent_launch``): the switch itself on any machine; on a
card, that every kernel launched with it — eagerly and captured in the decode graph — writes the bits it writes
without it (a kernel that read an activation before its wait would race the kernel before it and differ)."""

from __future__ import annotations

import pytest
import torch

import gemma4lab
from gemma4lab import kernels as K
from gemma4lab.kernels._common import pdl_meta
from gemma4lab.runtime.decode_graphs import DecodeGraphRunner


def test_the_switch_nests_and_restores():
    x = torch.zeros(2)
    assert pdl_meta(x) == {"PDL": False}
    with K.dependent_launch():
        with K.dependent_launch(False):
            assert pdl_meta(x) == {"PDL": False}
        # a CPU tensor never launches with it (the interpreter has no dependent launch)
        assert pdl_meta(x) == {"PDL": False}
    with pytest.raises(TypeError, match="bool"):
        K.dependent_launch("yes")


def test_the_runners_default_to_it_where_supported():
    model = gemma4lab.random_init("tiny", dtype=torch.float32, seed=0)
    assert not K.dependent_launch_supported(torch.device("cpu"))
    assert DecodeGraphRunner(model, max_batch=2, max_len=32, progress=False).dependent_launch is False
    runner = DecodeGraphRunner(model, max_batch=2, max_len=32, progress=False, dependent_launch=True)
    assert runner.dependent_launch is True
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        runner.capture(batches=[3])


@pytest.fixture(scope="module")
def cuda_model():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return gemma4lab.random_init("tiny", dtype=torch.bfloat16, device="cuda", seed=5).set_fusion("all")


@pytest.mark.gpu
def test_gpu_every_kernel_gives_the_same_bits_with_dependent_launch(cuda_model):
    """A prefill and greedy decode launch every kernel family (norms, q/k/v norm + RoPE, attention, routing, expert
    and dense GEMMs, the combine): with dependent launch on, eagerly, the logits are bit-identical."""
    ids = torch.randint(3, 400, (2, 37), generator=torch.Generator().manual_seed(1)).cuda()
    ref = cuda_model(ids).logits
    with K.dependent_launch():
        got = cuda_model(ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_dense_gemm_prefetch_and_split_give_the_same_bits():
    """The dense GEMM asks L2 for its first weight tiles before it waits, on the unsplit and the split path."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 8192, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(2816, 8192, device="cuda", generator=g).to(torch.bfloat16)
    for cfg in (K.DenseConfig(split_k=1), K.DenseConfig(split_k=6, block_k=128)):
        ref = K.gemma_dense_gemm(x, w, config=cfg)
        with K.dependent_launch():
            out = torch.full_like(ref, float("nan"))
            K.gemma_dense_gemm(x, w, out=out, config=cfg)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_decode_graph_with_dependent_launch_equals_the_plain_graph(cuda_model):
    """The decode step captured with dependent launch (programmatic edges in the graph) replays the plain graph's
    logits bit for bit, at batch 1 and 3, and its greedy tokens are the eager model's."""
    prompt = torch.randint(3, 400, (3, 21), generator=torch.Generator().manual_seed(2)).cuda()
    plain = DecodeGraphRunner(cuda_model, max_batch=3, max_len=64, progress=False, dependent_launch=False)
    pdl = DecodeGraphRunner(cuda_model, max_batch=3, max_len=64, progress=False, dependent_launch=True)
    assert DecodeGraphRunner(cuda_model, max_batch=1, max_len=8, progress=False).dependent_launch \
        is K.dependent_launch_supported(cuda_model.device)
    for b in (1, 3):
        want = plain.generate(prompt[:b], max_new_tokens=6)
        got = pdl.generate(prompt[:b], max_new_tokens=6)
        assert torch.equal(got, want)
        tok = want[:, -1].contiguous()
        pos = torch.full((b,), want.shape[1] - 1, dtype=torch.long, device="cuda")
        torch.testing.assert_close(pdl.step(tok, pos), plain.step(tok, pos), rtol=0, atol=0)
    eager = cuda_model.generate(prompt[:1], max_new_tokens=6)
    assert torch.equal(pdl.generate(prompt[:1], max_new_tokens=6), eager)
