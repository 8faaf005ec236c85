"""``Fusion.branches``: the dense MLP on a second CUDA stream beside the router and the experts. The same kernels on
the same inputs, so every result must be bit-identical with and without it — eagerly, in the piecewise prefill
graphs and in the decode graph (where the two streams become two branches of one captured graph)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import gemma4lab
from gemma4lab.model.decoder import branch_stream
from gemma4lab.runtime.decode_graphs import DecodeGraphRunner
from gemma4lab.runtime.pcg import PiecewiseCudaGraphRunner


def test_branches_is_part_of_all_and_of_the_program_key():
    """On in ``Fusion.all()``, off in the unfused and published settings, and part of the captured program's key (a
    runner recaptures when it changes); on the CPU there is no second stream to fork to."""
    all_ = gemma4lab.Fusion.all()
    assert all_.branches and not gemma4lab.Fusion.none().branches and not gemma4lab.Fusion.published().branches
    model = gemma4lab.random_init("tiny", dtype=torch.float32, seed=0).set_fusion(all_)
    from gemma4lab.model.decoder import program_key

    key = program_key(model.language_model)
    model.set_fusion(replace(all_, branches=False))
    assert program_key(model.language_model) != key
    assert branch_stream(torch.zeros(1)) is None


@pytest.fixture(scope="module")
def cuda_model():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return gemma4lab.random_init("tiny", dtype=torch.bfloat16, device="cuda", seed=7)


def _fusions():
    on = gemma4lab.Fusion.all()
    return on, replace(on, branches=False)


@pytest.mark.gpu
def test_gpu_eager_and_prefill_graphs_equal_with_and_without_branches(cuda_model):
    """Eager prefill logits and the piecewise graphs' logits are the same bits with the dense MLP on its own stream
    as on one stream (a 37-token and a 5-token prompt: the streaming expert GEMM and the few-row dense path)."""
    on, off = _fusions()
    for t in (37, 5):
        ids = torch.randint(3, 400, (1, t), generator=torch.Generator().manual_seed(t)).cuda()
        cuda_model.set_fusion(off)
        ref = cuda_model(ids).logits
        cuda_model.set_fusion(on)
        assert torch.equal(cuda_model(ids).logits, ref)
        runner = PiecewiseCudaGraphRunner(cuda_model, buckets=[8, 64], progress=False)
        runner.capture()
        assert torch.equal(runner(ids).logits, ref)
    assert branch_stream(ids) is not None


@pytest.mark.gpu
def test_gpu_decode_graph_with_branches_equals_one_stream(cuda_model):
    """The decode step captured with two branches replays the one-stream graph's logits bit for bit at batch 1 and
    3, and its greedy tokens are the same (two models of the same seed, one setting each, so neither runner sees
    its settings change)."""
    on, off = _fusions()
    one_stream = gemma4lab.random_init("tiny", dtype=torch.bfloat16, device="cuda", seed=7).set_fusion(off)
    cuda_model.set_fusion(on)
    prompt = torch.randint(3, 400, (3, 21), generator=torch.Generator().manual_seed(3)).cuda()
    one = DecodeGraphRunner(one_stream, max_batch=3, max_len=64, progress=False)
    two = DecodeGraphRunner(cuda_model, max_batch=3, max_len=64, progress=False)
    for b in (1, 3):
        want = one.generate(prompt[:b], max_new_tokens=6)
        assert torch.equal(two.generate(prompt[:b], max_new_tokens=6), want)
        tok = want[:, -1].contiguous()
        pos = torch.full((b,), want.shape[1] - 1, dtype=torch.long, device="cuda")
        torch.testing.assert_close(two.step(tok, pos), one.step(tok, pos), rtol=0, atol=0)
