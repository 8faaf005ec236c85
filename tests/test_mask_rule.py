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
