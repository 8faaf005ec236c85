"""Attention for Gemma 4 over packed prompts: who may see whom, and the backends that compute it."""

from gemma4lab.attention.backends import (
    causal_attention,
    flex_attention,
    flex_block_mask,
    mask_for_prompt,
    sdpa_attention,
)
from gemma4lab.attention.packed import PackedBatch, image_block_ids

__all__ = ["PackedBatch", "causal_attention", "flex_attention", "flex_block_mask", "image_block_ids",
           "mask_for_prompt", "sdpa_attention"]
