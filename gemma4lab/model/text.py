"""The Gemma 4 text decoder over packed token rows ``[num_tokens, hidden]``: embeddings, the decoder layers (run by
the one layer program of ``gemma4lab.model.decoder``), the final norm and the tied, soft-capped head, plus the
per-forward attention plan (which backend, which masks) that the attention calls between pieces use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemma4lab.attention import PackedBatch, Visibility
from gemma4lab.attention.backends import choose
from gemma4lab.model.config import TextConfig
from gemma4lab.model.decoder import DecoderLayer, Stream, run_decoder
from gemma4lab.model.layers import RMSNorm, few_row_product, rope_cos_sin, rope_inv_freq
from gemma4lab.runtime.fusion import Fusion


@dataclass
class ForwardContext:
    """Per-forward state the attention calls need (built once, shared by all layers): the packed batch, the RoPE
    tables per layer type, the KV cache to fill, and per layer type the backend and its plan of the mask rule."""

    batch: PackedBatch
    cos_sin: dict[bool, tuple[Tensor, Tensor]]  # keyed by ``sliding``
    cache: Any = None  # a KVCache to fill during prefill
    plans: dict[bool, tuple[Any, Any]] = field(default_factory=dict)  # sliding -> (backend, plan)


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
        # √hidden rounded to each weight dtype, as the reference rounds it (53.0 in bf16, not 53.07): Python floats,
        # so the multiply needs no host→device copy (graph capture) and nothing data-dependent (torch.compile).
        self._embed_scales = {dt: torch.tensor(cfg.embed_scale, dtype=dt, device="cpu").item()
                              for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}

    # ---- the pieces between attention calls ---------------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings × √hidden, the scale rounded to the weight dtype first (53.0 in bf16, not 53.07)."""
        if self.placeholder_ids.numel():
            is_placeholder = torch.isin(input_ids, self.placeholder_ids)
            input_ids = torch.where(is_placeholder, torch.full_like(input_ids, self.config.pad_token_id), input_ids)
        return self.embed_tokens(input_ids) * self._embed_scales[self.embed_tokens.weight.dtype]

    def rope(self, positions: Tensor) -> dict[bool, tuple[Tensor, Tensor]]:
        return {True: rope_cos_sin(self.inv_freq_sliding, positions),
                False: rope_cos_sin(self.inv_freq_full, positions)}

    def next_norm_weight(self, i: int) -> Tensor:
        return self.layers[i + 1].input_layernorm.weight if i + 1 < len(self.layers) else self.norm.weight

    def final_norm(self, h: Tensor, x: Tensor | None) -> Tensor:
        return x if x is not None else self.norm(h)

    def logits(self, h: Tensor) -> Tensor:
        """Tied head + soft cap ``30·tanh(logits/30)``, in the activation dtype as the reference does."""
        out = few_row_product(h, [self.embed_tokens.weight]) if self.fusion.dense else None
        if out is None:
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

    def rule(self, sliding: bool) -> Visibility:
        return Visibility.for_layer(self.config, sliding)

    def make_context(self, batch: PackedBatch, n_rows: int | None = None, cache: Any = None,
                     backend: str | None = None, *, with_rope: bool = True) -> ForwardContext:
        """Per-forward attention plan: for each layer type, the backend (``triton``: our kernel, the GPU default;
        ``flex``, which plans plain ``causal`` SDPA for short text prompts; ``sdpa`` with dense masks, the CPU
        reference) and its form of the mask rule for this batch. ``n_rows``: rows including padding (Flex tiles).
        ``with_rope=False`` leaves ``cos_sin`` empty for callers that build the RoPE tables themselves (the PCG
        runner computes them inside its first graph from its static positions): ten launches saved per forward."""
        if batch.chunked and cache is None:
            raise ValueError("a chunk of a prompt (batch.cached > 0) attends to the earlier chunks' keys, which live "
                             "in the KV cache: pass the cache they filled")
        ctx = ForwardContext(batch=batch, cos_sin=self.rope(batch.positions) if with_rope else {}, cache=cache)
        name = backend or self.backend_for(batch.positions.device)
        for sliding in {self.config.is_sliding(i) for i in range(len(self.layers))}:
            rule = self.rule(sliding)
            chosen = choose(name, batch, rule)
            ctx.plans[sliding] = (chosen, chosen.plan(batch, rule, n_rows))
        return ctx

    def attend(self, i: int, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext) -> Tensor:
        """Attention of layer ``i`` over the real tokens only (rows past ``batch.num_tokens`` are padding); a chunk
        of a longer prompt also attends to the earlier chunks' keys, read from the cache before its own are written."""
        n = ctx.batch.num_tokens
        q, k, v = q[:n], k[:n], v[:n]
        keys, values = k, v
        if ctx.cache is not None:
            keys, values = ctx.cache.with_prefix(i, k, v, ctx.batch)
            ctx.cache.fill(i, k, v, ctx.batch)
        backend, plan = ctx.plans[self.layers[i].self_attn.sliding]
        return backend.prefill(q, keys, values, ctx.batch, plan)

    # ---- forward --------------------------------------------------------------------------------------------------
    def forward_embeds(self, embeds: Tensor, ctx: ForwardContext) -> Tensor:
        """Packed decoder forward: [N, hidden] embeddings → [N, hidden] final-normed hidden states."""
        attend = lambda i, q, k, v: self.attend(i, q, k, v, ctx)  # noqa: E731
        return run_decoder(self, Stream(embeds), ctx.cos_sin, attend, self.fusion)
