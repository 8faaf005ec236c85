"""Chunked prefill: a prompt longer than one forward should hold, run as consecutive chunks over one KV cache.

Chunk ``[s, e)`` is a forward of its own rows (``PackedBatch.chunk``: absolute positions, so RoPE is unchanged)
whose attention also reads the keys of the earlier chunks that the mask rule still lets it see: all of them on full
layers, the last ``window - 1`` on sliding layers (``Visibility.key_start``; ``KVCache.with_prefix`` reads them before
the chunk writes its own). The decoder program is the same (``run_chunk`` runs it eagerly or through the piecewise
CUDA graphs), so a chunked prefill differs from an unchunked one only in rounding: each attention row sums the same
keys in other tiles, and the matmuls see fewer rows. The cache it leaves is the one decode continues from.

One prompt at a time: a pack of several prompts would need a chunk schedule across prompts, which no caller needs yet.
An image is never split: its soft tokens see each other in both directions on sliding layers, so a chunk that ends
inside one would miss keys that come later; a boundary inside an image moves back to the image's start.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gemma4lab.attention import PackedBatch
from gemma4lab.runtime.kv_cache import KVCache

#: ``run_chunk(ids, embeds, batch, cache) -> hidden``: one chunk's forward (token ids and input embeddings of its rows,
#: its ``PackedBatch`` and the cache) → its final-normed hidden states ``[rows, hidden]``.
RunChunk = Callable[[Tensor, Tensor, PackedBatch, KVCache], Tensor]


class ImageSplitError(ValueError):
    """An image has more soft tokens than a chunk holds: no chunk boundary can avoid cutting it."""


def check_chunk_tokens(chunk_tokens: object) -> int:
    """A clear error for a chunk size that would loop forever (0), split nothing sensibly (< 0) or is not a count."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int (tokens per chunk), got {chunk_tokens!r}")
    return chunk_tokens


def chunk_bounds(n_tokens: int, chunk_tokens: int, block_ids: Tensor | None = None) -> list[tuple[int, int]]:
    """``[start, end)`` of each chunk: ``chunk_tokens`` rows each (the last one fewer), a boundary that would cut an
    image (``block_ids`` >= 0, bidirectional) moved back to the image's start. One host read of ``block_ids``."""
    check_chunk_tokens(chunk_tokens)
    blocks = block_ids.tolist() if block_ids is not None else None
    bounds, start = [], 0
    while start < n_tokens:
        end = min(start + chunk_tokens, n_tokens)
        if blocks is not None and end < n_tokens and blocks[end] >= 0 and blocks[end - 1] == blocks[end]:
            image = blocks[end]
            while end > start and blocks[end - 1] == image:
                end -= 1
            if end == start:
                length = sum(b == image for b in blocks)
                raise ImageSplitError(f"an image of {length} soft tokens does not fit a chunk of {chunk_tokens} "
                                      "tokens: its tokens see each other in both directions, so it must lie inside "
                                      "one chunk (use larger chunks)")
        bounds.append((start, end))
        start = end
    return bounds


@torch.no_grad()
def chunked_prefill(
    model,
    prompts: list[Tensor],
    pixel_values: Tensor | None = None,
    image_position_ids: Tensor | None = None,
    mm_token_type_ids: list[Tensor] | None = None,
    *,
    chunk_tokens: int,
    all_logits: bool = False,
    cache: KVCache | None = None,
    run_chunk: RunChunk | None = None,
) -> Tensor:
    """``model.prefill``'s contract for one prompt, run in chunks of at most ``chunk_tokens`` tokens.

    ``cache`` (row 0) receives the prompt's keys and values (a temporary one when None: the chunks need it);
    ``run_chunk`` runs one chunk's forward (default: the eager decoder). Errors (several prompts, an image longer than
    a chunk, a cache too small) are raised before any chunk runs.
    """
    check_chunk_tokens(chunk_tokens)
    if not isinstance(prompts, (list, tuple)) or len(prompts) != 1:
        n = len(prompts) if isinstance(prompts, (list, tuple)) else type(prompts).__name__
        raise ValueError(f"chunked prefill takes one prompt, got {n}: several prompts are not chunked together "
                         "(prefill them one at a time, or pack them unchunked)")
    lm = model.language_model
    ids, batch = model.pack_prompts(prompts, mm_token_type_ids)
    bounds = chunk_bounds(batch.num_tokens, chunk_tokens, batch.block_ids)
    if cache is None:
        cache = KVCache(lm.config, 1, batch.num_tokens, model.dtype, model.device)
    cache.check_fits(batch)
    # the vision tower runs once, for all chunks
    embeds = model.embed_inputs(ids, pixel_values, image_position_ids, image_tokens=batch.image_tokens)
    run = run_chunk or (lambda i, e, b, c: lm.forward_embeds(e, lm.make_context(b, cache=c)))
    logits = []
    for start, end in bounds:
        hidden = run(ids[start:end], embeds[start:end], batch.chunk(start, end), cache)
        if all_logits:
            logits.append(lm.logits(hidden))
        elif end == batch.num_tokens:
            logits.append(lm.logits(hidden[-1:]))
    return torch.cat(logits)
