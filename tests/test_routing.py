"""The routing-skew knob: off by default (the reference router), skewed on request, the same function in the
transformers twin, and statistics that tell uniform from skewed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import rel_err

import gemma4lab
from gemma4lab.lab import routing
from gemma4lab.lab.bench.common import hf_twin


@pytest.fixture()
def model(tiny_config):
    cfg = dataclasses.replace(tiny_config, vision=None)
    return gemma4lab.random_init(cfg, dtype=torch.float32, seed=2)


def _prompts(n=96):
    return [torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(n))]


def test_skew_concentrates_the_load_and_zero_restores_the_reference(model):
    prompts = _prompts()
    before = model.prefill(prompts)
    uniform = routing.routing_stats(model, prompts)
    recipe = routing.skew_routing(model, 1.5, prompts)
    skewed = routing.routing_stats(model, prompts)
    assert recipe["exponent"] == 1.5 and recipe["logit_std_mean"] > 0
    assert skewed["max_over_mean_load"] > uniform["max_over_mean_load"] * 1.2
    assert skewed["top8_share"] >= uniform["top8_share"]
    routing.skew_routing(model, 0.0, [])
    assert torch.equal(model.prefill(prompts), before)


def test_transformers_twin_carries_the_bias(model):
    prompts = _prompts(40)
    routing.skew_routing(model, 1.0, prompts)
    hf = hf_twin(model)
    with torch.no_grad():
        theirs = hf(input_ids=prompts[0][None], use_cache=False).logits[0]
    assert rel_err(model.prefill(prompts, all_logits=True), theirs) <= 1e-5


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True, "1"])
def test_skew_rejects_bad_exponents(model, bad):
    with pytest.raises(ValueError, match="exponent"):
        routing.skew_routing(model, bad, _prompts(8))
