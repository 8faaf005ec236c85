"""``Fusion.dense``: at up to ``DENSE_MAX_ROWS`` rows (decode, short prompts) the decoder's dense projections run as
``dense_gemm`` launches — q/k/v in one, gate/up in one, o, down and the tied head one each — under the CPU
interpreter in fp32 here, against transformers and against the same model without the switch."""

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

pytestmark = pytest.mark.usefixtures("triton_path_only")

NO_DENSE = dataclasses.replace(Fusion.all(), dense=False)


@pytest.fixture(scope="module")
def ours(hf_tiny):
    _, path = hf_tiny
    return gemma4lab.load_pretrained(path)


def _prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_short_prompt_keeps_parity_and_launches_one_gemm_per_group(hf_tiny, ours, tiny_config):
    ref, _ = hf_tiny
    ids = _prompt(9, 1)[None]
    expected = ref(input_ids=ids).logits
    got = with_fusion(ours, Fusion.all(), lambda: ours(ids).logits)
    assert rel_err(got, expected) <= 1e-5
    text = tiny_config.text
    layers = text.num_hidden_layers

    def launches(fusion):
        prof = with_fusion(ours, fusion, lambda: profile_forward(lambda: ours(ids), warmup=0))
        return dict(prof["top_kernels"])

    dense, plain = launches(Fusion.all()), launches(NO_DENSE)
    # per layer: q/k(/v), o, gate/up, down; the head once (logits of every row: 9 rows)
    assert dense.get("gemma4lab::dense_gemm", 0) == 4 * layers + 1
    assert "gemma4lab::dense_gemm" not in plain
    # without the switch: q, k, v (no v on K-as-V layers), o, gate, up, down each a GEMM, plus the router and head
    assert library_gemms(plain) - library_gemms(dense) >= 5 * layers


@torch.no_grad()
def test_dense_switch_changes_rounding_only_on_both_sides_of_the_row_limit(ours):
    """At the limit the few-row kernel runs; above it one library GEMM per packed group (tests/test_packing.py)."""
    for n in (DENSE_MAX_ROWS, DENSE_MAX_ROWS + 1):
        ids = _prompt(n, n)[None]
        with_dense = with_fusion(ours, Fusion.all(), lambda ids=ids: ours(ids).logits)
        without = with_fusion(ours, NO_DENSE, lambda ids=ids: ours(ids).logits)
        assert rel_err(with_dense, without) <= 1e-5


@torch.no_grad()
def test_greedy_decode_through_the_dense_kernel_matches_transformers(hf_tiny, ours):
    """Every decode step is one row per sequence: the dense path runs all of them."""
    ref, _ = hf_tiny
    ids = torch.stack([_prompt(12, 3), _prompt(12, 4)])
    expected = ref.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=[1], pad_token_id=0)
    got = with_fusion(ours, Fusion.all(), lambda: ours.generate(ids, 5, eos_token_id=[1], pad_token_id=0))
    assert torch.equal(got, expected)


def test_project_falls_back_for_what_it_cannot_read():
    """Only plain bias-free ``nn.Linear`` weights of x's dtype go to the kernel; anything else (a subclass with its
    own forward, a bias, another dtype, too many rows) runs as itself, with the same result."""
    torch.manual_seed(0)

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    x = torch.randn(3, 32)
    plain, scaled = nn.Linear(32, 16, bias=False), Scaled(32, 8, bias=False)
    biased = nn.Linear(32, 8)
    for mods in ((plain, scaled), (plain, biased)):
        got = project(x, mods, True)
        for g, m in zip(got, mods):
            torch.testing.assert_close(g, m(x), rtol=0, atol=0)
    q, = project(x, (plain,), True)  # the kernel: fp32 rounding of the same product
    torch.testing.assert_close(q, plain(x), rtol=1e-5, atol=1e-5)
    ran = lambda mods, rows=3: dict(profile_forward(  # noqa: E731
        lambda: project(torch.randn(rows, 32), mods, True), warmup=0)["top_kernels"]).get("gemma4lab::dense_gemm", 0)
    assert ran((plain,)) == 1 and ran((plain, scaled)) == 0 and ran((plain,), DENSE_MAX_ROWS + 1) == 0
    seen = []  # a hook on the module: it must run, so the module is called
    handle = plain.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        assert ran((plain,)) == 0 and seen == [(3, 16)]
    finally:
        handle.remove()
