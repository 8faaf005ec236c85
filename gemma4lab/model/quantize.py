"""FP8 expert weights: half the bytes of the stream that bounds a short prefill and every decode step.

At 93 tokens a 26B-A4B prefill streams 50.5 GB of weights, 45.6 GB of them experts; the expert GEMM already runs at
~93 % of copy bandwidth (``gemma4lab.kernels.moe_gemm``), so the floor itself must move. In FP8 (e4m3) the experts
are 22.8 GB.

Format: ``float8_e4m3fn`` weights with one float32 scale per expert and output channel, ``w[e, n, :] ≈ scale[e, n] ·
q[e, n, :]``, ``scale = max|w[e, n, :]| / 448`` (448: e4m3's largest finite value), so every channel uses the whole
range and nothing saturates. A per-channel scale factors out of the matmul's K sum, so the kernel widens the FP8
weights on load (exact: every e4m3 value is a bf16 value), accumulates in fp32 and multiplies by the scale once per
output. Activations stay in the model's dtype. The quantisation error is e4m3's: 3 mantissa bits, a relative step of
2⁻⁴ per weight (half of that at most after rounding); how that carries to a layer's output is measured, not
assumed (``tests/test_quantize.py`` on the tiny model, against a float64 truth beside bf16's own error).

Random weights cannot say what a trained checkpoint's outliers would do to per-channel scales (one large weight
stretches its channel's scale and coarsens the rest): judge FP8 on real weights before serving with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: e4m3's largest finite value
FP8_E4M3_MAX = 448.0


def e4m3_absmax(x: Tensor) -> tuple[Tensor, Tensor]:
    """The one FP8 rule of the package, over the last dim: ``scale = max|x| / 448`` (1 for an all-zero row, whose
    values are 0), ``q = round_to_e4m3(x / scale)`` (nearest even), so ``x ≈ scale · q`` and the largest magnitude
    maps to 448 exactly. Returns (``float8_e4m3fn`` q, ``scale`` of shape ``[..., 1]`` in ``x``'s dtype). Expert
    weights (per channel, below) and the kernel's FP8 activations (per K block, ``kernels.quantize_act_e4m3``) use
    it. Torch only: importing it does not decorate the Triton kernels."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    return (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), scale


def quantize_fp8_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """``[..., N, K]`` weights → (``float8_e4m3fn`` of the same shape, ``float32 [..., N]`` scales) with
    ``w ≈ scale[..., None] · q``. All-zero channels get scale 1 (their q is 0). Computed in fp32, one slice of the
    leading dims at a time, so the temporaries stay at one expert's size."""
    if not isinstance(w, Tensor) or w.dim() < 2 or not w.is_floating_point():
        raise TypeError(f"expected a floating-point weight tensor [..., N, K], got {getattr(w, 'shape', w)!r}")
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
    scale = torch.empty(w.shape[:-1], dtype=torch.float32, device=w.device)
    flat_w, flat_q, flat_s = w.reshape(-1, *w.shape[-2:]), q.view(-1, *w.shape[-2:]), scale.view(-1, w.shape[-2])
    for i in range(flat_w.shape[0]):
        flat_q[i], s = e4m3_absmax(flat_w[i].float())
        flat_s[i] = s[:, 0]
    return q, scale


def dequantize_fp8_per_channel(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The inverse of :func:`quantize_fp8_per_channel` in ``dtype``: ``scale[..., None] · q``, multiplied in fp32
    and rounded once (what the library paths multiply by; the fused kernel reads the FP8 bytes instead)."""
    return (q.to(torch.float32) * scale[..., None]).to(dtype)


@dataclass
class QuantizationReport:
    """What ``quantize_experts`` changed: layers, and the expert bytes before and after (scales included)."""

    layers: int
    bytes_before: int
    bytes_after: int
    activations: str = "bf16"

    def __str__(self) -> str:
        def size(n: int) -> str:
            units = ((1e9, "GB"), (1e6, "MB"), (1e3, "KB"), (1, "B"))
            return next(f"{n / d:.2f} {u}" for d, u in units if n >= d or u == "B")

        return (f"{self.layers} MoE layer{'s' if self.layers != 1 else ''}: expert weights {size(self.bytes_before)} "
                f"→ {size(self.bytes_after)} (FP8 e4m3, per-channel scales"
                + ("; activations FP8 per row and 128 K columns in the kernel)" if self.activations == "fp8" else ")"))


def quantize_experts(model: nn.Module, fmt: str = "fp8_e4m3", activations: str = "bf16") -> QuantizationReport:
    """Replace every MoE layer's expert weights of a gemma4lab model by FP8 (e4m3) with per-channel scales, in place
    (see the module docstring). Quantise after any ``.to(dtype)`` cast (a later cast is refused at the next forward).
    The fused expert kernel then streams FP8; the library paths widen the weights per call.

    ``activations="fp8"``: the fused kernel also quantises the activations it reads, per row and 128 K columns, in
    its operand load, so the tensor cores multiply FP8 × FP8 (Hopper's ``wgmma`` has no bf16 × FP8 form, and
    widening the weights costs the bandwidth FP8 was meant to save: ``docs/perf_notes.md``). The error budget then
    doubles; the library (unfused) paths keep the activations in the model's dtype."""
    from gemma4lab.model.layers import Experts

    if fmt != "fp8_e4m3":
        raise ValueError(f"unsupported expert format {fmt!r}; supported: 'fp8_e4m3'")
    if activations not in ("bf16", "fp8"):
        raise ValueError(f"activations must be 'bf16' (the model's dtype) or 'fp8', got {activations!r}")
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    if not experts:
        raise ValueError("this model has no MoE experts to quantise (enable_moe_block is off)")
    before = after = 0
    for ex in experts:
        if ex.gate_up_scale is not None:
            raise ValueError("these experts are already FP8: quantise a model once")
        for name, scale_name in (("gate_up_proj", "gate_up_scale"), ("down_proj", "down_scale")):
            w = getattr(ex, name)
            before += w.numel() * w.element_size()
            q, scale = quantize_fp8_per_channel(w.detach())
            setattr(ex, name, nn.Parameter(q, requires_grad=False))
            setattr(ex, scale_name, scale)
            after += q.numel() + scale.numel() * 4
    set_fp8_activations(model, activations == "fp8")
    return QuantizationReport(layers=len(experts), bytes_before=before, bytes_after=after,
                              activations=activations)


def set_fp8_activations(model: nn.Module, on: bool) -> None:
    """Switch the fused expert kernel of every FP8-quantised MoE layer between bf16 activations (``on=False``) and
    FP8 activations (``on=True``, FP8 × FP8 on the tensor cores; see :func:`quantize_experts`). Part of the model's
    program: a PCG or decode runner captured before captures again."""
    from gemma4lab.model.layers import Experts

    experts = [m for m in model.modules() if isinstance(m, Experts) and m.gate_up_scale is not None]
    if not experts:
        raise ValueError("no FP8 experts to switch: quantise first (gemma4lab.quantize_experts)")
    for ex in experts:
        ex.act_fp8 = bool(on)


__all__ = ["FP8_E4M3_MAX", "QuantizationReport", "dequantize_fp8_per_channel", "e4m3_absmax", "quantize_experts",
           "quantize_fp8_per_channel", "set_fp8_activations"]
