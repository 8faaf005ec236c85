"""Attention over packed token rows: several prompts of different lengths in one ``[num_tokens, heads, dim]`` batch.

Gemma 4 needs three things most attention kernels lack at once: head dim 512 on full layers (no FlashAttention
kernel exists for it), a sliding window of 1024 keys, and bidirectional attention inside each image on sliding
layers only. Four backends compute the same mask:

* ``"triton"``: our FlashAttention-style kernel (``gemma4lab.kernels.attention``), one launch for the whole pack,
  the GPU default. Its CPU twin runs under Triton's interpreter in the tests.

* ``"sdpa"``: one ``scaled_dot_product_attention`` call per prompt with an explicit boolean mask. Simple and
  exact; the reference on CPU.
* ``"flex"``: one FlexAttention call for the whole pack, the mask expressed as a ``mask_mod`` over document ids,
  positions and image-block ids, so masked-out tiles are skipped. The GPU default for long or image prompts.
* ``"causal"``: per-prompt ``scaled_dot_product_attention(is_causal=True)`` with no mask tensor at all. Exact
  whenever a prompt has no image and is no longer than the window (then the sliding mask *is* the causal mask).
  At short prompts it beats FlexAttention, whose block-mask construction and call overhead cost milliseconds
  per forward on an H200 (measured by ``gemma4lab bench-attention``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gemma4lab.attention.packed import PackedBatch


def mask_for_prompt(n: int, sliding: bool, window: int, block_ids: Tensor | None, device) -> Tensor:
    """Boolean [n, n] mask, True = attend, exactly as the reference builds it.

    full layers: causal. sliding layers: ``(causal OR same image block) AND key > query - window``.
    """
    q = torch.arange(n, device=device)[:, None]
    k = torch.arange(n, device=device)[None, :]
    allowed = k <= q
    if sliding:
        if block_ids is not None:
            same = (block_ids[:, None] == block_ids[None, :]) & (block_ids[:, None] >= 0)
            allowed = allowed | same
        allowed = allowed & (k > q - window)
    return allowed


def causal_attention(q: Tensor, k: Tensor, v: Tensor, batch: PackedBatch) -> Tensor:
    """Per-prompt causal SDPA without a mask tensor (FlashAttention for head 256 on Hopper).

    K/V heads are repeated explicitly: with ``enable_gqa=True`` PyTorch 2.11 routes to the fp32 math kernel
    (seen in the profile: ``triu_tril`` + fp32 GEMMs), while the repeat costs one small copy.
    """
    if q.is_cuda and q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if len(batch.seq_lens) == 1:
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                           scale=1.0, enable_gqa=q.shape[1] != k.shape[1])
        return o.transpose(0, 1)
    out = torch.empty_like(q)
    start = 0
    for n in batch.seq_lens:
        sl = slice(start, start + n)
        o = F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1),
                                           is_causal=True, scale=1.0, enable_gqa=q.shape[1] != k.shape[1])
        out[sl] = o.transpose(0, 1)
        start += n
    return out


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, batch: PackedBatch, sliding: bool, window: int) -> Tensor:
    """q: [N, Hq, D], k/v: [N, Hkv, D] → [N, Hq, D]. Scaling 1.0 (Gemma 4 norms q and k instead)."""
    out = torch.empty_like(q)
    start = 0
    for n in batch.seq_lens:
        sl = slice(start, start + n)
        blocks = batch.block_ids[sl] if (sliding and batch.block_ids is not None) else None
        mask = mask_for_prompt(n, sliding, window, blocks, q.device)
        o = F.scaled_dot_product_attention(
            q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1),
            attn_mask=mask, scale=1.0, enable_gqa=q.shape[1] != k.shape[1],
        )
        out[sl] = o.transpose(0, 1)
        start += n
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


def flex_block_mask(batch: PackedBatch, sliding: bool, window: int, n_rows: int):
    """One block mask for the whole pack; rows past the real tokens (padding) see only themselves."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = batch.num_tokens
    dev = batch.positions.device
    doc = torch.full((n_rows,), -1, dtype=torch.int32, device=dev)
    doc[:n] = batch.doc_ids
    pos = torch.zeros(n_rows, dtype=torch.int64, device=dev)
    pos[:n] = batch.positions
    blk = torch.full((n_rows,), -1, dtype=torch.int64, device=dev)
    if batch.block_ids is not None and sliding:
        blk[:n] = batch.block_ids

    def mask_mod(b, h, qi, ki):
        same_doc = doc[qi] == doc[ki]
        causal = ki <= qi
        if sliding:
            img = (blk[qi] == blk[ki]) & (blk[qi] >= 0)
            return same_doc & (causal | img) & (pos[ki] > pos[qi] - window) | (qi == ki)
        return same_doc & causal | (qi == ki)

    _raise_recompile_limit()
    return create_block_mask(mask_mod, None, None, n_rows, n_rows, device=dev, _compile=True)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask, head_dim: int) -> Tensor:
    """q: [N, Hq, D] → [N, Hq, D] with one FlexAttention call. Head 512 needs small tiles to fit shared memory."""
    opts = {"BLOCK_M": 32, "BLOCK_N": 32, "num_stages": 1} if head_dim > 256 else None
    o = _flex()(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        block_mask=block_mask, scale=1.0, enable_gqa=q.shape[1] != k.shape[1], kernel_options=opts,
    )
    return o[0].transpose(0, 1)
