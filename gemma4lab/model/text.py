"""The Gemma 4 text decoder over packed token rows ``[num_tokens, hidden]``: embeddings, the decoder layers (run by
the one layer program of ``gemma4lab.model.decoder``), the final norm and the tied, soft-capped head, plus the
per-forward attention plan (which backend, which masks) that the attention calls between pieces use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemma4lab.attention import PackedBatch, causal_attention, flex_attention, flex_block_mask, sdpa_attention
from gemma4lab.model.config import TextConfig
from gemma4lab.model.decoder import DecoderLayer, Stream, run_decoder
from gemma4lab.model.layers import RMSNorm, rope_cos_sin, rope_inv_freq
from gemma4lab.runtime.fusion import Fusion

# Below this many tokens per prompt, plain causal SDPA beats FlexAttention's fixed costs (gemma4lab bench-attention).
CAUSAL_SDPA_MAX_TOKENS = 1024


@dataclass
class ForwardContext:
    """Per-forward state the attention calls need (built once, shared by all layers)."""

    batch: PackedBatch
    cos_sin: dict[bool, tuple[Tensor, Tensor]]  # keyed by ``sliding``
    block_masks: dict[bool, Any] = field(default_factory=dict)
    cache: Any = None  # a generation.KVCache to fill during prefill
    modes: dict[bool, str] = field(default_factory=dict)  # attention backend per layer type (keyed by ``sliding``)
    cu_seqlens: Tensor | None = None  # int32 [B + 1] on the device, for the Triton kernel
    key_end: dict[bool, Tensor | None] = field(default_factory=dict)  # per layer type: image-block key ends


class TextModel(nn.Module):
    """Embeddings, decoder layers, final norm and the tied, soft-capped head."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq_sliding", torch.empty(0), persistent=False)
        self.register_buffer("inv_freq_full", torch.empty(0), persistent=False)
        # Multimodal placeholder ids (set by the multimodal model) embed as padding, as in the reference.
        self.register_buffer("placeholder_ids", torch.empty(0, dtype=torch.long), persistent=False)
        self.init_buffers()
        self.fusion = Fusion()
        self.attn_backend = "auto"

    def init_buffers(self, placeholder_ids: list[int] | None = None) -> None:
        """(Re)compute the buffers no checkpoint stores: fp32 RoPE frequencies and the placeholder ids.

        Called at construction and again after ``to_empty`` (which leaves them uninitialised) by the loader.
        """
        cfg, dev = self.config, self.inv_freq_full.device
        self.inv_freq_sliding = rope_inv_freq(cfg.head_dim, cfg.rope_theta_sliding, "default").to(dev)
        self.inv_freq_full = rope_inv_freq(
            cfg.global_head_dim, cfg.rope_theta_full, cfg.rope_type_full, cfg.partial_rotary_factor_full
        ).to(dev)
        if placeholder_ids is not None:
            self.placeholder_ids = torch.tensor(placeholder_ids, dtype=torch.long, device=dev)

    # ---- the pieces between attention calls ---------------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings × √hidden, the scale rounded to the weight dtype first (53.0 in bf16, not 53.07)."""
        if self.placeholder_ids.numel():
            is_placeholder = torch.isin(input_ids, self.placeholder_ids)
            input_ids = torch.where(is_placeholder, torch.full_like(input_ids, self.config.pad_token_id), input_ids)
        # A Python float holding the dtype-rounded scale: no host→device copy (CUDA-graph capture forbids one).
        scale = torch.tensor(self.config.embed_scale, dtype=self.embed_tokens.weight.dtype).item()
        return self.embed_tokens(input_ids) * scale

    def rope(self, positions: Tensor) -> dict[bool, tuple[Tensor, Tensor]]:
        return {True: rope_cos_sin(self.inv_freq_sliding, positions),
                False: rope_cos_sin(self.inv_freq_full, positions)}

    def next_norm_weight(self, i: int) -> Tensor:
        return self.layers[i + 1].input_layernorm.weight if i + 1 < len(self.layers) else self.norm.weight

    def final_norm(self, h: Tensor, x: Tensor | None) -> Tensor:
        return x if x is not None else self.norm(h)

    def logits(self, h: Tensor) -> Tensor:
        """Tied head + soft cap ``30·tanh(logits/30)``, in the activation dtype as the reference does."""
        out = F.linear(h, self.embed_tokens.weight)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out

    # ---- attention ------------------------------------------------------------------------------------------------
    def backend_for(self, device: torch.device) -> str:
        if self.attn_backend != "auto":
            return self.attn_backend
        return "triton" if device.type == "cuda" else "sdpa"

    def make_context(self, batch: PackedBatch, n_rows: int | None = None, cache: Any = None,
                     backend: str | None = None) -> ForwardContext:
        """Per-forward attention plan: for each layer type, our ``triton`` kernel (the GPU default), ``causal``
        SDPA, ``flex`` (with its block mask), or ``sdpa`` with explicit masks (the CPU reference)."""
        ctx = ForwardContext(batch=batch, cos_sin=self.rope(batch.positions), cache=cache)
        backend = backend or self.backend_for(batch.positions.device)
        longest = max(batch.seq_lens)
        if backend == "triton":
            from gemma4lab.kernels.attention import key_end_for_blocks

            dev = batch.positions.device
            ctx.cu_seqlens = torch.tensor([0, *batch.seq_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)
            ctx.key_end = {True: key_end_for_blocks(batch.block_ids) if batch.block_ids is not None else None,
                           False: None}
            ctx.modes = {True: "triton", False: "triton"}
            return ctx
        for sliding in {self.config.is_sliding(i) for i in range(len(self.layers))}:
            mask_is_causal = batch.block_ids is None or not sliding
            if sliding:
                mask_is_causal = mask_is_causal and longest <= self.config.sliding_window
            if backend == "flex" and mask_is_causal and longest <= CAUSAL_SDPA_MAX_TOKENS:
                ctx.modes[sliding] = "causal"
            elif backend == "flex":
                rows = -(-(n_rows or batch.num_tokens) // 128) * 128  # FlexAttention works on 128-row tiles
                ctx.block_masks[sliding] = flex_block_mask(batch, sliding, self.config.sliding_window, rows)
                ctx.modes[sliding] = "flex"
            else:
                ctx.modes[sliding] = backend
        return ctx

    def attend(self, i: int, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext) -> Tensor:
        """Attention of layer ``i`` over the real tokens only (rows past ``batch.num_tokens`` are padding)."""
        attn = self.layers[i].self_attn
        n = ctx.batch.num_tokens
        q, k, v = q[:n], k[:n], v[:n]
        if ctx.cache is not None:
            ctx.cache.fill(i, k, v, ctx.batch)
        mode = ctx.modes.get(attn.sliding, "sdpa")
        if mode == "triton":
            from gemma4lab.kernels.attention import gemma_prefill_attention

            window = self.config.sliding_window if attn.sliding else None
            return gemma_prefill_attention(q, k, v, ctx.cu_seqlens, max(ctx.batch.seq_lens), window=window,
                                           key_end=ctx.key_end[attn.sliding])
        if mode == "causal":
            return causal_attention(q, k, v, ctx.batch)
        if mode == "flex":
            rows = -(-n // 128) * 128
            pad = rows - n
            if pad:
                q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
            return flex_attention(q, k, v, ctx.block_masks[attn.sliding], attn.head_dim)[:n]
        return sdpa_attention(q, k, v, ctx.batch, attn.sliding, self.config.sliding_window)

    # ---- forward --------------------------------------------------------------------------------------------------
    def forward_embeds(self, embeds: Tensor, ctx: ForwardContext) -> Tensor:
        """Packed decoder forward: [N, hidden] embeddings → [N, hidden] final-normed hidden states."""
        attend = lambda i, q, k, v: self.attend(i, q, k, v, ctx)  # noqa: E731
        return run_decoder(self, Stream(embeds), ctx.cos_sin, attend, self.fusion)
