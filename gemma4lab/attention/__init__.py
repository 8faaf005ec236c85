"""Attention for Gemma 4 over packed prompts: who may see whom (``rule``: stated once), and the backends that compute
it, each in its own form of the rule (``backends``)."""

from gemma4lab.attention.backends import (
    BACKENDS,
    causal_attention,
    choose,
    flex_attention,
    flex_block_mask,
    mask_for_prompt,
    sdpa_attention,
)
from gemma4lab.attention.packed import PackedBatch, image_block_ids
from gemma4lab.attention.rule import Visibility

__all__ = ["BACKENDS", "PackedBatch", "Visibility", "causal_attention", "choose", "flex_attention",
           "flex_block_mask", "image_block_ids", "mask_for_prompt", "sdpa_attention"]
