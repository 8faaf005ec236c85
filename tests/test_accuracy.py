"""The accuracy studies of ``bench-prefill --parts accuracy``, on the tiny config: they must pass on correct code and
flag a defect that a whole-model figure would hide."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import gemma4lab
from gemma4lab import kernels as K
from gemma4lab.lab import accuracy
from gemma4lab.lab.bench.common import hf_twin


@pytest.fixture(scope="module")
def text_cfg(tiny_config):
    return dataclasses.replace(tiny_config, vision=None)


def test_shallow_parity_ours_equals_transformers_in_fp32(text_cfg):
    res = accuracy.shallow_parity(text_cfg, "cpu", depths=(1, 2), tokens=24)
    for depth, r in res["depths"].items():
        # Against the float64 truth, ours carries fp32 rounding only, like the reference itself.
        assert r["ours_fused_fp32"] <= 3 * r["transformers_fp32"] + 1e-7, depth
        assert r["ours_unfused_fp32"] <= 3 * r["transformers_fp32"] + 1e-7, depth
        assert r["ours_fused_vs_transformers_fp32"] <= 1e-5, depth
        assert r["transformers_fp32"] <= 1e-5 and r["transformers_vs_itself_fp32"] <= 1e-5
        assert r["hf_experts_fp32"] == "grouped_mm"
        # bf16: no further from the truth than transformers' own bf16 run (rounding noise of a few per cent).
        assert r["ours_fused_bf16"] <= 1.5 * r["transformers_bf16"], depth


@pytest.fixture(scope="module")
def bf16_model(text_cfg):
    return gemma4lab.random_init(text_cfg, dtype=torch.bfloat16, seed=5)


def _per_layer(model):
    ids = torch.randint(3, 400, (40,), generator=torch.Generator().manual_seed(1))
    return accuracy.per_layer_errors(model, ids, hf=hf_twin(model))


def test_per_layer_errors_match_transformers_bf16(bf16_model):
    res = _per_layer(bf16_model)
    assert len(res["ours_fused"]) == len(res["transformers"]) == bf16_model.config.text.num_hidden_layers
    assert all(0 < e < 0.5 for e in res["ours_fused"] + res["transformers"])
    assert max(res["ours_fused_over_transformers"]) <= 1.5


def test_per_layer_errors_catch_a_two_percent_bug(bf16_model, monkeypatch):
    """The same study with one kernel scaled by 1.02 (a plausible defect) must stand out against transformers."""
    real = K.gemma_dual_rmsnorm_residual_scalar_next_norm

    def buggy(*args, **kwargs):
        out, nxt = real(*args, **kwargs)
        return out * 1.02, nxt

    monkeypatch.setattr(K, "gemma_dual_rmsnorm_residual_scalar_next_norm", buggy)
    res = _per_layer(bf16_model)
    assert max(res["ours_fused_over_transformers"]) > 1.5


def test_top1_agreement():
    t = torch.tensor([[0.0, 1.0], [2.0, 1.0]])
    assert accuracy.top1_agreement(t, t) == 1.0
    assert accuracy.top1_agreement(t.flip(-1), t) == 0.0


@pytest.mark.gpu
def test_gpu_full_width_one_layer_parity():
    """At full width and one layer, ours (fused Triton kernels, fp32) is as close to the float64 truth as
    transformers' own fp32 run, and the two agree to fp32 rounding."""
    cfg = gemma4lab.Gemma4Config.preset("26b-a4b")
    r = accuracy.shallow_parity(cfg, "cuda", depths=(1,), tokens=93)["depths"]["1"]
    assert r["ours_fused_fp32"] <= 3 * r["transformers_fp32"] + 1e-6
    assert r["ours_fused_vs_transformers_fp32"] <= 1e-5
    assert r["ours_fused_bf16"] <= 1.5 * r["transformers_bf16"]
    assert r["hf_experts_fp32"] == "grouped_mm"
