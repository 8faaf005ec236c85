"""One mask rule: every backend's form of it (dense SDPA masks, Flex's mask_mod, the Triton kernel's key ends +
window, the decode slots of a ring and of a full cache) equals ``Visibility.visible`` on random packed batches with
images straddling the window."""

from __future__ import annotations

import pytest
import torch

from gemma4lab.attention import PackedBatch, Visibility, image_block_ids, mask_for_prompt
from gemma4lab.kernels import gemma_prefill_attention_ref
from gemma4lab.runtime.kv_cache import KVCache


def _batch(seed: int, window: int):
    """Random prompt lengths around the window, each with up to two images, one of them across the window edge."""
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(1, 3 * window, (int(torch.randint(1, 4, (1,), generator=g)),),
                                          generator=g)]
    types = []
    for n in lens:
        t = torch.zeros(n, dtype=torch.long)
        for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
            start = int(torch.randint(0, n, (1,), generator=g))
            t[start: start + int(torch.randint(1, window, (1,), generator=g))] = 1
        types.append(t)
    blocks = image_block_ids(torch.cat(types)) if types else None
    starts = torch.tensor([0, *lens[:-1]]).cumsum(0)
    from gemma4lab.model.multimodal import _split_blocks_at

    blocks = _split_blocks_at(blocks, starts) if len(lens) > 1 else blocks
    return PackedBatch.from_lengths(lens, block_ids=blocks)


def _truth(batch: PackedBatch, rule: Visibility) -> torch.Tensor:
    """The rule on every (query, key) pair of the pack: [N, N]."""
    p, doc, blk = batch.positions, batch.doc_ids, batch.block_ids
    return rule.visible(p[:, None], p[None, :], doc[:, None], doc[None, :], blk[:, None], blk[None, :])


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("sliding", [True, False])
def test_every_prefill_form_equals_the_rule(seed, sliding):
    window = 8
    batch = _batch(seed, window)
    rule = Visibility(window=window if sliding else None, image_blocks=sliding)
    truth = _truth(batch, rule)
    n = batch.num_tokens
    # dense (SDPA reference): block-diagonal per prompt
    start = 0
    for m in batch.seq_lens:
        sl = slice(start, start + m)
        assert torch.equal(mask_for_prompt(m, sliding, window, batch.block_ids[sl], "cpu"), truth[sl, sl])
        start += m
    # Triton kernel: key ends + window inside cu_seqlens, read back through the kernel's reference
    cu = torch.tensor([0, *batch.seq_lens]).cumsum(0).to(torch.int32)
    key_end = rule.key_end(batch.block_ids)
    eye = torch.eye(n, dtype=torch.float64)  # v = identity rows: the output row is the attention distribution
    q = k = torch.zeros(n, 1, n, dtype=torch.float64)  # equal scores: uniform over the visible keys
    probs = gemma_prefill_attention_ref(q, k, eye[:, None, :], cu, window=rule.window, key_end=key_end)[:, 0]
    assert torch.equal(probs > 0, truth)
    # Flex: the mask_mod the block mask is built from (evaluated densely here; CPU has no compiled Flex)
    rows = torch.arange(n)
    p, doc, blk = batch.positions, batch.doc_ids, batch.block_ids
    mod = rule.visible(p[rows][:, None], p[rows][None, :], doc[:, None], doc[None, :], blk[:, None], blk[None, :])
    assert torch.equal(mod, truth)


@pytest.mark.parametrize("window", [4, 16])
def test_decode_forms_equal_the_rule(tiny_text_config, window):
    """The KV cache's masks (a ring on sliding layers, positions on full layers) are the rule at decode time."""
    import dataclasses

    cfg = dataclasses.replace(tiny_text_config.text, sliding_window=window)
    cache = KVCache(cfg, 3, 40, torch.float32, "cpu")
    positions = torch.tensor([0, window + 3, 39])
    for p in range(40):  # fill the rings as generation would
        cache.advance(torch.clamp(positions * 0 + p, max=positions))
    for sliding in (True, False):
        rule = Visibility(window=window if sliding else None)
        got = cache.mask(sliding, positions)[:, 0, 0]
        keys = cache.slot_pos if sliding else torch.arange(40)[None, :].expand(3, -1)
        want = (keys >= 0) & rule.visible(positions[:, None], keys)
        assert torch.equal(got, want)
        if sliding:  # a ring holds exactly the window's last positions
            assert (got.sum(-1) == torch.clamp(positions + 1, max=window)).all()


# ---- chunks of a prompt (chunked prefill) ---------------------------------------------------------------------------
def _prompt_with_images(seed: int, window: int) -> PackedBatch:
    """One prompt of 2-4 windows with images of 1-4 soft tokens (shorter than every chunk below) every few tokens,
    so that chunk boundaries and window edges fall next to and inside them."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2 * window, 4 * window, (1,), generator=g))
    t = torch.zeros(n, dtype=torch.long)
    start = int(torch.randint(0, window, (1,), generator=g))
    while start < n:
        length = int(torch.randint(1, 5, (1,), generator=g))
        t[start: start + length] = 1
        start += length + int(torch.randint(1, window, (1,), generator=g))
    return PackedBatch.from_lengths([n], block_ids=image_block_ids(t))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("sliding", [True, False])
@pytest.mark.parametrize("chunk", [5, 8, 9, 20])
def test_every_chunk_form_equals_the_rule_rows(seed, sliding, chunk):
    """A chunk's queries see, among the keys its backend gets (the cached prefix from ``key_start``, then its own),
    exactly what the unchunked rule's rows for them see; every key before ``key_start`` is invisible to them.
    Window 8 with chunks of 5/8/9/20: chunk starts inside, at and past the window; images are never split."""
    from gemma4lab.attention.backends import BACKENDS
    from gemma4lab.runtime.chunked import chunk_bounds

    window = 8
    whole = _prompt_with_images(seed, window)
    rule = Visibility(window=window if sliding else None, image_blocks=sliding)
    truth = _truth(whole, rule)
    for s, e in chunk_bounds(whole.num_tokens, chunk, whole.block_ids):
        batch = whole.chunk(s, e)
        lo = rule.key_start(s)
        (p,) = rule.prefix_lens(batch.cached)
        assert p == s - lo and not truth[s:e, :lo].any()  # nothing before key_start is visible
        want = truth[s:e, lo:e]
        # dense (SDPA reference), through the backend's plan
        (keys, mask), = BACKENDS["sdpa"].plan(batch, rule)
        assert keys == slice(0, p + e - s) and torch.equal(mask, want)
        # Triton kernel: its plan (cu_seqlens_k, key ends in key rows) read back through the kernel's reference
        plan = BACKENDS["triton"].plan(batch, rule)
        n_keys = p + e - s
        eye = torch.eye(n_keys, dtype=torch.float64)
        q, k = torch.zeros(e - s, 1, n_keys, dtype=torch.float64), torch.zeros(n_keys, 1, n_keys, dtype=torch.float64)
        probs = gemma_prefill_attention_ref(q, k, eye[:, None, :], plan["cu_seqlens"], window=plan["window"],
                                            key_end=plan["key_end"], cu_seqlens_k=plan["cu_seqlens_k"])[:, 0]
        assert torch.equal(probs > 0, want)
        # Flex: its mask_mod over the real query and key rows
        mod = BACKENDS["flex"].mask_mod(batch, rule, 128, 128 * (1 + n_keys // 128))
        assert torch.equal(mod(0, 0, torch.arange(e - s)[:, None], torch.arange(n_keys)[None, :]), want)


@pytest.mark.parametrize("window", [4, 16])
def test_chunk_keys_from_the_cache_are_the_rules_prefix(tiny_text_config, window):
    """``KVCache.with_prefix`` hands a chunk exactly the positions ``[key_start, end)`` in order, from a full layer's
    cache and from a sliding layer's ring, after chunks of 3 filled it (keys carry their position as a value)."""
    import dataclasses

    cfg = dataclasses.replace(tiny_text_config.text, sliding_window=window)
    cache = KVCache(cfg, 1, 40, torch.float32, "cpu")
    whole = PackedBatch.from_lengths([40])
    for s in range(0, 40, 3):
        batch = whole.chunk(s, min(s + 3, 40))
        for layer in range(cfg.num_hidden_layers):
            hkv, d = cfg.layer_kv_heads(layer), cfg.layer_head_dim(layer)
            kv = batch.positions.float()[:, None, None].expand(-1, hkv, d)
            keys, values = cache.with_prefix(layer, kv, -kv, batch)
            cache.fill(layer, kv, -kv, batch)
            lo = Visibility.for_layer(cfg, cfg.is_sliding(layer)).key_start(s)
            want = torch.arange(lo, batch.positions[-1] + 1).float()
            assert torch.equal(keys[:, 0, 0], want) and torch.equal(values[:, 0, 0], -want), (s, layer)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sliding", [True, False])
def test_a_pack_of_chunks_keeps_prompts_apart(seed, sliding):
    """The backends also take chunks of several prompts in one pack (each after its own cached keys): every form is
    block-diagonal, prompt b's block being its unchunked rule's rows for the chunk (a key row of another prompt
    must stay invisible, even where it sits on a query's own row index)."""
    from gemma4lab.attention.backends import BACKENDS

    window = 8
    g = torch.Generator().manual_seed(seed)
    cached = [int(x) for x in torch.randint(0, 3 * window, (3,), generator=g)]
    lens = [int(x) for x in torch.randint(1, 2 * window, (3,), generator=g)]
    rule = Visibility(window=window if sliding else None)
    batch = PackedBatch.from_lengths(lens, cached=cached)
    keys = batch.key_slices(rule.prefix_lens(cached))
    n, n_keys = batch.num_tokens, keys[-1].stop
    want = torch.zeros(n, n_keys, dtype=torch.bool)
    for sl, ks, c, m in zip(batch.prompt_slices(), keys, cached, lens):
        whole = rule.dense(c + m)
        want[sl, ks] = whole[c:, rule.key_start(c):]
    dense = torch.zeros_like(want)
    for sl, (ks, mask) in zip(batch.prompt_slices(), BACKENDS["sdpa"].plan(batch, rule)):
        dense[sl, ks] = mask
    assert torch.equal(dense, want)
    plan = BACKENDS["triton"].plan(batch, rule)
    eye = torch.eye(n_keys, dtype=torch.float64)
    q, k = torch.zeros(n, 1, n_keys, dtype=torch.float64), torch.zeros(n_keys, 1, n_keys, dtype=torch.float64)
    probs = gemma_prefill_attention_ref(q, k, eye[:, None, :], plan["cu_seqlens"], window=plan["window"],
                                        cu_seqlens_k=plan["cu_seqlens_k"])[:, 0]
    assert torch.equal(probs > 0, want)
    mod = BACKENDS["flex"].mask_mod(batch, rule, 128, 128 * (1 + n_keys // 128))
    assert torch.equal(mod(0, 0, torch.arange(n)[:, None], torch.arange(n_keys)[None, :]), want)


def test_a_packs_last_rows_are_built_once():
    """Each prompt's last row in the pack, on the device; a prefill asks twice (the graphs' input, the head), so the
    tensor is built once per batch."""
    batch = PackedBatch.from_lengths([3, 1, 5])
    assert batch.last_token_rows.tolist() == [2, 3, 8]
    assert batch.last_token_rows is batch.last_token_rows
