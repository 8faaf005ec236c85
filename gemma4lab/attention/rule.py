"""Who may see whom: Gemma 4's attention visibility, stated once.

A query at position ``q`` of a prompt sees a key at position ``k`` of the same prompt when

    same prompt  AND  (causal: k <= q  OR  both in the same image)  AND  (sliding layers: k > q - window)

where "the same image" only counts on sliding layers of a vision model (transformers'
``use_bidirectional_attention="vision"``): image soft tokens attend to each other both ways there, causally
elsewhere. The predicates below are small functions of index tensors, composable in the style of FlexAttention's
``mask_mod``; :class:`Visibility` combines them for one layer type. Every backend derives its own form of the rule
from here: the dense masks of the SDPA reference, Flex's block mask, the Triton kernel's per-row key ends (plus its
window), the decode kernels' and the KV cache's view of a ring of slots. ``tests/test_mask_rule.py`` checks every
derived form against :meth:`Visibility.visible` on random packed batches with images straddling the window.

Positions are absolute within a prompt and the rule depends only on their differences, so a *chunk* of a prompt
(chunked prefill: queries at positions ``[s, s + n)`` against the keys cached by the earlier chunks) needs no other
rule: :meth:`Visibility.key_start` says how far back its keys reach, and the derived forms take that ``prefix``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


# ---- the predicates -------------------------------------------------------------------------------------------
def causal(q_pos: Tensor, k_pos: Tensor) -> Tensor:
    return k_pos <= q_pos


def in_window(q_pos: Tensor, k_pos: Tensor, window: int) -> Tensor:
    return k_pos > q_pos - window


def same_image(q_block: Tensor, k_block: Tensor) -> Tensor:
    """Both tokens are soft tokens of one image (block id >= 0; -1 marks text)."""
    return (q_block == k_block) & (q_block >= 0)


def same_prompt(q_doc: Tensor, k_doc: Tensor) -> Tensor:
    return q_doc == k_doc


# ---- one layer type's rule ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Visibility:
    """The rule of one layer type: ``window`` (sliding layers; None on full layers) and whether image blocks are
    bidirectional (``image_blocks``: sliding layers of a vision model)."""

    window: int | None = None
    image_blocks: bool = False

    @classmethod
    def for_layer(cls, cfg, sliding: bool) -> Visibility:
        """The rule of a sliding or full layer of a ``TextConfig``."""
        return cls(window=cfg.sliding_window if sliding else None,
                   image_blocks=sliding and cfg.use_bidirectional_attention == "vision")

    def visible(self, q_pos: Tensor, k_pos: Tensor, q_doc: Tensor | None = None, k_doc: Tensor | None = None,
                q_block: Tensor | None = None, k_block: Tensor | None = None) -> Tensor:
        """True where query (``q_*``) sees key (``k_*``); arguments broadcast. Positions count within a prompt;
        ``*_doc`` say which prompt a token belongs to, ``*_block`` which image (-1: text); None means one prompt /
        no image."""
        ok = causal(q_pos, k_pos)
        if self.image_blocks and q_block is not None and k_block is not None:
            ok = ok | same_image(q_block, k_block)
        if self.window is not None:
            ok = ok & in_window(q_pos, k_pos, self.window)
        if q_doc is not None and k_doc is not None:
            ok = ok & same_prompt(q_doc, k_doc)
        return ok

    # ---- chunks of a prompt ----------------------------------------------------------------------------------
    def key_start(self, start: int) -> int:
        """The first position that queries at ``start`` or later can see: 0, or on a sliding layer ``window - 1``
        back (an image block is held to the window too). A chunk starting at ``start`` needs the keys from here."""
        return 0 if self.window is None else max(0, start - self.window + 1)

    def prefix_lens(self, cached: list[int]) -> list[int]:
        """For chunks that start after ``cached[b]`` earlier tokens: how many of those tokens' keys each still sees
        (the keys a backend gets before the chunk's own, see ``PackedBatch.key_slices``)."""
        return [c - self.key_start(c) for c in cached]

    # ---- derived forms ----------------------------------------------------------------------------------------
    def dense(self, n: int, block_ids: Tensor | None = None, device: torch.device | str = "cpu",
              prefix: int = 0) -> Tensor:
        """Boolean ``[n, prefix + n]`` mask of ``n`` tokens of one prompt (True = attend), the SDPA reference's form.
        With ``prefix``, the queries are the last ``n`` of ``prefix + n`` consecutive keys (a chunk after cached keys,
        which count as text: an image never straddles a chunk boundary, see ``runtime.chunked.chunk_bounds``)."""
        pos = torch.arange(prefix + n, device=device)
        blk = block_ids.to(device) if block_ids is not None else None
        k_blk = None if blk is None else torch.cat([torch.full((prefix,), -1, dtype=blk.dtype, device=device), blk])
        return self.visible(pos[prefix:, None], pos[None, :], q_block=None if blk is None else blk[:, None],
                            k_block=None if blk is None else k_blk[None, :])

    def key_end(self, block_ids: Tensor | None) -> Tensor | None:
        """The Triton kernel's form: for each packed row the exclusive end of its visible keys (the start is the
        prompt's start, raised by the window). Text rows end at ``row + 1`` (causal), image rows on a rule with
        bidirectional images at the end of their image. None when every row is causal. Device ops, no sync."""
        if not self.image_blocks or block_ids is None:
            return None
        n = block_ids.numel()
        rows = torch.arange(n, device=block_ids.device)
        is_img = block_ids >= 0
        bid = block_ids.clamp(min=0).long()
        last = torch.full((n,), -1, dtype=torch.long, device=block_ids.device)
        last = last.scatter_reduce(0, bid[is_img], rows[is_img], reduce="amax")
        return torch.where(is_img, last[bid] + 1, rows + 1).to(torch.int32)

    def slots(self, positions: Tensor, slot_pos: Tensor) -> Tensor:
        """The decode form: which cache slots (holding positions ``slot_pos``, -1 = empty) a new token at
        ``positions`` sees, ``[B, slots]``. Decode never sees an image block ahead of it, so causality holds."""
        p = positions[:, None]
        return (slot_pos >= 0) & self.visible(p, slot_pos)

    def cache_slots(self, positions: Tensor, slot_pos: Tensor | None, n_slots: int) -> Tensor:
        """``slots`` over a KV cache's first B rows: a sliding layer's ring (``slot_pos`` [B', window]) or, when
        ``slot_pos`` is None, a full layer's cache whose slot i holds position i."""
        b = positions.shape[0]
        sp = slot_pos[:b] if slot_pos is not None else torch.arange(n_slots, device=positions.device)[None, :]
        return self.slots(positions, sp)
