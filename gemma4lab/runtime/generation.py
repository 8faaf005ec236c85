"""Greedy decoding over the static KV cache (``gemma4lab.runtime.kv_cache``): one decode step with no host sync, so
``gemma4lab.runtime.decode_graphs.DecodeGraphRunner`` can capture it in a CUDA graph."""

from __future__ import annotations

import torch
from torch import Tensor

from gemma4lab.model.decoder import Stream, run_decoder
from gemma4lab.runtime.kv_cache import KVCache


@torch.no_grad()
def decode_step(lm, tokens: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
    """One new token per sequence: tokens/positions [B] → logits [B, vocab]. No host synchronisation.

    The layers run through the decoder program (``gemma4lab.model.decoder.run_decoder``); only the attention differs
    from prefill: each layer writes its new K/V into the cache and its backend attends to the cached keys that the
    layer's mask rule makes visible (``Visibility.slots``)."""
    from gemma4lab.attention import BACKENDS

    cache.advance(positions)
    backend = BACKENDS["triton" if lm.backend_for(tokens.device) == "triton" else "sdpa"]
    rules = {s: lm.rule(s) for s in (True, False)}

    def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache.write(i, k, v, positions)
        sliding = lm.layers[i].self_attn.sliding
        return backend.decode(q, cache.k[i], cache.v[i], positions, cache.slot_pos if sliding else None,
                              rules[sliding])

    hidden = run_decoder(lm, Stream(lm.embed(tokens)), lm.rope(positions), attend, lm.fusion)
    return lm.logits(hidden)


def as_prompt_list(x: Tensor | list[Tensor]) -> list[Tensor]:
    """A list of 1-D per-prompt tensors from a list, a [B, T] tensor or a single [T] prompt."""
    if isinstance(x, (list, tuple)):
        return list(x)
    return list(x if x.dim() == 2 else x[None])


@torch.no_grad()
def greedy_generate(
    model,
    input_ids: Tensor | list[Tensor],
    max_new_tokens: int,
    pixel_values: Tensor | None = None,
    image_position_ids: Tensor | None = None,
    mm_token_type_ids: Tensor | list[Tensor] | None = None,
    *,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    step_fn=None,
    cache: KVCache | None = None,
    prefill_fn=None,
) -> Tensor | list[Tensor]:
    """Greedy decoding that matches the reference's ``generate(do_sample=False)``.

    A sequence that emits an end-of-sequence id is padded with ``pad_token_id`` afterwards; decoding stops once
    every sequence has finished or ``max_new_tokens`` were produced. ``input_ids`` [B, T] returns [B, T + new];
    a list of prompts of different lengths returns a list. ``step_fn``/``prefill_fn``/``cache`` swap in the
    graphed decode step, the piecewise-graph prefill and their static cache.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    cfg = model.config.text
    as_list = isinstance(input_ids, (list, tuple))
    prompts = as_prompt_list(input_ids)
    mm = as_prompt_list(mm_token_type_ids) if mm_token_type_ids is not None else None
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=model.device)
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    lens = [int(p.numel()) for p in prompts]
    if max(lens) + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({max(lens)} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's "
                         f"max_position_embeddings ({cfg.max_position_embeddings})")
    if cache is None:
        cache = KVCache(cfg, len(prompts), max(lens) + max_new_tokens, model.dtype, model.device)
    logits = (prefill_fn or model.prefill)(prompts, pixel_values, image_position_ids, mm, cache=cache)
    step = step_fn or (lambda tok, pos: decode_step(model.language_model, tok, pos, cache))
    positions = torch.tensor(lens, device=model.device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)
    new_tokens = []
    for i in range(max_new_tokens):
        tok = logits.argmax(dim=-1)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        new_tokens.append(tok)
        done = done | torch.isin(tok, eos_ids)
        if i == max_new_tokens - 1 or bool(done.all()):
            break
        logits = step(tok, positions)
        positions = positions + 1
    gen = torch.stack(new_tokens, dim=1)
    outs = [torch.cat([p.to(model.device), g]) for p, g in zip(prompts, gen)]
    return outs if as_list else torch.stack(outs)
