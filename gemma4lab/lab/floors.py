"""What a prefill or a decode step must cost at least on a card: the floors the benchmarks divide their timings by.

Two floors, both from rates measured in the same run (copy bandwidth, bf16 matmul rate):

* the **single floor** (:func:`floors`' ``floor_ms``): all the weight bytes a prefill must read over the copy
  bandwidth, or all its matmul FLOPs over the matmul rate, whichever is larger. One roof for the whole forward, as
  if the weights could stream while the math ran.
* the **op-level floor** (``op_floor_ms``): for every op of the model's math, ``max(bytes it must move / copy
  bandwidth, its FLOPs / matmul rate)``, summed over the forward. An op cannot overlap its memory-bound neighbour's
  traffic with its own math, so this is the limit of running this model op by op; it is never below the single floor.

The ops come from the model's math (:func:`prefill_ops`), not from any implementation's kernel list: each reads its
inputs once and writes its outputs once; the row ops between two matmuls (norms, residuals, activations, RoPE) are
one op each, as the fullest fusion would run them; expert matmuls read only the experts the routing hit; attention
does 4·head_dim FLOPs per visible query–key pair per head, causal on full layers, window-limited on sliding ones. Every
op carries a family (:data:`FAMILIES`), the same families ``gemma4lab.lab.profiling`` sorts GPU kernels into, so a
profile and its floor compare family by family.

A decode step has its own floor (:func:`decode_floor`): the bytes it must read (the non-expert weights, the distinct
experts its batch touches, the KV cache its attention sees) over the copy bandwidth, with the expected number of
distinct experts under random routing (:func:`expected_experts`) beside the count a run saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gemma4lab.model.config import Gemma4Config, TextConfig

#: kernel and op families, in the order the tables and figures show them. Every dense matmul (the router's
#: projection and the head included) is ``dense_gemm``: a profile cannot tell them apart by kernel name either.
FAMILIES = ("expert_gemm", "dense_gemm", "attention", "routing", "row_kernels", "other")

#: bytes of a token id, an expert id and a routing weight: int32 holds any id, the router's weights are fp32
INDEX_BYTES = 4


@dataclass(frozen=True)
class Op:
    """One op of a prefill: what it must move (``bytes``, of which ``weight_bytes`` are parameters) and compute."""

    name: str
    family: str
    layer: int | None
    bytes: float
    weight_bytes: float
    flops: float

    def floor_ms(self, copy_bw: float, mm_rate: float) -> float:
        """The op alone on the card: its traffic at copy bandwidth or its math at the matmul rate, the larger."""
        return max(self.bytes / copy_bw, self.flops / mm_rate) * 1e3


def visible_pairs(tokens: int, window: int | None) -> int:
    """Query–key pairs one prompt of ``tokens`` text tokens attends: causal, and with a ``window`` each query sees at
    most ``window`` keys (itself included), as ``gemma4lab.attention.rule.Visibility`` says."""
    if window is None or tokens <= window:
        return tokens * (tokens + 1) // 2
    return tokens * window - window * (window - 1) // 2


def _text(cfg: Gemma4Config | TextConfig) -> TextConfig:
    if isinstance(cfg, Gemma4Config):
        return cfg.text
    if isinstance(cfg, TextConfig):
        return cfg
    raise TypeError(f"cfg must be a Gemma4Config or TextConfig, got {type(cfg).__name__}")


def _check_count(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def _check_rate(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v}")
    return float(v)


def _check_hit(t: TextConfig, tokens: int, experts_hit: object) -> float:
    """Experts hit per MoE layer (an average over layers): at least top_k (one token's choice), at most every expert
    or every routed slot."""
    if isinstance(experts_hit, bool) or not isinstance(experts_hit, (int, float)):
        raise TypeError(f"experts_hit must be a number, got {type(experts_hit).__name__}")
    if not t.enable_moe_block:
        if experts_hit != 0:
            raise ValueError(f"experts_hit must be 0 for a model without MoE layers, got {experts_hit}")
        return 0.0
    most = min(t.num_experts, tokens * t.top_k_experts)
    if not t.top_k_experts <= experts_hit <= most:
        raise ValueError(f"experts_hit must lie in [top_k={t.top_k_experts}, {most}] at {tokens} tokens, "
                         f"got {experts_hit}")
    return float(experts_hit)


class _Ops:
    """An op list under construction: sizes in elements of the model dtype (``elem_bytes`` each), ids and fp32
    routing weights in :data:`INDEX_BYTES` each; every input read once, every output written once."""

    def __init__(self, elem_bytes: int) -> None:
        self.elem_bytes, self.ops = elem_bytes, []

    def op(self, name: str, family: str, layer: int | None, *, read: float, write: float, weights: float = 0.0,
           flops: float = 0.0, index: float = 0.0, weight_bytes: float | None = None) -> None:
        """``weight_bytes`` overrides ``weights × elem_bytes`` (weights stored in another format, e.g. FP8)."""
        s = self.elem_bytes
        wb = weights * s if weight_bytes is None else weight_bytes
        self.ops.append(Op(name, family, layer, (read + write) * s + wb + index * INDEX_BYTES, wb, flops))

    def matmul(self, name: str, family: str, layer: int | None, m: int, k: int, n: int) -> None:
        """``[m, k] @ [k, n]``: the activations in and out, the weights once, ``2·m·k·n`` FLOPs."""
        self.op(name, family, layer, read=m * k, write=m * n, weights=k * n, flops=2 * m * k * n)


def prefill_ops(cfg: Gemma4Config | TextConfig, tokens: int, experts_hit: float, elem_bytes: int = 2,
                expert_elem_bytes: int | None = None) -> list[Op]:
    """The ops of one text prefill of a single prompt of ``tokens`` tokens, in order.

    ``experts_hit``: distinct experts that received a token, per MoE layer (``gemma4lab.lab.routing.routing_stats``);
    ``elem_bytes``: the model dtype's element size (2 for bf16); ``expert_elem_bytes``: the expert weights' (1 for
    FP8, whose fp32 per-channel scales are counted too; default: ``elem_bytes``). The last layer runs on every row,
    as a prefill that fills a KV cache does; the head runs on the last token only.
    """
    t, n = _text(cfg), _check_count("tokens", tokens)
    s = _check_count("elem_bytes", elem_bytes)
    fp8 = expert_elem_bytes is not None and expert_elem_bytes != s
    es = _check_count("expert_elem_bytes", expert_elem_bytes) if expert_elem_bytes is not None else s
    hit = _check_hit(t, n, experts_hit)
    h, layers = t.hidden_size, t.num_hidden_layers
    ops = _Ops(s)
    op, matmul = ops.op, ops.matmul

    moe = t.enable_moe_block
    # ids in; the embedding rows (× √hidden) and layer 0's input norm out
    op("embed", "other", None, read=n * h, write=2 * n * h, weights=h, index=n)
    for i in range(layers):
        d, hq, hkv, k_eq_v = t.layer_head_dim(i), t.num_attention_heads, t.layer_kv_heads(i), t.layer_k_eq_v(i)
        proj = (hq + hkv * (1 if k_eq_v else 2)) * d  # K-as-V layers project no V: the raw K is V
        matmul("qkv_proj", "dense_gemm", i, n, h, proj)
        # q/k norms + RoPE, v norm: the raw projections in, normed q, k and v out (K-as-V: v from the raw k)
        op("qkv_norm_rope", "row_kernels", i, read=n * proj, write=n * (hq + 2 * hkv) * d, weights=2 * d)
        op("attention", "attention", i, read=n * (hq + 2 * hkv) * d, write=n * hq * d,
           flops=4 * d * hq * visible_pairs(n, t.sliding_window if t.is_sliding(i) else None))
        matmul("o_proj", "dense_gemm", i, n, hq * d, h)
        # residual + post-attention norm, then the MLP's (and the experts' and the router's) inputs
        streams = 4 if moe else 2
        op("post_attention", "row_kernels", i, read=2 * n * h, write=streams * n * h, weights=streams * h)
        inter = t.intermediate_size
        matmul("mlp_gate_up", "dense_gemm", i, n, h, 2 * inter)
        op("mlp_act", "row_kernels", i, read=2 * n * inter, write=n * inter)
        matmul("mlp_down", "dense_gemm", i, n, inter, h)
        if moe:
            e, k, inter_e = t.num_experts, t.top_k_experts, t.moe_intermediate_size
            slots = n * k
            matmul("router_proj", "dense_gemm", i, n, h, e)
            op("router_topk", "routing", i, read=n * e, write=0, weights=e, index=2 * slots)
            scale_bytes = 4 if fp8 else 0  # one fp32 scale per expert and output channel
            op("expert_gate_up", "expert_gemm", i, read=n * h, write=slots * 2 * inter_e,
               weights=hit * 2 * inter_e * h, flops=2 * slots * h * 2 * inter_e, index=slots,
               weight_bytes=hit * 2 * inter_e * (h * es + scale_bytes))
            op("expert_act", "row_kernels", i, read=slots * 2 * inter_e, write=slots * inter_e)
            op("expert_down", "expert_gemm", i, read=slots * inter_e, write=slots * h, weights=hit * h * inter_e,
               flops=2 * slots * inter_e * h, index=slots, weight_bytes=hit * h * (inter_e * es + scale_bytes))
            op("moe_combine", "routing", i, read=slots * h, write=n * h, index=slots)
        # post-FFN norm(s) + residual + layer scalar, then the next layer's input norm (after the last: the final
        # norm, and the layer's own output stream, which nothing else reads, is not written)
        branches = 2 if moe else 1  # the dense MLP's output (and the experts'), beside the residual
        norms = 3 if moe else 1  # post_feedforward_layernorm (with _1 and _2 on MoE layers)
        op("epilogue", "row_kernels", i, read=(branches + 1) * n * h + 1, write=(1 if i == layers - 1 else 2) * n * h,
           weights=(norms + 1) * h)
    matmul("lm_head", "dense_gemm", None, 1, h, t.vocab_size)
    return ops.ops


def vision_ops(cfg: Gemma4Config, patches: list[int], elem_bytes: int = 2) -> list[Op]:
    """The ops of the vision tower and the projector for images of ``patches`` real patches each, in order.

    From the model's math, as :func:`prefill_ops`: padding patches cost nothing (a floor counts real work); each
    image attends within itself, every patch to every patch (``P²`` pairs per head); the row ops between two matmuls
    are one op each; the position-embedding lookup moves bytes (two table rows per patch) and is not compute; the
    pixels arrive in fp32.
    """
    if not isinstance(cfg, Gemma4Config) or cfg.vision is None:
        raise ValueError("vision_ops needs a Gemma4Config with a vision tower")
    if not isinstance(patches, (list, tuple)) or not patches:
        raise ValueError(f"patches must be a non-empty list of patch counts per image, got {patches!r}")
    v, s = cfg.vision, _check_count("elem_bytes", elem_bytes)
    counts = [_check_count("patches per image", p) for p in patches]
    pool = v.pooling_kernel_size**2
    if any(p % pool for p in counts):
        raise ValueError(f"every image's patches must be a multiple of the {pool}-patch pooling block, got {counts}")
    n, d, inter, pix = sum(counts), v.hidden_size, v.intermediate_size, 3 * v.patch_size**2
    heads, hd = v.num_attention_heads, v.head_dim
    pairs = sum(p * p for p in counts)
    ops = _Ops(s)
    ops.op("patch_proj", "dense_gemm", None, read=n * pix * 4 / s, write=n * d, weights=pix * d,
           flops=2 * n * pix * d)  # fp32 pixels in
    # two table rows per patch, added to the projection, then layer 0's input norm
    ops.op("position_embedding", "other", None, read=3 * n * d, write=2 * n * d, weights=d)
    for i in range(v.num_hidden_layers):
        ops.matmul("qkv_proj", "dense_gemm", i, n, d, 3 * heads * hd)
        ops.op("qkv_norm_rope", "row_kernels", i, read=3 * n * heads * hd, write=3 * n * heads * hd, weights=2 * hd)
        ops.op("attention", "attention", i, read=3 * n * heads * hd, write=n * heads * hd,
               flops=4 * hd * heads * pairs)
        ops.matmul("o_proj", "dense_gemm", i, n, heads * hd, d)
        # post-attention norm + residual, then the MLP's input norm
        ops.op("post_attention", "row_kernels", i, read=2 * n * d, write=2 * n * d, weights=2 * d)
        ops.matmul("mlp_gate_up", "dense_gemm", i, n, d, 2 * inter)
        ops.op("mlp_act", "row_kernels", i, read=2 * n * inter, write=n * inter)
        ops.matmul("mlp_down", "dense_gemm", i, n, inter, d)
        # post-MLP norm + residual, then the next layer's input norm (after the last: the stream alone)
        last = i == v.num_hidden_layers - 1
        ops.op("epilogue", "row_kernels", i, read=2 * n * d, write=(1 if last else 2) * n * d,
               weights=(1 if last else 2) * d)
    soft = n // pool
    # k×k average pooling, √D scaling, standardisation (its bias and scale vectors) and the projector's unweighted
    # norm: one row op
    ops.op("pool_standardize", "row_kernels", None, read=n * d, write=soft * d, weights=2 * d if v.standardize else 0)
    ops.matmul("projector", "dense_gemm", None, soft, d, cfg.text.hidden_size)
    return ops.ops


def vision_floor(cfg: Gemma4Config, patches: list[int], copy_bw: float, mm_rate: float,
                 elem_bytes: int = 2) -> dict:
    """The tower's floors for ``patches`` (per image), as :func:`floors` gives the text's: weight bytes over the
    copy bandwidth or FLOPs over the matmul rate, the larger, and the op-level floor beside it."""
    ops = vision_ops(cfg, patches, elem_bytes)
    nbytes, flops = sum(o.weight_bytes for o in ops), sum(o.flops for o in ops)
    out = {"patches": list(patches), "weight_bytes": nbytes, "flops": flops,
           "attention_flops": sum(o.flops for o in ops if o.family == "attention"),
           "weight_floor_ms": nbytes / _check_rate("copy_bw", copy_bw) * 1e3,
           "compute_floor_ms": flops / _check_rate("mm_rate", mm_rate) * 1e3}
    out["floor_ms"] = max(out["weight_floor_ms"], out["compute_floor_ms"])
    out.update(op_floor(ops, copy_bw, mm_rate))
    return out


def op_floor(ops: list[Op], copy_bw: float, mm_rate: float) -> dict:
    """The op-level floor of ``ops`` in ms, in total and per family (every family of :data:`FAMILIES` present)."""
    bw, rate = _check_rate("copy_bw", copy_bw), _check_rate("mm_rate", mm_rate)
    by_family = dict.fromkeys(FAMILIES, 0.0)
    for o in ops:
        if o.family not in by_family:
            raise ValueError(f"op {o.name!r} has family {o.family!r}, not one of {FAMILIES}")
        by_family[o.family] += o.floor_ms(bw, rate)
    return {"op_floor_ms": sum(by_family.values()), "op_floor_by_family_ms": by_family}


def floors(cfg: Gemma4Config | TextConfig, tokens: int, experts_hit: float, copy_bw: float, mm_rate: float,
           elem_bytes: int = 2, expert_elem_bytes: int | None = None) -> dict:
    """Both floors of one prefill of ``tokens`` tokens. The single floor: the weight bytes it must read (experts:
    only the ``experts_hit`` per layer the routing used) over copy bandwidth, or its matmul FLOPs over the matmul
    rate; the op-level floor beside it (see the module docstring). ``expert_elem_bytes=1``: FP8 experts."""
    ops = prefill_ops(cfg, tokens, experts_hit, elem_bytes, expert_elem_bytes)
    nbytes = sum(o.weight_bytes for o in ops)
    flops = sum(o.flops for o in ops)
    out = {"tokens": tokens, "experts_hit": experts_hit, "weight_bytes": nbytes, "flops": flops,
           "weight_floor_ms": nbytes / _check_rate("copy_bw", copy_bw) * 1e3,
           "compute_floor_ms": flops / _check_rate("mm_rate", mm_rate) * 1e3}
    out["floor_ms"] = max(out["weight_floor_ms"], out["compute_floor_ms"])
    out.update(op_floor(ops, copy_bw, mm_rate))
    return out


def text_weight_bytes(model) -> int:
    """Bytes of every text-decoder parameter of a built ``model`` (its real tensors, whatever their dtypes)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "language_model" in n)


# ---- decode -----------------------------------------------------------------------------------------------------
def expected_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts ``tokens`` tokens touch in one MoE layer when each picks ``top_k`` of ``num_experts``
    uniformly at random (what random router weights and distinct prompts give): ``E·(1 − (1 − k/E)^tokens)``.

    Why: a token leaves a given expert out with probability ``1 − k/E``, independent tokens leave it out together
    with probability ``(1 − k/E)^tokens``, and the expected count is the sum of that over the ``E`` experts. Clamped
    to ``[k, min(E, tokens·k)]``, where it lies, so float rounding cannot push it out of the range the floor takes."""
    e, k, n = (_check_count(name, v) for name, v in (("num_experts", num_experts), ("top_k", top_k),
                                                      ("tokens", tokens)))
    if k > e:
        raise ValueError(f"top_k={k} exceeds num_experts={e}")
    return min(max(e * (1.0 - (1.0 - k / e) ** n), float(k)), float(min(e, n * k)))


def kv_read_bytes(cfg: Gemma4Config | TextConfig, batch: int, context: int, elem_bytes: int = 2, *,
                  as_cached: bool = False) -> int:
    """Bytes of cached keys and values one decode step's attention must read: ``batch`` sequences, each with
    ``context`` earlier tokens, the new one at position ``context``.

    Per layer a new token reads the K/V of the earlier tokens it sees (its own it has just computed): all
    ``context`` of them on full layers, at most ``sliding_window − 1`` on sliding ones. On K-as-V layers
    (``attention_k_eq_v``) V is the raw K projection, so both derive from one stored tensor: the floor counts one;
    ``as_cached=True`` counts what ``gemma4lab.runtime.kv_cache.KVCache`` stores instead (normed K and V, two on
    every layer)."""
    t, b = _text(cfg), _check_count("batch", batch)
    s = _check_count("elem_bytes", elem_bytes)
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise ValueError(f"context must be an int >= 0, got {context!r}")
    total = 0
    for i in range(t.num_hidden_layers):
        seen = min(context, t.sliding_window - 1) if t.is_sliding(i) else context
        tensors = 2 if as_cached or not t.layer_k_eq_v(i) else 1
        total += seen * tensors * t.layer_kv_heads(i) * t.layer_head_dim(i)
    return b * total * s


def decode_floor(cfg: Gemma4Config | TextConfig, batch: int, context: int, experts: float, copy_bw: float,
                 elem_bytes: int = 2, steps: int = 1, expert_elem_bytes: int | None = None) -> dict:
    """The bandwidth floor of a decode step (one new token for each of ``batch`` sequences with ``context`` earlier
    tokens): the bytes it must read over the copy bandwidth, averaged over ``steps`` consecutive steps from there
    (a timed run's cache grows by one token a step). Bytes: every non-expert weight (the tied head reads the whole
    table), ``experts`` distinct experts per MoE layer (:func:`expected_experts`, or the count a run saw) and the KV
    cache (:func:`kv_read_bytes`). Activations are left out: at a few dozen tokens they are kilobytes.

    Why bytes alone: a step multiplies each weight by at most ``batch`` rows, 2·batch FLOPs per weight element, far
    below a GPU's FLOP-per-byte ridge at these batch sizes. Weight bytes come from :func:`prefill_ops` (the weights
    a forward of ``batch`` tokens reads), so prefill and decode count the model the same way."""
    ops = prefill_ops(cfg, batch, experts, elem_bytes, expert_elem_bytes)
    n = _check_count("steps", steps)
    expert = sum(o.weight_bytes for o in ops if o.family == "expert_gemm")
    other = sum(o.weight_bytes for o in ops) - expert
    kv = sum(kv_read_bytes(cfg, batch, context + j, elem_bytes) for j in range(n)) / n
    cached = sum(kv_read_bytes(cfg, batch, context + j, elem_bytes, as_cached=True) for j in range(n)) / n
    total = other + expert + kv
    return {"batch": batch, "context": context, "steps": n, "experts": float(experts), "non_expert_bytes": other,
            "expert_bytes": expert, "kv_bytes": kv, "kv_bytes_as_cached": cached, "bytes": total,
            "floor_ms": total / _check_rate("copy_bw", copy_bw) * 1e3}
