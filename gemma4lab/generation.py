"""KV cache and greedy decoding.

The cache is static: every buffer is allocated once for ``batch_size × max_len``, and a decode step only writes
into it by index with device-side positions. That is what lets ``gemma4lab.pcg.DecodeGraphRunner`` capture the
one-token step in a CUDA graph. Sliding layers keep a ring of ``sliding_window`` slots, not the whole history.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import PackedBatch
from .config import TextConfig


class KVCache:
    """Per-layer K/V after norms and RoPE. Full layers: [B, Hkv, max_len, D]; sliding: a ring [B, Hkv, W, D]."""

    def __init__(self, cfg: TextConfig, batch_size: int, max_len: int, dtype: torch.dtype, device) -> None:
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch_size >= 1 and max_len >= 1, got {batch_size}, {max_len}")
        self.cfg = cfg
        self.batch_size = batch_size
        self.max_len = max_len
        self.window = min(cfg.sliding_window, max_len)
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        for i in range(cfg.num_hidden_layers):
            slots = self.window if cfg.is_sliding(i) else max_len
            shape = (batch_size, cfg.layer_kv_heads(i), slots, cfg.layer_head_dim(i))
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
        # Which absolute position each ring slot holds (-1 = empty); shared by all sliding layers.
        self.slot_pos = torch.full((batch_size, self.window), -1, dtype=torch.long, device=device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # ---- prefill ---------------------------------------------------------------------------------------------------
    def fill(self, layer: int, k: Tensor, v: Tensor, batch: PackedBatch) -> None:
        """Write a packed prefill's K/V ([N, Hkv, D]) for each prompt, slot b = prompt b."""
        if len(batch.seq_lens) > self.batch_size:
            raise ValueError(f"{len(batch.seq_lens)} prompts do not fit a KV cache of batch size {self.batch_size}")
        sliding = self.cfg.is_sliding(layer)
        start = 0
        for b, n in enumerate(batch.seq_lens):
            if n > self.max_len:
                raise ValueError(f"prompt {b} has {n} tokens but the KV cache holds {self.max_len}")
            kb, vb = k[start:start + n].transpose(0, 1), v[start:start + n].transpose(0, 1)
            if sliding:
                keep = min(n, self.window)
                slots = torch.arange(n - keep, n, device=k.device) % self.window
                self.k[layer][b][:, slots] = kb[:, n - keep:]
                self.v[layer][b][:, slots] = vb[:, n - keep:]
                if layer == self.first_sliding:
                    self.slot_pos[b].fill_(-1)
                    self.slot_pos[b, slots] = torch.arange(n - keep, n, device=k.device)
            else:
                self.k[layer][b, :, :n] = kb
                self.v[layer][b, :, :n] = vb
            start += n

    @property
    def first_sliding(self) -> int:
        return next((i for i in range(self.cfg.num_hidden_layers) if self.cfg.is_sliding(i)), -1)

    # ---- decode (graph-safe: no host sync, fixed shapes) ----------------------------------------------------------
    def advance(self, positions: Tensor) -> None:
        """Record that each sequence's new token sits at ``positions[b]`` (before the layers run)."""
        b = positions.shape[0]
        rows = torch.arange(b, device=positions.device)
        self.slot_pos[rows, positions % self.window] = positions

    @contextlib.contextmanager
    def preserved(self, positions: Tensor):
        """Undo what decode steps at ``positions`` write (slot map and K/V) when the block exits.

        Capturing a decode graph has to *run* the step, which writes K/V at the (stale) static positions; without
        this a capture between prefill and decode would overwrite a real token's keys.
        """
        rows = torch.arange(positions.shape[0], device=positions.device)
        saved_map = self.slot_pos.clone()
        saved = [(self.k[i][rows, :, self._slots(i, positions)].clone(),
                  self.v[i][rows, :, self._slots(i, positions)].clone()) for i in range(len(self.k))]
        try:
            yield
        finally:
            self.slot_pos.copy_(saved_map)
            for i, (k, v) in enumerate(saved):
                self.write(i, k, v, positions)

    def _slots(self, layer: int, positions: Tensor) -> Tensor:
        """Where each sequence's token at ``positions`` lives in layer ``layer``'s cache (a ring on sliding layers)."""
        return positions % self.window if self.cfg.is_sliding(layer) else positions

    def write(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> None:
        rows = torch.arange(positions.shape[0], device=positions.device)
        slot = self._slots(layer, positions)
        self.k[layer][rows, :, slot] = k
        self.v[layer][rows, :, slot] = v

    def mask(self, sliding: bool, positions: Tensor) -> Tensor:
        """[B, 1, 1, slots] True where a cached key is visible to the new token."""
        b = positions.shape[0]
        p = positions[:, None]
        if sliding:
            sp = self.slot_pos[:b]
            m = (sp >= 0) & (sp <= p) & (sp > p - self.cfg.sliding_window)
        else:
            m = torch.arange(self.max_len, device=positions.device)[None, :] <= p
        return m[:, None, None, :]


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q: [B, Hq, D]; k/v: [B, Hkv, S, D] → [B, Hq, D]."""
    o = F.scaled_dot_product_attention(
        q[:, :, None, :], k, v, attn_mask=mask, scale=1.0, enable_gqa=q.shape[1] != k.shape[1]
    )
    return o[:, :, 0, :]


@torch.no_grad()
def decode_step(lm, tokens: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
    """One new token per sequence: tokens/positions [B] → logits [B, vocab]. No host synchronisation."""
    b = tokens.shape[0]
    fusion = lm.fusion
    h = lm.embed(tokens)
    cache.advance(positions)
    cos_sin = lm.rope(positions)
    triton_attn = lm.backend_for(tokens.device) == "triton"
    if triton_attn:
        from .kernels.decode_attention import gemma_decode_attention
    else:
        masks = {s: cache.mask(s, positions) for s in (True, False)}
    x = None
    for i, layer in enumerate(lm.layers):
        sliding = layer.self_attn.sliding
        cos, sin = cos_sin[sliding]
        q, k, v = layer.pre_attention(h, x, cos, sin, fusion)
        cache.write(i, k, v, positions)
        if triton_attn:
            o = gemma_decode_attention(q, cache.k[i], cache.v[i], positions, slot_pos=cache.slot_pos if sliding else
                                       None, window=lm.config.sliding_window if sliding else None)
        else:
            o = decode_attention(q, cache.k[i][:b], cache.v[i][:b], masks[sliding])
        h, x = layer.post_attention(o, h, lm.next_norm_weight(i), fusion)
    return lm.logits(lm.final_norm(h, x))


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
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    cfg = model.config.text
    as_list = isinstance(input_ids, (list, tuple))
    prompts = as_prompt_list(input_ids)
    mm = as_prompt_list(mm_token_type_ids) if mm_token_type_ids is not None else None
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=model.device)
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    lens = [int(p.numel()) for p in prompts]
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
