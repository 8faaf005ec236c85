"""The Gemma 4 vision tower and its projector into the text model, op for op as transformers rounds them.

This is a new encoder (not SigLIP). For N images that the processor padded to a common P patches:

    patches [N, P, 3·p²] ─ patch_embedder ─▶ [N, P, D]       linear patch embedding + (x, y) position tables
        ─ encoder ─▶ [N, P, D]                               bidirectional layers, 2-D axial RoPE, padding masked
        ─ pool ─▶ [N, P/k², D]                               average each k×k block of patches (k = 3)
        ─ strip padding, ·√D, standardise ─▶ [T, D]          T = total soft tokens of all images
    MultimodalEmbedder: [T, D] ─ RMS-normalise, Linear ─▶ [T, text_hidden]

Module and parameter names follow ``Gemma4VisionModel`` / ``Gemma4MultimodalEmbedder`` so that a checkpoint's
``model.vision_tower.*`` and ``model.embed_vision.*`` tensors load by name.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemma4lab.model.config import Gemma4Config, VisionConfig
from gemma4lab.model.layers import RMSNorm, gelu_tanh, project, rms_norm, rotate_half
from gemma4lab.model.packing import PackedProjections
from gemma4lab.runtime.fusion import Fusion


class _Linear(nn.Module):
    """A bias-free Linear stored as ``.linear``: the checkpoint names it ``q_proj.linear.weight`` because the
    reference wraps it in a clippable linear. Clipping exists only in the E-series towers; config rejects it."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def _project(x: Tensor, wrapped: tuple[_Linear, ...], packed: bool) -> tuple[Tensor, ...]:
    """``layers.project`` on the linears inside the checkpoint's wrappers, unless a wrapper carries a hook (which
    must see its module run) or is not a plain ``_Linear``."""
    plain = all(type(w) is _Linear and not (w._forward_hooks or w._forward_pre_hooks) for w in wrapped)
    if packed and plain:
        return project(x, tuple(w.linear for w in wrapped), True)
    return tuple(w(x) for w in wrapped)


# ---- 2-D axial RoPE ---------------------------------------------------------------------------------------------


def axial_inv_freq(head_dim: int, theta: float) -> Tensor:
    """``head_dim // 4`` frequencies, shared by the x and y axes (each axis rotates half of the head)."""
    spatial_dim = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, spatial_dim, 2, dtype=torch.float) / spatial_dim))


def axial_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [N, P, head_dim] laid out ``[x, x, y, y]``: head dims [0:D/2] rotate with the patch column and
    [D/2:D] with the row. Computed in fp32 and cast to the activations' dtype, as the reference does."""
    freqs = positions.float()[..., None] * inv_freq.float()  # [N, P, 2, head_dim // 4]
    fx, fy = freqs[:, :, 0], freqs[:, :, 1]
    emb = torch.cat([fx, fx, fy, fy], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_axial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [N, P, heads, D]. Standard ``rotate_half`` RoPE applied separately to each half of the head."""
    half = x.shape[-1] // 2
    rotated = torch.cat([rotate_half(x[..., :half]), rotate_half(x[..., half:])], dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


# ---- layers -----------------------------------------------------------------------------------------------------


class PatchEmbedder(nn.Module):
    """Pixels in [0, 1] → ``input_proj(2·(p − 0.5))`` plus learned column and row embeddings. Padding patches get
    no position embedding (their position ids are -1)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.input_proj = nn.Linear(3 * cfg.patch_size**2, cfg.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.ones(2, cfg.position_embedding_size, cfg.hidden_size))

    def forward(self, pixel_values: Tensor, positions: Tensor, padding: Tensor) -> Tensor:
        x = (2 * (pixel_values - 0.5)).to(self.input_proj.weight.dtype)
        pos = positions.clamp(min=0)
        table = self.position_embedding_table
        pos_emb = F.embedding(pos[..., 0], table[0]) + F.embedding(pos[..., 1], table[1])
        pos_emb = torch.where(padding[..., None], 0.0, pos_emb)
        return self.input_proj(x) + pos_emb


class VisionAttention(PackedProjections):
    """Multi-head attention with q/k RMSNorm (weighted), v RMSNorm (unweighted), 2-D RoPE and scale 1.0: the
    norms already fix the logits' magnitude, so there is no 1/√d."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d, h, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.head_dim, self.eps = hd, cfg.rms_norm_eps
        self.q_proj = _Linear(d, h * hd)
        self.k_proj = _Linear(d, h * hd)
        self.v_proj = _Linear(d, h * hd)
        self.o_proj = _Linear(h * hd, d)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.pack()

    def packed_groups(self) -> list[list[nn.Linear]]:
        return [[self.q_proj.linear, self.k_proj.linear, self.v_proj.linear]]

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: EncoderMask | Tensor,
                fused_norm_rope: bool = False, packed: bool = False) -> Tensor:
        """x: [N, P, D]; key_mask: the encoder's :class:`EncoderMask` (:func:`encoder_mask`), or for SDPA a mask
        tensor [N, 1, 1, P]: the additive bias of :func:`key_padding_bias`, or a boolean mask, True where a patch is
        real and may be attended to. A varlen ``EncoderMask`` needs each image's real patches first in its row block
        (the encoder sorts them so: ``EncoderMask.sort``).
        ``fused_norm_rope``: the q/k/v norms and the 2-D RoPE in one kernel (``qkv_norm_rope_(axial=True)``).
        ``packed``: q, k and v as one GEMM over their packed weights (``layers.project``)."""
        n, p, _ = x.shape
        shape = (n, p, -1, self.head_dim)
        q, k, v = _project(x, (self.q_proj, self.k_proj, self.v_proj), packed)
        if fused_norm_rope:
            from gemma4lab.kernels import gemma_qkv_norm_rope_

            rows = lambda t: t.view(n * p, -1)  # noqa: E731
            gemma_qkv_norm_rope_(rows(q), rows(k), rows(v), self.q_norm.weight, self.k_norm.weight, rows(cos),
                                 rows(sin), self.eps, axial=True)
            q, k, v = q.view(shape), k.view(shape), v.view(shape)
        else:
            q = apply_axial_rope(self.q_norm(q.view(shape)), cos, sin)
            k = apply_axial_rope(self.k_norm(k.view(shape)), cos, sin)
            v = rms_norm(v.view(shape), None, self.eps)
        if isinstance(key_mask, EncoderMask) and key_mask.varlen:
            rows = (n * p, -1, self.head_dim)  # views: the projections' rows are already [N·P, H·hd]
            m = key_mask
            out = varlen_attention()(q.reshape(rows), k.reshape(rows), v.reshape(rows), m.cu_seqlens, m.cu_seqlens,
                                     m.max_len, m.max_len, scale=1.0)
            return self.o_proj(out.view(n, p, -1))
        bias = key_mask.bias if isinstance(key_mask, EncoderMask) else key_mask
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=1.0
        )
        return self.o_proj(out.transpose(1, 2).reshape(n, p, -1))


class VisionMLP(PackedProjections):
    """Gated GELU(tanh) MLP; gate and up stored packed (one GEMM with ``packed``)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.gate_proj = _Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = _Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = _Linear(cfg.intermediate_size, cfg.hidden_size)
        self.pack()

    def packed_groups(self) -> list[list[nn.Linear]]:
        return [[self.gate_proj.linear, self.up_proj.linear]]

    def forward(self, x: Tensor, fused_act: bool = False, packed: bool = False) -> Tensor:
        gate, up = _project(x, (self.gate_proj, self.up_proj), packed)
        if fused_act:
            from gemma4lab.kernels import gemma_gelu_tanh_and_mul

            i = gate.shape[-1]
            return self.down_proj(gemma_gelu_tanh_and_mul(gate.reshape(-1, i), up.reshape(-1, i)).view_as(gate))
        return self.down_proj(gelu_tanh(gate) * up)


class VisionEncoderLayer(nn.Module):
    """The same norm sandwich as a text layer (norm before and after each sub-block), without a layer scalar."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.self_attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: EncoderMask | Tensor,
                fusion: Fusion | None = None, x_in: Tensor | None = None,
                next_norm: RMSNorm | None = None) -> tuple[Tensor, Tensor | None]:
        """One encoder layer: returns the residual stream and, when the fused epilogue computed it, the next layer's
        input (``next_norm`` applied to the stream; ``x_in`` is this layer's, from the previous epilogue).

        Fused (``fusion``, the decoder's switches): ``dense`` q/k/v and gate/up as one GEMM each over their packed
        weights; ``qkv_norm_rope`` the q/k/v norms and the 2-D RoPE in one kernel;
        ``post_attention`` the residual, the post-attention norm and the pre-MLP norm in one pass
        (``norm_residual_norm``); ``gelu`` the gated GELU; ``epilogue`` the residual and the post-MLP norm
        (with ``next_norm``: the next layer's input norm in the same pass)."""
        f = fusion or Fusion()
        if x_in is None:
            x_in = self.input_layernorm(x)
        a = self.self_attn(x_in, cos, sin, key_mask, fused_norm_rope=f.qkv_norm_rope, packed=f.dense)
        if f.post_attention:
            h, mlp_in = _norm_sandwich(a, x, self.post_attention_layernorm, self.pre_feedforward_layernorm)
        else:
            h = x + self.post_attention_layernorm(a)
            mlp_in = self.pre_feedforward_layernorm(h)
        m = self.mlp(mlp_in, fused_act=f.gelu, packed=f.dense)
        if f.epilogue and f.next_norm and next_norm is not None:
            return _norm_sandwich(m, h, self.post_feedforward_layernorm, next_norm)
        if f.epilogue:
            from gemma4lab.kernels import gemma_rmsnorm_residual_scalar

            one = torch.ones(1, dtype=torch.float32, device=m.device)
            out = gemma_rmsnorm_residual_scalar(m.reshape(-1, m.shape[-1]), self.post_feedforward_layernorm.weight,
                                                h.reshape(-1, h.shape[-1]), one, self.post_feedforward_layernorm.eps)
            return out.view_as(h), None
        return h + self.post_feedforward_layernorm(m), None


def _norm_sandwich(a: Tensor, residual: Tensor, post: RMSNorm, nxt: RMSNorm) -> tuple[Tensor, Tensor]:
    """``h = residual + post(a)`` and ``nxt(h)`` in one kernel (``norm_residual_norm``), on [N, P, D] tensors."""
    from gemma4lab.kernels import gemma_norm_residual_norm

    d = a.shape[-1]
    h, h_next = gemma_norm_residual_norm(a.reshape(-1, d), residual.reshape(-1, d), post.weight, nxt.weight, post.eps)
    return h.view_as(a), h_next.view_as(a)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        #: the decoder's switches, set with them (``Gemma4ForConditionalGeneration.set_fusion``)
        self.fusion = Fusion()

    def inv_freq(self, device: torch.device) -> Tensor:
        """The RoPE frequencies, computed rather than kept as a buffer: a buffer would be garbage after a meta-device
        build + ``to_empty`` and rounded to bf16 by ``.to(bfloat16)``; the reference's stay fp32. Computed on the
        CPU, as the reference computes them, so that they are bit-identical on any device (the copy to the device
        is why a CUDA graph of the tower takes them as an input: ``TowerGraphs``)."""
        return axial_inv_freq(self.head_dim, self.rope_theta).to(device)

    def forward(self, x: Tensor, positions: Tensor, padding: Tensor, inv_freq: Tensor | None = None) -> Tensor:
        """x: [N, P, D] → [N, P, D], rows in the order given. The attention mask is built once here for every layer
        (:func:`encoder_mask`); on the varlen path the rows run sorted so that each image's real patches come
        first (every other op of a layer is row-wise) and are put back in their order at the end."""
        if inv_freq is None:
            inv_freq = self.inv_freq(positions.device)
        key_mask = encoder_mask(padding, x.dtype, self.head_dim)
        if key_mask.varlen:
            x, positions = key_mask.sort(x), key_mask.sort(positions)
        cos, sin = axial_cos_sin(inv_freq, positions, x.dtype)
        x_in = None
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else None
            x, x_in = layer(x, cos, sin, key_mask, self.fusion, x_in, nxt)
        return key_mask.unsort(x) if key_mask.varlen else x


# ---- the encoder's attention mask: one rule, two layouts --------------------------------------------------------


class EncoderMask(NamedTuple):
    """How every encoder layer's attention keeps the images apart and the padding out, built once per forward by
    :func:`encoder_mask`, which picks the path. Exactly one layout is set:

    * **SDPA** (CPU, fp32/fp64, a torch or GPU without flash varlen): ``bias``, the additive key-padding bias
      [N, 1, 1, P] of :func:`key_padding_bias`. The path transformers' parity (fp32, <= 1e-5) is measured on.
    * **varlen** (CUDA, bf16/fp16): ``cu_seqlens`` [2N+1] int32 and ``max_len`` (= P) for flash varlen attention on
      the flattened rows [N·P, heads, head_dim], with the row permutation that makes it valid for any padding
      placement: ``order`` [N, P, 1], the row each sorted slot takes, and ``slot`` [N, P, 1], its inverse. Image
      i's real rows, sorted first, are one sequence and its padding rows another, so no pair of a real and a
      padded patch (nor of two images) is ever computed, and every row gets a finite output.
    """

    bias: Tensor | None = None
    cu_seqlens: Tensor | None = None
    max_len: int = 0
    order: Tensor | None = None
    slot: Tensor | None = None

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens is not None

    def sort(self, t: Tensor) -> Tensor:
        """[N, P, ...] rows → each image's real rows first, then its padding (both in their own order)."""
        return t.gather(1, self.order.expand(-1, -1, t.shape[-1]))

    def unsort(self, t: Tensor) -> Tensor:
        """The inverse of :meth:`sort`: rows back in the order the caller gave them."""
        return t.gather(1, self.slot.expand(-1, -1, t.shape[-1]))


@functools.cache
def varlen_attention() -> Callable[..., Tensor] | None:
    """Flash varlen attention, ``f(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale) -> out``, where this torch
    has ``torch.nn.attention.varlen.varlen_attn`` with a ``scale`` argument (torch >= 2.10; the encoder's scale is
    1.0, not 1/√d), else None. Looked up once.

    It calls the op ``varlen_attn`` runs, ``aten._flash_attention_forward``, with the arguments ``varlen_attn``
    passes it (dropout 0, not causal, the same output bit for bit): ``varlen_attn``'s custom-op and autograd
    wrapper cost 55 µs of host time a call against 19 µs for the op (H200, torch 2.11), and the eager one-image
    26B-A4B tower took 23.6 ms through it against 20.3 ms through the op (20.6 ms with SDPA + bias). Inside a CUDA
    graph neither costs anything."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if "scale" not in inspect.signature(varlen_attn).parameters:
        return None

    def flash_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seq_q: Tensor, cu_seq_k: Tensor, max_q: int, max_k: int, *,
                     scale: float) -> Tensor:
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, False, False,
                                                       scale=scale)[0]

    return flash_varlen


def varlen_available(device: torch.device) -> bool:
    """Flash varlen attention can run on ``device``: torch has it (:func:`varlen_attention`) and the device is a
    CUDA GPU of compute capability 8.0 or later (flash attention's floor). A host query, no device sync."""
    return (device.type == "cuda" and varlen_attention() is not None
            and torch.cuda.get_device_capability(device) >= (8, 0))


def use_varlen(device_type: str, dtype: torch.dtype, head_dim: int, available: bool, images: int = 2) -> bool:
    """The path rule, a pure function: flash varlen attention for two or more images on CUDA in bf16/fp16 (flash's
    dtypes) at a head dim flash takes (a multiple of 8, at most 256; 72 in the 26B-A4B tower) where ``available``;
    SDPA + bias everywhere else, which keeps fp32 on any device bit-for-bit what it was (transformers parity relies
    on it). One image takes the bias too: there varlen measured no faster (below) and costs launches — its layout
    (~20 small ones a forward) and one more a layer (the tower measured 15.7 kernels a layer with it at one image,
    against 13.8 without: the issue's budget is 15).

    Why varlen on the GPU: SDPA with a mask cannot take its flash backend, and the bias path computes every
    (query, key) pair of the padded [P, P] block only to zero the padded ones; varlen computes the real × real
    pairs alone, with no mask tensor to read, and its layout is built once per forward (one attention launch per
    layer either way). How much that buys depends on the kernel SDPA takes with a mask. Measured on an H200 with
    torch 2.11 (the 26B-A4B tower, head dim 72, P = 2520, 2295 real patches an image, profiled eager): SDPA + bias
    dispatched to cuDNN's sm90 flash kernel, 4.51 ms for one image and 15.58 ms for four over the 27 layers; flash
    varlen (head dim 72 runs flash's 96 kernel) 4.55 ms and 13.14 ms — the same for one image (wave quantisation
    eats the ~17 % of pairs skipped), 16 % less for four. Where SDPA with a mask falls to the memory-efficient
    kernel (no cuDNN attention), flash is the larger gain."""
    return (available and images >= 2 and device_type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and head_dim % 8 == 0 and head_dim <= 256)


def encoder_mask(padding: Tensor, dtype: torch.dtype, head_dim: int, *, device_type: str | None = None,
                 available: bool | None = None) -> EncoderMask:
    """The encoder's attention layout for ``padding`` [N, P] (True on padded patches) and activations of ``dtype``:
    varlen where :func:`use_varlen` says so (``device_type`` / ``available`` default to ``padding``'s device),
    else the SDPA bias. Either is built once per forward, on the device, without reading anything back: CUDA-graph
    safe (``TowerGraphs`` captures it)."""
    if device_type is None:
        device_type = padding.device.type
    if available is None:
        available = varlen_available(padding.device)
    if use_varlen(device_type, dtype, head_dim, available, images=padding.shape[0]):
        return varlen_layout(padding)
    return EncoderMask(bias=key_padding_bias(padding, dtype))


def varlen_layout(padding: Tensor) -> EncoderMask:
    """The varlen layout of ``padding`` [N, P], from device ops only (no host read: graph-safe).

    With r_i = image i's real patches, the sorted rows hold image i's real patches at [i·P, i·P + r_i) and its
    padding at [i·P + r_i, (i+1)·P): ``cu_seqlens`` = [0, r_0, P, P + r_1, 2P, ...] (2N+1 entries; an image without
    padding has an empty second sequence, which flash skips). ``max_len`` is P, known from the shape.

    The processor pads at the end of each image's row block, so there the permutation is the identity; the tower
    itself takes any placement (patch embedding, RoPE and pooling go by position, the bias masks keys wherever
    they are), so the sort makes varlen exact for any placement instead of silently wrong for another one.
    Cost: some twenty small launches once per forward (the bias took two) and three row gathers of the
    activations; with them the one-image tower measured 15.7 kernels a layer against 13.8 on the bias path (which
    is why one image keeps the bias: :func:`use_varlen`)."""
    n, p = padding.shape
    real = ~padding
    count = real.sum(dim=1, keepdim=True)  # [N, 1] real patches per image
    slot = torch.where(real, real.cumsum(dim=1) - 1, count + padding.cumsum(dim=1) - 1)  # [N, P] row → sorted slot
    rows = torch.arange(p, device=padding.device).expand(n, p)
    order = torch.empty_like(slot).scatter_(1, slot, rows)  # sorted slot → row (slot is a permutation of each row)
    start = torch.arange(n, device=padding.device)[:, None] * p
    ends = torch.cat([start + count, start + p], dim=1).flatten()  # [2N]: end of real rows, end of image, ...
    cu_seqlens = F.pad(ends, (1, 0)).to(torch.int32)
    return EncoderMask(cu_seqlens=cu_seqlens, max_len=p, order=order[..., None], slot=slot[..., None])


def key_padding_bias(padding: Tensor, dtype: torch.dtype) -> Tensor:
    """The encoder's attention mask as SDPA uses it: an additive bias ``[N, 1, 1, P]``, 0 on real patches and -inf
    on padding, in the activations' dtype — the tensor SDPA builds from a boolean mask (``where(mask, 0, -inf)``).
    Built once per forward instead of once per layer, and stored with its last dimension padded to a multiple of
    16 (the view keeps ``P`` columns), because the memory-efficient CUDA kernel otherwise copies an unaligned mask
    into an aligned one in every layer: two launches a layer saved, the same numbers."""
    n, p = padding.shape
    bias = torch.zeros(n, 1, 1, -(-p // 16) * 16, dtype=dtype, device=padding.device)[..., :p]
    return bias.masked_fill_(padding[:, None, None, :], float("-inf"))


# ---- the tower --------------------------------------------------------------------------------------------------


class VisionTower(nn.Module):
    """``Gemma4VisionModel``: patches and their (x, y) positions → soft tokens [T, vision_hidden].

    Sits at ``model.vision_tower``. The output has padding removed and images concatenated in order, each image
    contributing its soft tokens in row-major order of its pooled grid.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.head_dim % 4:
            raise ValueError(f"vision head_dim={cfg.head_dim} must be a multiple of 4 (RoPE rotates pairs per axis)")
        self.cfg = cfg
        self.patch_embedder = PatchEmbedder(cfg)
        self.encoder = VisionEncoder(cfg)
        if cfg.standardize:
            self.register_buffer("std_bias", torch.zeros(cfg.hidden_size))
            self.register_buffer("std_scale", torch.ones(cfg.hidden_size))

    def forward(self, pixel_values: Tensor, image_position_ids: Tensor) -> Tensor:
        """pixel_values [N, P, 3·p²] in [0, 1]; image_position_ids [N, P, 2] as (x=col, y=row), (-1, -1) on padding.
        Returns [T, vision_hidden] in the tower's weight dtype."""
        self.check_shapes(pixel_values, image_position_ids)
        return self.finish(*self.pooled(pixel_values, image_position_ids))

    def check_shapes(self, pixel_values: Tensor, image_position_ids: Tensor) -> None:
        k = self.cfg.pooling_kernel_size
        n, p = image_position_ids.shape[:2]
        if pixel_values.shape[:2] != (n, p) or p % (k * k):
            raise ValueError(
                f"pixel_values {tuple(pixel_values.shape)} and image_position_ids {tuple(image_position_ids.shape)} "
                f"must share [N, P] with P a multiple of {k * k} (the pooling block)"
            )

    def pooled(self, pixel_values: Tensor, image_position_ids: Tensor,
               inv_freq: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Everything of the forward whose shapes depend only on [N, P] (embedding, encoder, pooling): the pooled
        fp32 features [N, P/k², D] and the mask of slots that hold a soft token. No host synchronisation, so a CUDA
        graph can hold it (``gemma4lab.runtime.vision_graphs``); ``inv_freq`` on the device (see
        ``VisionEncoder.inv_freq``)."""
        padding = (image_position_ids == -1).all(dim=-1)
        x = self.patch_embedder(pixel_values, image_position_ids, padding)
        x = self.encoder(x, image_position_ids, padding, inv_freq)
        return self._pool(x, image_position_ids, padding)

    def finish(self, pooled: Tensor, valid: Tensor) -> Tensor:
        """The pooled slots that hold a soft token, images concatenated, standardised, in the weights' dtype: [T, D].
        Its length is data (``pooled[valid]`` reads the mask on the host), so it runs after a graph, not in it."""
        h = pooled[valid]
        if self.cfg.standardize:
            # fp32: the bias subtraction cancels large values.
            h = (h - self.std_bias.float()) * self.std_scale.float()
        return h.to(self.patch_embedder.input_proj.weight.dtype)

    def _pool(self, x: Tensor, positions: Tensor, padding: Tensor) -> tuple[Tensor, Tensor]:
        """Average each k×k block of patches into one soft token, by position. Returns fp32 pooled features
        scaled by √D ([N, P/k², D]) and a mask of the pooled slots that received a patch.

        Slot of patch (x, y) = ``x//k + (W/k)·(y//k)`` with W the image's width in patches, so an image's soft tokens
        are the first (H/k)·(W/k) slots in row-major order. Padding patches are zeroed and sent to slot 0, which
        every image has, so they add nothing. The average is a matmul with a one-hot matrix, as in the reference:
        deterministic on GPU (a scatter-add is not) and the same fp32 rounding. The mean is rounded to the working
        dtype before the fp32 √D scaling, again as the reference does.
        """
        k = self.cfg.pooling_kernel_size
        x = x.masked_fill(padding[..., None], 0.0)
        pos = positions.clamp(min=0)
        width = pos[..., 0].amax(dim=-1, keepdim=True) + 1
        slot = pos[..., 0] // k + (width // k) * (pos[..., 1] // k)  # [N, P]
        weights = F.one_hot(slot.long(), x.shape[1] // (k * k)).float() / (k * k)  # [N, P, slots]
        pooled = (weights.transpose(1, 2) @ x.float()).to(x.dtype)
        valid = (weights != 0).any(dim=1)
        return pooled.float() * self.cfg.hidden_size**0.5, valid

    def soft_tokens_per_image(self, image_position_ids: Tensor) -> list[int]:
        """Soft tokens each image contributes (its real patches / k²); syncs with the host."""
        k = self.cfg.pooling_kernel_size
        return ((image_position_ids != -1).all(dim=-1).sum(dim=-1) // (k * k)).tolist()


class MultimodalEmbedder(nn.Module):
    """``Gemma4MultimodalEmbedder`` (at ``model.embed_vision``): soft tokens → text embedding space.

    ``Linear(rms_norm(x))`` with an unweighted norm. The text model's √hidden embedding scale is *not* applied to
    these features: they replace the placeholder embeddings as they are.
    """

    def __init__(self, vision_hidden: int, text_hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.embedding_projection = nn.Linear(vision_hidden, text_hidden, bias=False)

    @classmethod
    def from_config(cls, cfg: Gemma4Config) -> MultimodalEmbedder:
        if cfg.vision is None:
            raise ValueError("config has no vision tower, so there is no vision embedder")
        return cls(cfg.vision.hidden_size, cfg.text.hidden_size, cfg.vision.rms_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding_projection(rms_norm(x, None, self.eps))


def image_features(
    tower: VisionTower, embedder: MultimodalEmbedder, pixel_values: Tensor, image_position_ids: Tensor
) -> list[Tensor]:
    """``Gemma4Model.get_image_features``: one [soft_tokens_i, text_hidden] tensor per image."""
    feats = embedder(tower(pixel_values, image_position_ids))
    return list(torch.split(feats, tower.soft_tokens_per_image(image_position_ids)))
