"""One Gemma 4 decoder layer, and the one program that runs the decoder: pieces between attention calls.

A layer is two halves around its attention call:

* ``pre_attention``: input norm (unless the previous layer's epilogue already produced it), q/k/v projections,
  per-head norms and RoPE;
* ``post_attention``: output projection, residual, the dense MLP and the MoE block, the epilogue (and, fused, the
  next layer's input norm).

The decoder is then ``piece 0 → attention 0 → piece 1 → ... → attention L-1 → piece L`` where piece ``j`` is layer
``j-1``'s ``post_attention`` followed by layer ``j``'s ``pre_attention`` (piece ``L`` ends with the final norm).
:func:`run_decoder` is the only loop over layers in the package: the eager prefill, the piecewise CUDA graphs
(which capture the pieces and replay them), the decode step, the one-layer benchmarks and the per-layer accuracy
study all call it, or :func:`run_layer` for one layer, with their own :class:`Stream` and ``attend``. What the pieces
compute depends on the model's settings; :func:`program_key` names them, so a captured graph knows what it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gemma4lab.model.config import TextConfig
from gemma4lab.model.layers import MLP, Experts, RMSNorm, Router, apply_rope, project, rms_norm
from gemma4lab.model.packing import PackedProjections
from gemma4lab.runtime.fusion import Fusion

_BRANCH_STREAMS: dict[tuple[torch.device, int], torch.cuda.Stream] = {}


def branch_stream(t: Tensor) -> torch.cuda.Stream | None:
    """The second stream that the dense MLP runs on beside the router and the experts (``Fusion.branches``), for the
    stream the caller runs on: one per (device, current stream), created on first use. Per current stream, so that
    two threads on two streams never share one: a block the dense MLP allocated and one thread freed could otherwise
    be handed to the other thread's branch before the first thread's epilogue has read it. None on the CPU and while
    torch.compile traces (its graph has one stream)."""
    if not t.is_cuda or torch.compiler.is_compiling():
        return None
    key = (t.device, torch.cuda.current_stream(t.device).stream_id)
    if key not in _BRANCH_STREAMS:
        _BRANCH_STREAMS[key] = torch.cuda.Stream(device=t.device)
    return _BRANCH_STREAMS[key]


class Attention(PackedProjections):
    """Projections and per-head norms of one attention layer; the attention itself is the model's job. q, k and v
    (q and k where K is V) are stored packed: one GEMM at prefill (``layers.project``)."""

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
        self.pack()

    def packed_groups(self) -> list[list[nn.Linear]]:
        return [[self.q_proj, self.k_proj] + ([] if self.v_proj is None else [self.v_proj])]

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor, fused: bool, dense: bool = False
            ) -> tuple[Tensor, Tensor, Tensor]:
        """``dense``: at few rows the projections run as one ``dense_gemm`` launch (``layers.project``)."""
        n, d = x.shape[0], self.head_dim
        projs = (self.q_proj, self.k_proj) + (() if self.v_proj is None else (self.v_proj,))
        q, k, *v = project(x, projs, dense)
        # K-as-V: the *raw* K projection is V, taken before k_norm and RoPE.
        v = v[0] if v else (k.clone() if fused else k)
        if fused:
            from gemma4lab.kernels import gemma_qkv_norm_rope_

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
        return self.self_attn.qkv(x, cos, sin, fusion.qkv_norm_rope, fusion.dense)

    def post_attention(
        self, o: Tensor, residual: Tensor, next_norm: Tensor | None, fusion: Fusion
    ) -> tuple[Tensor, Tensor | None]:
        """Returns the new residual stream and, with ``fusion.next_norm``, ``rms(stream) · next_norm``."""
        from gemma4lab import kernels as K

        a = project(o.reshape(o.shape[0], -1), (self.self_attn.o_proj,), fusion.dense)[0]
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
        side = branch_stream(mlp_in) if fusion.branches and self.moe else None
        if side is None:
            d = self.mlp(mlp_in, fused_act=fusion.gelu, dense=fusion.dense)
        else:  # fork: the dense MLP streams its weights while the router and the experts stream theirs
            main = torch.cuda.current_stream(mlp_in.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                d = self.mlp(mlp_in, fused_act=fusion.gelu, dense=fusion.dense)
        if not self.moe:
            if fusion.epilogue:
                out = K.gemma_rmsnorm_residual_scalar(d, self.post_feedforward_layernorm.weight, h, self.layer_scalar,
                                                      eps=self.eps)
            else:
                out = (h + self.post_feedforward_layernorm(d)) * self.layer_scalar
            return out, (rms_norm(out, next_norm, self.eps) if fusion.next_norm and next_norm is not None else None)

        logits = self.router.logits(router_in)
        if fusion.router:
            weights, idx = K.gemma_router_topk(logits, self.router.per_expert_scale, self.router.top_k)
        else:
            weights, idx = self.router.tail(logits)
        m = self.experts(experts_in, idx, weights, fused_act=fusion.gelu, fused_gemm=fusion.experts)
        if side is not None:  # join. No record_stream: mlp_in and d are freed on this stream after the join, and
            main.wait_stream(side)  # the side stream (this stream's own) reuses their blocks only after a later fork
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


# ---- the program ------------------------------------------------------------------------------------------------
class Stream:
    """What crosses a piece boundary: the residual stream ``h``, the next layer's normed input ``x`` (when the
    fused epilogue computed it), the attention inputs ``q, k, v`` and output ``o`` of the current layer, and the final
    ``hidden`` states. This class rebinds (eager); the CUDA-graph runner's subclass copies into static buffers, so
    that captured pieces read and write the same memory on every replay."""

    def __init__(self, h: Tensor | None = None) -> None:
        self.h, self.x, self.hidden = h, None, None
        self.q = self.k = self.v = self.o = None

    def set_residual(self, h: Tensor, x: Tensor | None) -> None:
        self.h, self.x = h, x

    def set_qkv(self, sliding: bool, q: Tensor, k: Tensor, v: Tensor) -> None:
        self.q, self.k, self.v = q, k, v

    def qkv(self, sliding: bool) -> tuple[Tensor, Tensor, Tensor]:
        return self.q, self.k, self.v

    def set_o(self, sliding: bool, o: Tensor) -> None:
        self.o = o

    def attn_out(self, sliding: bool) -> Tensor:
        return self.o

    def set_hidden(self, hidden: Tensor) -> None:
        self.hidden = hidden


#: ``attend(layer, q, k, v) -> o``: the attention of one layer, supplied by whoever runs the program (prefill over
#: packed prompts, decode against the KV cache, ...).
Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]


def pre(lm, i: int, s: Stream, cos_sin: dict[bool, tuple[Tensor, Tensor]], fusion: Fusion,
        layer: DecoderLayer | None = None) -> None:
    """Layer ``i``'s first half: ``s.h`` (and ``s.x``) → ``s.q, s.k, s.v``. ``layer`` stands in for
    ``lm.layers[i]`` (e.g. an fp32 copy of it, for a per-layer accuracy study)."""
    layer = layer or lm.layers[i]
    sliding = layer.self_attn.sliding
    cos, sin = cos_sin[sliding]
    s.set_qkv(sliding, *layer.pre_attention(s.h, s.x, cos, sin, fusion))


def post(lm, i: int, s: Stream, fusion: Fusion, layer: DecoderLayer | None = None) -> None:
    """Layer ``i``'s second half: ``s.o`` and ``s.h`` → the new ``s.h`` (and ``s.x`` for layer ``i + 1``)."""
    layer = layer or lm.layers[i]
    s.set_residual(*layer.post_attention(s.attn_out(layer.self_attn.sliding), s.h, lm.next_norm_weight(i), fusion))


def piece(lm, j: int, s: Stream, cos_sin: dict[bool, tuple[Tensor, Tensor]], fusion: Fusion) -> None:
    """Piece ``j`` of the decoder: layer ``j-1``'s second half (``j > 0``), then layer ``j``'s first half, or the
    final norm after the last layer."""
    if j > 0:
        post(lm, j - 1, s, fusion)
    if j < len(lm.layers):
        pre(lm, j, s, cos_sin, fusion)
    else:
        s.set_hidden(lm.final_norm(s.h, s.x))


def run_decoder(lm, s: Stream, cos_sin: dict[bool, tuple[Tensor, Tensor]], attend: Attend, fusion: Fusion,
                pieces: Sequence[Callable[[], None]] | None = None) -> Tensor:
    """The decoder: ``piece 0 → attend(0) → piece 1 → ... → piece L``; returns the final-normed hidden states.

    ``pieces`` replaces the Python pieces by callables that do the same work (replays of captured CUDA graphs over
    static buffers); the attention calls between them always run here, on the stream's current ``q, k, v``."""
    n_layers = len(lm.layers)
    for j in range(n_layers + 1):
        if pieces is None:
            piece(lm, j, s, cos_sin, fusion)
        else:
            pieces[j]()
        if j < n_layers:
            sliding = lm.layers[j].self_attn.sliding
            s.set_o(sliding, attend(j, *s.qkv(sliding)))
    return s.hidden


def run_layer(lm, i: int, s: Stream, cos_sin: dict[bool, tuple[Tensor, Tensor]], attend: Attend,
              fusion: Fusion, layer: DecoderLayer | None = None) -> Tensor:
    """One layer alone (benchmarks, per-layer accuracy): ``s.h`` → the layer's output residual stream. ``layer``
    stands in for ``lm.layers[i]`` (same shapes, e.g. another dtype)."""
    pre(lm, i, s, cos_sin, fusion, layer)
    sliding = lm.layers[i].self_attn.sliding
    s.set_o(sliding, attend(i, *s.qkv(sliding)))
    post(lm, i, s, fusion, layer)
    return s.h


def program_key(lm) -> tuple[Any, ...]:
    """Everything that changes *which* kernels the pieces launch: fused kernels, attention backend, dtype, device,
    the routing bias and the experts' format (``quantize_experts`` replaces their weight tensors). A captured graph
    holds one program; a runner compares this key before replaying."""
    dev = lm.embed_tokens.weight.device
    biased = tuple(i for i, layer in enumerate(lm.layers) if getattr(layer, "router", None) is not None
                   and layer.router.logit_bias is not None)
    experts = tuple((str(ex.gate_up_proj.dtype), bool(getattr(ex, "act_fp8", False)))
                    for ex in (getattr(layer, "experts", None) for layer in lm.layers)
                    if ex is not None and hasattr(ex, "gate_up_proj"))
    return (lm.fusion, lm.backend_for(dev), lm.embed_tokens.weight.dtype, str(dev), biased, experts)
