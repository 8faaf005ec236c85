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


@pytest.mark.gpu
def test_gpu_compiled_pieces_under_cudagraph_trees_equal_eager():
    """``mode="reduce-overhead"`` (the compiler's CUDA-graph trees) over several prefills of changing length: on the
    H200 without a step mark per prefill the trees failed ("accessing tensor output of CUDAGraphs that has been
    overwritten"). fp32 tiny model: the compiled glue may reorder fp32 sums, nothing more."""
    from gemma4lab.runtime.compiled_pieces import CompiledPieces

    model = gemma4lab.random_init("tiny", dtype=torch.float32, seed=5, device="cuda").set_fusion("all")
    runner = CompiledPieces(model, mode="reduce-overhead")
    for n in (20, 7, 33, 20, 20):
        prompts = [torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(n)).cuda()]
        want = model.prefill(prompts, all_logits=True)
        got = runner.prefill(prompts, all_logits=True).clone()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.gpu
def test_gpu_fullgraph_compile_at_full_width_is_as_accurate_as_eager():
    """Full width, one layer, bf16: the compiled fused model's logits are no further from the fp32 eager truth than
    eager bf16's own error allows (a bf16 rounding reordered by Inductor is fine; a wrong kernel call is not)."""
    cfg = gemma4lab.Gemma4Config.preset("26b-a4b").replace_text(num_hidden_layers=1)
    cfg = gemma4lab.Gemma4Config(text=cfg.text, vision=None)
    ids = torch.randint(3, cfg.text.vocab_size, (1, 93), generator=torch.Generator().manual_seed(1)).cuda()
    m32 = gemma4lab.random_init(cfg, dtype=torch.float32, seed=2, device="cuda").set_fusion("all")
    truth = m32(ids).logits.double()
    model = m32.to(torch.bfloat16)
    model.init_buffers()
    del m32
    eager = model(ids).logits.double()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)(ids).logits.double()

    def err(x):
        return float((x - truth).norm() / truth.norm())

    assert err(eager) < 0.15, "the bf16 eager model itself is off"
    assert err(compiled) <= 1.5 * err(eager), (err(compiled), err(eager))
