"""The piecewise CUDA-graph runner: the same split and padding logic on CPU, graphs and bit-identity on a GPU."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import rel_err

import gemma4lab
from gemma4lab import Fusion
from gemma4lab.runtime.decode_graphs import DecodeGraphRunner
from gemma4lab.runtime.pcg import PiecewiseCudaGraphRunner, default_buckets, validate_buckets

# Padding rows can change the *shapes* of a forward's matmuls (more rows, and more rows per expert group),
# and a BLAS may pick a different blocking, so fp32 results may differ by rounding — never by data.
PADDING_BOUND = 1e-5  # the same bound as parity with the reference


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 400, (n,), generator=g) for n in lengths]


@pytest.fixture(scope="module")
def model(hf_tiny):
    return gemma4lab.load_pretrained(hf_tiny[1])


def test_default_buckets_shape():
    b = default_buckets(8192)
    assert b[:3] == [4, 8, 12] and b[-1] == 8192 and b == sorted(set(b))
    assert 1024 in b and 4096 in b and 4608 in b
    assert default_buckets(100)[-1] == 100
    waste = [(bk - n) / bk for n in range(17, 8193) for bk in [b[np.searchsorted(b, n)]]]
    assert max(waste) < 0.32  # worst just above 32 (33 → 48)
    assert max(waste[64 - 17:]) < 0.2


@pytest.mark.parametrize("bad, err", [([], ValueError), ([0, 4], ValueError), ([4, 4], ValueError),
                                      ([4.0, 8], TypeError), ("16", ValueError)])
def test_bad_bucket_lists_are_rejected(bad, err):
    with pytest.raises(err):
        validate_buckets(bad)


def test_max_tokens_beyond_memory_is_a_clear_error(model):
    with pytest.raises(ValueError, match="lower max_tokens"):
        PiecewiseCudaGraphRunner(model, max_tokens=10**9, progress=False)


@pytest.mark.parametrize("fusion", [Fusion.none(), Fusion.all()], ids=["unfused", "fused"])
def test_graphless_runner_equals_eager_model(model, fusion):
    model.set_fusion(fusion)
    try:
        runner = PiecewiseCudaGraphRunner(model, buckets=[8, 16, 32, 64], progress=False)
        report = runner.capture()
        assert not report.graphs and "no CUDA graphs captured" in str(report)
        for lengths in ([8], [9], [1, 7], [5, 20, 3], [64]):  # n = bucket and n = bucket + 1, packed prompts
            prompts = _prompts(lengths, seed=sum(lengths))
            eager = model.prefill(prompts)
            got = runner.prefill(prompts)
            if sum(lengths) in runner.buckets:  # no padding: the very same computation
                assert torch.equal(got, eager), lengths
            else:  # padding rows change matmul/expert group shapes, hence rounding only (see PADDING_BOUND)
                assert rel_err(got, eager) <= PADDING_BOUND, lengths
    finally:
        model.set_fusion(Fusion.none())


def test_runner_builds_no_rope_tables_outside_its_graphs(model, monkeypatch):
    """The pieces compute cos/sin from the static positions (inside the first graph on a GPU); the per-forward context
    the runner builds for the attention calls carries none, so a prefill launches no RoPE work outside the graphs."""
    runner = PiecewiseCudaGraphRunner(model, buckets=[16], progress=False)
    contexts = []
    make = model.language_model.make_context
    monkeypatch.setattr(model.language_model, "make_context",
                        lambda *a, **k: contexts.append(make(*a, **k)) or contexts[-1])
    prompts = _prompts([11], seed=2)
    got = runner.prefill(prompts)
    assert contexts and all(c.cos_sin == {} for c in contexts)
    assert rel_err(got, model.prefill(prompts)) <= PADDING_BOUND


def test_padding_garbage_never_reaches_real_tokens(model):
    runner = PiecewiseCudaGraphRunner(model, buckets=[32], progress=False)
    prompts = _prompts([6, 11])

    def garbage(buf, n, bucket):
        g = torch.Generator().manual_seed(123)
        buf.ids[n:bucket] = torch.randint(0, 512, (bucket - n,), generator=g)
        buf.positions[n:bucket] = torch.randint(0, 4000, (bucket - n,), generator=g)
        buf.mm_embeds[n:bucket] = torch.randn(bucket - n, buf.mm_embeds.shape[1], generator=g) * 1e3
        buf.mm_mask[n:bucket] = True

    clean = runner.prefill(prompts, all_logits=True)
    dirty = runner.prefill(prompts, all_logits=True, pad_fill=garbage)
    assert torch.isfinite(dirty).all()
    # Garbage routes padding rows to other experts (other group sizes): rounding-level change at most.
    assert rel_err(dirty, clean) <= PADDING_BOUND
    assert rel_err(clean, model.prefill(prompts, all_logits=True)) <= PADDING_BOUND


def test_fallback_above_max_tokens_is_announced_once(model):
    """A single prompt above the largest bucket is chunked (tests/test_chunked_prefill.py); several prompts above it
    run eager, said once and counted every time."""
    runner = PiecewiseCudaGraphRunner(model, buckets=[8, 16], progress=False)
    prompts = _prompts([11, 9])
    with pytest.warns(UserWarning, match="exceed the largest bucket"):
        out = runner.prefill(prompts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner.prefill(prompts)  # second time: silent, but counted
    assert runner.stats["eager_fallbacks"] == 2 and runner.stats["chunked_prefills"] == 0
    assert torch.equal(out, model.prefill(prompts))


def test_image_prompts_use_the_same_pieces(model, tiny_config):
    from PIL import Image

    proc = gemma4lab.Gemma4Processor(tiny_config)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (96, 144, 3), dtype=np.uint8))
    batch = proc(input_ids=[2, 9, tiny_config.image_token_id, 7, 8], images=[img])
    runner = PiecewiseCudaGraphRunner(model, buckets=[64, 128], progress=False)
    got = runner(**batch).logits
    assert rel_err(got, model(**batch).logits) <= PADDING_BOUND


def test_decode_runner_generates_the_same_tokens(model):
    prompts = torch.stack(_prompts([12, 12], seed=5))
    expected = model.generate(prompts, 18, eos_token_id=[], pad_token_id=0)
    runner = DecodeGraphRunner(model, max_batch=2, max_len=64, progress=False)
    pcg = PiecewiseCudaGraphRunner(model, buckets=[32], progress=False)
    got = runner.generate(prompts, 18, prefill_runner=pcg, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="max_len"):
        runner.generate(prompts, 100)


def test_kv_cache_preserved_undoes_a_decode_step(model):
    """What a decode-graph capture runs (a step at stale positions) must leave a prefilled cache untouched."""
    from gemma4lab.runtime.generation import KVCache, decode_step

    lm = model.language_model
    cache = KVCache(lm.config, 2, 32, model.dtype, model.device)
    for t in cache.k + cache.v:
        t.normal_()
    cache.slot_pos.copy_(torch.arange(cache.window).expand(2, -1))
    before = [t.clone() for t in cache.k + cache.v] + [cache.slot_pos.clone()]
    positions = torch.tensor([0, 5])
    with cache.preserved(positions):
        decode_step(lm, torch.tensor([7, 9]), positions, cache)
        assert not torch.equal(cache.k[0], before[0])  # the step did write
    after = cache.k + cache.v + [cache.slot_pos]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_runner_follows_a_settings_change_after_capture(model):
    """Pieces made with one fusion setting must never serve another (the stale-graph bug): the runner recaptures,
    says so, and returns the logits of the model as it is now. On CPU the runner caches its pieces exactly as it
    caches graphs on a GPU, so this fails if the keying is removed."""
    prompts = _prompts([13, 6], seed=2)
    runner = PiecewiseCudaGraphRunner(model, buckets=[32], progress=False)
    try:
        model.set_fusion("all")
        assert rel_err(runner.prefill(prompts), model.prefill(prompts)) <= PADDING_BOUND
        key_fused = runner.captured_key
        model.set_fusion("none")
        with pytest.warns(UserWarning, match="settings changed since capture"):
            got = runner.prefill(prompts)
        assert rel_err(got, model.prefill(prompts)) <= PADDING_BOUND
        assert runner.stats["recaptures"] == 1 and runner.captured_key != key_fused
        model.set_attention_backend("flex")
        assert runner.captured_key != gemma4lab.model.decoder.program_key(model.language_model)
    finally:
        model.set_fusion(Fusion.none()).set_attention_backend("auto")


def test_concurrent_prefills_get_the_eager_logits(model):
    """Six threads share one runner (one set of static buffers): each must get its own prompt's logits."""
    from concurrent.futures import ThreadPoolExecutor

    runner = PiecewiseCudaGraphRunner(model, buckets=[32], progress=False)
    prompts = [_prompts([n], seed=n) for n in (5, 9, 13, 17, 21, 25)]
    expected = [model.prefill(p) for p in prompts]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(runner.prefill, prompts * 3))
    for i, g in enumerate(got):
        assert rel_err(g, expected[i % 6]) <= PADDING_BOUND, i


# ---- on a GPU: real graphs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_model(hf_tiny):
    return gemma4lab.load_pretrained(hf_tiny[1], dtype=torch.bfloat16, device="cuda").set_fusion("all")


@pytest.mark.gpu
def test_gpu_graphs_equal_eager_at_every_boundary(cuda_model):
    buckets = [8, 16, 32, 64]
    runner = PiecewiseCudaGraphRunner(cuda_model, buckets=buckets, progress=False)
    report = runner.capture()
    assert report.graphs and report.graph_pool_bytes > 0 and report.capture_s > 0
    for n in [1] + [b for bk in buckets for b in (bk, bk + 1) if b <= 64]:
        prompts = [p.cuda() for p in _prompts([n], seed=n)]
        eager = cuda_model.prefill(prompts)
        got = runner.prefill(prompts)
        assert torch.equal(got, eager), n
    packed = [p.cuda() for p in _prompts([3, 17, 9], seed=1)]
    assert torch.equal(runner.prefill(packed), cuda_model.prefill(packed))
    with pytest.warns(UserWarning, match="ran as chunks"):  # above the largest bucket: chunks of 64 tokens
        big = [p.cuda() for p in _prompts([70])]
        assert torch.equal(runner.prefill(big), cuda_model.prefill(big, chunk_tokens=64))


@pytest.mark.gpu
def test_gpu_image_prompt_and_decode_graph(cuda_model, tiny_config):
    from PIL import Image

    proc = gemma4lab.Gemma4Processor(tiny_config)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 96, 3), dtype=np.uint8))
    batch = {k: v.cuda() for k, v in proc(input_ids=[2, 9, tiny_config.image_token_id, 7], images=[img]).items()}
    runner = PiecewiseCudaGraphRunner(cuda_model, buckets=[64, 128], progress=False)
    runner.capture()
    assert rel_err(runner(**batch).logits, cuda_model(**batch).logits) == 0.0
    dec = DecodeGraphRunner(cuda_model, max_batch=2, max_len=128, progress=False)
    dec.capture()
    expected = cuda_model.generate(batch["input_ids"], 16, eos_token_id=[], pad_token_id=0,
                                   pixel_values=batch["pixel_values"], image_position_ids=batch["image_position_ids"],
                                   mm_token_type_ids=batch["mm_token_type_ids"])
    got = dec.generate(batch["input_ids"], 16, pixel_values=batch["pixel_values"],
                       image_position_ids=batch["image_position_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                       prefill_runner=runner, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, expected)


@pytest.mark.gpu
def test_gpu_fp32_model_captures(hf_tiny):
    """fp32 on a GPU: torch's grouped_mm is bf16-only, so the experts must take the graph-safe Triton kernel."""
    model = gemma4lab.load_pretrained(hf_tiny[1], dtype=torch.float32, device="cuda")
    runner = PiecewiseCudaGraphRunner(model, buckets=[16, 32], progress=False)
    assert runner.capture().graphs
    prompts = [p.cuda() for p in _prompts([13])]
    assert rel_err(runner.prefill(prompts), model.prefill(prompts)) <= PADDING_BOUND
    # A decode runner captured lazily, between the prefill and the first step, must not clobber the prefilled cache.
    ids = torch.stack(_prompts([11], seed=3)).cuda()
    expected = model.generate(ids, 12, eos_token_id=[], pad_token_id=0)
    dec = DecodeGraphRunner(model, max_batch=2, max_len=64, progress=False)
    got = dec.generate(ids, 12, prefill_runner=runner, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, expected)


@pytest.mark.gpu
def test_gpu_graphs_follow_a_settings_change_after_capture(hf_tiny):
    """The stale-graph bug on real graphs: after set_fusion("none") the runner must give the unfused model's logits,
    not replay the fused graphs (before the keying it stayed within 0.03 of the fused model, silently)."""
    model = gemma4lab.load_pretrained(hf_tiny[1], dtype=torch.bfloat16, device="cuda").set_fusion("all")
    runner = PiecewiseCudaGraphRunner(model, buckets=[32, 64], progress=False)
    runner.capture()
    prompts = [p.cuda() for p in _prompts([29], seed=4)]
    fused = runner.prefill(prompts, all_logits=True)
    assert torch.equal(fused, model.prefill(prompts, all_logits=True))
    model.set_fusion("none")
    unfused = model.prefill(prompts, all_logits=True)
    assert not torch.equal(unfused, fused)  # the two programs differ in bf16 rounding, so a stale replay shows
    with pytest.warns(UserWarning, match="settings changed since capture"):
        got = runner.prefill(prompts, all_logits=True)
    assert torch.equal(got, unfused)
    dec = DecodeGraphRunner(model, max_batch=1, max_len=64, progress=False)
    ids = torch.stack(_prompts([9], seed=6)).cuda()
    expected = model.generate(ids, 8, eos_token_id=[], pad_token_id=0)
    assert torch.equal(dec.generate(ids, 8, eos_token_id=[], pad_token_id=0), expected)
    model.set_fusion("all")
    with pytest.warns(UserWarning, match="settings changed since capture"):
        got = dec.generate(ids, 8, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, model.generate(ids, 8, eos_token_id=[], pad_token_id=0))


@pytest.mark.gpu
def test_gpu_concurrent_prefills_get_the_eager_logits(cuda_model):
    from concurrent.futures import ThreadPoolExecutor

    runner = PiecewiseCudaGraphRunner(cuda_model, buckets=[32], progress=False)
    runner.capture()
    prompts = [[p.cuda() for p in _prompts([n], seed=n)] for n in (5, 9, 13, 17, 21, 25)]
    expected = [cuda_model.prefill(p) for p in prompts]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(runner.prefill, prompts * 5))
    for i, g in enumerate(got):
        assert torch.equal(g, expected[i % 6]), i
