"""``torch.compile(model, fullgraph=True)`` of the *fused* model: the kernels are registered ops, so the whole forward
traces with no graph break, one graph serves several prompt lengths, and the result is eager's within fp32
rounding (CPU, tiny config; the full-size GPU figures are the compile_fused column of results/prefill_<card>.json)."""

from __future__ import annotations

import pytest
import torch

import gemma4lab
import gemma4lab.kernels


@pytest.mark.skipif(not gemma4lab.kernels.INTERPRET, reason="the fused kernels run under the Triton interpreter here")
def test_fullgraph_compile_of_the_fused_model_equals_eager():
    import torch._dynamo.utils as dynamo_utils

    model = gemma4lab.random_init("tiny", dtype=torch.float32, seed=4).set_fusion("all")
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    for n in (20, 7, 33):
        ids = torch.randint(3, 400, (1, n), generator=torch.Generator().manual_seed(n))
        want = model(ids).logits
        got = compiled(ids).logits
        # Inductor fuses and reorders the fp32 glue between the kernels: rounding-level differences, grown through
        # six layers, of the order of the model's fp32 parity bound with transformers (1e-5 relative)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=3e-5 * float(want.abs().max()))
    assert dynamo_utils.counters["stats"]["unique_graphs"] - before == 1


@pytest.mark.skipif(not gemma4lab.kernels.INTERPRET, reason="the fused kernels run under the Triton interpreter here")
def test_compiled_pieces_equal_eager_and_follow_settings():
    """The compiler's piecewise layout (pieces compiled, attention between them) gives eager's logits for packed
    prompts of several lengths, and recompiles when the fusion setting changes."""
    import torch._dynamo.utils as dynamo_utils

    from gemma4lab.runtime.compiled_pieces import CompiledPieces

    model = gemma4lab.random_init("tiny", dtype=torch.float32, seed=5).set_fusion("all")
    runner = CompiledPieces(model)
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    for lens in ((20,), (7, 13)):
        prompts = [torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(n)) for n in lens]
        want = model.prefill(prompts, all_logits=True)
        torch.testing.assert_close(runner.prefill(prompts, all_logits=True), want, rtol=1e-5,
                                   atol=3e-5 * float(want.abs().max()))
    assert dynamo_utils.counters["stats"]["unique_graphs"] - before == len(model.language_model.layers) + 1
    model.set_fusion("none")
    prompts = [torch.randint(3, 400, (11,), generator=torch.Generator().manual_seed(3))]
    want = model.prefill(prompts)
    torch.testing.assert_close(runner.prefill(prompts), want, rtol=1e-5, atol=3e-5 * float(want.abs().max()))
