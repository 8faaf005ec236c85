"""The static KV cache: every buffer allocated once for ``batch_size × max_len``; decode writes into it by index with
device-side positions, which is what lets a decode step be captured in a CUDA graph. Sliding layers keep a ring of
``sliding_window`` slots, not the whole history. A chunked prefill fills it chunk by chunk: each chunk first reads
the keys of the earlier chunks that it still sees (:meth:`KVCache.with_prefix`), then writes its own
(:meth:`KVCache.fill`), so decode afterwards finds the same cache an unchunked prefill leaves.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from gemma4lab.attention import PackedBatch
from gemma4lab.model.config import TextConfig


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
    def check_fits(self, batch: PackedBatch) -> None:
        """A clear error before anything is written: every prompt (with its cached tokens) must fit."""
        if len(batch.seq_lens) > self.batch_size:
            raise ValueError(f"{len(batch.seq_lens)} prompts do not fit a KV cache of batch size {self.batch_size}")
        for b, (c, n) in enumerate(zip(batch.cached, batch.seq_lens)):
            if c + n > self.max_len:
                raise ValueError(f"prompt {b} reaches {c + n} tokens but the KV cache holds {self.max_len}")

    def fill(self, layer: int, k: Tensor, v: Tensor, batch: PackedBatch) -> None:
        """Write a packed prefill's K/V ([N, Hkv, D]) for each prompt, slot b = prompt b, at positions
        ``batch.cached[b]`` on (a chunk continues its prompt; a prompt that starts at 0 clears its ring first)."""
        self.check_fits(batch)
        sliding = self.cfg.is_sliding(layer)
        for b, (n, rows, c) in enumerate(zip(batch.seq_lens, batch.prompt_slices(), batch.cached)):
            kb, vb = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            end = c + n
            if sliding:
                keep = min(n, self.window)
                pos = torch.arange(end - keep, end, device=k.device)
                self.k[layer][b][:, pos % self.window] = kb[:, n - keep:]
                self.v[layer][b][:, pos % self.window] = vb[:, n - keep:]
                if layer == self.first_sliding:
                    if c == 0:
                        self.slot_pos[b].fill_(-1)
                    self.slot_pos[b, pos % self.window] = pos
            else:
                self.k[layer][b, :, c:end] = kb
                self.v[layer][b, :, c:end] = vb

    def with_prefix(self, layer: int, k: Tensor, v: Tensor, batch: PackedBatch) -> tuple[Tensor, Tensor]:
        """The keys and values a chunk attends to, laid out as ``batch.key_slices``: per prompt the cached ones that
        its layer's rule still lets it see (from ``Visibility.key_start``), then its own ``k``/``v`` rows. Call it
        before :meth:`fill`: on a sliding layer the chunk's own keys overwrite ring slots its first queries see."""
        if not batch.chunked:
            return k, v
        self.check_fits(batch)
        from gemma4lab.attention.rule import Visibility

        sliding = self.cfg.is_sliding(layer)
        rule = Visibility.for_layer(self.cfg, sliding)
        ks, vs = [], []
        for b, (rows, c) in enumerate(zip(batch.prompt_slices(), batch.cached)):
            pos = torch.arange(rule.key_start(c), c, device=k.device)
            slots = pos % self.window if sliding else pos
            ks += [self.k[layer][b][:, slots].transpose(0, 1), k[rows]]
            vs += [self.v[layer][b][:, slots].transpose(0, 1), v[rows]]
        return torch.cat(ks), torch.cat(vs)

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
        """[B, 1, 1, slots] True where a cached key is visible to the new token (the mask rule's decode form)."""
        from gemma4lab.attention.rule import Visibility

        rule = Visibility(window=self.cfg.sliding_window if sliding else None)
        return rule.cache_slots(positions, self.slot_pos if sliding else None, self.max_len)[:, None, None, :]
