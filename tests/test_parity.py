"""Our model against Hugging Face transformers' Gemma4ForConditionalGeneration on the same random weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import rel_err

import gemma4lab
import gemma4lab.attention
import gemma4lab.kernels
from gemma4lab import Fusion


@pytest.fixture(scope="module")
def ours(hf_tiny):
    _, path = hf_tiny
    return gemma4lab.load_pretrained(path)


def _prompt(n: int, seed: int, vocab_hi: int = 400) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_hi, (n,), generator=g)


def test_text_logits_match_reference_fp32(hf_tiny, ours, tiny_config):
    ref, _ = hf_tiny
    # 40 tokens > sliding window 16: the window and both layer types matter.
    assert tiny_config.text.sliding_window < 40
    ids = torch.stack([_prompt(40, 1), _prompt(40, 2)])
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    got = ours(ids).logits
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= 1e-5


def test_packed_prompts_of_different_lengths_match_one_by_one(hf_tiny, ours):
    ref, _ = hf_tiny
    prompts = [_prompt(n, 10 + n) for n in (1, 7, 33, 20)]
    logits = ours.prefill(prompts, all_logits=True)
    start = 0
    for p in prompts:
        with torch.no_grad():
            expected = ref(input_ids=p[None]).logits[0]
        assert rel_err(logits[start:start + len(p)], expected) <= 1e-5
        start += len(p)


def test_greedy_generation_identical_tokens(hf_tiny, ours):
    ref, _ = hf_tiny
    ids = torch.stack([_prompt(24, 3), _prompt(24, 4)])
    expected = ref.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=[1], pad_token_id=0)
    got = ours.generate(ids, 20, eos_token_id=[1], pad_token_id=0)
    assert torch.equal(got, expected)


def test_generation_of_packed_prompts_matches_one_by_one(ours):
    prompts = [_prompt(n, 30 + n) for n in (5, 19)]
    together = ours.generate(prompts, 17, eos_token_id=[], pad_token_id=0)
    for p, t in zip(prompts, together):
        alone = ours.generate(p[None], 17, eos_token_id=[], pad_token_id=0)[0]
        assert torch.equal(t, alone)


def test_bf16_within_documented_tolerance(hf_tiny, tiny_config):
    """bf16 is judged against the fp32 truth, next to the reference's own bf16 run.

    On random weights a tiny MoE is chaotic in bf16 (one rounding can flip a top-k choice), so a fixed bound on
    full-model logits would test the weights, not the code. The documented criterion: our bf16 logits are no
    further from the fp32 reference than transformers' bf16 logits are, within 1.5x, and the first token's logits
    (no attention mixing, so no flip cascade) agree with transformers' bf16 to 1e-2.
    """
    ref, path = hf_tiny
    ours16 = gemma4lab.load_pretrained(path, dtype=torch.bfloat16)
    ref16 = copy.deepcopy(ref).to(torch.bfloat16)
    ids = _prompt(40, 5)[None]
    with torch.no_grad():
        truth = ref(input_ids=ids).logits
        theirs = ref16(input_ids=ids).logits.float()
    ours = ours16(ids).logits.float()
    assert rel_err(ours, truth) <= 1.5 * rel_err(theirs, truth)
    # The first token sees no other token and routes identically: there bf16 must agree to rounding.
    assert rel_err(ours[0, 0], theirs[0, 0]) <= 1e-2


@pytest.mark.parametrize("fusion", [Fusion.all(), Fusion.published(), Fusion(qkv_norm_rope=True, router=True),
                                    Fusion(post_attention=True, gelu=True, experts=True)],
                         ids=["all", "published", "qkv+router", "post_attention+gelu+experts"])
def test_fused_model_keeps_parity(hf_tiny, ours, fusion):
    """Fusions on (the Triton kernels themselves, under the CPU interpreter): rounding-level change only."""
    ref, _ = hf_tiny
    ids = _prompt(37, 6)[None]
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    try:
        ours.set_fusion(fusion)
        got = ours(ids).logits
    finally:
        ours.set_fusion(Fusion.none())
    assert rel_err(got, expected) <= 1e-5


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    from PIL import Image

    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _image_prompt(proc, n_images: int, seed: int):
    cfg = proc.config if hasattr(proc, "config") else None
    img = cfg.image_token_id
    text = _prompt(6, seed).tolist()
    ids = [2] + text[:3]
    for _ in range(n_images):
        ids += [img] + text[3:]
    return ids + [7, 8]


def test_image_prompt_matches_reference(hf_tiny, ours, tiny_config):
    """Several images of different aspect ratios in one prompt; bidirectional attention inside each image."""
    ref, _ = hf_tiny
    proc = gemma4lab.Gemma4Processor(tiny_config)
    images = _images([(96, 144), (150, 90), (120, 120)])
    ids = _image_prompt(proc, len(images), 7)
    batch = proc(input_ids=ids, images=images)
    assert batch["input_ids"].shape[1] > tiny_config.text.sliding_window
    with torch.no_grad():
        expected = ref(**batch).logits
    got = ours(**batch).logits
    assert rel_err(got, expected) <= 1e-5


def test_image_generation_identical_tokens(hf_tiny, ours, tiny_config):
    ref, _ = hf_tiny
    proc = gemma4lab.Gemma4Processor(tiny_config)
    batch = proc(input_ids=_image_prompt(proc, 1, 8), images=_images([(100, 160)], seed=3))
    expected = ref.generate(**batch, max_new_tokens=16, do_sample=False, eos_token_id=[1], pad_token_id=0)
    got = ours.generate(**batch, max_new_tokens=16, eos_token_id=[1], pad_token_id=0)
    assert torch.equal(got, expected)


def test_causal_sdpa_mode_equals_masked_reference(ours):
    """The GPU fast path (``causal`` SDPA, no mask tensor) is exact for text prompts within the window."""
    lm = ours.language_model
    prompts = [_prompt(n, 40 + n) for n in (3, 16, 11)]  # all <= window 16
    batch = gemma4lab.attention.PackedBatch.from_lengths([len(p) for p in prompts])
    embeds = lm.embed(torch.cat(prompts))
    ref = lm.forward_embeds(embeds, lm.make_context(batch))
    ctx = lm.make_context(batch, backend="causal")
    assert {b.name for b, _ in ctx.plans.values()} == {"causal"}
    assert rel_err(lm.forward_embeds(embeds, ctx), ref) <= 1e-6


@pytest.mark.skipif(not gemma4lab.kernels.INTERPRET, reason="runs the Triton attention kernels under the interpreter")
def test_triton_attention_backend_keeps_parity(hf_tiny, ours, tiny_config):
    """The GPU default (our prefill and decode kernels), here under Triton's interpreter: images (bidirectional
    blocks past the window), packed prompts and greedy decoding against transformers."""
    ref, _ = hf_tiny
    proc = gemma4lab.Gemma4Processor(tiny_config)
    images = _images([(96, 144), (150, 90)])
    batch = proc(input_ids=_image_prompt(proc, len(images), 9), images=images)
    with torch.no_grad():
        expected = ref(**batch).logits
    prompts = [_prompt(n, 60 + n) for n in (5, 33, 17)]
    try:
        ours.set_attention_backend("triton")
        got = ours(**batch).logits
        packed = ours.prefill(prompts)
        tokens = ours.generate(batch["input_ids"], 10, eos_token_id=[1], pad_token_id=0,
                               pixel_values=batch["pixel_values"], image_position_ids=batch["image_position_ids"],
                               mm_token_type_ids=batch["mm_token_type_ids"])
    finally:
        ours.set_attention_backend("auto")
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(packed, ours.prefill(prompts)) <= 1e-5
    ref_tokens = ref.generate(**batch, max_new_tokens=10, do_sample=False, eos_token_id=[1], pad_token_id=0)
    assert torch.equal(tokens, ref_tokens)
