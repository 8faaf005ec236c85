"""Attention over packed token rows: several prompts of different lengths in one ``[num_tokens, heads, dim]`` batch.

Gemma 4 needs three things most attention kernels lack at once: head dim 512 on full layers (no FlashAttention
kernel exists for it), a sliding window of 1024 keys, and bidirectional attention inside each image on sliding
layers only. Every backend computes the visibility rule of ``gemma4lab.attention.rule`` in its own form and offers
one interface: ``plan(batch, rule, n_rows)`` once per forward and layer type, then ``prefill(q, k, v, batch, plan)``
per layer (and ``decode(...)`` for one new token against the KV cache, where the backend has one). For a chunk of a
longer prompt (``batch.cached``: chunked prefill) ``k``/``v`` hold, per prompt, the cached keys the rule still lets
it see and then its own (``PackedBatch.key_slices``), so ``prefill`` gets more keys than queries:

* ``"triton"`` (:class:`TritonBackend`): our FlashAttention-style kernels (``gemma4lab.kernels.prefill_attention``
  and ``decode_attention``); the rule becomes ``cu_seqlens``, one key end per row and the window. The GPU default.
* ``"sdpa"`` (:class:`SdpaBackend`): one ``scaled_dot_product_attention`` per prompt with the rule's dense mask.
  Simple and exact; the reference on CPU.
* ``"flex"`` (:class:`FlexBackend`): one FlexAttention call for the whole pack, the rule as a ``mask_mod`` over
  positions, prompt ids and image-block ids, so masked-out tiles are skipped. For short text prompts, where the rule
  *is* plain causal attention, it plans ``"causal"`` (:class:`CausalBackend`: per-prompt SDPA with
  ``is_causal=True``), which beats FlexAttention's fixed costs there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gemma4lab.attention.packed import PackedBatch
from gemma4lab.attention.rule import Visibility

# Below this many tokens per prompt, plain causal SDPA beats FlexAttention's fixed costs (gemma4lab bench-attention).
CAUSAL_SDPA_MAX_TOKENS = 1024


def mask_for_prompt(n: int, sliding: bool, window: int, block_ids: Tensor | None, device) -> Tensor:
    """Boolean [n, n] mask of one prompt (True = attend): the rule's dense form for a full or sliding layer."""
    return Visibility(window=window if sliding else None, image_blocks=sliding).dense(n, block_ids, device)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, **kw) -> Tensor:
    """[n, H, D] rows → SDPA over heads (scale 1.0: Gemma 4 normalises q and k instead)."""
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=1.0,
                                       enable_gqa=q.shape[1] != k.shape[1], **kw)
    return o.transpose(0, 1)


class SdpaBackend:
    """Per-prompt SDPA with the rule's dense mask: the exact reference."""

    name = "sdpa"

    def plan(self, batch: PackedBatch, rule: Visibility, n_rows: int | None = None) -> list[tuple[slice, Tensor]]:
        """Per prompt: its rows in the keys and the rule's dense mask over them."""
        dev = batch.positions.device
        prefix = rule.prefix_lens(batch.cached)
        return [(keys, rule.dense(sl.stop - sl.start, batch.block_ids[sl] if batch.block_ids is not None else None,
                                  dev, prefix=p))
                for sl, keys, p in zip(batch.prompt_slices(), batch.key_slices(prefix), prefix)]

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, batch: PackedBatch, plan: list[tuple[slice, Tensor]]) -> Tensor:
        out = torch.empty_like(q)
        for sl, (keys, mask) in zip(batch.prompt_slices(), plan):
            out[sl] = _sdpa(q[sl], k[keys], v[keys], attn_mask=mask)
        return out

    def decode(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor, slot_pos: Tensor | None,
               rule: Visibility) -> Tensor:
        """q: [B, Hq, D]; the first B rows of the cache [B', Hkv, S, D] → [B, Hq, D]."""
        b = q.shape[0]
        mask = rule.cache_slots(positions, slot_pos, k_cache.shape[2])[:, None, None, :]
        o = F.scaled_dot_product_attention(q[:, :, None, :], k_cache[:b], v_cache[:b], attn_mask=mask, scale=1.0,
                                           enable_gqa=q.shape[1] != k_cache.shape[1])
        return o[:, :, 0, :]


class CausalBackend:
    """Per-prompt ``is_causal`` SDPA, no mask tensor: exact whenever the rule is plain causal attention for the
    batch (no image on a bidirectional layer, no prompt longer than the window)."""

    name = "causal"

    def plan(self, batch: PackedBatch, rule: Visibility, n_rows: int | None = None) -> None:
        if not self.covers(batch, rule):
            raise ValueError("the causal backend only serves batches whose rule is plain causal attention")
        return None

    @staticmethod
    def covers(batch: PackedBatch, rule: Visibility) -> bool:
        """No image on a bidirectional layer, no prompt past the window, no cached keys (``is_causal`` aligns the
        mask top-left, a chunk's queries are its keys' last rows)."""
        images = rule.image_blocks and batch.block_ids is not None
        return not images and not batch.chunked and (rule.window is None or max(batch.seq_lens) <= rule.window)

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, batch: PackedBatch, plan: None) -> Tensor:
        # K/V heads repeated explicitly on CUDA: with enable_gqa=True PyTorch 2.11 routes to the fp32 math kernel
        # (seen in the profile: triu_tril + fp32 GEMMs), while the repeat costs one small copy.
        if q.is_cuda and q.shape[1] != k.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = torch.empty_like(q)
        for sl in batch.prompt_slices():
            out[sl] = _sdpa(q[sl], k[sl], v[sl], is_causal=True)
        return out


# ---- FlexAttention (GPU) ------------------------------------------------------------------------------------------
_flex_compiled = None


def _raise_recompile_limit(n: int = 64) -> None:
    """Each prompt length is a new shape for FlexAttention; past dynamo's default limit (8) it would silently fall
    back to an O(N²) eager path (seen: 1 s per forward at 5773 tokens). Dynamic shapes after the first recompile
    plus a higher limit keep it compiled."""
    import torch._dynamo.config as dc

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, name) and getattr(dc, name) < n:
            setattr(dc, name, n)


def _flex():
    global _flex_compiled
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _raise_recompile_limit()
        _flex_compiled = torch.compile(flex_attention, dynamic=None)
    return _flex_compiled


class FlexBackend:
    """One FlexAttention call per layer for the whole pack; the rule as a ``mask_mod`` over the query rows and the
    key rows (the same rows, unless chunks bring cached keys); padding query rows see only their own key row. Head
    512 needs small tiles to fit shared memory."""

    name = "flex"

    def plan(self, batch: PackedBatch, rule: Visibility, n_rows: int | None = None):
        from torch.nn.attention.flex_attention import create_block_mask

        n_keys = batch.num_tokens + sum(rule.prefix_lens(batch.cached))
        rows = -(-(n_rows or batch.num_tokens) // 128) * 128  # FlexAttention works on 128-row tiles
        cols = max(rows, -(-n_keys // 128) * 128)
        _raise_recompile_limit()
        return create_block_mask(self.mask_mod(batch, rule, rows, cols), None, None, rows, cols,
                                 device=batch.positions.device, _compile=True)

    @staticmethod
    def mask_mod(batch: PackedBatch, rule: Visibility, rows: int, cols: int):
        """The rule as a ``mask_mod`` over ``rows`` query rows and ``cols`` key rows (both padded): per prompt its
        cached keys (text, at the positions before it), then its own rows. A padding query row sees its own key row,
        so its softmax stays finite."""
        n, dev = batch.num_tokens, batch.positions.device

        def padded(t: Tensor, size: int, fill: int) -> Tensor:
            out = torch.full((size,), fill, dtype=t.dtype, device=dev)
            out[: t.numel()] = t
            return out

        blocks = (batch.block_ids if batch.block_ids is not None else torch.full((n,), -1, device=dev)).long()
        doc, pos, blk = padded(batch.doc_ids, rows, -1), padded(batch.positions, rows, 0), padded(blocks, rows, -1)
        k_doc, k_pos, k_blk = doc, pos, blk
        chunked = batch.chunked
        if chunked:
            k_doc, k_pos, k_blk = [], [], []
            prefix = rule.prefix_lens(batch.cached)
            for b, (sl, p, c) in enumerate(zip(batch.prompt_slices(), prefix, batch.cached)):
                k_doc.append(torch.full((p + sl.stop - sl.start,), b, dtype=doc.dtype, device=dev))
                k_pos += [torch.arange(c - p, c, device=dev), batch.positions[sl]]
                k_blk += [torch.full((p,), -1, dtype=torch.long, device=dev), blocks[sl]]
            k_doc, k_pos, k_blk = (padded(torch.cat(t), cols, f) for t, f in ((k_doc, -1), (k_pos, 0), (k_blk, -1)))

        def mask_mod(b, h, qi, ki):
            # without cached keys a real row's own key row is visible anyway; with them, key rows are shifted
            own = ((qi == ki) & (qi >= n)) if chunked else (qi == ki)
            return rule.visible(pos[qi], k_pos[ki], doc[qi], k_doc[ki], blk[qi], k_blk[ki]) | own

        return mask_mod

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, batch: PackedBatch, plan) -> Tensor:
        n = q.shape[0]
        pad = -(-n // 128) * 128 - n
        pad_k = plan.seq_lengths[1] - k.shape[0]  # the key rows the block mask covers
        if pad:
            q = F.pad(q, (0, 0, 0, 0, 0, pad))
        if pad_k:
            k, v = (F.pad(t, (0, 0, 0, 0, 0, pad_k)) for t in (k, v))
        opts = {"BLOCK_M": 32, "BLOCK_N": 32, "num_stages": 1} if q.shape[-1] > 256 else None
        o = _flex()(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=plan,
                    scale=1.0, enable_gqa=q.shape[1] != k.shape[1], kernel_options=opts)
        return o[0].transpose(0, 1)[:n]


class TritonBackend:
    """Our kernels: the rule as ``cu_seqlens`` (prompt bounds), one key end per row and the window (prefill), and
    the positions a ring slot holds (decode)."""

    name = "triton"

    def plan(self, batch: PackedBatch, rule: Visibility, n_rows: int | None = None) -> dict[str, Any]:
        dev = batch.positions.device
        cu = torch.tensor([0, *batch.seq_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)
        key_end, cu_k = rule.key_end(batch.block_ids), None
        if batch.chunked:  # each prompt's keys: its cached prefix, then its rows; key_end counts in key rows
            keys = batch.key_slices(rule.prefix_lens(batch.cached))
            cu_k = torch.tensor([0] + [sl.stop for sl in keys], dtype=torch.int32).to(dev)
            if key_end is not None:  # query row r of prompt b is key row r + (its keys' end - its rows' end)
                shift = [sl.stop - rows.stop for sl, rows in zip(keys, batch.prompt_slices())]
                key_end = key_end + torch.tensor(shift, dtype=torch.int32).repeat_interleave(
                    torch.tensor(batch.seq_lens)).to(dev)
        return {"cu_seqlens": cu, "cu_seqlens_k": cu_k, "key_end": key_end, "window": rule.window,
                "max_seqlen": max(batch.seq_lens)}

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, batch: PackedBatch, plan: dict[str, Any]) -> Tensor:
        from gemma4lab.kernels import gemma_prefill_attention

        return gemma_prefill_attention(q, k, v, plan["cu_seqlens"], plan["max_seqlen"], window=plan["window"],
                                       key_end=plan["key_end"], cu_seqlens_k=plan["cu_seqlens_k"])

    def decode(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor, slot_pos: Tensor | None,
               rule: Visibility) -> Tensor:
        from gemma4lab.kernels import gemma_decode_attention

        return gemma_decode_attention(q, k_cache, v_cache, positions, slot_pos=slot_pos, window=rule.window)


BACKENDS = {b.name: b for b in (TritonBackend(), SdpaBackend(), FlexBackend(), CausalBackend())}


def choose(name: str, batch: PackedBatch, rule: Visibility):
    """The backend that serves ``name`` for this batch and layer type: ``flex`` hands short plain-causal batches
    to ``causal``."""
    if name not in ("triton", "sdpa", "flex", "causal"):
        raise ValueError(f"unknown attention backend {name!r}")
    if name == "flex" and CausalBackend.covers(batch, rule) and max(batch.seq_lens) <= CAUSAL_SDPA_MAX_TOKENS:
        return BACKENDS["causal"]
    return BACKENDS[name]


# ---- functional forms (benchmarks and tests) ----------------------------------------------------------------------
def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, batch: PackedBatch, sliding: bool, window: int) -> Tensor:
    """q: [N, Hq, D], k/v: [N, Hkv, D] → [N, Hq, D] with the rule's dense masks (the reference)."""
    rule = Visibility(window=window if sliding else None, image_blocks=sliding)
    sdpa = BACKENDS["sdpa"]
    return sdpa.prefill(q, k, v, batch, sdpa.plan(batch, rule))


def causal_attention(q: Tensor, k: Tensor, v: Tensor, batch: PackedBatch) -> Tensor:
    return CausalBackend().prefill(q, k, v, batch, None)


def flex_block_mask(batch: PackedBatch, sliding: bool, window: int, n_rows: int):
    return FlexBackend().plan(batch, Visibility(window=window if sliding else None, image_blocks=sliding), n_rows)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask, head_dim: int | None = None) -> Tensor:
    """q: [N, Hq, D] (N a multiple of 128, or padded here) → [N, Hq, D] with one FlexAttention call."""
    return FlexBackend().prefill(q, k, v, None, block_mask)
