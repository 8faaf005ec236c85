"""The text decoder's building blocks in plain PyTorch, op for op as the Hugging Face reference rounds them.

These are the *unfused* reference path: every function here is the math the fused kernels in
``gemma4lab.kernels`` replace, written so that a bfloat16 model rounds where transformers rounds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemma4lab.model.config import TextConfig
from gemma4lab.model.packing import PackedProjections, packed_weight


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Gemma 4 RMSNorm: fp32 math, ``x * w`` (not ``1 + w``), one cast back to the input dtype."""
    xf = x.float()
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.type_as(x)


def tensor_core_kernels_ok(x: Tensor) -> bool:
    """Whether the tensor-core Triton kernels (``moe_gemm``, ``dense_gemm``) may take ``x``: on CUDA, or in fp32
    under Triton's CPU interpreter (its bf16 ``tl.dot`` is wrong, so never bf16 there)."""
    from gemma4lab.kernels import kernel_backend

    backend = kernel_backend(x)
    return backend == "triton" or (backend == "triton-interpreter" and x.dtype == torch.float32)


def _plain(linear: object, x: Tensor) -> bool:
    """A bias-free ``nn.Linear`` whose weight is x's dtype, with no hooks, called as itself (not an adapter, a
    quantised linear that only looks like one, or a wrapper): the only kind whose weight the few-row kernel may read
    instead of calling it — a hook a user put on the module must still see it run."""
    return (isinstance(linear, nn.Linear) and type(linear).forward is nn.Linear.forward
            and linear.bias is None and isinstance(linear.weight, Tensor) and linear.weight.dtype == x.dtype
            and not (linear._forward_hooks or linear._forward_pre_hooks or _global_module_hooks()))


def _global_module_hooks() -> bool:
    from torch.nn.modules import module as _module

    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def few_row_product(x: Tensor, weights: list[Tensor]) -> Tensor | None:
    """``x @ [w0; w1; …]ᵀ`` as one ``dense_gemm`` launch when ``x`` has at most ``DENSE_MAX_ROWS`` rows on a
    kernel path (decode, short prompts: a GEMM's fixed cost, not its bytes, bounds it there); None otherwise, and
    the caller runs its library GEMMs. Never under torch.compile: a branch on the row count would specialise the
    compiled graph on it (the compiled peer serves every prompt length with one graph)."""
    if torch.compiler.is_compiling():
        return None
    from gemma4lab.kernels.dense_gemm import DENSE_MAX_ROWS, gemma_dense_gemm

    if x.dim() != 2 or x.stride(-1) != 1 or not 0 < x.shape[0] <= DENSE_MAX_ROWS or not tensor_core_kernels_ok(x) \
            or any(w.dtype != x.dtype for w in weights):
        return None
    return gemma_dense_gemm(x, weights)


def project(x: Tensor, linears: tuple[nn.Module, ...], fused: bool) -> tuple[Tensor, ...]:
    """``x`` through each of ``linears`` (which share their input): with ``fused``, one :func:`few_row_product`
    launch where it applies, else one library GEMM over the weights where they are packed back to back
    (:mod:`gemma4lab.model.packing`), returned as column views of the one output; otherwise one ``F.linear`` each.
    Not under torch.compile, whose graph of the fused model keeps one GEMM per projection (its peer column)."""
    if fused and all(_plain(m, x) for m in linears):
        weights = [m.weight for m in linears]
        y = few_row_product(x, weights)
        if y is None and len(weights) > 1 and not torch.compiler.is_compiling():
            w = packed_weight(weights)
            y = None if w is None else F.linear(x, w)
        if y is not None:
            return tuple(torch.split(y, [w.shape[0] for w in weights], dim=-1))
    return tuple(m(x) for m in linears)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


# ---- rotary embeddings ----------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float, rope_type: str, partial_rotary_factor: float = 1.0) -> Tensor:
    """Inverse frequencies, ``head_dim // 2`` of them.

    ``proportional`` (Gemma 4 full layers) keeps the exponent denominator at the *full* head dim and zeroes the
    frequencies past ``partial_rotary_factor``: only dims [0:64] and [256:320] of a 512-wide head rotate.
    """
    if rope_type == "default":
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    if rope_type == "proportional":
        n_rot = int(partial_rotary_factor * head_dim // 2)
        rot = 1.0 / (theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.float) / head_dim))
        return torch.cat([rot, torch.zeros(head_dim // 2 - n_rot)])
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def rope_cos_sin(inv_freq: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 ``cos``/``sin`` of shape [N, head_dim] for token positions [N] (neox layout: freqs repeated twice)."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [N, heads, D]; cos/sin: fp32 [N, D], cast to x's dtype first as the reference does."""
    c = cos.to(x.dtype)[:, None, :]
    s = sin.to(x.dtype)[:, None, :]
    return x * c + rotate_half(x) * s


# ---- feed-forward ---------------------------------------------------------------------------------------------------


class MLP(PackedProjections):
    """Dense gated-GELU(tanh) MLP (the converter calls it the shared expert). gate and up are stored packed."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.pack()

    def packed_groups(self) -> list[list[nn.Linear]]:
        return [[self.gate_proj, self.up_proj]]

    def forward(self, x: Tensor, fused_act: bool = False, dense: bool = False) -> Tensor:
        """``dense``: few-row projections through ``dense_gemm``, gate and up in one launch (:func:`project`)."""
        gate, up = project(x, (self.gate_proj, self.up_proj), dense)
        if fused_act:
            from gemma4lab.kernels import gemma_gelu_tanh_and_mul

            return project(gemma_gelu_tanh_and_mul(gate, up), (self.down_proj,), dense)[0]
        return project(gelu_tanh(gate) * up, (self.down_proj,), dense)[0]


def router_tail(logits: Tensor, per_expert_scale: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """softmax (fp32) → top-k → renormalise → × per_expert_scale. Returns fp32 weights and int64 ids."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, idx = torch.topk(probs, top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return w * per_expert_scale[idx], idx


class Router(nn.Module):
    """Picks ``top_k`` of ``num_experts`` per token from the *un-normalised* residual stream."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.top_k = cfg.top_k_experts
        self.scalar_root_size = cfg.hidden_size**-0.5
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))
        #: ``[num_experts]`` added to the logits when set (None: the reference router). Not part of Gemma 4: the lab
        #: uses it to give random weights the skewed expert load of a trained router (``gemma4lab.lab.routing``).
        self.logit_bias: Tensor | None = None

    def logits(self, router_in: Tensor) -> Tensor:
        out = self.proj(router_in)
        return out if self.logit_bias is None else out + self.logit_bias.to(out.dtype)

    def router_input(self, h: Tensor) -> Tensor:
        return rms_norm(h, None, self.eps) * self.scale * self.scalar_root_size

    def tail(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        return router_tail(logits, self.per_expert_scale, self.top_k)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.tail(self.logits(self.router_input(h)))


def _grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w, offs=offs)


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    if not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0) and dtype == torch.bfloat16
    return False


class Experts(nn.Module):
    """128 experts stored fused as 3-D tensors, ``gate_up_proj`` = [E, 2I, H] with the gate first.

    The CUDA path is CUDA-graph safe: it sorts routed rows by expert and runs two grouped matmuls whose group
    offsets live on the device, so there is no host synchronisation and no data-dependent shape. Per-token
    contributions are summed in fp32 over the top-k slots (no atomics), so replay is bit-identical.

    Fused (``fused_gemm``): ``moe_route`` (one launch: offsets, sorted slots, their inverse) → ``moe_gemm`` gate/up
    gathering the token rows in its operand load → ``moe_gemm`` down with the GELU in its operand load →
    ``moe_combine`` (un-sort, weight, sum in fp32): four launches. Unfused: argsort, count, cumsum, gather, two
    grouped matmuls, the activation, the inverse scatter and the weighted sum.
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(cfg.num_experts, 2 * cfg.moe_intermediate_size, cfg.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size))
        # per-output-channel scales once the weights are FP8 (``gemma4lab.quantize_experts``); None in bf16/fp32
        self.register_buffer("gate_up_scale", None, persistent=False)
        self.register_buffer("down_scale", None, persistent=False)
        #: FP8 weights only: the fused kernel quantises the activations too (FP8 × FP8 on the tensor cores); the
        #: library paths keep them in the model's dtype (``quantize_experts(..., activations="fp8")``)
        self.act_fp8 = False

    #: At or below this many tokens the streaming ``moe_gemm`` kernel replaces the library grouped GEMM (H200,
    #: results/moe_sweep_h200.json, both GEMMs of a layer at uniform routing: 0.39 vs 0.56 ms at 93 tokens, 0.41 vs
    #: 0.56 at 189, 0.43 vs 0.56 at 256, slower from 512 on; at the sweep's strong skew, where half the experts get
    #: no row, grouped_mm catches up: 0.21 vs 0.26 ms at 93 tokens, 0.30 vs 0.27 at 189, 0.37 vs 0.30 at 256).
    #: 256 is also a PCG bucket edge, so a padded bucket never crosses it.
    MOE_GEMM_MAX_TOKENS = 256
    #: FP8 activations (``act_fp8``) up to this many tokens; weight-only FP8 above. Quantising each row's K slices
    #: inside the operand load pays while the GEMM streams weights and costs once it is compute-bound (H200,
    #: results/prefill_h200_fp8a8.json: fused + PCG 12.1 against weight-only's 16.1 ms at 93 tokens, 14.5 against
    #: 17.5 at 189, but 58.9 against 50.7 at 1453 and 459.6 against 392.4 at 11533). 1024 is a PCG bucket edge, so
    #: a padded bucket takes the same path as the eager prompt.
    FP8_ACT_MAX_TOKENS = 1024

    def forward(self, x: Tensor, idx: Tensor, weights: Tensor, fused_act: bool = False,
                fused_gemm: bool = False) -> Tensor:
        kernels = self._kernel_ok(x)
        # FP8 weights: the kernel at every length (the library grouped GEMM would need the weights widened per call)
        fp8 = self.gate_up_proj.dtype == torch.float8_e4m3fn
        use_kernel = fused_gemm and (x.shape[0] <= self.MOE_GEMM_MAX_TOKENS or fp8) and kernels
        if x.is_cuda and not grouped_mm_available(x.device, x.dtype) and x.dtype != torch.float64:
            # e.g. fp32 on a GPU: torch's grouped_mm is bf16-only there, and the looped path syncs the host
            # (fatal inside CUDA-graph capture), so the Triton kernel serves every size. float64 is a reference
            # dtype (the kernel accumulates in fp32 and cannot compile it): the looped matmuls serve it.
            use_kernel = True
        grouped = use_kernel or grouped_mm_available(x.device, x.dtype)
        if fused_gemm and kernels and grouped:
            return self._routed(x, idx, weights, fused_act, use_kernel)
        if grouped:
            ys, order = self._grouped(x, idx, fused_act, use_kernel)
            y = torch.empty_like(ys)
            y[order] = ys  # undo the sort: a permutation, so no accumulation order issues
            y = y.view(*idx.shape, -1)
        else:
            y = self._looped(x, idx, fused_act)
        # y: [T, k, H] per-slot outputs in the activation dtype; weight and sum in fp32, cast once.
        return (y.float() * weights[..., None].float()).sum(dim=1).to(x.dtype)

    def _routed(self, x: Tensor, idx: Tensor, weights: Tensor, fused_act: bool, use_kernel: bool) -> Tensor:
        """The fused path: routing kernel, expert GEMMs (``moe_gemm`` with the gather and the GELU in its operand
        loads, or above ``MOE_GEMM_MAX_TOKENS`` the library grouped GEMM on gathered rows), fp32 combine."""
        from gemma4lab.kernels import gemma_moe_combine, gemma_moe_route

        offs, slots, positions = gemma_moe_route(idx, self.num_experts)
        ys = self._expert_mlps(x, offs, fused_act, use_kernel, slots, idx.shape[1])
        return gemma_moe_combine(ys, positions, weights.float().contiguous())

    def _act(self, gate_up: Tensor, fused_act: bool) -> Tensor:
        if fused_act:
            from gemma4lab.kernels import gemma_gelu_tanh_mul

            return gemma_gelu_tanh_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return gelu_tanh(gate) * up

    _kernel_ok = staticmethod(tensor_core_kernels_ok)

    def _grouped(self, x: Tensor, idx: Tensor, fused_act: bool, use_kernel: bool = False) -> tuple[Tensor, Tensor]:
        """Expert outputs in sorted order [T·k, H] and the sort order (slot index of each sorted row)."""
        t, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)  # routed slots sorted by expert
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat.to(torch.int64), torch.ones_like(flat, dtype=torch.int32))
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        return self._expert_mlps(x[order // k], offs, fused_act, use_kernel, k=k), order

    def _expert_mlps(self, x: Tensor, offs: Tensor, fused_act: bool, use_kernel: bool, slots: Tensor | None = None,
                     k: int = 1) -> Tensor:
        """Both expert matmuls on rows sorted by expert, ``[rows, H]`` in sorted order. ``slots`` (the routed slot of
        each sorted row): ``x`` holds the tokens and sorted row ``r`` is token ``slots[r] // k``; ``moe_gemm`` gathers
        it in its operand load, the library GEMM needs the gathered copy."""
        if use_kernel:
            from gemma4lab.kernels import gemma_moe_gemm

            up_scale, down_scale = self._scales()
            tokens = x.shape[0] if slots is not None else x.shape[0] // k
            a_fp8 = (bool(getattr(self, "act_fp8", False)) and up_scale is not None
                     and tokens <= Experts.FP8_ACT_MAX_TOKENS)
            h = gemma_moe_gemm(x, self.gate_up_proj, offs, row_index=slots, top_k=k, w_scale=up_scale, a_fp8=a_fp8)
            return gemma_moe_gemm(h, self.down_proj, offs, gelu_gate=True, w_scale=down_scale, a_fp8=a_fp8)
        xs = x if slots is None else x[slots // k]
        gate_up, down = self._dense_weights(x.dtype)
        h = self._act(_grouped_mm(xs, gate_up.transpose(-2, -1), offs), fused_act)
        return _grouped_mm(h, down.transpose(-2, -1), offs)

    def _scales(self) -> tuple[Tensor | None, Tensor | None]:
        # getattr: the same methods run over transformers' experts module (patch_transformers), which has none
        up, down = getattr(self, "gate_up_scale", None), getattr(self, "down_scale", None)
        if up is not None and self.gate_up_proj.dtype != torch.float8_e4m3fn:
            raise ValueError(f"these experts hold FP8 scales but {self.gate_up_proj.dtype} weights: the model was cast "
                             "after gemma4lab.quantize_experts (which would drop the quantisation silently); cast "
                             "first, then quantise")
        return up, down

    def _dense_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The weights in the activation dtype for the library paths: as stored, or FP8 widened and scaled (a
        transient copy; the fused kernel reads the FP8 bytes directly)."""
        up_scale, down_scale = self._scales()
        if up_scale is None:
            return self.gate_up_proj, self.down_proj
        from gemma4lab.model.quantize import dequantize_fp8_per_channel

        return (dequantize_fp8_per_channel(self.gate_up_proj, up_scale, dtype),
                dequantize_fp8_per_channel(self.down_proj, down_scale, dtype))

    def _looped(self, x: Tensor, idx: Tensor, fused_act: bool) -> Tensor:
        """Reference path (CPU): one matmul per expert that was hit. Syncs the host; never used under graphs."""
        t, k = idx.shape
        y = torch.zeros(t, k, x.shape[-1], dtype=x.dtype, device=x.device)
        gate_up, down = self._dense_weights(x.dtype)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)
            h = self._act(F.linear(x[tok], gate_up[e]), fused_act)
            y[tok, slot] = F.linear(h, down[e])
        return y
