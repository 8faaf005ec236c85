"""Shared plumbing for the fused kernels: backend dispatch, cheap input checks, launch heuristics and the
``@triton.jit`` helpers that load/store one *segment* of a row.

Why segments: Gemma 4's hidden size 2816 is not a power of two, and a Triton block must be. A single
``BLOCK = next_pow2(2816) = 4096`` tile leaves 31 % of the lanes masked (idle threads, wasted registers). We
instead cut a row into at most three power-of-two segments, ``2816 = 2048 + 512 + 256``, each loaded as its own
tile at a compile-time offset, so every lane does useful work and no column mask is needed at all. Only when the
hidden size is not a sum of three powers of two is the last segment padded and masked (e.g. 200 = 128 + 64 + 8 is
exact, 2880 = 2048 + 512 + 512 masks 192 lanes of 3072).
"""

from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def empty_kernel(x_ptr):  # tells how @triton.jit decorates in this process; measure.py times its launch
    pass


#: True when ``@triton.jit`` produced interpreter functions, i.e. ``TRITON_INTERPRET=1`` was set before import.
INTERPRET: bool = type(empty_kernel).__name__ == "InterpretedFunction"

#: The interpreter truncates fp32 -> bf16 (real GPUs round to nearest even); under it we round by hand so that the
#: CPU tests see the same bits the GPU will write. Compiled GPU code never takes this branch.
EMULATE_BF16_RTNE = tl.constexpr(INTERPRET)


def kernel_backend(t: torch.Tensor) -> str:
    """Which implementation a call with activations ``t`` runs: ``"triton"`` (CUDA), ``"triton-interpreter"``
    (``TRITON_INTERPRET=1`` set before import; CPU or CUDA tensors) or ``"torch-reference"`` (anything else)."""
    if INTERPRET and t.device.type in ("cpu", "cuda"):
        return "triton-interpreter"
    if t.device.type == "cuda":
        return "triton"
    return "torch-reference"


def use_triton(t: torch.Tensor) -> bool:
    return kernel_backend(t) != "torch-reference"


# ---- launch configuration -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchConfig:
    """How a kernel is launched: ``rows`` rows (tokens) per program (elements per program for the elementwise
    gelu kernel) and ``num_warps`` warps per program. Pass one as ``config=`` to any wrapper to override its
    heuristic (the benchmark's ``--sweep`` does)."""

    rows: int
    num_warps: int

    def __post_init__(self) -> None:
        for name in ("rows", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"LaunchConfig.{name} must be a power of two >= 1, got {v}")


@cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device | None) -> int:
    """Streaming multiprocessors of ``device`` (cached, no sync); 132 (H100/H200) when None; 1 on CPU so the
    interpreter packs rows densely (fewer programs = faster CPU tests, and the multi-row paths get exercised)."""
    if device is None:
        return 132
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def rows_config(n_rows: int, width: int, device: torch.device | None, *, max_tile: int = 8192,
                programs_per_sm: int = 4, max_warps: int = 8) -> LaunchConfig:
    """Pack rows into a program while (a) the tile stays <= ``max_tile`` elements per tensor (register budget)
    and (b) the grid still has ``programs_per_sm`` programs per SM (latency hiding, no idle SMs at small T).
    Warps scale with the tile so each thread holds ~8-16 elements per tensor (one or two 16-byte vectors).

    Examples on a 132-SM H100/H200 at hidden 2816: T < 1055 -> 1 row / 8 warps; T >= 1055 -> 2 rows / 8 warps.
    Hidden 128 at T = 32768 -> 32 rows / 8 warps."""
    rows = 1
    min_programs = programs_per_sm * num_sms(device)
    while rows * 2 * width <= max_tile and triton.cdiv(n_rows, rows * 2) >= min_programs:
        rows *= 2
    warps = max(1, min(max_warps, triton.next_power_of_2(rows * width) // 512))
    return LaunchConfig(rows=rows, num_warps=warps)


def row_segments(hidden: int) -> tuple[int, int, int]:
    """Split ``hidden`` into <= 3 power-of-two segments (largest first); the third is padded if needed.
    Unused segments are 0. ``sum`` >= hidden; equality means no column mask at all."""
    s0 = 1 << (hidden.bit_length() - 1)
    r1 = hidden - s0
    if r1 == 0:
        return s0, 0, 0
    s1 = 1 << (r1.bit_length() - 1)
    r2 = r1 - s1
    return s0, s1, (triton.next_power_of_2(r2) if r2 else 0)


# ---- input checks (metadata only: no host sync, safe inside CUDA-graph capture) -----------------------------
def _tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_rows(name: str, t: object, *, hidden: int | None = None, dtype: torch.dtype | None = None,
               device: torch.device | None = None) -> torch.Tensor:
    """A 2-D ``[tokens, hidden]`` activation whose rows are addressable with one row stride (last dim stride 1)."""
    t = _tensor(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [tokens, hidden], got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; expected one of float32, float16, bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the other activations are {dtype}; mixed dtypes are not "
                        "supported")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if hidden is not None and t.shape[1] != hidden:
        raise ValueError(f"{name} has hidden size {t.shape[1]}, expected {hidden}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    return t


def check_same_tokens(name: str, t: torch.Tensor, n_tokens: int) -> None:
    if t.shape[0] != n_tokens:
        raise ValueError(f"{name} has {t.shape[0]} tokens, expected {n_tokens}")


def check_out(name: str, t: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer: exact shape/dtype/device, contiguous last dim, rows that do not overlap."""
    t = _tensor(name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")
    if t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    if t.dim() == 2 and t.shape[0] > 1 and t.stride(0) < t.shape[1]:
        raise ValueError(f"{name} has overlapping rows (row stride {t.stride(0)} < width {t.shape[1]})")
    return t


def check_vector(name: str, t: object, n: int, act_dtype: torch.dtype, device: torch.device,
                 what: str = "hidden size") -> torch.Tensor:
    """A 1-D weight of length ``n`` in float32 or the activation dtype (the kernels upcast it to fp32 either way;
    the real model keeps weights in the activation dtype)."""
    t = _tensor(name, t)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [{n}], got shape {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} elements, expected {n} ({what})")
    if t.dtype not in (torch.float32, act_dtype):
        raise TypeError(f"{name} has dtype {t.dtype}; weights must be float32 or the activation dtype {act_dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the activations are on {device}")
    if n > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")
    return t


def check_scalar(name: str, t: object, device: torch.device) -> torch.Tensor:
    """A one-element float *device* tensor, read inside the kernel so CUDA graphs stay valid when it changes."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a one-element tensor on the activations' device (not a Python "
                        f"{type(t).__name__}), so a captured CUDA graph sees updates")
    if t.numel() != 1:
        raise ValueError(f"{name} must have exactly one element, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; expected float32, float16 or bfloat16")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the activations are on {device}")
    return t


def out_tuple(name: str, out: object, n: int) -> tuple:
    if out is None:
        return (None,) * n
    if not isinstance(out, (tuple, list)) or len(out) != n:
        raise TypeError(f"{name} must be a tuple of {n} tensors or None")
    return tuple(out)


def empty_rows(like: torch.Tensor, n_rows: int, width: int) -> torch.Tensor:
    return torch.empty((n_rows, width), dtype=like.dtype, device=like.device)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Reference math dtype: fp32, or fp64 when fed fp64 (the tests use that as an oracle)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rms_inv_ref(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``(mean(x^2) + eps)^-0.5`` over the last dim, in x's (fp32/fp64) dtype."""
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# ---- @triton.jit helpers ------------------------------------------------------------------------------------
@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """The one rounding of a kernel: fp32 -> ``dtype`` (round to nearest even, also under the interpreter)."""
    if EMULATE_BF16_RTNE:
        if dtype == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            u = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) << 16
            x = u.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def round_trip(x, dtype: tl.constexpr):
    """Round fp32 ``x`` to ``dtype`` and back: the value a later kernel would read from memory."""
    return to_dtype(x, dtype).to(tl.float32)


@triton.jit
def load_seg(ptr, row_off, row_mask, START: tl.constexpr, SIZE: tl.constexpr, H: tl.constexpr,
             EVEN_ROWS: tl.constexpr):
    """fp32 tile [ROWS, SIZE] of columns [START, START + SIZE) of the rows at ``row_off`` (element offsets)."""
    cols = START + tl.arange(0, SIZE)
    ptrs = ptr + row_off[:, None] + cols[None, :]
    if START + SIZE > H:
        x = tl.load(ptrs, mask=row_mask[:, None] & (cols < H)[None, :], other=0.0)
    elif EVEN_ROWS:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    return x.to(tl.float32)


@triton.jit
def load_row(ptr, row_off, row_mask, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, H: tl.constexpr,
             EVEN_ROWS: tl.constexpr):
    """Load a whole row block as up to three fp32 segments and return them with the per-row sum of squares.
    Absent segments (size 0) are returned as a placeholder (the first segment) that callers never use."""
    a = load_seg(ptr, row_off, row_mask, 0, S0, H, EVEN_ROWS)
    ss = tl.sum(a * a, axis=1)
    b = a
    c = a
    if S1 > 0:
        b = load_seg(ptr, row_off, row_mask, S0, S1, H, EVEN_ROWS)
        ss += tl.sum(b * b, axis=1)
    if S2 > 0:
        c = load_seg(ptr, row_off, row_mask, S0 + S1, S2, H, EVEN_ROWS)
        ss += tl.sum(c * c, axis=1)
    return a, b, c, ss


@triton.jit
def load_vec(ptr, START: tl.constexpr, SIZE: tl.constexpr, H: tl.constexpr):
    """fp32 [1, SIZE] slice of a weight vector, ready to broadcast over rows."""
    cols = START + tl.arange(0, SIZE)
    if START + SIZE > H:
        w = tl.load(ptr + cols, mask=cols < H, other=0.0)
    else:
        w = tl.load(ptr + cols)
    return w.to(tl.float32)[None, :]


@triton.jit
def store_seg(ptr, row_off, row_mask, x, START: tl.constexpr, SIZE: tl.constexpr, H: tl.constexpr,
              EVEN_ROWS: tl.constexpr):
    """Round fp32 ``x`` once to the buffer's dtype and store it."""
    cols = START + tl.arange(0, SIZE)
    ptrs = ptr + row_off[:, None] + cols[None, :]
    y = to_dtype(x, ptr.dtype.element_ty)
    if START + SIZE > H:
        tl.store(ptrs, y, mask=row_mask[:, None] & (cols < H)[None, :])
    elif EVEN_ROWS:
        tl.store(ptrs, y)
    else:
        tl.store(ptrs, y, mask=row_mask[:, None])


@triton.jit
def norm_store_seg(x, inv, w_ptr, ptr, row_off, row_mask, START: tl.constexpr, SIZE: tl.constexpr,
                   H: tl.constexpr, EVEN_ROWS: tl.constexpr):
    """Store ``x * inv * w[segment]`` (``inv`` is the per-row [ROWS] rms factor)."""
    y = x * inv[:, None] * load_vec(w_ptr, START, SIZE, H)
    store_seg(ptr, row_off, row_mask, y, START, SIZE, H, EVEN_ROWS)


def row_launch(n_rows: int, hidden: int, cfg: LaunchConfig) -> tuple[tuple[int], dict]:
    """Grid and compile-time arguments shared by the row-norm kernels (segments, rows per program)."""
    s0, s1, s2 = row_segments(hidden)
    meta = dict(H=hidden, S0=s0, S1=s1, S2=s2, ROWS=cfg.rows, EVEN_ROWS=n_rows % cfg.rows == 0,
                num_warps=cfg.num_warps)
    return (triton.cdiv(n_rows, cfg.rows),), meta
