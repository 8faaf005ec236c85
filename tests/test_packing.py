"""Packed projections (``gemma4lab.model.packing``): q/k/v and gate/up stored back to back in one buffer, so that
``Fusion.dense`` runs each group as one GEMM above ``DENSE_MAX_ROWS`` rows — in the decoder and the vision tower —
while checkpoints, ``state_dict`` and every caller still see separate weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import library_gemms, rel_err, with_fusion
from torch import nn

import gemma4lab
from gemma4lab import Fusion
from gemma4lab.kernels import DENSE_MAX_ROWS
from gemma4lab.lab.profiling import profile_forward
from gemma4lab.model.layers import project
from gemma4lab.model.packing import pack_linears, packed_weight

NO_DENSE = dataclasses.replace(Fusion.all(), dense=False)


def _groups(model) -> list[list[nn.Linear]]:
    return [g for m in model.modules() if hasattr(m, "packed_groups") for g in m.packed_groups()]


def _is_packed(group: list[nn.Linear]) -> bool:
    with torch.no_grad():
        return packed_weight([m.weight for m in group]) is not None


def test_pack_linears_keeps_values_and_hands_out_the_stacked_block():
    torch.manual_seed(0)
    mods = [nn.Linear(24, n, bias=False) for n in (16, 8, 8)]
    before = [m.weight.detach().clone() for m in mods]
    assert packed_weight([m.weight for m in mods]) is None  # separate allocations
    assert pack_linears(mods)
    for m, w in zip(mods, before):
        assert torch.equal(m.weight, w) and isinstance(m.weight, nn.Parameter) and m.weight.requires_grad
    with torch.no_grad():
        block = packed_weight([m.weight for m in mods])
        assert block is not None and torch.equal(block, torch.cat(before))
        mods[1].weight.add_(1.0)  # the block is the weights' storage, not a copy
        assert torch.equal(packed_weight([m.weight for m in mods])[16:24], before[1] + 1.0)
        # out of order, or a gap: not one block
        assert packed_weight([mods[1].weight, mods[0].weight]) is None
        assert packed_weight([mods[0].weight, mods[2].weight]) is None
    # with gradients wanted, no view through the first weight's storage (autograd would credit it with every block)
    assert packed_weight([m.weight for m in mods]) is None


def test_pack_linears_leaves_what_cannot_share_a_buffer():
    a, b = nn.Linear(8, 4, bias=False), nn.Linear(8, 4)
    assert not pack_linears([a, b])
    c = nn.Linear(6, 4, bias=False)
    assert not pack_linears([a, c])
    d = nn.Linear(8, 4, bias=False).double()
    assert not pack_linears([a, d])
    assert not pack_linears([a])


def test_models_are_packed_after_build_and_every_conversion(tiny_config):
    model = gemma4lab.random_init(tiny_config, dtype=torch.float32)
    groups = _groups(model)
    text_layers, vision_layers = tiny_config.text.num_hidden_layers, tiny_config.vision.num_hidden_layers
    assert len(groups) == 2 * (text_layers + vision_layers)  # q/k(/v) and gate/up per layer, text and vision
    assert all(_is_packed(g) for g in groups)
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.to(torch.float64)  # a conversion allocates every parameter anew: packed again, values kept
    assert all(_is_packed(g) for g in _groups(model))
    for n, p in model.named_parameters():
        assert p.dtype == torch.float64 and torch.equal(p.float(), values[n]), n


def test_save_and_load_a_packed_model(tiny_config, tmp_path):
    """safetensors refuses tensors that share a buffer: the save writes each packed weight as its own tensor."""
    model = gemma4lab.random_init(tiny_config, dtype=torch.float32, seed=3)
    gemma4lab.save_pretrained(model, tmp_path / "ckpt")
    back = gemma4lab.load_pretrained(tmp_path / "ckpt")
    assert all(_is_packed(g) for g in _groups(back))
    for (n, p), (_, q) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(p, q), n


@pytest.mark.usefixtures("triton_path_only")
@torch.no_grad()
def test_prompt_above_the_few_row_limit_runs_one_gemm_per_group(tiny_config):
    """Above ``DENSE_MAX_ROWS`` rows ``Fusion.dense`` takes one library GEMM per packed group: q/k(/v) and gate/up
    of every layer, so two GEMMs fewer per layer with v, one without; the logits within fp32 rounding of one GEMM
    per projection, both within the rounding of a float64 truth."""
    model = gemma4lab.random_init(dataclasses.replace(tiny_config, vision=None), dtype=torch.float32, seed=5)
    ids = torch.randint(3, 400, (1, DENSE_MAX_ROWS + 7), generator=torch.Generator().manual_seed(7))

    def run(fusion):
        return with_fusion(model, fusion, lambda: model(ids).logits.double())

    model.to(torch.float64)
    truth = run(Fusion.none())
    model.to(torch.float32)
    packed, separate = run(Fusion.all()), run(NO_DENSE)
    err_separate = rel_err(separate, truth)
    assert 0 < err_separate <= 1e-5
    assert rel_err(packed, truth) <= 2 * err_separate + 1e-7
    assert rel_err(packed, separate) <= 1e-5

    def gemms(fusion):
        return library_gemms(dict(with_fusion(model, fusion, lambda: profile_forward(lambda: model(ids), warmup=0))
                                  ["top_kernels"]))

    text = model.config.text
    with_v = sum(not text.layer_k_eq_v(i) for i in range(text.num_hidden_layers))
    fewer = gemms(NO_DENSE) - gemms(Fusion.all())
    assert fewer == 2 * text.num_hidden_layers + with_v  # per layer: q/k(/v) one GEMM fewer or two, gate/up one


@torch.no_grad()
def test_project_on_packed_weights_equals_one_gemm_each():
    torch.manual_seed(1)
    mods = [nn.Linear(32, n, bias=False).double() for n in (16, 8)]
    assert pack_linears(mods)
    x = torch.randn(DENSE_MAX_ROWS + 3, 32, dtype=torch.float64)
    got = project(x, tuple(mods), True)
    for g, m in zip(got, mods):
        torch.testing.assert_close(g, x @ m.weight.T, rtol=1e-12, atol=1e-12)
        assert g.shape == (x.shape[0], m.out_features)
    x3 = x.view(1, -1, 32)  # the vision tower's [N, P, D] rows
    for g, m in zip(project(x3, tuple(mods), True), mods):
        torch.testing.assert_close(g, x3 @ m.weight.T, rtol=1e-12, atol=1e-12)
    mods[1].weight = nn.Parameter(mods[1].weight.detach().clone())  # replaced by a user: one GEMM each, same values
    for g, m in zip(project(x, tuple(mods), True), mods):
        torch.testing.assert_close(g, x @ m.weight.T, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
def test_gpu_graphs_captured_in_grad_mode_run_the_packed_program(tiny_config, monkeypatch):
    """A capture called in grad mode (as a user calls ``runner.capture()``) records the program a replay is meant
    to hold: the packed GEMMs, under no_grad, as eager prefill runs them; logits bit-identical to eager's."""
    import gemma4lab.model.layers as layers
    from gemma4lab.runtime.pcg import PiecewiseCudaGraphRunner

    model = gemma4lab.random_init(dataclasses.replace(tiny_config, vision=None), dtype=torch.bfloat16,
                                  device="cuda", seed=2).set_fusion("all")
    seen = []
    real = layers.packed_weight

    def spy(weights):
        out = real(weights)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(layers, "packed_weight", spy)
    runner = PiecewiseCudaGraphRunner(model, buckets=[32, 64], progress=False)
    assert torch.is_grad_enabled()
    runner.capture()
    groups = len(_groups(model))  # asked only for groups of two or more projections
    assert len(seen) >= groups and all(seen)  # every group of every captured piece took one GEMM
    prompt = [torch.randint(3, 400, (40,), device="cuda", generator=torch.Generator("cuda").manual_seed(4))]
    assert torch.equal(runner.prefill(prompt), model.prefill(prompt))
