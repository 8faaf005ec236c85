"""Chunked prefill: a prompt run as chunks over the KV cache equals the unchunked prefill within fp32 rounding
(logits of every position and the cache it leaves), the piecewise-graph runner's chunks equal the eager chunks bit
for bit, and decoding continues from the chunked cache with the same greedy tokens."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from conftest import rel_err

import gemma4lab
from gemma4lab import Fusion
from gemma4lab.attention import PackedBatch, Visibility
from gemma4lab.runtime.chunked import ImageSplitError, chunk_bounds
from gemma4lab.runtime.decode_graphs import DecodeGraphRunner
from gemma4lab.runtime.kv_cache import KVCache
from gemma4lab.runtime.pcg import PiecewiseCudaGraphRunner

WINDOW = 16  # the tiny config's sliding window
PADDING_BOUND = 1e-5  # as in test_pcg: padding rows change matmul shapes, hence rounding only


def _prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model(hf_tiny):
    return gemma4lab.load_pretrained(hf_tiny[1])


@pytest.fixture(scope="module")
def model64(hf_tiny):
    return gemma4lab.load_pretrained(hf_tiny[1], dtype=torch.float64)


def _prefill(model, prompt, **kw) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of every position and the cache contents (K/V of every layer, the ring's slot map)."""
    cache = KVCache(model.language_model.config, 1, prompt.numel(), model.dtype, model.device)
    logits = model.prefill([prompt], all_logits=True, cache=cache, **kw)
    return logits, cache.k + cache.v + [cache.slot_pos]


def _assert_within_fp32_rounding(chunked, unchunked, truth) -> None:
    """Elementwise: the fp32 unchunked forward is off the float64 truth by its own rounding, ``err`` at most (per
    tensor, at least one fp32 ulp of its largest value); the chunked one rounds differently (other key tiles, other
    row counts) but as much, so the two runs lie within ``2 · err`` of each other."""
    assert chunked.shape == unchunked.shape == truth.shape
    if not truth.is_floating_point():  # the ring's slot map: positions, exact
        assert torch.equal(chunked, unchunked)
        return
    err = max(float((unchunked.double() - truth).abs().max()), 2.0**-24 * float(truth.abs().max()))
    torch.testing.assert_close(chunked.double(), unchunked.double(), rtol=0, atol=2 * err)


@pytest.mark.parametrize("chunk", [5, 15, WINDOW, WINDOW + 1])
@pytest.mark.parametrize("n", ["1", "chunk+1", "several"])
def test_chunked_equals_unchunked_within_fp32_rounding(model, model64, chunk, n):
    """Chunks inside the window (5), just short of it, exactly at it and just past it; prompts of 1 token (one
    chunk), of chunk + 1 (a chunk of one after a full one) and of 50 tokens (several, the window reaching back
    over chunk boundaries)."""
    length = {"1": 1, "chunk+1": chunk + 1, "several": 50}[n]
    prompt = _prompt(length, seed=chunk)
    truth, truth_cache = _prefill(model64, prompt)
    unchunked, cache = _prefill(model, prompt)
    chunked, chunked_cache = _prefill(model, prompt, chunk_tokens=chunk)
    _assert_within_fp32_rounding(chunked, unchunked, truth)
    for got, want, exact in zip(chunked_cache, cache, truth_cache):
        _assert_within_fp32_rounding(got, want, exact)
    if length <= chunk:  # one chunk is the unchunked forward itself
        assert torch.equal(chunked, unchunked)


def test_a_chunk_without_its_cached_keys_is_caught(model, model64):
    """The comparison above can fail: a second chunk that finds an empty cache instead of the first chunk's keys
    is far outside fp32 rounding."""
    prompt = _prompt(40, seed=3)
    truth, _ = _prefill(model64, prompt)
    unchunked, _ = _prefill(model, prompt)
    lm, whole = model.language_model, PackedBatch.from_lengths([40])
    cache = KVCache(lm.config, 1, 40, model.dtype, model.device)
    first = lm.forward_embeds(lm.embed(prompt[:20]), lm.make_context(whole.chunk(0, 20), cache=cache))
    cache = KVCache(lm.config, 1, 40, model.dtype, model.device)  # the first chunk's keys are lost
    second = lm.forward_embeds(lm.embed(prompt[20:]), lm.make_context(whole.chunk(20, 40), cache=cache))
    broken = lm.logits(torch.cat([first, second]))
    with pytest.raises(AssertionError):
        _assert_within_fp32_rounding(broken, unchunked, truth)


@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_other_backends_chunk_like_the_reference(model, backend):
    """Our Triton kernel (interpreter) and FlexAttention (compiled on the CPU) serve chunks too: the same logits as
    the SDPA reference's chunked prefill, within fp32 rounding of one attention."""
    prompt = _prompt(40, seed=4)
    ref, ref_cache = _prefill(model, prompt, chunk_tokens=WINDOW - 3)
    try:
        model.set_attention_backend(backend)
        got, cache = _prefill(model, prompt, chunk_tokens=WINDOW - 3)
    finally:
        model.set_attention_backend("auto")
    assert rel_err(got, ref) <= PADDING_BOUND
    assert all(rel_err(a.double(), b.double()) <= PADDING_BOUND for a, b in zip(cache, ref_cache))


def test_image_prompt_chunks_never_split_an_image(model, tiny_config):
    from PIL import Image

    proc = gemma4lab.Gemma4Processor(tiny_config)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 144, 3), dtype=np.uint8))
    batch = proc(input_ids=[2, 9, tiny_config.image_token_id, 7, 8, 11, 12], images=[img])
    ids, types = batch["input_ids"][0], batch["mm_token_type_ids"]
    image = (types[0] == 1).nonzero()[:, 0]
    n_img, first = image.numel(), int(image[0])
    assert n_img > 2 * WINDOW  # so the window edge falls inside the image
    args = ([ids], batch["pixel_values"], batch["image_position_ids"], list(types))
    whole = model.prefill(*args, all_logits=True)
    chunk = n_img + 1  # the first boundary would cut the image: it moves back to the image's start
    bounds = chunk_bounds(ids.numel(), chunk, model.pack_prompts([ids], list(types))[1].block_ids)
    assert bounds[0] == (0, first) and bounds[1][1] - bounds[1][0] <= chunk
    got = model.prefill(*args, all_logits=True, chunk_tokens=chunk)
    assert rel_err(got, whole) <= PADDING_BOUND
    with pytest.raises(ImageSplitError, match=f"image of {n_img} soft tokens does not fit a chunk of {n_img - 1}"):
        model.prefill(*args, chunk_tokens=n_img - 1)


# ---- the piecewise-graph runner ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", [Fusion.none(), Fusion.all()], ids=["unfused", "fused"])
def test_pcg_chunks_equal_eager_chunks_bit_for_bit(model, fusion):
    """Above the largest bucket (16) the runner replays the bucket pieces per chunk. Where every chunk fills a
    bucket (16 + 16, 16 + 16 + 8) the work is the eager chunked prefill's exactly: equal logits and caches. A padded
    last chunk (16 + 1, 16 + 16 + 3) changes matmul shapes on the CPU, hence rounding only."""
    model.set_fusion(fusion)
    try:
        runner = PiecewiseCudaGraphRunner(model, buckets=[8, 16], progress=False)
        for n in (32, 40, 17, 35) if fusion == Fusion.none() else (40,):  # the fused kernels are slow interpreted
            prompt = _prompt(n, seed=n)
            eager, eager_cache = _prefill(model, prompt, chunk_tokens=16)
            cache = KVCache(model.language_model.config, 1, n, model.dtype, model.device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = runner.prefill([prompt], all_logits=True, cache=cache)
            got_cache = cache.k + cache.v + [cache.slot_pos]
            if n % 8 == 0:
                assert torch.equal(got, eager), n
                assert all(torch.equal(a, b) for a, b in zip(got_cache, eager_cache)), n
            else:
                assert rel_err(got, eager) <= PADDING_BOUND, n
                assert all(rel_err(a.double(), b.double()) <= PADDING_BOUND for a, b in zip(got_cache, eager_cache))
            last = runner.prefill([prompt])  # the last token's logits only (a one-row head), a temporary cache
            torch.testing.assert_close(last, got[-1:])
        chunks = [(n + 15) // 16 for n in ((32, 40, 17, 35) if fusion == Fusion.none() else (40,))]
        assert runner.stats["chunked_prefills"] == 2 * len(chunks) and runner.stats["eager_fallbacks"] == 0
        assert runner.stats["replays"] == 2 * sum(chunks)
    finally:
        model.set_fusion(Fusion.none())


def test_pcg_announces_chunking_once_and_falls_back_only_for_what_it_cannot_chunk(model):
    runner = PiecewiseCudaGraphRunner(model, buckets=[8, 16], progress=False)
    prompt = _prompt(20)
    with pytest.warns(UserWarning, match="ran as chunks of up to 16 tokens through the graphs") as caught:
        runner.prefill([prompt])
    assert caught[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner.prefill([prompt])  # second time: silent, but counted
    assert runner.stats["chunked_prefills"] == 2
    two = [_prompt(12, 1), _prompt(9, 2)]  # 21 tokens in two prompts: chunking takes one prompt
    with pytest.warns(UserWarning, match="chunked prefill takes one prompt at a time; running the eager path"):
        got = runner.prefill(two)
    assert runner.stats["eager_fallbacks"] == 1 and torch.equal(got, model.prefill(two))


def test_pcg_image_prompt_chunks_and_an_image_longer_than_a_chunk_runs_eager(model, tiny_config):
    from PIL import Image

    proc = gemma4lab.Gemma4Processor(tiny_config)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 144, 3), dtype=np.uint8))
    batch = proc(input_ids=[2, 9, tiny_config.image_token_id, 7, 8, 11, 12], images=[img])
    n_img = int((batch["mm_token_type_ids"] == 1).sum())
    args = (list(batch["input_ids"]), batch["pixel_values"], batch["image_position_ids"],
            list(batch["mm_token_type_ids"]))
    max_tokens = batch["input_ids"].shape[1] - 3  # two chunks, the image inside the first
    assert max_tokens > n_img
    runner = PiecewiseCudaGraphRunner(model, buckets=[max_tokens // 2, max_tokens], progress=False)
    with pytest.warns(UserWarning, match="ran as chunks"):
        got = runner.prefill(*args, all_logits=True)
    assert rel_err(got, model.prefill(*args, all_logits=True, chunk_tokens=max_tokens)) <= PADDING_BOUND
    small = PiecewiseCudaGraphRunner(model, buckets=[n_img - 1], progress=False)
    with pytest.warns(UserWarning, match="does not fit a chunk.*running the eager path"):
        got = small.prefill(*args)
    assert small.stats["eager_fallbacks"] == 1 and torch.equal(got, model.prefill(*args))


# ---- decode continues from the chunked cache ---------------------------------------------------------------------
def test_generation_after_a_chunked_prefill_gives_the_same_tokens(model):
    """Greedy decoding (20 new tokens) after a chunked prefill of 45 tokens (chunks of 7, and the runner's of 16)
    picks the tokens it picks after the unchunked prefill: the cache the chunks leave is the one decode needs."""
    ids = _prompt(45, seed=9)[None]
    expected = model.generate(ids, 20, eos_token_id=[], pad_token_id=0)
    chunked = model.generate(ids, 20, eos_token_id=[], pad_token_id=0,
                             prefill_fn=functools.partial(model.prefill, chunk_tokens=7))
    assert torch.equal(chunked, expected)
    runner = PiecewiseCudaGraphRunner(model, buckets=[8, 16], progress=False)
    dec = DecodeGraphRunner(model, max_batch=2, max_len=80, progress=False)
    with pytest.warns(UserWarning, match="ran as chunks"):
        got = dec.generate(ids, 20, prefill_runner=runner, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, expected)


# ---- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "16"])
def test_bad_chunk_size_is_a_clear_error(model, bad):
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
        model.prefill([_prompt(10)], chunk_tokens=bad)


def test_unsupported_chunked_inputs_are_clear_errors(model):
    with pytest.raises(ValueError, match="chunked prefill takes one prompt, got 2"):
        model.prefill([_prompt(10), _prompt(5)], chunk_tokens=4)
    small = KVCache(model.language_model.config, 1, 8, model.dtype, model.device)
    with pytest.raises(ValueError, match="reaches 10 tokens but the KV cache holds 8"):
        model.prefill([_prompt(10)], chunk_tokens=4, cache=small)
    lm = model.language_model
    with pytest.raises(ValueError, match="pass the cache they filled"):
        lm.make_context(PackedBatch.from_lengths([4], cached=[8]))
    with pytest.raises(ValueError, match="only a whole single prompt splits into chunks"):
        PackedBatch.from_lengths([4, 4]).chunk(0, 2)
    with pytest.raises(ValueError, match="not inside the prompt"):
        PackedBatch.from_lengths([4]).chunk(2, 6)


def test_rule_key_start():
    """How far back a chunk's keys reach: all the way on full layers, ``window - 1`` on sliding ones."""
    assert [Visibility().key_start(s) for s in (0, 5, 100)] == [0, 0, 0]
    assert [Visibility(window=16).key_start(s) for s in (0, 15, 16, 17, 100)] == [0, 0, 1, 2, 85]
    assert Visibility(window=16).prefix_lens([0, 15, 16, 100]) == [0, 15, 15, 15]


# ---- on a GPU: real graphs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cuda_model(hf_tiny):
    return gemma4lab.load_pretrained(hf_tiny[1], dtype=torch.bfloat16, device="cuda").set_fusion("all")


@pytest.mark.gpu
def test_gpu_pcg_chunks_equal_eager_chunks_bit_for_bit(cuda_model, hf_tiny):
    """max_tokens=64 with prompts of 65, 130 and 200 tokens: the captured pieces replayed per chunk give the eager
    chunked prefill's logits and cache bit for bit, and then the same greedy tokens through the decode graphs. The
    chunked bf16 logits are as close to the fp32 model's as the unchunked ones (within a factor of 2, norm-wise)."""
    fp32 = gemma4lab.load_pretrained(hf_tiny[1], dtype=torch.float32, device="cuda").set_fusion("all")
    runner = PiecewiseCudaGraphRunner(cuda_model, max_tokens=64, progress=False)
    assert runner.capture().graphs
    for n in (65, 130, 200):
        prompt = _prompt(n, seed=n).cuda()
        eager, eager_cache = _prefill(cuda_model, prompt, chunk_tokens=64)
        cache = KVCache(cuda_model.language_model.config, 1, n, cuda_model.dtype, "cuda")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = runner.prefill([prompt], all_logits=True, cache=cache)
        assert torch.equal(got, eager), n
        assert all(torch.equal(a, b) for a, b in zip(cache.k + cache.v + [cache.slot_pos], eager_cache)), n
        truth = fp32.prefill([prompt], all_logits=True)
        unchunked = cuda_model.prefill([prompt], all_logits=True)
        assert rel_err(got, truth) <= 2 * rel_err(unchunked, truth), n
    assert runner.stats["chunked_prefills"] == 3 and runner.stats["eager_fallbacks"] == 0
    ids = _prompt(130, seed=7)[None].cuda()
    expected = cuda_model.generate(ids, 16, eos_token_id=[], pad_token_id=0,
                                   prefill_fn=functools.partial(cuda_model.prefill, chunk_tokens=64))
    dec = DecodeGraphRunner(cuda_model, max_batch=1, max_len=160, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = dec.generate(ids, 16, prefill_runner=runner, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, expected)


@pytest.mark.gpu
def test_gpu_fp32_chunked_generation_equals_unchunked(hf_tiny):
    """On the GPU (Triton prefill and decode kernels, fp32): greedy tokens after a chunked prefill equal those
    after the unchunked one."""
    model = gemma4lab.load_pretrained(hf_tiny[1], dtype=torch.float32, device="cuda")
    ids = _prompt(100, seed=8)[None].cuda()
    expected = model.generate(ids, 16, eos_token_id=[], pad_token_id=0)
    got = model.generate(ids, 16, eos_token_id=[], pad_token_id=0,
                         prefill_fn=functools.partial(model.prefill, chunk_tokens=24))
    assert torch.equal(got, expected)
