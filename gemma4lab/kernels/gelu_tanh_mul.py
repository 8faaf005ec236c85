"""``gelu_tanh(gate) * up`` (Gemma's ``gelu_pytorch_tanh`` MLP activation), fp32 inside, one rounding.

``gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x * sigmoid(2u)`` with ``u = sqrt(2/pi) (x + 0.044715 x^3)``: the sigmoid
form needs only ``exp`` (no libdevice tanh, works under the interpreter) and is exact algebra, not an approximation.
Hugging Face computes the activation in the activation dtype (bf16 out of ``gelu``, then a bf16 multiply), i.e. two
roundings where we have one.

Flat 1-D launch over the ``T * I`` outputs: no column padding whatever ``I`` is (2112 dense, 704 per expert);
``I`` is a compile-time constant so ``// I`` and ``% I`` compile to multiplies and the loads stay vectorised.
Bytes per output element: read gate and up (2b), write out (b).
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (
    check_out,
    check_rows,
    check_same_tokens,
    num_sms,
    pdl_meta,
    pow2,
    register,
    to_dtype,
    wait_and_release,
)

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@triton.jit
def _gelu_tanh_mul_kernel(g_ptr, u_ptr, o_ptr, n_elem, stride_g, stride_u, stride_o, INTER: tl.constexpr,
                          BLOCK: tl.constexpr, EVEN: tl.constexpr, BIG: tl.constexpr, PDL: tl.constexpr):
    wait_and_release(PDL)
    if BIG:  # more than 2**31 elements: 64-bit flat indices
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row = (offs // INTER).to(tl.int64)
    col = offs % INTER
    if EVEN:
        g = tl.load(g_ptr + row * stride_g + col).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + col).to(tl.float32)
    else:
        mask = offs < n_elem
        g = tl.load(g_ptr + row * stride_g + col, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + col, mask=mask, other=0.0).to(tl.float32)
    z = 2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g)
    ez = tl.exp(-tl.abs(z))  # overflow-free sigmoid(z)
    y = g * tl.where(z >= 0, 1.0 / (1.0 + ez), ez / (1.0 + ez)) * u
    y = to_dtype(y, o_ptr.dtype.element_ty)
    if EVEN:
        tl.store(o_ptr + row * stride_o + col, y)
    else:
        tl.store(o_ptr + row * stride_o + col, y, mask=mask)


@dataclass(frozen=True)
class ElementwiseConfig:
    """Launch of the flat elementwise kernel: ``block`` outputs per program, ``num_warps`` warps."""

    block: int
    num_warps: int

    def __post_init__(self) -> None:
        pow2(self, "block", "num_warps")


def elementwise_config(n_elem: int, device: torch.device | None = None) -> ElementwiseConfig:
    """4096 outputs per program and 8 warps (16 per thread = two 16-byte bf16 vectors per input); smaller blocks
    when there is little work, so that every SM gets at least two programs."""
    block = 4096
    while block > 256 and triton.cdiv(n_elem, block) < 2 * num_sms(device):
        block //= 2
    return ElementwiseConfig(block=block, num_warps=max(1, min(8, block // 512)))


def _launch(gate, up, out, config: ElementwiseConfig | None) -> None:
    n, inter = gate.shape
    n_elem = n * inter
    cfg = config or elementwise_config(n_elem, gate.device)
    _gelu_tanh_mul_kernel[(triton.cdiv(n_elem, cfg.block),)](
        gate, up, out, n_elem, gate.stride(0), up.stride(0), out.stride(0), INTER=inter, BLOCK=cfg.block,
        EVEN=n_elem % cfg.block == 0, BIG=n_elem + cfg.block >= 2**31, num_warps=cfg.num_warps,
        **pdl_meta(gate))


def _triton(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> None:
    _launch(gate, up, out, None)


def _torch(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(gemma_gelu_tanh_and_mul_ref(gate, up))


op = register("gelu_tanh_and_mul(Tensor gate, Tensor up, Tensor(a!) out) -> ()", _triton, _torch)


def gemma_gelu_tanh_and_mul(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None,
                            config: ElementwiseConfig | None = None) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` for two ``[T, I]`` tensors (any row strides, contiguous last dim)."""
    gate = check_rows("gate", gate)
    n, inter = gate.shape
    check_rows("up", up, hidden=inter, dtype=gate.dtype, device=gate.device)
    check_same_tokens("up", up, n)
    out = (torch.empty((n, inter), dtype=gate.dtype, device=gate.device) if out is None
           else check_out("out", out, (n, inter), gate.dtype, gate.device))
    if n == 0 or inter == 0:
        return out
    if config is not None:
        _launch(gate, up, out, config)
    else:
        op(gate, up, out)
    return out


def gemma_gelu_tanh_mul(gate_up: torch.Tensor, *, out: torch.Tensor | None = None,
                        config: ElementwiseConfig | None = None) -> torch.Tensor:
    """``gate_up [T, 2I]`` (gate = first half, up = second half) -> ``gelu_tanh(gate) * up [T, I]``."""
    gate_up = check_rows("gate_up", gate_up)
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate_up width must be even (gate and up halves), got {gate_up.shape[1]}")
    inter = gate_up.shape[1] // 2
    return gemma_gelu_tanh_and_mul(gate_up[:, :inter], gate_up[:, inter:], out=out, config=config)


def gemma_gelu_tanh_and_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-torch twin: fp32 math (fp64 if fed fp64), one rounding."""
    ct = torch.float64 if gate.dtype == torch.float64 else torch.float32
    g = gate.to(ct)
    y = 0.5 * g * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (g + 0.044715 * g.pow(3)))) * up.to(ct)
    return y.to(gate.dtype)


def gemma_gelu_tanh_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    inter = gate_up.shape[1] // 2
    return gemma_gelu_tanh_and_mul_ref(gate_up[:, :inter], gate_up[:, inter:])
