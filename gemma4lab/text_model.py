"""The Gemma 4 text decoder over packed token rows ``[num_tokens, hidden]``.

Each decoder layer is split at attention into ``pre_attention`` (input norm, q/k/v projections, per-head norms,
RoPE) and ``post_attention`` (output projection through the MoE epilogue). The full forward is the loop
``piece → attention → piece → ... → piece``, and the piecewise CUDA-graph runner captures exactly these pieces, so
the eager model and the graphed one run the same Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import PackedBatch, causal_attention, flex_attention, flex_block_mask, sdpa_attention
from .config import TextConfig
from .fusion import Fusion
from .layers import MLP, Experts, RMSNorm, Router, apply_rope, rms_norm, rope_cos_sin, rope_inv_freq

# Below this many tokens per prompt, plain causal SDPA beats FlexAttention's fixed costs (gemma4lab bench-attention).
CAUSAL_SDPA_MAX_TOKENS = 1024


class Attention(nn.Module):
    """Projections and per-head norms of one attention layer; the attention itself is the model's job."""

    def __init__(self, cfg: TextConfig, layer: int) -> None:
        super().__init__()
        self.sliding = cfg.is_sliding(layer)
        self.head_dim = cfg.layer_head_dim(layer)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.layer_kv_heads(layer)
        self.k_eq_v = cfg.layer_k_eq_v(layer)
        self.eps = cfg.rms_norm_eps
        h, d = cfg.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = None if self.k_eq_v else nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor, fused: bool) -> tuple[Tensor, Tensor, Tensor]:
        n, d = x.shape[0], self.head_dim
        q, k = self.q_proj(x), self.k_proj(x)
        # K-as-V: the *raw* K projection is V, taken before k_norm and RoPE.
        v = self.v_proj(x) if self.v_proj is not None else (k.clone() if fused else k)
        if fused:
            from .kernels import gemma_qkv_norm_rope_

            gemma_qkv_norm_rope_(q, k, v, self.q_norm.weight, self.k_norm.weight, cos, sin, eps=self.eps)
            return q.view(n, -1, d), k.view(n, -1, d), v.view(n, -1, d)
        q = apply_rope(self.q_norm(q.view(n, -1, d)), cos, sin)
        k2 = apply_rope(self.k_norm(k.view(n, -1, d)), cos, sin)
        v = rms_norm(v.view(n, -1, d), None, self.eps)
        return q, k2, v


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.moe = cfg.enable_moe_block
        self.eps = cfg.rms_norm_eps
        hs = cfg.hidden_size
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(hs, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(hs, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hs, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(hs, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(hs, cfg.rms_norm_eps)
        self.register_buffer("layer_scalar", torch.ones(1))
        if self.moe:
            self.router = Router(cfg)
            self.experts = Experts(cfg)
            self.post_feedforward_layernorm_1 = RMSNorm(hs, cfg.rms_norm_eps)
            self.post_feedforward_layernorm_2 = RMSNorm(hs, cfg.rms_norm_eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(hs, cfg.rms_norm_eps)

    def pre_attention(
        self, h: Tensor, x: Tensor | None, cos: Tensor, sin: Tensor, fusion: Fusion
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` is this layer's normed input when the previous layer's epilogue already computed it."""
        if x is None:
            x = self.input_layernorm(h)
        return self.self_attn.qkv(x, cos, sin, fusion.qkv_norm_rope)

    def post_attention(
        self, o: Tensor, residual: Tensor, next_norm: Tensor | None, fusion: Fusion
    ) -> tuple[Tensor, Tensor | None]:
        """Returns the new residual stream and, with ``fusion.next_norm``, ``rms(stream) · next_norm``."""
        from . import kernels as K

        a = self.self_attn.o_proj(o.reshape(o.shape[0], -1))
        if self.moe and fusion.post_attention:
            h, mlp_in, experts_in, router_in = K.gemma_post_attention_block(
                a, residual, self.post_attention_layernorm.weight, self.pre_feedforward_layernorm.weight,
                self.pre_feedforward_layernorm_2.weight, self.router.scale, eps=self.eps,
            )
        else:
            h = residual + self.post_attention_layernorm(a)
            mlp_in = self.pre_feedforward_layernorm(h)
            if self.moe:
                router_in = self.router.router_input(h)
                experts_in = self.pre_feedforward_layernorm_2(h)
        d = self.mlp(mlp_in, fused_act=fusion.gelu)
        if not self.moe:
            if fusion.epilogue:
                out = K.gemma_rmsnorm_residual_scalar(d, self.post_feedforward_layernorm.weight, h, self.layer_scalar,
                                                      eps=self.eps)
            else:
                out = (h + self.post_feedforward_layernorm(d)) * self.layer_scalar
            return out, (rms_norm(out, next_norm, self.eps) if fusion.next_norm and next_norm is not None else None)

        logits = self.router.proj(router_in)
        if fusion.router:
            weights, idx = K.gemma_router_topk(logits, self.router.per_expert_scale, self.router.top_k)
        else:
            weights, idx = self.router.tail(logits)
        m = self.experts(experts_in, idx, weights, fused_act=fusion.gelu, fused_gemm=fusion.experts)
        w1 = self.post_feedforward_layernorm_1.weight
        w2 = self.post_feedforward_layernorm_2.weight
        w3 = self.post_feedforward_layernorm.weight
        if fusion.next_norm and next_norm is not None:
            return K.gemma_dual_rmsnorm_residual_scalar_next_norm(
                d, w1, m, w2, w3, h, self.layer_scalar, next_norm, eps=self.eps
            )
        if fusion.epilogue:
            return K.gemma_dual_rmsnorm_residual_scalar(d, w1, m, w2, w3, h, self.layer_scalar, eps=self.eps), None
        d1 = self.post_feedforward_layernorm_1(d)
        m2 = self.post_feedforward_layernorm_2(m)
        out = (h + self.post_feedforward_layernorm(d1 + m2)) * self.layer_scalar
        return out, None


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

    def make_context(self, batch: PackedBatch, n_rows: int | None = None, cache: Any = None) -> ForwardContext:
        """Per-forward attention plan: for each layer type, our ``triton`` kernel (the GPU default), ``causal``
        SDPA, ``flex`` (with its block mask), or ``sdpa`` with explicit masks (the CPU reference)."""
        ctx = ForwardContext(batch=batch, cos_sin=self.rope(batch.positions), cache=cache)
        backend = self.backend_for(batch.positions.device)
        longest = max(batch.seq_lens)
        if backend == "triton":
            from .kernels.attention import key_end_for_blocks

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
            from .kernels.attention import gemma_prefill_attention

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
        fusion = self.fusion
        h, x = embeds, None
        for i, layer in enumerate(self.layers):
            cos, sin = ctx.cos_sin[layer.self_attn.sliding]
            q, k, v = layer.pre_attention(h, x, cos, sin, fusion)
            o = self.attend(i, q, k, v, ctx)
            h, x = layer.post_attention(o, h, self.next_norm_weight(i), fusion)
        return self.final_norm(h, x)
